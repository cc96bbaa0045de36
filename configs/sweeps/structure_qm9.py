"""Learning the sharing structure on QM9 (issue 17.7): which tasks should share which stages.

    python launch/sweep.py --config=configs/sweeps/structure_qm9.py:smoke --workdir=/tmp/structure_smoke
    python launch/sweep.py --config=configs/sweeps/structure_qm9.py --workdir=/tmp/structure_qm9
    python launch/report.py --workdir=/tmp/structure_qm9 --out=/tmp/structure_report

Base: ``configs/ls_qm9.py:quick`` (real QM9 from qm9pack, MPNN width 32 on bonded graphs, batch 64,
two backbone stages: the message-passing block and the Set2Set readout). Four targets, ``mu``,
``alpha``, ``homo``, ``U0`` (indices 0..3 of the mix in the trees below), seeds 0 and 1, each with
``ls`` and ``nash_mtl``, over six structures:

* ``hard`` and ``independent`` (the two extremes of a tree);
* ``branched``: a hand-written tree, the shared message passing then {mu, alpha} / {homo, U0};
* ``affinity``: hard for 24 steps, the per-stage gradient cosine over the last 8 of them,
  ``choose_tree`` at half the independent networks' stage parameters, a function-preserving split;
* ``conflict``: Recon-style, the stage with the highest conflict score task-specific (same run);
* ``learn_to_branch``: a 24-step Gumbel-softmax search, then the found tree trained;

plus the single-task runs (the STL reference of Δm%): 4 x 2 + 6 x 2 x 2 = 32 runs of 80 steps
(a comparison at equal small budget, not the paper's protocol; 250 evaluation molecules). This
default is the study run here (README, docs/structure_study.md: about 23 minutes of wall time as
two parallel sweeps on a shared 2-core CPU).
``:long`` is the larger grid: 200 steps, the split after step 60 measured over 20 steps, 500
evaluation molecules, and Recon's retrain-from-scratch (``recon``, ``structure.restart``) as a
seventh structure: 36 runs (not run here).
``:smoke`` is the same grid on fabricated molecules (``nash_qm9.py:smoke``), two structures
(``hard``, ``affinity``), one seed: minutes here.
"""

import ml_collections

from mtl_jax.configs.sweeps import structure_variants

TREE = "structure.tree=(((0,1,2,3),),((0,1),(2,3)))"


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.base = "configs/ls_qm9.py:quick"
  # The protocol run here: 80 steps (the split after step 24, measured over steps 16..23), 250
  # evaluation molecules, no Recon restart (see :long): 8 + 6 x 2 x 2 = 32 runs.
  c.overrides = ("train.num_steps=80", "train.eval_every=40", "train.log_every=8",
                 "train.checkpoint_every=80", "data.eval_limit=250",
                 "structure.warmup_steps=24", "structure.window=8", "structure.budget=0.5")
  c.combiners = ("ls", "nash_mtl")
  c.sharing = ("hard", "independent", "branched", "affinity", "conflict", "learn_to_branch")
  c.sharing_variants = structure_variants(TREE, recon=True)
  c.seeds = (0, 1)
  c.task_mixes = ("mu,alpha,homo,U0",)
  c.all_tasks = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "Cv")
  c.single_task = True
  c.single_task_combiner = "ls"
  c.single_task_overrides = ()
  c.single_task_tasks = ""
  if (arg or "").strip() == "smoke":
    c.base = "configs/nash_qm9.py:smoke"
    c.overrides = ("structure.warmup_steps=2", "structure.window=2")
    c.sharing = ("hard", "affinity")
    c.seeds = (0,)
  elif (arg or "").strip() == "long":
    c.overrides = ("train.num_steps=200", "train.eval_every=100", "train.log_every=20",
                   "train.checkpoint_every=200", "data.eval_limit=500",
                   "structure.warmup_steps=60", "structure.window=20", "structure.budget=0.5")
    c.sharing = ("hard", "independent", "branched", "affinity", "conflict", "recon",
                 "learn_to_branch")
  elif (arg or "").strip():
    raise ValueError(f"unknown sweep variant {arg!r}; valid: '', long, smoke")
  return c
