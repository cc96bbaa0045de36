"""Task affinity: lookahead inter-task affinity and a suggested grouping of tasks.

Fifty, Amid, Zhao, Yu, Anil, Finn, "Efficiently Identifying Task Groupings for Multi-Task
Learning", NeurIPS 2021 (TAG). At step ``t`` with shared parameters ``θ_s`` and task-specific
parameters ``θ_k``, a lookahead SGD step on task ``i`` alone,

    θ_s^{t+1|i} = θ_s^t - η ∇_{θ_s} L_i(X^t, θ_s^t, θ_i^t),

changes the loss of task ``j`` on the same batch by the relative amount

    Z^t_{i→j} = 1 - L_j(X^t, θ_s^{t+1|i}, θ_j^t) / L_j(X^t, θ_s^t, θ_j^t)      (paper, Eq. 3)

(positive: task ``i``'s step helps ``j``). The affinity over a training window is the mean over its
steps (paper, Eq. 4). Here :func:`lookahead_affinity` computes the whole ``K × K`` matrix
``Z[i, j] = Z_{i→j}`` at one step with one VJP per task (``jax.vmap`` over one-hot cotangents, the
engine's Jacobian recipe) and one batched forward pass over the K lookahead parameter sets;
:func:`affinity_over_window` trains over a window of batches and averages.

Grouping (paper, Section 3.3): the score of a task ``j`` in a group is the mean affinity onto it
from the other members, ``mean_{i ∈ group, i ≠ j} Z_{i→j}`` (0 for a task alone); a grouping's
score is the sum over tasks. :func:`suggest_groups` returns, for each number of groups
``2..max_groups``, the partition of the tasks with the highest score: exhaustive over all
partitions when there are few enough (``exhaustive_limit``), greedy agglomeration followed by
single-task moves otherwise.

Deviations from the paper / official code: (1) the lookahead is a plain SGD step of size ``lr`` as
Eq. 1 writes it, whatever optimizer trains the model; (2) groups are a *partition* of the tasks (each
task trained in exactly one group); TAG's network selection also allows overlapping groups, each
task served by the group that scores it best, under a budget of networks; (3) the lookahead uses
the shared-parameter mask of the model (``shared_mask``; everything shared when None) rather than a
fixed "encoder" sub-network.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import combiners

PyTree = Any
LossFn = Callable[[PyTree, Any], jax.Array]  # (params, batch) -> losses[K]


def lookahead_affinity(loss_fn: LossFn, params: PyTree, batch: Any, lr: float,
                       shared_mask=None) -> jax.Array:
  """The ``K × K`` lookahead affinity ``Z[i, j] = 1 - L_j(θ^{+i}) / L_j(θ)`` at ``params``.

  Args:
    loss_fn: ``(params, batch) -> losses`` of shape ``(K,)`` (positive losses).
    params: the parameters (any pytree).
    batch: the batch, the same for the lookahead and for the evaluation (as in the paper).
    lr: the lookahead SGD step size ``η``.
    shared_mask: which leaves are shared (tree of bools, callable, or None = all); only those move
      in the lookahead, as in the paper (task-specific parameters of task ``i`` do not affect ``j``).
  """
  losses, vjp = jax.vjp(lambda p: loss_fn(p, batch), params)
  k = losses.shape[0]
  if losses.ndim != 1:
    raise ValueError(f"loss_fn must return a vector of task losses, got shape {losses.shape}")
  (jac,) = jax.vmap(vjp)(jnp.eye(k, dtype=losses.dtype))
  mask = combiners.resolve_mask(shared_mask, params)

  def after_step(i):
    moved = jax.tree.map(lambda p, j, m: p - lr * j[i].astype(p.dtype) if m else p,
                         params, jac, mask)
    return loss_fn(moved, batch)

  looked = jax.vmap(after_step)(jnp.arange(k))  # [i, j] = L_j after task i's step
  return 1.0 - looked / losses[None, :]


class WindowAffinity(NamedTuple):
  mean: np.ndarray  # K x K, averaged over the window
  per_step: np.ndarray  # T x K x K
  params: PyTree  # the parameters after the window


def affinity_over_window(loss_fn: LossFn, params: PyTree, batches: Iterable[Any], lr: float,
                         update_fn: Optional[Callable[[PyTree, Any], PyTree]] = None,
                         shared_mask=None, every: int = 1) -> WindowAffinity:
  """TAG's affinity averaged over a training window (paper, Eq. 4).

  Trains over ``batches`` with ``update_fn(params, batch) -> params`` (default: an SGD step of size
  ``lr`` on the sum of the task losses, i.e. the jointly trained model the paper measures) and
  computes :func:`lookahead_affinity` before the update of every ``every``-th batch.
  """
  if every < 1:
    raise ValueError(f"every must be >= 1, got {every}")
  look = jax.jit(lambda p, b: lookahead_affinity(loss_fn, p, b, lr, shared_mask))
  if update_fn is None:
    grad = jax.grad(lambda p, b: jnp.sum(loss_fn(p, b)))
    update_fn = jax.jit(lambda p, b: jax.tree.map(lambda x, g: x - lr * g, p, grad(p, b)))
  mats = []
  for t, batch in enumerate(batches):
    if t % every == 0:
      mats.append(np.asarray(jax.device_get(look(params, batch)), np.float64))
    params = update_fn(params, batch)
  if not mats:
    raise ValueError("affinity over an empty window: no batch")
  per = np.stack(mats)
  return WindowAffinity(per.mean(0), per, params)


# ---------------------------------------------------------------------------------------------
# Grouping.


def group_score(z: np.ndarray, groups: Sequence[Sequence[int]]) -> float:
  """Sum over tasks of the mean affinity onto the task from the other members of its group."""
  z = np.asarray(z, np.float64)
  total = 0.0
  for g in groups:
    g = list(g)
    if len(g) < 2:
      continue
    sub = z[np.ix_(g, g)]
    onto = (sub.sum(0) - np.diag(sub)) / (len(g) - 1)  # column j: mean over i != j of Z[i, j]
    total += float(onto.sum())
  return total


def stirling2(n: int, k: int) -> int:
  """Number of partitions of ``n`` items into ``k`` non-empty groups."""
  return sum((-1) ** i * math.comb(k, i) * (k - i) ** n for i in range(k + 1)) // math.factorial(k)


def partitions(n: int, k: int) -> Iterable[list[list[int]]]:
  """Every partition of ``range(n)`` into exactly ``k`` non-empty groups (restricted growth)."""
  if not 1 <= k <= n:
    return

  def rec(i, labels, used):
    if n - i < k - used:
      return
    if i == n:
      if used == k:
        groups = [[] for _ in range(k)]
        for item, lab in enumerate(labels):
          groups[lab].append(item)
        yield groups
      return
    for lab in range(min(used + 1, k)):
      labels.append(lab)
      yield from rec(i + 1, labels, max(used, lab + 1))
      labels.pop()

  yield from rec(0, [], 0)


def _greedy(z: np.ndarray, k: int) -> list[list[int]]:
  n = z.shape[0]
  groups = [[i] for i in range(n)]
  while len(groups) > k:  # merge the pair that scores best together
    best = None
    for a, b in itertools.combinations(range(len(groups)), 2):
      merged = [g for i, g in enumerate(groups) if i not in (a, b)] + [groups[a] + groups[b]]
      s = group_score(z, merged)
      if best is None or s > best[0]:
        best = (s, merged)
    groups = best[1]
  improved = True
  while improved:  # single-task moves that raise the score, keeping k non-empty groups
    improved = False
    base = group_score(z, groups)
    for src in range(len(groups)):
      if len(groups[src]) < 2:
        continue
      for item in list(groups[src]):
        for dst in range(len(groups)):
          if dst == src:
            continue
          trial = [list(g) for g in groups]
          trial[src].remove(item)
          trial[dst].append(item)
          s = group_score(z, trial)
          if s > base + 1e-12:
            groups, base, improved = trial, s, True
            break
        if improved:
          break
      if improved:
        break
  return [sorted(g) for g in groups]


class Grouping(NamedTuple):
  groups: list  # list of lists of task names
  score: float
  exhaustive: bool


def suggest_groups(z: np.ndarray, tasks: Sequence[str], max_groups: int = 3,
                   exhaustive_limit: int = 200_000) -> dict[int, Grouping]:
  """The best partition of ``tasks`` into ``g`` groups for each ``g`` in ``2..max_groups``.

  Exhaustive when the number of partitions ``S(K, g)`` is at most ``exhaustive_limit``; greedy
  otherwise (``Grouping.exhaustive`` says which).
  """
  z = np.asarray(z, np.float64)
  k = len(tasks)
  if z.shape != (k, k):
    raise ValueError(f"affinity matrix of shape {z.shape} for {k} tasks")
  if k < 2:
    raise ValueError(f"grouping needs at least 2 tasks, got {k}")
  if max_groups < 2:
    raise ValueError(f"max_groups must be >= 2, got {max_groups}")
  out = {}
  for g in range(2, min(max_groups, k) + 1):
    if stirling2(k, g) <= exhaustive_limit:
      best = max(partitions(k, g), key=lambda p: group_score(z, p))
      exhaustive = True
    else:
      best, exhaustive = _greedy(z, g), False
    named = [[tasks[i] for i in grp] for grp in best]
    out[g] = Grouping(named, group_score(z, best), exhaustive)
  return out


def from_config(config, num_steps: int = 50, lr: Optional[float] = None, every: int = 1,
                max_groups: int = 3):
  """TAG on a training config: build its benchmark and model (``mtl_jax.train.build``), train
  ``num_steps`` SGD steps on the sum of the task losses from the initial parameters and average
  the lookahead affinity over them; returns ``(task names, WindowAffinity, groupings)``.

  The window is the start of training (the paper averages over the whole run; pass a larger
  ``num_steps`` for a longer window). ``lr`` defaults to the config's learning rate. Batch-norm
  statistics are frozen at their initial values and dropout uses one fixed key (the lookahead
  compares losses on the same batch, so the noise must not differ between the two evaluations).
  Single-input benchmarks only.
  """
  from mtl_jax import train  # pylint: disable=g-import-not-at-top
  bench, model, _, _ = train.build(config)
  if bench.multi_input:
    raise ValueError(f"benchmark {bench.name!r} is multi-input; TAG here needs one shared batch")
  tasks = list(bench.tasks)
  sample_fn = model.sample_input or bench.backbone.sample_input
  variables = model.init(jax.random.key(int(config.seed)), sample_fn())
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  constants = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
  loss_with_state = train.make_loss_fn(model, tasks, False, constants)
  rng = jax.random.key(int(config.seed) + 1)

  def loss_fn(p, batch):
    return loss_with_state(p, batch_stats, batch, rng)[0]

  loader = bench.loader("train", int(config.train.batch_size), int(config.seed), True, 0, 1)
  batches = [next(loader) for _ in range(int(num_steps))]
  mask = combiners.resolve_mask(model.shared_mask, params)
  res = affinity_over_window(loss_fn, params, batches,
                             float(lr if lr is not None else config.optimizer.learning_rate),
                             shared_mask=mask, every=every)
  names = [t.name for t in tasks]
  groups = suggest_groups(res.mean, names, max_groups) if len(names) > 1 else {}
  return names, res, groups
