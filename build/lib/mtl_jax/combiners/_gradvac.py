"""GradVac: Gradient Vaccine, whole-model (an exact Gramian weighting) or per layer / matrix.

Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task Optimization
in Massively Multilingual Models", ICLR 2021 (arXiv:2010.05874). No official code was released;
the reference implementation is LibMTL's ``GradVac`` (``GradVac_beta=0.5``,
``GradVac_group_type`` 0 / 1 / 2 = ``group`` 'all' / 'layer' / 'matrix'), which we follow.

For every task ``i``, visiting the other tasks ``j`` in a random order, with ``pc_i`` starting at
``g_i`` and ``rho_ij = cos(pc_i, g_j)`` (norms plus 1e-8 as in LibMTL): if ``rho_ij < phi_ij``
(the EMA target), ``pc_i += g_j * ||pc_i|| (phi_ij sqrt(1 - rho_ij^2) - rho_ij sqrt(1 - phi_ij^2))
/ (||g_j|| sqrt(1 - phi_ij^2) + 1e-8)``; then always ``phi_ij <- (1 - beta) phi_ij + beta rho_ij``.
The update is ``sum_i pc_i``. As for PCGrad, every ``pc_i`` is a combination of the task gradients,
so all of this runs on a K x K coefficient matrix with the Gramian; the EMA targets ``phi``
(K x K, zeros at start as in LibMTL) and the PRNG key (uint32 key data) live in the state.

Hyper-parameters: ``beta=0.5`` (LibMTL's default; the paper's experiments use 1e-2), ``seed``,
``group='all'`` (LibMTL's default ``GradVac_group_type=0``).
Task-specific parameters: ``specific='sum'`` (LibMTL: heads get their own unweighted gradient).
Groups (``group``, LibMTL's ``GradVac_group_type``; the paper's per-layer variant): ``'all'``
(``0``, the whole shared model, the default) is the Gramian weighting above. ``'layer'`` (``1``:
every innermost module with parameters; here every innermost dict of the parameter tree, e.g. a
flax ``Dense_0`` with its ``kernel`` and ``bias``) and ``'matrix'`` (``2``: every parameter tensor;
here every shared leaf) run the same vaccine independently on each group's slice of the gradients,
with one target matrix ``phi`` per group and, as in LibMTL, one random task order per task ``i``
shared by all groups: the update of a group's leaves is ``sum_i pc_i`` restricted to that group.
Each group has its own coefficients, so these need the Jacobian (``needs='jacobian'``: one K x K
Gramian per group from the held rows, then one weighted sum per leaf).
Deviations: ``1 - phi^2`` and ``1 - rho^2`` are clamped at 0 before the square root (float rounding
can make them slightly negative).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.combiners.base import (GRAMIAN, JACOBIAN, Method, gramian_of, register,
                                    weighted_sum)
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


GROUPS = ("all", "layer", "matrix")


def leaf_groups(tree, group: str) -> tuple[list, int]:
  """(group index of every non-None leaf of ``tree`` in flatten order, number of groups).

  ``'matrix'``: every leaf its own group; ``'layer'``: leaves under the same parent dict together.
  """
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  keys = [tuple(p) if group == "matrix" else tuple(p[:-1]) for p in paths]
  index = {}
  for key in keys:
    index.setdefault(key, len(index))
  return [index[key] for key in keys], len(index)


def grouped_gradvac(jac, phi, orders, beta, group):
  """GradVac per group of shared leaves: ``(update tree, new phi (n_groups, K, K))``."""
  leaves, treedef = jax.tree.flatten(jac)  # None leaves (task-specific) are dropped
  ids, n = leaf_groups(jac, group)
  members = [[j for j, i in zip(leaves, ids) if i == g] for g in range(n)]
  grams = [gramian_of(m, [True] * len(m)) for m in members]
  coeffs, phi = jax.vmap(gradvac_coefficients, in_axes=(0, 0, None, None))(
      jnp.stack(grams), phi, orders, beta)
  weights = jnp.sum(coeffs, axis=1)  # (n_groups, K)
  out = [weighted_sum(weights[i], j) for j, i in zip(leaves, ids)]
  return jax.tree.unflatten(treedef, out), phi


@register("gradvac")
def gradvac(num_tasks: int, beta: float = 0.5, seed: int = 0, group: str = "all") -> Method:
  """GradVac (Wang et al. 2021): exact Gramian weighting (``group='all'``) or per layer / matrix.

  See the module docstring.
  """
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"gradvac: beta must be in [0, 1], got {beta}")
  if group not in GROUPS:
    raise ValueError(f"gradvac: unknown group {group!r}; valid: {', '.join(GROUPS)}")
  k = num_tasks
  if group != "all":
    return _grouped(k, float(beta), int(seed), group)

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


def _grouped(k, beta, seed, group):
  """The Jacobian form of GradVac for ``group`` in ``('layer', 'matrix')``."""

  def init(params, shared_mask=None):
    shared = params if shared_mask is None else jax.tree.map(
        lambda p, m: p if m else None, params, shared_mask)
    _, n = leaf_groups(shared, group)
    return GradVacState(jnp.zeros((n, k, k), jnp.float32), new_key_data(seed))

  def aggregate(jac, losses, state):
    del losses
    data, key = split_key_data(state.key)
    if k == 1:
      upd = jax.tree.map(lambda j: j[0], jac)
      return upd, jnp.ones((1,), jnp.float32), GradVacState(state.phi, data)
    orders = task_orders(key, k, include_self=False)
    upd, phi = grouped_gradvac(jac, state.phi, orders, beta, group)
    return upd, jnp.ones((k,), jnp.float32), GradVacState(phi, data)

  return Method("gradvac", k, JACOBIAN, init=init, aggregate=aggregate, specific="sum")
