"""Max pooling whose derivative is elementwise (non-overlapping windows).

Why: the gradient of ``flax.linen.max_pool`` is XLA's ``select-and-scatter``. XLA-CPU expands it
into an explicit scatter: an index array the size of the pooled input times its rank (an ``iota``
and a concatenation of ``s32[N, 5]`` coordinates), then a scatter over them. In the engine's
``jacobian`` mode the backward runs for K tasks at once (vmapped), and on the CelebA CNN these
kernels were a tenth of a Jacobian step's time and their index arrays half its temporaries
(``docs/performance.md``).

:func:`max_pool` computes the same value and, for windows that tile the input (stride == window,
no padding: the 2x2 pools of the CelebA CNN and LeNet), has a ``custom_jvp``: the tangent of a
window's maximum is the tangent of its first maximal element in row-major window order -- the
element XLA's ``select-and-scatter`` with ``>=`` selects, so gradients are bit-identical, ties
included. JAX transposes that rule into the backward pass (a one-hot mask times the broadcast
output gradient: one fused elementwise kernel, batched or not), and forward mode uses it as is, so
the engine's ``gramian`` mode traces the same pooling in its VJP and its linearisation (XLA then
shares their forward pass). What it bought is measured in ``docs/performance.md``.

Anything else (overlapping windows, padding) calls ``flax.linen.max_pool`` unchanged. Deviation:
in a window holding a NaN the derivative is the (first) NaN's; XLA's comparison-based selection
picks another element. Either way the step's loss is NaN, which the engine skips.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def max_pool(x, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding="VALID"):
  """``flax.linen.max_pool`` (NHWC) with an elementwise backward pass for tiling windows."""
  window = tuple(int(w) for w in window_shape)
  strides = window if strides is None else tuple(int(s) for s in strides)
  tiling = (x.ndim == 4 and len(window) == 2 and strides == window and padding == "VALID"
            and all(x.shape[1 + i] >= window[i] for i in range(2)))
  if not tiling:
    return nn.max_pool(x, window, strides=strides, padding=padding)
  return _pool(window, x)


def _windows(window, x):
  """``x`` cropped to whole windows as ``(B, Ho, Wo, kh*kw, C)``, window index row-major."""
  (kh, kw), (b, h, w, c) = window, x.shape
  ho, wo = h // kh, w // kw
  x = x[:, :ho * kh, :wo * kw]
  x = x.reshape(b, ho, kh, wo, kw, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, ho, wo, kh * kw, c)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _pool(window, x):
  return jnp.max(_windows(window, x), axis=3)


@_pool.defjvp
def _pool_jvp(window, primals, tangents):
  (x,), (dx,) = primals, tangents
  xw = _windows(window, x)
  # argmax returns the first maximum: the element select-and-scatter with >= picks.
  first = jnp.argmax(xw, axis=3)
  hit = first[:, :, :, None, :] == jnp.arange(xw.shape[3], dtype=first.dtype)[:, None]
  dy = jnp.sum(jnp.where(hit, _windows(window, dx), jnp.zeros((), dx.dtype)), axis=3)
  return jnp.max(xw, axis=3), dy
