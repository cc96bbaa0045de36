"""Evaluation: streaming metrics over a loader epoch, Δm% and mean rank.

* :func:`evaluate` runs a model over one in-order epoch of an :class:`~mtl_jax.data.base.ArrayLoader`
  and accumulates every task's :class:`~mtl_jax.tasks.Metric` sufficient statistics (sums and
  counts, computed under ``jit``), then turns them into the reported numbers.
* :func:`delta_m` is the multi-task performance drop of Maninis et al. (2019) as used by
  Nash-MTL (Navon et al. 2022), CAGrad and FAMO:
  ``Δm% = mean_i (-1)^{h_i} (M_i - S_i) / S_i × 100`` over every (task, metric) pair ``i`` with a
  single-task reference ``S_i``, where ``h_i = 1`` when higher is better. Lower is better; 0 means
  on par with single-task learning.
* :func:`mean_rank` ranks methods on each (task, metric) pair (1 = best, ties share the mean rank)
  and averages, as in the LibMTL / FAMO tables.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Results = dict[str, dict[str, float]]  # {task: {metric: value}}


def _task_lookup(tasks) -> dict[str, Any]:
  return {t.name: t for t in tasks}


def batch_stats_fn(apply_fn: Callable, tasks: Sequence[Any], multi_input: bool = False):
  """``(variables, batch) -> {task: {metric: stats}}``: one batch's metric statistics (jit-able).

  ``apply_fn(variables, inputs) -> {task: prediction}`` (evaluation mode). For a multi-input batch
  (``{task: {'inputs', 'targets'}}``) each task is predicted on its own inputs.
  """

  def stats(variables, batch):
    out = {}
    if multi_input:
      for t in tasks:
        preds = apply_fn(variables, batch[t.name]["inputs"])
        out[t.name] = {m.name: m.stats(preds[t.name], batch[t.name]["targets"][t.name])
                       for m in t.metrics}
    else:
      preds = apply_fn(variables, batch["inputs"])
      for t in tasks:
        out[t.name] = {m.name: m.stats(preds[t.name], batch["targets"][t.name]) for m in t.metrics}
    return out

  return stats


def accumulate(stats_fn: Callable, variables, batches) -> Any:
  """Sum the per-batch statistics of ``stats_fn(variables, batch)`` over ``batches`` (host float64).

  Sums are accumulated on the host in float64 so that a long epoch loses no precision.
  """
  total = None
  for batch in batches:
    s = jax.device_get(stats_fn(variables, batch))
    s = jax.tree.map(lambda x: np.asarray(x, np.float64), s)
    total = s if total is None else jax.tree.map(np.add, total, s)
  if total is None:
    raise ValueError("evaluation over an empty loader: no batch")
  return total


def results_from_stats(tasks: Sequence[Any], total) -> Results:
  """``{task: {metric: float}}`` from the summed statistics."""
  return {t.name: {m.name: float(m.result(total[t.name][m.name])) for m in t.metrics}
          for t in tasks}


def evaluate(apply_fn: Callable, variables, loader, tasks: Sequence[Any], *,
             multi_input: bool = False, stats_fn: Callable | None = None,
             reduce_fn: Callable | None = None) -> Results:
  """Metrics of ``variables`` over one in-order epoch of ``loader``.

  Args:
    apply_fn: ``(variables, inputs) -> {task: prediction}`` in evaluation mode.
    variables: the model's variables (``{'params': ..., 'batch_stats': ...}``).
    loader: an ArrayLoader; its :meth:`epoch` is used, so its position does not move.
    tasks: the tasks (their metrics are computed).
    multi_input: batches are ``{task: batch}``.
    stats_fn: a prebuilt (jitted) :func:`batch_stats_fn`, to reuse its compilation across calls.
    reduce_fn: applied to the summed statistics before the results (e.g. a sum over hosts).
  """
  stats_fn = stats_fn or jax.jit(batch_stats_fn(apply_fn, tasks, multi_input))
  total = accumulate(stats_fn, variables, loader.epoch())
  if reduce_fn is not None:
    total = reduce_fn(total)
  return results_from_stats(tasks, total)


def direction(tasks: Sequence[Any]) -> dict[str, dict[str, bool]]:
  """``{task: {metric: higher_is_better}}``."""
  return {t.name: {m.name: m.higher_is_better for m in t.metrics} for t in tasks}


def delta_m(results: Mapping[str, Mapping[str, float]],
            reference: Mapping[str, Mapping[str, float]],
            higher_is_better: Mapping[str, Mapping[str, bool]]) -> float | None:
  """Δm% of ``results`` against the single-task ``reference`` (see the module docstring).

  Every (task, metric) pair present in both ``results`` and ``reference`` counts once; the
  direction comes from ``higher_is_better`` (e.g. :func:`direction`). Returns ``None`` when no
  pair has a reference. A reference of 0 cannot normalise and raises.
  """
  terms = []
  for task, metrics in results.items():
    for name, value in metrics.items():
      ref = reference.get(task, {}).get(name)
      if ref is None:
        continue
      if ref == 0:
        raise ValueError(f"reference {task}/{name} is 0: Δm% cannot normalise by it")
      hib = higher_is_better[task][name]
      sign = -1.0 if hib else 1.0
      terms.append(sign * (float(value) - float(ref)) / abs(float(ref)) * 100.0)
  if not terms:
    return None
  return float(np.mean(terms))


def mean_main(results: Mapping[str, Mapping[str, float]], tasks: Sequence[Any]) -> float:
  """Mean over tasks of the main metric, sign-flipped when lower is better (higher = better)."""
  vals = []
  for t in tasks:
    if not t.metrics:
      continue
    name = t.main_metric or t.metrics[0].name
    m = {mm.name: mm for mm in t.metrics}[name]
    v = float(results[t.name][name])
    vals.append(v if m.higher_is_better else -v)
  if not vals:
    raise ValueError("no task has a metric: nothing to select the model on")
  return float(np.mean(vals))


def mean_rank(table: Mapping[str, Mapping[str, Mapping[str, float]]],
              higher_is_better: Mapping[str, Mapping[str, bool]]) -> dict[str, float]:
  """Mean rank of each method over all (task, metric) pairs of ``higher_is_better``.

  ``table`` is ``{method: {task: {metric: value}}}``; rank 1 is the best, ties get the average of
  the ranks they span, and a pair missing for some method is skipped for all methods.
  """
  methods = list(table)
  if not methods:
    raise ValueError("mean_rank of an empty table")
  ranks = {m: [] for m in methods}
  for task, metrics in higher_is_better.items():
    for name, hib in metrics.items():
      try:
        vals = np.array([float(table[m][task][name]) for m in methods])
      except KeyError:
        continue
      if not np.all(np.isfinite(vals)):
        continue
      key = -vals if hib else vals
      order = np.argsort(key, kind="stable")
      r = np.empty(len(vals))
      r[order] = np.arange(1, len(vals) + 1)
      for v in np.unique(key):  # ties: the mean of the ranks they span
        tie = key == v
        r[tie] = r[tie].mean()
      for m, rr in zip(methods, r):
        ranks[m].append(float(rr))
  return {m: (float(np.mean(r)) if r else math.nan) for m, r in ranks.items()}


def conflict_stats(gramian: jax.Array, eps: float = 1e-12) -> dict[str, jax.Array]:
  """Gradient-conflict statistics of a task Gramian ``G = J J^T`` (jit-able).

  Returns the per-task gradient norms, the mean pairwise cosine similarity over task pairs
  ``i < j``, the conflict rate (fraction of pairs with negative cosine, Yu et al. 2020's
  "conflicting gradients"), the minimum cosine, and the norm spread ``max_k |g_k| / min_k |g_k|``
  (the gradient-magnitude-similarity measure of PCGrad's analysis, inverted), and the full
  pairwise cosine matrix ``cosine`` (K x K; the trainer averages it over each logging interval, so
  ``metrics.jsonl`` holds it at intervals for :mod:`mtl_jax.analysis.conflict`). With one task the
  pair statistics are NaN-free: cosine 1, conflict 0.
  """
  g = jnp.asarray(gramian, jnp.float32)
  k = g.shape[0]
  norms = jnp.sqrt(jnp.clip(jnp.diag(g), 0.0))
  cos = g / jnp.maximum(norms[:, None] * norms[None, :], eps)
  iu = np.triu_indices(k, 1)
  if k > 1:
    pair = cos[iu]
    mean_cos, conflict, min_cos = pair.mean(), (pair < 0).mean(), pair.min()
  else:
    mean_cos, conflict, min_cos = jnp.ones(()), jnp.zeros(()), jnp.ones(())
  spread = norms.max() / jnp.maximum(norms.min(), eps)
  return {"grad_norms": norms, "mean_cosine": mean_cos, "conflict_rate": conflict,
          "min_cosine": min_cos, "norm_spread": spread, "cosine": cos}
