"""GradDrop: gradient sign dropout.

Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, "Just Pick a Sign: Optimizing Deep
Multitask Models with Gradient Sign Dropout", NeurIPS 2020 (arXiv:2010.06808). No official code was
released; the reference implementation is LibMTL's ``GradDrop`` (``leak=0.0``).

For every scalar of a shared parameter, with task gradients ``g_k``: the positive sign purity
``P = (1 + sum_k g_k / (sum_k |g_k| + 1e-7)) / 2`` (``f`` = identity, as in the paper's experiments
and LibMTL), ``U ~ Uniform(0, 1)`` drawn per scalar, mask
``M_k = [P > U] [g_k > 0] + [P < U] [g_k < 0]``, and the update
``sum_k (leak_k + (1 - leak_k) M_k) g_k``. ``leak`` is one number for all tasks (LibMTL) or K numbers
(the paper's per-task leak ``l_k``; ``l_k = 1`` lets task k's gradient through unmasked).

It needs the Jacobian (``needs='jacobian'``): the masks are elementwise, nothing a Gramian can
express. The uniform noise comes from a PRNG key in the state (uint32 key data).
Task-specific parameters: ``specific`` weights of ones, their own unweighted gradient (LibMTL).
Deviation: the paper (and LibMTL, with ``rep_grad=True``) applies GradDrop to the gradients w.r.t.
a shared *activation* (summed over the batch) and back-propagates the masked gradient through the
encoder; as an optax transform we apply it to the per-task gradients of the shared *parameters*
(LibMTL's behaviour with ``rep_grad=False``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.combiners.base import JACOBIAN, Method, register
from mtl_jax.combiners._pcgrad import new_key_data, split_key_data


class GradDropState(NamedTuple):
  key: jax.Array  # uint32 key data


def graddrop_leaf(jac: jax.Array, uniform: jax.Array, leak: jax.Array) -> jax.Array:
  """GradDrop of one leaf: ``jac`` (K, ...) per-task gradients, ``uniform`` (...) noise."""
  purity = 0.5 * (1.0 + jnp.sum(jac, axis=0) / (jnp.sum(jnp.abs(jac), axis=0) + 1e-7))
  mask = ((purity > uniform)[None] & (jac > 0)) | ((purity < uniform)[None] & (jac < 0))
  leak = leak.reshape((-1,) + (1,) * (jac.ndim - 1)).astype(jac.dtype)
  return jnp.sum((leak + (1.0 - leak) * mask.astype(jac.dtype)) * jac, axis=0)


@register("graddrop")
def graddrop(num_tasks: int, leak=0.0, seed: int = 0) -> Method:
  """GradDrop (Chen et al. 2020) on the shared parameters' gradients. See the module docstring."""
  k = num_tasks
  leak_arr = jnp.broadcast_to(jnp.asarray(leak, jnp.float32), (k,))
  if not (jnp.all(leak_arr >= 0) and jnp.all(leak_arr <= 1)):
    raise ValueError(f"graddrop: leak must be in [0, 1] (one number or K numbers), got {leak}")

  def init(params):
    del params
    return GradDropState(new_key_data(seed))

  def aggregate(jac, losses, state):
    del losses
    data, key = split_key_data(state.key)
    leaves, treedef = jax.tree.flatten(jac)  # None leaves (task-specific) are dropped
    keys = jax.random.split(key, max(len(leaves), 1))
    out = [
        graddrop_leaf(j, jax.random.uniform(kk, j.shape[1:], jnp.float32), leak_arr)
        for j, kk in zip(leaves, keys)
    ]
    return jax.tree.unflatten(treedef, out), jnp.ones((k,), jnp.float32), GradDropState(data)

  return Method("graddrop", k, JACOBIAN, init=init, aggregate=aggregate, specific="sum")
