"""SegNet as used by MTAN (and by CAGrad / Nash-MTL / FAMO) for NYUv2 and Cityscapes.

Badrinarayanan et al., "SegNet", TPAMI 2017, in the variant of Liu et al., "End-to-End Multi-Task
Learning with Attention", CVPR 2019 (official code ``lorenmt/mtan``, ``SegNet`` of
``model_segnet_split.py`` / ``model_segnet_mtan.py``). With ``f = (w, 2w, 4w, 8w, 8w)``, ``w = 64 width``:

* 5 encoder levels; level ``i`` is 2, 2, 3, 3, 3 ``conv3x3 -> BN -> ReLU`` layers (the first maps to
  ``f[i]``), then a 2x2 max-pool that remembers where each maximum came from;
* 5 decoder levels; level ``i`` max-unpools with the mask of encoder level ``4 - i`` (the value goes
  back to the position of the maximum, zeros elsewhere) and applies 3, 3, 3, 2, 2 conv-BN-ReLU
  layers with outputs ``f[3], f[2], f[1], f[0], f[0]``.

The output is a dense feature map ``[B, H, W, w]``; task heads are :func:`conv_head` (MTAN's
``conv3x3(w -> w) -> conv1x1(w -> C)``: 13 classes for segmentation, 1 for depth, 3 for normals).
Inputs are images ``[B, H, W, 3]`` with H and W divisible by 2**levels (288x384 for NYUv2).

Stages and what flows between them: 10 stages (5 encoder levels, then 5 decoder levels). Between
stages the value is a :class:`SegNetState` ``(features, pool_masks)``: ``features`` is the feature
map of that level and ``pool_masks`` the tuple of unpooling masks still needed by the decoder
(the pytree grows by one mask per encoder level and shrinks by one per decoder level). The first
stage takes the image array, the last stage returns the plain feature-map array. ``widths`` are the
channels of ``features`` after each stage. A sharing strategy that mixes features between stages
acts on ``state.features`` and passes ``pool_masks`` along.

Deviations: PyTorch's ``MaxPool2d(return_indices=True)`` picks the first maximum of each window in
row-major order; the mask here does the same (ties go to the first). Convolutions keep their bias as in
the official code and use its Xavier-normal initialisation; batch norm uses PyTorch's momentum and
eps. ``width`` (a channel multiplier) and ``levels`` are options so smoke runs can be tiny (the
paper: 1 and 5).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn

from mtl_jax.models.base import batch_norm as base_batch_norm
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.models.base import Backbone
from mtl_jax.models.registry import register
from mtl_jax import layers
from mtl_jax.layers import Conv

_ENC_CONVS = (2, 2, 3, 3, 3)
_DEC_CONVS = (3, 3, 3, 2, 2)


class SegNetState(NamedTuple):
  features: jax.Array  # [B, h, w, C]
  pool_masks: tuple  # one [B, h, 2, w, 2, C] bool mask per encoder level not yet unpooled


def max_pool_with_mask(x):
  """2x2/2 max-pool of ``[B, H, W, C]`` and the one-hot mask of each window's (first) argmax."""
  b, h, w, c = x.shape
  win = x.reshape(b, h // 2, 2, w // 2, 2, c)
  flat = win.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)
  idx = jnp.argmax(flat, axis=-1)  # the first maximum, as PyTorch's indices
  onehot = jax.nn.one_hot(idx, 4, dtype=bool).reshape(b, h // 2, w // 2, c, 2, 2)
  mask = onehot.transpose(0, 1, 4, 2, 5, 3)  # [B, h/2, 2, w/2, 2, C]
  return jnp.max(flat, axis=-1), mask


def max_unpool(x, mask):
  """Inverse of :func:`max_pool_with_mask`: each value goes back to its argmax, zeros elsewhere."""
  b, h, w, c = x.shape
  up = jnp.where(mask, x[:, :, None, :, None, :], jnp.zeros((), x.dtype))
  return up.reshape(b, 2 * h, 2 * w, c)


class ConvBNReLU(nn.Module):
  """MTAN's ``conv_layer``: conv3x3 (with bias) -> batch norm -> ReLU."""
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = Conv(self.features, (3, 3), padding=1, kernel_init=nn.initializers.xavier_normal())(x)
    x = base_batch_norm(train, momentum=0.9, epsilon=1e-5)(x)
    return nn.relu(x)


class SegNetEncoderLevel(nn.Module):
  features: int
  num_convs: int
  first: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    if self.first:
      x = layers.as_float(x)
      if x.ndim != 4:
        raise ValueError(f"segnet expects images [B, H, W, C], got shape {x.shape}")
      state = SegNetState(x, ())
    else:
      state = x
    h = state.features
    if h.shape[1] % 2 or h.shape[2] % 2:
      raise ValueError(f"segnet: feature map {h.shape[1]}x{h.shape[2]} cannot be max-pooled by 2; "
                       "image height and width must be divisible by 2**levels")
    for _ in range(self.num_convs):
      h = ConvBNReLU(self.features)(h, train)
    pooled, mask = max_pool_with_mask(h)
    return SegNetState(pooled, state.pool_masks + (mask,))


class SegNetDecoderLevel(nn.Module):
  features: int
  num_convs: int
  last: bool = False

  @nn.compact
  def __call__(self, state: SegNetState, train: bool):
    h = max_unpool(state.features, state.pool_masks[-1])
    for _ in range(self.num_convs):
      h = ConvBNReLU(self.features)(h, train)
    return h if self.last else SegNetState(h, state.pool_masks[:-1])


class ConvHead(nn.Module):
  """MTAN's prediction layer: conv3x3 (C_in -> C_in) -> conv1x1 (C_in -> out_channels), no norm.

  ``normalize=True`` divides the output by its L2 norm over channels (MTAN's surface-normal head).
  """
  out_channels: int
  hidden: int = 0  # 0 = the input channels, as MTAN
  normalize: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    init = nn.initializers.xavier_normal()
    x = Conv(self.hidden or x.shape[-1], (3, 3), padding=1, kernel_init=init)(x)
    x = Conv(self.out_channels, (1, 1), kernel_init=init)(x)
    if self.normalize:
      x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return x


def conv_head(out_channels: int, hidden: int = 0, normalize: bool = False) -> ConvHead:
  """A dense-prediction head: 13 (segmentation logits), 1 (depth) or 3 (normals, ``normalize``)."""
  if out_channels < 1:
    raise ValueError(f"conv_head needs out_channels >= 1, got {out_channels}")
  return ConvHead(out_channels=out_channels, hidden=hidden, normalize=normalize)


@register("segnet")
def segnet(width: float = 1.0, levels: int = 5, image_size: tuple[int, int] | int = (32, 32),
           in_channels: int = 3) -> Backbone:
  """MTAN's SegNet (``width=1``: 64..512 channels, ``levels=5``); fewer levels drop the deepest."""
  if not 1 <= levels <= 5 or width <= 0:
    raise ValueError(f"segnet needs 1 <= levels <= 5 and width > 0, got levels={levels}, "
                     f"width={width}")
  w = max(1, int(round(64 * width)))
  f = (w, 2 * w, 4 * w, 8 * w, 8 * w)[:levels]
  enc_convs = _ENC_CONVS[:levels]
  dec_out = tuple(reversed((f[0],) + f[:-1]))  # decoder level i maps to f[levels - 2 - i] (f[0] last)
  dec_convs = _DEC_CONVS[5 - levels:]

  def enc(i):
    return lambda: SegNetEncoderLevel(f[i], enc_convs[i], first=i == 0)

  def dec(i):
    return lambda: SegNetDecoderLevel(dec_out[i], dec_convs[i], last=i == levels - 1)

  hh, ww = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  return Backbone(
      name="segnet",
      stages=tuple(enc(i) for i in range(levels)) + tuple(dec(i) for i in range(levels)),
      widths=f + dec_out,
      sample_input=lambda: np.zeros((2, hh, ww, in_channels), np.float32),
  )
