"""The two-task toy problem of Nash-MTL (Navon et al. 2022, Fig. 1), a modification of CAGrad's.

Two losses of ``x = (x1, x2)`` (``LOWER = 5e-6``, the first loss scaled by ``scale = 0.1``):

    f1 = log(max(|0.5(-x1 - 7) - tanh(-x2)|, LOWER)) + 6
    f2 = log(max(|0.5(-x1 + 3) + tanh(-x2) + 2|, LOWER)) + 6
    c1 = max(tanh(0.5 x2), 0),  c2 = max(tanh(-0.5 x2), 0)
    f1_sq = ((-x1 + 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    f2_sq = ((-x1 - 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    L1 = scale (c1 f1 + c2 f1_sq),  L2 = c1 f2 + c2 f2_sq

Starts ``(-8.5, 7.5), (0, 0), (9, 9), (-7.5, -0.5), (9, -1)``; Adam, lr 1e-3, 35,000 steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LOWER = 5e-6
SCALE = 0.1
STARTS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
# The Pareto set: close to the segment -7 <= x1 <= 7 at x2 just below -8 (REFERENCES.md).
PARETO_X1 = (-7.0, 7.0)
PARETO_X2 = (-8.5, -8.0)


def losses(x: jax.Array, scale: float = SCALE) -> jax.Array:
  """(2,) the two task losses at ``x`` (2,)."""
  x1, x2 = x[0], x[1]
  f1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7) - jnp.tanh(-x2)), LOWER)) + 6
  f2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3) + jnp.tanh(-x2) + 2), LOWER)) + 6
  c1 = jnp.maximum(jnp.tanh(0.5 * x2), 0)
  c2 = jnp.maximum(jnp.tanh(-0.5 * x2), 0)
  f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  return jnp.stack([scale * (c1 * f1 + c2 * f1_sq), c1 * f2 + c2 * f2_sq])


def pareto_front_grid(n: int = 801, box=((-10.0, 10.0), (-10.0, 10.0)), scale: float = SCALE):
  """Pareto-optimal points of an ``n x n`` grid over ``box``: ``(points (M, 2), losses (M, 2))``.

  A grid point is Pareto-optimal when no other grid point is at least as good on both losses and
  better on one (sort by L1, keep the running strict minima of L2).
  """
  xs = np.linspace(*box[0], n)
  ys = np.linspace(*box[1], n)
  xx, yy = np.meshgrid(xs, ys, indexing="ij")
  pts = np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32)
  ls = np.asarray(jax.jit(jax.vmap(lambda p: losses(p, scale)))(jnp.asarray(pts)), np.float64)
  order = np.lexsort((ls[:, 1], ls[:, 0]))
  best = np.inf
  keep = []
  for i in order:
    if ls[i, 1] < best:
      keep.append(i)
      best = ls[i, 1]
  keep = np.asarray(keep)
  return pts[keep], ls[keep]


def in_pareto_set(x, tol: float = 0.05) -> bool:
  """Whether ``x`` lies in the Pareto set ``-7 <= x1 <= 7, -8.5 < x2 < -8``, within ``tol``."""
  x1, x2 = float(x[0]), float(x[1])
  return (PARETO_X1[0] - tol <= x1 <= PARETO_X1[1] + tol) and (
      PARETO_X2[0] - tol < x2 < PARETO_X2[1] + tol)
