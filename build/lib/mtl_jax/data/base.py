"""The benchmark and loader contract shared by data/, train.py and launch/.

A :class:`Benchmark` knows its tasks, its default backbone, its splits, how to read them and its
published single-task reference numbers. Batches follow DESIGN.md:
``{'inputs': ..., 'targets': {task: ...}}``; a multi-input benchmark yields
``{task: {'inputs': ..., 'targets': {task: ...}}}`` (one batch per task).

:class:`ArrayLoader` is the one loader every benchmark uses over a random-access source (a numpy
array, a ``tfds.data_source``, a cached file): seeded per-epoch permutations, a resumable integer
position (the number of batches already produced), sharding by process index for several hosts,
and a grain pipeline with worker processes for sources that decode files (``workers > 0``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np


@functools.lru_cache(maxsize=4)
def _permutation(size: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(size)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Which examples batch number ``position`` holds on this process (pure, picklable).

  The permutation of epoch ``e`` is ``np.random.default_rng([seed, e])``; the global batch is
  split across processes, each taking its contiguous ``batch_size // process_count`` slice.
  """

  size: int
  batch_size: int
  seed: int = 0
  shuffle: bool = True
  drop_last: bool = True
  process_index: int = 0
  process_count: int = 1

  @property
  def batches_per_epoch(self) -> int:
    full, rest = divmod(self.size, self.batch_size)
    return full + (0 if self.drop_last or rest == 0 else 1)

  def indices(self, position: int) -> np.ndarray:
    epoch, b = divmod(int(position), self.batches_per_epoch)
    order = _permutation(self.size, self.seed, epoch) if self.shuffle else np.arange(self.size)
    idx = order[b * self.batch_size:(b + 1) * self.batch_size]
    if not self.drop_last:
      return np.array_split(idx, self.process_count)[self.process_index]
    per = len(idx) // self.process_count
    return idx[self.process_index * per:(self.process_index + 1) * per]


class _BatchAt:
  """``position -> batch``: the function grain maps over batch positions (picklable)."""

  def __init__(self, fetch, sampler: Sampler):
    self.fetch, self.sampler = fetch, sampler

  def __call__(self, position):
    return self.fetch(self.sampler.indices(int(position)))


def _die_with_parent(parent_pid: int, worker_index: int, worker_count: int) -> None:
  """grain ``worker_init_fn``: a worker ends when the training process does (also by SIGKILL,
  which runs no clean-up), instead of living on as an orphan holding memory and open files."""
  del worker_index, worker_count
  if sys.platform.startswith("linux"):
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  if os.getppid() != parent_pid:  # the parent died before prctl
    os._exit(0)  # pylint: disable=protected-access


def _grain_iterator(fn: _BatchAt, start: int, stop: int, workers: int, prefetch: int):
  """A grain pipeline over batch positions ``start .. stop-1``: each of ``workers`` spawned
  processes computes every ``workers``-th batch, ``prefetch`` batches ahead, delivered in order."""
  import grain  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():  # grain reads its absl flags; a library caller has parsed none
    flags.FLAGS.mark_as_parsed()
  ds = grain.MapDataset.range(start, stop).map(fn).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
  ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                   per_worker_buffer_size=prefetch),
                      worker_init_fn=functools.partial(_die_with_parent, os.getpid()))
  return iter(ds)


# Far beyond any run's number of steps: the training pipeline is an endless range of positions.
_ENDLESS = 2**62


class ArrayLoader:
  """Deterministic, resumable batches from a random-access source.

  The loader contract (every loader of this package): ``next(loader)`` the next training batch,
  ``loader.position`` the number of batches produced so far (settable: resuming sets it from the
  checkpoint), ``loader.batches_per_epoch``, ``loader.epoch()`` one in-order pass for evaluation
  (does not move ``position``).

  With ``workers > 0`` the batches are computed by a grain pipeline (``grain.MapDataset`` over
  batch positions, ``mp_prefetch`` with that many spawned worker processes, each ``prefetch``
  batches ahead): decoding and resizing run in the workers. Batch ``p`` is a pure function of
  ``p`` (:class:`Sampler`), so the grain iterator's whole state is ``position``: the checkpoint's
  ``position`` restores it exactly, whatever the worker count of the resumed run.

  Args:
    size: number of examples in the split.
    fetch: ``indices (np.ndarray[int]) -> batch`` (a pytree of numpy arrays with leading axis
      ``len(indices)``); picklable (cloudpickle) when ``workers > 0``.
    batch_size: global batch size (split across processes: each gets ``batch_size // count``).
    seed: the permutation of epoch ``e`` is ``np.random.default_rng([seed, e])``.
    shuffle: False for evaluation (in order; the last batch may be short unless ``drop_last``).
    drop_last: drop the incomplete last batch of an epoch (default: ``shuffle``).
    process_index, process_count: this host's slice of every global batch (default:
      ``jax.process_index()``, ``jax.process_count()``).
    workers: grain worker processes (0: batches computed in this process when asked for).
    prefetch: batches each worker computes ahead.
  """

  def __init__(self, size: int, fetch: Callable[[np.ndarray], Any], batch_size: int, *,
               seed: int = 0, shuffle: bool = True, drop_last: bool | None = None,
               process_index: int | None = None, process_count: int | None = None,
               position: int = 0, workers: int = 0, prefetch: int = 2):
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index, process_count = jax.process_index(), jax.process_count()
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    self.sampler = Sampler(int(size), int(batch_size), int(seed), bool(shuffle),
                           bool(shuffle if drop_last is None else drop_last),
                           int(process_index), int(process_count))
    if self.batches_per_epoch == 0:
      raise ValueError(f"split of {size} examples is smaller than one batch of {batch_size}")
    self.fetch, self.workers, self.prefetch = fetch, int(workers), int(prefetch)
    self._iterator = None
    self.position = int(position)

  size = property(lambda self: self.sampler.size)
  batch_size = property(lambda self: self.sampler.batch_size)
  batches_per_epoch = property(lambda self: self.sampler.batches_per_epoch)

  @property
  def position(self) -> int:
    return self._position

  @position.setter
  def position(self, value: int) -> None:
    self.close()  # a running pipeline is ahead of the old position
    self._position = int(value)

  def indices(self, position: int) -> np.ndarray:
    return self.sampler.indices(position)

  def close(self) -> None:
    """Stops the worker processes (a later ``next`` starts them again at ``position``)."""
    if getattr(self, "_iterator", None) is not None:
      self._iterator.close()
      self._iterator = None

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self):
    if self.workers <= 0:
      batch = self.fetch(self.indices(self.position))
    else:
      if self._iterator is None:
        self._iterator = _grain_iterator(_BatchAt(self.fetch, self.sampler), self.position,
                                         _ENDLESS, self.workers, self.prefetch)
      batch = next(self._iterator)
    self._position += 1
    return batch

  def epoch(self) -> Iterator[Any]:
    """One pass in order from the start (evaluation); does not move ``position``."""
    n = self.batches_per_epoch
    if self.workers <= 0:
      for b in range(n):
        yield self.fetch(self.indices(b))
      return
    it = _grain_iterator(_BatchAt(self.fetch, self.sampler), 0, n, min(self.workers, n),
                         self.prefetch)
    try:
      yield from it
    finally:
      it.close()


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
