"""GradNorm: learn loss weights that equalise the tasks' weighted gradient norms."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax.combiners.base import GRAMIAN, Method, register

_TINY = 1e-12
_MIN_WEIGHT = 1e-6


class GradNormState(NamedTuple):
  weights: jax.Array  # (K,) the learned loss weights w_i(t), summing to K
  initial_losses: jax.Array  # (K,) L_i(0), recorded at the first step
  started: jax.Array  # bool: whether ``initial_losses`` has been recorded
  opt: Any  # the internal Adam state for ``weights``


def gradnorm_loss_grad(weights, grad_norms, losses, initial_losses, alpha):
  """``d L_grad / d w`` with ``L_grad = sum_i | w_i ||g_i|| - mean_j(w_j ||g_j||) r_i^alpha |``.

  ``r_i = Ltilde_i / mean_j Ltilde_j`` with ``Ltilde_i = L_i(t) / L_i(0)`` (the inverse training
  rate). The target ``mean_j(w_j ||g_j||) r_i^alpha`` is a constant (Chen et al. 2018, sec. 3.2),
  so the gradient is ``sign(G_i - target_i) ||g_i||``.
  """
  l0 = jnp.where(jnp.abs(initial_losses) > _TINY, initial_losses, _TINY)
  ratio = jnp.maximum(losses / l0, 0.0)
  mean_ratio = jnp.mean(ratio)
  r = jnp.where(mean_ratio > _TINY, ratio / jnp.maximum(mean_ratio, _TINY), 1.0)
  g = weights * grad_norms
  target = jax.lax.stop_gradient(jnp.mean(g) * r ** alpha)
  return jax.grad(lambda w: jnp.sum(jnp.abs(w * grad_norms - target)))(weights)


def renormalise(weights, k):
  """Positive weights summing to K (the paper renormalises after every update)."""
  w = jnp.maximum(weights, _MIN_WEIGHT)
  return k * w / jnp.sum(w)


@register("gradnorm")
def gradnorm(num_tasks: int, alpha: float = 1.5, weight_lr: float = 0.025) -> Method:
  """GradNorm: learned loss weights whose gradients match a common, rate-adjusted norm.

  Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
  Balancing in Deep Multitask Networks", ICML 2018 (no official code; LibMTL's ``GradNorm`` is
  the reference implementation).

  At step t the model descends ``sum_i w_i(t) L_i``; the weights then take one step on
  ``L_grad = sum_i |G_i - Gbar r_i^alpha|`` with ``G_i = w_i ||grad_W L_i||``,
  ``Gbar = mean_i G_i`` and ``r_i = (L_i(t)/L_i(0)) / mean_j (L_j(t)/L_j(0))``, the target held
  constant, and are renormalised to sum to K. ``L_i(0)`` is the loss of the first step (recorded
  in the state). The norms come from the Gramian, ``||grad_W L_i|| = sqrt(G_ii)``
  (``needs='gramian'``); only its diagonal is used.

  Hyper-parameters: ``alpha=1.5`` (the paper's NYUv2 value, LibMTL's default);
  ``weight_lr=0.025`` (ours: the paper trains ``w`` with "the" optimizer and states no rate;
  LibMTL puts its weight parameters in the model's optimizer). The weights are trained by an
  internal Adam (betas 0.9/0.999, eps 1e-8), which makes the step size independent of the
  gradient norms' scale.

  Deviations and choices:
  * W: the paper takes the last shared layer; here (as in LibMTL) all *shared* parameters, i.e.
    the Gramian's shared mask. Pass a ``shared_mask`` selecting the last shared layer to the
    engine/transform to get the paper's choice.
  * Parametrisation: the paper's raw weights, clamped at 1e-6 and renormalised to sum K after each
    step (LibMTL uses ``K softmax(s)`` instead and equal weights during the first epoch).
  * ``L(0)``: the first step's losses (LibMTL: the mean loss of the first epoch).
  * Losses are assumed positive: ``L(0)`` near 0 is replaced by 1e-12, negative loss ratios are
    clamped to 0 (so a task whose loss turned negative gets the smallest target), and if all
    ratios vanish every ``r_i`` is 1.
  The weights used at step t are those before the step, as in LibMTL.
  Task-specific parameters: ``w_i g_i`` (``specific='weighted'``): the paper's total loss
  ``sum_i w_i L_i`` trains the heads too (LibMTL gives heads their unweighted gradient).
  """
  if not weight_lr > 0:
    raise ValueError(f"gradnorm: weight_lr must be > 0, got {weight_lr}")
  if not alpha >= 0:
    raise ValueError(f"gradnorm: alpha must be >= 0, got {alpha}")
  adam = optax.adam(weight_lr, b1=0.9, b2=0.999, eps=1e-8)

  def init(params):
    del params
    w = jnp.ones((num_tasks,), jnp.float32)
    return GradNormState(w, jnp.ones((num_tasks,), jnp.float32), jnp.zeros((), jnp.bool_),
                         adam.init(w))

  def weigh(gramian, losses, state):
    losses = jnp.asarray(losses, jnp.float32)
    l0 = jnp.where(state.started, state.initial_losses, losses)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gramian).astype(jnp.float32), 0.0))
    grad = gradnorm_loss_grad(state.weights, norms, losses, l0, alpha)
    step, opt = adam.update(grad, state.opt, state.weights)
    new_w = renormalise(optax.apply_updates(state.weights, step), num_tasks)
    return state.weights, GradNormState(new_w, l0, jnp.ones((), jnp.bool_), opt)

  return Method("gradnorm", num_tasks, GRAMIAN, init=init, weigh=weigh)
