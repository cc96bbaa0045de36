"""The engine: from K task losses to the combined update, computing only what a combiner needs.

A *loss function* is ``loss_fn(params, *args) -> (losses, aux)`` with ``losses`` of shape (K,).
For the ``features`` mode (MGDA-UB, Sener & Koltun 2018) it is a :class:`SplitLoss`: an encoder
``encode(params, *args) -> (z, aux)`` giving the shared representation and a decoder
``decode(params, z, *args) -> (losses, aux)``.

Modes (:func:`combine`):

* ``losses``: the losses, the weights from them, and one backward pass of ``sum_k w_k L_k``.
* ``jacobian``: the per-task gradients as ``jax.vmap`` of one VJP over the K one-hot cotangents
  (the fast Jacobian on XLA; ``lax.map`` over VJPs measured ~25x slower on CPU), the Gramian of its
  shared rows, the weights, and ``sum_k w_k g_k`` from the held Jacobian. For weightings
  (``layer_gramian='auto'``, the default) the shared dense and convolution layers where it is
  cheaper are *tapped* (:mod:`mtl_jax.taps`): their share of the Gramian comes from the layer's
  input and its K output cotangents, their update is one kernel gradient, and their K per-task
  kernel gradients are never formed (CelebA CNN, K=40: the exact Nash-MTL step 0.83x the
  Jacobian-only step instead of 1.11x, half its memory; ``docs/performance.md``).
* ``gramian``: the Gramian without the K x P Jacobian: for each block of ``gramian_chunk`` tasks
  (default 1, one ``lax.scan`` step each) the rows ``J_a`` (VJPs) are pushed forward (JVPs of a
  forward-mode linearisation of the loss) to give ``G[:, a] = J J_a^T``; only ``gramian_chunk``
  rows ever exist. The update is one more VJP with the weights. Memory ~ one backward pass plus
  ``gramian_chunk`` gradients; arithmetic ~2x the vmapped Jacobian (one JVP per task on top of the
  VJP). The linearisation is traced with plain convolutions and the VJPs with the canonical-layout
  ones of :mod:`mtl_jax.models.conv` (JAX's transposed convolutions run ~20x slower inside a loop
  on XLA-CPU). Measured in ``launch/benchmark.py`` (``docs/performance.md``): the ``jacobian`` mode
  is the fast one, this the lean one.
* ``features``: the Jacobian of the losses w.r.t. the shared representation ``z`` (K x B x D,
  the decoder's backward only), its Gramian, the weights, then one backward pass through the
  encoder with the weighted cotangent: about the cost of one backward pass.

Weightings that solve only every n-th step (Nash-MTL's ``update_weights_every``) declare
``Method.fresh``/``Method.reuse``: in the ``gramian`` and ``jacobian`` modes the engine then takes
a ``lax.cond`` on ``fresh(state)``, and on the other steps computes no Jacobian at all (one
backward pass of ``sum_k w_k L_k`` with the stored weights, the shared part's norm capped as the
method asks); the returned ``gramian`` is zeros on those steps.

Inside ``jax.shard_map`` pass ``axis_name``: with ``reduction='exact'`` (the default) every per-task
quantity is averaged over devices *before* the combiner sees it, so the result is the global-batch
method (the Jacobian is ``pmean``-ed leaf by leaf; in the ``features`` mode the global Gramian is
``psum(G_d) / D**2``, exact because different devices' representations are distinct variables).
``reduction='local'`` combines on each device and averages the updates: cheaper, and exact only
for methods linear in the gradients with loss-independent weights (``ls``); the combiner state's
float leaves are averaged so that it stays replicated.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mtl_jax import taps
from mtl_jax.models import conv
from mtl_jax.combiners.base import (GRAMIAN, JACOBIAN, LOSSES, CombinerState, Method,
                                    all_finite, combine_jacobian, gramian_of, keep_if,
                                    resolve_mask, weighted_sum)

MODES = ("losses", "gramian", "jacobian", "features")
REDUCTIONS = ("exact", "local")
PyTree = Any


class SplitLoss(NamedTuple):
  """A loss function split at the shared representation (for the ``features`` mode)."""

  encode: Callable[..., tuple[PyTree, Any]]  # (params, *args) -> (z, aux)
  decode: Callable[..., tuple[jax.Array, Any]]  # (params, z, *args) -> (losses, aux)

  def __call__(self, params, *args):
    z, enc_aux = self.encode(params, *args)
    losses, dec_aux = self.decode(params, z, *args)
    return losses, (enc_aux, dec_aux)


class EngineOut(NamedTuple):
  update: PyTree  # the combined gradient, the params' tree (feed it to the optimizer)
  losses: jax.Array  # (K,) the task losses (device-averaged under shard_map)
  weights: jax.Array  # (K,) the weights the combiner chose (zeros for a skipped step)
  gramian: Optional[jax.Array]  # (K, K) when the mode computed one, else None
  aux: Any  # the loss function's aux (local to the device)
  state: CombinerState  # the new combiner state
  finite: jax.Array  # bool: False when the step was skipped for a non-finite loss or gradient


def default_mode(method: Method) -> str:
  return {LOSSES: "losses", GRAMIAN: "gramian", JACOBIAN: "jacobian"}[method.needs]


def check_mode(method: Method, mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"unknown engine mode {mode!r}; valid: {', '.join(MODES)}")
  allowed = {
      LOSSES: MODES,
      GRAMIAN: ("gramian", "jacobian", "features"),
      JACOBIAN: ("jacobian",),
  }[method.needs]
  if mode not in allowed:
    raise ValueError(
        f"combiner {method.name!r} needs {method.needs!r}; engine mode {mode!r} cannot give it "
        f"(valid for it: {', '.join(allowed)})")


def task_jacobian(loss_fn, params, *args):
  """``(losses, jac, aux)``: ``jac`` has the params' tree with a leading K axis (row k = grad L_k)."""
  losses, vjp_fn, aux = jax.vjp(lambda p: loss_fn(p, *args), params, has_aux=True)
  jac = _rows(vjp_fn, losses)
  return losses, jac, aux


def _rows(vjp_fn, losses, task_axis: int = 0):
  eye = jnp.eye(losses.shape[0], dtype=losses.dtype)
  return jax.vmap(lambda c: vjp_fn(c)[0], out_axes=task_axis)(eye)


def _axis_size(axis_name) -> int:
  """The number of devices on ``axis_name``; 1 without an axis."""
  if axis_name is None:
    return 1
  size_of = getattr(jax.lax, "axis_size", None)
  return int(size_of(axis_name)) if size_of is not None else int(jax.lax.psum(1, axis_name))


def _pmean(tree, axis_name):
  """``pmean`` over ``axis_name``; the identity without an axis or on a one-device axis (there XLA
  still emitted the all-reduce: a copy of the 40 x 5.2M Jacobian, ~4% of the CelebA CNN step)."""
  if _axis_size(axis_name) == 1:
    return tree
  return jax.lax.pmean(tree, axis_name)


def combine(method: Method,
            state: CombinerState,
            loss_fn,
            params: PyTree,
            *args,
            mode: Optional[str] = None,
            shared_mask=None,
            axis_name: Optional[str] = None,
            reduction: str = "exact",
            gramian_chunk: int = 1,
            layer_gramian: str = "auto") -> EngineOut:
  """One combined gradient. See the module docstring for the modes and reductions.

  ``state`` is a :class:`CombinerState` (``method.transform().init(params)`` makes one; the optax
  transform and the engine share it, so a run can switch between them). ``layer_gramian``
  (``auto`` | ``all`` | ``off``): which layers a weighting's ``jacobian`` mode taps
  (:mod:`mtl_jax.taps`); other modes and aggregators ignore it.
  """
  mode = mode or default_mode(method)
  check_mode(method, mode)
  if reduction not in REDUCTIONS:
    raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
  if mode == "features" and not isinstance(loss_fn, SplitLoss):
    raise ValueError("engine mode 'features' needs a SplitLoss(encode, decode) loss function")
  if int(gramian_chunk) < 1:
    raise ValueError(f"gramian_chunk must be >= 1, got {gramian_chunk}")
  if layer_gramian not in taps.LAYER_GRAMIAN:
    raise ValueError(f"unknown layer_gramian {layer_gramian!r}; valid: "
                     f"{', '.join(taps.LAYER_GRAMIAN)}")
  exact_axis = axis_name if reduction == "exact" else None
  mask = resolve_mask(shared_mask, params)
  k = method.num_tasks

  if mode == "features":
    out = _features(method, state, loss_fn, params, args, mask, exact_axis)
  else:
    plan = None
    if mode == "jacobian" and method.is_weighting and layer_gramian != "off":
      plan = taps.plan(loss_fn, params, args, mask, k, _axis_size(exact_axis), layer_gramian)
    if plan is None:
      losses, vjp_fn, aux = jax.vjp(lambda p: loss_fn(p, *args), params, has_aux=True)
      tapped = None
    else:  # vjp_fn(c) = (params' cotangent, the taps' cotangents): [0] is what the rest reads
      f = taps.tapped(loss_fn, plan)
      losses, vjp_fn, (aux, inputs) = jax.vjp(lambda p, t: f(p, t, *args), params,
                                              taps.zeros(plan), has_aux=True)
      tapped = (plan, inputs)
    jvp_fn = None
    if mode == "gramian":
      # The JVPs come from a forward-mode linearisation traced with plain convolutions, the VJPs
      # from reverse mode with canonical-layout ones (mtl_jax.models.conv: inside the streaming
      # loop JAX's own transposed convolutions run ~20x slower on XLA-CPU). The price is a second
      # forward pass and its residuals.
      with conv.forward_mode():
        _, jvp_fn, _ = jax.linearize(lambda p: loss_fn(p, *args), params, has_aux=True)
    if losses.shape != (k,):
      raise ValueError(f"the loss function returned losses of shape {losses.shape}, expected ({k},)")
    glosses = _pmean(losses, exact_axis)
    if mode == "losses":
      ok = all_finite(glosses)
      weights, new = method.weigh(None, glosses, state.method)
      weights, ok = _guard(weights, ok)
      update = _weighted_vjp(method, vjp_fn, weights, mask)
      out = (update, glosses, weights, None, aux, new, ok)
    else:
      fresh = lambda: _fresh_step(method, mode, state, glosses, vjp_fn, jvp_fn, mask, exact_axis,
                                  gramian_chunk, tapped) + (aux,)
      if method.fresh is None:
        out = fresh()
      else:  # steps that reuse the weights take the one-backward path: no Jacobian at all
        reuse = lambda: _reuse_step(method, state, glosses, vjp_fn, mask, exact_axis) + (aux,)
        out = jax.lax.cond(method.fresh(state.method), fresh, reuse)
      update, glosses, weights, gram, new, ok, aux = out
      out = (update, glosses, weights, gram, aux, new, ok)

  update, glosses, weights, gram, aux, new, ok = out
  if axis_name is not None and reduction == "local":
    update = _pmean(update, axis_name)
    new = jax.tree.map(
        lambda x: _pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.inexact) else x, new)
    glosses = _pmean(glosses, axis_name)
    ok = jax.lax.pmin(ok.astype(jnp.int32), axis_name).astype(bool)
  elif axis_name is not None and mode != "jacobian":  # the Jacobian was averaged already
    update = _pmean(update, axis_name)
  # A gradient can be non-finite where the losses are finite (an overflow in the backward pass,
  # which the losses-only modes see nowhere else); and a VJP with zero weights still carries NaN
  # from a non-finite forward pass: check the update, then zero it explicitly.
  ok = ok & all_finite(update)
  update = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), update)
  new = keep_if(ok, new, state.method)
  skipped = state.skipped + jnp.where(ok, 0, 1).astype(jnp.int32)
  return EngineOut(update, glosses, weights, gram, aux, CombinerState(new, skipped), ok)


def _fresh_step(method, mode, state, glosses, vjp_fn, jvp_fn, mask, exact_axis, chunk,
                tapped=None):
  """The Gramian (or Jacobian) path: ``(update, losses, weights, gram, new_state, ok)``."""
  k = method.num_tasks
  if tapped is not None:
    return _tapped_step(method, state, glosses, vjp_fn, mask, exact_axis, *tapped)
  if mode == "gramian":
    gram = _streamed_gramian(vjp_fn, jvp_fn, k, mask, exact_axis, int(chunk), glosses.dtype)
    ok = all_finite(glosses, gram)
    weights, new = method.weigh(gram, glosses, state.method)
    weights, ok = _guard(weights, ok)
    update = _weighted_vjp(method, vjp_fn, weights.astype(glosses.dtype), mask)
    return update, glosses, weights, gram, new, ok
  # Weightings hold the Jacobian task-minor (each leaf (..., K)): its Gramian and weighted sum are
  # cheaper on XLA-CPU than the K-leading layout's (CelebA CNN, K=40: the Gramian adds 3% to the
  # Jacobian step instead of 5-8%; docs/performance.md). Aggregators get the K-leading rows their
  # contract promises.
  axis = -1 if method.is_weighting else 0
  jac = _pmean(_rows(vjp_fn, glosses, task_axis=axis), exact_axis)
  gram = gramian_of(jac, mask, task_axis=axis)
  if method.is_weighting:
    ok = all_finite(glosses, gram)
    weights, new = method.weigh(gram, glosses, state.method)
    weights, ok = _guard(weights, ok)
    update = combine_jacobian(method, weights, jac, mask, task_axis=axis)
    return update, glosses, weights, gram, new, ok
  # an aggregator; the Gramian is for the statistics (cheap next to the Jacobian)
  shared_jac = jax.tree.map(lambda j, m: j if m else None, jac, mask)
  ok = all_finite(glosses, shared_jac)
  shared_upd, specific, new = method.aggregate(shared_jac, glosses, state.method)
  ok = ok & all_finite(shared_upd, specific)
  weights = jnp.where(ok, specific, 0.0)
  update = jax.tree.map(
      lambda j, m, u: u if m else weighted_sum(specific, j), jac, mask,
      jax.tree.map(lambda u, m: u if m else 0.0, shared_upd, mask, is_leaf=lambda x: x is None))
  update = jax.tree.map(lambda u: jnp.where(ok, u, 0.0), update)
  return update, glosses, weights, gram, new, ok


def _tapped_step(method, state, glosses, vjp_fn, mask, exact_axis, plan, inputs):
  """A weighting's ``jacobian``-mode step with tapped layers (:mod:`mtl_jax.taps`): the untapped
  leaves' rows task-minor as in :func:`_fresh_step`, the tapped layers' Gramian shares from their
  inputs and output cotangents, and their updates as one kernel gradient each."""
  eye = jnp.eye(glosses.shape[0], dtype=glosses.dtype)
  rows, tap_rows = jax.vmap(vjp_fn, out_axes=(-1, 0))(eye)
  leaves, treedef = jax.tree.flatten(rows)
  mask_leaves = jax.tree.leaves(mask)
  site_of = {s.leaf: i for i, s in enumerate(plan.sites)}
  # the tapped leaves' rows are never read (XLA drops their per-task kernel gradients)
  rows = _pmean([None if i in site_of else j for i, j in enumerate(leaves)], exact_axis)
  size = _axis_size(exact_axis)
  terms = [taps.site_gramian(s, inputs[i][0], tap_rows[i], exact_axis, size)
           for i, s in enumerate(plan.sites)]
  direct = [j for j, m in zip(rows, mask_leaves) if m and j is not None]
  if direct:
    terms.append(gramian_of(direct, [True] * len(direct), task_axis=-1))
  gram = sum(terms[1:], terms[0])
  ok = all_finite(glosses, gram)
  weights, new = method.weigh(gram, glosses, state.method)
  weights, ok = _guard(weights, ok)
  specific = method.specific_weights(weights)
  update = []
  for i, (j, m) in enumerate(zip(rows, mask_leaves)):
    if i in site_of:
      x, w, op = inputs[site_of[i]]
      cot = weighted_sum(weights, tap_rows[site_of[i]])  # the K cotangents are K-leading
      update.append(_pmean(taps.site_update(x, w, op, cot), exact_axis))
    else:
      update.append(weighted_sum(weights if m else specific, j, task_axis=-1))
  return jax.tree.unflatten(treedef, update), glosses, weights, gram, new, ok


def _streamed_gramian(vjp_fn, jvp_fn, k, mask, exact_axis, chunk, dtype):
  """``G = J_s J_s^T`` over the shared leaves, ``chunk`` rows of ``J`` at a time.

  For a block ``a`` of tasks, the rows ``J_a`` come from ``chunk`` VJPs; their shared part is then
  pushed forward, ``J J_a^T = G[:, a]``, by ``chunk`` JVPs of the same linearisation. Only
  ``chunk`` rows of the Jacobian ever exist (memory ~ ``chunk`` x params); the price is one JVP per
  task on top of the VJPs (about 2x the vmapped Jacobian's arithmetic). Under ``exact_axis`` the
  rows and the columns are device-averaged, so ``G`` is the Gramian of the global-batch Jacobian.
  """
  n = -(-k // chunk)
  eye = jnp.eye(n * chunk, k, dtype=dtype).reshape(n, chunk, k)

  def block(_, cot):
    rows = _pmean(jax.vmap(lambda c: vjp_fn(c)[0])(cot), exact_axis)
    rows = jax.tree.map(lambda r, m: r if m else jnp.zeros_like(r), rows, mask)
    cols = _pmean(jax.vmap(jvp_fn)(rows), exact_axis)  # (chunk, K): <g_a^shared, g_l>
    return None, cols

  _, cols = jax.lax.scan(block, None, eye)
  gram = cols.reshape(n * chunk, k)[:k].astype(jnp.float32)
  return 0.5 * (gram + gram.T)


def _reuse_step(method, state, glosses, vjp_fn, mask, exact_axis):
  """A step between solves: the stored weights, one VJP, the shared part's norm capped."""
  k = method.num_tasks
  weights, new, max_norm = method.reuse(glosses, state.method)
  weights = jnp.asarray(weights, jnp.float32)
  update = _pmean(_weighted_vjp(method, vjp_fn, weights.astype(glosses.dtype), mask), exact_axis)
  sq = sum(jnp.sum(jnp.square(u.astype(jnp.float32)))
           for u, m in zip(jax.tree.leaves(update), jax.tree.leaves(mask)) if m)
  cap = jnp.asarray(max_norm, jnp.float32)
  scale = jnp.where(cap > 0, jnp.minimum(1.0, cap / jnp.maximum(jnp.sqrt(sq), 1e-30)), 1.0)
  scale_specific = scale if method.specific == "weighted" else jnp.ones_like(scale)
  update = jax.tree.map(lambda u, m: u * (scale if m else scale_specific).astype(u.dtype),
                        update, mask)
  weights = weights * scale
  ok = all_finite(glosses, update, weights)
  weights = jnp.where(ok, weights, 0.0)
  return update, glosses, weights, jnp.zeros((k, k), jnp.float32), new, ok


def _guard(weights, ok):
  ok = ok & all_finite(weights)
  return jnp.where(ok, weights, 0.0).astype(jnp.float32), ok


def _weighted_vjp(method, vjp_fn, weights, mask):
  update = vjp_fn(weights)[0]
  if method.specific == "weighted":
    return update
  specific = vjp_fn(method.specific_weights(weights))[0]
  return jax.tree.map(lambda u, s, m: u if m else s, update, specific, mask)


def _features(method, state, split: SplitLoss, params, args, mask, exact_axis):
  k = method.num_tasks
  (z, enc_aux), enc_vjp = _vjp_with_aux(lambda p: split.encode(p, *args), params)
  losses, dec_vjp, dec_aux = jax.vjp(
      lambda p, zz: split.decode(p, zz, *args), params, z, has_aux=True)
  if losses.shape != (k,):
    raise ValueError(f"the loss function returned losses of shape {losses.shape}, expected ({k},)")
  glosses = _pmean(losses, exact_axis)
  if method.needs == LOSSES:
    gram = None
    ok = all_finite(glosses)
  else:
    eye = jnp.eye(k, dtype=losses.dtype)
    jz = jax.vmap(lambda c: dec_vjp(c)[1])(eye)
    gram = gramian_of(jz, resolve_mask(None, jz))
    if exact_axis is not None:
      size = _axis_size(exact_axis)
      gram = jax.lax.psum(gram, exact_axis) / (size * size)
    ok = all_finite(glosses, gram)
  weights, new = method.weigh(gram, glosses, state.method)
  weights, ok = _guard(weights, ok)
  dec_params, dz = dec_vjp(weights.astype(losses.dtype))
  if method.specific != "weighted":
    spec_params, _ = dec_vjp(method.specific_weights(weights).astype(losses.dtype))
    dec_params = jax.tree.map(lambda u, s, m: u if m else s, dec_params, spec_params, mask)
  (enc_params,) = enc_vjp(dz)
  update = jax.tree.map(jnp.add, dec_params, enc_params)
  return update, glosses, weights, gram, (enc_aux, dec_aux), new, ok


def _vjp_with_aux(fn, params):
  z, vjp_fn, aux = jax.vjp(fn, params, has_aux=True)
  return (z, aux), vjp_fn
