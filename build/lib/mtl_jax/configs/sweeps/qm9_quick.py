"""QM9 quick study: five combiners and the single-task baselines on real QM9 (qm9pack), CPU-sized.

    python launch/sweep.py --config=configs/sweeps/qm9_quick.py --workdir=/tmp/qm9_sweep
    python launch/report.py --workdir=/tmp/qm9_sweep --out=/tmp/qm9_report

Base: ``configs/ls_qm9.py:quick`` (MPNN width 32 on bonded graphs, batch 64, Adam 1e-3, targets
standardised; test MAE in the paper's units; selection by validation Δm%).

Sized for under an hour on 2 CPU cores. Measured on the idle 2-core machine with the QM9 cache
built: 11 min 47 s for the 16 runs (single-task 21-31 s each, LS/UW 28-37 s, PCGrad/MGDA/Nash-MTL
62-80 s: start-up, compilation, 150 steps and 3 evaluations); ``launch/report.py`` 10.5 s.

* **Task subset**: 3 of the 11 targets, ``mu`` (dipole moment), ``homo`` (an orbital energy) and
  ``U0`` (an atomization energy), one of each kind. All 11 would need 22 single-task runs for two
  seeds, several hours here; run ``--config.task_mixes=all --config.all_tasks=<the 11 names>``
  (see ``mtl_jax.data.qm9.TARGETS``) on a bigger machine.
* 150 steps of batch 64 (9,600 molecules, under a tenth of an epoch), evaluation every 50 steps on
  500 validation / 500 test molecules. Far from the paper's 300 epochs: the numbers compare
  methods at equal (small) budget, they do not reproduce Table 3.
* Five combiners: ``ls``, ``uw``, ``pcgrad``, ``mgda``, ``nash_mtl`` (each with its official
  defaults), hard sharing, seeds 0 and 1, and the single-task runs of the three targets for the
  same two seeds (16 runs).
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.base = "configs/ls_qm9.py:quick"
  c.overrides = ("train.num_steps=150", "train.eval_every=50", "train.log_every=10",
                 "train.checkpoint_every=150", "data.eval_limit=500",
                 "train.eval_train_batches=4")
  c.combiners = ("ls", "uw", "pcgrad", "mgda", "nash_mtl")
  c.sharing = ("hard",)
  c.seeds = (0, 1)
  c.task_mixes = ("mu,homo,U0",)
  c.all_tasks = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "Cv")
  c.single_task = True  # one run per task of every mix and seed: the STL baseline
  c.single_task_combiner = "ls"
  c.single_task_overrides = ()
  c.single_task_tasks = ""  # "" = the tasks of the mixes
  return c
