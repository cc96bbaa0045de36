"""Generic task heads: a dense head (optionally pooling spatial inputs) and a per-token dense head.

Heads follow the convention of :mod:`mtl_jax.sharing`: ``__call__(z, train=False)``; ``train`` is
accepted (and ignored here) so that heads with batch norm or dropout fit the same call.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

POOLS = ("mean", "max", "none")


class DenseHead(nn.Module):
  """``Dense(features)`` on a feature vector.

  Inputs of rank > 2 ((B, H, W, C), (B, T, C), ...) are reduced over their middle axes with
  ``pool`` (``'mean'``: global average pooling, ``'max'``, or ``'none'``: flatten). ``squeeze``
  drops a last axis of size 1, so a one-unit head gives predictions of shape (B,) (binary and
  scalar-regression targets have that shape).
  """

  features: int
  pool: str = "mean"
  squeeze: bool = False
  use_bias: bool = True

  @nn.compact
  def __call__(self, z, train: bool = False):
    del train
    if self.pool not in POOLS:
      raise ValueError(f"DenseHead: unknown pool {self.pool!r}; valid: {', '.join(POOLS)}")
    if z.ndim > 2:
      if self.pool == "mean":
        z = jnp.mean(z, axis=tuple(range(1, z.ndim - 1)))
      elif self.pool == "max":
        z = jnp.max(z, axis=tuple(range(1, z.ndim - 1)))
      else:
        z = z.reshape(z.shape[0], -1)
    y = nn.Dense(self.features, use_bias=self.use_bias)(z)
    return y[..., 0] if self.squeeze and self.features == 1 else y


class TokenHead(nn.Module):
  """``Dense(features)`` applied at every position of (B, T, C) or every pixel of (B, H, W, C)
  (a 1x1 convolution): token classification, per-pixel segmentation/depth/normal logits."""

  features: int
  squeeze: bool = False
  use_bias: bool = True

  @nn.compact
  def __call__(self, z, train: bool = False):
    del train
    y = nn.Dense(self.features, use_bias=self.use_bias)(z)
    return y[..., 0] if self.squeeze and self.features == 1 else y


# Per-pixel heads are per-token heads over the spatial positions.
PixelHead = TokenHead
