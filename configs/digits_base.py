"""MultiMNIST-style benchmark built offline from scikit-learn's 8×8 digits (``data.name='digits'``;
construction in ``mtl_jax.data.multimnist``): real data, no download, CPU minutes.

Same model and optimiser as ``multimnist_base`` (LeNet width 10, Adam 5e-4) but a constant rate
(not the MGDA trainer's 0.85 every 10 epochs: this is no paper's protocol); 4,312 training
composites, so an epoch is 16 steps of batch 256; 50 epochs for the full variant.

Variants: ``''`` 50 epochs at batch 256; ``'smoke'`` a few steps with a narrow LeNet; ``'quick'``
300 steps of batch 64 (about 4.5 epochs) with evaluation every 100 steps: about a CPU minute.
"""

from mtl_jax.configs.multimnist_base import get_base as _multimnist


def get_base(variant: str = ""):
  c = _multimnist(variant, name="digits", train_size=4312)
  c.data.pairs_per_image = 4
  c.data.mock = False  # the digits are offline: smoke runs on the real (small) data too
  if not variant:
    c.train.num_epochs = 50
    c.optimizer.schedule = "constant"
  elif variant == "quick":
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
  return c
