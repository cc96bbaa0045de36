"""CAGrad: conflict-averse gradient descent.

Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021
(arXiv:2110.14048). Official code: github.com/Cranial-XIX/CAGrad; the same routine is the
``CAGrad`` class of the Nash-MTL repository (``c=0.4``, ``rescale=1``), and LibMTL's
(``calpha=0.5``, ``rescale=1``).

The update maximises the worst task improvement in a ball around the average gradient ``g0``:
``max_d min_i <g_i, d>`` s.t. ``||d - g0|| <= c ||g0||``. Its dual (what the official code solves
with scipy's SLSQP) is ``min_{w in simplex} w^T G b + c ||g0|| sqrt(w^T G w + 1e-8)`` with
``b = 1/K``, ``||g0|| = sqrt(mean(G) + 1e-8)``; then ``g_w = sum_k w_k g_k`` and
``d = g0 + (c ||g0|| / (||g_w|| + 1e-8)) g_w``, divided by ``1 + c^2`` (``rescale=1``), ``1 + c``
(``rescale=2``) or not (``rescale=0``). The Nash-MTL repository finally multiplies by K ("to match
the sum loss"): ``sum_scale=True`` (default here, the weights then sum to about K like ``ls``);
``False`` gives LibMTL's scale. So the weights are
``(1/K + lambda w) * (K if sum_scale) / rescale``.

The dual is solved inside jit by accelerated projected gradient on the simplex (FISTA with
backtracking and restart, ``max_iter`` iterations), on the Gramian scaled to unit trace (the
minimiser is scale-free up to the 1e-8 constants); official: scipy SLSQP from uniform weights.

Hyper-parameters: ``c=0.4``, ``rescale=1``, ``sum_scale=True``, ``max_iter=250``.
Task-specific parameters: ``specific='sum'`` (the official code back-propagates each task's loss
into its own head unweighted and only overwrites the shared gradients).
Deviations: the inner solver (above); the 1e-8 constants are applied on the trace-normalised Gramian
(the official ones are absolute, so they matter only for gradients of norm ~1e-4 and below).
"""

from __future__ import annotations

import jax.numpy as jnp

from mtl_jax.combiners.base import GRAMIAN, EmptyState, Method, register
from mtl_jax.combiners._mgda import simplex_minimize

RESCALES = (0, 1, 2)


def cagrad_weights(gramian, c: float = 0.4, rescale: int = 1, iters: int = 250):
  """Weights ``v`` with ``d = sum_k v_k g_k`` the (rescaled, not K-scaled) CAGrad update, and ``w``."""
  g = jnp.asarray(gramian, jnp.float32)
  k = g.shape[0]
  tr = jnp.trace(g) / k
  g = jnp.where(tr > 0, g / jnp.where(tr > 0, tr, 1.0), g)
  b = jnp.full((k,), 1.0 / k, jnp.float32)
  g0_norm = jnp.sqrt(jnp.maximum(jnp.mean(g), 0.0) + 1e-8)
  cc = c * g0_norm + 1e-8

  def obj(w):
    return w @ g @ b + cc * jnp.sqrt(jnp.maximum(w @ g @ w, 0.0) + 1e-8)

  lip0 = jnp.maximum(jnp.max(jnp.diagonal(g)), 1e-6) * 2.0
  w = simplex_minimize(obj, b, iters, lip0) if k > 1 else jnp.ones((1,), jnp.float32)
  gw_norm = jnp.sqrt(jnp.maximum(w @ g @ w, 0.0))
  lmbda = cc / (gw_norm + 1e-8)
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
  k = num_tasks
  scale = float(k) if sum_scale else 1.0

  def weigh(gramian, losses, state):
    del losses
    v, _ = cagrad_weights(gramian, float(c), int(rescale), int(max_iter))
    return scale * v, state

  return Method("cagrad", k, GRAMIAN, init=lambda params: EmptyState(), weigh=weigh,
                specific="sum")
