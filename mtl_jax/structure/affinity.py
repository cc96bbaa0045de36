"""Per-stage task affinity of a running hard or branched model, from per-task gradients.

For stage ``s``, the K x K Gramian of the task gradients restricted to that stage's parameters
(every leaf under ``params['stage_<s>']``: the one trunk copy of ``hard``, all group copies of
``branched``; two tasks in different groups have orthogonal stage gradients, inner product 0),
its cosine matrix ``C_s[i, j] = G_s[i, j] / sqrt(G_s[i, i] G_s[j, j])`` and conflict rate (the
fraction of task pairs with a negative cosine, Yu et al. 2020's "conflicting gradients"), averaged
over a window of batches. The cosine is the affinity :func:`mtl_jax.structure.choose.choose_tree`
reads (Fifty et al. 2021 average their affinity over training steps the same way; Vandenhende
et al. 2020 use representation similarity instead: a stated deviation of ``choose_tree``).

The per-task Jacobian comes from the engine's public :func:`mtl_jax.autodiff.task_jacobian` (one
VJP per task, vmapped) on the trainer's loss function (:func:`mtl_jax.train.make_loss_fn`). This is
a measurement pass of its own; the engine's per-layer Gramians of a training step can replace it
where the step already computes them (the whole-model Gramian is the sum of the stage Gramians
plus the heads' zero cross terms).

TAG's lookahead affinity per stage (Fifty, Amid, Zhao, Yu, Anil, Finn, "Efficiently Identifying
Task Groupings for Multi-Task Learning", NeurIPS 2021, Eq. 3; official code
github.com/google-research/google-research ``tag/celeba/CelebA.ipynb``, ``train_step``): task
``i``'s gradient alone steps the shared parameters, ``theta_{s|i} = theta_s - lr g_i``, and

  ``Z_{i->j} = 1 - L_j(theta_{s|i}) / L_j(theta_s)``

(> 0: a step for ``i`` lowers ``j``'s loss), on the same batch, the heads unchanged. Here per
stage: :func:`lookahead_losses` steps only stage ``s``'s shared parameters (one lookahead per task
and stage, vmapped over the K tasks), :func:`lookahead_affinity` forms ``Z`` (S, K, K),
``Z[s, i, j] = Z_{i->j}`` at stage ``s``, averaged over a window like the cosine. Deviations from
the official code: (1) its lookahead is the optimizer's own step (SGD with momentum 0.9: the
momentum term is added); here a plain SGD step ``lr g_i`` at the optimizer's base learning rate
(times the plateau scale) whatever the optimizer (under Adam as under SGD; schedules' warm-up and
decay are not applied); (2) it divides ``Z`` by the learning rate (a per-run constant); for
:func:`mtl_jax.structure.choose.choose_tree`, whose cost ``1 - A`` assumes a task's affinity with
itself is 1 (the cosine's scale), :func:`normalised_lookahead` divides the window mean
``Z_{i->j}`` by ``sqrt(Z_{i->i} Z_{j->j})`` (the tasks' gains from their own steps) and clips to
[-1, 1].
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import autodiff
from mtl_jax.combiners.base import gramian_of


class StageAffinity(NamedTuple):
  cosine: np.ndarray  # (S, K, K), mean over the window
  gramian: np.ndarray  # (S, K, K), mean over the window
  conflict: np.ndarray  # (S,), mean fraction of task pairs with a negative cosine
  steps: int
  lookahead: Optional[np.ndarray] = None  # (S, K, K) TAG's Z, mean over the window (lookahead_lr)


def stage_gramians(jac, num_stages: int) -> jax.Array:
  """(S, K, K): the Gramian of each stage's rows of a K-leading Jacobian tree ``jac``."""
  out = []
  for s in range(num_stages):
    sub = jac.get(f"stage_{s}")
    if sub is None or not jax.tree.leaves(sub):
      raise ValueError(f"stage_gramians: the parameters have no stage_{s} (a hard or branched "
                       f"model's stage parameters live under stage_<s>)")
    out.append(gramian_of(sub, jax.tree.map(lambda _: True, sub)))
  return jnp.stack(out)


def lookahead_losses(loss_fn, params, batch_stats, batch, rng, lr, num_stages: int, mask=None,
                     mean=None):
  """``(losses (K,), after (S, K, K))``: ``after[s, i, j]`` is task ``j``'s loss on ``batch``
  after one SGD step of rate ``lr`` on stage ``s``'s shared parameters (``mask``: the shared
  leaves; None: all of the stage) along task ``i``'s gradient alone. ``mean``: averages per-device
  quantities (``pmean`` under shard_map: the gradient and the losses of the global batch)."""
  mean = mean if mean is not None else (lambda t: t)
  losses, jac, _ = autodiff.task_jacobian(loss_fn, params, batch_stats, batch, rng)
  losses = mean(losses)
  mask = mask if mask is not None else jax.tree.map(lambda _: True, params)

  def after_stage(s):
    name = f"stage_{s}"
    g = mean(jac[name])  # (K, ...) leaves

    def stepped(i):
      new = jax.tree.map(lambda p, gi, m: p - lr * gi[i].astype(p.dtype) if m else p,
                         params[name], g, mask[name])
      return loss_fn({**params, name: new}, batch_stats, batch, rng)[0]

    return mean(jax.vmap(stepped)(jnp.arange(losses.shape[0])))

  return losses, jnp.stack([after_stage(s) for s in range(num_stages)])


def lookahead_affinity(losses, after) -> jax.Array:
  """TAG's ``Z[s, i, j] = 1 - after[s, i, j] / losses[j]`` (0 where ``losses[j]`` is 0)."""
  safe = jnp.where(losses != 0, losses, 1.0)
  return jnp.where(losses != 0, 1.0 - after / safe, 0.0)


def normalised_lookahead(z) -> np.ndarray:
  """``Z_{i->j} / sqrt(Z_{i->i} Z_{j->j})`` clipped to [-1, 1] (0 where a task's own step did not
  lower its loss, ``Z_{k->k} <= 0``, e.g. at a stage it does not share): the cosine's scale, 1 on
  the diagonal. To first order in the rate it is ``cos_ij sqrt(L_i / L_j)``; what the lookahead
  adds to the cosine is that loss ratio and the curvature (the higher-order terms)."""
  z = np.asarray(z, np.float64)
  self_gain = np.diagonal(z, axis1=-2, axis2=-1)
  ok = (self_gain[..., :, None] > 0) & (self_gain[..., None, :] > 0)
  denom = np.sqrt(np.where(ok, self_gain[..., :, None] * self_gain[..., None, :], 1.0))
  return np.where(ok, np.clip(z / denom, -1.0, 1.0), 0.0)


def cosine(gram: jax.Array) -> jax.Array:
  """Cosine matrix of a (..., K, K) Gramian; 0 where a task's gradient is 0."""
  d = jnp.sqrt(jnp.clip(jnp.diagonal(gram, axis1=-2, axis2=-1), 0.0))
  denom = d[..., :, None] * d[..., None, :]
  return jnp.where(denom > 0, gram / jnp.where(denom > 0, denom, 1.0), 0.0)


def conflict_rate(cos: jax.Array) -> jax.Array:
  """Fraction of off-diagonal task pairs with a negative cosine, per leading index."""
  k = cos.shape[-1]
  if k < 2:
    return jnp.zeros(cos.shape[:-2])
  off = ~jnp.eye(k, dtype=bool)
  return jnp.sum((cos < 0) & off, axis=(-2, -1)) / (k * (k - 1))


def stage_affinity(model, variables, tasks: Sequence, batches: Iterable[Any], *,
                   multi_input: bool = False, seed: int = 0,
                   lookahead_lr: float = 0.0, rng=None) -> StageAffinity:
  """Mean per-stage Gramian, cosine and conflict rate of ``model`` at ``variables`` over
  ``batches`` (the trainer's batches: ``{'inputs', 'targets'}``, or ``{task: batch}`` when
  ``multi_input``). Parameters are not updated; batch norm runs in train mode.
  ``lookahead_lr > 0``: also TAG's lookahead affinity ``Z`` per stage at that rate (every stage
  parameter stepped: a hard model's). ``rng``: the dropout key of every batch (default: the key
  ``seed + i`` for batch ``i``)."""
  from mtl_jax import train  # pylint: disable=g-import-not-at-top
  tasks = list(tasks)
  params = variables["params"]
  bs = variables.get("batch_stats", {})
  constants = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
  loss_fn = train.make_loss_fn(model, tasks, multi_input, constants)
  num_stages = sum(1 for n in params if n.startswith("stage_"))

  @functools.partial(jax.jit, static_argnums=2)
  def measure(batch, rng, tag: bool, lr):
    _, jac, _ = autodiff.task_jacobian(loss_fn, params, bs, batch, rng)
    gram = stage_gramians(jac, num_stages)
    cos = cosine(gram)
    out = (gram, cos, conflict_rate(cos))
    if tag:
      out += (lookahead_affinity(*lookahead_losses(loss_fn, params, bs, batch, rng, lr,
                                                   num_stages)),)
    return out

  acc, n = None, 0
  for i, batch in enumerate(batches):
    key = rng if rng is not None else jax.random.key(seed + i)
    out = jax.device_get(measure(batch, key, lookahead_lr > 0, jnp.float32(lookahead_lr)))
    out = [np.asarray(x, np.float64) for x in out]
    acc = out if acc is None else [a + b for a, b in zip(acc, out)]
    n += 1
  if not n:
    raise ValueError("stage_affinity over an empty window: no batch")
  gram, cos, conf, *z = (a / n for a in acc)
  return StageAffinity(cos, gram, conf, n, z[0] if z else None)
