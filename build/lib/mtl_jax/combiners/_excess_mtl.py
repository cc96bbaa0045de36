"""ExcessMTL (He et al. 2024): robust task weighting by estimated excess risks."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.combiners.base import JACOBIAN, Method, register
from mtl_jax.combiners._moco import (_rows, combine_rows, per_task_zeros, shared_map,
                                    shared_update)


class ExcessMTLState(NamedTuple):
  grad_sum: Any  # tree: (K, *leaf.shape) accumulated squared gradients at shared leaves
  initial_w: jax.Array  # (K,) excess-risk estimates of the first step
  loss_weight: jax.Array  # (K,) current task weights (sum K)
  started: jax.Array  # bool: the first step has been taken


@register("excess_mtl")
def excess_mtl(num_tasks: int, robust_step_size: float = 1e-2) -> Method:
  """ExcessMTL.

  He, Y., Zhou, S., Zhang, G., Yun, H., Xu, Y., Zeng, B., Chilimbi, T. & Zhao, H. (2024). "Robust
  Multi-Task Learning with Excess Risks". ICML 2024. Official code: github.com/yifei-he/ExcessMTL
  (``LibMTL/weighting/ExcessMTL.py``; also in LibMTL).

  The excess risk of task k is estimated by a second-order expansion with a diagonal Hessian
  approximated AdaGrad-style from the accumulated squared gradients:
  ``S_k <- S_k + g_k^2``, ``e_k = sum_p g_kp^2 / sqrt(S_kp + 1e-7)``. On the first step the
  estimates are stored (``e^0``) and the weights stay 1; afterwards the weights are updated
  multiplicatively (exponentiated gradient ascent on the excess risks, normalised by the first
  estimates) and renormalised to sum to K:
  ``w <- K * normalise(w * exp(robust_step_size * e / e^0))``. The update is ``sum_k w_k g_k``.

  Hyper-parameters (official default): ``robust_step_size=1e-2``.

  Task-specific parameters: ``specific='weighted'``: the official code back-propagates
  ``sum_k w_k L_k``, so heads receive ``w_k g_k``.

  Deviations: (1) the multiplicative update is computed as ``K * softmax(log w + eta e / e^0)``,
  the same number without overflow; (2) a task whose first estimate ``e^0_k`` is zero (zero shared
  gradient on the first step) gets ratio 0 instead of the official NaN/inf.
  """
  k = num_tasks

  def init(params, shared_mask=None):
    return ExcessMTLState(per_task_zeros(params, shared_mask, k), jnp.zeros((k,), jnp.float32),
                          jnp.ones((k,), jnp.float32), jnp.zeros((), bool))

  def aggregate(jac, losses, state):
    del losses
    grad_sum = shared_map(lambda j, s: s + j.astype(jnp.float32)**2, jac, state.grad_sum)
    e = sum(jnp.sum(_rows(j)**2 / jnp.sqrt(_rows(s) + 1e-7), axis=1)
            for j, s in zip(jax.tree.leaves(jac, is_leaf=lambda x: x is None),
                            jax.tree.leaves(grad_sum, is_leaf=lambda x: x is None))
            if j is not None)
    initial = jnp.where(state.started, state.initial_w, e)
    ratio = jnp.where(initial > 0, e / jnp.where(initial > 0, initial, 1.0), 0.0)
    stepped = k * jax.nn.softmax(jnp.log(state.loss_weight) + robust_step_size * ratio)
    weight = jnp.where(state.started, stepped, state.loss_weight)
    update = shared_update(lambda j: combine_rows(weight, j), jac)
    return update, weight, ExcessMTLState(grad_sum, initial, weight, jnp.ones((), bool))

  return Method("excess_mtl", k, JACOBIAN, init=init, aggregate=aggregate, specific="weighted")
