"""Uncertainty weighting (UW): learned homoscedastic task log-variances."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax.combiners.base import LOSSES, Method, register


class UWState(NamedTuple):
  logsigma: jax.Array  # (K,) s_k = log sigma_k^2, the learned log-variances
  opt: Any  # the internal Adam's state for ``logsigma``


def uw_objective(logsigma: jax.Array, losses: jax.Array) -> jax.Array:
  """``sum_k 0.5 (exp(-s_k) L_k + s_k)``: Kendall et al.'s Gaussian likelihood, s = log sigma^2."""
  return jnp.sum(0.5 * (jnp.exp(-logsigma) * losses + logsigma))


def uw_weights(logsigma: jax.Array) -> jax.Array:
  """``d objective / d L_k = 0.5 exp(-s_k) = 1 / (2 sigma_k^2)``."""
  return 0.5 * jnp.exp(-logsigma)


@register("uw")
def uw(num_tasks: int, method_params_lr: float = 0.025, logsigma_init: float = 0.0) -> Method:
  """Uncertainty weighting: ``sum_k L_k / (2 sigma_k^2) + log sigma_k`` with learned ``sigma_k``.

  Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
  Geometry and Semantics", CVPR 2018. Parametrised, as in the official Nash-MTL code
  (``Uncertainty``, after the authors' notebook), by ``s_k = log sigma_k^2``:
  ``0.5 (exp(-s_k) L_k + s_k)`` for every task (the paper's classification variant
  ``L / sigma^2`` is not used by either official code). At fixed losses the optimum is
  ``sigma_k^2 = L_k``, i.e. the weight ``1 / (2 L_k)``.

  The weights returned are the exact multipliers of each task's gradient,
  ``w_k = 0.5 exp(-s_k)`` (the Nash-MTL code logs ``exp(-s)`` and notes it is "not exactly task
  weights"); they are taken at the current ``s`` and then ``s`` takes one step.

  Design: the ``s_k`` are trainable parameters; a combiner cannot add parameters to the model, so
  they live in the combiner state and are trained there by their exact gradient
  ``0.5 (1 - exp(-s_k) L_k)`` with an internal Adam (betas 0.9/0.999, eps 1e-8, like the
  official code's torch Adam) of learning rate ``method_params_lr``. This is the official
  arrangement: Nash-MTL trains ``logsigma`` in a separate Adam parameter group with
  ``--method-params-lr`` (default 0.025), initialised at ``logsigma_init=0`` (LibMTL uses -0.5).
  Deviation: the official parameter group also follows the model's StepLR schedule (halving every
  100 epochs); the internal rate here is constant. The state (s and the Adam moments)
  checkpoints with the combiner.

  UW assumes non-negative losses (negative log-likelihoods up to a constant): with ``L_k < 0`` the
  objective is unbounded below in ``s_k`` and ``s_k`` decreases without limit (weights grow by
  ``exp(lr)`` per step at most), as in the official code. A zero loss drives ``s_k`` down too.
  Task-specific parameters: ``w_k g_k`` (``specific='weighted'``), as in the official code.
  """
  if not method_params_lr > 0:
    raise ValueError(f"uw: method_params_lr must be > 0, got {method_params_lr}")
  adam = optax.adam(method_params_lr, b1=0.9, b2=0.999, eps=1e-8)

  def init(params):
    del params
    s = jnp.full((num_tasks,), logsigma_init, jnp.float32)
    return UWState(s, adam.init(s))

  def weigh(gramian, losses, state):
    del gramian
    losses = jnp.asarray(losses, jnp.float32)
    w = uw_weights(state.logsigma)
    grad = jax.grad(uw_objective)(state.logsigma, losses)
    step, opt = adam.update(grad, state.opt, state.logsigma)
    return w, UWState(optax.apply_updates(state.logsigma, step), opt)

  return Method("uw", num_tasks, LOSSES, init=init, weigh=weigh)
