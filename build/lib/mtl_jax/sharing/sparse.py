"""Sparse sharing (Sun et al. 2020, "Learning Sparse Sharing Architectures for Multiple Tasks",
AAAI): one base network; task k uses the subnetwork ``theta * M_k`` for a binary mask ``M_k``.

* Masks live in the ``'sparse_masks'`` variable collection (bool, a leading K axis, the tree of
  the stage parameters); :meth:`MultiTaskModel.init` makes them all ones (= hard sharing), and
  :func:`set_masks` installs the masks found by :func:`find_masks`. Keep the collection in the
  variables you pass to ``apply`` (it is not trained).
* :func:`find_masks`: for every task, iterative magnitude pruning (Frankle & Carbin 2019) from
  the *common* initialisation ``theta_0``: train the task's subnetwork (the trainer's
  ``train_fn(params, task_index, num_steps) -> params``), remove ``prune_rate`` of the remaining
  prunable weights with the smallest magnitude, rewind the survivors to ``theta_0``; repeat for
  ``rounds``. With ``eval_fn(trained_params, task_index) -> score`` (higher is better) the mask
  whose trained subnetwork scored best is kept, as Sun et al. select the mask on validation data;
  without it, the mask after ``rounds`` prunings (density ``(1 - prune_rate)**rounds``).
* Joint training: task k's forward pass uses ``theta * M_k``; a weight gets gradient from the
  tasks whose mask keeps it. :func:`mask_overlap` reports the overlap statistics.

Choices and deviations: prunable weights are the stage leaves of rank >= 2 (kernels, embeddings;
biases and normalisation parameters are kept, as in Sun et al. who prune weight matrices);
pruning is per layer (``scope='layer'``) by default, ``scope='global'`` ranks all prunable
weights together. Sun et al. rewind to the initialisation; ``prune_rate=0.2`` per round is
Frankle & Carbin's rate for convolutional/dense layers (Sun et al. tune it per task set).
Batch-norm statistics are kept per task (each subnetwork normalises its own activations).
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.sharing.base import (Defs, MultiTaskModel, head_defs, path_mask, register, run,
                                  stage_defs, take)

MASKS = "sparse_masks"
SCOPES = ("layer", "global")


def _apply_mask(params, mask):
  return jax.tree.map(lambda p, m: p * m.astype(p.dtype), params, mask)


def _keep(params, _):
  return params


class SparseModel(nn.Module):
  """One set of stage parameters, applied K times as ``params * mask_k`` (vmapped over k)."""

  stages: Defs
  heads: Defs
  task_names: tuple

  @nn.compact
  def __call__(self, x, train: bool = False, part: str = "all"):
    if part != "all":
      raise ValueError("sparse sharing gives one representation per task (part='all' only)")
    k = len(self.task_names)
    axis = None
    for i, stage in enumerate(self.stages.modules):
      name = f"stage_{i}"
      if self.has_variable(MASKS, name):
        x = run(self, name, stage, x, train, copies=k, x_axis=axis, transform=_apply_mask,
                transform_args=(self.get_variable(MASKS, name),))
      else:  # no masks yet (init) or none installed: all ones
        x = run(self, name, stage, x, train, copies=k, x_axis=axis, transform=_keep,
                transform_args=(jnp.arange(k),))
      axis = 0
    return {t: run(self, f"head_{t}", h, take(x, j), train, stage=False)
            for j, (t, h) in enumerate(zip(self.task_names, self.heads.modules))}


def _stage_params(params):
  return {n: v for n, v in params.items() if n.startswith("stage_")}


def ones_masks(params, num_tasks: int):
  """All-ones masks for the stage parameters (the mask tree of :func:`set_masks`)."""
  return jax.tree.map(lambda p: jnp.ones((num_tasks,) + p.shape, bool), _stage_params(params))


def set_masks(variables, masks):
  """``variables`` with the ``'sparse_masks'`` collection replaced by ``masks`` (checked)."""
  current = variables.get(MASKS)
  if current is not None and jax.tree.structure(current) != jax.tree.structure(masks):
    raise ValueError("set_masks: masks must have the tree of the stage parameters "
                     f"({jax.tree.structure(current)}), got {jax.tree.structure(masks)}")
  out = dict(variables)
  out[MASKS] = jax.tree.map(lambda m: jnp.asarray(m, bool), masks)
  return out


def default_prunable(path, leaf) -> bool:
  return np.ndim(leaf) >= 2


def _prunable_tree(stage_params, prunable):
  return jax.tree_util.tree_map_with_path(lambda p, x: bool(prunable(p, x)), stage_params)


def prune(params, mask, prunable, rate: float, scope: str = "layer"):
  """Remove ``rate`` of the alive prunable weights with the smallest |w| (numpy, host side)."""
  if scope not in SCOPES:
    raise ValueError(f"unknown pruning scope {scope!r}; valid: {', '.join(SCOPES)}")
  w = [np.abs(np.asarray(x, np.float32)) for x in jax.tree.leaves(params)]
  m = [np.asarray(x, bool) for x in jax.tree.leaves(mask)]
  pr = jax.tree.leaves(prunable)
  out = [x.copy() for x in m]
  if scope == "layer":
    for i, (wi, mi, pi) in enumerate(zip(w, m, pr)):
      if pi and mi.any():
        out[i] = _prune_flat([wi], [mi], rate)[0]
  else:
    idx = [i for i, pi in enumerate(pr) if pi]
    new = _prune_flat([w[i] for i in idx], [m[i] for i in idx], rate)
    for i, nm in zip(idx, new):
      out[i] = nm
  return jax.tree.unflatten(jax.tree.structure(mask), out)


def _prune_flat(ws, ms, rate):
  alive = np.concatenate([w[m] for w, m in zip(ws, ms)])
  n = int(np.floor(rate * alive.size))
  if n == 0:
    return ms
  order = np.sort(alive)
  cut = order[n - 1]
  # Remove exactly n weights: all below the cut, then ties at the cut in flat order.
  out, budget = [], n - int(np.sum(alive < cut))
  for w, m in zip(ws, ms):
    keep = m & (w > cut)
    tie = (m & (w == cut)).ravel()
    tie_idx = np.flatnonzero(tie)
    spare = tie_idx[budget:] if budget < tie_idx.size else np.array([], int)
    budget = max(0, budget - tie_idx.size)
    flat = keep.ravel().copy()
    flat[spare] = True
    out.append(flat.reshape(m.shape))
  return out


def find_masks(model: MultiTaskModel, variables, train_fn: Callable, *, num_steps: int,
               prune_rate: float = 0.2, rounds: int = 5, eval_fn: Optional[Callable] = None,
               prunable: Optional[Callable] = None, scope: str = "layer"):
  """Per-task masks by iterative magnitude pruning from the common init ``variables['params']``.

  ``train_fn(params, task_index, num_steps) -> params`` trains the full parameter tree on one task
  (pruned weights enter as zeros; they need not stay zero); ``eval_fn(params, task_index) ->
  float`` (optional, higher is better) selects the round. Returns the mask tree with a leading K
  axis (feed it to :func:`set_masks`).
  """
  if model.name != "sparse":
    raise ValueError(f"find_masks needs a 'sparse' model, got {model.name!r}")
  if not 0.0 < prune_rate < 1.0:
    raise ValueError(f"prune_rate must be in (0, 1), got {prune_rate}")
  if int(rounds) < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  if scope not in SCOPES:
    raise ValueError(f"unknown pruning scope {scope!r}; valid: {', '.join(SCOPES)}")
  theta0 = variables["params"]
  stage0 = _stage_params(theta0)
  pr = _prunable_tree(stage0, prunable or default_prunable)
  per_task = []
  for t in range(model.num_tasks):
    mask = jax.tree.map(lambda p: np.ones(np.shape(p), bool), stage0)
    best, best_score = mask, -np.inf
    for _ in range(int(rounds)):
      start = dict(theta0)
      start.update(_apply_mask(stage0, mask))
      trained = train_fn(start, t, int(num_steps))
      if eval_fn is not None:
        score = float(eval_fn(trained, t))
        if score > best_score:
          best, best_score = mask, score
      mask = prune(_stage_params(trained), mask, pr, prune_rate, scope)
    per_task.append(mask if eval_fn is None else best)
  return jax.tree.map(lambda *ms: jnp.asarray(np.stack(ms), bool), *per_task)


def mask_overlap(masks, prunable: Optional[Callable] = None) -> dict:
  """Overlap statistics of K masks over the prunable weights.

  Returns ``density`` (K,): fraction kept per task; ``overlap`` (K, K): pairwise
  intersection-over-union |M_i & M_j| / |M_i | M_j| (Sun et al.'s overlap ratio);
  ``shared_by_all``: fraction of weights kept by every task; ``used``: kept by at least one.
  """
  leaves = [np.asarray(m, bool) for m in jax.tree.leaves(masks)]
  one = jax.tree.map(lambda m: np.asarray(m)[0], masks)
  pr = jax.tree.leaves(_prunable_tree(one, prunable or default_prunable))
  flat = [m.reshape(m.shape[0], -1) for m, p in zip(leaves, pr) if p]
  if not flat:
    raise ValueError("mask_overlap: no prunable weight")
  m = np.concatenate(flat, axis=1).astype(np.float64)
  inter = m @ m.T
  size = m.sum(1)
  union = size[:, None] + size[None, :] - inter
  return {
      "density": m.mean(1),
      "overlap": np.where(union > 0, inter / np.maximum(union, 1), 1.0),
      "shared_by_all": float(np.mean(m.min(0))),
      "used": float(np.mean(m.max(0))),
  }


@register("sparse")
def sparse(backbone, tasks) -> MultiTaskModel:
  """One network, per-task binary masks (all ones until :func:`find_masks`/:func:`set_masks`)."""
  names = tuple(t.name for t in tasks)
  module = SparseModel(Defs(stage_defs(backbone)), Defs(head_defs(tasks)), names)
  k = len(names)

  def extra_init(variables):
    return set_masks(variables, ones_masks(variables["params"], k))

  return MultiTaskModel(
      "sparse", module, names, lambda p: path_mask(p, ("stage_",)), extra_init=extra_init,
      info={"find_masks": find_masks, "set_masks": set_masks, "mask_overlap": mask_overlap},
      sample_input=backbone.sample_input)
