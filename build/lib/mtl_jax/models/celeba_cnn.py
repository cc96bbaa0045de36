"""The CelebA CNN of the FAMO protocol (Liu et al. 2023, "FAMO: Fast Adaptive Multitask
Optimization", CelebA experiment; ``../shared/REFERENCES.md``).

conv 64 -> pool -> conv 128, 128 -> pool -> conv 256, 256 -> pool -> conv 512, 512 -> global
average pool -> dense 512, 512; every conv/dense is followed by batch norm and ReLU; convs are 3x3,
stride 1, 'SAME' padding, without bias; pools are 2x2 max pools. The 40 one-unit heads are the
tasks' (:func:`mtl_jax.tasks.binary_task`). The network is image-size agnostic (global pooling);
``width`` scales every channel count (smoke configs use e.g. 1/16).

Stages (for the sharing strategies): [conv64, pool], [conv128 x2, pool], [conv256 x2, pool],
[conv512 x2, global pool], [dense512 x2].

Deviations: dense layers keep their bias (PyTorch ``nn.Linear`` default) although batch norm
follows; batch-norm momentum 0.9 and epsilon 1e-5 match PyTorch's defaults (momentum 0.1 there
is the weight of the new batch).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn

from mtl_jax.models.base import batch_norm as base_batch_norm
import jax.numpy as jnp
import numpy as np

from mtl_jax import layers
from mtl_jax.models.base import Backbone
from mtl_jax.models.registry import register
from mtl_jax.layers import Conv
from mtl_jax.models.pool import max_pool

_BN = dict(momentum=0.9, epsilon=1e-5)


class ConvBlock(nn.Module):
  """``len(features)`` x [conv 3x3 (no bias) -> BN -> ReLU], then 2x2 max pool or global pool."""

  features: Sequence[int]
  pool: str = "max"  # 'max' | 'global' | 'none'

  @nn.compact
  def __call__(self, x, train: bool = False):
    for f in self.features:
      x = Conv(f, (3, 3), padding="SAME", use_bias=False)(x)
      x = base_batch_norm(train, **_BN)(x)
      x = nn.relu(x)
    if self.pool == "max":
      x = max_pool(x, (2, 2), strides=(2, 2))
    elif self.pool == "global":
      x = jnp.mean(x, axis=(1, 2))
    return x


class DenseBlock(nn.Module):
  """``len(features)`` x [dense -> BN -> ReLU]."""

  features: Sequence[int]

  @nn.compact
  def __call__(self, x, train: bool = False):
    for f in self.features:
      x = layers.Dense(f)(x)
      x = base_batch_norm(train, **_BN)(x)
      x = nn.relu(x)
    return x


@register("celeba_cnn")
def celeba_cnn(width: float = 1.0, image_size: int = 64) -> Backbone:
  """The FAMO CelebA CNN; ``width`` scales the channels; ``image_size`` only sets the sample input."""
  if width <= 0:
    raise ValueError(f"celeba_cnn: width must be > 0, got {width}")
  c = lambda n: max(1, int(round(n * width)))
  stages = (
      functools.partial(ConvBlock, features=(c(64),), pool="max"),
      functools.partial(ConvBlock, features=(c(128), c(128)), pool="max"),
      functools.partial(ConvBlock, features=(c(256), c(256)), pool="max"),
      functools.partial(ConvBlock, features=(c(512), c(512)), pool="global"),
      functools.partial(DenseBlock, features=(c(512), c(512))),
  )
  size = int(image_size)
  return Backbone("celeba_cnn", stages, (c(64), c(128), c(256), c(512), c(512)),
                  sample_input=lambda: np.zeros((2, size, size, 3), np.float32))
