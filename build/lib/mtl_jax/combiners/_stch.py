"""Smooth Tchebycheff scalarisation (STCH) for multi-task learning."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.combiners.base import LOSSES, Method, register

_SHIFT = 1e-20  # the official code's ``+ 1e-20`` inside the logs
_FLOOR = 1e-30  # losses are clamped here before dividing (finite weights for zero losses)


class STCHState(NamedTuple):
  step: jax.Array  # int32: steps seen, saturating at ``warmup_steps``
  loss_sum: jax.Array  # (K,) sum of the losses over the averaging steps
  nadir: jax.Array  # (K,) the nadir vector: the mean loss over the averaging steps


def stch_weights(losses, nadir, mu):
  """Gradient multipliers of ``K mu logsumexp(log(L_k / n_k + 1e-20) / mu)``.

  ``w_k = K softmax(u / mu)_k / (L_k + 1e-20 n_k)`` with ``u_k = log(L_k / n_k + 1e-20)``.
  """
  l = jnp.maximum(losses, _FLOOR)
  u = jnp.log(l / nadir + _SHIFT)
  return losses.shape[0] * jax.nn.softmax(u / mu) / (l + _SHIFT * nadir)


def log_weights(losses):
  """Warm-up: the gradient multipliers of ``sum_k log(L_k + 1e-20)``."""
  return 1.0 / (jnp.maximum(losses, _FLOOR) + _SHIFT)


@register("stch")
def stch(num_tasks: int, mu: float = 1.0, warmup_steps: int = 0,
         nadir_steps: int = 0) -> Method:
  """Smooth Tchebycheff scalarisation of the log-normalised losses.

  Lin, Zhang, Chen, Zhang, Liu, "Smooth Tchebycheff Scalarization for Multi-Objective
  Optimization", ICML 2024; official MTL code github.com/Xi-L/STCH (``STCH_MTL``, a LibMTL fork,
  ``weighting/STCH.py``), also in LibMTL.

  The paper's ``mu log sum_k exp(lambda_k (f_k - z_k) / mu)`` smooths the Tchebycheff
  ``max_k lambda_k (f_k - z_k)``; the official MTL code applies it to ``log(L_k / n_k)`` (the ideal
  point is the log-space origin, i.e. loss 0; ``n`` the nadir vector, uniform preference), scaled
  by K: ``K mu logsumexp(log(L / n + 1e-20) / mu)``. As ``mu -> 0`` it becomes ``K max_k
  log(L_k / n_k)``: the weight concentrates on the task with the largest normalised loss.

  Warm-up, as official but in steps: for the first ``warmup_steps`` steps the objective is
  ``sum_k log(L_k + 1e-20)`` (weights ``1 / L_k``) and over the last ``nadir_steps`` of them the
  losses are averaged; that mean is the nadir vector. The official code counts epochs: with
  ``STCH_warmup_epoch=4``, epochs 0-3 use the log objective, epoch 4 uses it too while averaging
  the losses, and STCH starts at epoch 5; for E steps per epoch that is ``warmup_steps = 5 E``,
  ``nadir_steps = E``. Defaults:
  ``mu=1.0`` (``--STCH_mu``); ``warmup_steps=0``, ``nadir_steps=0`` (ours: the library does not
  know the epoch length): no warm-up and a nadir of ones, i.e. STCH on ``log L``.
  With ``warmup_steps > 0`` and ``nadir_steps = 0`` the nadir stays at ones after the warm-up.

  Weights: ``w_k = K softmax(u / mu)_k / (L_k + 1e-20 n_k)``, ``u_k = log(L_k / n_k + 1e-20)``,
  the exact gradient multipliers of the official objective (the official code returns a
  placeholder vector of ones as its "weights"). STCH assumes positive losses: losses are clamped
  to ``>= 1e-30`` so a zero or negative loss gives a large finite weight instead of the
  official ``inf``/``nan``. Task-specific parameters: ``w_k g_k`` (``specific='weighted'``), as
  in the official code.
  """
  if not mu > 0:
    raise ValueError(f"stch: mu must be > 0, got {mu}")
  warmup_steps, nadir_steps = int(warmup_steps), int(nadir_steps)
  if warmup_steps < 0 or not 0 <= nadir_steps <= warmup_steps:
    raise ValueError(
        f"stch: need 0 <= nadir_steps <= warmup_steps, got nadir_steps={nadir_steps}, "
        f"warmup_steps={warmup_steps}")

  def init(params):
    del params
    return STCHState(jnp.zeros((), jnp.int32), jnp.zeros((num_tasks,), jnp.float32),
                     jnp.ones((num_tasks,), jnp.float32))

  def weigh(gramian, losses, state):
    del gramian
    losses = jnp.asarray(losses, jnp.float32)
    warm = state.step < warmup_steps
    averaging = warm & (state.step >= warmup_steps - nadir_steps)
    loss_sum = state.loss_sum + jnp.where(averaging, losses, 0.0)
    last = state.step == warmup_steps - 1
    nadir = jnp.where(last & (nadir_steps > 0), loss_sum / max(nadir_steps, 1), state.nadir)
    w = jnp.where(warm, log_weights(losses), stch_weights(losses, state.nadir, mu))
    step = jnp.minimum(state.step + 1, warmup_steps)
    return w, STCHState(step, loss_sum, nadir)

  return Method("stch", num_tasks, LOSSES, init=init, weigh=weigh)
