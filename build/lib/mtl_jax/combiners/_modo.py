"""MoDo: multi-objective gradient descent with double sampling.

Chen, Fernando, Ying, Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
Generalization and Conflict-Avoidance", NeurIPS 2023 (arXiv:2305.20057), Algorithm 1. Official code:
github.com/heshandevaka/Trade-Off-MOL (``LibMTL/weighting/MoDo.py``); LibMTL's ``MoDo`` (which we
follow for the defaults) modifies it.

State: the weights ``lambda`` on the simplex, uniform at start. Each step, with stochastic
Jacobians ``J_1, J_2, J_3`` of three independent samples,
``lambda <- Proj_simplex(lambda - gamma (J_1 J_2^T lambda + rho lambda))`` and the update is
``J_3^T lambda`` (``sum_k lambda_k g_k``), with the new ``lambda``.

One batch: the combiner sees the Jacobian of one batch, so here ``J_1 = J_2 = J_3 = J`` and the
``lambda`` step uses the Gramian ``G = J J^T``: ``lambda <- Proj(lambda - gamma (G + rho I)
lambda)``. This is the paper's update with the three samples equal: ``J J^T`` is a *biased*
estimate of ``E[J] E[J]^T`` (the paper's reason for double sampling); the bias is the batch
covariance of the gradients and shrinks as the batch grows. Splitting the batch in three would need
the engine to hand a combiner three Jacobians (or the cross-Gramian ``J_1 J_2^T``), which the
combiner contract does not carry.

Hyper-parameters (LibMTL's defaults): ``gamma=1e-3`` (``MoDo_gamma``; the official docstring says
0.1), ``rho=0.1`` (``MoDo_rho``). Task-specific parameters: ``specific='sum'`` (LibMTL gives each
head the mean over the three batches of its own unweighted gradient: with one batch, that gradient).
Deviations: the single-batch estimate above; the official code's model update uses
``J_1 + J_2`` (two samples), LibMTL's a third sample: both are ``J`` here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.combiners.base import GRAMIAN, Method, register
from mtl_jax.combiners._mgda import project_simplex


class MoDoState(NamedTuple):
  lambd: jax.Array  # (K,) on the simplex


def modo_step(lambd, gramian, gamma, rho):
  """One MoDo step of ``lambda`` with ``J_1 J_2^T = gramian``."""
  g = jnp.asarray(gramian, jnp.float32)
  return project_simplex(lambd - gamma * (g @ lambd + rho * lambd))


@register("modo")
def modo(num_tasks: int, gamma: float = 1e-3, rho: float = 0.1) -> Method:
  """MoDo (Chen et al., NeurIPS 2023) on one batch. See the module docstring."""
  if not gamma > 0:
    raise ValueError(f"modo: gamma must be > 0, got {gamma}")
  if not rho >= 0:
    raise ValueError(f"modo: rho must be >= 0, got {rho}")
  k = num_tasks

  def init(params):
    del params
    return MoDoState(jnp.full((k,), 1.0 / k, jnp.float32))

  def weigh(gramian, losses, state):
    del losses
    lambd = modo_step(state.lambd, gramian, float(gamma), float(rho))
    return lambd, MoDoState(lambd)

  return Method("modo", k, GRAMIAN, init=init, weigh=weigh, specific="sum")
