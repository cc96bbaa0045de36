"""A task tree: the sharing structure of a branched network as plain data.

A tree over K tasks and S backbone stages is, for every stage, a partition of the tasks into
groups; the tasks of a group share that stage's parameters (one copy of the stage per group). Each
stage's partition refines the one before (a group of stage s lies inside one group of stage s-1),
so the groups form a tree from the input down to the tasks. E.g. 4 tasks, 3 stages::

    [[[0, 1, 2, 3]], [[0, 1], [2, 3]], [[0], [1], [2], [3]]]

The canonical form (:func:`canonical`) is a tuple (stages) of tuples (groups) of sorted task
indices, groups ordered by their smallest task: it is hashable (a flax module field) and the group
order is the order of the parameter copies ``stage_<s>/group_<j>``. Config files may name tasks by
name or by index. ``hard`` sharing is one group at every stage, ``independent`` networks are
singleton groups everywhere.

Parameter cost (Vandenhende et al. 2020's budget): with ``P_s`` the parameters of one copy of
stage ``s``, a tree costs ``sum_s G_s P_s`` (``G_s`` groups at stage ``s``); :func:`budget_fraction`
divides it by the independent networks' ``K sum_s P_s`` (hard = 1/K, independent = 1).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

Tree = tuple  # tuple[tuple[tuple[int, ...], ...], ...]


def hard_tree(num_tasks: int, num_stages: int) -> Tree:
  return ((tuple(range(num_tasks)),),) * num_stages


def independent_tree(num_tasks: int, num_stages: int) -> Tree:
  return (tuple((k,) for k in range(num_tasks)),) * num_stages


def _task_index(t, task_names: Sequence[str]) -> int:
  k = len(task_names)
  if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
    if not 0 <= int(t) < k:
      raise ValueError(f"task tree: task index {int(t)} out of range 0..{k - 1} ({k} tasks)")
    return int(t)
  if isinstance(t, str):
    if t not in task_names:
      raise ValueError(f"task tree: unknown task {t!r}; valid: {', '.join(task_names)}")
    return task_names.index(t)
  raise ValueError(f"task tree: a task is an index or a name, got {t!r}")


def _partition(stage, s: int, task_names: Sequence[str]) -> tuple:
  if isinstance(stage, (str, bytes)) or not isinstance(stage, Sequence) or not stage:
    raise ValueError(f"task tree: stage {s} must be a non-empty list of groups, got {stage!r}")
  groups, seen = [], {}
  for g in stage:
    if isinstance(g, (str, bytes)) or not isinstance(g, Sequence) or not g:
      raise ValueError(f"task tree: stage {s}: a group is a non-empty list of tasks, got {g!r}")
    idx = [_task_index(t, task_names) for t in g]
    for k in idx:
      if k in seen:
        raise ValueError(f"task tree: stage {s}: task {task_names[k]!r} is in two groups "
                         f"(groups must not overlap)")
      seen[k] = True
    groups.append(tuple(sorted(idx)))
  missing = [task_names[k] for k in range(len(task_names)) if k not in seen]
  if missing:
    raise ValueError(f"task tree: stage {s} misses task(s) {', '.join(missing)} (every stage "
                     f"partitions all {len(task_names)} tasks)")
  return tuple(sorted(groups))


def canonical(tree, task_names: Sequence[str], num_stages: int) -> Tree:
  """The validated canonical tree (None: hard sharing). Raises a one-line ValueError for a wrong
  number of stages, an unknown or missing task, overlapping groups, or a stage that does not
  refine the one before."""
  task_names = list(task_names)
  if tree is None:
    return hard_tree(len(task_names), num_stages)
  if isinstance(tree, (str, bytes)) or not isinstance(tree, Sequence):
    raise ValueError(f"task tree: a list with one partition per stage, got {tree!r}")
  if len(tree) != num_stages:
    raise ValueError(f"task tree: needs one partition per backbone stage ({num_stages}), got "
                     f"{len(tree)}")
  out = tuple(_partition(stage, s, task_names) for s, stage in enumerate(tree))
  for s in range(1, num_stages):
    if parents_of(out[s - 1], out[s]) is None:
      raise ValueError(f"task tree: stage {s} {format_stage(out[s], task_names)} does not refine "
                       f"stage {s - 1} {format_stage(out[s - 1], task_names)} (a group may not "
                       f"join tasks that an earlier stage separated)")
  return out


def parents_of(coarse: tuple, fine: tuple) -> Optional[tuple]:
  """For each group of ``fine``, the index of the group of ``coarse`` holding it; None if
  ``fine`` does not refine ``coarse``."""
  where = {k: i for i, g in enumerate(coarse) for k in g}
  out = []
  for g in fine:
    owners = {where[k] for k in g}
    if len(owners) != 1:
      return None
    out.append(owners.pop())
  return tuple(out)


def parents(tree: Tree) -> tuple:
  """Per stage, the parent group of each group (stage 0: all 0, the input)."""
  return (tuple(0 for _ in tree[0]),) + tuple(parents_of(tree[s - 1], tree[s])
                                               for s in range(1, len(tree)))


def group_of(partition: tuple, task: int) -> int:
  return next(i for i, g in enumerate(partition) if task in g)


def num_groups(tree: Tree) -> tuple:
  return tuple(len(p) for p in tree)


def cost(tree: Tree, stage_params: Sequence[float]) -> float:
  """``sum_s G_s P_s``: the stage parameters of the tree."""
  if len(stage_params) != len(tree):
    raise ValueError(f"stage_params: one count per stage ({len(tree)}), got {len(stage_params)}")
  return float(sum(len(p) * float(n) for p, n in zip(tree, stage_params)))


def budget_fraction(tree: Tree, stage_params: Sequence[float]) -> float:
  """The tree's stage parameters over the independent networks' (hard = 1/K, independent = 1)."""
  k = sum(len(g) for g in tree[0])
  return cost(tree, stage_params) / (k * float(sum(stage_params)))


def shares(tree: Tree, stage_params: Sequence[float]) -> bool:
  """Whether some stage with parameters has a copy shared by two tasks or more (the parameters a
  Gramian combiner's Gramian is over: a branched model's shared mask)."""
  return any(float(n) > 0 and any(len(g) > 1 for g in p) for p, n in zip(tree, stage_params))


def to_list(tree: Tree) -> list:
  """Plain lists of ints (for JSON and configs)."""
  return [[list(g) for g in p] for p in tree]


def format_stage(partition: tuple, task_names: Sequence[str]) -> str:
  return " ".join("{" + ",".join(str(task_names[k]) for k in g) + "}" for g in partition)


def format_tree(tree: Tree, task_names: Sequence[str]) -> str:
  """One line: ``stage 0: {a,b,c} | stage 1: {a,b} {c}``."""
  return " | ".join(f"stage {s}: {format_stage(p, task_names)}" for s, p in enumerate(tree))


def refinements(partition: tuple):
  """Every partition that refines ``partition`` (canonical), including itself."""
  from mtl_jax.analysis.affinity import partitions  # pylint: disable=g-import-not-at-top

  def of_group(g):
    for n in range(1, len(g) + 1):
      for p in partitions(len(g), n):
        yield [tuple(g[i] for i in sub) for sub in p]

  def rec(i):
    if i == len(partition):
      yield []
      return
    for head in of_group(partition[i]):
      for rest in rec(i + 1):
        yield head + rest

  for groups in rec(0):
    yield tuple(sorted(tuple(sorted(g)) for g in groups))


def all_trees(num_tasks: int, num_stages: int):
  """Every tree over ``num_tasks`` tasks and ``num_stages`` stages (canonical)."""

  def rec(prev, s):
    if s == num_stages:
      yield ()
      return
    for p in refinements(prev):
      for rest in rec(p, s + 1):
        yield (p,) + rest

  yield from rec((tuple(range(num_tasks)),), 0)
