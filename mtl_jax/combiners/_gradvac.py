"""GradVac: Gradient Vaccine, as an exact weighting in Gramian space.

Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task Optimization
in Massively Multilingual Models", ICLR 2021 (arXiv:2010.05874). No official code was released;
the reference implementation is LibMTL's ``GradVac`` (``GradVac_beta=0.5``,
``GradVac_group_type=0``), which we follow.

For every task ``i``, visiting the other tasks ``j`` in a random order, with ``pc_i`` starting at
``g_i`` and ``rho_ij = cos(pc_i, g_j)`` (norms plus 1e-8 as in LibMTL): if ``rho_ij < phi_ij``
(the EMA target), ``pc_i += g_j * ||pc_i|| (phi_ij sqrt(1 - rho_ij^2) - rho_ij sqrt(1 - phi_ij^2))
/ (||g_j|| sqrt(1 - phi_ij^2) + 1e-8)``; then always ``phi_ij <- (1 - beta) phi_ij + beta rho_ij``.
The update is ``sum_i pc_i``. As for PCGrad, every ``pc_i`` is a combination of the task gradients,
so all of this runs on a K x K coefficient matrix with the Gramian; the EMA targets ``phi``
(K x K, zeros at start as in LibMTL) and the PRNG key (uint32 key data) live in the state.

Hyper-parameters: ``beta=0.5`` (LibMTL's default; the paper's experiments use 1e-2), ``seed``.
Task-specific parameters: ``specific='sum'`` (LibMTL: heads get their own unweighted gradient).
Deviations: only LibMTL's ``group_type=0`` (whole model) is provided: per-layer groups need one
Gramian per layer, which the weighting contract does not carry. ``1 - phi^2`` and ``1 - rho^2`` are
clamped at 0 before the square root (float rounding can make them slightly negative).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.combiners.base import GRAMIAN, Method, register
from mtl_jax.combiners._pcgrad import new_key_data, split_key_data, task_orders


class GradVacState(NamedTuple):
  phi: jax.Array  # (K, K) EMA targets of the cosine similarities
  key: jax.Array  # uint32 key data


def gradvac_coefficients(gramian, phi, orders, beta):
  """``(C, new_phi)``: ``pc_i = sum_j C_ij g_j`` after the vaccine, and the updated targets."""
  g = jnp.asarray(gramian, jnp.float32)
  k = g.shape[0]
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0))

  def one(i, order, phi_i):
    def visit(carry, j):
      c, phi_row = carry
      pc_norm = jnp.sqrt(jnp.maximum(c @ g @ c, 0.0))
      rho = (c @ g[:, j]) / (pc_norm * norms[j] + 1e-8)
      target = phi_row[j]
      s_rho = jnp.sqrt(jnp.maximum(1.0 - rho**2, 0.0))
      s_tgt = jnp.sqrt(jnp.maximum(1.0 - target**2, 0.0))
      w = pc_norm * (target * s_rho - rho * s_tgt) / (norms[j] * s_tgt + 1e-8)
      c = c + jnp.where(rho < target, w, 0.0) * jax.nn.one_hot(j, k, dtype=c.dtype)
      phi_row = phi_row.at[j].set((1.0 - beta) * target + beta * rho)
      return (c, phi_row), None

    (c, phi_row), _ = jax.lax.scan(visit, (jax.nn.one_hot(i, k, dtype=jnp.float32), phi_i), order)
    return c, phi_row

  return jax.vmap(one)(jnp.arange(k), orders, phi)


@register("gradvac")
def gradvac(num_tasks: int, beta: float = 0.5, seed: int = 0) -> Method:
  """GradVac (Wang et al. 2021) as an exact Gramian weighting. See the module docstring."""
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"gradvac: beta must be in [0, 1], got {beta}")
  k = num_tasks

  def init(params):
    del params
    return GradVacState(jnp.zeros((k, k), jnp.float32), new_key_data(seed))

  def weigh(gramian, losses, state):
    del losses
    data, key = split_key_data(state.key)
    if k == 1:
      return jnp.ones((1,), jnp.float32), GradVacState(state.phi, data)
    c, phi = gradvac_coefficients(gramian, state.phi, task_orders(key, k, include_self=False),
                                  float(beta))
    return jnp.sum(c, axis=0), GradVacState(phi, data)

  return Method("gradvac", k, GRAMIAN, init=init, weigh=weigh, specific="sum")
