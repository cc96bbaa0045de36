"""Fast adaptive multitask optimisation (FAMO)."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax.combiners.base import LOSSES, Method, register

_SHIFT = 1e-8  # the official code's ``+ 1e-8`` inside the logs


class FAMOState(NamedTuple):
  logits: jax.Array  # (K,) w: the task weights are z = softmax(w)
  opt: Any  # the internal Adam (with L2 weight decay) state for ``logits``
  prev_losses: jax.Array  # (K,) the losses of the previous step
  has_prev: jax.Array  # bool: whether ``prev_losses`` holds a real step


def shifted(losses, min_losses):
  """``D_k = L_k - L_k^* + 1e-8``, clamped to ``>= 1e-8`` (FAMO assumes ``L_k > L_k^*``)."""
  return jnp.maximum(jnp.asarray(losses, jnp.float32) - min_losses + _SHIFT, _SHIFT)


def famo_weights(logits, losses, min_losses):
  """Gradient multipliers of ``sum_k z_k log D_k / c`` with ``c = sum_k z_k / D_k`` held fixed.

  ``w_k = (z_k / D_k) / sum_j (z_j / D_j)``: positive, summing to 1.
  """
  z = jax.nn.softmax(logits)
  a = z / shifted(losses, min_losses)
  return a / jnp.sum(a)


def logits_grad(logits, prev_losses, curr_losses, min_losses):
  """The FAMO logit gradient: ``J_softmax(w)^T delta`` with ``delta_k = log D_k(prev) - log D_k(curr)``.

  ``delta`` is the decrease of each log-loss over the last step; the Adam step *descends* along
  this vector, as the official code does, moving weight toward the tasks that improved least.
  """
  delta = (jnp.log(shifted(prev_losses, min_losses))
           - jnp.log(shifted(curr_losses, min_losses)))
  _, vjp = jax.vjp(jax.nn.softmax, logits)
  return vjp(delta)[0]


@register("famo")
def famo(num_tasks: int, gamma: float = 0.001, w_lr: float = 0.025,
         min_losses=None) -> Method:
  """FAMO: balance the rate at which every task's log-loss decreases, in O(1) per step.

  Liu, Liang, Chen, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023; official
  code github.com/Cranial-XIX/FAMO (``methods/weight_methods.py``, ``FAMO``).

  Step ``t``: with ``z = softmax(w)`` and ``D_k = L_k - L_k^* + 1e-8``, the model descends
  ``sum_k z_k log D_k / c`` with ``c = sum_k z_k / D_k`` held constant, i.e. the task gradients
  are weighted by ``w_k = (z_k / D_k) / c`` (sum to 1). Then the logits take one Adam step
  (learning rate ``w_lr``, torch-style L2 weight decay ``gamma``) along
  ``J_softmax(w)^T (log D(t) - log D(t+1))``.

  Hyper-parameters, official names: ``gamma=0.001`` (the value of the paper's and the official
  ``run.sh`` for CelebA, NYUv2 and QM9; the class default is 1e-5, CityScapes uses 0.01),
  ``w_lr=0.025`` (``--method-params-lr``), ``min_losses`` (``L^*``, default zeros, as
  ``set_min_losses`` is never called by the official trainers).

  Deviations:
  * The official trainer re-evaluates the losses on the *same* batch after the model step and
    calls ``update(curr_loss)``. An optax transformation only sees each step's losses, so the
    "after" losses of step ``t`` are the losses of step ``t + 1`` on its own batch: the logits
    are updated at the start of the next call, before its weights are computed (the weights used
    at each step are the same function of the history as in the official code, only the batch of
    the "after" loss differs; no extra forward pass is spent). The first call has no previous
    step and uses ``z = softmax(0)``.
  * The official ``WeightMethod.backward`` calls ``clip_grad_norm_(shared, max_norm)`` *before*
    ``loss.backward()``, so it clips nothing; there is no ``max_norm`` here (chain
    ``optax.clip_by_global_norm`` if you want clipping).
  * ``D_k`` is clamped to ``>= 1e-8``: FAMO assumes ``L_k > L_k^*`` (non-negative losses with the
    default ``L^* = 0``); a loss below ``L^*`` would make the official log ``nan``.
  Task-specific parameters: ``w_k g_k`` (``specific='weighted'``), as in the official code.
  """
  if not w_lr > 0:
    raise ValueError(f"famo: w_lr must be > 0, got {w_lr}")
  if not gamma >= 0:
    raise ValueError(f"famo: gamma must be >= 0, got {gamma}")
  lstar = (jnp.zeros((num_tasks,), jnp.float32)
           if min_losses is None else jnp.asarray(min_losses, jnp.float32))
  if lstar.shape != (num_tasks,):
    raise ValueError(f"famo: min_losses has shape {lstar.shape}, expected ({num_tasks},)")
  # torch.optim.Adam(weight_decay=gamma) adds gamma * w to the gradient before the moments.
  opt = optax.chain(optax.add_decayed_weights(gamma), optax.adam(w_lr, b1=0.9, b2=0.999, eps=1e-8))

  def init(params):
    del params
    w = jnp.zeros((num_tasks,), jnp.float32)
    return FAMOState(w, opt.init(w), jnp.zeros((num_tasks,), jnp.float32),
                     jnp.zeros((), jnp.bool_))

  def weigh(gramian, losses, state):
    del gramian
    losses = jnp.asarray(losses, jnp.float32)
    grad = logits_grad(state.logits, state.prev_losses, losses, lstar)
    step, new_opt = opt.update(grad, state.opt, state.logits)
    logits = jnp.where(state.has_prev, optax.apply_updates(state.logits, step), state.logits)
    new_opt = jax.tree.map(lambda n, o: jnp.where(state.has_prev, n, o), new_opt, state.opt)
    w = famo_weights(logits, losses, lstar)
    return w, FAMOState(logits, new_opt, losses, jnp.ones((), jnp.bool_))

  return Method("famo", num_tasks, LOSSES, init=init, weigh=weigh)
