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
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Sequence

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
                   multi_input: bool = False, seed: int = 0) -> StageAffinity:
  """Mean per-stage Gramian, cosine and conflict rate of ``model`` at ``variables`` over
  ``batches`` (the trainer's batches: ``{'inputs', 'targets'}``, or ``{task: batch}`` when
  ``multi_input``). Parameters are not updated; batch norm runs in train mode."""
  from mtl_jax import train  # pylint: disable=g-import-not-at-top
  tasks = list(tasks)
  params = variables["params"]
  bs = variables.get("batch_stats", {})
  constants = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
  loss_fn = train.make_loss_fn(model, tasks, multi_input, constants)
  num_stages = sum(1 for n in params if n.startswith("stage_"))

  @jax.jit
  def measure(batch, rng):
    _, jac, _ = autodiff.task_jacobian(loss_fn, params, bs, batch, rng)
    gram = stage_gramians(jac, num_stages)
    cos = cosine(gram)
    return gram, cos, conflict_rate(cos)

  acc, n = None, 0
  for i, batch in enumerate(batches):
    out = jax.device_get(measure(batch, jax.random.key(seed + i)))
    out = [np.asarray(x, np.float64) for x in out]
    acc = out if acc is None else [a + b for a, b in zip(acc, out)]
    n += 1
  if not n:
    raise ValueError("stage_affinity over an empty window: no batch")
  gram, cos, conf = (a / n for a in acc)
  return StageAffinity(cos, gram, conf, n)
