"""The benchmark and loader contract shared by data/, train.py and launch/.

A :class:`Benchmark` knows its tasks, its default backbone, its splits, how to read them and its
published single-task reference numbers. Batches follow DESIGN.md:
``{'inputs': ..., 'targets': {task: ...}}``; a multi-input benchmark yields
``{task: {'inputs': ..., 'targets': {task: ...}}}`` (one batch per task).

:class:`ArrayLoader` is the one loader every benchmark uses over a random-access source (a numpy
array, a ``tfds.data_source``, a cached file): seeded per-epoch permutations, a resumable integer
position (the number of batches already produced), sharding by process index for several hosts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np


class ArrayLoader:
  """Deterministic, resumable batches from a random-access source.

  Args:
    size: number of examples in the split.
    fetch: ``indices (np.ndarray[int]) -> batch`` (a pytree of numpy arrays with leading axis
      ``len(indices)``).
    batch_size: global batch size (split across processes: each gets ``batch_size // count``).
    seed: the permutation of epoch ``e`` is ``np.random.default_rng([seed, e])``.
    shuffle: False for evaluation (in order; the last batch may be short unless ``drop_last``).
    drop_last: drop the incomplete last batch of an epoch (default: ``shuffle``).
    process_index, process_count: this host's slice of every global batch.
  """

  def __init__(self, size: int, fetch: Callable[[np.ndarray], Any], batch_size: int, *,
               seed: int = 0, shuffle: bool = True, drop_last: bool | None = None,
               process_index: int = 0, process_count: int = 1, position: int = 0):
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    self.size, self.fetch, self.batch_size = int(size), fetch, int(batch_size)
    self.seed, self.shuffle = int(seed), shuffle
    self.drop_last = shuffle if drop_last is None else drop_last
    self.process_index, self.process_count = process_index, process_count
    if self.batches_per_epoch == 0:
      raise ValueError(f"split of {size} examples is smaller than one batch of {batch_size}")
    self.position = int(position)

  @property
  def batches_per_epoch(self) -> int:
    full, rest = divmod(self.size, self.batch_size)
    return full + (0 if self.drop_last or rest == 0 else 1)

  def _order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.size)
    return np.random.default_rng([self.seed, epoch]).permutation(self.size)

  def indices(self, position: int) -> np.ndarray:
    epoch, b = divmod(position, self.batches_per_epoch)
    idx = self._order(epoch)[b * self.batch_size:(b + 1) * self.batch_size]
    per = len(idx) // self.process_count if self.drop_last else None
    if per is None:
      return np.array_split(idx, self.process_count)[self.process_index]
    return idx[self.process_index * per:(self.process_index + 1) * per]

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self):
    batch = self.fetch(self.indices(self.position))
    self.position += 1
    return batch

  def epoch(self) -> Iterator[Any]:
    """One pass in order from the start (evaluation); does not move ``position``."""
    for b in range(self.batches_per_epoch):
      yield self.fetch(self.indices(b))


@dataclasses.dataclass
class Benchmark:
  """What a benchmark module returns from ``get_benchmark(config)``.

  Attributes:
    name: registry name (``celeba``, ``qm9``, ...).
    tasks: the selected tasks, in the config's order.
    backbone: the default backbone for this benchmark (configs may override).
    loaders: ``(split, batch_size, seed, shuffle, process_index, process_count) -> ArrayLoader``;
      splits are ``'train'``, ``'validation'``, ``'test'``.
    reference: published single-task numbers ``{task: {metric: value}}`` for Δm%.
    multi_input: one batch per task (LibMTL's multi_input) instead of one shared batch.
    split_sizes: number of examples per split.
    per_device_batches: the batches cannot be split on their leading axis (flat padded graph
      batches: edges index nodes, graphs own node ranges), so the loader takes an extra keyword
      ``num_shards=D`` and then yields batches whose every leaf has a new leading axis of size D,
      one self-contained sub-batch of ``batch_size // (process_count * D)`` examples per local
      device; the trainer shards that axis over the devices and each device drops it. Without
      ``num_shards`` (or 0) the loader yields ordinary flat batches (evaluation, one device).
  """

  name: str
  tasks: Sequence[Any]
  backbone: Any
  loader: Callable[..., ArrayLoader]
  reference: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
  multi_input: bool = False
  split_sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  per_device_batches: bool = False
