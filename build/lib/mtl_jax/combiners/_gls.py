"""Geometric loss strategy (GLS): minimise the geometric mean of the task losses."""

import jax.numpy as jnp

from mtl_jax.combiners.base import LOSSES, EmptyState, Method, register
from mtl_jax.combiners._si import positive


def geometric_weights(losses: jnp.ndarray, eps: float) -> jnp.ndarray:
  """``d/dL_k (prod_j L_j)^(1/K) = (prod_j L_j)^(1/K) / (K L_k)``, computed in log space."""
  l = positive(losses, eps)
  k = l.shape[0]
  geo = jnp.exp(jnp.mean(jnp.log(l)))
  return geo / (k * l)


@register("gls")
def gls(num_tasks: int, eps: float = 1e-8) -> Method:
  """Geometric loss strategy: ``L = (prod_k L_k)^(1/K)``.

  Chennupati, Sistu, Yogamani, Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
  Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019. No official code; LibMTL's
  ``GLS`` (the reference implementation) back-propagates ``prod(L) ** (1/K)``.

  As a weighting: ``w_k = (prod_j L_j)^(1/K) / (K L_k)``, the exact gradient of the geometric mean
  (one backward of ``sum w_k L_k``). Computed in log space (``exp(mean log L)``), so it neither
  under- nor overflows for large K, where the literal product does (LibMTL computes ``prod``
  directly, which is 0 or inf in float32 for K=40 losses far from 1).
  Same direction as SI (both are ``grad L_k / L_k`` up to a common positive factor); GLS keeps the
  overall scale of the losses.

  Hyper-parameters: none in the paper. ``eps`` (ours, 1e-8): losses are clamped to ``>= eps``
  (GLS assumes positive losses; a zero loss would otherwise zero every weight, and a negative one
  makes the root undefined). Task-specific parameters: ``w_k g_k`` (``specific='weighted'``),
  as in LibMTL.
  """
  if not eps > 0:
    raise ValueError(f"gls: eps must be > 0, got {eps}")

  def weigh(gramian, losses, state):
    del gramian
    return geometric_weights(losses, eps), state

  return Method("gls", num_tasks, LOSSES, init=lambda params: EmptyState(), weigh=weigh)
