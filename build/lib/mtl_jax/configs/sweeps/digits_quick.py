"""Digits (MultiMNIST-style, offline from scikit-learn) quick study: two tasks, five combiners,
single-task baselines; the two-task mix gives the trade-off scatter.

    python launch/sweep.py --config=configs/sweeps/digits_quick.py --workdir=/tmp/digits_sweep
    python launch/report.py --workdir=/tmp/digits_sweep --out=/tmp/digits_report

Base: ``configs/nash_digits.py:quick`` (LeNet width 10, Adam 5e-4, batch 64). Here 200 steps with
evaluation every 50; combiners ``ls``, ``uw``, ``pcgrad``, ``mgda``, ``nash_mtl``, seeds 0 and 1,
and single-task runs of ``left`` and ``right`` (14 runs; about half a minute to a minute each on
2 CPU cores).
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.base = "configs/nash_digits.py:quick"
  c.overrides = ("train.num_steps=200", "train.eval_every=50", "train.log_every=10",
                 "train.checkpoint_every=200", "train.eval_train_batches=2")
  c.combiners = ("ls", "uw", "pcgrad", "mgda", "nash_mtl")
  c.sharing = ("hard",)
  c.seeds = (0, 1)
  c.task_mixes = ("left,right",)
  c.all_tasks = ("left", "right")
  c.single_task = True
  c.single_task_combiner = "ls"
  c.single_task_overrides = ()
  c.single_task_tasks = ""
  return c
