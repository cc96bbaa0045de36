"""Nash-MTL: multi-task learning as a bargaining game.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya. "Multi-Task Learning as a Bargaining
Game", ICML 2022 (arXiv:2202.01017). Official code: github.com/AvivNavon/nash-mtl,
``methods/weight_methods.py`` (class ``NashMTL``).

The update on the shared parameters is ``d = sum_k a_k g_k`` with ``a > 0`` the Nash bargaining
solution, characterised by the KKT condition ``G a = 1 / a`` (elementwise) where ``G = J J^T`` is
the Gramian of the shared task gradients. The official code solves it by a sequence of convex
programs in cvxpy/ECOS (``optim_niter`` rounds, each a linearisation of the concave part), on the
Gramian divided by its Frobenius norm ``c = ||G||_F``, with the constraint written so that the
fixed point is ``a_k (G a)_k = 1`` on the *unnormalised* Gramian; the normalisation only
conditions the solve. We normalise too, per task instead of globally: with ``D = diag(G)^1/2``,
``b = D a`` solves ``C b = 1/b`` on the unit-diagonal ``C = D^-1 G D^-1`` (the same fixed point,
conditioned for gradient norms spread over many decades in float32), and we return ``a = b / D``,
which satisfies ``G a = 1/a``. Then ``||d||^2 = a^T G a = K`` whatever the gradient scale (the
bargaining solution's norm is set by the ball, not by the gradients), and the official ``max_norm``
clipping (``clip_grad_norm_`` of the shared gradient, default 1.0) scales ``d`` to norm
``min(||d||, max_norm)``.

Our solve is not cvxpy: ``C b = 1/b`` is the stationarity condition of the strictly convex,
self-concordant function ``f(b) = b^T C b / 2 - sum_k log b_k``, so

* ``solver='jaxopt'`` (default): jaxopt's Levenberg-Marquardt on the residual ``C b - 1/b`` in
  ``u = log b`` (positivity by construction), ``optim_niter`` iterations at most, imported through
  :mod:`mtl_jax._jaxopt`;
* ``solver='newton'``: damped Newton on ``f`` (Nesterov's step ``1/(1+lambda)`` while the
  Newton decrement ``lambda > 1/4``, full steps after: stays in ``b > 0`` and converges
  quadratically), ``optim_niter`` iterations, a K x K Cholesky each; no jaxopt needed.

Both are warm-started from the previous solution (kept in the state, like the official
``prvs_alpha``; initial value ones as in the official code) and run inside ``jax.jit``. Their
cost and relative KKT residual ``||G a - 1/a|| / ||1/a||`` against the official cvxpy solve are
measured by ``launch/benchmark.py`` (``docs/performance.md``).

Hyper-parameters (official names and defaults): ``update_weights_every=1`` (re-solve every n-th
step, reuse the previous weights in between; with n > 1 the method declares ``Method.fresh`` /
``Method.reuse``, so the engine's ``gramian``/``jacobian`` modes compute no Jacobian on the steps in
between: one backward pass with the stored weights, the shared update clipped to ``max_norm``), ``optim_niter=20``, ``max_norm=1.0`` (``<= 0``
disables clipping). Extra: ``solver``, ``eps`` (see deviations).

Task-specific parameters: ``specific='weighted'`` (the official code back-propagates
``sum_k a_k L_k``, so a head gets ``a_k g_k``).

Deviations from the official code:

* ``max_norm`` is applied by scaling the weights (a weighting returns weights, not a clipped
  vector): the shared update is clipped exactly as ``clip_grad_norm_`` would, but task-specific
  parameters are scaled by the same factor, whereas the official code clips only the shared
  gradient. At the solution ``||d|| = sqrt(K)``, so with ``max_norm=1`` heads get
  ``a_k g_k / sqrt(K)``; under Adam (the paper's optimiser) a constant factor is immaterial.
* ``eps`` (default 1e-7) adds ``eps * I`` to the unit-diagonal ``C``. On a full-rank Gramian it
  changes the relative KKT residual by ~``eps * ||b||^2``; it keeps the solve bounded when no
  solution exists (tasks with no common ascent direction, e.g. ``g3 = -(g1 + g2)``).
* A task whose shared gradient is exactly zero has no solution (``a_k -> inf``; the official ECOS
  solve then fails and keeps the previous weights): it is left out of the bargaining and gets the
  largest weight of the others (no effect on the shared update; its head keeps training).
* When every shared gradient vanishes, or the solve returns a non-finite or non-positive point, the
  previous weights are kept (as the official code keeps ``prvs_alpha`` when ECOS fails).
* The official stopping tests (``||G_n b - 1/b|| < 1e-3`` or a step below 1e-6) are replaced by a
  fixed ``optim_niter`` iterations (cheaper under jit than a data-dependent loop, and more accurate).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.combiners.base import GRAMIAN, Method, register

SOLVERS = ("newton", "jaxopt")
_TINY = 1e-30


class NashMTLState(NamedTuple):
  alpha: jax.Array  # (K,) solution of the normalised problem G_n b = 1/b (the warm start)
  weights: jax.Array  # (K,) the last weights returned (reused when not re-solving)
  step: jax.Array  # int32


def _newton(gn: jax.Array, b0: jax.Array, niter: int) -> jax.Array:
  """Damped Newton on ``f(b) = b^T G b / 2 - sum log b``: ``niter`` iterations from ``b0``."""
  k = gn.shape[0]

  def body(_, b):
    grad = gn @ b - 1.0 / b
    hess = gn + jnp.diag(1.0 / (b * b))
    chol = jax.scipy.linalg.cho_factor(hess + 1e-12 * jnp.eye(k, dtype=b.dtype))
    step = -jax.scipy.linalg.cho_solve(chol, grad)
    decrement = jnp.sqrt(jnp.maximum(-jnp.dot(grad, step), 0.0))
    t = jnp.where(decrement > 0.25, 1.0 / (1.0 + decrement), 1.0)
    new = b + t * step
    return jnp.where(jnp.all(jnp.isfinite(new)) & jnp.all(new > 0), new, b)

  return jax.lax.fori_loop(0, niter, body, b0)


def _jaxopt_lm(gn: jax.Array, b0: jax.Array, niter: int) -> jax.Array:
  """jaxopt Levenberg-Marquardt on ``G b - 1/b = 0`` in ``u = log b`` (``niter`` iterations at most).

  (The residual ``b * (G b) - 1`` would be flat, ``-1``, as any ``b_k -> 0``: LM stalls there.)
  """
  from mtl_jax._jaxopt import LevenbergMarquardt

  def residual(u):
    return gn @ jnp.exp(u) - jnp.exp(-u)

  solver = LevenbergMarquardt(
      residual, maxiter=niter, damping_parameter=1e-3, tol=1e-9, xtol=1e-12, gtol=1e-12,
      solver="cholesky", materialize_jac=True, implicit_diff=False, jit=True)
  u = solver.run(jnp.log(b0)).params
  return jnp.exp(u)


def solve(gramian: jax.Array,
          alpha0: jax.Array | None = None,
          *,
          optim_niter: int = 20,
          solver: str = "jaxopt",
          eps: float = 1e-7) -> tuple[jax.Array, jax.Array]:
  """The raw bargaining solve, before any clipping: ``(a, b)``.

  ``a`` (K,) solves ``G a = 1/a`` on the given Gramian (up to ``eps``). The solve runs on the
  normalised Gramian ``C = D^-1 G D^-1``, ``D = diag(G)^1/2`` (unit diagonal), where ``b = D a``
  solves ``C b = 1/b``: the same fixed point, well conditioned even for gradient norms spread over
  many decades. ``b`` is the warm start to keep (``alpha0``; default ones). A task whose shared
  gradient is exactly zero takes no part in the bargaining and gets the largest weight of the
  others (it has no effect on the shared update). If every gradient vanishes or the solve fails,
  ``(alpha0, alpha0)`` is returned (the official code keeps its previous weights when ECOS fails).
  """
  a, b, _ = _solve(gramian, alpha0, optim_niter, solver, eps)
  return a, b


def _solve(gramian, alpha0, optim_niter, solver, eps):
  """:func:`solve`, also returning whether it succeeded."""
  if solver not in SOLVERS:
    raise ValueError(f"nash_mtl: unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
  g = jnp.asarray(gramian, jnp.float32)
  k = g.shape[0]
  b0 = jnp.ones((k,), jnp.float32) if alpha0 is None else jnp.asarray(alpha0, jnp.float32)
  b0 = jnp.where(jnp.all(jnp.isfinite(b0)) & jnp.all(b0 > 0), b0, jnp.ones_like(b0))
  diag = jnp.diagonal(g)
  live = jnp.isfinite(diag) & (diag > _TINY)
  d = jnp.sqrt(jnp.where(live, diag, 1.0))
  eye = jnp.eye(k, dtype=g.dtype)
  both = live[:, None] & live[None, :]
  corr = jnp.clip(jnp.where(both, g / (d[:, None] * d[None, :]), 0.0), -1.0, 1.0)
  corr = jnp.where(eye > 0, 1.0, corr) + eps * eye
  fn = _newton if solver == "newton" else _jaxopt_lm
  b = fn(corr, b0, int(optim_niter))
  ok = jnp.any(live) & jnp.all(jnp.isfinite(b)) & jnp.all(b > 0) & jnp.all(jnp.isfinite(g))
  b = jnp.where(ok, b, b0)
  a = b / d
  a = jnp.where(live, a, jnp.max(jnp.where(live, a, -jnp.inf)))
  a = jnp.where(ok, a, b0)
  return a, b, ok


def kkt_residual(gramian: jax.Array, alpha: jax.Array) -> jax.Array:
  """Relative KKT residual ``||G a - 1/a|| / ||1/a||`` of the bargaining solution."""
  inv = 1.0 / alpha
  return jnp.linalg.norm(gramian @ alpha - inv) / jnp.linalg.norm(inv)


@register("nash_mtl")
def nash_mtl(num_tasks: int,
             update_weights_every: int = 1,
             optim_niter: int = 20,
             max_norm: float = 1.0,
             solver: str = "jaxopt",
             eps: float = 1e-7) -> Method:
  """Nash-MTL (Navon et al., ICML 2022). See the module docstring for the maths and deviations.

  Args:
    num_tasks: K.
    update_weights_every: re-solve the bargaining problem every this many steps (official: 1).
    optim_niter: iterations of the solver per solve (official: 20 rounds of the convex program).
    max_norm: clip the norm of the shared update to this (official: 1.0; ``<= 0``: no clipping).
    solver: ``'jaxopt'`` (Levenberg-Marquardt, default) or ``'newton'`` (damped Newton).
    eps: ridge added to the normalised Gramian (only matters when it is singular).
  """
  if solver not in SOLVERS:
    raise ValueError(f"nash_mtl: unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
  if int(update_weights_every) < 1:
    raise ValueError(f"nash_mtl: update_weights_every must be >= 1, got {update_weights_every}")
  if int(optim_niter) < 1:
    raise ValueError(f"nash_mtl: optim_niter must be >= 1, got {optim_niter}")
  if not eps >= 0:
    raise ValueError(f"nash_mtl: eps must be >= 0, got {eps}")
  every, niter, max_norm, eps = int(update_weights_every), int(optim_niter), float(max_norm), float(eps)

  def init(params):
    del params
    ones = jnp.ones((num_tasks,), jnp.float32)
    return NashMTLState(alpha=ones, weights=ones, step=jnp.zeros((), jnp.int32))

  def weigh(gramian, losses, state):
    del losses
    g = jnp.asarray(gramian, jnp.float32)

    def resolve(_):
      a, b, ok = _solve(g, state.alpha, niter, solver, eps)
      return jnp.where(ok, a, state.weights), b

    a, b = jax.lax.cond(state.step % every == 0, resolve, lambda _: (state.weights, state.alpha),
                        None)
    w = a
    if max_norm > 0:
      norm = jnp.sqrt(jnp.maximum(a @ g @ a, 0.0))
      w = a * jnp.minimum(1.0, max_norm / jnp.maximum(norm, _TINY))
    return w, NashMTLState(alpha=b, weights=a, step=state.step + 1)

  def fresh(state):
    return state.step % every == 0

  def reuse(losses, state):
    # A step between solves: the stored weights, clipped by the engine on the fresh gradients
    # (as weigh does, and as the official code clips every step); no Gramian is computed.
    del losses
    return state.weights, state._replace(step=state.step + 1), max_norm

  hooks = dict(fresh=fresh, reuse=reuse) if every > 1 else {}
  return Method("nash_mtl", num_tasks, GRAMIAN, init=init, weigh=weigh, specific="weighted",
                **hooks)

