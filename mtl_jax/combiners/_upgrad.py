"""UPGrad (Quinton & Rey 2024): average of each task gradient projected onto the dual cone."""

import jax.numpy as jnp

from mtl_jax.combiners._qp import dual_cone_weights, pref_weights
from mtl_jax.combiners.base import GRAMIAN, EmptyState, Method, register


@register("upgrad")
def upgrad(num_tasks: int, pref_vector=None, norm_eps: float = 1e-4) -> Method:
  """Unconflicting Projection of Gradients.

  Quinton, P. & Rey, V. (2024). "Jacobian Descent for Multi-Objective Optimization".
  arXiv:2406.16232. Official code: TorchJD, ``torchjd.aggregation.UPGrad`` / ``UPGradWeighting``.

  Each task gradient ``g_i`` is projected onto the dual cone of the rows of the shared Jacobian
  ``{x : J x >= 0}``, and the projections are combined with the preference vector ``p``:
  ``update = sum_i p_i pi_J(g_i)``. In the Gramian, ``pi_J(p_i g_i) = J^T v_i`` with
  ``v_i = argmin_{v >= p_i e_i} v^T G v``, so the weights are ``w = sum_i v_i`` (a weighting:
  the engine's Gramian path applies). The update has a non-negative inner product with every task
  gradient (``G w >= 0``, the KKT conditions), is the mean gradient when there is no conflict, and
  is invariant to scaling all gradients by ``c > 0`` up to the factor ``c``.

  Hyper-parameters (TorchJD defaults): ``pref_vector=None`` (the mean, 1/K each),
  ``norm_eps=1e-4`` (a Gramian with trace below it is treated as 0). TorchJD's ``reg_eps`` (a
  ridge ``reg_eps I`` on the trace-normalised Gramian, so that ``quadprog`` gets a positive
  definite matrix) has no counterpart: our solver needs no ridge and returns the exact projection
  (see :func:`mtl_jax.combiners._qp.dual_cone_weights`).

  Task-specific parameters: ``specific='sum'``, each receives its own task's unweighted gradient,
  as TorchJD's ``mtl_backward`` does.

  More tasks than parameters (singular Gramian): the non-conflict promise holds to float32's
  resolution, ``cos(g_k, d) >= -50 eps S / ||d||`` with ``S = sum_j |w_j| |g_j|``, and an update
  below that resolution is returned as exactly 0 (see
  :func:`mtl_jax.combiners._qp.dual_cone_weights`).

  Deviations: TorchJD solves each QP with ``quadprog`` in float64 on the host; here
  :func:`mtl_jax.combiners._qp.box_qp` (FISTA + active-set polish) solves the K problems together in
  float32 inside ``jit``, and returns the exact projection rather than the one for the ridged
  Gramian TorchJD returns (``G w >= -4e-7 ||d|| ||g_k||`` and each ``v_i^T G v_i`` within 3e-7 of
  a float64 solve on Gramians with diagonals over 1e0..1e8, K <= 40; ``tests/test_kkt.py``).
  Solve time at K=40 (``launch/benchmark.py solves``, median wall, shared 2-core CPU at load
  6.5-8.7): 1.4 ms on full-rank Gramians, 4.7 ms on singular ones of rank 20 (the slowest rank;
  its K problems run until the slowest converges), against issue 16's 5 ms.
  """
  pref = pref_weights(pref_vector, num_tasks, "upgrad")

  def weigh(gramian, losses, state):
    del losses
    v = dual_cone_weights(jnp.diag(pref), gramian, norm_eps)  # row i: v_i
    return jnp.sum(v, axis=0), state

  return Method("upgrad", num_tasks, GRAMIAN, init=lambda params: EmptyState(), weigh=weigh,
                specific="sum")
