"""Aligned-MTL (Senushkin et al. 2023): align the task gradients' principal components."""

import jax.numpy as jnp

from mtl_jax.combiners._qp import pref_weights
from mtl_jax.combiners.base import GRAMIAN, EmptyState, Method, register

SCALE_MODES = ("min", "median", "rmse")


def balance_matrix(gramian, scale_mode: str = "min"):
  """The symmetric K x K matrix ``B`` with ``J_aligned = B J`` (Algorithm 1 of the paper).

  With ``G = V diag(lambda) V^T`` (eigen-decomposition, eigenvalues below
  ``lambda_max * K * eps_float32`` dropped as numerically zero, as the official code does),
  ``B = sqrt(lambda_R) V diag(lambda)^{-1/2} V^T`` on the kept eigenvectors, where
  ``lambda_R`` is the smallest kept eigenvalue (``'min'``), their median (``'median'``, the lower
  median as ``torch.median``) or their mean (``'rmse'``). Then ``B G B = lambda_R P`` with ``P`` the
  projector onto the range of ``G``: every non-zero singular value of the aligned Jacobian equals
  ``sqrt(lambda_R)`` (condition number 1). A zero Gramian gives ``B = I``.

  The rank cut-off is the official one (``ProcrustesSolver``: ``tol = max(lambda) * K *
  finfo.eps``, float32 as the official code runs): eigen-directions below it are dropped, so their
  gradient components leave the update; with gradient norms spread over decades that is often a
  good part of the spectrum (measured: K=40, diagonal over 1e0..1e8: 17..31 of 40 kept). On the
  kept space float32 ``eigh`` is accurate to its backward error ``~eps ||G||``, so ``B G B`` has
  eigenvalues ``lambda_R (1 + O(eps lambda_max / lambda_min_kept))``, a relative error that can
  reach ``O(1/K)`` at the cut-off (measured: at most ``3 eps lambda_max / lambda_min_kept``;
  ``tests/test_kkt.py``). Neither is a solver defect: it is the official algorithm in float32.
  """
  g = jnp.asarray(gramian, jnp.float32)
  k = g.shape[0]
  lam, vec = jnp.linalg.eigh(0.5 * (g + g.T))
  lam, vec = lam[::-1], vec[:, ::-1]  # descending
  tol = jnp.max(lam) * k * jnp.finfo(jnp.float32).eps
  keep = lam > tol
  rank = jnp.sum(keep)
  safe = jnp.where(keep, lam, 1.0)
  if scale_mode == "min":
    ref = jnp.min(jnp.where(keep, lam, jnp.inf))
  elif scale_mode == "median":
    ref = lam[jnp.clip(rank - 1 - (rank - 1) // 2, 0, k - 1)]
  else:  # rmse
    ref = jnp.sum(jnp.where(keep, lam, 0.0)) / jnp.maximum(rank, 1)
  scale = jnp.where(keep, jnp.sqrt(jnp.where(rank > 0, ref, 1.0) / safe), 0.0)
  b = (vec * scale) @ vec.T
  return jnp.where(rank > 0, b, jnp.eye(k, dtype=g.dtype))


@register("aligned_mtl")
def aligned_mtl(num_tasks: int, scale_mode: str = "min",
                scale_decoder_grad: bool = False, pref_vector=None) -> Method:
  """Aligned-MTL.

  Senushkin, D., Patakin, N., Kuznetsov, A. & Konushin, A. (2023). "Independent Component Alignment
  for Multi-Task Learning". CVPR 2023. Official code: github.com/SamsungLabs/MTL
  (``code/optim/aligned``: ``ProcrustesSolver``, ``AlignedMTLBalancer``).

  The shared Jacobian ``J`` (K x P) is replaced by the closest (Procrustes) matrix whose rows are
  orthogonal with equal norms, scaled by the chosen eigenvalue: ``J_aligned = B J`` with
  :func:`balance_matrix`; the update is the sum of the aligned gradients, i.e. the weighting
  ``w = B 1`` (``w_k = sum_j B_jk``). This depends only on the Gramian, so the engine's Gramian path
  applies. The aligned gradients have condition number 1.

  Hyper-parameters (official defaults): ``scale_mode='min'`` (``'median'``, ``'rmse'``),
  ``scale_decoder_grad=False``; ``pref_vector`` (TorchJD's ``AlignedMTL(pref_vector=...)``): the
  aligned gradients are combined with ``p`` instead of summed, ``w = B p``; ``None`` is the official
  sum ``p = 1`` (TorchJD's default, the mean ``1/K``, is ``pref_vector=jnp.full(K, 1/K)``: the
  same direction, ``1/K`` the length).

  Task-specific parameters: with ``scale_decoder_grad=False`` (official default) each head receives
  its own task's unweighted gradient (``specific='sum'``); with ``True`` it is scaled by its task's
  weight ``w_k`` (``specific='weighted'``; the official ``apply_decoder_scaling``).

  Deviations: none in the maths. The rank tolerance uses float32's epsilon as the official code
  (which runs in float32). A zero Gramian (rank 0; the official code fails on it) gives ``B = I``
  as TorchJD does, so the weights are 1.
  """
  if scale_mode not in SCALE_MODES:
    raise ValueError(f"aligned_mtl: unknown scale_mode {scale_mode!r}; valid: {', '.join(SCALE_MODES)}")
  if pref_vector is None:
    pref = jnp.ones((num_tasks,), jnp.float32)
  else:
    pref = pref_weights(pref_vector, num_tasks, "aligned_mtl")

  def weigh(gramian, losses, state):
    del losses
    return balance_matrix(gramian, scale_mode) @ pref, state  # B is symmetric: B^T p = B p

  return Method("aligned_mtl", num_tasks, GRAMIAN, init=lambda params: EmptyState(), weigh=weigh,
                specific="weighted" if scale_decoder_grad else "sum")
