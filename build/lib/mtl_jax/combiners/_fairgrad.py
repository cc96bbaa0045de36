"""FairGrad (Ban & Ji 2024): alpha-fair resource allocation of the shared update."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.combiners.base import GRAMIAN, EmptyState, Method, register


class FairGradInfo(NamedTuple):
  iterations: jax.Array
  residual: jax.Array  # ||G w - w^{-1/alpha}|| / ||w^{-1/alpha}|| at the returned w


def _h(w, alpha):
  """The concave utility whose derivative is ``w^{-1/alpha}``."""
  if alpha == 1.0:
    return jnp.log(w)
  p = 1.0 - 1.0 / alpha
  return w**p / p


def solve_fairgrad(gramian, alpha: float = 1.0, max_iter: int = 60, tol: float = 1e-6,
                   return_info: bool = False):
  """The positive ``w`` with ``G w = w^{-1/alpha}`` (element-wise power).

  It is the unique minimiser of the strictly convex ``phi(w) = 1/2 w^T G w - sum_k h(w_k)`` with
  ``h' = w^{-1/alpha}`` over ``w > 0`` (when one exists). Solved by damped Newton steps (Hessian
  ``G + diag(w^{-1/alpha-1}) / alpha``, positive definite) with a fraction-to-the-boundary rule
  and Armijo backtracking on ``phi`` (or on the gradient norm once ``phi``'s decrease is below
  float32 resolution), after normalising ``G`` by its mean diagonal ``c`` (exact:
  the solution for ``c G_hat`` is ``c^{-alpha/(1+alpha)}`` times the one for ``G_hat``).
  When no solution exists (a task with a zero gradient makes ``phi`` unbounded) the iterates stay
  finite and that task's weight grows with the iterations; its gradient is zero anyway.
  """
  g = jnp.asarray(gramian, jnp.float32)
  k = g.shape[0]
  g = 0.5 * (g + g.T)
  c = jnp.trace(g) / k
  c = jnp.where(c > jnp.finfo(jnp.float32).tiny, c, 1.0)
  gh = g / c
  inv_a = 1.0 / alpha

  def phi(w):
    return 0.5 * w @ gh @ w - jnp.sum(_h(w, alpha))

  def grad(w):
    return gh @ w - w**(-inv_a)

  def residual(w):
    r = w**(-inv_a)
    return jnp.linalg.norm(gh @ w - r) / jnp.linalg.norm(r)

  def cond(carry):
    i, _, res = carry
    return (i < max_iter) & (res > tol)

  def body(carry):
    i, w, _ = carry
    gr = grad(w)
    hess = gh + jnp.diag(inv_a * w**(-inv_a - 1.0))
    dw = -jnp.linalg.solve(hess, gr)
    ratio = jnp.where(dw < 0, -w / jnp.where(dw < 0, dw, -1.0), jnp.inf)
    t0 = jnp.minimum(1.0, 0.99 * jnp.min(ratio))
    f0, slope, n0 = phi(w), gr @ dw, jnp.linalg.norm(gr)

    def accept(t):
      # Armijo on phi, or (where phi's decrease is below float32 resolution, near the solution)
      # a decrease of the gradient norm.
      wt = w + t * dw
      return (phi(wt) <= f0 + 1e-4 * t * slope) | (jnp.linalg.norm(grad(wt)) < n0)

    def bt_cond(c2):
      j, t = c2
      return (j < 40) & ~accept(t)

    _, t = jax.lax.while_loop(bt_cond, lambda c2: (c2[0] + 1, 0.5 * c2[1]), (0, t0))
    w_new = w + t * dw
    w_new = jnp.where(jnp.all(jnp.isfinite(w_new)) & jnp.all(w_new > 0), w_new, w)
    return i + 1, w_new, residual(w_new)

  w0 = jnp.ones((k,), jnp.float32)
  iters, w, res = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), w0, residual(w0)))
  w = w * c**(-alpha / (1.0 + alpha))
  if return_info:
    return w, FairGradInfo(iters, res)
  return w


@register("fairgrad")
def fairgrad(num_tasks: int, alpha: float = 1.0, max_iter: int = 60) -> Method:
  """FairGrad.

  Ban, H. & Ji, K. (2024). "Fair Resource Allocation in Multi-Task Learning". ICML 2024.
  Official code: github.com/OptMN-Lab/fairgrad (also LibMTL's ``FairGrad``).

  The update ``d = J^T w`` maximises the alpha-fair utility of the per-task improvements
  ``g_k^T d``; its optimality condition is ``G w = w^{-1/alpha}`` (element-wise), solved here by
  :func:`solve_fairgrad`. ``alpha=1`` is proportional fairness (then it coincides with Nash-MTL's
  bargaining condition ``G w = 1/w``), ``alpha -> inf`` approaches max-min fairness, and
  ``alpha=0`` would be the plain sum. Scaling every gradient by ``c`` scales the update by
  ``c^{(1-alpha)/(1+alpha)}`` (the weights by ``c^{-2 alpha/(1+alpha)}``); permuting the tasks
  permutes the weights.

  Hyper-parameters: ``alpha=1.0`` (official default); ``max_iter=60`` Newton iterations (ours;
  converges in ~5-15 on random Gramians to ``||G w - w^{-1/alpha}|| <= 1e-6 ||w^{-1/alpha}||``).

  Task-specific parameters: ``specific='weighted'``: the official code back-propagates
  ``sum_k w_k L_k``, so heads receive ``w_k g_k``.

  Deviations: the official code calls ``scipy.optimize.least_squares`` (trust-region reflective,
  bounds ``w >= 0``, start ``1/K``) on the host; here a damped Newton method on the equivalent
  convex problem runs inside ``jit``. Both return the unique solution when it exists; where it does
  not (a task whose shared gradient is zero), scipy returns whatever its iterations reach, and so do
  we (finite, by construction).
  """
  alpha = float(alpha)
  if not alpha > 0:
    raise ValueError(f"fairgrad: alpha must be > 0, got {alpha}")

  def weigh(gramian, losses, state):
    del losses
    return solve_fairgrad(gramian, alpha, max_iter), state

  return Method("fairgrad", num_tasks, GRAMIAN, init=lambda params: EmptyState(), weigh=weigh,
                specific="weighted")
