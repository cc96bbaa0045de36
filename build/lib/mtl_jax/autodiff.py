"""The engine: from K task losses to the combined update, computing only what a combiner needs.

A *loss function* is ``loss_fn(params, *args) -> (losses, aux)`` with ``losses`` of shape (K,).
For the ``features`` mode (MGDA-UB, Sener & Koltun 2018) it is a :class:`SplitLoss`: an encoder
``encode(params, *args) -> (z, aux)`` giving the shared representation and a decoder
``decode(params, z, *args) -> (losses, aux)``.

Modes (:func:`combine`):

* ``losses``: the losses, the weights from them, and one backward pass of ``sum_k w_k L_k``.
* ``jacobian``: the per-task gradients as ``jax.vmap`` of one VJP over the K one-hot cotangents
  (the fast Jacobian on XLA, much faster than ``lax.map`` over VJPs), the Gramian of its
  shared rows, the weights, and ``sum_k w_k g_k`` from the held Jacobian. For weightings
  (``layer_gramian='auto'``, the default) the shared dense and convolution layers where it is
  cheaper are *tapped* (:mod:`mtl_jax.taps`): their share of the Gramian comes from the layer's
  input and its K output cotangents, their update is one kernel gradient, and their K per-task
  kernel gradients are never formed (cheaper than the Jacobian itself, with about half its
  memory on the CelebA CNN; figures in ``docs/performance.md``).
* ``gramian``: the Gramian without the K x P Jacobian: for each block of ``gramian_chunk`` tasks
  (default 1, one ``lax.scan`` step each) the rows ``J_a`` (VJPs) are pushed forward (JVPs of a
  forward-mode linearisation of the loss) to give ``G[:, a] = J J_a^T``; only ``gramian_chunk``
  rows ever exist. The update is one more VJP with the weights. Memory ~ one backward pass plus
  ``gramian_chunk`` gradients; arithmetic ~2x the vmapped Jacobian (one JVP per task on top of the
  VJP). The linearisation is traced with plain convolutions and the VJPs with the canonical-layout
  ones of :mod:`mtl_jax.layers` (JAX's transposed convolutions fall back to a naive loop inside
  a loop body on XLA-CPU). Measured in ``launch/benchmark.py`` (``docs/performance.md``): the ``jacobian`` mode
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

The data flow of :func:`combine`, top to bottom: the arguments are checked into :class:`Options`;
the loss function is differentiated once into a :class:`Linear` (losses, VJP, optional JVP and
layer-tap inputs); the mode's path turns it into a :class:`Step` (update, weights, Gramian, new
method state, finiteness); the local reduction averages it over devices; and the skip guard
(:func:`mtl_jax.combiners.base.skip_nonfinite`, shared with the optax transform) zeroes a
non-finite step. Gramians and the combiner's inputs are float32 whatever the model computes in.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mtl_jax import layers, taps
from mtl_jax.combiners.base import (GRAMIAN, JACOBIAN, LOSSES, CombinerState, Method, aggregated,
                                    all_finite, gramian_of, guarded_weights, resolve_mask,
                                    skip_nonfinite, weighted_sum)

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
  # with ``gramian_groups``: {group: (K, K) Gramian of that group's shared parameters}
  group_gramians: Optional[dict] = None


class Options(NamedTuple):
  """The static settings of one :func:`combine` call, checked."""

  mode: str
  mask: PyTree  # tree of bools: the shared leaves
  axis_name: Optional[str]  # the device axis (under shard_map), else None
  exact_axis: Optional[str]  # the axis per-task quantities are averaged over before combining
  chunk: int  # gramian mode: tasks per streamed block
  layer_gramian: str  # jacobian mode: which layers are tapped
  groups: tuple = ()  # ((name, frozenset of flattened leaf indices), ...) for gramian_groups
  fixed_order: bool = False  # device means as an all-gather and a sum in device order


class Linear(NamedTuple):
  """The loss function differentiated once, what every path reads."""

  losses: jax.Array  # (K,), averaged over ``exact_axis``
  pull: Callable  # cotangent (K,) -> (params' cotangent, *the taps' cotangents)
  jvp: Optional[Callable]  # gramian mode: params' tangent -> the losses' tangent (K,)
  taps: Optional[tuple]  # jacobian mode with tapped layers: (taps.Plan, each site's (x, w, op))
  aux: Any

  def grad(self, cotangent):
    """The params' cotangent of ``cotangent . losses``."""
    return self.pull(cotangent.astype(self.losses.dtype))[0]


class Step(NamedTuple):
  """What a mode's path gives the local reduction and the skip guard."""

  update: PyTree  # averaged over ``exact_axis``
  losses: jax.Array
  weights: jax.Array
  gramian: Optional[jax.Array]
  method_state: Any
  ok: jax.Array
  groups: Optional[dict] = None  # {group: (K, K)} with gramian_groups


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


def _pmean(tree, axis_name, fixed_order: bool = False):
  """``pmean`` over ``axis_name``; the identity without an axis or on a one-device axis (there XLA
  still emitted the all-reduce: a copy of the 40 x 5.2M Jacobian, ~4% of the CelebA CNN step).
  ``fixed_order``: :func:`device_mean`'s all-gather and sum in device order."""
  if _axis_size(axis_name) == 1:
    return tree
  if fixed_order:
    return device_mean(tree, axis_name)
  return jax.lax.pmean(tree, axis_name)


def device_mean(tree, axis_name):
  """The mean over the devices of ``axis_name`` as an all-gather and a sum in device order: the
  same bits whichever way the devices are split into processes (an all-reduce's summation order
  is the collective library's: gloo's or NCCL's ring between processes, not the device order of
  XLA's in-process one). Costs an all-gather instead of an all-reduce, and the gathered copy: N
  times the reduced quantity on every device."""
  n = _axis_size(axis_name)

  def mean(x):
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      return jax.lax.pmean(x, axis_name)
    return jnp.sum(jax.lax.all_gather(x, axis_name), axis=0) / jnp.asarray(n, x.dtype)

  return jax.tree.map(mean, tree)


# ---------------------------------------------------------------------------------------------
# combine: options -> linearisation -> the mode's path -> local reduction -> skip guard.


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
            layer_gramian: str = "auto",
            gramian_groups=None,
            fixed_order: bool = False) -> EngineOut:
  """One combined gradient. See the module docstring for the modes and reductions.

  ``state`` is a :class:`CombinerState` (``method.transform().init(params)`` makes one; the optax
  transform and the engine share it, so a run can switch between them). ``layer_gramian``
  (``auto`` | ``all`` | ``off``): which layers a weighting's ``jacobian`` mode taps
  (:mod:`mtl_jax.taps`); other modes and aggregators ignore it. ``gramian_groups`` (``jacobian``
  mode): ``{group: parameter-path prefix}`` (paths as ``'stage_0/Conv_0/kernel'``); the result's
  ``group_gramians`` then holds each group's K x K Gramian over its shared leaves, from the same
  backward pass (the full Gramian is their sum when the groups cover the shared leaves).
  ``fixed_order``: every mean over ``axis_name`` is :func:`device_mean` (all-gather, sum in
  device order), so the result does not depend on how the devices are split into processes.
  """
  opts = _options(method, loss_fn, params, mode, shared_mask, axis_name, reduction,
                  gramian_chunk, layer_gramian, gramian_groups)._replace(
                      fixed_order=bool(fixed_order))
  if opts.mode == "features":
    step, aux = _features_path(method, state, loss_fn, params, args, opts)
  else:
    lin = _linearise(method, loss_fn, params, args, opts)
    step, aux = _PATHS[opts.mode](method, state, lin, opts), lin.aux
  if axis_name is not None and reduction == "local":
    step = _reduce_local(step, axis_name, opts.fixed_order)
  update, new_state, ok = skip_nonfinite(step.ok, step.update, step.method_state, state)
  return EngineOut(update, step.losses, step.weights, step.gramian, aux, new_state, ok,
                   step.groups)


def _options(method, loss_fn, params, mode, shared_mask, axis_name, reduction, chunk,
             layer_gramian, gramian_groups) -> Options:
  mode = mode or default_mode(method)
  check_mode(method, mode)
  if reduction not in REDUCTIONS:
    raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
  if mode == "features" and not isinstance(loss_fn, SplitLoss):
    raise ValueError("engine mode 'features' needs a SplitLoss(encode, decode) loss function")
  if int(chunk) < 1:
    raise ValueError(f"gramian_chunk must be >= 1, got {chunk}")
  if layer_gramian not in taps.LAYER_GRAMIAN:
    raise ValueError(f"unknown layer_gramian {layer_gramian!r}; valid: "
                     f"{', '.join(taps.LAYER_GRAMIAN)}")
  exact_axis = axis_name if reduction == "exact" else None
  mask = resolve_mask(shared_mask, params)
  groups = ()
  if gramian_groups:
    if mode != "jacobian":
      raise ValueError(f"gramian_groups needs engine mode 'jacobian' (the held Jacobian is per "
                       f"layer), got mode {mode!r}")
    groups = _resolve_groups(gramian_groups, params, mask)
  return Options(mode, mask, axis_name, exact_axis, int(chunk), layer_gramian, groups)


def _resolve_groups(gramian_groups, params, mask) -> tuple:
  """``{name: prefix}`` -> ``((name, frozenset of shared leaf indices), ...)``; a group that
  matches no shared leaf, or a leaf in two groups, is an error."""
  paths = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  shared = jax.tree.leaves(mask)
  groups, owner = [], {}
  for name, prefix in dict(gramian_groups).items():
    members = frozenset(i for i, p in enumerate(paths) if shared[i] and p.startswith(str(prefix)))
    if not members:
      raise ValueError(f"gramian group {name!r}: prefix {prefix!r} matches no shared parameter; "
                       f"shared paths: {', '.join(p for p, m in zip(paths, shared) if m)}")
    for i in members:
      if i in owner:
        raise ValueError(f"gramian groups {owner[i]!r} and {name!r} both hold {paths[i]!r}")
      owner[i] = name
    groups.append((str(name), members))
  return tuple(groups)


def _grouped(terms: dict, groups: tuple, k: int):
  """``(G, {group: G_g})`` from per-leaf Gramian terms ``{leaf index: (K, K)}``."""
  zero = jnp.zeros((k, k), jnp.float32)
  gram = sum(terms.values(), zero) if terms else gramian_of([], [])
  per_group = {name: sum((terms[i] for i in members if i in terms), zero)
               for name, members in groups}
  return gram, (per_group or None)


def _linearise(method, loss_fn, params, args, opts: Options) -> Linear:
  """The VJP of the loss (through the planned layer taps in a weighting's jacobian mode) and, in
  the gramian mode, the JVP of a forward-mode linearisation."""
  plan = None
  if opts.mode == "jacobian" and method.is_weighting and opts.layer_gramian != "off":
    plan = taps.plan(loss_fn, params, args, opts.mask, method.num_tasks,
                     _axis_size(opts.exact_axis), opts.layer_gramian)
  if plan is None:
    losses, pull, aux = jax.vjp(lambda p: loss_fn(p, *args), params, has_aux=True)
    tapped = None
  else:  # pull(c) = (params' cotangent, the taps' cotangents)
    f = taps.tapped(loss_fn, plan)
    losses, pull, (aux, inputs) = jax.vjp(lambda p, t: f(p, t, *args), params, taps.zeros(plan),
                                          has_aux=True)
    tapped = (plan, inputs)
  jvp = None
  if opts.mode == "gramian":
    # The JVPs come from a forward-mode linearisation traced with plain convolutions, the VJPs
    # from reverse mode with canonical-layout ones (mtl_jax.layers: inside the streaming loop
    # JAX's own transposed convolutions fall back to a naive loop on XLA-CPU). The price is a second
    # forward pass and its residuals.
    with layers.tracing(forward_mode=True):
      _, jvp, _ = jax.linearize(lambda p: loss_fn(p, *args), params, has_aux=True)
  k = method.num_tasks
  if losses.shape != (k,):
    raise ValueError(f"the loss function returned losses of shape {losses.shape}, expected ({k},)")
  return Linear(_pmean(losses, opts.exact_axis, opts.fixed_order), pull, jvp, tapped, aux)


def _reduce_local(step: Step, axis_name, fixed_order: bool) -> Step:
  """``reduction='local'``: each device combined alone; average the updates, the losses and the
  float leaves of the state (so that it stays replicated); a step is finite on every device."""
  inexact = lambda x: (_pmean(x, axis_name, fixed_order) if jnp.issubdtype(x.dtype, jnp.inexact)
                       else x)
  ok = jax.lax.pmin(step.ok.astype(jnp.int32), axis_name).astype(bool)
  return step._replace(update=_pmean(step.update, axis_name, fixed_order),
                       losses=_pmean(step.losses, axis_name, fixed_order),
                       method_state=jax.tree.map(inexact, step.method_state), ok=ok)


# ---------------------------------------------------------------------------------------------
# The paths, one per mode.


def _losses_path(method, state, lin: Linear, opts: Options) -> Step:
  """One backward pass of ``sum_k w_k L_k``."""
  weights, new, ok = guarded_weights(method, None, lin.losses, state.method)
  update = _pmean(_weighted_grad(method, lin, weights, opts.mask), opts.exact_axis,
                  opts.fixed_order)
  return Step(update, lin.losses, weights, None, new, ok)


def _gramian_path(method, state, lin: Linear, opts: Options) -> Step:
  """The streamed Gramian, then one backward pass with the weights."""
  def fresh():
    gram = _streamed_gramian(lin, method.num_tasks, opts)
    weights, new, ok = guarded_weights(method, gram, lin.losses, state.method)
    update = _pmean(_weighted_grad(method, lin, weights, opts.mask), opts.exact_axis,
                    opts.fixed_order)
    return Step(update, lin.losses, weights, gram, new, ok)

  return _fresh_or_reuse(method, state, lin, opts, fresh)


def _jacobian_path(method, state, lin: Linear, opts: Options) -> Step:
  """The held Jacobian (weightings: task-minor, with the tapped layers' shares; aggregators: the
  K-leading rows their contract promises)."""
  if not method.is_weighting:
    return _aggregator_step(method, state, lin, opts)
  return _fresh_or_reuse(method, state, lin, opts,
                         lambda: _weighting_jacobian_step(method, state, lin, opts))


_PATHS = {"losses": _losses_path, "gramian": _gramian_path, "jacobian": _jacobian_path}


def _fresh_or_reuse(method, state, lin: Linear, opts: Options, fresh: Callable[[], Step]) -> Step:
  """``fresh()``, or with ``Method.fresh`` a ``lax.cond``: steps that reuse the weights take the
  one-backward path and compute no Jacobian at all."""
  if method.fresh is None:
    return fresh()
  return jax.lax.cond(method.fresh(state.method), fresh,
                      lambda: _reuse_step(method, state, lin, opts))


def _weighting_jacobian_step(method, state, lin: Linear, opts: Options) -> Step:
  """A weighting's ``jacobian``-mode step. The rows are held task-minor (each leaf (..., K)):
  their Gramian and weighted sum are cheaper on XLA-CPU than the K-leading layout's (CelebA CNN,
  K=40: the Gramian adds 3% to the Jacobian step instead of 5-8%; docs/performance.md). A tapped
  layer (:mod:`mtl_jax.taps`) gives its Gramian share from its inputs and output cotangents and
  its update as one kernel gradient; its rows are never read (XLA drops its per-task kernel
  gradients)."""
  plan, inputs = lin.taps if lin.taps is not None else (taps.Plan(()), [])
  eye = jnp.eye(lin.losses.shape[0], dtype=lin.losses.dtype)
  rows, tap_rows = jax.vmap(lin.pull, out_axes=(-1, 0))(eye) if plan.sites else (
      jax.vmap(lambda c: lin.pull(c)[0], out_axes=-1)(eye), [])
  leaves, treedef = jax.tree.flatten(rows)
  mask_leaves = jax.tree.leaves(opts.mask)
  site_of = {s.leaf: i for i, s in enumerate(plan.sites)}
  rows = _pmean([None if i in site_of else j for i, j in enumerate(leaves)], opts.exact_axis,
                opts.fixed_order)
  size = _axis_size(opts.exact_axis)
  terms = {s.leaf: taps.site_gramian(s, inputs[i][0], tap_rows[i], opts.exact_axis, size)
           for i, s in enumerate(plan.sites)}
  terms.update({i: gramian_of([j], [True], task_axis=-1)
                for i, (j, m) in enumerate(zip(rows, mask_leaves)) if m and j is not None})
  gram, groups = _grouped(terms, opts.groups, lin.losses.shape[0])
  weights, new, ok = guarded_weights(method, gram, lin.losses, state.method)
  specific = method.specific_weights(weights)
  update = []
  for i, (j, m) in enumerate(zip(rows, mask_leaves)):
    if i in site_of:
      x, w, op = inputs[site_of[i]]
      cot = weighted_sum(weights, tap_rows[site_of[i]])  # the K cotangents are K-leading
      upd = taps.site_update(x, w, op, cot).astype(leaves[i].dtype)  # w may be a cast
      update.append(_pmean(upd, opts.exact_axis, opts.fixed_order))
    else:
      update.append(weighted_sum(weights if m else specific, j, task_axis=-1))
  return Step(jax.tree.unflatten(treedef, update), lin.losses, weights, gram, new, ok, groups)


def _aggregator_step(method, state, lin: Linear, opts: Options) -> Step:
  """An aggregator on the K-leading Jacobian; the Gramian is for the statistics (cheap next to
  the Jacobian)."""
  jac = _pmean(_rows(lin.pull, lin.losses, task_axis=0), opts.exact_axis, opts.fixed_order)
  terms = {i: gramian_of([j], [True]) for i, (j, m) in
           enumerate(zip(jax.tree.leaves(jac), jax.tree.leaves(opts.mask))) if m}
  gram, groups = _grouped(terms, opts.groups, lin.losses.shape[0])
  update, weights, new, ok = aggregated(method, jac, lin.losses, state.method, opts.mask)
  return Step(update, lin.losses, weights, gram, new, ok, groups)


def _streamed_gramian(lin: Linear, k: int, opts: Options) -> jax.Array:
  """``G = J_s J_s^T`` over the shared leaves, ``chunk`` rows of ``J`` at a time.

  For a block ``a`` of tasks, the rows ``J_a`` come from ``chunk`` VJPs; their shared part is then
  pushed forward, ``J J_a^T = G[:, a]``, by ``chunk`` JVPs of the same linearisation. Only
  ``chunk`` rows of the Jacobian ever exist (memory ~ ``chunk`` x params); the price is one JVP per
  task on top of the VJPs (about 2x the vmapped Jacobian's arithmetic). Under ``exact_axis`` the
  rows and the columns are device-averaged, so ``G`` is the Gramian of the global-batch Jacobian.
  """
  chunk, axis, mask = opts.chunk, opts.exact_axis, opts.mask
  n = -(-k // chunk)
  eye = jnp.eye(n * chunk, k, dtype=lin.losses.dtype).reshape(n, chunk, k)

  def block(_, cot):
    rows = _pmean(jax.vmap(lambda c: lin.pull(c)[0])(cot), axis, opts.fixed_order)
    rows = jax.tree.map(lambda r, m: r if m else jnp.zeros_like(r), rows, mask)
    cols = _pmean(jax.vmap(lin.jvp)(rows), axis, opts.fixed_order)  # (chunk, K): <g_a, g_l>
    return None, cols

  _, cols = jax.lax.scan(block, None, eye)
  gram = cols.reshape(n * chunk, k)[:k].astype(jnp.float32)
  return 0.5 * (gram + gram.T)


def _reuse_step(method, state, lin: Linear, opts: Options) -> Step:
  """A step between solves: the stored weights, one VJP, the shared part's norm capped."""
  k, mask = method.num_tasks, opts.mask
  weights, new, max_norm = method.reuse(lin.losses, state.method)
  weights = jnp.asarray(weights, jnp.float32)
  update = _pmean(_weighted_grad(method, lin, weights, mask), opts.exact_axis, opts.fixed_order)
  sq = sum(jnp.sum(jnp.square(u.astype(jnp.float32)))
           for u, m in zip(jax.tree.leaves(update), jax.tree.leaves(mask)) if m)
  cap = jnp.asarray(max_norm, jnp.float32)
  scale = jnp.where(cap > 0, jnp.minimum(1.0, cap / jnp.maximum(jnp.sqrt(sq), 1e-30)), 1.0)
  scale_specific = scale if method.specific == "weighted" else jnp.ones_like(scale)
  update = jax.tree.map(lambda u, m: u * (scale if m else scale_specific).astype(u.dtype),
                        update, mask)
  weights = weights * scale
  ok = all_finite(lin.losses, update, weights)
  weights = jnp.where(ok, weights, 0.0)
  zeros = jnp.zeros((k, k), jnp.float32)
  groups = {name: zeros for name, _ in opts.groups} or None
  return Step(update, lin.losses, weights, zeros, new, ok, groups)


def _weighted_grad(method, lin: Linear, weights, mask):
  """``sum_k w_k grad L_k`` on the shared leaves, the specific weights' on the others."""
  update = lin.grad(weights)
  if method.specific == "weighted":
    return update
  specific = lin.grad(method.specific_weights(weights))
  return jax.tree.map(lambda u, s, m: u if m else s, update, specific, mask)


def _features_path(method, state, split: SplitLoss, params, args, opts: Options):
  """The Gramian of the losses' Jacobian w.r.t. the shared representation, then one backward pass
  through the encoder with the weighted cotangent: ``(Step, (enc_aux, dec_aux))``."""
  k, mask, axis = method.num_tasks, opts.mask, opts.exact_axis
  z, enc_vjp, enc_aux = jax.vjp(lambda p: split.encode(p, *args), params, has_aux=True)
  losses, dec_vjp, dec_aux = jax.vjp(
      lambda p, zz: split.decode(p, zz, *args), params, z, has_aux=True)
  if losses.shape != (k,):
    raise ValueError(f"the loss function returned losses of shape {losses.shape}, expected ({k},)")
  glosses = _pmean(losses, axis, opts.fixed_order)
  gram = None
  if method.needs != LOSSES:
    jz = jax.vmap(lambda c: dec_vjp(c)[1])(jnp.eye(k, dtype=losses.dtype))
    gram = gramian_of(jz, resolve_mask(None, jz))
    if axis is not None:
      size = _axis_size(axis)
      gram = (device_mean(gram, axis) / size if opts.fixed_order
              else jax.lax.psum(gram, axis) / (size * size))
  weights, new, ok = guarded_weights(method, gram, glosses, state.method)
  dec_params, dz = dec_vjp(weights.astype(losses.dtype))
  if method.specific != "weighted":
    spec_params, _ = dec_vjp(method.specific_weights(weights).astype(losses.dtype))
    dec_params = jax.tree.map(lambda u, s, m: u if m else s, dec_params, spec_params, mask)
  (enc_params,) = enc_vjp(dz)
  update = _pmean(jax.tree.map(jnp.add, dec_params, enc_params), axis, opts.fixed_order)
  return Step(update, glosses, weights, gram, new, ok), (enc_aux, dec_aux)
