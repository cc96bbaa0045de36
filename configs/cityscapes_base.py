"""Cityscapes, 2 tasks (7-class segmentation, depth) in MTAN's preprocessing (128×256), under the
CAGrad / Nash-MTL protocol: MTAN, Adam 1e-4 halved after 100 of 200 epochs, batch 8, metrics mIoU /
pixel accuracy / depth abs and rel error, Δm% against the CAGrad single-task baseline (as in the
Nash-MTL repository: 0.7401, 0.9316, 0.0125, 27.77). MTAN's scale-crop + flip augmentation on
(checked: CAGrad's ``cityscapes/run.sh`` passes ``--apply_augmentation`` to every run and FAMO's
``experiments/cityscapes/trainer.py`` defaults it on; the Nash-MTL repository has no Cityscapes
trainer). Deviation: as NYUv2's, selection by the best validation Δm% epoch where the papers
average the last epochs.

Variants: ``''`` the protocol (folder at ``data.data_dir``, default ~/mtl_data/cityscapes);
``'smoke'`` fabricated arrays at 16×32, tiny SegNet, a few steps; ``'quick'`` the real folder at
64×128, SegNet width 16, 200 steps.
"""

from mtl_jax.configs.nyuv2_base import get_base as _dense


def get_base(variant: str = ""):
  c = _dense(variant, name="cityscapes", train_size=2975, batch=8, smoke_size=16)
  if variant == "quick":
    c.data.image_size = 64
  return c
