"""Dynamic weight average (DWA), with a window of steps in place of epochs."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.combiners.base import LOSSES, Method, register

_TINY = 1e-12


class DWAState(NamedTuple):
  costs: jax.Array  # (2 * iteration_window, K) float32: the last losses, oldest first
  count: jax.Array  # int32: steps seen, saturating at 2 * iteration_window


def loss_ratio(costs: jax.Array, window: int) -> jax.Array:
  """Mean loss of the newer window over the mean of the older one (task by task)."""
  old = jnp.mean(costs[:window], axis=0)
  new = jnp.mean(costs[window:], axis=0)
  safe = jnp.where(jnp.abs(old) > _TINY, old, jnp.where(old < 0, -_TINY, _TINY))
  return new / safe


def dwa_weights(ratio: jax.Array, temp: float) -> jax.Array:
  """``lambda_k = K exp(r_k / T) / sum_j exp(r_j / T)`` (Liu et al. 2019, eq. 7)."""
  return ratio.shape[0] * jax.nn.softmax(ratio / temp)


@register("dwa")
def dwa(num_tasks: int, iteration_window: int = 25, temp: float = 2.0) -> Method:
  """Dynamic weight average: weights from the rate at which each loss goes down.

  Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019 (MTAN), eq. 7:
  ``lambda_k(t) = K exp(r_k(t-1) / T) / sum_i exp(r_i(t-1) / T)`` with
  ``r_k(t-1) = L_k(t-1) / L_k(t-2)`` the ratio of the average losses of the last two *epochs*,
  and ``lambda_k = 1`` for the first two epochs.

  A combiner sees steps, not epochs, so this follows the official Nash-MTL code
  (``DynamicWeightAverage``): the losses of the last ``2 * iteration_window`` steps are kept, and
  the ratio is the mean over the newest ``iteration_window`` steps (including the current one) over
  the mean of the ``iteration_window`` before them. Hyper-parameters, official names and defaults:
  ``iteration_window=25``, ``temp=2.0`` (the paper's T).

  Deviations from the Nash-MTL code, both documented choices:
  * That code fills its loss buffer with ones and starts weighting after ``iteration_window + 1``
    steps, so for a while the "older window" mixes placeholder ones with real losses and the ratio
    depends on the losses' scale. Here the weights stay 1 until ``2 * iteration_window`` real
    losses exist: the paper's "1 for the first two epochs", with windows for epochs.
  * That code returns weights summing to K but then takes ``mean(w * L)``, a global factor 1/K.
    Here the weights are the paper's (sum to K); the factor is a learning-rate rescaling (and is
    invisible to Adam).
  DWA assumes positive losses; a zero older mean is replaced by a tiny number of the same sign, so
  the weights stay finite (softmax saturates). Task-specific parameters: ``w_k g_k``
  (``specific='weighted'``), as in the official codes.
  """
  window = int(iteration_window)
  if window < 1:
    raise ValueError(f"dwa: iteration_window must be >= 1, got {iteration_window}")
  if not temp > 0:
    raise ValueError(f"dwa: temp must be > 0, got {temp}")

  def init(params):
    del params
    return DWAState(jnp.ones((2 * window, num_tasks), jnp.float32), jnp.zeros((), jnp.int32))

  def weigh(gramian, losses, state):
    del gramian
    costs = jnp.concatenate(
        [state.costs[1:], jnp.asarray(losses, jnp.float32)[None]], axis=0)
    count = jnp.minimum(state.count + 1, 2 * window)  # saturates: no overflow on long runs
    full = count >= 2 * window
    w = jnp.where(full, dwa_weights(loss_ratio(costs, window), temp),
                  jnp.ones((num_tasks,), jnp.float32))
    return w, DWAState(costs, count)

  return Method("dwa", num_tasks, LOSSES, init=init, weigh=weigh)
