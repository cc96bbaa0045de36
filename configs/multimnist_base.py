"""MultiMNIST (Sener & Koltun, NeurIPS 2018): two overlaid MNIST digits, tasks ``left``/``right``.

Protocol: the LeNet-style shared encoder (``lenet``, width 10) with per-task heads (dense 50 →
dropout → dense 10), 28×28 composites (see ``mtl_jax.data.multimnist``), cross-entropy, accuracy.
Optimiser, as the official trainer (``multi_task/train_multi_task.py`` of
isl-org/MultiObjectiveOptimization, checked): Adam 5e-4, batch 256 (its ``sample.json``; the
repository has no MultiMNIST-specific parameter file), 100 epochs (``NUM_EPOCHS``), the rate
multiplied by 0.85 at the start of every 10th epoch (epochs 10, 20, ..., 100: ``step`` boundaries
at 9/100, ..., 99/100 of training); no augmentation.
Deviations: the official trainer selects no model (it evaluates on the MNIST test split, its only
held-out one, every epoch); here selection is on the mean accuracy of a validation split carved
from the training digits (``mtl_jax.data.multimnist``), tested on the MNIST test digits.

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
  if not variant:
    c.optimizer.schedule = "step"  # lr *= 0.85 when (epoch + 1) % 10 == 0, as the official loop
    c.optimizer.decay_boundaries = tuple((10 * i - 1) / 100 for i in range(1, 11))
    c.optimizer.decay_rate = 0.85
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
