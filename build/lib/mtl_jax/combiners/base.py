"""The combiner contract: a method spec, the generic optax wrapper, and the registry.

A multi-task gradient *combiner* turns K task gradients into one update. Almost every method in the
literature is a *weighting*: it picks weights ``w`` (K,) and the update on the shared parameters is
``sum_k w_k g_k``. A weighting only ever looks at the Gramian ``G = J J^T`` of the shared Jacobian
(K x K) and at the task losses, so it is written once as a pure function

    weigh(gramian, losses, state) -> (weights, state)

and then used in two ways:

* as an optax transformation (:func:`as_optax`) that receives the per-task gradients
  (``task_grads``: the params' tree with a leading axis of size K on every leaf), builds the
  Gramian over the shared leaves and returns ``sum_k w_k g_k``;
* by the engine (:mod:`mtl_jax.autodiff`), which builds the Gramian without keeping the Jacobian
  and then takes one VJP with the weights.

Methods that need more than the Gramian (GradDrop's sign-based dropping, MoCo's and DB-MTL's tracked
gradients) are *aggregators*: ``aggregate(jac, losses, state) -> (update, specific_weights, state)``
where ``jac`` holds only the shared leaves (other leaves are ``None``).

Loss-only methods (LS, RLW, DWA, ...) are weightings that ignore the Gramian (it is passed as
``None``); they declare ``needs=LOSSES`` and the engine then does one backward pass of ``sum w_k L_k``.

Task-specific parameters (a leaf not in the shared mask) only receive gradient from their own task;
each method says how they are weighted, following its official code: ``specific='weighted'`` gives
them ``w_k g_k`` (Nash-MTL, the loss weightings), ``specific='sum'`` gives them ``g_k`` (the
LibMTL convention for gradient-manipulation methods: heads train on their own unweighted loss).

Non-finite input: the wrapper never lets a NaN or Inf reach the parameters. When a loss or the
Gramian is not finite, the step is *skipped*: the update is zero, the combiner state is kept, and
``CombinerState.skipped`` is incremented. The trainer stops (or skips, if asked) with a message
naming the task and step before that happens; this is the guard for users of the bare transform.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from mtl_jax._choices import unknown as _unknown

LOSSES = "losses"
GRAMIAN = "gramian"
JACOBIAN = "jacobian"
NEEDS = (LOSSES, GRAMIAN, JACOBIAN)

PyTree = Any
Weigh = Callable[[Optional[jax.Array], jax.Array, Any], "tuple[jax.Array, Any]"]
Aggregate = Callable[[PyTree, jax.Array, Any], "tuple[PyTree, jax.Array, Any]"]


class EmptyState(NamedTuple):
  """State of a stateless method."""


@dataclasses.dataclass(frozen=True)
class Method:
  """One combining method, independent of how its inputs are computed.

  Attributes:
    name: registry name (lower case, as the paper writes it).
    num_tasks: K.
    needs: ``'losses'``, ``'gramian'`` or ``'jacobian'``: the least the engine must compute.
    init: ``params -> state`` (a NamedTuple of arrays). ``params`` is the full parameter tree; most
      methods ignore it, Jacobian methods use the shapes of the shared leaves. An ``init`` that
      accepts an optional keyword ``shared_mask`` receives the resolved mask (a tree of bools) from
      :func:`as_optax` / :func:`init_method_state`.
    weigh: for ``losses``/``gramian`` methods, ``(gramian | None, losses, state) -> (w, state)``.
    aggregate: for ``jacobian`` methods, ``(jac, losses, state) -> (update, specific_w, state)``;
      ``jac`` has the params' tree with ``None`` at non-shared leaves and a leading K axis
      elsewhere; ``update`` has the same tree (``None`` at non-shared leaves).
    specific: ``'weighted'`` or ``'sum'``: how task-specific parameters combine their own task's
      gradient (see the module docstring).
    fresh: optional, for weightings that re-use their weights between solves (Nash-MTL's
      ``update_weights_every``): ``state -> bool array``, True when this step needs the Gramian.
      Without it every step is fresh.
    reuse: with ``fresh``: ``(losses, state) -> (weights, state, max_norm)`` for the steps where
      ``fresh(state)`` is False: the stored weights, the advanced state, and a cap on the norm of
      the shared update (a float or scalar array; ``<= 0``: no cap). The engine then computes no
      Jacobian: one backward pass of ``sum_k w_k L_k``, scaled so the shared part's norm is at most
      ``max_norm`` (the weights are scaled alike). ``weigh`` must give the same result on such a
      step (the optax wrapper, which always has the gradients, calls ``weigh``).
  """

  name: str
  num_tasks: int
  needs: str
  init: Callable[[PyTree], Any]
  weigh: Optional[Weigh] = None
  aggregate: Optional[Aggregate] = None
  specific: str = "weighted"
  fresh: Optional[Callable[[Any], jax.Array]] = None
  reuse: Optional[Callable[[jax.Array, Any], "tuple[jax.Array, Any, Any]"]] = None

  def __post_init__(self):
    if self.needs not in NEEDS:
      raise ValueError(f"needs must be one of {NEEDS}, got {self.needs!r}")
    if (self.weigh is None) == (self.aggregate is None):
      raise ValueError(f"{self.name}: give exactly one of weigh / aggregate")
    if (self.aggregate is not None) != (self.needs == JACOBIAN):
      raise ValueError(f"{self.name}: aggregate goes with needs='jacobian' and only with it")
    if self.specific not in ("weighted", "sum"):
      raise ValueError(f"{self.name}: specific must be 'weighted' or 'sum'")
    if (self.fresh is None) != (self.reuse is None):
      raise ValueError(f"{self.name}: give both fresh and reuse, or neither")
    if self.fresh is not None and self.needs != GRAMIAN:
      raise ValueError(f"{self.name}: fresh/reuse go with needs='gramian' only")

  @property
  def is_weighting(self) -> bool:
    return self.weigh is not None

  def specific_weights(self, weights: jax.Array) -> jax.Array:
    return weights if self.specific == "weighted" else jnp.ones_like(weights)

  def transform(self, shared_mask=None) -> "CombinerTransformation":
    return as_optax(self, shared_mask)


# ---------------------------------------------------------------------------------------------
# Shared-parameter masks and Jacobian helpers (also used by the engine).


def resolve_mask(shared_mask, tree) -> PyTree:
  """A tree of Python bools with ``tree``'s structure: True where the leaf is shared.

  ``shared_mask`` is ``None`` (everything shared), a tree of bools with the params' structure, or a
  callable ``tree -> tree of bools`` (it receives a tree with the params' structure).
  """
  if shared_mask is None:
    return jax.tree.map(lambda _: True, tree)
  mask = shared_mask(tree) if callable(shared_mask) else shared_mask
  mask = jax.tree.map(bool, mask)
  if jax.tree.structure(mask) != jax.tree.structure(tree):
    raise ValueError(
        "shared_mask must have the parameters' tree structure: got "
        f"{jax.tree.structure(mask)} for {jax.tree.structure(tree)}")
  return mask


def gramian_of(jac: PyTree, mask: PyTree, task_axis: int = 0) -> jax.Array:
  """K x K Gramian of the shared rows of a Jacobian tree (non-shared leaves ignored).

  ``task_axis`` is where each leaf holds the K tasks: 0 (the contract's K-leading layout) or -1
  (task-minor, what the engine's ``jacobian`` mode builds for weightings: on XLA-CPU the Gramian of
  a task-minor 40 x 5.2M Jacobian costs about half as much as of a K-leading one).
  """
  _check_task_axis(task_axis)
  terms = [
      _leaf_gramian(j, task_axis)
      for j, m in zip(jax.tree.leaves(jac), jax.tree.leaves(mask)) if m
  ]
  if not terms:
    raise ValueError("no shared parameter: the Gramian is over shared parameters only")
  return sum(terms[1:], terms[0])


def _check_task_axis(task_axis):
  if task_axis not in (0, -1):
    raise ValueError(f"task_axis must be 0 (K-leading) or -1 (task-minor), got {task_axis!r}")


def _leaf_gramian(j: jax.Array, task_axis: int = 0) -> jax.Array:
  hi = jax.lax.Precision.HIGHEST
  if task_axis == 0:
    j = j.reshape(j.shape[0], -1).astype(jnp.float32)
    return jnp.dot(j, j.T, precision=hi)
  j = j.reshape(-1, j.shape[-1]).astype(jnp.float32)
  return jnp.dot(j.T, j, precision=hi)


def weighted_sum(weights: jax.Array, jac_leaf: jax.Array, task_axis: int = 0) -> jax.Array:
  """``sum_k w_k J[k]`` for a leaf with the K tasks on ``task_axis`` (0 or -1).

  A dot, not ``jnp.sum(w * J, axis=0)``: XLA-CPU's reduction over the leading axis of a held
  Jacobian is two orders of magnitude slower (``docs/performance.md``).
  """
  _check_task_axis(task_axis)
  w = weights.astype(jac_leaf.dtype)
  if task_axis == 0:
    return jnp.tensordot(w, jac_leaf, axes=1)
  return jnp.tensordot(jac_leaf, w, axes=1)


def combine_jacobian(method: Method, weights, jac: PyTree, mask: PyTree,
                     task_axis: int = 0) -> PyTree:
  """``sum_k w_k g_k`` on shared leaves, ``sum_k v_k g_k`` on task-specific leaves."""
  specific = method.specific_weights(weights)
  return jax.tree.map(
      lambda j, m: weighted_sum(weights if m else specific, j, task_axis), jac, mask)


def all_finite(*trees) -> jax.Array:
  """One boolean: every element of every leaf is finite.

  The per-leaf flags are counted with a dot product, not ``jnp.all(jnp.stack(...))``: XLA turns a
  reduction of stacked scalars into a chain of ``and``s and copies that whole chain into every
  fusion that consumes the result (``jnp.where(ok, ...)`` leaf by leaf), which on the CelebA CNN
  made the optimised step several times larger and slower to compile (``docs/performance.md``). A dot is kept as one value.
  """
  leaves = [x for t in trees for x in jax.tree.leaves(t)]
  flags = jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).astype(jnp.float32)
  return jnp.dot(flags, jnp.ones_like(flags)) == flags.shape[0]


# ---------------------------------------------------------------------------------------------
# The optax transformation.


class CombinerState(NamedTuple):
  method: Any  # the method's own NamedTuple state
  skipped: jax.Array  # int32: steps skipped because a loss or gradient was not finite


class CombinerTransformation(optax.GradientTransformationExtraArgs):
  """An optax transformation that also carries its :class:`Method` as ``.method``."""

  method: Method  # set on the instance (optax's NamedTuple has no room for it)


def guarded_weights(method: Method, gram: Optional[jax.Array], losses: jax.Array, state):
  """``method.weigh`` with the finiteness check: ``(weights, new_state, ok)``; ``weights`` are
  float32 and zero where ``ok`` is False (a loss, the Gramian or a weight not finite)."""
  ok = all_finite(losses) if gram is None else all_finite(losses, gram)
  weights, new_state = method.weigh(gram, losses, state)
  ok = ok & all_finite(weights)
  return jnp.where(ok, weights, 0.0).astype(jnp.float32), new_state, ok


def aggregated(method: Method, jac: PyTree, losses: jax.Array, state, mask: PyTree):
  """An aggregator on a K-leading Jacobian: ``(update, specific_weights, new_state, ok)``; the
  shared leaves get the method's update, the others ``sum_k v_k g_k`` with its specific weights."""
  shared_jac = jax.tree.map(lambda j, m: j if m else None, jac, mask)
  ok = all_finite(losses, shared_jac)
  shared_upd, specific, new_state = method.aggregate(shared_jac, losses, state)
  ok = ok & all_finite(shared_upd, specific)
  update = jax.tree.map(lambda j, m, u: u if m else weighted_sum(specific, j), jac, mask,
                        fill_none(shared_upd, mask))
  return update, jnp.where(ok, specific, 0.0), new_state, ok


def skip_nonfinite(ok: jax.Array, update: PyTree, new_state, state: CombinerState):
  """The skip guard, for the transform and the engine alike: ``(update, CombinerState, ok)``.

  A gradient can be non-finite where the losses and the Gramian are finite (an overflow in a
  backward pass; loss-only methods build no Gramian; ``specific='sum'`` leaves do not go through
  the weights), and a VJP with zero weights still carries NaN from a non-finite forward pass: the
  update is checked too, then zeroed explicitly, the method's state kept and the step counted.
  """
  ok = ok & all_finite(update)
  update = optax.tree.where(ok, update, optax.tree.zeros_like(update))
  new_state = optax.tree.where(ok, new_state, state.method)
  skipped = state.skipped + jnp.where(ok, 0, 1).astype(jnp.int32)
  return update, CombinerState(new_state, skipped), ok


def as_optax(method: Method, shared_mask=None) -> CombinerTransformation:
  """The optax transformation of a method.

  ``update(task_grads, state, params=None, *, task_losses)``: ``task_grads`` has the params'
  tree with a leading axis of size K on every leaf (row k: the gradient of task k's loss);
  ``task_losses`` is the (K,) vector of losses. Returns the combined update with the params' tree.
  """

  def init(params):
    return CombinerState(init_method_state(method, params, shared_mask), jnp.zeros((), jnp.int32))

  def update(task_grads, state, params=None, *, task_losses=None, **extra):
    del params, extra
    if task_losses is None:
      raise ValueError(
          f"combiner {method.name!r} needs task_losses: call "
          "tx.update(task_grads, state, params, task_losses=losses)")
    losses = jnp.asarray(task_losses, jnp.float32)
    k = method.num_tasks
    if losses.shape != (k,):
      raise ValueError(f"{method.name}: task_losses has shape {losses.shape}, expected ({k},)")
    for leaf in jax.tree.leaves(task_grads):
      if leaf.shape[:1] != (k,):
        raise ValueError(
            f"{method.name}: every task_grads leaf needs a leading axis of size {k}, "
            f"got shape {leaf.shape}")
    mask = resolve_mask(shared_mask, task_grads)
    if method.is_weighting:
      gram = gramian_of(task_grads, mask) if method.needs == GRAMIAN else None
      weights, new_state, ok = guarded_weights(method, gram, losses, state.method)
      updates = combine_jacobian(method, weights, task_grads, mask)
    else:
      updates, _, new_state, ok = aggregated(method, task_grads, losses, state.method, mask)
    updates, new, _ = skip_nonfinite(ok, updates, new_state, state)
    return updates, new

  tx = CombinerTransformation(init, update)
  tx.method = method
  return tx


def init_method_state(method: Method, params, shared_mask=None):
  """``method.init(params)``, also passing the resolved shared mask when ``init`` accepts a
  ``shared_mask`` keyword (Jacobian methods that keep per-parameter state, e.g. MoCo's tracked
  gradients, then allocate it for the shared leaves only)."""
  if "shared_mask" in inspect.signature(method.init).parameters:
    return method.init(params, shared_mask=resolve_mask(shared_mask, params))
  return method.init(params)


def fill_none(tree, mask):
  """Replace the ``None`` leaves of a shared-only tree by 0 so it zips with the full tree."""
  return jax.tree.map(lambda u, m: u if m else 0.0, tree, mask, is_leaf=lambda x: x is None)


# ---------------------------------------------------------------------------------------------
# Registry.

_REGISTRY: dict[str, Callable[..., Method]] = {}


def register(name: str):
  """Decorator: ``@register('pcgrad') def pcgrad_method(num_tasks, **hparams) -> Method``."""

  def deco(fn):
    if name in _REGISTRY:
      raise ValueError(f"combiner {name!r} registered twice")
    _REGISTRY[name] = fn
    return fn

  return deco


def names() -> list[str]:
  return sorted(_REGISTRY)




def hparams(name: str) -> dict[str, Any]:
  """The hyper-parameters of a method and their defaults."""
  fn = _constructor(name)
  return {
      p.name: p.default for p in inspect.signature(fn).parameters.values()
      if p.name != "num_tasks" and p.default is not inspect.Parameter.empty
  }


def _constructor(name: str):
  if name not in _REGISTRY:
    raise _unknown("combiner", name, _REGISTRY)
  return _REGISTRY[name]


def method(name: str, num_tasks: int, **hp) -> Method:
  """The :class:`Method` of a registered combiner (what the trainer's engine uses)."""
  fn = _constructor(name)
  valid = hparams(name)
  for key in hp:
    if key not in valid:
      raise _unknown(f"hyper-parameter of {name}:", key, valid)
  if int(num_tasks) < 1:
    raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
  return fn(int(num_tasks), **hp)


def get(name: str, num_tasks: int, shared_mask=None, **hp) -> CombinerTransformation:
  """The optax transformation of a registered combiner."""
  return as_optax(method(name, num_tasks, **hp), shared_mask)
