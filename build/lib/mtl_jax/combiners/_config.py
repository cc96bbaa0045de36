"""ConFIG: conflict-free inverse gradients, as an exact weighting in Gramian space.

Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
ICLR 2025 (arXiv:2408.11104), Eq. 2. Official code: github.com/tum-pbs/ConFIG
(``conflictfree.grad_operator.ConFIG_update`` / ``ConFIGOperator`` with ``EqualWeight`` and
``ProjectionLength``); also TorchJD's ``ConFIG`` aggregator.

With unit task gradients ``u_k = g_k / ||g_k||`` (a zero gradient gives a zero row, the official
``nan_to_num``) stacked as ``U`` (K x P), the direction is the minimum-norm solution of
``U d = p`` (``p``: the preference vector, ones by default), ``d = U^+ p``, so that
``cos(d, g_k)`` is the same positive number for every task; the update is
``(sum_k g_k . d_hat) d_hat`` (the official ``ProjectionLength``).

``U^+ = U^T (U U^T)^+`` and ``U U^T = N^-1 G N^-1`` (``N = diag ||g_k||``), so
``d = J^T c`` with ``c = N^-1 (N^-1 G N^-1)^+ p``: a combination of the task gradients that only
needs the Gramian. The weights are ``w = c (1^T G c) / (c^T G c)``.

Hyper-parameters: ``pref_vector`` (K positive numbers, default ones: the official ``EqualWeight``),
``rcond`` (see below). Task-specific parameters: ``specific='sum'`` (the official MTL trainer gives
the heads the gradient of ``losses.sum()``).

Deviations:
* The pseudo-inverse is taken of the K x K unit Gramian by an eigendecomposition, dropping
  eigenvalues below ``rcond * K * max eigenvalue`` (default ``rcond=1e-6``), not by
  ``torch.linalg.lstsq`` / ``pinv`` on the K x P matrix. The Gramian squares the singular values,
  and a float32 Gramian carries ~1e-7 relative error, so smaller eigenvalues are rounding: two task
  gradients whose directions differ by less than about ``sqrt(rcond K)`` (~1e-3 rad) count as one.
* For K = 2 the official operator uses the closed form ``ConFIG_update_double``; it gives the same
  direction as the general formula whenever the two gradients are not parallel, which we use for
  every K.
* A zero update (e.g. two exactly opposite gradients, where ``U d = 1`` has the least-squares
  solution 0) is returned as zero instead of the official ``0/0``.
"""

from __future__ import annotations

import jax.numpy as jnp

from mtl_jax.combiners.base import GRAMIAN, EmptyState, Method, register


def psd_pinv_apply(m, v, rcond):
  """``m^+ v`` for a symmetric PSD ``m``, eigenvalues below ``rcond * K * max`` dropped."""
  lam, vec = jnp.linalg.eigh(m)
  keep = lam > rcond * m.shape[0] * jnp.maximum(jnp.max(lam), 0.0)
  inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
  return vec @ (inv * (vec.T @ v))


def config_weights(gramian, pref, rcond=1e-6):
  """``w`` with ``sum_k w_k g_k`` the ConFIG update (see the module docstring)."""
  g = jnp.asarray(gramian, jnp.float32)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0))
  inv_n = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
  unit_gram = g * inv_n[:, None] * inv_n[None, :]
  c = inv_n * psd_pinv_apply(unit_gram, pref, rcond)
  sq = c @ g @ c  # ||d||^2
  proj = jnp.sum(g @ c)  # sum_k g_k . d
  return jnp.where(sq > 0, c * proj / jnp.where(sq > 0, sq, 1.0), 0.0)


@register("config")
def config(num_tasks: int, pref_vector=None, rcond: float = 1e-6) -> Method:
  """ConFIG (Liu et al., ICLR 2025) as an exact Gramian weighting. See the module docstring."""
  k = num_tasks
  pref = (jnp.ones((k,), jnp.float32) if pref_vector is None
          else jnp.asarray(pref_vector, jnp.float32))
  if pref.shape != (k,):
    raise ValueError(f"config: pref_vector has shape {pref.shape}, expected ({k},)")
  if not bool(jnp.all(pref > 0)):
    raise ValueError(f"config: pref_vector must be positive, got {pref_vector}")
  if not rcond > 0:
    raise ValueError(f"config: rcond must be > 0, got {rcond}")

  def weigh(gramian, losses, state):
    del losses
    return config_weights(gramian, pref, float(rcond)), state

  return Method("config", k, GRAMIAN, init=lambda params: EmptyState(), weigh=weigh,
                specific="sum")
