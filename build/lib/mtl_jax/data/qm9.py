"""QM9, 11 regression tasks, the Nash-MTL protocol (Navon et al., "Multi-Task Learning as a
Bargaining Game", ICML 2022, Table 3; official code ``AvivNavon/nash-mtl``,
``experiments/quantum_chemistry``), offline from ``qm9pack`` or from tfds ``qm9`` when prepared.

Tasks: mu, alpha, homo, lumo, r2, zpve, U0, U, H, G, Cv (PyG indices 0, 1, 2, 3, 5, 6, 12, 13, 14,
15, 11; U0/U/H/G as atomization energies). Units, targets and features: see
:mod:`mtl_jax.data.qm9_features`. Metric: MAE per task in the units the Nash-MTL code reports
(meV for homo, lumo, zpve, U0, U, H, G), so ``Benchmark.reference`` holds its STL MAEs directly.

Protocol as the official code runs it:
* split: one seeded permutation of the molecules; the first 10,000 are the test set, the next
  10,000 the validation set, the remaining 110,831 the training set (``dataset.shuffle()`` then
  ``[:10000]``, ``[10000:20000]``, ``[20000:]``). Sizes: ``config.data.num_test`` /
  ``num_validation``.
* graphs: PyG's ``T.Complete()`` + ``T.Distance(norm=False)``: every ordered pair of distinct atoms
  is an edge, with the 4 bond-type columns (zero for non-bonded pairs) and the distance in
  Angstrom as a 5th column (``config.data.graph='complete'``); ``'bonds'`` keeps only the bonds
  (both directions) with the distance column.
* targets standardised with the training mean and (unbiased) std; the loss is the per-task MSE of
  the standardised targets, the metric the MAE in original units (``std * |pred - target|``).

Deviation: the official code computes the mean/std over the *whole* dataset (``train_dataset.data``
is the storage of all splits); we use the training split only, as the protocol intends.

Batches follow :mod:`mtl_jax.models.mpnn` (``pad_graphs``' format) with fixed capacities per loader
(graph slots = the per-process batch size; node/edge capacities from the split's size statistics,
six standard deviations above the mean, rounded up to a multiple of 64), so ``jit`` compiles once;
a batch beyond capacity (not observed on QM9) doubles it with a warning. Targets of padding graph
slots are NaN: the losses and metrics ignore them.

Several devices: a flat graph batch cannot be cut on its leading axis (edges index nodes, a graph
owns a range of nodes), so the benchmark sets ``per_device_batches`` and the trainer asks the
training loader for ``num_shards=D`` (its local devices): each batch is then a stack ``[D, ...]``
of D self-contained padded sub-batches of ``batch_size / (processes * D)`` molecules, with
per-sub-batch capacities. Training batches are full (``drop_last``), so every device holds the
same number of real molecules and the mean over devices of the per-device MSEs is the MSE of the
global batch: the step on D devices is the step on one (tested in ``tests/test_qm9_devices.py``).

Sources (``config.data.source``): ``qm9pack`` (default, offline), ``tfds`` (``qm9/original``);
``config.data.mock=True`` fabricates small molecules (no RDKit, no files).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.data import qm9_features as F
from mtl_jax.data.base import ArrayLoader, Benchmark
from mtl_jax.data.registry import register
from mtl_jax.tasks import Metric, Task

TARGETS = F.TARGETS
UNITS = F.UNITS
# STL MAEs of the Nash-MTL repository (``BASE`` in experiments/quantum_chemistry/utils.py), the
# Delta_m baseline, in the units of UNITS.
REFERENCE_MAE = dict(zip(TARGETS, (0.0671, 0.1814, 60.576, 53.915, 0.5027, 4.539, 58.838, 64.244,
                                   63.852, 66.223, 0.07212)))
GRAPHS = ("complete", "bonds")
SOURCES = ("qm9pack", "tfds")
SPLITS = ("train", "validation", "test")
NUM_EDGE_FEATURES = F.NUM_BOND_TYPES + 1


# ------------------------------------------------------------------------------------ tasks

def _masked_mse(pred, target):
  valid = jnp.isfinite(target)
  err = jnp.where(valid, pred - jnp.where(valid, target, 0.0), 0.0)
  return jnp.sum(err ** 2) / jnp.maximum(jnp.sum(valid), 1)


def mae_metric(std: float) -> Metric:
  """MAE in original units of standardised predictions/targets (NaN targets ignored)."""

  def stats(pred, target):
    valid = jnp.isfinite(target)
    err = jnp.where(valid, jnp.abs(pred - jnp.where(valid, target, 0.0)), 0.0)
    return {"abs_err": jnp.sum(err), "count": jnp.sum(valid).astype(jnp.float32)}

  def result(s):
    return float(std) * float(s["abs_err"]) / max(float(s["count"]), 1.0)

  return Metric("mae", higher_is_better=False, stats=stats, result=result)


def make_task(name: str, std: float) -> Task:
  from mtl_jax.models.heads import DenseHead
  return Task(name=name, head=lambda: DenseHead(1, squeeze=True), loss=_masked_mse,
              metrics=(mae_metric(std),), main_metric="mae")


# ------------------------------------------------------------------------------------- data

def fabricate(num_molecules: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
  """Random small molecules in the cache layout (for ``mock``): 3-9 atoms, chain bonds."""
  rng = np.random.default_rng(seed)
  n = rng.integers(3, 10, num_molecules)
  z = rng.choice(np.array([1, 6, 7, 8, 9], np.int8), size=int(n.sum()), p=[.5, .3, .08, .1, .02])
  pos = (np.concatenate([np.arange(k) for k in n])[:, None] * np.array([1.2, 0., 0.])
         + 0.1 * rng.standard_normal((int(n.sum()), 3))).astype(np.float32)
  bonds = np.concatenate([np.stack([np.arange(k - 1), np.arange(1, k)], 1) for k in n])
  counts = np.stack([np.bincount(np.searchsorted([1, 6, 7, 8, 9], zz), minlength=5)
                     for zz in np.split(z, np.cumsum(n)[:-1])])
  scale = np.array([1.5, 8., 600., 1300., 280., 900., 4000., 4000., 4000., 4000., 4.])
  return dict(
      version=np.array(F.CACHE_VERSION), index=np.arange(1, num_molecules + 1),
      z=z, pos=pos, atom_aromatic=np.zeros(len(z), bool), hybrid=np.full(len(z), 3, np.int8),
      bonds=bonds.astype(np.int16), kekule=np.zeros(len(bonds), np.int8),
      bond_aromatic=np.zeros(len(bonds), bool), perception=np.full(num_molecules, 2, np.int8),
      node_offsets=np.concatenate([[0], np.cumsum(n)]),
      bond_offsets=np.concatenate([[0], np.cumsum(n - 1)]), counts=counts,
      targets=rng.standard_normal((num_molecules, len(TARGETS))) * scale)


def split_indices(num: int, seed: int, num_validation: int = 10_000, num_test: int = 10_000,
                  train_limit: int = 0, eval_limit: int = 0) -> dict[str, np.ndarray]:
  """The official code's split: permutation, then test, validation, and the rest for training.

  When the data are smaller than ``num_validation + num_test`` (a slice, mock data) both shrink to
  ``num // 12`` (the protocol's 7.6% each), at least one molecule.

  ``train_limit`` / ``eval_limit`` (0 = all) keep the first N of each split *in permutation order*
  (as slicing the official code's shuffled dataset would), i.e. a uniformly random subset. They must
  not keep the N smallest indices: QM9 is ordered by molecule size (GDB-9 enumerates molecules by
  number of heavy atoms), so the first indices are the smallest molecules, whose size-dependent
  targets (U0, U, H, G, alpha, Cv, r2, zpve) lie far from the training distribution. Each split is
  returned sorted (contiguous reads of the cache).
  """
  if num_validation + num_test >= num:
    num_validation = num_test = max(1, num // 12)
  if num_validation + num_test >= num:
    raise ValueError(f"QM9: {num} molecules are too few for train/validation/test splits")
  if min(train_limit, eval_limit) < 0:
    raise ValueError(f"QM9: train_limit / eval_limit must be >= 0 (0 = all); got "
                     f"{train_limit}, {eval_limit}")
  perm = np.random.default_rng(seed).permutation(num)
  parts = {"test": perm[:num_test], "validation": perm[num_test:num_test + num_validation],
           "train": perm[num_test + num_validation:]}
  limits = {"test": eval_limit, "validation": eval_limit, "train": train_limit}
  return {k: np.sort(v[:limits[k]] if limits[k] else v) for k, v in parts.items()}


def _capacity(sizes: np.ndarray, per_batch: int) -> int:
  mu, sd = float(np.mean(sizes)), float(np.std(sizes))
  cap = mu * per_batch + 6.0 * sd * np.sqrt(per_batch) + float(np.max(sizes))
  cap = min(cap, float(np.sort(sizes)[-per_batch:].sum()) + 1)  # never above the worst case
  return int(-(-int(np.ceil(cap)) // 64) * 64)


class GraphStore:
  """Per-molecule graphs of the cache, collated into padded batches (``models.mpnn`` format)."""

  def __init__(self, cache: Mapping[str, np.ndarray], feature_set: str = "pyg",
               graph: str = "complete"):
    if graph not in GRAPHS:
      raise ValueError(f"unknown QM9 graph {graph!r}; valid: {', '.join(GRAPHS)}")
    self.graph = graph
    self.x = F.node_features(cache, feature_set)
    self.pos = np.asarray(cache["pos"], np.float32)
    self.noff = np.asarray(cache["node_offsets"], np.int64)
    self.boff = np.asarray(cache["bond_offsets"], np.int64)
    self.bonds = np.asarray(cache["bonds"], np.int64)
    self.btype = F.bond_types(cache, feature_set).astype(np.int64)
    self.num_nodes = np.diff(self.noff)
    self.num_bonds = np.diff(self.boff)
    self.num_edges = (self.num_nodes * (self.num_nodes - 1) if graph == "complete"
                      else 2 * self.num_bonds)
    self._pairs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def _complete(self, n: int):
    if n not in self._pairs:
      s, r = np.nonzero(~np.eye(n, dtype=bool))  # row-major, as PyG's Complete()
      self._pairs[n] = (s, r)
    return self._pairs[n]

  def molecule(self, m: int) -> dict[str, np.ndarray]:
    """One molecule as ``pad_graphs`` expects it (local indices)."""
    n0, n = self.noff[m], int(self.num_nodes[m])
    b = self.bonds[self.boff[m]:self.boff[m + 1]]
    t = self.btype[self.boff[m]:self.boff[m + 1]]
    if self.graph == "complete":
      snd, rcv = self._complete(n)
      code = np.full((n, n), -1, np.int64)
      code[b[:, 0], b[:, 1]] = t
      code[b[:, 1], b[:, 0]] = t
      ecode = code[snd, rcv]
    else:
      snd = np.concatenate([b[:, 0], b[:, 1]])
      rcv = np.concatenate([b[:, 1], b[:, 0]])
      ecode = np.concatenate([t, t])
    pos = self.pos[n0:n0 + n]
    edges = np.zeros((len(snd), NUM_EDGE_FEATURES), np.float32)
    hit = ecode >= 0
    edges[np.nonzero(hit)[0], ecode[hit]] = 1.0
    edges[:, -1] = np.linalg.norm(pos[snd] - pos[rcv], axis=-1)
    return {"nodes": self.x[n0:n0 + n], "edges": edges, "senders": snd, "receivers": rcv}

  def batch(self, mols: np.ndarray, num_graphs: int, max_nodes: int,
            max_edges: int) -> dict[str, np.ndarray]:
    from mtl_jax.models.mpnn import pad_graphs
    return pad_graphs([self.molecule(int(m)) for m in mols], max_nodes, max_edges, num_graphs)


def _fetcher(store: GraphStore, ids: np.ndarray, targets: np.ndarray, per_batch: int,
             names: tuple[str, ...], num_shards: int = 0):
  """``fetch(idx)``: one padded graph batch of ``per_batch`` graph slots, or with ``num_shards=D``
  a stack ``[D, ...]`` of D of them (``idx`` cut into D consecutive parts, one per device).

  The capacities are per (sub-)batch; all sub-batches of one stack share them (a stack needs one
  shape), so an overflow in any part grows the capacities of the whole stack. Several processes:
  the capacities come from the split's statistics, the same on every process, but an overflow
  grows only the capacities of the process that meets it (a global array then has unequal
  shards and the step fails; not observed on QM9, whose capacities are six standard deviations
  above the mean).
  """
  caps = {"nodes": _capacity(store.num_nodes[ids], per_batch),
          "edges": _capacity(store.num_edges[ids], per_batch)}

  def one(idx: np.ndarray):
    graphs = store.batch(ids[idx], per_batch, caps["nodes"], caps["edges"])
    y = np.full((per_batch, len(names)), np.nan, np.float32)
    y[:len(idx)] = targets[idx]
    return {"inputs": graphs, "targets": {t: y[:, k] for k, t in enumerate(names)}}

  def fetch(idx: np.ndarray):
    parts = np.array_split(idx, num_shards) if num_shards else [idx]
    need_n = max(int(store.num_nodes[ids[p]].sum()) for p in parts)
    need_e = max(int(store.num_edges[ids[p]].sum()) for p in parts)
    while need_n > caps["nodes"] or need_e > caps["edges"]:
      warnings.warn(f"QM9 batch of {need_n} atoms / {need_e} edges exceeds the capacity "
                    f"{caps['nodes']} / {caps['edges']}; doubling it (one recompilation)")
      caps["nodes"], caps["edges"] = 2 * caps["nodes"], 2 * caps["edges"]
    batches = [one(p) for p in parts]
    if not num_shards:
      return batches[0]
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)

  fetch.capacity = caps
  return fetch


def load_cache(config) -> dict[str, np.ndarray]:
  d = config.data
  if d.get("mock", False):
    return fabricate(int(d.get("mock_size", 0) or 256), seed=int(config.get("seed", 0)))
  source = str(d.get("source", "qm9pack") or "qm9pack")
  if source not in SOURCES:
    raise ValueError(f"unknown QM9 source {source!r}; valid: {', '.join(SOURCES)}")
  limit = int(d.get("limit", 0) or 0) or None
  cache_dir = str(d.get("cache_dir", "") or "") or (
      os.path.join(d.data_dir, "qm9_cache") if d.get("data_dir", "") else F.default_cache_dir())
  return F.load_or_build(source, cache_dir=cache_dir, limit=limit,
                         data_dir=str(d.get("data_dir", "") or "") or None, verbose=True)


def _select_tasks(tasks) -> tuple[str, ...]:
  """``config.tasks``: ``'all'``, ``'U0,homo'`` or a list (any subset, any order)."""
  if tasks in ("all", "", None):
    return TARGETS
  from mtl_jax.config_utils import task_list
  names = task_list(tasks)
  if names == "all":
    return TARGETS
  names = tuple(names)
  bad = [t for t in names if t not in TARGETS]
  if bad or not names:
    raise ValueError(f"unknown QM9 task(s) {bad}; valid: {', '.join(TARGETS)}")
  return names


def make_backbone(config):
  """The MPNN of :mod:`mtl_jax.models.mpnn`; ``config.model.width`` is its node width (64)."""
  from mtl_jax import models
  model = config.get("model", {})
  name = str(model.get("backbone", "") or "mpnn")
  if name != "mpnn":
    raise ValueError(f"QM9 batches are graphs: unknown QM9 backbone {name!r}; valid: mpnn")
  opts = {"node_features": F.NUM_NODE_FEATURES, "edge_features": NUM_EDGE_FEATURES}
  width = int(model.get("width", 0) or 0)
  if width:
    default = models.options("mpnn")["width"]
    # the backbone's width is a multiplier of 64 features (float default) or a feature count
    opts["width"] = width / 64.0 if isinstance(default, float) else width
  return models.get("mpnn", **opts)


@register("qm9")
def get_benchmark(config) -> Benchmark:
  """The QM9 benchmark of ``config`` (see the module docstring for the fields it reads)."""
  d = config.data
  names = _select_tasks(config.get("tasks", "all"))
  cols = [TARGETS.index(t) for t in names]
  cache = load_cache(config)
  feature_set = str(d.get("feature_set", "pyg") or "pyg")
  store = GraphStore(cache, feature_set, str(d.get("graph", "complete") or "complete"))
  splits = split_indices(len(cache["index"]), int(d.get("split_seed", 0)),
                         int(d.get("num_validation", 10_000)), int(d.get("num_test", 10_000)),
                         int(d.get("train_limit", 0) or 0), int(d.get("eval_limit", 0) or 0))
  y = np.asarray(cache["targets"], np.float64)[:, cols]
  mean = y[splits["train"]].mean(0)
  std = y[splits["train"]].std(0, ddof=1) if len(splits["train"]) > 1 else np.ones(len(cols))
  std = np.where(std > 0, std, 1.0)
  y_std = ((y - mean) / std).astype(np.float32)

  def loader(split: str, batch_size: int, seed: int = 0, shuffle: bool | None = None,
             process_index: int = 0, process_count: int = 1, position: int = 0, *,
             num_shards: int = 0) -> ArrayLoader:
    """``num_shards=D`` (D >= 1): every batch is a stack of D padded sub-batches of
    ``batch_size // (process_count * D)`` molecules each, one per local device (see
    :attr:`Benchmark.per_device_batches`); 0: one flat padded batch."""
    if split not in splits:
      raise ValueError(f"unknown QM9 split {split!r}; valid: {', '.join(SPLITS)}")
    num_shards = int(num_shards)
    if num_shards < 0 or batch_size % (process_count * max(num_shards, 1)):
      raise ValueError(f"QM9: batch_size {batch_size} must split evenly over {process_count} "
                       f"process(es) x {max(num_shards, 1)} device(s) (num_shards >= 0)")
    ids = splits[split]
    shuffle = (split == "train") if shuffle is None else shuffle
    fetch = _fetcher(store, ids, y_std[ids], batch_size // (process_count * max(num_shards, 1)),
                     names, num_shards)
    return ArrayLoader(len(ids), fetch, batch_size, seed=seed, shuffle=shuffle,
                       process_index=process_index, process_count=process_count,
                       position=position)

  backbone = make_backbone(config)
  tasks = [make_task(t, s) for t, s in zip(names, std)]
  return Benchmark(
      name="qm9", tasks=tasks, backbone=backbone, loader=loader,
      reference={t: {"mae": REFERENCE_MAE[t]} for t in names},
      split_sizes={k: len(v) for k, v in splits.items()},
      info={"units": {t: UNITS[t] for t in names}, "mean": dict(zip(names, mean.tolist())),
            "std": dict(zip(names, std.tolist())), "feature_set": feature_set,
            "graph": store.graph, "source": "mock" if d.get("mock", False) else
            str(d.get("source", "qm9pack") or "qm9pack"),
            "perception_counts": np.bincount(cache["perception"], minlength=3).tolist(),
            "splits": splits},
      per_device_batches=True)
