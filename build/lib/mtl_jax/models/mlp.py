"""A tiny MLP backbone (tests, toys, tabular tasks): one stage per hidden layer."""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn

from mtl_jax import layers
from mtl_jax.models.base import batch_norm as base_batch_norm
import numpy as np

from mtl_jax.models.base import Backbone
from mtl_jax.models.registry import register

ACTIVATIONS = {"relu": nn.relu, "tanh": nn.tanh, "gelu": nn.gelu, "silu": nn.silu}


class DenseStage(nn.Module):
  """``Dense -> [BatchNorm] -> activation`` on (B, D) (inputs of higher rank are flattened)."""

  features: int
  activation: str = "relu"
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")
    if x.ndim > 2:
      x = x.reshape(x.shape[0], -1)
    x = layers.Dense(self.features, use_bias=not self.batch_norm)(x)
    if self.batch_norm:
      x = base_batch_norm(train, momentum=0.9)(x)
    return ACTIVATIONS[self.activation](x)


@register("mlp")
def mlp(input_dim: int = 8, widths: Sequence[int] = (16, 16), activation: str = "relu",
        batch_norm: bool = False, width: float = 1.0) -> Backbone:
  """An MLP with one stage per entry of ``widths`` (each scaled by ``width``)."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
  widths = tuple(max(1, int(round(w * width))) for w in widths)
  if not widths:
    raise ValueError("mlp needs at least one hidden layer (widths is empty)")
  stages = tuple(
      functools.partial(DenseStage, features=w, activation=activation, batch_norm=batch_norm)
      for w in widths)
  return Backbone("mlp", stages, widths,
                  sample_input=lambda: np.zeros((2, int(input_dim)), np.float32))
