"""CelebA, 40 attributes: the FAMO protocol (Liu et al., NeurIPS 2023; ``experiments/celeba`` of
the official repository; REFERENCES.md).

Protocol: the FAMO CNN (``celeba_cnn``), 64×64 images, 40 one-logit heads with BCE, Adam 3e-4,
batch 256, 15 epochs, evaluation every epoch, model selection on the mean validation F1, F1 per
attribute on test and Δm% against the FAMO authors' single-task F1s. Checked against
``experiments/celeba/trainer.py`` and ``data.py`` of Cranial-XIX/FAMO: the same optimiser, rate,
batch, epochs and selection (test F1 at the best mean validation F1 epoch), images resized to
64×64 in [0, 1] without augmentation or normalisation, BCE on sigmoid outputs thresholded at 0.5.
No deviation in these numbers.

Variants: ``''`` the protocol (needs tfds ``celeb_a`` prepared as array_record); ``'smoke'`` mock
data (tfds.testing.mock_data), 5 attributes, a 1/8-width CNN at 32×32, a few steps; ``'quick'`` the real data
(prepared tfds) for 300 steps at batch 64 with a 1/4-width CNN: CPU minutes; CelebA has no
offline source here.
"""

from mtl_jax.configs.common import base_config, check_variant, smoke

TRAIN_SIZE = 162_770


def get_base(variant: str = ""):
  variant = check_variant(variant)
  c = base_config()
  c.data.name = "celeba"
  c.data.image_size = 64
  c.model.backbone = ""  # the benchmark default (celeba_cnn), built with its input options
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-4
  c.train.batch_size = 256
  c.train.num_epochs = 15
  c.train.eval_every = TRAIN_SIZE // 256  # one epoch
  c.train.checkpoint_every = TRAIN_SIZE // 256
  c.train.log_every = 50
  c.train.eval_batch_size = 256
  c.train.select = "mean_main"  # mean validation F1, as FAMO
  if variant == "smoke":
    smoke(c)
    c.tasks = "Attractive,Male,Smiling,Wearing_Hat,Young"  # 5 of 40: keeps the smoke compile short
    c.data.image_size = 32
    c.model.width = 8  # first conv channels (the paper: 64)
  elif variant == "quick":
    c.model.width = 16
    c.train.batch_size = 64
    c.train.num_steps = 300
    c.train.eval_every = 150
    c.train.checkpoint_every = 150
    c.train.log_every = 25
  return c
