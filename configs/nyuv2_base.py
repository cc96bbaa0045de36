"""NYUv2, 3 tasks (13-class segmentation, depth, surface normals) in MTAN's preprocessing, under the
protocol of CAGrad (Liu et al., NeurIPS 2021) and Nash-MTL (Navon et al., ICML 2022).

Protocol: MTAN (SegNet with task attention, ``sharing='mtan'``) at 288×384, Adam 1e-4 halved after
100 of 200 epochs (StepLR(100, 0.5)), batch 2, MTAN's scale-crop + flip augmentation, metrics
mIoU / pixel accuracy, depth abs / rel error, normal angle mean / median / within 11.25, 22.5, 30°;
Δm% against the CAGrad single-task baseline.

Checked against Nash-MTL's ``experiments/nyuv2/trainer.py`` (Adam 1e-4, ``StepLR(100, 0.5)``,
200 epochs, batch 2, ``--apply-augmentation`` default on, MTAN) and CAGrad's ``nyuv2/run.sh``.
Deviations from the official trainers (Nash-MTL ``experiments/nyuv2/trainer.py``, CAGrad): the
papers report the test metrics averaged over the last epochs (the val split, which is also the
``test`` split here); selection here is the best validation Δm% epoch (``train.select``).

Variants: ``''`` the protocol (MTAN folder at ``data.data_dir``, default ~/mtl_data/nyuv2);
``'smoke'`` fabricated arrays at 24×32, a 4-channel SegNet with hard sharing, a few steps;
``'quick'`` the real folder at 96×128 (resized), SegNet width 16, 200 steps: CPU minutes.
"""

from mtl_jax.configs.common import base_config, check_variant, smoke


def get_base(variant: str = "", name: str = "nyuv2", train_size: int = 795, batch: int = 2,
             smoke_size: int = 24):
  variant = check_variant(variant)
  c = base_config()
  c.data.name = name
  c.data.augment = True
  c.model.backbone = ""  # the benchmark default (segnet), built with its input options
  c.model.sharing = "mtan"
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-4
  c.optimizer.schedule = "step"
  c.optimizer.decay_boundaries = (0.5,)
  c.optimizer.decay_rate = 0.5
  c.train.batch_size = batch
  c.train.num_epochs = 200
  c.train.eval_every = train_size // batch
  c.train.checkpoint_every = train_size // batch
  c.train.log_every = 50
  c.train.eval_batch_size = batch
  c.train.select = "delta_m"
  if variant == "smoke":
    smoke(c, batch=2)
    c.data.image_size = smoke_size
    c.model.width = 4
    c.model.sharing = "hard"
  elif variant == "quick":
    c.data.image_size = 96
    c.model.width = 16
    c.model.sharing = "hard"
    c.train.batch_size = 8
    c.train.num_steps = 200
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.train.log_every = 20
  return c
