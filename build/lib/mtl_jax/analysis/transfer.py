"""Negative transfer: does sharing help or hurt each task?

For every task, the multi-task model's test metric over seeds is compared with the single-task
(STL) runs of the same task over seeds. The relative difference is signed so that positive means
*better than STL* (the per-task term of Δm%, Maninis et al. 2019, with the sign flipped), and
Welch's unequal-variance t-test (``scipy.stats.ttest_ind(equal_var=False)``) gives a two-sided
p-value for "the means differ". A task is *hurt* (negative transfer, as in Standley et al. 2020's
"which tasks should be learned together") when the multi-task mean is worse than the STL mean and
the difference is significant at ``alpha``; *helped* when better and significant; otherwise
*neutral*. With fewer than two seeds on either side there is no test (``p = NaN``) and the verdict
falls back to the sign of the difference, marked ``untested``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import stats

HURT, HELPED, NEUTRAL = "hurt", "helped", "neutral"


@dataclasses.dataclass(frozen=True)
class TaskTransfer:
  """One task's comparison of a multi-task method with single-task learning.

  ``rel_gain_pct`` is ``(-1)^{1-h} (M - S) / |S| × 100`` with ``h = 1`` for higher-is-better:
  positive when the multi-task model beats STL (the negative of the task's Δm% term).
  """

  task: str
  metric: str
  higher_is_better: bool
  mtl_mean: float
  mtl_std: float
  stl_mean: float
  stl_std: float
  n_mtl: int
  n_stl: int
  rel_gain_pct: float
  t_stat: float
  p_value: float
  verdict: str  # hurt | helped | neutral
  tested: bool


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
  """Welch's t statistic and two-sided p-value of ``mean(a) - mean(b)``; NaN when either sample
  has fewer than two values. Two samples with zero variance give ``t = ±inf, p = 0`` if their
  means differ and ``t = 0, p = 1`` if not (scipy returns NaN there)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.size < 2 or b.size < 2:
    return math.nan, math.nan
  if np.var(a) == 0 and np.var(b) == 0:
    d = float(a.mean() - b.mean())
    if d == 0:
      return 0.0, 1.0
    return math.copysign(math.inf, d), 0.0
  res = stats.ttest_ind(a, b, equal_var=False)
  return float(res.statistic), float(res.pvalue)


def compare(task: str, metric: str, higher_is_better: bool, mtl: Sequence[float],
            stl: Sequence[float], alpha: float = 0.05) -> TaskTransfer:
  """The :class:`TaskTransfer` of one task from its multi-task and single-task samples."""
  if not 0 < alpha < 1:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  mtl, stl = np.asarray(mtl, np.float64), np.asarray(stl, np.float64)
  if mtl.size == 0 or stl.size == 0:
    raise ValueError(f"task {task!r}: need at least one multi-task and one single-task value "
                     f"(got {mtl.size} and {stl.size})")
  m, s = float(mtl.mean()), float(stl.mean())
  sign = 1.0 if higher_is_better else -1.0
  gain = sign * (m - s) / abs(s) * 100.0 if s != 0 else sign * math.copysign(math.inf, m - s) \
      if m != s else 0.0
  t, p = welch(mtl, stl)
  tested = not math.isnan(p)
  better = sign * (m - s) > 0
  worse = sign * (m - s) < 0
  if tested:
    verdict = HURT if (worse and p < alpha) else HELPED if (better and p < alpha) else NEUTRAL
  else:
    verdict = HURT if worse else HELPED if better else NEUTRAL
  sd = lambda x: float(x.std(ddof=1)) if x.size > 1 else 0.0
  return TaskTransfer(task, metric, higher_is_better, m, sd(mtl), s, sd(stl), int(mtl.size),
                      int(stl.size), float(gain), t, p, verdict, tested)


def negative_transfer(mtl: Mapping[str, Mapping[str, Sequence[float]]],
                      stl: Mapping[str, Mapping[str, Sequence[float]]],
                      higher_is_better: Mapping[str, Mapping[str, bool]],
                      alpha: float = 0.05,
                      main_metric: Optional[Mapping[str, str]] = None) -> list[TaskTransfer]:
  """Per-task comparisons for every task with both multi-task and single-task samples.

  Args:
    mtl, stl: ``{task: {metric: [value per seed]}}``.
    higher_is_better: ``{task: {metric: bool}}``.
    alpha: significance level of the Welch test.
    main_metric: ``{task: metric}`` to compare (default: the first metric of each task).
  Returns:
    one :class:`TaskTransfer` per task, in ``mtl``'s order.
  """
  out = []
  for task, metrics in mtl.items():
    if task not in stl or not metrics:
      continue
    metric = (main_metric or {}).get(task) or next(iter(metrics))
    if metric not in stl[task] or metric not in metrics:
      continue
    out.append(compare(task, metric, higher_is_better[task][metric], metrics[metric],
                       stl[task][metric], alpha))
  return out


def hurt_tasks(results: Sequence[TaskTransfer]) -> list[str]:
  """The tasks sharing hurts (verdict ``hurt``)."""
  return [r.task for r in results if r.verdict == HURT]


def summary_line(method: str, results: Sequence[TaskTransfer], alpha: float = 0.05) -> str:
  """One Markdown sentence: which tasks the method hurts / helps significantly."""
  hurt = [r for r in results if r.verdict == HURT]
  helped = [r for r in results if r.verdict == HELPED]
  tested = all(r.tested for r in results) if results else False
  how = f"Welch t-test, p < {alpha:g}" if tested else "sign of the mean difference; too few seeds " \
      "for a test"
  fmt = lambda rs: ", ".join(f"{r.task} ({r.rel_gain_pct:+.1f}%)" for r in rs) or "none"
  return (f"**{method}**: hurts {len(hurt)}/{len(results)} tasks: {fmt(hurt)}; helps "
          f"{len(helped)}: {fmt(helped)} ({how}).")
