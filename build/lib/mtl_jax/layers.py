"""The library's layers: a dense layer and a convolution that the engine can tap, and the switch
that tells them how they are being traced. Imports nothing of ``mtl_jax`` (models and the engine
both build on it).

:data:`Dense` and :data:`Conv` are flax's ``nn.Dense`` and ``nn.Conv`` (same parameters, names and
initialisers) with their product routed through :func:`dot_general` and
:func:`conv_general_dilated`. Outside :func:`tracing` these are the plain operations (the
convolution with a canonical-layout backward pass, below). The engine (:mod:`mtl_jax.taps`,
:mod:`mtl_jax.autodiff`) traces a loss function inside :func:`tracing` to

* record every call and add a zero-valued *tap* to chosen calls' outputs (``recorder``: an object
  with ``visit(kind, meta, op, x, w) -> y`` and ``alias(cast, leaf)``), the layer-tap Gramian;
* take the convolution as ``jax.lax.conv_general_dilated`` itself (``forward_mode=True``), for the
  forward-mode linearisation of the ``gramian`` mode.

Mixed precision (:func:`cast_floating`): a model that computes in bfloat16 casts its float32
parameters once at its boundary; the cast leaves are reported to an active recorder as aliases of
the parameters, so the taps keep working under the cast.

The convolution's backward pass is written in XLA's canonical convolution layout.

Why: XLA-CPU runs a convolution through its fast (Eigen) kernel only in the canonical form
``NHWC x HWIO -> NHWC``. JAX's transpose rules express the two backward convolutions by relabelling
dimensions (the input gradient reads the kernel as ``HWOI``, the kernel gradient reads the
activations with batch and feature swapped) and leave it to XLA's ``ConvCanonicalization`` pass to
insert the transposes. That pass visits the entry computation only: a backward pass inside a loop
body -- the engine's streamed ``gramian`` mode computes one task's gradient per iteration of a
``lax.scan`` -- falls back to a naive convolution loop, about twenty times slower
(``docs/performance.md``).

:func:`conv_general_dilated` is a drop-in for ``jax.lax.conv_general_dilated`` (flax's ``nn.Conv``
takes it as its ``conv_general_dilated`` attribute) with a ``custom_vjp`` whose backward pass
transposes the operands explicitly and calls canonical convolutions, so it is fast wherever it is
placed. It covers the case every backbone here uses -- 2-D, ``NHWC``/``HWIO``, any stride, padding
and kernel dilation, no input dilation, one feature group -- and calls
``jax.lax.conv_general_dilated`` unchanged for anything else. Forward-mode differentiation of a
``custom_vjp`` function is not available in JAX (and a JVP obtained by transposing this VJP would
relabel dimensions again): code that needs forward mode traces under
``tracing(forward_mode=True)``, where this function is ``jax.lax.conv_general_dilated`` itself --
the engine's ``gramian`` mode linearises the loss that way for its JVPs and takes its VJPs outside
it. The figures are in ``docs/performance.md``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

DTYPES = ("float32", "bfloat16")
_CANONICAL = ("NHWC", "HWIO", "NHWC")


class Tracing(NamedTuple):
  """How the library's layers trace (the engine's switch; :func:`tracing`)."""

  recorder: Optional[Any] = None  # visit(kind, meta, op, x, w) -> y; alias(cast, leaf)
  forward_mode: bool = False  # the convolution without custom_vjp (jax.jvp / jax.linearize work)


# Why a ContextVar: the engine differentiates a loss function whose signature is the user's
# (``loss_fn(params, *args)``), built from flax modules several levels deep (sharing strategies
# over backbone stages); the switch changes only how those layers *trace*, for the one trace the
# engine makes, and there is no argument through which it could reach them. This is the dynamic
# scope JAX's own tracing contexts (``jax.named_scope``, ``jax.default_matmul_precision``) and
# flax's ``nn.intercept_methods`` use for the same reason. Outside :func:`tracing` it is the
# default (plain layers), so a model traced by anyone else is unaffected.
_TRACING: contextvars.ContextVar = contextvars.ContextVar("mtl_jax_layer_tracing",
                                                          default=Tracing())


@contextlib.contextmanager
def tracing(recorder=None, forward_mode: bool = False):
  """While tracing inside this context, the library's layers report to ``recorder`` and/or use the
  plain convolution (``forward_mode``); see the module docstring."""
  token = _TRACING.set(Tracing(recorder, bool(forward_mode)))
  try:
    yield
  finally:
    _TRACING.reset(token)


# ---------------------------------------------------------------------------------------------
# Mixed precision.


def compute_dtype(name) -> Any:
  """The compute dtype ``name`` (``'float32'`` | ``'bfloat16'``; None is float32)."""
  name = "float32" if name is None else str(name)
  if name not in DTYPES:
    raise ValueError(f"unknown model dtype {name!r}; valid: {', '.join(DTYPES)}")
  return jnp.dtype(name)


def cast_floating(tree, dtype):
  """``tree`` with its floating leaves cast to ``dtype`` (other leaves, e.g. indices, unchanged).
  Under an active recorder each cast leaf is reported as an alias of its source, so a layer whose
  kernel is a cast parameter is still recognised (:mod:`mtl_jax.taps`)."""
  dtype = jnp.dtype(dtype)
  recorder = _TRACING.get().recorder

  def cast(x):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating) or jnp.result_type(x) == dtype:
      return x
    y = jnp.asarray(x, dtype)
    if recorder is not None:
      recorder.alias(y, x)
    return y

  return jax.tree.map(cast, tree)


def as_float(x):
  """``x`` as a floating array: a floating input keeps its dtype (the compute dtype a model was
  cast to), anything else becomes float32. Models use it where they read their inputs."""
  x = jnp.asarray(x)
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Dense.


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
  """``lax.dot_general``; a dense layer's ``x W`` (last axis of ``x`` against a 2-D kernel's first)
  is reported to an active recorder. Pass it as ``nn.Dense(dot_general=...)`` (:data:`Dense`)."""
  op = functools.partial(_dot, dimension_numbers=dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kw)
  recorder = _TRACING.get().recorder
  (lc, rc), (lb, rb) = dimension_numbers
  dense = (rhs.ndim == 2 and lhs.ndim >= 1 and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,)
           and not lb and not rb)
  if recorder is None or not dense:
    return op(lhs, rhs)
  return recorder.visit("dense", (), op, lhs, rhs)


def _dot(lhs, rhs, **kw):
  return lax.dot_general(lhs, rhs, **kw)


# ---------------------------------------------------------------------------------------------
# Convolution with a canonical-layout backward pass.


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
  hook = _TRACING.get()
  if not simple or hook.forward_mode:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count,
                                    precision, preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
  pads = _pairs(padding, lhs.shape[1:3], rhs.shape[:2], strides, dilation)
  op = functools.partial(_conv, strides, pads, dilation, precision)
  if hook.recorder is None:
    return op(lhs, rhs)
  meta = (tuple(rhs.shape[:2]), strides, pads, dilation)
  return hook.recorder.visit("conv", meta, op, lhs, rhs)


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


# flax's dense layer and convolution through the functions above: same parameters and names as
# ``nn.Dense`` / ``nn.Conv``.
Dense = functools.partial(nn.Dense, dot_general=dot_general)
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
