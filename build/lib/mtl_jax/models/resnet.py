"""ResNet-18 for small images (CIFAR-style stem).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, with the small-image stem used
throughout the CIFAR literature (e.g. ``kuangliu/pytorch-cifar``): one 3x3 convolution (stride 1,
64 channels) + batch norm + ReLU and no max-pool, then four stages of ``BasicBlock`` s with
64, 128, 256, 512 channels, strides 1, 2, 2, 2 and ``blocks=(2, 2, 2, 2)`` (ResNet-18). Convolutions
have no bias; a 1x1 convolution + batch norm projects the shortcut when the shape changes.

Stages: (stem + stage 1), stage 2, stage 3, (stage 4 + global average pool). With ``pool=True`` (the
default) the last stage returns ``[B, 8 width]`` for classification heads; ``pool=False`` keeps the
feature map ``[B, H/8, W/8, 8 width]``.

Batch norm: ``momentum=0.9, epsilon=1e-5`` (PyTorch's momentum 0.1 and eps), statistics in the
``batch_stats`` collection. Deviations: flax default initialisation (LeCun normal) instead of
PyTorch's Kaiming; ``width`` (a multiplier of the channels) and ``blocks`` are options so smoke runs can be tiny.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from mtl_jax.models.base import batch_norm as base_batch_norm
import jax.numpy as jnp
import numpy as np

from mtl_jax.models.base import Backbone
from mtl_jax.models.registry import register
from mtl_jax import layers
from mtl_jax.layers import Conv


def batch_norm(train: bool, name: str | None = None, scale_init=nn.initializers.ones) -> nn.BatchNorm:
  """Batch norm with PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5)."""
  return base_batch_norm(train, momentum=0.9, epsilon=1e-5, name=name, scale_init=scale_init)


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers with an identity (or projected) shortcut."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    y = Conv(self.features, (3, 3), strides=self.stride, padding=1, use_bias=False)(x)
    y = nn.relu(batch_norm(train)(y))
    y = Conv(self.features, (3, 3), padding=1, use_bias=False)(y)
    y = batch_norm(train)(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = Conv(self.features, (1, 1), strides=self.stride, use_bias=False, name="proj")(x)
      x = batch_norm(train, name="proj_bn")(x)
    return nn.relu(x + y)


class ResNetStage(nn.Module):
  """One ResNet stage; the first stage carries the stem, the last one the optional global pool."""
  features: int
  num_blocks: int
  stride: int
  stem: bool = False
  pool: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    if self.stem:
      x = layers.as_float(x)
      if x.ndim != 4:
        raise ValueError(f"resnet18 expects images [B, H, W, C], got shape {x.shape}")
      x = Conv(self.features, (3, 3), padding=1, use_bias=False, name="stem")(x)
      x = nn.relu(batch_norm(train, name="stem_bn")(x))
    for i in range(self.num_blocks):
      x = BasicBlock(self.features, self.stride if i == 0 else 1)(x, train)
    if self.pool:
      x = jnp.mean(x, axis=(1, 2))
    return x


@register("resnet18")
def resnet18(width: float = 1.0, blocks: Sequence[int] = (2, 2, 2, 2), pool: bool = True,
             image_size: int = 32, in_channels: int = 3) -> Backbone:
  """ResNet-18 (``blocks=(2, 2, 2, 2)``, ``width=1``: 64..512 channels) with the 3x3 stem."""
  blocks = tuple(int(b) for b in blocks)
  if len(blocks) != 4 or min(blocks) < 1 or width <= 0:
    raise ValueError(f"resnet18 needs 4 positive block counts and width > 0, got blocks={blocks}, "
                     f"width={width}")
  base = max(1, int(round(64 * width)))
  feats = tuple(base * 2**i for i in range(4))
  strides = (1, 2, 2, 2)

  def stage(i):
    return lambda: ResNetStage(feats[i], blocks[i], strides[i], stem=i == 0, pool=pool and i == 3)

  return Backbone(
      name="resnet18",
      stages=tuple(stage(i) for i in range(4)),
      widths=feats,
      sample_input=lambda: np.zeros((2, image_size, image_size, in_channels), np.float32),
  )
