"""PCGrad: projecting conflicting gradients, as an exact weighting in Gramian space.

Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning", NeurIPS 2020
(arXiv:2001.06782). Reference implementations: the Nash-MTL repository's ``PCGrad`` (a modification
of github.com/WeiChengTseng/Pytorch-PCGrad) and LibMTL.

For every task ``i`` the official code copies ``g_i`` and, visiting the *original* task gradients
``g_j`` in a fresh random order (``random.shuffle`` of the whole list, ``j = i`` included), replaces
``pc_i <- pc_i - (pc_i . g_j / ||g_j||^2) g_j`` whenever ``pc_i . g_j < 0``; the update is
``sum_i pc_i`` (``reduction='sum'``, the Nash-MTL repository's default) or their mean. Every
``pc_i`` stays in the span of the task gradients, ``pc_i = sum_j C_ij g_j``, and each projection
needs only inner products, so we run the same procedure on the coefficient matrix ``C`` (K x K)
using the Gramian: ``pc_i . g_j = (C G)_ij``. The weights are ``1^T C`` (or ``/ K``), exact, and the
engine's Gramian path needs no K x P Jacobian.

The random orders come from a PRNG key carried in the state (raw ``uint32`` key data, so the state
checkpoints); ``seed`` sets the first key. Task-specific parameters: ``specific='sum'`` (the official
code sets them from ``losses.sum()``). Deviation: a task with an exactly zero gradient is never
projected on (the official code would divide by zero).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.combiners.base import GRAMIAN, Method, register

REDUCTIONS = ("sum", "mean")


class PCGradState(NamedTuple):
  key: jax.Array  # uint32 key data


def new_key_data(seed: int) -> jax.Array:
  return jax.random.key_data(jax.random.key(int(seed)))


def split_key_data(data: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(next_state_key_data, typed_key_for_this_step)``."""
  key, sub = jax.random.split(jax.random.wrap_key_data(data))
  return jax.random.key_data(key), sub


def task_orders(key: jax.Array, k: int, include_self: bool = True) -> jax.Array:
  """(K, K or K-1) int: an independent random order of the tasks for every task ``i``."""
  perms = jax.vmap(lambda kk: jax.random.permutation(kk, k))(jax.random.split(key, k))
  if include_self:
    return perms
  # drop i from row i, keeping the order of the rest
  keep = perms != jnp.arange(k)[:, None]
  order = jnp.argsort(~keep, axis=1, stable=True)[:, :k - 1]
  return jnp.take_along_axis(perms, order, axis=1)


def pcgrad_coefficients(gramian: jax.Array, orders: jax.Array) -> jax.Array:
  """C (K x K) with ``pc_i = sum_j C_ij g_j`` after PCGrad's projections in the given orders."""
  g = jnp.asarray(gramian, jnp.float32)
  k = g.shape[0]
  sq = jnp.diagonal(g)

  def one(i, order):
    def visit(c, j):
      dot = c @ g[:, j]
      hit = (dot < 0) & (sq[j] > 0)
      c = c - jnp.where(hit, dot / jnp.where(sq[j] > 0, sq[j], 1.0), 0.0) * jax.nn.one_hot(
          j, k, dtype=c.dtype)
      return c, None

    c, _ = jax.lax.scan(visit, jax.nn.one_hot(i, k, dtype=jnp.float32), order)
    return c

  return jax.vmap(one)(jnp.arange(k), orders)


@register("pcgrad")
def pcgrad(num_tasks: int, reduction: str = "sum", seed: int = 0) -> Method:
  """PCGrad (Yu et al. 2020) as an exact Gramian weighting. See the module docstring."""
  if reduction not in REDUCTIONS:
    raise ValueError(f"pcgrad: unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
  k = num_tasks

  def init(params):
    del params
    return PCGradState(new_key_data(seed))

  def weigh(gramian, losses, state):
    del losses
    data, key = split_key_data(state.key)
    c = pcgrad_coefficients(gramian, task_orders(key, k))
    w = jnp.sum(c, axis=0)
    if reduction == "mean":
      w = w / k
    return w, PCGradState(data)

  return Method("pcgrad", k, GRAMIAN, init=init, weigh=weigh, specific="sum")
