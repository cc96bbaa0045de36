"""Changing the tree of a running branched model: ``split`` (function-preserving) and ``merge``.

``split(state, old_tree, new_tree)``: ``new_tree`` refines ``old_tree`` at every stage (each new
group lies inside one old group). Every new group's copy of a stage starts as a copy of the old
group that holds it: its parameters, batch statistics, optimizer moments and any combiner state
with the parameters' tree. The network therefore computes exactly the same predictions right after
the split (each task's path through the stages runs the same weights on the same inputs) and the
optimizer continues with the moments the shared copy had (Adam's next update of every child is
what the parent's would have been for the same gradient). This is Net2Net-style
function-preserving growth (Chen, Goodfellow, Shlens, "Net2Net", ICLR 2016) applied to the
branches of Vandenhende et al. (2020), who instead retrain the branched network from scratch.

``merge(state, old_tree, new_tree)``: the reverse, ``old_tree`` refines ``new_tree``; a merged
group's copy is the element-wise mean of the copies it merges (parameters, batch statistics,
optimizer moments and combiner state alike; integer leaves, e.g. counters, take the first copy's
value). Merging copies that differ changes the function (an averaged network is not the average
of the networks); merging copies that are equal (e.g. right after a split) restores the original
state up to float rounding of the mean.

Both work on any pytree: every dict node that holds ``stage_<s>`` entries keyed by ``group_<j>``
(the layout of :mod:`mtl_jax.sharing.branched`) is rewritten, whatever holds it (``TrainState``
params, ``batch_stats``, optax states, combiner states); every other leaf is returned unchanged.
The rewritten leaves are fresh buffers (copies), so the state can be donated to a jitted step.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.structure import tree as T

_STAGE = re.compile(r"stage_(\d+)")
_GROUP = re.compile(r"group_(\d+)")


def _is_branched(node) -> bool:
  if not isinstance(node, Mapping):
    return False
  return any(_STAGE.fullmatch(str(k)) and isinstance(v, Mapping) and v
             and all(_GROUP.fullmatch(str(g)) for g in v) for k, v in node.items())


def _copy(x):
  if isinstance(x, jax.Array):
    return jnp.array(x, copy=True)
  return np.array(x, copy=True)


def _mean(leaves):
  first = leaves[0]
  if len(leaves) == 1 or not jnp.issubdtype(jnp.result_type(first), jnp.inexact):
    return _copy(first)
  total = leaves[0]
  for x in leaves[1:]:
    total = total + x
  return (total / len(leaves)).astype(jnp.result_type(first))


def _sources(old, new, refine: bool) -> list:
  """Per stage: for each new group, the old groups it is made from (one for a split)."""
  out = []
  for s, (po, pn) in enumerate(zip(old, new)):
    if refine:
      par = T.parents_of(po, pn)
      if par is None:
        raise ValueError(f"split: stage {s} of the new tree does not refine the old one "
                         f"({pn} vs {po}); use merge for the reverse")
      out.append([[p] for p in par])
    else:
      par = T.parents_of(pn, po)
      if par is None:
        raise ValueError(f"merge: the old tree's stage {s} does not refine the new one "
                         f"({po} vs {pn}); use split for the reverse")
      out.append([[j for j, p in enumerate(par) if p == i] for i in range(len(pn))])
  return out


def _rewrite(node, sources, old, reduce: Callable):
  out = dict(node)
  for key, groups in node.items():
    m = _STAGE.fullmatch(str(key))
    if not m or not isinstance(groups, Mapping):
      continue
    s = int(m.group(1))
    if s >= len(sources):
      raise ValueError(f"{key}: the trees have {len(sources)} stages")
    if len(groups) != len(old[s]):
      raise ValueError(f"{key} holds {len(groups)} group copies but the old tree has "
                       f"{len(old[s])} groups at stage {s}: wrong old_tree")
    out[key] = {f"group_{j}": jax.tree.map(lambda *xs: reduce(list(xs)),
                                            *[groups[f"group_{i}"] for i in src])
                for j, src in enumerate(sources[s])}
  return out


def _restructure(state, old_tree, new_tree, refine: bool, reduce: Callable):
  old, new = tuple(old_tree), tuple(new_tree)
  if len(old) != len(new):
    raise ValueError(f"the trees have different numbers of stages ({len(old)} vs {len(new)})")
  sources = _sources(old, new, refine)
  return jax.tree.map(lambda n: _rewrite(n, sources, old, reduce) if _is_branched(n) else n,
                      state, is_leaf=_is_branched)


def _canon(tree, ref):
  tasks = list(range(sum(len(g) for g in ref[0])))
  return T.canonical(tree, tasks, len(ref))


def split(state: Any, old_tree: Sequence, new_tree: Sequence) -> Any:
  """``state`` with every branched subtree copied from ``old_tree``'s groups into the groups of
  ``new_tree`` (which must refine it stage by stage). Trees by task index (canonical or not)."""
  old = _canon(old_tree, old_tree)
  new = _canon(new_tree, old)
  return _restructure(state, old, new, True, lambda xs: _copy(xs[0]))


def merge(state: Any, old_tree: Sequence, new_tree: Sequence) -> Any:
  """``state`` with the groups of ``old_tree`` averaged into the coarser groups of ``new_tree``."""
  old = _canon(old_tree, old_tree)
  new = _canon(new_tree, old)
  return _restructure(state, old, new, False, _mean)
