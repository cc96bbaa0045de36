"""A fabricated, deterministic benchmark: K regression / binary tasks on random features.

It needs no download and builds in milliseconds, so the trainer's tests (and anyone trying a
combiner) can run end to end. Everything is a function of ``config.data.seed``:

* inputs ``x ~ N(0, I_dim)``;
* regression task ``reg<i>``: ``y = x·a_i + tanh(x·c_i) + σ ε`` (``σ = config.data.noise``), loss MSE,
  metric MAE (lower is better);
* binary task ``cls<i>``: ``y = 1[x·b_i + 0.5 sin(x·d_i) > 0]`` with a fraction ``label_noise`` of
  labels flipped, loss BCE on a logit, metric accuracy (higher is better).

Task directions are drawn so that pairs of tasks partly conflict (``conflict`` in [0, 1] mixes each
task's direction with the negative of the previous one), which gives gradient combiners something
to disagree on.

``reference`` holds the Bayes-optimal single-task numbers (not published figures: this data is
made up): MAE ``σ sqrt(2/π)`` for regression and accuracy ``1 - label_noise`` for classification.

``config.data.multi_input=True`` gives one batch per task (LibMTL's multi_input), each task with its
own examples.

Config keys (``config.data``): ``num_regression`` (2), ``num_classification`` (2), ``dim`` (8),
``width`` (16, the MLP backbone width; ``config.model.width`` overrides), ``depth`` (2),
``num_train`` (256), ``num_eval`` (64), ``noise`` (0.1), ``label_noise`` (0.0), ``conflict`` (0.5),
``seed`` (0), ``multi_input`` (False), ``batch_norm`` (False: BatchNorm in every MLP stage).
"""

from __future__ import annotations

import math

import flax.linen as nn

from mtl_jax.models.base import batch_norm as base_batch_norm
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax.data import common
from mtl_jax.data.base import ArrayLoader, Benchmark
from mtl_jax.data.registry import register
from mtl_jax.models.base import Backbone
from mtl_jax.tasks import Metric, Task

DEFAULTS = dict(num_regression=2, num_classification=2, dim=8, width=16, depth=2, num_train=256,
                num_eval=64, noise=0.1, label_noise=0.0, conflict=0.5, seed=0, multi_input=False,
                batch_norm=False)


class DenseStage(nn.Module):
  """One MLP stage: Dense (+ BatchNorm) + ReLU (``__call__(x, train)`` as ``models.base`` requires)."""

  features: int
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(self.features, use_bias=not self.batch_norm)(x)
    if self.batch_norm:
      x = base_batch_norm(train, momentum=0.9)(x)
    return nn.relu(x)


class ScalarHead(nn.Module):
  """A one-unit dense head returning shape (B,)."""

  @nn.compact
  def __call__(self, z, train: bool = False):
    del train
    return nn.Dense(1)(z)[..., 0]


def _mse(pred, y):
  return jnp.mean((pred - y) ** 2)


def _bce(logit, y):
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logit, y))


MAE = Metric(
    "mae", higher_is_better=False,
    stats=lambda p, y: {"abs": jnp.sum(jnp.abs(p - y)), "n": jnp.asarray(y.shape[0], jnp.float32)},
    result=lambda s: float(s["abs"] / max(float(s["n"]), 1.0)))

ACCURACY = Metric(
    "accuracy", higher_is_better=True,
    stats=lambda p, y: {"hit": jnp.sum(((p > 0) == (y > 0.5)).astype(jnp.float32)),
                        "n": jnp.asarray(y.shape[0], jnp.float32)},
    result=lambda s: float(s["hit"] / max(float(s["n"]), 1.0)))


def _options(config) -> dict:
  data = config.data
  opts = dict(DEFAULTS)
  for key in DEFAULTS:
    if key in data:
      opts[key] = type(DEFAULTS[key])(data[key])
  return opts


def all_task_names(opts) -> list[str]:
  return ([f"reg{i}" for i in range(opts["num_regression"])] +
          [f"cls{i}" for i in range(opts["num_classification"])])


def make_task(name: str) -> Task:
  if name.startswith("reg"):
    return Task(name, ScalarHead, _mse, (MAE,), "mae")
  return Task(name, ScalarHead, _bce, (ACCURACY,), "accuracy")


def _directions(rng, k, dim, conflict):
  base = rng.standard_normal((k, dim))
  out = base.copy()
  for i in range(1, k):
    out[i] = (1 - conflict) * base[i] - conflict * base[i - 1]
  return out / np.linalg.norm(out, axis=1, keepdims=True)


def make_arrays(opts, names, size, salt):
  """Inputs (size, dim) and targets ``{task: (size,)}`` of one split (float32, deterministic)."""
  all_names = all_task_names(opts)
  k, dim = len(all_names), opts["dim"]
  rng = np.random.default_rng([opts["seed"], 0])  # task directions: shared by all splits
  lin = _directions(rng, k, dim, opts["conflict"])
  nonlin = rng.standard_normal((k, dim)) / math.sqrt(dim)
  rng = np.random.default_rng([opts["seed"], 1, salt])
  x = rng.standard_normal((size, dim)).astype(np.float32)
  targets = {}
  for i, name in enumerate(all_names):
    if name not in names:
      continue
    if name.startswith("reg"):
      y = x @ lin[i] + np.tanh(x @ nonlin[i]) + opts["noise"] * rng.standard_normal(size)
    else:
      y = (x @ lin[i] + 0.5 * np.sin(x @ nonlin[i]) > 0).astype(np.float64)
      flip = rng.random(size) < opts["label_noise"]
      y = np.where(flip, 1.0 - y, y)
    targets[name] = y.astype(np.float32)
  return x, targets


def select_tasks(requested, available) -> list[str]:
  """``config.tasks`` ('all', a comma string or a list) -> the task names, validated, in order."""
  if isinstance(requested, str):
    if requested.strip().lower() == "all":
      return list(available)
    requested = [t.strip() for t in requested.split(",") if t.strip()]
  requested = [str(t) for t in requested]
  for t in requested:
    if t not in available:
      raise ValueError(f"unknown task {t!r}; valid: {', '.join(available)}")
  if len(set(requested)) != len(requested) or not requested:
    raise ValueError(f"tasks must be distinct and non-empty, got {requested}")
  return requested


@register("synthetic")
def get_benchmark(config) -> Benchmark:
  opts = _options(config)
  names = select_tasks(config.tasks, all_task_names(opts))
  tasks = [make_task(n) for n in names]
  width = int(config.model.width) if config.model.get("width", 0) else opts["width"]
  backbone = Backbone(
      "mlp", tuple((lambda: DenseStage(width, bool(opts["batch_norm"])))
                   for _ in range(opts["depth"])),
      widths=(width,) * opts["depth"],
      sample_input=lambda: np.zeros((2, opts["dim"]), np.float32))
  sizes = {"train": opts["num_train"], "validation": opts["num_eval"], "test": opts["num_eval"]}
  salts = {"train": 0, "validation": 1, "test": 2}
  multi = bool(opts["multi_input"])
  workers = common.workers(config, file_backed=False)  # in memory: 0 unless asked for
  cache = {}

  def arrays(split):
    if split not in sizes:
      raise ValueError(f"unknown split {split!r}; valid: {', '.join(sizes)}")
    if split not in cache:
      if multi:  # every task has its own examples
        cache[split] = {n: make_arrays(opts, [n], sizes[split], salts[split] * 100 + j + 1)
                        for j, n in enumerate(names)}
      else:
        cache[split] = make_arrays(opts, names, sizes[split], salts[split])
    return cache[split]

  def loader(split, batch_size, seed=0, shuffle=None, process_index=0, process_count=1,
             position=0):
    data = arrays(split)
    shuffle = (split == "train") if shuffle is None else shuffle
    if multi:
      def fetch(idx):
        return {n: {"inputs": data[n][0][idx], "targets": {n: data[n][1][n][idx]}} for n in names}
    else:
      x, ys = data

      def fetch(idx):
        return {"inputs": x[idx], "targets": {n: ys[n][idx] for n in names}}
    return ArrayLoader(sizes[split], fetch, batch_size, seed=seed, shuffle=shuffle,
                       process_index=process_index, process_count=process_count,
                       position=position, workers=workers)

  reference = {}
  for n in names:
    if n.startswith("reg"):
      reference[n] = {"mae": opts["noise"] * math.sqrt(2 / math.pi)}
    else:
      reference[n] = {"accuracy": 1.0 - opts["label_noise"]}
  return Benchmark("synthetic", tasks, backbone, loader, reference=reference, multi_input=multi,
                   split_sizes=sizes, info={"select": "mean_main", "options": opts})
