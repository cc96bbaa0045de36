"""Overfitting and instability of each task over one run.

From the evaluation records of ``metrics.jsonl`` (validation, and a training-set evaluation when the
run logged one, ``config.train.eval_train_batches > 0``) and the per-interval training losses:

* the **peak**: the step of the best validation value of the task's metric, and how much worse the
  final value is (``final_drop_pct``, relative to the best, positive = worse);
* the **train/validation gap** over time, signed so that positive means the model does better on
  the training data than on held-out data (``val - train`` for lower-is-better metrics); its growth
  from the first to the last evaluation;
* **instability**: the number of significant reversals of the validation curve (a move counts when
  it changes the value by more than ``move_tol`` of the best value, relative), and the relative
  jitter of the training loss over the second half of the run (std of the step-to-step change of
  ``log(loss)``).

Flags, with the thresholds stated by :class:`Thresholds`:

* ``early_peak``: the best validation step is in the first ``early_frac`` of the run AND the final
  value is more than ``drop_tol_pct`` percent worse than the best — the task kept training after it
  had stopped improving (the situation Ruder 2017 and Standley et al. 2020 describe for tasks that
  converge at different speeds);
* ``overfit``: ``early_peak`` AND, when the gap is known, the gap grew by more than
  ``gap_growth_pct`` percent of the best value;
* ``oscillating``: at least ``min_reversals`` significant reversals of the validation curve, or a
  training-loss jitter above ``jitter_tol``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from mtl_jax.analysis import runs as runs_lib


@dataclasses.dataclass(frozen=True)
class Thresholds:
  early_frac: float = 0.5
  drop_tol_pct: float = 2.0
  gap_growth_pct: float = 5.0
  move_tol: float = 0.01
  min_reversals: int = 2
  jitter_tol: float = 0.5


@dataclasses.dataclass(frozen=True)
class TaskCurve:
  """One task's overfitting / instability figures over a run (see the module docstring)."""

  task: str
  metric: str
  higher_is_better: bool
  peak_step: float
  last_step: float
  best: float
  final: float
  final_drop_pct: float
  gap_first: Optional[float]
  gap_final: Optional[float]
  gap_growth_pct: Optional[float]
  reversals: int
  loss_jitter: float
  loss_var: float
  early_peak: bool
  overfit: bool
  oscillating: bool


def peak(steps: np.ndarray, values: np.ndarray, higher_is_better: bool) -> tuple[float, float]:
  """``(step, value)`` of the best value (the first one on ties)."""
  if len(values) == 0:
    raise ValueError("peak of an empty curve")
  i = int(np.argmax(values) if higher_is_better else np.argmin(values))
  return float(steps[i]), float(values[i])


def reversals(values: np.ndarray, tol: float) -> int:
  """Direction changes of a curve, counting only moves larger than ``tol`` (absolute)."""
  moves = np.diff(np.asarray(values, np.float64))
  moves = moves[np.abs(moves) > tol]
  if len(moves) < 2:
    return 0
  s = np.sign(moves)
  return int(np.sum(s[1:] != s[:-1]))


def loss_jitter(losses: np.ndarray) -> tuple[float, float]:
  """``(jitter, variance)`` over the second half of a training-loss curve: the std of the
  step-to-step change of ``log(loss)`` (0 for a smooth curve; 1 means the loss moves by a factor
  of about e between logs), and the plain variance of the loss there."""
  x = np.asarray(losses, np.float64)
  x = x[len(x) // 2:]
  x = x[np.isfinite(x)]
  if len(x) < 3:
    return 0.0, (float(np.var(x)) if len(x) else math.nan)
  logs = np.log(np.maximum(x, 1e-12))
  return float(np.std(np.diff(logs))), float(np.var(x))


def _signed_gap(train: float, val: float, higher_is_better: bool) -> float:
  return (train - val) if higher_is_better else (val - train)


def task_curve(run: runs_lib.Run, task: str, metric: str, higher_is_better: bool,
               thresholds: Thresholds = Thresholds()) -> Optional[TaskCurve]:
  """The :class:`TaskCurve` of ``task`` in ``run``; None without validation evaluations."""
  th = thresholds
  steps, val = runs_lib.eval_series(run, "validation", task, metric)
  keep = np.isfinite(val)
  steps, val = steps[keep], val[keep]
  if len(val) == 0:
    return None
  pstep, best = peak(steps, val, higher_is_better)
  last, final = float(steps[-1]), float(val[-1])
  scale = abs(best) if best != 0 else 1.0
  drop = (final - best) / scale * 100.0 * (-1.0 if higher_is_better else 1.0)
  tsteps, tr = runs_lib.eval_series(run, "train", task, metric)
  gap_first = gap_final = growth = None
  if len(tr):
    common = [s for s in steps if s in set(tsteps)]
    if common:
      tmap, vmap = dict(zip(tsteps, tr)), dict(zip(steps, val))
      gaps = [_signed_gap(tmap[s], vmap[s], higher_is_better) for s in common]
      gap_first, gap_final = float(gaps[0]), float(gaps[-1])
      growth = (gap_final - gap_first) / scale * 100.0
  names = run.tasks
  losses = np.array([])
  if task in names:
    _, losses = runs_lib.series(run.train, "losses", names.index(task))
  jit, var = loss_jitter(losses)
  revs = reversals(val, th.move_tol * scale)
  early = pstep <= th.early_frac * last and drop > th.drop_tol_pct and len(val) > 1
  overfit = early and (growth is None or growth > th.gap_growth_pct)
  osc = revs >= th.min_reversals or jit > th.jitter_tol
  return TaskCurve(task, metric, higher_is_better, pstep, last, best, final, float(drop), gap_first,
                   gap_final, growth, revs, jit, var, bool(early), bool(overfit), bool(osc))


def run_curves(run: runs_lib.Run, higher_is_better, main_metric=None,
               thresholds: Thresholds = Thresholds()) -> list[TaskCurve]:
  """:func:`task_curve` for every task of ``run`` (its main metric)."""
  out = []
  for task in run.tasks:
    metrics = higher_is_better.get(task) or {}
    if not metrics:
      continue
    metric = (main_metric or {}).get(task) or next(iter(metrics))
    c = task_curve(run, task, metric, metrics[metric], thresholds)
    if c is not None:
      out.append(c)
  return out


def criteria(thresholds: Thresholds = Thresholds()) -> str:
  """The flags' definitions, one sentence (a report states it once above the per-method lines)."""
  th = thresholds
  return (f"Early peak: best step in the first {th.early_frac:.0%} of the run and final value "
          f">{th.drop_tol_pct:g}% worse than the best; overfit: early peak and a train/validation "
          f"gap grown by >{th.gap_growth_pct:g}% of the best (when logged); oscillating: "
          f">={th.min_reversals} reversals larger than {th.move_tol:.0%} of the best, or training-"
          f"loss jitter > {th.jitter_tol:g}; a flag counts when a majority of seeds raise it.")


def describe(method: str, curves_over_seeds: Sequence[Sequence[TaskCurve]],
             thresholds: Thresholds = Thresholds(), with_criteria: bool = True) -> str:
  """One Markdown paragraph: the tasks flagged in a majority of seeds (and, with
  ``with_criteria``, the flags' definitions of :func:`criteria`)."""
  flat: dict[str, list[TaskCurve]] = {}
  for curves in curves_over_seeds:
    for c in curves:
      flat.setdefault(c.task, []).append(c)
  n = max(len(curves_over_seeds), 1)

  def flagged(attr):
    return [t for t, cs in flat.items() if sum(getattr(c, attr) for c in cs) * 2 > len(cs)]

  early, over, osc = flagged("early_peak"), flagged("overfit"), flagged("oscillating")
  peaks = ", ".join(f"{t} @ {np.median([c.peak_step for c in cs]):.0f}" for t, cs in flat.items())
  gaps = {t: [c.gap_final for c in cs if c.gap_final is not None] for t, cs in flat.items()}
  gap_txt = ", ".join(f"{t} {np.median(g):+.3g}" for t, g in gaps.items() if g)
  gap_txt = (f" Final train/validation gap per task (median; + = better on training data): "
             f"{gap_txt}." if gap_txt else "")
  text = (f"**{method}** ({n} seed{'s' if n != 1 else ''}): early-peaking tasks: "
          f"{', '.join(early) or 'none'}; overfitting: {', '.join(over) or 'none'}; oscillating: "
          f"{', '.join(osc) or 'none'}. Median best-validation step per task: {peaks}.{gap_txt}")
  return text + (f" ({criteria(thresholds)})" if with_criteria else "")
