"""The sharing-structure part of a study (issue 17.7): trees, the affinity that chose them, and the
Pareto front of sharing (Δm% against parameters).

A run *has a structure* when its ``summary.json`` holds a ``structure`` block
(:func:`mtl_jax.train.fit` writes one for every ``config.structure.method`` other than ``'none'``):
the tree at step 0 and after every split, with the per-stage gradient cosine (``affinity``) and
conflict scores of the measuring window that chose it. The figures (matplotlib, Agg):

* :func:`tree_picture`: the trees of one run, one panel per recorded step, stages top to bottom,
  each group a box labelled with its tasks and joined to its parent group, like a dendrogram;
* :func:`stage_heatmaps`: the per-stage cosine matrices of one split, task names on both axes, one
  colourbar;
* :func:`pareto_scatter`: each method's Δm% (mean ± std over seeds) against its parameter count,
  the non-dominated methods (fewer parameters and lower Δm%) joined and marked.

:func:`mtl_jax.analysis.runs.strategy` names a run's sharing as the study compares it (``hard``,
``independent``, ``branched``, ``affinity``, ``conflict``, ``recon`` = conflict retrained from
scratch, ``learn_to_branch``).
"""

from __future__ import annotations

import textwrap
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from mtl_jax.analysis import plots  # pylint: disable=g-import-not-at-top,wrong-import-position


def records(st: Mapping) -> list:
  """The structure records of a run in step order (step 0 first), each with ``step``, ``tree``
  and, for a measured split, ``affinity`` (S x K x K cosines) and ``conflict`` (S scores)."""
  return sorted(st.get("splits") or [], key=lambda r: int(r["step"]))


def leaf_order(tree: Sequence) -> list:
  """The tasks in depth-first order of ``tree`` (a group's tasks contiguous at every stage)."""
  order: list = []

  def visit(stage: int, tasks: set) -> None:
    if stage == len(tree):
      order.extend(sorted(tasks))
      return
    for g in sorted((g for g in tree[stage] if set(g) <= tasks), key=min):
      visit(stage + 1, set(g))

  visit(0, {t for g in tree[0] for t in g})
  return order


def _box_label(names: Sequence[str], width: float) -> str:
  chars = max(int(width * 9), 6)
  return "\n".join(textwrap.wrap(", ".join(names), chars, break_on_hyphens=False))


def _draw_tree(ax, tree: Sequence, tasks: Sequence[str], title: str) -> None:
  """One tree on ``ax``: stage s at height -s, a box per group over its tasks' columns, edges to
  the parent group and, below the last stage, one head per task."""
  pos = {t: i for i, t in enumerate(leaf_order(tree))}
  k, n_stages = len(tasks), len(tree)
  prev = None
  for s, part in enumerate(tree):
    here = {}
    for g in part:
      lo, hi = min(pos[t] for t in g) - 0.42, max(pos[t] for t in g) + 0.42
      ax.add_patch(plt.Rectangle((lo, -s - 0.28), hi - lo, 0.56, fc="#dce9f5", ec="#1f4e79",
                                 lw=1.2))
      names = [tasks[t] for t in sorted(g, key=lambda t: pos[t])]
      ax.text((lo + hi) / 2, -s, _box_label(names, hi - lo), ha="center", va="center",
              fontsize=9 if k <= 6 else 7)
      here[tuple(g)] = (lo + hi) / 2
      if prev is not None:
        parent = next(x for pg, x in prev.items() if set(g) <= set(pg))
        ax.plot([parent, (lo + hi) / 2], [-s + 0.72, -s + 0.28], color="#1f4e79", lw=1.0)
    prev = here
  for t in range(k):
    parent = next(x for pg, x in prev.items() if t in pg)
    ax.plot([parent, pos[t]], [-n_stages + 0.72, -n_stages + 0.35], color="#888888", lw=0.8)
    ax.text(pos[t], -n_stages + 0.2, f"{tasks[t]}\nhead", ha="center", va="top", fontsize=8,
            color="#444444")
  ax.set_yticks([-s for s in range(n_stages)])
  ax.set_yticklabels([f"stage {s}" for s in range(n_stages)], fontsize=9)
  ax.set_xticks([])
  ax.set_xlim(-0.6, k - 0.4)
  ax.set_ylim(-n_stages - 0.35, 0.5)
  for side in ("top", "right", "bottom", "left"):
    ax.spines[side].set_visible(False)
  ax.tick_params(axis="y", length=0)
  ax.set_title(title, fontsize=9)


def tree_picture(recs: Sequence[Mapping], tasks: Sequence[str], path: str,
                 title: str = "Sharing structure") -> str:
  """One panel per structure record (the starting tree and the tree after each split)."""
  if not recs:
    raise ValueError("tree_picture: no structure record to draw")
  n = len(recs)
  width = max(3.4, 0.95 * len(tasks) + 1.2)
  fig, axes = plt.subplots(1, n, figsize=(width * n, 1.1 * len(recs[0]["tree"]) + 1.7),
                           squeeze=False)
  for ax, r in zip(axes[0], recs):
    what = ("start" if int(r["step"]) == 0 and not r.get("split") else
            "kept" if r.get("split") is False else "split")
    frac = r.get("fraction")
    sub = f"step {int(r['step'])} ({what})"
    if frac is not None:
      sub += f"\n{100 * frac:.0f}% of independent"
    if r.get("num_params"):
      sub += f", {int(r['num_params']):,} params"
    _draw_tree(ax, r["tree"], tasks, sub)
  fig.suptitle(title, fontsize=10)
  return plots._save(fig, path)  # pylint: disable=protected-access


def stage_heatmaps(affinity, tasks: Sequence[str], path: str, conflict=None,
                   title: str = "Per-stage gradient cosine that chose the split") -> str:
  """``affinity[s]``: the K x K mean affinity (cosine, or TAG's normalised lookahead) of stage s's
  shared parameters over the window."""
  aff = np.asarray(affinity, np.float64)
  n, k = aff.shape[0], len(tasks)
  side = max(3.4, 1.0 + 0.55 * k)
  fig, axes = plt.subplots(1, n, figsize=(side * n + 1.2, side), squeeze=False)
  im = None
  for s, ax in enumerate(axes[0]):
    im = ax.imshow(aff[s], cmap="RdBu", vmin=-1, vmax=1)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(tasks, rotation=45, ha="right", fontsize=9)
    ax.set_yticklabels(tasks if s == 0 else [], fontsize=9)  # the rows' names once, at the left
    if k <= 8:
      for i in range(k):
        for j in range(k):
          ax.text(j, i, f"{aff[s, i, j]:.2f}", ha="center", va="center", fontsize=8,
                  color="white" if abs(aff[s, i, j]) > 0.6 else "black")
    sub = f"stage {s}"
    if conflict is not None:
      sub += f" (conflict score {float(conflict[s]):.2f})"
    ax.set_title(sub, fontsize=9)
  fig.colorbar(im, ax=list(axes[0]), label="mean affinity over the window", shrink=0.85)
  fig.suptitle(title, fontsize=10)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list:
  """The methods no other method dominates (parameters <= and Δm% <=, one of them <), sorted by
  parameters; ``points[name] = (params, delta_m)``."""
  front = []
  for a, (pa, da) in points.items():
    if not any((pb <= pa and db <= da) and (pb < pa or db < da)
               for b, (pb, db) in points.items() if b != a):
      front.append(a)
  return sorted(front, key=lambda a: points[a])


def pareto_scatter(points: Mapping[str, tuple[float, float, float]], path: str,
                   title: str = "Δm% against parameters") -> str:
  """``points[method] = (params, Δm% mean, Δm% std)``; the Pareto front joined and circled."""
  if not points:
    raise ValueError("pareto_scatter: nothing to plot")
  front = pareto_front({m: (p, d) for m, (p, d, _) in points.items()})
  combs = sorted({m.partition("/")[0] for m in points})
  colours = {c: plt.cm.tab10(i) for i, c in enumerate(combs)}  # pylint: disable=no-member
  fig, ax = plt.subplots(figsize=(7.6, 5.2))
  fx = [points[m][0] for m in front]
  fy = [points[m][1] for m in front]
  ax.step(fx, fy, where="post", color="#d62728", lw=1.2, alpha=0.7, label="Pareto front")
  for m, (p, d, sd) in points.items():
    comb = m.partition("/")[0]
    on = m in front
    ax.errorbar(p, d, yerr=sd, fmt="o", ms=8 if on else 6, capsize=3, color=colours[comb],
                mec="#d62728" if on else colours[comb], mew=2 if on else 1)
  for c in combs:
    ax.plot([], [], "o", color=colours[c], label=c)
  ax.axhline(0.0, color="black", lw=0.6)
  ax.margins(x=0.15, y=0.1)
  _label_points(ax, points, front)
  ax.set_xlabel("parameters")
  ax.set_ylabel("Δm% vs single-task (lower is better)")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  return plots._save(fig, path)  # pylint: disable=protected-access


def _label_points(ax, points, front) -> None:
  """Each point's strategy to its right. Points less than 40 pt apart horizontally form a column
  whose labels stand right of its rightmost point, stacked bottom-up at least a line apart, each
  joined to its point by a thin line when it had to move; methods at the very same point share
  one label (``affinity, conflict``)."""
  ax.autoscale_view()  # the final limits: label positions are placed in display space
  to_pt = 72.0 / ax.figure.dpi
  at = lambda m: ax.transData.transform(points[m][:2]) * to_pt
  columns: list = []
  for m in sorted(points, key=lambda m: at(m)[0]):
    if columns and at(m)[0] - at(columns[-1][-1])[0] < 40.0:
      columns[-1].append(m)
    else:
      columns.append([m])
  for col in columns:
    groups: list = []
    for m in sorted(col, key=lambda m: (points[m][1], m)):
      if groups and points[groups[-1][0]][:2] == points[m][:2]:
        groups[-1].append(m)
      else:
        groups.append([m])
    right = max(at(m)[0] for m in col)
    last = None
    for ms in groups:
      x, y = at(ms[0])
      ty = y - 11.0 if last is None else max(y - 11.0, last + 10.0)
      last = ty
      moved = len(col) > 1 and (abs(ty - (y - 11.0)) > 1.0 or right - x > 1.0)
      ax.annotate(", ".join(m.partition("/")[2] or "hard" for m in ms), points[ms[0]][:2],
                  xytext=(right - x + 7.0, ty - y), textcoords="offset points", fontsize=8,
                  fontweight="bold" if any(m in front for m in ms) else "normal",
                  arrowprops=dict(arrowstyle="-", lw=0.5, color="0.55", shrinkA=0, shrinkB=4)
                  if moved else None)
