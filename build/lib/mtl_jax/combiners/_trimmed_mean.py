"""Trimmed mean: the coordinate-wise mean of the task gradients without their extremes.

Yin, Chen, Kannan, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates", ICML 2018. Reference implementation: TorchJD's ``TrimmedMean`` aggregator
(github.com/TorchJD/torchjd, ``aggregation/_trimmed_mean.py``), which we follow.

For every scalar of a shared parameter the K task values are sorted, the ``trim_number`` largest and
the ``trim_number`` smallest are dropped and the remaining ``K - 2 trim_number`` are averaged.
Coordinate-wise, so it needs the Jacobian (``needs='jacobian'``).

Hyper-parameters: ``trim_number=1`` (TorchJD has no default; 1 is the smallest that trims). TorchJD
requires ``K >= 2 trim_number + 1``; we raise likewise, except that K = 1 gives the one task's
gradient (TorchJD raises). Task-specific parameters: ``specific='sum'`` (TorchJD's ``mtl_backward``
gives the heads their own task's gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.combiners.base import JACOBIAN, EmptyState, Method, register


def trimmed_mean_leaf(jac, trim_number):
  """``jac`` (K, ...): the mean over K of the sorted values ``trim_number .. K - trim_number``."""
  k = jac.shape[0]
  s = jnp.sort(jac, axis=0)
  return jnp.mean(s[trim_number:k - trim_number], axis=0)


@register("trimmed_mean")
def trimmed_mean(num_tasks: int, trim_number: int = 1) -> Method:
  """Trimmed mean (Yin et al. 2018) as in TorchJD. See the module docstring."""
  k = num_tasks
  t = int(trim_number)
  if t < 0:
    raise ValueError(f"trimmed_mean: trim_number must be >= 0, got {trim_number}")
  if k > 1 and k < 2 * t + 1:
    raise ValueError(f"trimmed_mean: needs num_tasks >= 2 * trim_number + 1, got "
                     f"num_tasks={k}, trim_number={t}")
  t_eff = 0 if k == 1 else t

  def aggregate(jac, losses, state):
    del losses
    upd = jax.tree.map(lambda j: trimmed_mean_leaf(j, t_eff), jac)
    return upd, jnp.ones((k,), jnp.float32), state

  return Method("trimmed_mean", k, JACOBIAN, init=lambda params: EmptyState(),
                aggregate=aggregate, specific="sum")
