"""Branched networks: a task tree decides which tasks share each stage.

Vandenhende, Georgoulis, De Brabandere, Van Gool, "Branched Multi-Task Networks: Deciding What
Layers To Share", BMVC 2020; Guo, Lee, Ulbricht, "Learning to Branch for Multi-Task Learning",
ICML 2020. The structure is plain data (:mod:`mtl_jax.structure.tree`):
``sharing_options.tree`` holds, per backbone stage, a partition of the tasks into groups, each
stage refining the one before. Stage ``s`` has one copy per group, its variables under
``stage_<s>/group_<j>`` (group ``j`` of the canonical partition); the copies of a stage are
stacked at run time and applied with ``jax.vmap``, each copy reading the output of its parent
group. Task ``k``'s head reads the copy of the last stage that holds ``k``.

* ``tree=None`` (the default) is one group everywhere: ``hard`` sharing, with the same parameter
  count and, from the same init key, the same parameter values and outputs.
* Singleton groups at every stage are ``independent`` towers (again the same count, values and
  outputs from the same key: the copies of a stage are initialised like the towers, from
  ``split(rng, G)``).
* Shared mask: a group's copy is shared iff the group holds two tasks or more (then the combiner's
  Gramian includes it); singleton groups' copies and the heads are task-specific.

Changing the tree of a trained model without changing its function is
:func:`mtl_jax.structure.surgery.split`.
"""

from __future__ import annotations

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.sharing.base import (STATE_COLLECTIONS, Defs, MultiTaskModel, _call_module, _unfreeze,
                                  head_defs, register, run, stage_defs, take)
from mtl_jax.structure import tree as T

PARTS = ("all", "encode", "decode")


def group_key(j: int) -> str:
  return f"group_{j}"


def _stack(groups: dict, n: int):
  return jax.tree.map(lambda *a: jnp.stack(a), *[groups[group_key(j)] for j in range(n)])


def _unstack(tree, n: int) -> dict:
  return {group_key(j): take(tree, j) for j in range(n)}


def _init_groups(parent: nn.Module, name: str, m: nn.Module, x, n: int, x_axis):
  """Create ``name``'s variables: one copy per group (``split(rng, n)``; one group: ``rng``)."""
  def init_one(r, xx):
    return _unfreeze(m.init({"params": r, "dropout": r}, xx, False))

  rng = parent.make_rng("params")
  if n == 1:
    v = {c: {group_key(0): col}
         for c, col in init_one(rng, x if x_axis is None else take(x, 0)).items()}
  else:
    v = {c: _unstack(col, n)
         for c, col in jax.vmap(init_one, in_axes=(0, x_axis))(jax.random.split(rng, n), x).items()}
  for col, val in v.items():
    if col == "params":
      parent.param(name, lambda _r, val=val: val)
    else:
      parent.variable(col, name, lambda val=val: val)


def run_groups(parent: nn.Module, name: str, m: nn.Module, x, train: bool, n: int, x_axis):
  """Apply ``n`` copies of stage ``m`` (variables ``name/group_<j>``): ``x_axis=None`` feeds every
  copy ``x``, ``0`` feeds copy ``j`` the slice ``x[j]``. Returns outputs stacked on a leading axis
  of size ``n`` (one group: the plain call, no vmap, then a leading axis of 1)."""
  if parent.is_initializing() and not parent.has_variable("params", name) and not any(
      parent.has_variable(c, name) for c in STATE_COLLECTIONS):
    _init_groups(parent, name, m, x, n, x_axis)
  params = parent.get_variable("params", name) if parent.has_variable("params", name) else {}
  state = {c: parent.get_variable(c, name) for c in STATE_COLLECTIONS if parent.has_variable(c, name)}
  mutable = [c for c in state if train and parent.is_mutable_collection(c)]
  rng = parent.make_rng("dropout") if train and parent.has_rng("dropout") else None

  def call(p, s, xx, r):
    variables = dict(s, params=p) if p else dict(s)
    y, upd = _call_module(m, variables, xx, train, {"dropout": r} if r is not None else {},
                          mutable, "positional")
    return y, ({} if upd is None else _unfreeze(upd))

  if n == 1:
    one = lambda tree: tree[group_key(0)] if tree else tree
    y, upd = call(one(params), {c: one(v) for c, v in state.items()},
                  x if x_axis is None else take(x, 0), rng)
    y, upd = jax.tree.map(lambda a: a[None], (y, upd))
  else:
    stacked = {c: _stack(v, n) for c, v in state.items()}
    rngs = jax.random.split(rng, n) if rng is not None else None
    y, upd = jax.vmap(call, in_axes=(0, 0, x_axis, None if rngs is None else 0))(
        _stack(params, n) if params else {}, stacked, x, rngs)
  for col in mutable:
    parent.put_variable(col, name, _unstack(upd[col], n))
  return y


class BranchedModel(nn.Module):
  """A branched network over ``tree`` (canonical, see :mod:`mtl_jax.structure.tree`)."""

  stages: Defs
  heads: Defs
  task_names: tuple
  tree: tuple

  @nn.compact
  def __call__(self, x, train: bool = False, part: str = "all"):
    if part not in PARTS:
      raise ValueError(f"unknown part {part!r}; valid: {', '.join(PARTS)}")
    if part != "all" and len(self.tree[-1]) != 1:
      raise ValueError("a branched model whose last stage has several groups has no single "
                       "shared representation (part='all' only)")
    if part != "decode":
      parents = T.parents(self.tree)
      axis = None
      for s, stage in enumerate(self.stages.modules):
        n = len(self.tree[s])
        if axis is not None and parents[s] != tuple(range(n)):
          x = jax.tree.map(lambda a, p=np.asarray(parents[s]): a[p], x)
        x = run_groups(self, f"stage_{s}", stage, x, train, n, axis)
        axis = 0
      if part == "encode":
        return take(x, 0)
    else:
      x = jax.tree.map(lambda a: a[None], x)
    last = self.tree[-1]
    return {t: run(self, f"head_{t}", h, take(x, T.group_of(last, k)), train, stage=False)
            for k, (t, h) in enumerate(zip(self.task_names, self.heads.modules))}


def shared_fn(tree):
  """``params -> tree of bools``: a stage copy is shared iff its group holds >= 2 tasks."""
  sizes = {f"stage_{s}": {group_key(j): len(g) > 1 for j, g in enumerate(p)}
           for s, p in enumerate(tree)}

  def shared(params):
    out = {}
    for name, sub in params.items():
      if name in sizes:
        out[name] = {gk: jax.tree.map(lambda _, v=sizes[name][gk]: v, gv) for gk, gv in sub.items()}
      else:
        out[name] = jax.tree.map(lambda _: False, sub)
    return out

  return shared


@register("branched")
def branched(backbone, tasks, *, tree=None) -> MultiTaskModel:
  """A branched network: ``tree`` = per stage, a partition of the tasks (names or indices) into
  groups, each refining the previous stage's (None: one group everywhere, = ``hard``)."""
  names = tuple(t.name for t in tasks)
  canon = T.canonical(tree, names, len(backbone.stages))
  module = BranchedModel(Defs(stage_defs(backbone)), Defs(head_defs(tasks)), names, canon)
  describe = T.format_tree(canon, names)
  logging.info("branched sharing: %s", describe)
  return MultiTaskModel("branched", module, names, shared_fn(canon),
                        options={"tree": T.to_list(canon)}, has_split=len(canon[-1]) == 1,
                        info={"tree": canon, "describe": describe},
                        sample_input=backbone.sample_input)
