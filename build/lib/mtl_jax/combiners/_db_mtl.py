"""DB-MTL (Lin et al. 2023): dual balancing of loss scales and gradient magnitudes."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.combiners.base import JACOBIAN, Method, register
from mtl_jax.combiners._moco import (_rows, combine_rows, per_task_zeros, row_scale, shared_map,
                                    shared_update)


class DBMTLState(NamedTuple):
  buffer: Any  # tree: (K, *leaf.shape) EMA of the log-loss gradients at shared leaves
  step: jax.Array  # int32


@register("db_mtl")
def db_mtl(num_tasks: int, beta: float = 0.9, beta_sigma: float = 0.0) -> Method:
  """Dual-Balancing Multi-Task Learning.

  Lin, B., Jiang, W., Ye, F., Zhang, Y., Chen, P., Chen, Y.-C., Liu, S. & Kwok, J. T. (2023).
  "Dual-Balancing for Multi-Task Learning". arXiv:2308.12029. Official code: LibMTL ``DB_MTL``
  (the authors' library).

  Loss-scale balancing: each task uses the gradient of ``log(L_k + 1e-8)``, i.e.
  ``g_k / (L_k + 1e-8)``. Gradient-magnitude balancing: an EMA of those gradients
  ``m_k <- lg_k + beta_t (m_k - lg_k)``, ``beta_t = beta / t^beta_sigma`` (m from 0, t from 1), is
  rescaled to the largest norm: ``update = sum_k (max_j ||m_j|| / (||m_k|| + 1e-8)) m_k``.

  The EMA of gradients needs per-parameter state, so DB-MTL is a Jacobian method (pass the shared
  mask to the transform so ``init`` allocates the buffers for the shared leaves only).

  Hyper-parameters (LibMTL defaults): ``beta=0.9``, ``beta_sigma=0``.

  Task-specific parameters: each head receives the gradient of its own ``log(L_k + 1e-8)``, i.e.
  ``g_k / (L_k + 1e-8)`` (LibMTL back-propagates the log losses and overwrites only the shared
  gradient); the returned specific weights are ``1 / (L_k + 1e-8)``.

  Deviations: none. Like the official code this assumes non-negative losses (``log`` of a
  negative loss is NaN there; here the factor ``1 / (L_k + 1e-8)`` is used as is).
  """
  k = num_tasks

  def init(params, shared_mask=None):
    return DBMTLState(per_task_zeros(params, shared_mask, k), jnp.zeros((), jnp.int32))

  def aggregate(jac, losses, state):
    step = state.step + 1
    beta_t = beta / step.astype(jnp.float32)**beta_sigma
    inv = 1.0 / (losses + 1e-8)
    buf = shared_map(lambda j, m: (lambda lg: lg + beta_t * (m - lg))(row_scale(inv, j)),
                     jac, state.buffer)
    norms = jnp.sqrt(sum(jnp.sum(_rows(b)**2, axis=1)
                         for j, b in zip(jax.tree.leaves(jac, is_leaf=lambda x: x is None),
                                         jax.tree.leaves(buf, is_leaf=lambda x: x is None))
                         if j is not None))
    alpha = jnp.max(norms) / (norms + 1e-8)
    update = shared_update(lambda j, m: combine_rows(alpha, m).astype(j.dtype), jac, buf)
    return update, inv.astype(jnp.float32), DBMTLState(buf, step)

  return Method("db_mtl", k, JACOBIAN, init=init, aggregate=aggregate, specific="weighted")
