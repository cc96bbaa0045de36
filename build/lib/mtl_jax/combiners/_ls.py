"""Linear scalarisation (equal weighting)."""

import jax.numpy as jnp

from mtl_jax.combiners.base import LOSSES, EmptyState, Method, register


@register("ls")
def ls(num_tasks: int, weights=None) -> Method:
  """Linear scalarisation: ``sum_k w_k L_k`` with fixed weights (default all ones).

  The baseline of every MTL paper ("LS" in Nash-MTL, "EW" in LibMTL). The official Nash-MTL code
  sums the losses (weights 1), which we follow; pass ``weights`` for a fixed non-uniform mix.
  Needs only the losses: one backward pass.
  """
  w = jnp.ones((num_tasks,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  if w.shape != (num_tasks,):
    raise ValueError(f"ls: weights has shape {w.shape}, expected ({num_tasks},)")

  def weigh(gramian, losses, state):
    del gramian, losses
    return w, state

  return Method("ls", num_tasks, LOSSES, init=lambda params: EmptyState(), weigh=weigh)
