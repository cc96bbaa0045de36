"""Figures for a study (matplotlib, Agg backend, PNG): each is titled, its axes labelled, with a
legend where there is more than one line, so that it reads without the code.

Every function takes plain data (numpy arrays and dicts, as :mod:`mtl_jax.analysis` produces them)
and a path, writes the PNG and returns the path.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

Curve = tuple  # (steps, mean, std-or-None)


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _grid(n: int, width: float = 3.6, height: float = 2.8):
  cols = min(n, 4)
  rows = int(math.ceil(n / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
  for ax in axes.flat[n:]:
    ax.axis("off")
  return fig, list(axes.flat[:n])


def _band(ax, steps, mean, std, label):
  line, = ax.plot(steps, mean, label=label, lw=1.4)
  if std is not None and np.any(np.asarray(std) > 0):
    ax.fill_between(steps, np.asarray(mean) - std, np.asarray(mean) + std, alpha=0.2,
                    color=line.get_color())


def training_curves(curves: Mapping[str, Mapping[str, Curve]], ylabels: Mapping[str, str],
                    path: str, title: str = "Validation metric during training",
                    log_y: bool = False) -> str:
  """One panel per task: ``curves[method][task] = (steps, mean, std)`` over seeds."""
  tasks = []
  for per in curves.values():
    tasks += [t for t in per if t not in tasks]
  if not tasks:
    raise ValueError("training_curves: no curve to plot")
  fig, axes = _grid(len(tasks))
  for ax, task in zip(axes, tasks):
    for method, per in curves.items():
      if task in per:
        s, m, sd = per[task]
        _band(ax, s, m, sd, method)
    ax.set_title(task)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabels.get(task, "value"))
    if log_y:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(title)
  return _save(fig, path)


def delta_bars(gains: Mapping[str, Mapping[str, tuple[float, float]]], path: str,
               title: str = "Per-task change vs single-task learning (positive = better)") -> str:
  """Grouped bars ``gains[method][task] = (mean %, std %)`` with a zero line."""
  methods = list(gains)
  tasks = []
  for per in gains.values():
    tasks += [t for t in per if t not in tasks]
  if not methods or not tasks:
    raise ValueError("delta_bars: nothing to plot")
  width = 0.8 / len(methods)
  x = np.arange(len(tasks))
  fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(tasks) * max(1, len(methods) / 3)), 3.8))
  for i, method in enumerate(methods):
    mean = [gains[method].get(t, (np.nan, 0))[0] for t in tasks]
    std = [gains[method].get(t, (np.nan, 0))[1] for t in tasks]
    ax.bar(x + (i - (len(methods) - 1) / 2) * width, mean, width, yerr=std, label=method,
           capsize=2)
  ax.axhline(0.0, color="black", lw=0.8)
  ax.set_xticks(x)
  ax.set_xticklabels(tasks, rotation=45, ha="right")
  ax.set_ylabel("relative change vs STL (%)")
  ax.set_xlabel("task")
  ax.set_title(title)
  ax.legend(fontsize=7, ncol=min(len(methods), 4))
  ax.grid(axis="y", alpha=0.3)
  return _save(fig, path)


def conflict_heatmap(cos: np.ndarray, tasks: Sequence[str], path: str,
                     title: str = "Pairwise cosine of task gradients") -> str:
  """The pairwise cosine matrix, diverging colours centred on 0 (red = conflicting)."""
  cos = np.asarray(cos)
  fig, ax = plt.subplots(figsize=(max(5.5, 1.6 + 0.5 * len(tasks)), max(4.5, 1.2 + 0.5 * len(tasks))))
  im = ax.imshow(cos, cmap="RdBu", vmin=-1, vmax=1)
  ax.set_xticks(range(len(tasks)))
  ax.set_yticks(range(len(tasks)))
  ax.set_xticklabels(tasks, rotation=45, ha="right")
  ax.set_yticklabels(tasks)
  if len(tasks) <= 12:
    for i in range(len(tasks)):
      for j in range(len(tasks)):
        ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=8,
                color="white" if abs(cos[i, j]) > 0.6 else "black")
  fig.colorbar(im, ax=ax, label="cosine similarity")
  ax.set_title(title, fontsize=9)
  return _save(fig, path)


def conflict_timeseries(series: Mapping[str, Mapping[str, np.ndarray]], path: str,
                        title: str = "Gradient conflict during training") -> str:
  """Three panels over steps, one line per method: mean pairwise cosine, conflict rate, norm
  spread (``series[method] = {'step', 'mean_cosine', 'conflict_rate', 'norm_spread'}``)."""
  if not series:
    raise ValueError("conflict_timeseries: no run logged conflict statistics")
  keys = (("mean_cosine", "mean pairwise cosine"), ("conflict_rate", "fraction of pairs with cos < 0"),
          ("norm_spread", "max |g_k| / min |g_k|"))
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
  for ax, (k, label) in zip(axes, keys):
    for method, ts in series.items():
      ax.plot(ts["step"], ts[k], label=method, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_title(k.replace("_", " "))
    ax.grid(alpha=0.3)
  axes[0].axhline(0.0, color="black", lw=0.6)
  axes[0].legend(fontsize=7)
  fig.suptitle(title)
  return _save(fig, path)


def weights_over_time(weights: Mapping[str, tuple[np.ndarray, np.ndarray]], tasks: Sequence[str],
                      path: str, title: str = "Combiner task weights during training") -> str:
  """One panel per method: ``weights[method] = (steps[T], w[T, K])``, one line per task."""
  if not weights:
    raise ValueError("weights_over_time: nothing to plot")
  fig, axes = _grid(len(weights), 4.2, 3.0)
  for ax, (method, (steps, w)) in zip(axes, weights.items()):
    w = np.asarray(w)
    for k, t in enumerate(tasks[:w.shape[1]]):
      ax.plot(steps, w[:, k], label=t, lw=1.0)
    ax.set_title(method)
    ax.set_xlabel("step")
    ax.set_ylabel("weight")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=6, ncol=2)
  fig.suptitle(title)
  return _save(fig, path)


def tradeoff_scatter(points: Mapping[str, tuple[float, float, float, float]], tasks: Sequence[str],
                     labels: Sequence[str], path: str, stl: Optional[tuple[float, float]] = None,
                     title: str = "Trade-off between the two tasks") -> str:
  """A two-task mix: ``points[method] = (x_mean, x_std, y_mean, y_std)`` in the two tasks'
  metrics; ``stl`` the single-task point (a star)."""
  if len(tasks) != 2:
    raise ValueError(f"tradeoff_scatter needs exactly 2 tasks, got {list(tasks)}")
  fig, ax = plt.subplots(figsize=(5.0, 4.2))
  for method, (xm, xs, ym, ys) in points.items():
    ax.errorbar(xm, ym, xerr=xs, yerr=ys, fmt="o", capsize=3, label=method)
  if stl is not None:
    ax.plot(stl[0], stl[1], "k*", ms=12, label="single-task")
  ax.set_xlabel(f"{tasks[0]} {labels[0]}")
  ax.set_ylabel(f"{tasks[1]} {labels[1]}")
  ax.set_title(title)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  return _save(fig, path)


def affinity_heatmap(z: np.ndarray, tasks: Sequence[str], path: str,
                     title: str = "Lookahead inter-task affinity Z[i→j] (TAG)") -> str:
  z = np.asarray(z)
  lim = float(np.max(np.abs(z))) or 1.0
  fig, ax = plt.subplots(figsize=(max(5.5, 1.6 + 0.5 * len(tasks)), max(4.5, 1.2 + 0.5 * len(tasks))))
  im = ax.imshow(z, cmap="PuOr", vmin=-lim, vmax=lim)
  ax.set_xticks(range(len(tasks)))
  ax.set_yticks(range(len(tasks)))
  ax.set_xticklabels(tasks, rotation=45, ha="right")
  ax.set_yticklabels(tasks)
  ax.set_xlabel("task j (affected)")
  ax.set_ylabel("task i (lookahead step)")
  fig.colorbar(im, ax=ax, label="relative loss decrease")
  ax.set_title(title, fontsize=9)
  return _save(fig, path)
