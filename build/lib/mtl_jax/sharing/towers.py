"""Per-task towers: independent (the single-task baseline in one model), soft sharing and
cross-stitch networks.

The K towers are K independently initialised copies of the backbone's stages; their parameters
are stacked on a leading axis of size K (``tower_<i>``) and run with ``jax.vmap``, so tower k of
every strategy here is exactly a single-task network.

* ``independent``: K towers, nothing shared. Its parameter count is K x the single-task model.
* ``soft`` (Duong et al. 2015, "Low resource dependency parsing: cross-lingual parameter sharing
  in a neural network parser"; Yang & Hospedales 2017, "Trace norm regularised deep multi-task
  learning"): K towers tied by a penalty ``lam * P(towers)`` that the trainer adds to the loss
  (``MultiTaskModel.regularizer``):
  - ``penalty='l2'``: ``sum_layers sum_k ||theta_k - mean_j theta_j||^2``. Duong et al. penalise
    ``||theta_1 - theta_2||^2`` for two tasks; the distance to the mean is its K-task form (for
    K = 2 it is half of it).
  - ``penalty='trace'``: ``sum_layers ||[theta_1; ...; theta_K]||_*``, the nuclear norm of the
    K x P matrix of each layer's stacked tower weights: Yang & Hospedales' "last axis flattening"
    tensor trace norm with the task axis last. Their Tucker and TT variants are not offered.
  No canonical lambda exists (it is tuned per benchmark); the default ``lam=1e-3`` is ours.
* ``cross_stitch`` (Misra et al. 2016, "Cross-stitch networks for multi-task learning"): after each
  stage in ``after`` (default: every stage) the towers' outputs are mixed by a learned K x K
  matrix ``alpha``: ``x_k <- sum_j alpha_kj x_j`` (one scalar per task pair and stitch, as in
  the paper). ``init='misra'`` uses the paper's best initialisation ``alpha_S = self_weight = 0.9``
  on the diagonal and ``(1 - alpha_S) / (K - 1)`` elsewhere (0.1 for two tasks);
  ``init='identity'`` makes the network start as independent towers. Deviation: Misra et al.
  raise the learning rate of the alphas by 10^2-10^3; here that is the optimizer's business
  (e.g. ``optax.multi_transform`` on the ``stitch_<i>`` leaves).

Shared masks: nothing is shared in ``independent`` and ``soft`` (each tower gets only its own
task's gradient; the soft penalty couples them through the loss); in ``cross_stitch`` a tower
stage followed by a stitch unit, and a stitch unit followed by another, depend on every task
(shared); the heads, the last unit (its row k feeds task k only) and stages after it are not.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.sharing.base import (Defs, MultiTaskModel, head_defs, path_mask, register, run,
                                  stage_defs, take)

PENALTIES = ("l2", "trace")
STITCH_INITS = ("misra", "identity")


def stitch_init(num_tasks: int, init: str, self_weight: float) -> jax.Array:
  if init not in STITCH_INITS:
    raise ValueError(f"unknown cross-stitch init {init!r}; valid: {', '.join(STITCH_INITS)}")
  if init == "identity" or num_tasks == 1:
    return jnp.eye(num_tasks, dtype=jnp.float32)
  off = (1.0 - self_weight) / (num_tasks - 1)
  return (jnp.full((num_tasks, num_tasks), off, jnp.float32)
          + (self_weight - off) * jnp.eye(num_tasks, dtype=jnp.float32))


class TowersModel(nn.Module):
  """K stacked towers, optionally cross-stitched after the stages in ``stitch_after``."""

  stages: Defs
  heads: Defs
  task_names: tuple
  stitch_after: tuple = ()
  stitch_mode: str = "misra"
  self_weight: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool = False, part: str = "all"):
    if part != "all":
      raise ValueError("per-task towers have no single shared representation (part='all' only)")
    k = len(self.task_names)
    axis = None
    for i, stage in enumerate(self.stages.modules):
      x = run(self, f"tower_{i}", stage, x, train, copies=k, x_axis=axis)
      axis = 0
      if i in self.stitch_after:
        alpha = self.param(f"stitch_{i}", lambda _r: stitch_init(k, self.stitch_mode, self.self_weight))
        x = jax.tree.map(
            lambda a: jnp.einsum("kj,j...->k...", alpha.astype(a.dtype), a,
                                 precision=jax.lax.Precision.HIGHEST), x)
    return {t: run(self, f"head_{t}", h, take(x, j), train, stage=False)
            for j, (t, h) in enumerate(zip(self.task_names, self.heads.modules))}


def _towers(params):
  return {n: v for n, v in params.items() if n.startswith("tower_")}


def l2_to_mean(params) -> jax.Array:
  """``sum over tower leaves of sum_k ||theta_k - mean_j theta_j||^2``."""
  leaves = jax.tree.leaves(_towers(params))
  return sum((jnp.sum(jnp.square(a - jnp.mean(a, axis=0, keepdims=True))) for a in leaves),
             jnp.zeros((), jnp.float32))


def trace_norm(params) -> jax.Array:
  """``sum over tower leaves of ||reshape(theta, (K, -1))||_*`` (sum of singular values)."""
  total = jnp.zeros((), jnp.float32)
  for a in jax.tree.leaves(_towers(params)):
    m = a.reshape(a.shape[0], -1).astype(jnp.float32)
    # Singular values from the K x K Gram matrix (K is small). Eigenvalues below a float32
    # round-off floor (relative 1e-5) count as 0: their square roots are noise, and the safe
    # square root keeps the gradient finite where towers are linearly dependent.
    gram = jnp.dot(m, m.T, precision=jax.lax.Precision.HIGHEST)
    eig = jnp.linalg.eigvalsh(gram)
    keep = eig > 1e-5 * jnp.maximum(jnp.max(eig), 1e-30)
    total = total + jnp.sum(jnp.where(keep, jnp.sqrt(jnp.where(keep, eig, 1.0)), 0.0))
  return total


def _nothing_shared(params):
  return jax.tree.map(lambda _: False, params)


def _build(name, backbone, tasks, **kw) -> TowersModel:
  names = tuple(t.name for t in tasks)
  return TowersModel(Defs(stage_defs(backbone)), Defs(head_defs(tasks)), names, **kw)


@register("independent")
def independent(backbone, tasks) -> MultiTaskModel:
  """K independent towers (single-task models side by side); nothing is shared."""
  module = _build("independent", backbone, tasks)
  return MultiTaskModel("independent", module, module.task_names, _nothing_shared,
                        sample_input=backbone.sample_input)


@register("soft")
def soft(backbone, tasks, *, penalty: str = "l2", lam: float = 1e-3) -> MultiTaskModel:
  """K towers tied by ``lam * penalty`` (``'l2'`` to the mean, or ``'trace'`` norm)."""
  if penalty not in PENALTIES:
    raise ValueError(f"unknown soft-sharing penalty {penalty!r}; valid: {', '.join(PENALTIES)}")
  if lam < 0:
    raise ValueError(f"soft sharing: lam must be >= 0, got {lam}")
  module = _build("soft", backbone, tasks)
  fn = l2_to_mean if penalty == "l2" else trace_norm
  return MultiTaskModel("soft", module, module.task_names, _nothing_shared,
                        regularizer_fn=lambda p: lam * fn(p),
                        options={"penalty": penalty, "lam": lam},
                        sample_input=backbone.sample_input)


@register("cross_stitch")
def cross_stitch(backbone, tasks, *, after: Optional[Sequence[int]] = None, init: str = "misra",
                 self_weight: float = 0.9) -> MultiTaskModel:
  """Cross-stitch units after the stages ``after`` (0-based; default every stage)."""
  s = len(backbone.stages)
  after = tuple(range(s)) if after is None else tuple(int(i) for i in after)
  for i in after:
    if not 0 <= i < s:
      raise ValueError(f"cross_stitch: 'after' holds stage indices in 0..{s - 1}, got {i}")
  if init not in STITCH_INITS:
    raise ValueError(f"unknown cross-stitch init {init!r}; valid: {', '.join(STITCH_INITS)}")
  module = _build("cross_stitch", backbone, tasks, stitch_after=after, stitch_mode=init,
                  self_weight=float(self_weight))
  # Row k of a stitch unit feeds tower k only; it reaches the other tasks through a later
  # stitch. So stage i is shared iff a stitch follows it (at i or later), stitch i iff a later
  # stitch exists; the rest is task-specific (e.g. the last unit before the heads).
  shared = tuple(f"tower_{i}" for i in range(s) if any(j >= i for j in after)) + tuple(
      f"stitch_{i}" for i in after if any(j > i for j in after))
  return MultiTaskModel("cross_stitch", module, module.task_names,
                        lambda p: {n: jax.tree.map(lambda _, sh=n in shared: sh, v)
                                   for n, v in p.items()},
                        options={"after": after, "init": init, "self_weight": self_weight},
                        sample_input=backbone.sample_input)
