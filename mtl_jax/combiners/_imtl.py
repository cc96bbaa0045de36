"""IMTL: impartial multi-task learning (IMTL-G, IMTL-L, hybrid).

Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning", ICLR 2021
(openreview IMPnRXEWpvr). No official code; reference implementations: the ``IMTLG`` class of the
Nash-MTL repository (IMTL-G) and LibMTL's ``IMTL`` (the hybrid).

IMTL-G (``mode='gradient'``, default): weights ``a`` (summing to 1) such that the update
``d = sum_k a_k g_k`` has equal projections on every unit task gradient ``u_k = g_k/||g_k||``.
With ``D_i = g_1 - g_i`` and ``U_i = u_1 - u_i`` (i = 2..K): ``a_{2:K} = (g_1 U^T)(D U^T)^{-1}``,
``a_1 = 1 - sum a_{2:K}``. Every inner product is an entry of the Gramian
(``g_a . u_b = G_ab / sqrt(G_bb)``), so this is an exact Gramian weighting.

IMTL-L (``mode='loss'``): each loss becomes ``exp(s_k) L_k - s_k`` with learnable scales ``s``
(zeros at start); the weights are ``exp(s)``. The paper learns ``s`` by gradient descent jointly
with the network; here ``s`` lives in the combiner state and takes one gradient step per update,
``s <- s - loss_scale_lr * (exp(s) L - 1)`` (the exact gradient of the scaled loss w.r.t. ``s``).
Hybrid (``mode='hybrid'``, LibMTL's IMTL): IMTL-G applied to the scaled gradients
``exp(s_k) g_k`` (Gramian ``E G E``), weights ``a * exp(s)`` on the original gradients.

Hyper-parameters: ``mode='gradient'``, ``loss_scale_lr=1e-3``.
Task-specific parameters: ``specific='weighted'`` (the Nash-MTL repository back-propagates
``sum_k a_k L_k``; LibMTL gives heads their unweighted gradient instead).
Deviations: ``s`` is updated by plain gradient descent in the state with its own learning rate
(the paper and LibMTL put it in the model's optimiser). IMTL-G's weights are computed from the
equivalent Jacobi-scaled system ``C b = 1`` (see :func:`imtl_g_weights`; the same unique solution
as the paper's formula when the Gramian is non-singular): in float32 the paper's unscaled
``(K-1) x (K-1)`` solve leaves projections unequal by up to 1e-2 ``||d||`` at K=40 with gradient
norms spread over 1e4; ours, 4e-6 ``||d||`` (rounding the exact weights to float32 alone gives
2e-6; ``tests/test_kkt.py``). When the Gramian is singular the paper's formula is used; where its
``D U^T`` is singular too the Nash-MTL code adds ``1e-8 I``, we use the least-squares
(pseudo-inverse) solution instead, and a task with a zero gradient gets ``u_k = 0``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.combiners.base import GRAMIAN, LOSSES, Method, register

MODES = ("gradient", "loss", "hybrid")


class IMTLState(NamedTuple):
  log_scale: jax.Array  # (K,) s: the IMTL-L loss scales are exp(s)


def imtl_g_weights(gramian: jax.Array) -> jax.Array:
  """IMTL-G weights (sum to 1): ``d = sum a_k g_k`` has equal projections on every ``u_k``.

  The equal-projection conditions ``u_k . d = c`` read ``D^-1 G a = c 1`` (``D = diag(||g_k||)``),
  so for a non-singular Gramian the unique solution is ``a = D^-1 b / sum(D^-1 b)`` with
  ``C b = 1`` on the unit-diagonal ``C = D^-1 G D^-1``: the paper's closed form, solved on the
  Jacobi-scaled system (one LU and a step of iterative refinement) so that gradient norms spread
  over decades do not degrade it. Where that system is singular (a zero gradient, parallel or
  opposite gradients, more tasks than dimensions) the paper's ``(K-1) x (K-1)`` formula is used
  with a least-squares fallback (:func:`_paper_weights`).
  """
  g = jnp.asarray(gramian, jnp.float32)
  k = g.shape[0]
  if k == 1:
    return jnp.ones((1,), jnp.float32)
  g = 0.5 * (g + g.T)
  n = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0))
  live = jnp.all(n > 0) & jnp.all(jnp.isfinite(g))
  n_safe = jnp.where(n > 0, n, 1.0)
  eye = jnp.eye(k, dtype=g.dtype)
  c = jnp.where(eye > 0, 1.0, g / (n_safe[:, None] * n_safe[None, :]))
  one = jnp.ones((k,), jnp.float32)
  lu = jax.scipy.linalg.lu_factor(c)
  b = jax.scipy.linalg.lu_solve(lu, one)
  b = b + jax.scipy.linalg.lu_solve(lu, one - c @ b)  # iterative refinement
  a = b / n_safe
  a = a / jnp.sum(a)
  ok = live & jnp.all(jnp.isfinite(a)) & (jnp.max(jnp.abs(c @ b - one)) <= 1e-3)
  return jax.lax.cond(ok, lambda: a, lambda: _paper_weights(g, n))


def _paper_weights(g, n):
  """The paper's formula ``a_{2:K} = (g_1 U^T)(D U^T)^{-1}`` (pseudo-inverse if singular)."""
  inv_n = jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)
  gu = g * inv_n[None, :]  # gu[a, b] = g_a . u_b
  first = gu[0, 0] - gu[0, 1:]  # g_1 . (u_1 - u_j)
  # (D U^T)_{ij} = (g_1 - g_i) . (u_1 - u_j), i, j = 2..K
  dut = (gu[0, 0] - gu[0, 1:][None, :]) - (gu[1:, 0][:, None] - gu[1:, 1:])
  # a_ = first @ inv(dut)  <=>  dut^T a_ = first
  sol = jnp.linalg.solve(dut.T, first)
  fallback = jnp.linalg.pinv(dut.T) @ first
  sol = jnp.where(jnp.all(jnp.isfinite(sol)) & (jnp.abs(jnp.linalg.det(dut)) > 0), sol, fallback)
  return jnp.concatenate([1.0 - jnp.sum(sol, keepdims=True), sol])


@register("imtl")
def imtl(num_tasks: int, mode: str = "gradient", loss_scale_lr: float = 1e-3) -> Method:
  """IMTL (Liu et al. 2021): IMTL-G by default, IMTL-L / hybrid by ``mode``. See the module doc."""
  if mode not in MODES:
    raise ValueError(f"imtl: unknown mode {mode!r}; valid: {', '.join(MODES)}")
  k = num_tasks
  lr = float(loss_scale_lr)

  def init(params):
    del params
    return IMTLState(jnp.zeros((k,), jnp.float32))

  def step_scales(s, losses):
    return s - lr * (jnp.exp(s) * losses - 1.0)

  def weigh(gramian, losses, state):
    s = state.log_scale
    if mode == "gradient":
      return imtl_g_weights(gramian), state
    e = jnp.exp(s)
    new = IMTLState(step_scales(s, losses))
    if mode == "loss":
      return e, new
    return imtl_g_weights(gramian * e[:, None] * e[None, :]) * e, new

  needs = LOSSES if mode == "loss" else GRAMIAN
  return Method("imtl", k, needs, init=init, weigh=weigh, specific="weighted")
