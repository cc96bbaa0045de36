"""Krum and Multi-Krum: Byzantine-robust selection of task gradients, as a Gramian weighting.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent", NeurIPS 2017. Reference implementation: TorchJD's ``Krum`` aggregator
(``KrumWeighting``, github.com/TorchJD/torchjd, ``aggregation/_krum.py``), which we follow.

With ``f = n_byzantine`` and pairwise distances ``d_ij = ||g_i - g_j||`` (from the Gramian:
``d_ij^2 = G_ii + G_jj - 2 G_ij``), the score of task ``i`` is the sum of its ``K - f - 2``
smallest distances to the *other* tasks; the ``n_selected`` tasks with the smallest scores get
weight ``1 / n_selected``, the others 0 (``n_selected=1``: Krum, more: Multi-Krum). Ties go to
the lower task index.

Hyper-parameters: ``n_byzantine=0`` (TorchJD has no default; 0 is the largest value valid down to
K = 3, the contract's smallest K above 1), ``n_selected=1`` (TorchJD's default). TorchJD requires
``K >= n_byzantine + 3`` and ``K >= n_selected``; we raise likewise, except that K = 1 gives the one
task's gradient (weight 1; TorchJD raises). Task-specific parameters: ``specific='sum'`` (TorchJD's
``mtl_backward`` gives the heads their own task's gradient). Deviation: squared distances are
clamped at 0 before the square root (float rounding can make them slightly negative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.combiners.base import GRAMIAN, EmptyState, Method, register


def krum_scores(gramian, n_byzantine):
  """(K,) Krum scores: the sum of each task's ``K - f - 2`` smallest distances to the others."""
  g = jnp.asarray(gramian, jnp.float32)
  k = g.shape[0]
  sq = jnp.diagonal(g)
  dist = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0))
  dist = jnp.where(jnp.eye(k, dtype=bool), jnp.inf, dist)  # never one's own neighbour
  n_closest = k - n_byzantine - 2
  smallest = -jax.lax.top_k(-dist, n_closest)[0]
  return jnp.sum(smallest, axis=1)


def krum_weights(gramian, n_byzantine=0, n_selected=1):
  scores = krum_scores(gramian, n_byzantine)
  _, idx = jax.lax.top_k(-scores, n_selected)
  return jnp.sum(jax.nn.one_hot(idx, scores.shape[0], dtype=jnp.float32), axis=0) / n_selected


@register("krum")
def krum(num_tasks: int, n_byzantine: int = 0, n_selected: int = 1) -> Method:
  """Krum / Multi-Krum (Blanchard et al. 2017) as in TorchJD. See the module docstring."""
  k = num_tasks
  f, m = int(n_byzantine), int(n_selected)
  if f < 0:
    raise ValueError(f"krum: n_byzantine must be >= 0, got {n_byzantine}")
  if m < 1:
    raise ValueError(f"krum: n_selected must be >= 1, got {n_selected}")
  if k > 1 and (k < f + 3 or k < m):
    raise ValueError(f"krum: needs num_tasks >= n_byzantine + 3 and >= n_selected, got "
                     f"num_tasks={k}, n_byzantine={f}, n_selected={m}")

  def weigh(gramian, losses, state):
    del losses
    if k == 1:
      return jnp.ones((1,), jnp.float32), state
    return krum_weights(gramian, f, m), state

  return Method("krum", k, GRAMIAN, init=lambda params: EmptyState(), weigh=weigh,
                specific="sum")
