"""Random loss weighting (RLW)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.combiners.base import LOSSES, Method, register


class RLWState(NamedTuple):
  key: jax.Array  # uint32[2], a raw PRNG key: split once per step


@register("rlw")
def rlw(num_tasks: int, seed: int = 0) -> Method:
  """Random loss weighting: ``w = softmax(z)``, ``z ~ N(0, I_K)`` drawn afresh at every step.

  Lin, Ye, Xu, Zhang, Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
  Multi-Task Learning", TMLR 2022. The paper studies several sampling distributions; its
  recommended and officially implemented one (LibMTL ``RLW``, Nash-MTL ``RLW``) is the softmax of a
  standard normal sample, which is what this is: the weights are positive and sum to 1.

  The randomness is explicit: the state holds a raw ``uint32[2]`` PRNG key derived from ``seed``
  (ours, default 0), split once per step, so a run is reproducible from the seed and the state
  checkpoints like any other array. Under ``shard_map`` every device holds the same key and draws
  the same weights. The losses are not used (RLW ignores them); a skipped (non-finite) step keeps
  the key, so the next step redraws the same weights.
  Task-specific parameters: ``w_k g_k`` (``specific='weighted'``), as in the official code.
  """

  def init(params):
    del params
    return RLWState(jax.random.PRNGKey(seed))

  def weigh(gramian, losses, state):
    del gramian, losses
    key, sub = jax.random.split(state.key)
    w = jax.nn.softmax(jax.random.normal(sub, (num_tasks,), jnp.float32))
    return w, RLWState(key)

  return Method("rlw", num_tasks, LOSSES, init=init, weigh=weigh)
