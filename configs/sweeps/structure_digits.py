"""Learning the sharing structure on an image mix (issue 17.7): the digits MultiMNIST-style pairs.

    python launch/sweep.py --config=configs/sweeps/structure_digits.py --workdir=/tmp/structure_digits
    python launch/report.py --workdir=/tmp/structure_digits --out=/tmp/structure_digits_report

Base: ``configs/nash_digits.py:quick`` (scikit-learn's 8x8 digits
overlaid in pairs, offline; LeNet width 10 in two backbone stages, the first convolution block
(5,280 parameters) and the second block with the dense layer (16,050); Adam 5e-4, batch 64). Two
tasks, ``left`` and ``right`` (indices 0, 1), so a tree is one of three: hard sharing, the split
after stage 0 (shared convolutions, a copy of stage 1 per task: 88% of the independent stage
parameters), or the independent networks. Seeds 0 and 1, ``ls`` and ``nash_mtl``, six structures:

* ``hard`` and ``independent``;
* ``branched``: the hand-written tree, stage 0 shared, stage 1 per task, from the first step;
* ``affinity``: hard for 50 steps, the per-stage gradient cosine over the last 16 of them,
  ``choose_tree`` at a budget of 0.9 of the independent stage parameters, then a
  function-preserving split (with two tasks the cheapest tree under that budget is the split
  after stage 0 whenever stage 1's cosine is below 1: the comparison with ``branched`` is "split
  after a shared warm-up" against "split from the start");
* ``conflict``: Recon-style, the stage with the highest conflict score over the same window and
  every stage after it task-specific (for Nash-MTL, which needs shared parameters, stage 0 stays
  shared);
* ``learn_to_branch``: a 50-step Gumbel-softmax search, then the found tree trained;

plus the single-task runs (Δm%'s STL reference): 2 x 2 + 6 x 2 x 2 = 28 runs of 150 steps
(about two epochs of the 4,312 training composites), each well under a CPU minute here.
"""

import ml_collections

from mtl_jax.configs.sweeps import structure_variants

TREE = "structure.tree=(((0,1),),((0,),(1,)))"


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.base = "configs/nash_digits.py:quick"
  c.overrides = ("train.num_steps=150", "train.eval_every=75", "train.log_every=15",
                 "train.checkpoint_every=150", "structure.warmup_steps=50", "structure.window=16",
                 "structure.budget=0.9")
  c.combiners = ("ls", "nash_mtl")
  c.sharing = ("hard", "independent", "branched", "affinity", "conflict", "learn_to_branch")
  c.sharing_variants = structure_variants(TREE)
  c.seeds = (0, 1)
  c.task_mixes = ("left,right",)
  c.all_tasks = ("left", "right")
  c.single_task = True
  c.single_task_combiner = "ls"
  c.single_task_overrides = ()
  c.single_task_tasks = ""
  if (arg or "").strip():
    raise ValueError(f"unknown sweep variant {arg!r}; valid: ''")
  return c
