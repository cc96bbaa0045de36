"""DualProj (Quinton & Rey 2024): the mean gradient projected onto the dual cone."""

from mtl_jax.combiners._qp import dual_cone_weights, pref_weights
from mtl_jax.combiners.base import GRAMIAN, EmptyState, Method, register


@register("dualproj")
def dualproj(num_tasks: int, pref_vector=None, norm_eps: float = 1e-4) -> Method:
  """Projection of the preference-weighted gradient onto the dual cone.

  Quinton, P. & Rey, V. (2024). "Jacobian Descent for Multi-Objective Optimization".
  arXiv:2406.16232 (the projection of Eq. 3, as an aggregator). Official code: TorchJD,
  ``torchjd.aggregation.DualProj`` / ``DualProjWeighting``.

  ``update = pi_J(J^T p)``: the combination ``J^T p`` (default the mean) projected onto
  ``{x : J x >= 0}``. In the Gramian the weights are ``w = argmin_{v >= p} v^T G v`` (a weighting).
  The update has a non-negative inner product with every task gradient and equals ``J^T p`` when
  that already conflicts with no task.

  Hyper-parameters (TorchJD defaults): ``pref_vector=None`` (1/K each), ``norm_eps=1e-4``; no
  ``reg_eps`` (see :func:`mtl_jax.combiners.upgrad`).

  Task-specific parameters: ``specific='sum'`` (their own task's unweighted gradient, as
  TorchJD's ``mtl_backward``).

  More tasks than parameters (singular Gramian): the non-conflict promise holds to float32's
  resolution, ``cos(g_k, d) >= -50 eps S / ||d||`` with ``S = sum_j |w_j| |g_j|``, and an update
  below that resolution is returned as exactly 0 (see
  :func:`mtl_jax.combiners._qp.dual_cone_weights`).

  Deviations: the QP is solved in float32 inside ``jit`` by
  :func:`mtl_jax.combiners._qp.box_qp` instead of ``quadprog`` in float64 on the host, and the
  result is the exact projection, not the one for TorchJD's ridged Gramian (see
  :func:`mtl_jax.combiners._qp.dual_cone_weights`: no ridge is needed).
  """
  pref = pref_weights(pref_vector, num_tasks, "dualproj")

  def weigh(gramian, losses, state):
    del losses
    return dual_cone_weights(pref, gramian, norm_eps), state

  return Method("dualproj", num_tasks, GRAMIAN, init=lambda params: EmptyState(), weigh=weigh,
                specific="sum")
