"""MGDA: the min-norm point of the convex hull of the task gradients (+ MGDA-UB).

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
(arXiv:1810.04650); official code github.com/isl-org/MultiObjectiveOptimization
(``min_norm_solvers.py``), also the MGDA baselines of the Nash-MTL repository and LibMTL.

``w = argmin_{w in simplex} || sum_k w_k g_k / n_k ||^2`` where ``n_k`` is the official gradient
normaliser (``normalization``: ``'none'`` (default in the Nash-MTL repository and LibMTL) -> 1,
``'l2'`` -> ``||g_k||``, ``'loss'`` -> ``L_k``, ``'loss+'`` -> ``L_k ||g_k||``). As in all three
official codes the resulting ``w`` then weights the *unnormalised* losses (``sum_k w_k L_k``):
the normaliser changes which point is chosen, not the gradients it is applied to.

MGDA-UB (the paper's upper bound, Sec. 3.3) is this same weighting computed by the engine in mode
``'features'``: ``autodiff.combine(method('mgda', K), state, SplitLoss(encode, decode), params,
..., mode='features')`` takes the Gramian of the gradients w.r.t. the shared representation
``z`` instead of the shared parameters (about one backward pass).

Solver: the official code runs Frank-Wolfe (250 iterations, stop at 1e-5) after the best pairwise
closed form. We solve the same problem exactly inside jit (:func:`min_norm_weights`): as the
non-negative QP ``min_{v >= 0} v^T G v / 2 - 1^T v`` (``w = v / sum v``) on the unit-diagonal
Gramian, by :func:`mtl_jax.combiners._qp.box_qp` (FISTA, at most ``max_iter`` iterations, then
active-set polishing). Tested against a float64 NNLS reference: ``||d||^2`` within 1e-5 relative
(measured: 4e-7) for K 2..40 and gradient norms spread over 1e4 (Gramian diagonal 1e0..1e8).
On singular Gramians (more tasks than parameters: K=40 in rank 20) the QP is ill-conditioned and
FISTA needs up to ~1500 iterations: 250 stopped short (``||d||`` up to 9% above the float64 minimum,
or 2e-3 S where the minimum is 0 or near it, ``S = sum_k w_k ||g_k||``); 1500 reach it (six
such Gramians, ``launch/bench/solves.py:singular_gramian``).

Hyper-parameters: ``normalization='none'``, ``scale_by_k=False`` (``True``: weights sum to K as in
the Nash-MTL repository's baseline; ``False``: sum to 1 as in the paper, the Sener code and
LibMTL), ``max_iter=1500`` (a cap on FISTA iterations, which stop at a relative residual of
1e-6: full-rank inputs take tens; not the official Frank-Wolfe ``MAX_ITER=250``, an iteration
count of another algorithm, see above).

Task-specific parameters: ``specific='weighted'`` (the official codes back-propagate
``sum_k w_k L_k``). Deviations: the QP solver (above); a zero normaliser (zero gradient or zero
loss) is replaced by 1 instead of dividing by zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.combiners._qp import nonneg_qp, project_simplex
from mtl_jax.combiners.base import GRAMIAN, EmptyState, Method, register

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def min_norm_weights(gramian: jax.Array, iters: int = 1500, eps: float = 1e-7) -> jax.Array:
  """``argmin_{w in simplex} w^T G w`` (the min-norm point of the convex hull), in jit.

  Exact reformulation: if ``w*`` is the min-norm point and ``mu = w*^T G w* > 0``, then
  ``v = w* / mu`` solves the non-negative QP ``min_{v >= 0} v^T G v / 2 - 1^T v`` (the same KKT
  system: ``G v >= 1`` with equality on the support), and ``w* = v / sum v``. The QP is solved on
  the unit-diagonal ``C = D^-1 G D^-1`` (``D = diag(G)^1/2``, ``z = D v``, ``C z - 1/D >= 0``),
  so gradient norms spread over many decades do not slow or bias the solve; ``eps * I`` is added
  to ``C`` (bounds ``v`` when ``0`` is in the hull, then ``w`` tends to the null combination).
  :func:`mtl_jax.combiners._qp.box_qp`: FISTA (``iters`` iterations at most) then active-set
  polishing, which lands on the exact solution of the final support. A task with a zero gradient
  makes the minimum 0: it gets all the weight (shared among such tasks).
  """
  g = jnp.asarray(gramian, jnp.float32)
  k = g.shape[0]
  if k == 1:
    return jnp.ones((1,), jnp.float32)
  diag = jnp.diagonal(g)
  dead = ~(diag > jnp.max(jnp.abs(diag)) * 1e-30) | ~jnp.isfinite(diag)
  d = jnp.sqrt(jnp.where(dead, 1.0, diag))
  eye = jnp.eye(k, dtype=g.dtype)
  c = jnp.clip(g / (d[:, None] * d[None, :]), -1.0, 1.0)
  c = jnp.where(eye > 0, 1.0, jnp.where(dead[:, None] | dead[None, :], 0.0, c)) + eps * eye
  z = nonneg_qp(c, -1.0 / d, 1.0 / d, max_iter=int(iters), tol=1e-6, polish=4)
  v = jnp.maximum(z, 0.0) / d
  w = v / jnp.sum(v)
  w_dead = dead.astype(jnp.float32) / jnp.maximum(jnp.sum(dead), 1)
  return jnp.where(jnp.any(dead), w_dead, w)


def normalizers(gramian: jax.Array, losses: jax.Array, normalization: str) -> jax.Array:
  """The official MGDA gradient normalisers ``n_k`` (Sener et al.'s ``gradient_normalizers``)."""
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gramian), 0.0))
  n = {"none": jnp.ones_like(losses), "l2": norms, "loss": losses, "loss+": losses * norms}
  if normalization not in n:
    raise ValueError(f"mgda: unknown normalization {normalization!r}; "
                     f"valid: {', '.join(NORMALIZATIONS)}")
  n = n[normalization]
  return jnp.where(jnp.isfinite(n) & (n != 0), n, 1.0)


@register("mgda")
def mgda(num_tasks: int, normalization: str = "none", scale_by_k: bool = False,
         max_iter: int = 1500) -> Method:
  """MGDA (Sener & Koltun 2018); MGDA-UB via the engine's ``features`` mode. See the module doc."""
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"mgda: unknown normalization {normalization!r}; "
                     f"valid: {', '.join(NORMALIZATIONS)}")
  if int(max_iter) < 1:
    raise ValueError(f"mgda: max_iter must be >= 1, got {max_iter}")
  scale = float(num_tasks) if scale_by_k else 1.0

  def weigh(gramian, losses, state):
    n = normalizers(gramian, losses, normalization)
    gn = gramian / (n[:, None] * n[None, :])
    return scale * min_norm_weights(gn, int(max_iter)), state

  return Method("mgda", num_tasks, GRAMIAN, init=lambda params: EmptyState(), weigh=weigh,
                specific="weighted")
