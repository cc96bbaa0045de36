"""MultiMNIST (Sener & Koltun, NeurIPS 2018): two overlaid MNIST digits, tasks ``left``/``right``.

Protocol: the LeNet-style shared encoder (``lenet``, width 10) with per-task heads (dense 50 →
dropout → dense 10), 28×28 composites (see ``mtl_jax.data.multimnist``), cross-entropy, accuracy.
Optimiser: Adam 5e-4, batch 256 — the settings of the official repository's ``sample.json``; the
official repository has no MultiMNIST-specific config file, so these, and 100 epochs, are this
library's reading of it, not a verified paper table. Selection on mean validation accuracy.

Variants: ``''`` (tfds ``mnist`` prepared); ``'smoke'`` mock data, a few steps; ``'quick'``: the
offline digits variant (``digits_base``) is the real-data quick run; here ``quick`` is 300 steps
of batch 64 on prepared tfds mnist.
"""

from mtl_jax.configs.common import base_config, check_variant, smoke


def get_base(variant: str = "", name: str = "multimnist", train_size: int = 50_000):
  variant = check_variant(variant)
  c = base_config()
  c.data.name = name
  c.data.pair_seed = 0
  c.model.backbone = ""  # the benchmark default (lenet), built with its input options
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 5e-4
  c.train.batch_size = 256
  c.train.num_epochs = 100
  c.train.eval_every = train_size // 256
  c.train.checkpoint_every = train_size // 256
  c.train.log_every = 50
  c.train.eval_batch_size = 256
  c.train.select = "mean_main"
  if variant == "smoke":
    smoke(c)
    c.model.width = 2
  elif variant == "quick":
    c.train.batch_size = 64
    c.train.num_steps = 300
    c.train.eval_every = 150
    c.train.checkpoint_every = 150
    c.train.log_every = 25
  return c
