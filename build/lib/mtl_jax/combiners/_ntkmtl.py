"""NTKMTL: task balancing by the tasks' neural-tangent-kernel eigenvalues (the n = 1 variant).

Qin, Wang, Liao, Yan, "NTKMTL: Mitigating Task Imbalance in Multi-Task Learning from Neural Tangent
Kernel Perspective", NeurIPS 2025 (arXiv:2510.18258). Official code: github.com/jianke0604/NTKMTL (``methods/weight_methods.py``, ``NTKMTL``),
whose default (the README's "NTKMTL", ``n = 1``) we implement.

With ``n = 1`` sample per task the NTK of task ``k`` degenerates to the scalar ``G_kk = ||g_k||^2``
and the weights are ``w_k = (tr(G) / G_kk)^ntk_exp``: slow tasks (small NTK eigenvalue, i.e. small
gradient) get more weight. The shared update is ``K sum_k w_k g_k`` (the official ``overwrite_grad``
multiplies by K "to match the sum loss"), then clipped to global norm ``max_norm`` (the official
``clip_grad_norm_`` on the shared parameters, after the update is written); here the clip is a
scale on the weights: ``||K sum_k w_k g_k|| = K sqrt(w^T G w)``.

Hyper-parameters: ``ntk_exp=0.5`` (the official default and the paper's square root; the official
NYUv2 script uses 0.75), ``max_norm=1.0`` (official; ``<= 0``: no clipping). Task-specific
parameters: ``specific='sum'`` (the official code back-propagates each task's loss into its own
head unweighted and overwrites only the shared gradient).

Not implemented: NTKMTL-SR (``n > 1``: the largest eigenvalue of each task's per-sample NTK on
``n`` sub-batches, w.r.t. the shared representation); it needs per-sample Jacobians, which the
combiner contract does not carry. Deviation: a task with an exactly zero gradient gets weight 0
(officially ``tr/0 = inf`` and a NaN update).
"""

from __future__ import annotations

import jax.numpy as jnp

from mtl_jax.combiners.base import GRAMIAN, EmptyState, Method, register


def ntk_weights(gramian, ntk_exp=0.5):
  """``(tr(G) / G_kk)^ntk_exp``, 0 for a zero gradient."""
  g = jnp.asarray(gramian, jnp.float32)
  d = jnp.diagonal(g)
  ratio = jnp.trace(g) / jnp.where(d > 0, d, 1.0)
  return jnp.where(d > 0, ratio**ntk_exp, 0.0)


def clip_weights(weights, gramian, max_norm):
  """Scale ``weights`` so that ``||sum_k w_k g_k|| <= max_norm`` (no-op for ``max_norm <= 0``)."""
  if max_norm <= 0:
    return weights
  norm = jnp.sqrt(jnp.maximum(weights @ gramian @ weights, 0.0))
  return weights * jnp.minimum(1.0, max_norm / (norm + 1e-6))  # torch's clip_grad_norm_


@register("ntkmtl")
def ntkmtl(num_tasks: int, ntk_exp: float = 0.5, max_norm: float = 1.0) -> Method:
  """NTKMTL (n = 1, as the official default). See the module docstring."""
  if not ntk_exp >= 0:
    raise ValueError(f"ntkmtl: ntk_exp must be >= 0, got {ntk_exp}")
  k = num_tasks

  def weigh(gramian, losses, state):
    del losses
    w = float(k) * ntk_weights(gramian, float(ntk_exp))
    return clip_weights(w, jnp.asarray(gramian, jnp.float32), float(max_norm)), state

  return Method("ntkmtl", k, GRAMIAN, init=lambda params: EmptyState(), weigh=weigh,
                specific="sum")
