"""The LeNet-style shared encoder of the MultiMNIST experiments.

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018 (official code:
``intel-isl/MultiObjectiveOptimization``, ``multi_lenet.py``): the shared representation is

  conv 10@5x5 -> max-pool 2 -> ReLU -> conv 20@5x5 -> [channel dropout] -> max-pool 2 -> ReLU
  -> flatten -> dense 50 -> ReLU

and each task head is dense 50 -> ReLU -> dense 10 (see :func:`lenet_head`). Inputs are single-channel
images, ``[B, H, W]`` or ``[B, H, W, 1]`` (36x36 for MultiMNIST as in the paper, 28x28 for plain
MNIST); the flattened size follows from the input (320 for 28x28, 720 for 36x36).

Stages: (conv part) -> ``[B, h, w, 20]`` and (dense part) -> ``[B, 50]``.

Deviations from the official code, all deliberate:
* Dropout. The official encoder multiplies the conv-2 output by one Bernoulli(0.5) channel mask per
  batch without rescaling, and does not rescale at evaluation either, so train and eval activations
  differ by a factor 2 in expectation. Here the mask is also one per batch and per channel, but it is
  rescaled by ``1 / (1 - dropout)`` (inverted dropout), so evaluation needs no correction. It is
  active only in train mode *and* when the caller passes a ``'dropout'`` RNG
  (``apply(..., rngs={'dropout': key})``); without that RNG the network is deterministic. Heads use
  the same rule.
* Initialisation: flax defaults (LeCun normal kernels, zero biases) instead of PyTorch's defaults.
* ``width`` multiplies all layer sizes (10, 20, 50 at ``width=1``, the paper's network).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import layers
from mtl_jax.models.base import Backbone
from mtl_jax.models.registry import register
from mtl_jax.layers import Conv
from mtl_jax.models.pool import max_pool


def _channel_dropout(module: nn.Module, x, rate: float, train: bool):
  """One Bernoulli keep-mask per channel shared by the batch (as the official code), rescaled."""
  if not train or rate <= 0.0 or not module.has_rng("dropout"):
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, (1,) * (x.ndim - 1) + x.shape[-1:])
  return jnp.where(keep, x / (1.0 - rate), 0.0)


class LeNetConv(nn.Module):
  """Stage 1: two 5x5 convolutions with max-pooling; ``[B, H, W(, 1)] -> [B, h, w, conv2]``."""
  conv1: int = 10
  conv2: int = 20
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool):
    x = layers.as_float(x)
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4:
      raise ValueError(f"lenet expects images [B, H, W] or [B, H, W, C], got shape {x.shape}")
    x = Conv(self.conv1, (5, 5), padding="VALID", name="conv1")(x)
    x = nn.relu(max_pool(x, (2, 2), strides=(2, 2)))
    x = Conv(self.conv2, (5, 5), padding="VALID", name="conv2")(x)
    x = _channel_dropout(self, x, self.dropout, train)
    return nn.relu(max_pool(x, (2, 2), strides=(2, 2)))


class LeNetDense(nn.Module):
  """Stage 2: flatten and one dense layer with ReLU; ``[B, h, w, c] -> [B, hidden]``."""
  hidden: int = 50

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    x = x.reshape(x.shape[0], -1)
    return nn.relu(layers.Dense(self.hidden, name="fc")(x))


class LeNetHead(nn.Module):
  """The official per-task head: dense(hidden) -> ReLU -> dropout -> dense(num_classes) (logits)."""
  num_classes: int = 10
  hidden: int = 50
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(layers.Dense(self.hidden, name="fc1")(x))
    if train and self.dropout > 0.0 and self.has_rng("dropout"):
      x = nn.Dropout(self.dropout, deterministic=False)(x)
    return layers.Dense(self.num_classes, name="fc2")(x)


def lenet_head(num_classes: int = 10, hidden: int = 50, dropout: float = 0.5) -> LeNetHead:
  """Task head of the official MultiMNIST code (returns logits; the official code log-softmaxes)."""
  return LeNetHead(num_classes=num_classes, hidden=hidden, dropout=dropout)


@register("lenet")
def lenet(width: float = 1.0, image_size: int = 36, dropout: float = 0.5) -> Backbone:
  """The MultiMNIST shared encoder of Sener & Koltun (2018); ``width=1`` is the paper's network."""
  if width <= 0 or image_size < 16:
    raise ValueError(f"lenet needs width > 0 and image_size >= 16, got width={width}, "
                     f"image_size={image_size}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"lenet dropout must be in [0, 1), got {dropout}")
  c1, c2, hid = (max(1, int(round(n * width))) for n in (10, 20, 50))
  return Backbone(
      name="lenet",
      stages=(lambda: LeNetConv(conv1=c1, conv2=c2, dropout=dropout), lambda: LeNetDense(hidden=hid)),
      widths=(c2, hid),
      sample_input=lambda: np.zeros((2, image_size, image_size, 1), np.float32),
  )
