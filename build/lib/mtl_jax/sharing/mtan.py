"""MTAN (Liu, Johns & Davison 2019, "End-to-End Multi-Task Learning with Attention", CVPR):
a shared trunk and, per task, soft attention modules that select features from every stage.

For stage j with shared output ``p_j`` and task t:

    a_t^j = g_t^j([p_j, f_t^{j-1}(a_hat_t^{j-1})])     (j = 1: g_t^1(p_1))
    a_hat_t^j = a_t^j * p_j

``g`` is MTAN's attention layer: 1x1 conv -> BN -> ReLU -> 1x1 conv -> BN -> sigmoid (width of
the stage); ``f`` is its shared-to-next-stage layer: 3x3 conv -> BN -> ReLU to the next stage's
width, then pooled to the next stage's resolution (2x2 max pools in MTAN; here max pooling by the
integer size ratio, a global average when the next stage has no spatial axes, or a resize). Task
t's head reads ``a_hat_t`` of the last stage.

Deviation: MTAN's attention reads the block's *intermediate* feature ``u_j`` (after the first
conv of a block) for the mask and applies it to the block output ``p_j``; a backbone stage here
exposes only its output, so the mask is computed from and applied to ``p_j``. On features
without spatial axes (MLP, tokens) 1x1 and 3x3 convolutions are dense layers over the last
axis. Stage outputs must be arrays with channels last.

``encode`` gives the tuple of stage outputs (the shared representation), ``decode`` the
attention modules and heads; all trunk stages are shared, attention modules and heads are not.
"""

from __future__ import annotations

import flax.linen as nn

from mtl_jax.models.base import batch_norm as base_batch_norm
import jax
import jax.numpy as jnp

from mtl_jax.layers import Conv
from mtl_jax.sharing.base import (Defs, MultiTaskModel, head_defs, path_mask, register, run,
                                  stage_defs)

_BN = dict(momentum=0.9, epsilon=1e-5)


class _Attention(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(self.features, use_bias=True)(x)
    x = nn.relu(base_batch_norm(train, **_BN)(x))
    x = nn.Dense(self.features, use_bias=True)(x)
    return nn.sigmoid(base_batch_norm(train, **_BN)(x))


class _Shared2Next(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    if x.ndim == 4:
      x = Conv(self.features, (3, 3), padding="SAME", use_bias=True)(x)
    else:
      x = nn.Dense(self.features)(x)
    return nn.relu(base_batch_norm(train, **_BN)(x))


def match_resolution(x, like):
  """Bring ``x`` (B, *S, C) to the spatial shape of ``like`` (B, *S', C')."""
  if x.ndim > like.ndim:  # the next stage pooled the space away
    return jnp.mean(x, axis=tuple(range(1, x.ndim - like.ndim + 1)))
  if x.ndim != like.ndim:
    raise ValueError(f"mtan: cannot match features of rank {x.ndim} to rank {like.ndim}")
  src, dst = x.shape[1:-1], like.shape[1:-1]
  if src == dst:
    return x
  if all(s % d == 0 for s, d in zip(src, dst)) and x.ndim == 4:
    window = tuple(s // d for s, d in zip(src, dst))
    return nn.max_pool(x, window, strides=window)
  return jax.image.resize(x, x.shape[:1] + tuple(dst) + x.shape[-1:], "linear")


class MTANModel(nn.Module):
  stages: Defs
  heads: Defs
  task_names: tuple

  @nn.compact
  def __call__(self, x, train: bool = False, part: str = "all"):
    if part not in ("all", "encode", "decode"):
      raise ValueError(f"unknown part {part!r}; valid: all, encode, decode")
    if part == "decode":
      feats = tuple(x)
    else:
      feats = []
      for i, stage in enumerate(self.stages.modules):
        x = run(self, f"stage_{i}", stage, x, train)
        if not isinstance(x, jax.Array) or x.ndim < 2:
          raise ValueError(f"mtan needs array stage outputs (B, ..., C); stage {i} gave "
                           f"{jax.tree.map(jnp.shape, x)}")
        feats.append(x)
      feats = tuple(feats)
      if part == "encode":
        return feats
    out = {}
    for k, (t, head) in enumerate(zip(self.task_names, self.heads.modules)):
      prev = None
      for j, p in enumerate(feats):
        inp = p if prev is None else jnp.concatenate([p, prev], axis=-1)
        a = _Attention(p.shape[-1], name=f"att{k}_{j}")(inp, train)
        hat = a * p
        if j + 1 < len(feats):
          nxt = feats[j + 1]
          prev = match_resolution(_Shared2Next(nxt.shape[-1], name=f"att{k}_f{j}")(hat, train),
                                  nxt)
      out[t] = run(self, f"head_{t}", head, hat, train, stage=False)
    return out


@register("mtan", split=True)
def mtan(backbone, tasks) -> MultiTaskModel:
  """MTAN attention modules per task over every stage of a shared trunk (no option)."""
  names = tuple(t.name for t in tasks)
  module = MTANModel(Defs(stage_defs(backbone)), Defs(head_defs(tasks)), names)
  return MultiTaskModel("mtan", module, names, lambda p: path_mask(p, ("stage_",)),
                        has_split=True, sample_input=backbone.sample_input)
