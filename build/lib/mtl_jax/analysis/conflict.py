"""Gradient conflict from the statistics the training step already logs (no extra backward pass).

The step computes the Gramian ``G = J J^T`` of the shared task gradients for every Gramian or
Jacobian method, and :func:`mtl_jax.evaluation.conflict_stats` turns it into the per-task gradient
norms, the pairwise cosine matrix ``cos_ij = G_ij / sqrt(G_ii G_jj)``, the mean and minimum
pairwise cosine, the conflict rate (fraction of pairs with ``cos < 0``; "conflicting gradients" of
Yu et al. 2020, PCGrad) and the norm spread ``max |g_k| / min |g_k|``; the trainer averages them
over each logging interval into ``metrics.jsonl``. This module reads them back:

* :func:`conflict_timeseries`: the scalar statistics per logged step;
* :func:`cosine_matrix`: the pairwise cosine matrix averaged over a window of logged steps (the
  late half of training by default); for logs written before the matrix was logged it falls back
  to nothing (``None``);
* :func:`conflicting_pairs`: the task pairs whose mean cosine is negative, most conflicting first.

Loss-only combiners (``ls``, ``uw``, ``famo``, ...) never form the Gramian, so their runs carry no
conflict statistics; a Gramian method on the same model shows the conflict of its own trajectory.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from mtl_jax.analysis import runs as runs_lib

SCALARS = ("mean_cosine", "min_cosine", "conflict_rate", "norm_spread")


def has_conflict_stats(run: runs_lib.Run) -> bool:
  return any("mean_cosine" in r for r in run.train)


def conflict_timeseries(run: runs_lib.Run) -> dict[str, np.ndarray]:
  """``{'step': [...], 'mean_cosine': [...], 'min_cosine', 'conflict_rate', 'norm_spread',
  'grad_norms': [[K] per step]}`` over the logged steps that carry them (empty arrays if none)."""
  recs = [r for r in run.train if "mean_cosine" in r]
  out = {"step": np.array([float(r["step"]) for r in recs])}
  for k in SCALARS:
    out[k] = np.array([float(r.get(k, np.nan)) for r in recs])
  out["grad_norms"] = np.array([r["grad_norms"] for r in recs if "grad_norms" in r], np.float64)
  return out


def cosine_from_gramian(gramian: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """Pairwise cosine matrix of a Gramian (host numpy; the same formula as the trainer's)."""
  g = np.asarray(gramian, np.float64)
  n = np.sqrt(np.clip(np.diag(g), 0.0, None))
  return g / np.maximum(np.outer(n, n), eps)


def cosine_matrix(run: runs_lib.Run, window: Optional[tuple[float, float]] = None
                  ) -> Optional[np.ndarray]:
  """The mean logged pairwise cosine matrix over ``window = (first_step, last_step)`` (default:
  the second half of the run); None when the run logged no matrix."""
  recs = [r for r in run.train if "cosine" in r]
  if not recs:
    return None
  if window is None:
    last = max(float(r["step"]) for r in recs)
    window = (last / 2.0, last)
  lo, hi = window
  sel = [np.asarray(r["cosine"], np.float64) for r in recs if lo <= float(r["step"]) <= hi]
  if not sel:
    raise ValueError(f"no logged cosine matrix in steps [{lo}, {hi}]; logged steps: "
                     f"{[r['step'] for r in recs][:5]}...")
  return np.mean(sel, axis=0)


def conflicting_pairs(cos: np.ndarray, tasks: Sequence[str]) -> list[tuple[str, str, float]]:
  """Pairs ``(task_i, task_j, cos_ij)`` with ``i < j`` and ``cos_ij < 0``, most negative first."""
  cos = np.asarray(cos)
  if cos.shape != (len(tasks), len(tasks)):
    raise ValueError(f"cosine matrix of shape {cos.shape} for {len(tasks)} tasks")
  iu = np.triu_indices(len(tasks), 1)
  pairs = [(tasks[i], tasks[j], float(cos[i, j])) for i, j in zip(*iu) if cos[i, j] < 0]
  return sorted(pairs, key=lambda p: p[2])


def summarize(run: runs_lib.Run) -> Optional[dict]:
  """Late-half means of the scalar statistics (``None`` for a run without them)."""
  ts = conflict_timeseries(run)
  if len(ts["step"]) == 0:
    return None
  late = ts["step"] >= ts["step"].max() / 2.0
  out = {k: float(np.nanmean(ts[k][late])) for k in SCALARS}
  cos = cosine_matrix(run)
  out["pairs"] = conflicting_pairs(cos, run.tasks) if cos is not None else None
  return out
