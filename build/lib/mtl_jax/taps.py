"""Layer taps: a layer's share of the task Gramian from its inputs and output cotangents.

For a dense layer ``y = x W`` or a convolution ``y = conv(x, W)`` the gradient of task ``k`` with
respect to ``W`` is ``P^T g_k``: ``P`` (N x D) holds the layer's input rows (for a convolution its
input patches, one per batch element and output position, ``D = kh kw Cin``) and ``g_k`` (N x C)
the cotangent of task ``k``'s loss at the layer's output. Hence

    <grad_k W, grad_l W> = sum_{n,m} (P P^T)_{nm} <g_kn, g_lm>,

which costs ``N^2 D + K N^2 C + K^2 N C`` multiply-adds instead of the ``K N D C`` of the K
per-task gradients plus the ``K^2 D C`` of their Gramian -- and the update ``sum_k w_k grad_k W``
is one gradient, ``P^T (sum_k w_k g_k)``. This is the identity behind "ghost" norms in per-example
gradient clipping (Goodfellow 2015, "Efficient per-example gradient computations"; Li et al. 2022)
and TorchJD's ``autogram`` engine (Quinton & Rey 2025). It pays where ``N`` (batch x output
positions) is small next to the layer's size: the CelebA CNN's 4 x 4 convolutions and its dense
layers at batch 16.

How the engine uses it (:func:`mtl_jax.autodiff.combine`, ``jacobian`` mode, weightings,
``layer_gramian='auto'``, the default; ``'all'`` taps every eligible layer whatever the cost,
``'off'`` none): :func:`plan` traces the loss function once inside
``mtl_jax.layers.tracing(recorder=...)``; the layers of :mod:`mtl_jax.layers` (``Dense``, ``Conv``)
report which parameter leaf they use (a parameter cast by :func:`mtl_jax.layers.cast_floating`
counts as its source, so the taps work under bfloat16 compute). A shared leaf used by exactly one
such call and nowhere else in the traced loss (checked on its jaxpr) is *tapped* when the cost
model above says it is cheaper: the engine then adds a zero input to that layer's output, takes
the per-task cotangents there from the same vmapped VJP that gives the other leaves' rows, and
never forms the tapped leaves' rows (XLA drops their unused per-task kernel gradients). Anything
else -- a leaf read twice, a layer inside a nested ``jit``/``scan``/``remat`` (its kernel is then
not the parameter itself), a cast other than ``cast_floating``'s -- keeps the ordinary rows: the
result is the same Gramian either way, to rounding. Whatever the compute dtype, a site's Gramian
share is computed in float32 from its inputs and cotangents.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from mtl_jax import layers

LAYER_GRAMIAN = ("auto", "all", "off")
# A tapped layer's N x N matrix P P^T is held whole: above this many entries the rows are kept.
MAX_ROWS_SQUARED = 1 << 26


class Site(NamedTuple):
  """One call of a tappable layer whose kernel is a parameter leaf (static; from the trace)."""

  index: int  # the call's position among the tappable layers' calls
  leaf: Optional[int]  # the parameter leaf (flattened params) it reads as its kernel, if any
  kind: str  # 'dense' | 'conv'
  conv: tuple  # conv: (kernel_hw, strides, pads, dilation); dense: ()
  x_shape: tuple
  y_shape: tuple
  w_shape: tuple
  dtype: Any  # the output's


class _Recorder:
  """Active while a loss function is traced (``layers.tracing(recorder=...)``): records every
  call of a tappable layer (``leaf`` is None where its kernel is not a parameter leaf itself, or
  an alias of one); with ``taps`` ({call index: (Site, tap)}), adds the tap to those calls'
  outputs and keeps their inputs."""

  def __init__(self, leaves: Sequence[Any], taps: Optional[dict] = None):
    # id -> (leaf index, the object): the object is kept so that an id is never reused
    self._leaf_of = {id(leaf): (i, leaf) for i, leaf in enumerate(leaves)}
    self.sites: list[Site] = []
    self.taps = taps
    self.inputs: dict[int, tuple] = {}  # tapped index -> (x, w, op)

  def _leaf(self, w) -> Optional[int]:
    found = self._leaf_of.get(id(w))
    return found[0] if found is not None and found[1] is w else None

  def alias(self, cast, source):
    """``cast`` (a dtype cast of ``source``) stands for ``source``'s leaf."""
    leaf = self._leaf(source)
    if leaf is not None:
      self._leaf_of[id(cast)] = (leaf, cast)

  def visit(self, kind, conv, op, x, w):
    y = op(x, w)
    leaf = self._leaf(w)
    index = len(self.sites)
    site = Site(index, leaf, kind, conv, tuple(x.shape), tuple(y.shape), tuple(w.shape),
                jnp.dtype(y.dtype))
    self.sites.append(site)
    if self.taps is not None and index in self.taps:
      # Matched by call order, not by identity: outside a planning trace a parameter can reach
      # its layer as a fresh tracer (jnp.asarray of a linearised concrete array).
      planned, tap = self.taps[index]
      if site._replace(leaf=planned.leaf) != planned:
        raise RuntimeError(f"layer taps: the loss function traced differently the second time "
                           f"(call {index}: {site}, planned {planned}); pass layer_gramian='off'")
      self.inputs[index] = (x, w, op)
      y = y + tap.astype(y.dtype)
    return y


# ---------------------------------------------------------------------------------------------
# Planning: which layers to tap.


class Plan(NamedTuple):
  sites: tuple  # the tapped Sites, in call order


def _use_counts(closed_jaxpr, n: int) -> list[int]:
  """How often each of the first ``n`` inputs of a jaxpr is read (equations and outputs)."""
  jaxpr = closed_jaxpr.jaxpr
  invars = jaxpr.invars[:n]
  index = {id(v): i for i, v in enumerate(invars)}
  counts = [0] * n
  for v in itertools.chain(*(eqn.invars for eqn in jaxpr.eqns), jaxpr.outvars):
    i = index.get(id(v))
    if i is not None and invars[i] is v:
      counts[i] += 1
  return counts


def site_costs(site: Site, k: int, devices: int = 1) -> tuple[float, float]:
  """``(tapped, rows)``: multiply-adds of the site's Gramian share and update tapped (``N^2 D +
  K N^2 C + K^2 N C + N D C``, N over all ``devices``) and through the per-task rows (``K N D C +
  K^2 D C``, the rows' all-reduce not counted)."""
  n_local = math.prod(site.y_shape[:-1])
  c = site.y_shape[-1]
  d = math.prod(site.w_shape) // c
  n = n_local * devices
  tapped = n * n * d + k * n * n * c + k * k * n * c + n_local * d * c
  rows = k * n_local * d * c + k * k * d * c
  return float(tapped), float(rows)


def plan(loss_fn, params, args, mask, k: int, devices: int = 1,
         select: str = "auto") -> Optional[Plan]:
  """The layers to tap for ``loss_fn(params, *args)``, or None: with ``select='auto'`` those where
  the cost model says tapping is cheaper (and ``P P^T`` has at most :data:`MAX_ROWS_SQUARED`
  entries), with ``'all'`` every eligible one (module docstring)."""
  if select not in ("auto", "all"):
    raise ValueError(f"unknown layer tap selection {select!r}; valid: auto, all")
  leaves, treedef = jax.tree.flatten(params)
  mask_leaves = jax.tree.leaves(mask)
  found = []

  def probe(p_leaves, *a):
    recorder = _Recorder(p_leaves)
    with layers.tracing(recorder=recorder):
      out = loss_fn(jax.tree.unflatten(treedef, p_leaves), *a)
    found.append(list(recorder.sites))
    return out

  closed = jax.make_jaxpr(probe)(leaves, *args)
  sites = found[-1]
  uses = _use_counts(closed, len(leaves))
  per_leaf = {}
  for s in sites:
    per_leaf[s.leaf] = per_leaf.get(s.leaf, 0) + 1
  chosen = []
  for s in sites:
    if s.leaf is None or not (mask_leaves[s.leaf] and per_leaf[s.leaf] == 1 and uses[s.leaf] == 1):
      continue
    n = math.prod(s.y_shape[:-1]) * devices
    tapped, rows = site_costs(s, k, devices)
    if select == "all" or (n * n <= MAX_ROWS_SQUARED and tapped < rows):
      chosen.append(s)
  if not chosen:
    return None
  return Plan(tuple(chosen))


def tapped(loss_fn, the_plan: Plan):
  """``f(params, taps, *args) -> (losses, (aux, inputs))``: the loss with a zero-valued ``taps[i]``
  added to the output of the plan's ``i``-th site; ``inputs[i]`` is that site's ``(x, w, op)``."""
  sites = the_plan.sites

  def f(params, tap_values, *args):
    recorder = _Recorder(jax.tree.leaves(params),
                         {s.index: (s, t) for s, t in zip(sites, tap_values)})
    with layers.tracing(recorder=recorder):
      losses, aux = loss_fn(params, *args)
    if len(recorder.inputs) != len(sites):
      raise RuntimeError("layer taps: the loss function traced differently the second time "
                         f"({len(recorder.inputs)} of {len(sites)} planned layers seen); pass "
                         "layer_gramian='off'")
    return losses, (aux, [recorder.inputs[s.index] for s in sites])

  return f


def zeros(the_plan: Plan) -> list:
  return [jnp.zeros(s.y_shape, s.dtype) for s in the_plan.sites]


# ---------------------------------------------------------------------------------------------
# A tapped layer's Gramian share and update.


def input_rows(site: Site, x) -> jax.Array:
  """``P`` (N x D): the dense layer's input rows, or the convolution's input patches."""
  if site.kind == "dense":
    return x.reshape(-1, x.shape[-1])
  (kh, kw), (sh, sw), pads, (dh, dw) = site.conv
  b, _, _, cin = x.shape
  ho, wo = site.y_shape[1:3]
  zero = jnp.zeros((), x.dtype)
  xp = lax.pad(x, zero, ((0, 0, 0), (pads[0][0], pads[0][1], 0), (pads[1][0], pads[1][1], 0),
                         (0, 0, 0)))
  cols = []
  for i in range(kh):
    for j in range(kw):
      start = (0, i * dh, j * dw, 0)
      limit = (b, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, cin)
      cols.append(lax.slice(xp, start, limit, (1, sh, sw, 1)))
  return jnp.stack(cols, axis=3).reshape(b * ho * wo, kh * kw * cin)


def site_gramian(site: Site, x, g, axis_name=None, axis_size: int = 1) -> jax.Array:
  """The K x K Gramian of the site's kernel gradients from its input ``x`` and the K cotangents
  ``g`` (K, *y_shape) at its output. With a device axis the rows of every device are gathered and
  the result is the Gramian of the device-averaged gradients."""
  hi = lax.Precision.HIGHEST
  k, c = g.shape[0], g.shape[-1]
  p = input_rows(site, x).astype(jnp.float32)
  gk = g.reshape(k, -1, c).astype(jnp.float32)
  if axis_name is not None and axis_size > 1:
    p = lax.all_gather(p, axis_name, axis=0, tiled=True)
    gk = lax.all_gather(gk, axis_name, axis=1, tiled=True)
  m = jnp.dot(p, p.T, precision=hi)  # (N, N)
  t = jnp.einsum("nm,kmc->knc", m, gk, precision=hi)
  gram = jnp.einsum("knc,lnc->kl", gk, t, precision=hi)
  gram = 0.5 * (gram + gram.T)
  if axis_name is not None and axis_size > 1:
    gram = gram / float(axis_size * axis_size)
  return gram


def site_update(x, w, op, cotangent) -> jax.Array:
  """``P^T cotangent``: the kernel gradient of ``op(x, w)`` for one output cotangent."""
  _, pull = jax.vjp(lambda kernel: op(x, kernel), w)
  return pull(cotangent.astype(w.dtype))[0]
