"""A small pre-LN Transformer encoder for text, with token- and sentence-level heads.

Architecture: Vaswani et al., "Attention Is All You Need", 2017, with pre-layer-norm blocks (Xiong et
al., "On Layer Normalization in the Transformer Architecture", ICML 2020): token embedding + learned
absolute position embedding (as BERT), then ``num_layers`` blocks

  x = x + Dropout(MHA(LN(x), key padding mask));  x = x + Dropout(MLP(LN(x)))   (MLP: D -> 4D -> D, GELU)

and a final layer norm. There is no official code to match: this is the text backbone of the
library's NLP benchmarks (token tasks such as POS / chunking / NER, hierarchical supervision as in
Søgaard & Goldberg 2016; sentence tasks such as GLUE).

Input (produced by the NLP data pipeline): a dict ``{'tokens': int32 [B, T], 'mask': bool [B, T]}``;
``mask`` is True at real tokens and False at padding (padding tokens may hold any id, conventionally
0). Padding keys are masked out of attention, so the features at valid positions do not depend on
how much padding follows (tested).

Stages: one per block (the first also embeds). Between stages the value is the dict
``{'features': [B, T, D] (the pre-LN residual stream), 'mask': [B, T]}``; the last stage applies the
final layer norm and returns, by ``output``:

* ``'tokens'`` (default): ``[B, T, D]`` token features, zero at padding positions;
* ``'pooled'``: ``[B, D]``, the mean of the token features over the valid positions;
* ``'dict'``: ``{'features': [B, T, D], 'mask': [B, T]}`` (so sentence heads can pool themselves).

Heads: :func:`token_head` (per-token logits) and :func:`pooled_head` (masked-mean pooling, then
logits). Both take an array or a stage dict; on a dict (e.g. a hierarchical head attached below the
top) they first apply their own layer norm, since the residual stream is not normalised there.

Dropout (``dropout``, default 0.1) is active only in train mode when a ``'dropout'`` RNG is passed to
``apply``. A sequence whose mask is all False gives finite (meaningless) features.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import layers
from mtl_jax.models.base import Backbone
from mtl_jax.models.registry import register

OUTPUTS = ("tokens", "pooled", "dict")


def _maybe_dropout(module: nn.Module, x, rate: float, train: bool):
  if not train or rate <= 0.0 or not module.has_rng("dropout"):
    return x
  return nn.Dropout(rate, deterministic=False)(x)


def masked_mean(features, mask):
  """Mean of ``features`` [B, T, D] over the positions where ``mask`` [B, T] is True -> [B, D]."""
  m = mask.astype(features.dtype)[..., None]
  return jnp.sum(features * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x, mask, train: bool):
    attn_mask = nn.make_attention_mask(jnp.ones_like(mask), mask)  # [B, 1, T(query), T(key)]
    y = nn.LayerNorm(epsilon=1e-6, name="ln_attn")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attn")(y, y, mask=attn_mask)
    x = x + _maybe_dropout(self, y, self.dropout, train)
    y = nn.LayerNorm(epsilon=1e-6, name="ln_mlp")(x)
    y = layers.Dense(self.mlp_dim, name="mlp_in")(y)
    y = layers.Dense(x.shape[-1], name="mlp_out")(nn.gelu(y))
    return x + _maybe_dropout(self, y, self.dropout, train)


class TransformerStage(nn.Module):
  """One encoder block; the first stage embeds, the last applies the final LN and the output form."""
  width: int
  num_heads: int
  mlp_dim: int
  vocab_size: int
  max_len: int
  dropout: float = 0.1
  first: bool = False
  last: bool = False
  output: str = "tokens"

  @nn.compact
  def __call__(self, x: dict[str, Any], train: bool):
    if self.first:
      if not isinstance(x, dict) or "tokens" not in x or "mask" not in x:
        raise ValueError("transformer expects {'tokens': int32 [B, T], 'mask': bool [B, T]}")
      tokens, mask = jnp.asarray(x["tokens"], jnp.int32), jnp.asarray(x["mask"], bool)
      if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
        raise ValueError(f"transformer: tokens must be [B, T] with T <= max_len={self.max_len}, got "
                         f"{tokens.shape}")
      emb = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                     name="token_embed")(tokens)
      pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.max_len, self.width))
      feats = _maybe_dropout(self, emb + pos[None, :tokens.shape[1]], self.dropout, train)
    else:
      feats, mask = x["features"], x["mask"]
    feats = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout, name="block")(feats, mask, train)
    if not self.last:
      return {"features": feats, "mask": mask}
    feats = nn.LayerNorm(epsilon=1e-6, name="ln_final")(feats)
    if self.output == "pooled":
      return masked_mean(feats, mask)
    if self.output == "dict":
      return {"features": feats, "mask": mask}
    return feats * mask.astype(feats.dtype)[..., None]


class TokenHead(nn.Module):
  """Per-token logits ``[B, T, num_classes]`` (padding positions must be masked by the loss)."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    if isinstance(x, dict):
      x = nn.LayerNorm(epsilon=1e-6)(x["features"])
    return nn.Dense(self.num_classes)(x)


class PooledHead(nn.Module):
  """Sentence logits ``[B, num_classes]``: masked mean over valid tokens (if given [B, T, D] with a
  mask), then a dense layer. A ``[B, D]`` input (``output='pooled'``) goes straight to the dense."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    if isinstance(x, dict):
      x = masked_mean(nn.LayerNorm(epsilon=1e-6)(x["features"]), x["mask"])
    elif x.ndim == 3:
      raise ValueError("pooled_head needs the mask: give it the stage dict {'features', 'mask'} "
                       "(transformer output='dict') or pooled [B, D] features (output='pooled')")
    return nn.Dense(self.num_classes)(x)


def token_head(num_classes: int) -> TokenHead:
  if num_classes < 1:
    raise ValueError(f"token_head needs num_classes >= 1, got {num_classes}")
  return TokenHead(num_classes)


def pooled_head(num_classes: int) -> PooledHead:
  if num_classes < 1:
    raise ValueError(f"pooled_head needs num_classes >= 1, got {num_classes}")
  return PooledHead(num_classes)


@register("transformer")
def transformer(width: float = 1.0, num_layers: int = 4, num_heads: int = 4, mlp_ratio: int = 4,
                vocab_size: int = 10000, max_len: int = 128, dropout: float = 0.1,
                output: str = "tokens") -> Backbone:
  """A small pre-LN Transformer text encoder (``width=1``: model width 256; 4 layers, 4 heads).

  ``width`` multiplies the model width (256); the MLP has ``mlp_ratio`` times the model width.
  ``vocab_size`` must cover the data pipeline's token ids.
  """
  if width <= 0:
    raise ValueError(f"transformer needs width > 0, got {width}")
  width = max(1, int(round(256 * width)))
  mlp_dim = mlp_ratio * width
  if output not in OUTPUTS:
    raise ValueError(f"transformer output must be one of {', '.join(OUTPUTS)}; got {output!r}")
  if min(width, num_layers, num_heads, mlp_dim, vocab_size, max_len) < 1 or width % num_heads:
    raise ValueError(f"transformer needs positive sizes and a model width (256 x width) divisible by "
                     f"num_heads; got model width {width}, num_heads={num_heads}, num_layers={num_layers}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"transformer dropout must be in [0, 1), got {dropout}")

  def stage(i):
    return lambda: TransformerStage(width, num_heads, mlp_dim, vocab_size, max_len, dropout,
                                    first=i == 0, last=i == num_layers - 1, output=output)

  def sample():
    tokens = np.array([[5, 7, 9, 2, 0, 0], [3, 4, 0, 0, 0, 0]], np.int32) % vocab_size
    return {"tokens": tokens, "mask": tokens != 0}

  return Backbone(name="transformer", stages=tuple(stage(i) for i in range(num_layers)),
                  widths=(width,) * num_layers, sample_input=sample)
