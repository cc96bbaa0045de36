"""Sharing structure as data: task trees, choosing them from affinity, changing them in a running
model, and learning them.

* :mod:`mtl_jax.structure.tree`: the task tree (per stage, a partition of the tasks), validation,
  parameter cost;
* :mod:`mtl_jax.structure.affinity`: per-stage task affinity from per-task gradients;
* :mod:`mtl_jax.structure.choose`: ``choose_tree(affinity, stage_params, budget)``;
* :mod:`mtl_jax.structure.surgery`: function-preserving ``split`` and averaging ``merge`` of a
  training state;
* :mod:`mtl_jax.structure.ltb`: Learning to Branch (Gumbel-softmax parent choices) ending in a tree.

The ``branched`` sharing strategy (:mod:`mtl_jax.sharing.branched`) builds a network from a tree.
"""

from mtl_jax.structure import tree
from mtl_jax.structure.tree import canonical, format_tree, hard_tree, independent_tree

__all__ = ["canonical", "format_tree", "hard_tree", "independent_tree", "tree"]
