"""Small jit-able solvers for the K-dimensional problems gradient combiners solve.

* :func:`box_qp`: ``min_x 1/2 x^T H x + q^T x`` subject to ``lower <= x <= upper`` (either bound may
  be infinite), for a symmetric positive (semi-)definite ``H`` of size K x K. Used by UPGrad and
  DualProj (the dual-cone projection of Quinton & Rey 2024 is ``min_v v^T G v  s.t.  v >= u``) and
  reusable for any nonnegative or box QP over task weights (MGDA-style problems after a change of
  variables, CAGrad's inner problem, ...).
* :func:`project_simplex`: the Euclidean projection onto ``{w >= 0, sum w = s}``
  (``optax.projections.projection_simplex``, row-wise).

The QP solver is written for K up to a few hundred and float32:

1. accelerated projected gradient (FISTA, Beck & Teboulle 2009) with adaptive restart
   (O'Donoghue & Candes 2015), step ``1 / lambda_max(H)``, run until the projected-gradient
   residual (tested every 8 steps) is below ``tol`` (relative) or ``max_iter`` iterations;
2. a few *active-set polishing* steps: from the current point, the bounds that are active with a
   gradient pushing outwards are fixed and the equality-constrained system on the free variables
   is solved exactly (a primal-dual active-set / Newton step, Hintermueller et al. 2002). A
   polished point is accepted only if it is feasible and does not increase the objective, so the
   polish can only help; at the true active set it gives the solution to machine precision, which
   matters for the KKT properties tests check (``G v >= 0`` for the dual-cone projection). The
   steps stop as soon as the active set repeats (then a further step returns the same point).

Everything is ``jax.lax`` control flow with static shapes: no host callbacks, safe under ``jit``,
``vmap`` and ``shard_map``. ``q``, ``lower`` and ``upper`` may carry leading batch dimensions
(several problems with the same ``H``, e.g. UPGrad's K projections), solved together.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax


def _objective(h, q, x):
  return 0.5 * jnp.einsum("...i,ij,...j->...", x, h, x) + jnp.sum(q * x, axis=-1)


def _grad(h, q, x):
  return x @ h.T + q


def _residual(h, q, x, lower, upper, scale):
  """Norm of the projected-gradient step ``x - clip(x - g)`` relative to ``max |x|`` (0 at KKT)."""
  g = _grad(h, q, x)
  step = x - jnp.clip(x - g / scale, lower, upper)
  size = jnp.maximum(jnp.max(jnp.abs(x), axis=-1), jnp.finfo(jnp.float32).tiny)
  return jnp.max(jnp.max(jnp.abs(step), axis=-1) / size)


def box_qp(h: jax.Array,
           q: jax.Array,
           lower: jax.Array | float = 0.0,
           upper: jax.Array | float = jnp.inf,
           x0: Optional[jax.Array] = None,
           *,
           max_iter: int = 500,
           tol: float = 1e-7,
           polish: int = 3):
  """Solve ``min 1/2 x^T h x + q^T x  s.t.  lower <= x <= upper``.

  Args:
    h: (K, K) symmetric positive semi-definite (positive definite for a unique solution; add a
      small ridge if needed, as TorchJD's ``reg_eps`` does).
    q: (..., K) linear terms; leading dimensions are independent problems sharing ``h``.
    lower, upper: bounds broadcastable to ``q`` (``-inf`` / ``inf`` for none).
    x0: optional warm start (projected onto the box); default: the projection of 0.
    max_iter: cap on FISTA iterations (rounded up to a multiple of 8: the residual is tested
      every 8 steps); tol: relative projected-gradient tolerance.
    polish: at most this many active-set polishing steps after FISTA (0 to skip).

  Returns:
    x with the shape of ``q``.
  """
  h = jnp.asarray(h, jnp.float32)
  q = jnp.asarray(q, jnp.float32)
  if h.ndim != 2 or h.shape[0] != h.shape[1] or q.shape[-1:] != h.shape[:1]:
    raise ValueError(f"box_qp: h must be (K, K) and q (..., K); got {h.shape} and {q.shape}")
  h = 0.5 * (h + h.T)
  lower = jnp.broadcast_to(jnp.asarray(lower, jnp.float32), q.shape)
  upper = jnp.broadcast_to(jnp.asarray(upper, jnp.float32), q.shape)
  x = jnp.zeros_like(q) if x0 is None else jnp.asarray(x0, jnp.float32)
  x = jnp.broadcast_to(x, q.shape)
  # Jacobi scaling z = D x, D = diag(h)^1/2: the box maps to a box, h to a unit-diagonal matrix.
  diag = jnp.diagonal(h)
  d = jnp.sqrt(jnp.where(jnp.isfinite(diag) & (diag > 0), diag, 1.0))
  z = _box_qp_scaled(h / (d[:, None] * d[None, :]), q / d, lower * d, upper * d, x * d,
                     max_iter, tol, polish)
  return z / d


_UNROLL = 8  # FISTA steps per convergence test (max_iter is rounded up to a multiple of it)


def _box_qp_scaled(h, q, lower, upper, x, max_iter, tol, polish, lmax=None):
  """:func:`box_qp` on the (Jacobi-scaled) problem: FISTA with restart, then polishing.

  ``lmax``: the largest eigenvalue of ``h`` if the caller has it (solves in a loop on one ``h``).
  """
  x = jnp.clip(x, lower, upper)

  if lmax is None:
    lmax = jnp.max(jnp.linalg.eigvalsh(h))
  scale = jnp.maximum(lmax, jnp.finfo(jnp.float32).tiny)  # Lipschitz constant of the gradient

  def step(x, y, t):
    x_new = jnp.clip(y - _grad(h, q, y) / scale, lower, upper)
    t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    # Gradient-based adaptive restart: drop the momentum when it points uphill.
    uphill = jnp.sum((y - x_new) * (x_new - x), axis=-1, keepdims=True) > 0
    momentum = jnp.where(uphill, 0.0, (t - 1.0) / t_new)
    return x_new, x_new + momentum * (x_new - x), jnp.where(uphill, 1.0, t_new)

  def cond(carry):
    i, _, _, _, res = carry
    return (i < max_iter) & (res > tol)

  def body(carry):
    # _UNROLL steps per test of the residual (a second product with h) and per loop trip: UPGrad
    # on singular K=40 Gramians took 1.5x less CPU time than with a test every step.
    i, x, y, t, _ = carry
    for _ in range(_UNROLL):
      x, y, t = step(x, y, t)
    return i + _UNROLL, x, y, t, _residual(h, q, x, lower, upper, scale)

  res0 = _residual(h, q, x, lower, upper, scale)
  _, x, _, _, _ = jax.lax.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), x, x, jnp.ones(q.shape[:-1] + (1,)), res0))

  return _polish_loop(h, q, x, lower, upper, scale, polish)


def _active(h, q, x, lower, upper, scale):
  """The bounds the projected-gradient step from ``x`` stays on: ``(at_lower, at_upper)``."""
  trial = x - _grad(h, q, x) / scale
  return trial <= lower, trial >= upper


def _polish_loop(h, q, x, lower, upper, scale, polish):
  """Up to ``polish`` active-set steps, stopping once no problem's active set changes.

  A step depends on ``x`` only through its active set (and is kept only where it is not worse),
  so a step from a point whose active set is the one just solved for returns that same point:
  stopping there gives exactly what ``polish`` fixed steps give, usually after one step.
  """
  if polish <= 0:
    return x

  def cond(carry):
    i, _, changed = carry
    return (i < polish) & changed

  def body(carry):
    i, x, _ = carry
    act = _active(h, q, x, lower, upper, scale)
    x = _polish(h, q, x, lower, upper, act)
    new = _active(h, q, x, lower, upper, scale)
    changed = jnp.any((act[0] != new[0]) | (act[1] != new[1]))
    return i + 1, x, changed

  _, x, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), x, jnp.array(True)))
  return x


def _polish(h, q, x, lower, upper, active):
  """One active-set Newton step; kept only where it is feasible and not worse."""
  at_lower, at_upper = active
  free = ~(at_lower | at_upper)
  fixed = jnp.where(at_lower, lower, jnp.where(at_upper, upper, 0.0))
  fixed = jnp.where(free, 0.0, fixed)
  both = free[..., :, None] & free[..., None, :]
  eye = jnp.eye(h.shape[0], dtype=h.dtype)
  mat = jnp.where(both, h, 0.0) + jnp.where(free, 0.0, 1.0)[..., None] * eye
  rhs = jnp.where(free, -(q + fixed @ h.T), fixed)
  cand = jnp.linalg.solve(mat, rhs[..., None])[..., 0]
  cand = jnp.where(free, cand, fixed)
  span = 1e-6 * (1.0 + jnp.abs(cand))
  feasible = jnp.all((cand >= lower - span) & (cand <= upper + span) & jnp.isfinite(cand), axis=-1)
  cand = jnp.clip(cand, lower, upper)
  obj = _objective(h, q, x)
  better = _objective(h, q, cand) <= obj + 1e-6 * jnp.abs(obj)  # relative: objectives may be tiny
  take = (feasible & better)[..., None]
  return jnp.where(take, cand, x)


def nonneg_qp(h, q, x0=None, **kw):
  """``min 1/2 x^T h x + q^T x  s.t.  x >= 0`` (see :func:`box_qp`)."""
  return box_qp(h, q, 0.0, jnp.inf, x0, **kw)


def project_simplex(v: jax.Array, s: float = 1.0) -> jax.Array:
  """Euclidean projection of ``v`` (..., K) onto ``{w >= 0, sum_k w_k = s}`` (s > 0), row-wise.

  ``optax.projections.projection_simplex`` (the sort-based algorithm of Held, Wolfe & Crowder
  1974 / Duchi et al. 2008), mapped over the leading dimensions.
  """
  v = jnp.asarray(v, jnp.float32)
  fn = lambda x: optax.projections.projection_simplex(x, s)
  for _ in range(v.ndim - 1):
    fn = jax.vmap(fn)
  return fn(v)


def dual_cone_weights(u: jax.Array, gramian: jax.Array, norm_eps: float = 1e-4,
                      max_iter: int = 1500) -> jax.Array:
  """Weights of the projection of ``J^T u`` onto the dual cone ``{x : J x >= 0}``.

  Quinton & Rey (2024), "Jacobian Descent for Multi-Objective Optimization", Proposition 1: the
  projection is ``J^T v`` with ``v = argmin_{v >= u} v^T G v``, ``G = J J^T``. As in TorchJD, the
  Gramian is first normalised by its trace (the squared Frobenius norm of ``J``; a Gramian with
  trace below ``norm_eps`` becomes 0). Not as in TorchJD, no ridge is added: TorchJD adds
  ``reg_eps I`` so that ``quadprog`` gets a positive definite matrix and returns the projection for
  the ridged Gramian, which conflicts with a task (``(G v)_k = -reg_eps v_k``) wherever the ridge
  matters; :func:`box_qp` (FISTA on the Jacobi-scaled problem, then active-set polishing) needs no
  ridge and returns the exact projection (``G v >= 0``, ``v >= u``, ``(G v)_k = 0`` where ``v_k >
  u_k``) to float32 rounding: measured ``G v >= -4e-7 ||d|| ||g_k||`` and ``v^T G v`` within 3e-7
  of a float64 NNLS solve, K 2..40, ``diag(G)`` over 1e0..1e8 (``tests/test_kkt.py``). A ridge
  would also cost time: on a singular ``G`` (fewer parameters than tasks, duplicate tasks) it
  is the smallest eigenvalue, and FISTA on the ridged problem ran to its cap (500 iterations,
  then up to 1000 more to remove the ridge's bias: UPGrad 6.5-27 ms at K=40), while on the
  unregularised one projected gradient converges linearly on the range of ``G`` (the Luo-Tseng
  error bound of a polyhedral QP): UPGrad at K=40, rank 20, 180-1500 iterations (median about
  400; thin cones reach the ``max_iter`` cap), rank 5 to 15 mostly under 150. ``u`` may be
  (..., K): each row is projected (UPGrad's K problems run together, until the slowest converges
  or ``max_iter``).
  Scaling ``G`` by ``c > 0`` leaves ``v`` unchanged (the normalisation).

  More tasks than parameters (K > P, ``G`` singular): the solution ``v`` is not unique and often
  ``J^T v = 0`` (the dual cone is ``{0}`` when the gradients positively span their space: 66% of
  Gaussian K=7, P=3 cases). A projection below the float32 Gramian's resolution is returned as
  exactly 0 (:func:`_zero_below_resolution`). The limits, pinned by
  ``tests/test_solvers.py::test_dualproj_upgrad_more_tasks_than_parameters``: float32 knows
  ``(G v)_k`` only to ``eps |g_k| S`` (``S = sum_j |v_j| |g_j|``), so the promise is
  ``cos(g_k, d) >= -50 eps S / ||d||`` (``>= -1e-6`` where ``S / ||d|| <= 20``), a zero update only
  where ``||d*|| <= sqrt(4 K eps) S``, and ``d`` within 2e-3 S of the exact projection (not exact
  on thin cones whose solve reaches the cap: measured 1.8e-3 S for UPGrad at K=40, P=20, spread
  1e0..1e8, in one case of eight; the others within 1e-7 S). Solve times at K=40:
  ``launch/benchmark.py solves`` (UPGrad 1.4 ms full rank, 4.7 ms at rank 20, median wall on the
  shared 2-core CPU at load 6.5-8.7).
  """
  g = jnp.asarray(gramian, jnp.float32)
  trace = jnp.trace(g)
  g = jnp.where(trace < norm_eps, 0.0, g / jnp.where(trace < norm_eps, 1.0, trace))
  u = jnp.asarray(u, jnp.float32)
  v = box_qp(2.0 * g, jnp.zeros_like(u), u, jnp.inf, max_iter=max_iter, polish=3)
  return _zero_below_resolution(g, v, trace >= norm_eps)


def _zero_below_resolution(g, v, nonzero_gramian):
  """``v -> 0`` where ``||J^T v||`` is below what the float32 Gramian resolves.

  ``G`` carries rounding errors ``eps |g_i| |g_j|``, so ``v^T G v`` is known to about
  ``K eps S^2`` with ``S = sum_j |v_j| |g_j|``: a projection whose squared norm is below
  ``4 K eps S^2`` cannot be told from 0, and it mostly is 0 (more tasks than parameters: the
  dual cone is ``{0}`` when the gradients positively span their space). Its weights' rounding
  alone would give ``J^T v`` an arbitrary direction (conflict cosines near -1), whereas the
  update 0 conflicts with no task and is within ``sqrt(4 K eps) S`` of the exact one.
  """
  k = g.shape[0]
  s = jnp.sum(jnp.abs(v) * jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0)), axis=-1)
  obj = jnp.einsum("...i,ij,...j->...", v, g, v)
  tiny = nonzero_gramian & (obj <= 4.0 * k * jnp.finfo(jnp.float32).eps * s * s)
  return jnp.where(tiny[..., None], 0.0, v)


def pref_weights(pref_vector, num_tasks: int, name: str) -> jax.Array:
  """TorchJD's preference vector: ``None`` -> the mean (1/K each), else the given (K,) vector."""
  if pref_vector is None:
    return jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)
  p = jnp.asarray(pref_vector, jnp.float32)
  if p.shape != (num_tasks,):
    raise ValueError(f"{name}: pref_vector has shape {p.shape}, expected ({num_tasks},)")
  return p
