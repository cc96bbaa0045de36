"""Dilated ResNet-50 encoder (output stride 8) and the DeepLab-v3 decoder for dense prediction.

Encoder: He et al. 2016 ResNet-50 (bottleneck blocks ``(3, 4, 6, 3)``, stride on the 3x3 conv as in
torchvision), turned into a dilated network (Yu et al., "Dilated Residual Networks", CVPR 2017) the
way LibMTL's ``resnet_dilated(..., dilate_scale=8)`` does for its NYUv2 / Cityscapes benchmarks
(Lin & Zhang, "LibMTL", JMLR 2023; the same encoder/decoder pair as the CAGrad / Nash-MTL line of
work when it uses a ResNet): stages 3 and 4 lose their stride; the 3x3 convolutions of stage 3 get
dilation 2 (its first block keeps dilation 1, where the stride was) and those of stage 4 dilation 4
(first block 2). The 7x7/2 stem and the 3x3/2 max-pool give stride 4, stage 2 stride 8, so the
output is ``[B, H/8, W/8, 2048 width]``.

Stages: (stem + stage 1), stage 2, stage 3, stage 4. ``blocks`` sets the depth (``(1, 1, 1, 1)`` for
smoke tests), ``width`` multiplies every channel count.

Decoder: :func:`deeplab_head` (LibMTL's ``DeepLabHead``, Chen et al., "Rethinking Atrous
Convolution", 2017): ASPP with a 1x1 branch, three 3x3 atrous branches (rates 12, 24, 36), an
image-pooling branch (each 256 channels, conv-BN-ReLU, no conv bias), concatenation, 1x1 projection
to 256 + BN + ReLU + dropout 0.5, then 3x3 conv 256 + BN + ReLU and a 1x1 conv to the task's
channels; the prediction is bilinearly resized (``align_corners=True`` as LibMTL) to the input size
(``scale=8`` times the feature map, or ``out_size``).

Deviations: no ImageNet weights (nothing is downloaded; LibMTL starts from pretrained ones); flax
default initialisation; dropout is active only in train mode when a ``'dropout'`` RNG is passed to
``apply``; batch norm with PyTorch's momentum/eps.
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


def _bn(train: bool, name: str | None = None) -> nn.BatchNorm:
  return base_batch_norm(train, momentum=0.9, epsilon=1e-5, name=name)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), with a projected shortcut when the shape changes."""
  planes: int
  stride: int = 1
  dilation: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    out = 4 * self.planes
    d = self.dilation
    y = nn.relu(_bn(train)(Conv(self.planes, (1, 1), use_bias=False)(x)))
    y = Conv(self.planes, (3, 3), strides=self.stride, padding=d, kernel_dilation=d,
             use_bias=False)(y)
    y = nn.relu(_bn(train)(y))
    y = _bn(train)(Conv(out, (1, 1), use_bias=False)(y))
    if self.stride != 1 or x.shape[-1] != out:
      x = Conv(out, (1, 1), strides=self.stride, use_bias=False, name="proj")(x)
      x = _bn(train, name="proj_bn")(x)
    return nn.relu(x + y)


class DilatedStage(nn.Module):
  planes: int
  num_blocks: int
  stride: int = 1
  dilation: int = 1  # dilation of blocks 2..n; block 1 uses max(dilation // 2, 1)
  stem: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    if self.stem:
      x = layers.as_float(x)
      if x.ndim != 4:
        raise ValueError(f"dilated_resnet expects images [B, H, W, C], got shape {x.shape}")
      x = Conv(self.planes, (7, 7), strides=2, padding=3, use_bias=False, name="stem")(x)
      x = nn.relu(_bn(train, name="stem_bn")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i in range(self.num_blocks):
      first = i == 0
      x = Bottleneck(self.planes, self.stride if first else 1,
                     max(self.dilation // 2, 1) if first else self.dilation)(x, train)
    return x


def resize_bilinear_align_corners(x, size: tuple[int, int]):
  """Bilinear resize of ``[B, H, W, C]`` to ``size`` with ``align_corners=True`` (PyTorch's)."""

  def axis_weights(n_in, n_out):
    pos = np.zeros(n_out) if n_out == 1 else np.arange(n_out) * (n_in - 1) / (n_out - 1)
    lo = np.clip(np.floor(pos).astype(np.int32), 0, n_in - 1)
    hi = np.clip(lo + 1, 0, n_in - 1)
    frac = (pos - lo).astype(np.float32)
    return lo, hi, frac

  lo, hi, fr = axis_weights(x.shape[1], size[0])
  x = x[:, lo] * (1 - fr)[None, :, None, None] + x[:, hi] * fr[None, :, None, None]
  lo, hi, fr = axis_weights(x.shape[2], size[1])
  return x[:, :, lo] * (1 - fr)[None, None, :, None] + x[:, :, hi] * fr[None, None, :, None]


class ConvBNReLU(nn.Module):
  features: int
  kernel: int = 1
  dilation: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    pad = self.dilation * (self.kernel // 2)
    x = Conv(self.features, (self.kernel, self.kernel), padding=pad,
             kernel_dilation=self.dilation, use_bias=False)(x)
    return nn.relu(_bn(train)(x))


class ASPP(nn.Module):
  rates: tuple[int, ...] = (12, 24, 36)
  features: int = 256
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool):
    branches = [ConvBNReLU(self.features, 1)(x, train)]
    branches += [ConvBNReLU(self.features, 3, r)(x, train) for r in self.rates]
    pooled = ConvBNReLU(self.features, 1)(jnp.mean(x, axis=(1, 2), keepdims=True), train)
    branches.append(jnp.broadcast_to(pooled, x.shape[:3] + (self.features,)))
    y = ConvBNReLU(self.features, 1)(jnp.concatenate(branches, axis=-1), train)
    if train and self.dropout > 0.0 and self.has_rng("dropout"):
      y = nn.Dropout(self.dropout, deterministic=False)(y)
    return y


class DeepLabHead(nn.Module):
  """ASPP -> conv3x3-BN-ReLU -> conv1x1 to ``out_channels`` -> bilinear resize to the input size."""
  out_channels: int
  rates: tuple[int, ...] = (12, 24, 36)
  features: int = 256
  dropout: float = 0.5
  scale: int = 8
  out_size: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = ASPP(self.rates, self.features, self.dropout)(x, train)
    y = ConvBNReLU(self.features, 3)(y, train)
    y = Conv(self.out_channels, (1, 1))(y)
    size = self.out_size or (x.shape[1] * self.scale, x.shape[2] * self.scale)
    return resize_bilinear_align_corners(y, tuple(size))


def deeplab_head(out_channels: int, rates: Sequence[int] = (12, 24, 36), features: int = 256,
                 dropout: float = 0.5, scale: int = 8,
                 out_size: tuple[int, int] | None = None) -> DeepLabHead:
  """LibMTL's DeepLab-v3 decoder for one dense task (13 classes / 1 depth / 3 normals)."""
  if out_channels < 1 or features < 1 or len(tuple(rates)) < 1:
    raise ValueError(f"deeplab_head needs out_channels >= 1, features >= 1 and at least one rate, "
                     f"got out_channels={out_channels}, features={features}, rates={rates}")
  return DeepLabHead(out_channels, tuple(int(r) for r in rates), features, dropout, scale,
                     None if out_size is None else tuple(out_size))


@register("dilated_resnet")
def dilated_resnet(width: float = 1.0, blocks: Sequence[int] = (3, 4, 6, 3),
                   image_size: tuple[int, int] | int = (32, 32), in_channels: int = 3) -> Backbone:
  """Dilated ResNet-50 encoder, output stride 8 (``width=1``, ``blocks=(3, 4, 6, 3)``)."""
  blocks = tuple(int(b) for b in blocks)
  if len(blocks) != 4 or min(blocks) < 1 or width <= 0:
    raise ValueError(f"dilated_resnet needs 4 positive block counts and width > 0, got "
                     f"blocks={blocks}, width={width}")
  base = max(1, int(round(64 * width)))
  planes = tuple(base * 2**i for i in range(4))
  strides = (1, 2, 1, 1)
  dilations = (1, 1, 2, 4)

  def stage(i):
    return lambda: DilatedStage(planes[i], blocks[i], strides[i], dilations[i], stem=i == 0)

  hh, ww = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  return Backbone(
      name="dilated_resnet",
      stages=tuple(stage(i) for i in range(4)),
      widths=tuple(4 * p for p in planes),
      sample_input=lambda: np.zeros((2, hh, ww, in_channels), np.float32),
  )
