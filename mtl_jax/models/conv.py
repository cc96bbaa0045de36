"""A 2-D convolution whose backward pass is written in XLA's canonical convolution layout.

Why: XLA-CPU runs a convolution through its fast (Eigen) kernel only in the canonical form
``NHWC x HWIO -> NHWC``. JAX's transpose rules express the two backward convolutions by relabelling
dimensions (the input gradient reads the kernel as ``HWOI``, the kernel gradient reads the
activations with batch and feature swapped) and leave it to XLA's ``ConvCanonicalization`` pass to
insert the transposes. That pass visits the entry computation only: a backward pass inside a loop
body -- the engine's streamed ``gramian`` mode computes one task's gradient per iteration of a
``lax.scan`` -- falls back to a naive convolution loop. Measured on 2 CPU cores, the CelebA CNN at
32x32, batch 16: one VJP at top level 0.19 s, the same VJP inside ``lax.scan`` 4.0 s.

:func:`conv_general_dilated` is a drop-in for ``jax.lax.conv_general_dilated`` (flax's ``nn.Conv``
takes it as its ``conv_general_dilated`` attribute) with a ``custom_vjp`` whose backward pass
transposes the operands explicitly and calls canonical convolutions, so it is fast wherever it is
placed. It covers the case every backbone here uses -- 2-D, ``NHWC``/``HWIO``, any stride, padding
and kernel dilation, no input dilation, one feature group -- and calls
``jax.lax.conv_general_dilated`` unchanged for anything else. Forward-mode differentiation of a
``custom_vjp`` function is not available in JAX (and a JVP obtained by transposing this VJP would
relabel dimensions again): code that needs forward mode traces under :func:`forward_mode`, where
this function is ``jax.lax.conv_general_dilated`` itself -- the engine's ``gramian`` mode
linearises the loss that way for its JVPs and takes its VJPs outside it. Measured (same setting):
one task gradient per ``lax.scan`` iteration 0.09 s instead of 4.0 s, and one VJP at top level
0.15 s instead of 0.19 s.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mtl_jax import taps

_CANONICAL = ("NHWC", "HWIO", "NHWC")
_FORWARD_MODE = contextvars.ContextVar("mtl_jax_conv_forward_mode", default=False)


@contextlib.contextmanager
def forward_mode():
  """While tracing inside this context, :func:`conv_general_dilated` is the plain ``lax`` op (no
  ``custom_vjp``), so ``jax.jvp``/``jax.linearize`` can differentiate it forwards."""
  token = _FORWARD_MODE.set(True)
  try:
    yield
  finally:
    _FORWARD_MODE.reset(token)


def _is_canonical_2d(lhs, rhs, dimension_numbers) -> bool:
  if lhs.ndim != 4 or rhs.ndim != 4:
    return False
  if dimension_numbers is None:
    return False  # lax's default is NCHW/OIHW
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  return tuple(dimension_numbers) == _CANONICAL


def _pairs(padding, in_spatial, kernel_spatial, strides, rhs_dilation):
  if isinstance(padding, str):
    eff = [(k - 1) * d + 1 for k, d in zip(kernel_spatial, rhs_dilation)]
    return tuple(tuple(int(v) for v in p)
                 for p in lax.padtype_to_pads(in_spatial, eff, strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None, preferred_element_type=None):
  """``jax.lax.conv_general_dilated`` with a canonical-layout backward pass (module docstring)."""
  simple = (_is_canonical_2d(lhs, rhs, dimension_numbers) and feature_group_count == 1
            and batch_group_count == 1 and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and preferred_element_type is None and lhs.dtype == rhs.dtype)
  if not simple or _FORWARD_MODE.get():
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count,
                                    precision, preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
  pads = _pairs(padding, lhs.shape[1:3], rhs.shape[:2], strides, dilation)
  op = functools.partial(_conv, strides, pads, dilation, precision)
  return taps.conv_site(op, lhs, rhs, rhs.shape[:2], strides, pads, dilation)


def _forward(strides, pads, dilation, precision, x, w):
  return lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilation,
                                  dimension_numbers=_CANONICAL, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _conv(strides, pads, dilation, precision, x, w):
  return _forward(strides, pads, dilation, precision, x, w)


def _conv_fwd(strides, pads, dilation, precision, x, w):
  return _forward(strides, pads, dilation, precision, x, w), (x, w)


def _conv_bwd(strides, pads, dilation, precision, res, g):
  x, w = res
  kernel = w.shape[:2]
  k_eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
  in_sp, out_sp = x.shape[1:3], g.shape[1:3]
  out_dil = [(o - 1) * s + 1 for o, s in zip(out_sp, strides)]
  # Input gradient: the output gradient, dilated by the stride, convolved with the flipped kernel
  # whose in/out features are swapped -- materialised as HWIO (Cout -> Cin).
  pads_x = []
  for ke, (lo, _), i, od in zip(k_eff, pads, in_sp, out_dil):
    before = ke - 1 - lo
    pads_x.append((before, i + ke - 1 - od - before))
  w_t = jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3)
  dx = lax.conv_general_dilated(g, w_t, (1, 1), pads_x, lhs_dilation=strides,
                                rhs_dilation=dilation, dimension_numbers=_CANONICAL,
                                precision=precision)
  # Kernel gradient: a canonical convolution of the activations read as (Cin, H, W, batch) with
  # the output gradient read as a (Ho, Wo, batch, Cout) kernel dilated by the stride; the kernel's
  # dilation becomes the window stride. Output (Cin, kh, kw, Cout).
  pads_w = []
  for ke, (lo, _), i, od in zip(k_eff, pads, in_sp, out_dil):
    pads_w.append((lo, od - i + ke - 1 - lo))
  x_t = jnp.transpose(x, (3, 1, 2, 0))
  g_t = jnp.transpose(g, (1, 2, 0, 3))
  dw = lax.conv_general_dilated(x_t, g_t, dilation, pads_w, rhs_dilation=strides,
                                dimension_numbers=_CANONICAL, precision=precision)
  return dx, jnp.transpose(dw, (1, 2, 0, 3))


_conv.defvjp(_conv_fwd, _conv_bwd)


# flax's convolution with this function: same parameters and names as ``nn.Conv``.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
