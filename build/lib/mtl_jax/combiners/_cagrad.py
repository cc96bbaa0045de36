"""CAGrad: conflict-averse gradient descent.

Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021
(arXiv:2110.14048). Official code: github.com/Cranial-XIX/CAGrad; the same routine is the
``CAGrad`` class of the Nash-MTL repository (``c=0.4``, ``rescale=1``), and LibMTL's
(``calpha=0.5``, ``rescale=1``).

The update maximises the worst task improvement in a ball around the average gradient ``g0``:
``max_d min_i <g_i, d>`` s.t. ``||d - g0|| <= c ||g0||``. Its dual (what the official code solves
with scipy's SLSQP) is ``min_{w in simplex} w^T G b + c' sqrt(w^T G w + 1e-8)`` with ``b = 1/K``,
``c' = c ||g0|| + 1e-8``, ``||g0|| = sqrt(mean(G) + 1e-8)``; then ``g_w = sum_k w_k g_k`` and
``d = g0 + (c' / (||g_w|| + 1e-8)) g_w``, divided by ``1 + c^2`` (``rescale=1``), ``1 + c``
(``rescale=2``) or not (``rescale=0``). The Nash-MTL repository finally multiplies by K ("to match
the sum loss"): ``sum_scale=True`` (default here, the weights then sum to about K like ``ls``);
``False`` gives LibMTL's scale. So the weights are
``(1/K + lambda w) * (K if sum_scale) / rescale``.

Exact solver (ours; :func:`solve_dual`). On the simplex ``w^T G w + e = w^T (G + e 11^T) w``, so
the dual is the CAGrad dual without the constant of ``G~ = G + e 11^T`` (a Jacobian with one more
column ``sqrt(e)``; ``w^T G~ b = w^T G b + e``). Its primal, ``max lambda`` s.t.
``G~ v + r >= lambda 1`` on the tasks, ``||J~^T v|| <= c'`` (``r = G~ b``, ``d = g0 + J~^T v``),
is a one-parameter family of non-negative QPs: for a given ``lambda`` the smallest step that
improves every task by ``lambda`` is ``J~^T v(lambda)``,
``v(lambda) = argmin_{v >= 0} v^T G~ v / 2 - v^T (lambda 1 - r)``, and ``phi(lambda) =
v^T G~ v`` is continuous and non-decreasing; the optimum is the root of ``phi(lambda) = c'^2``, and
``w = v / sum v``. The root is found by a safeguarded active-set Newton iteration in
``lax.while_loop``: solve the QP at ``lambda`` (:func:`mtl_jax.combiners._qp` FISTA + active-set
polishing on the unit-diagonal ``C = D^-1 G~ D^-1``, warm-started), take its support ``S``, solve
the quadratic ``phi_S(lambda) = c'^2`` of that support in closed form (two K x K solves), and stop
when that point satisfies every KKT condition (``v >= 0``, every task's improvement ``>= lambda``
up to 1e-5 of its terms, ``||J~^T v||^2 = c'^2`` to 1e-5 relative); otherwise continue from the
new ``lambda`` (bisection inside the bracket ``[min r, min_i r_i + c' ||g~_i||]`` when it leaves
it). The exact step lands on the solution once the support is right: 1-4 outer steps on random
Gramians. Measured (tests/test_solvers.py, float64 reference: bisection on ``lambda`` with
scipy NNLS least-distance solves): objective within 1e-7 relative for K 2..40 and Gramian
diagonals spread over 1e0..1e8; median 0.3-0.8 ms at K=40 on a 2-core CPU. Inputs without a
KKT point at float32 precision (``0`` in the hull with ``mean(G) = 0``) stop after ``30`` outer
steps with the last QP's support (finite).

Hyper-parameters: ``c=0.4``, ``rescale=1``, ``sum_scale=True``, ``max_iter=250`` (FISTA iterations
per outer step, at most).
Task-specific parameters: ``specific='sum'`` (the official code back-propagates each task's loss
into its own head unweighted and only overwrites the shared gradients).
Deviations: the inner solver (above, exact where SLSQP stops at its tolerance); the Gramian is
first divided by its mean diagonal (the minimiser is scale-free up to the 1e-8 constants, which
are thus applied on the normalised Gramian; the official ones are absolute, so they matter only
for gradients of norm ~1e-4 and below).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.combiners._qp import _box_qp_scaled
from mtl_jax.combiners.base import GRAMIAN, EmptyState, Method, register

RESCALES = (0, 1, 2)
_EPS = 1e-8  # the official constants
MAX_OUTER = 30


def _support_root(cm, u, s, free, cc2):
  """On the support ``free``: the ``lambda`` with ``phi_S(lambda) = cc2`` and its point ``z``.

  ``z_S = lambda a - e``, ``a = C_SS^-1 u_S``, ``e = C_SS^-1 s_S``; ``phi_S`` is the quadratic
  ``alpha (lambda - beta/alpha)^2 + gamma - beta^2/alpha`` (written so, no cancellation in the root).
  """
  k = cm.shape[0]
  eye = jnp.eye(k, dtype=cm.dtype)
  mat = jnp.where(free[:, None] & free[None, :], cm, 0.0) + jnp.where(free, 0.0, 1.0)[:, None] * eye
  rhs = jnp.stack([jnp.where(free, u, 0.0), jnp.where(free, s, 0.0)], axis=1)
  a, e = jnp.moveaxis(jnp.linalg.solve(mat, rhs), 1, 0)
  alpha, beta, gamma = rhs[:, 0] @ a, rhs[:, 0] @ e, rhs[:, 1] @ e
  lam0 = beta / alpha
  lam = lam0 + jnp.sqrt(jnp.maximum(cc2 - (gamma - beta * lam0), 0.0) / alpha)
  return lam, jnp.where(free, lam * a - e, 0.0)


def solve_dual(gramian, c_eff, max_iter: int = 250, return_info: bool = False):
  """``argmin_{w in simplex} w^T G b + c_eff sqrt(w^T G w + 1e-8)`` (``b = 1/K``), exactly.

  See the module docstring for the method. ``return_info``: also ``(outer steps, converged)``.
  """
  g = jnp.asarray(gramian, jnp.float32)
  k = g.shape[0]
  gt = 0.5 * (g + g.T) + _EPS
  r = gt @ jnp.full((k,), 1.0 / k, jnp.float32)
  d = jnp.sqrt(jnp.maximum(jnp.diagonal(gt), _EPS))
  eye = jnp.eye(k, dtype=g.dtype)
  cm = jnp.where(eye > 0, 1.0, jnp.clip(gt / (d[:, None] * d[None, :]), -1.0, 1.0))
  u, s = 1.0 / d, r / d  # z = D v: C z - (lambda u - s) >= 0, tight on the support
  cc2 = jnp.square(c_eff)
  lmax = jnp.max(jnp.linalg.eigvalsh(cm))

  def kkt(lam, z):
    grad = cm @ z - lam * u + s
    size = jnp.abs(cm) @ jnp.abs(z) + jnp.abs(lam * u) + jnp.abs(s)
    return (jnp.all(jnp.isfinite(z)) & jnp.all(z >= 0) & jnp.all(grad >= -1e-5 * size)
            & (jnp.abs(z @ cm @ z - cc2) <= 1e-5 * cc2))

  def cond(st):
    return (st[0] < MAX_OUTER) & ~st[5]

  def body(st):
    it, lam, lo, hi, z, _, _ = st
    z = _box_qp_scaled(cm, s - lam * u, 0.0, jnp.inf, z, max_iter, 1e-6, 2, lmax)
    below = z @ cm @ z < cc2
    lo = jnp.where(below, jnp.maximum(lo, lam), lo)
    hi = jnp.where(below, hi, jnp.minimum(hi, lam))
    lam_s, z_s = _support_root(cm, u, s, z > 0, cc2)
    done = kkt(lam_s, z_s)
    inside = (lam_s > lo) & (lam_s < hi)
    nxt = jnp.where(inside, lam_s, 0.5 * (lo + hi))
    return it + 1, nxt, lo, hi, z, done, jnp.where(done, z_s, z)

  lo, hi = jnp.min(r), jnp.min(r + c_eff * d)
  z0 = jnp.zeros((k,), jnp.float32)
  it, _, _, _, _, done, z = jax.lax.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), hi, lo, hi, z0, jnp.zeros((), bool), z0))
  v = jnp.maximum(z, 0.0) / d
  total = jnp.sum(v)
  w = jnp.where(total > 0, v / jnp.where(total > 0, total, 1.0), 1.0 / k)
  return (w, (it, done)) if return_info else w


def cagrad_weights(gramian, c: float = 0.4, rescale: int = 1, iters: int = 250):
  """Weights ``v`` with ``d = sum_k v_k g_k`` the (rescaled, not K-scaled) CAGrad update, and ``w``."""
  g = jnp.asarray(gramian, jnp.float32)
  k = g.shape[0]
  tr = jnp.trace(g) / k
  g = jnp.where(tr > 0, g / jnp.where(tr > 0, tr, 1.0), g)
  b = jnp.full((k,), 1.0 / k, jnp.float32)
  g0_norm = jnp.sqrt(jnp.maximum(jnp.mean(g), 0.0) + _EPS)
  cc = c * g0_norm + _EPS
  w = solve_dual(g, cc, iters) if k > 1 else jnp.ones((1,), jnp.float32)
  gw_norm = jnp.sqrt(jnp.maximum(w @ g @ w, 0.0))
  lmbda = cc / (gw_norm + _EPS)
  v = b + lmbda * w
  v = v / {0: 1.0, 1: 1.0 + c**2, 2: 1.0 + c}[rescale]
  return v, w


@register("cagrad")
def cagrad(num_tasks: int, c: float = 0.4, rescale: int = 1, sum_scale: bool = True,
           max_iter: int = 250) -> Method:
  """CAGrad (Liu et al. 2021). See the module docstring."""
  if rescale not in RESCALES:
    raise ValueError(f"cagrad: unknown rescale {rescale!r}; valid: 0, 1, 2")
  if not c >= 0:
    raise ValueError(f"cagrad: c must be >= 0, got {c}")
  if int(max_iter) < 1:
    raise ValueError(f"cagrad: max_iter must be >= 1, got {max_iter}")
  k = num_tasks
  scale = float(k) if sum_scale else 1.0

  def weigh(gramian, losses, state):
    del losses
    v, _ = cagrad_weights(gramian, float(c), int(rescale), int(max_iter))
    return scale * v, state

  return Method("cagrad", k, GRAMIAN, init=lambda params: EmptyState(), weigh=weigh,
                specific="sum")
