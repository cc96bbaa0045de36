"""The sharing-strategy contract: :class:`MultiTaskModel`, the registry and the stage runner.

A strategy is a function ``(backbone, tasks, **options) -> MultiTaskModel`` registered with
``@register('name')``. The model's flax ``module`` maps inputs to ``{task: prediction}``:

    variables = model.init(rng, sample_inputs)          # {'params': ..., ['batch_stats': ...]}
    preds = model.module.apply(variables, x, train=False)
    preds, state = model.module.apply(variables, x, train=True, mutable=['batch_stats'])

Stages are run *functionally*: each stage (an unbound flax module from ``backbone.stages``) keeps
its variables under ``stage_<i>`` (``tower_<i>`` for the K stacked copies of per-task towers,
``expert...`` for experts) and is applied with ``jax.vmap`` over a leading copy axis when there
are several copies (towers, experts, sparse masks). Heads live under ``head_<task>``. Heads are
called as ``head(z, train=train)`` when their ``__call__`` takes ``train``, else ``head(z)``.

``shared_mask(params)`` marks the parameters that several tasks' losses depend on (the combiner's
Gramian is over them); heads, attention modules, gates and per-task towers are task-specific.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from mtl_jax import layers
from mtl_jax._choices import unknown as _unknown

PyTree = Any
STATE_COLLECTIONS = ("batch_stats",)


@dataclasses.dataclass(frozen=True, eq=False)
class Defs:
  """Unbound flax modules kept out of flax's sight (a module field holding modules would adopt
  them as bound children; the strategies apply them functionally instead). Hashes by identity."""

  modules: tuple


@dataclasses.dataclass(frozen=True, eq=False)
class MultiTaskModel:
  """A multi-task model built by a sharing strategy.

  Attributes:
    name: the strategy's registry name.
    module: flax module; ``apply(variables, inputs, train=bool, mutable=[...]) -> {task: pred}``.
    task_names: the tasks, in order (the order of the loss vector).
    shared: ``params -> tree of bool``, True where a leaf is shared by several tasks.
    regularizer_fn: ``params -> scalar`` (soft sharing) or None.
    options: the strategy's resolved options.
    has_split: whether ``encode``/``decode`` exist (one shared representation; for MGDA-UB's
      ``features`` engine mode through :class:`mtl_jax.autodiff.SplitLoss`).
    extra_init: ``(variables) -> variables``: adds non-parameter collections after init
      (the sparse strategy's masks).
    info: anything else the strategy reports (e.g. sparse mask helpers).
  """

  name: str
  module: nn.Module
  task_names: tuple[str, ...]
  shared: Callable[[PyTree], PyTree]
  regularizer_fn: Optional[Callable[[PyTree], jax.Array]] = None
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  has_split: bool = False
  extra_init: Optional[Callable[[PyTree], PyTree]] = None
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  sample_input: Optional[Callable[[], Any]] = None  # the backbone's (batch of 2)
  # Mixed precision ('float32' | 'bfloat16'): parameters and batch statistics stay float32; every
  # apply casts the parameters and floating inputs to this dtype and the outputs back to float32.
  compute_dtype: str = "float32"

  @property
  def num_tasks(self) -> int:
    return len(self.task_names)

  def init(self, rng, sample_inputs, train: bool = False) -> dict:
    """Variables ``{'params': ..., 'batch_stats'?: ..., 'sparse_masks'?: ...}`` as a plain dict."""
    variables = self.module.init({"params": rng, "dropout": rng}, sample_inputs, train=train)
    variables = _unfreeze(variables)
    if self.extra_init is not None:
      variables = self.extra_init(variables)
    return variables

  def shared_mask(self, params) -> PyTree:
    return self.shared(params)

  def regularizer(self, params) -> Optional[jax.Array]:
    """The soft-sharing penalty (already multiplied by its lambda), or None."""
    return None if self.regularizer_fn is None else self.regularizer_fn(params)

  @staticmethod
  def num_params(params) -> int:
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(params)))

  def param_count(self, sample_inputs=None) -> int:
    """The number of parameters, from shapes only (``jax.eval_shape``: nothing is computed)."""
    if sample_inputs is None:
      if self.sample_input is None:
        raise ValueError("param_count: give sample_inputs (the backbone has no sample_input)")
      sample_inputs = self.sample_input()
    shapes = jax.eval_shape(lambda r: self.module.init({"params": r, "dropout": r}, sample_inputs,
                                                       train=False), jax.random.key(0))
    return self.num_params(shapes["params"])

  def apply(self, variables, inputs, train: bool = False, rngs=None):
    """``(predictions, state updates)``; updates is ``{}`` in eval mode or without batch norm."""
    return self._apply(variables, inputs, train, "all", rngs)

  def encode(self, variables, inputs, train: bool = False, rngs=None):
    """``(z, state updates)``: the shared representation (strategies with ``has_split``)."""
    self._need_split()
    return self._apply(variables, inputs, train, "encode", rngs)

  def decode(self, variables, z, train: bool = False, rngs=None):
    """``({task: prediction}, state updates)`` from the shared representation ``z``."""
    self._need_split()
    return self._apply(variables, z, train, "decode", rngs)

  def _need_split(self):
    if not self.has_split:
      raise ValueError(
          f"sharing {self.name!r} has no single shared representation (encode/decode); "
          f"strategies with one: {', '.join(n for n in names() if _SPLIT.get(n))}")

  def _apply(self, variables, x, train, part, rngs):
    mutable = [c for c in STATE_COLLECTIONS if c in variables] if train else []
    kw = {"rngs": rngs} if rngs else {}
    dtype = layers.compute_dtype(self.compute_dtype)
    if dtype != jnp.float32:  # the taps see through this cast (mtl_jax.layers.cast_floating)
      variables = {**variables, "params": layers.cast_floating(variables["params"], dtype)}
      x = layers.cast_floating(x, dtype)
    if mutable:
      out, upd = self.module.apply(variables, x, train=train, part=part, mutable=mutable, **kw)
      upd = _unfreeze(upd)
    else:
      out, upd = self.module.apply(variables, x, train=train, part=part, **kw), {}
    if dtype != jnp.float32:
      out, upd = layers.cast_floating((out, upd), jnp.float32)
    return out, upd


def _unfreeze(tree):
  try:
    from flax.core import unfreeze
    return unfreeze(tree)
  except Exception:  # pragma: no cover
    return tree


# ---------------------------------------------------------------------------------------------
# Masks by parameter path.


def path_mask(params, shared_prefixes: Sequence[str]) -> PyTree:
  """True for leaves whose top-level name starts with one of ``shared_prefixes``."""

  def is_shared(path, _):
    top = getattr(path[0], "key", str(path[0]))
    return any(str(top).startswith(p) for p in shared_prefixes)

  return jax.tree_util.tree_map_with_path(is_shared, params)


# ---------------------------------------------------------------------------------------------
# Running an unbound module functionally under a parent's variables.


def _call_module(m: nn.Module, variables, x, train: bool, rngs, mutable, pass_train: bool):
  args = (x, train) if pass_train == "positional" else (x,)
  kw = {"train": train} if pass_train == "keyword" else {}
  if mutable:
    return m.apply(variables, *args, rngs=rngs, mutable=mutable, **kw)
  return m.apply(variables, *args, rngs=rngs, **kw), None


def train_style(m: nn.Module, stage: bool) -> str:
  """How to pass ``train``: stages take ``(x, train)``; heads get ``train=`` if they accept it."""
  if stage:
    return "positional"
  try:
    params = inspect.signature(type(m).__call__).parameters
  except (TypeError, ValueError):
    return "none"
  return "keyword" if "train" in params or any(
      p.kind == p.VAR_KEYWORD for p in params.values()) else "none"


def run(parent: nn.Module, name: str, m: nn.Module, x, train: bool, *, stage: bool = True,
        copies: Optional[int] = None, x_axis: Optional[int] = None,
        transform: Optional[Callable] = None, transform_args=None):
  """Apply the unbound module ``m`` with variables stored under ``parent``'s ``name``.

  ``copies=None``: one copy. ``copies=K``: K copies whose variables are stacked on a leading axis
  (independently initialised), run with ``jax.vmap``; ``x_axis`` = None feeds every copy the same
  input, 0 feeds copy k the slice ``x[k]``. ``transform(params, *transform_args)`` (vmapped over
  the leading axis of ``transform_args``) maps the parameters before the call and makes K outputs
  from one set of parameters (the sparse strategy's ``params * mask_k``); then ``copies`` is K
  and the batch statistics are per copy.
  """
  style = train_style(m, stage)
  stacked_params = copies is not None and transform is None
  if parent.is_initializing() and not parent.has_variable("params", name) and not any(
      parent.has_variable(c, name) for c in STATE_COLLECTIONS):
    rng = parent.make_rng("params")

    def init_one(r, xx):
      return _unfreeze(m.init({"params": r, "dropout": r}, *((xx, False) if style == "positional"
                                                                 else (xx,)),
                              **({"train": False} if style == "keyword" else {})))

    if stacked_params:
      v = jax.vmap(init_one, in_axes=(0, x_axis))(jax.random.split(rng, copies), x)
    else:
      v = init_one(rng, x if x_axis is None else jax.tree.map(lambda a: a[0], x))
      if copies is not None:  # per-copy state of one shared parameter set
        v = {c: (col if c == "params" else
                 jax.tree.map(lambda a: jnp.broadcast_to(a, (copies,) + a.shape), col))
             for c, col in v.items()}
    for col, val in v.items():
      if col == "params":
        parent.param(name, lambda _r, val=val: val)
      else:
        parent.variable(col, name, lambda val=val: val)
  params = parent.get_variable("params", name) if parent.has_variable("params", name) else {}
  state = {c: parent.get_variable(c, name) for c in STATE_COLLECTIONS if parent.has_variable(c, name)}
  mutable = [c for c in state if train and parent.is_mutable_collection(c)]
  rng = parent.make_rng("dropout") if train and parent.has_rng("dropout") else None

  def call(p, s, xx, r, *targs):
    if transform is not None:
      p = transform(p, *targs)
    variables = dict(s, params=p) if p else dict(s)
    rngs = {"dropout": r} if r is not None else {}
    y, upd = _call_module(m, variables, xx, train, rngs, mutable, style)
    return y, ({} if upd is None else _unfreeze(upd))

  if copies is None:
    y, upd = call(params, state, x, rng)
  else:
    rngs = jax.random.split(rng, copies) if rng is not None else None
    p_axis = None if transform is not None else 0
    targs = tuple(transform_args or ())
    y, upd = jax.vmap(call, in_axes=(p_axis, 0, x_axis, None if rngs is None else 0)
                      + (0,) * len(targs))(params, state, x, rngs, *targs)
  for col in mutable:
    parent.put_variable(col, name, upd[col])
  return y


def take(tree, k: int):
  """Copy ``k`` of a stacked pytree."""
  return jax.tree.map(lambda a: a[k], tree)


# ---------------------------------------------------------------------------------------------
# Registry.

_REGISTRY: dict[str, Callable[..., MultiTaskModel]] = {}
_SPLIT: dict[str, bool] = {}


def register(name: str, split: bool = False):
  """Decorator: ``@register('hard', split=True) def hard(backbone, tasks, **options)``."""

  def deco(fn):
    if name in _REGISTRY:
      raise ValueError(f"sharing strategy {name!r} registered twice")
    _REGISTRY[name] = fn
    _SPLIT[name] = split
    return fn

  return deco


def names() -> list[str]:
  return sorted(_REGISTRY)




def options(name: str) -> dict:
  """The options of a strategy and their defaults."""
  if name not in _REGISTRY:
    raise _unknown("sharing strategy", name, _REGISTRY)
  sig = inspect.signature(_REGISTRY[name])
  return {p.name: p.default for p in sig.parameters.values()
          if p.name not in ("backbone", "tasks") and p.kind == p.KEYWORD_ONLY}


def get(name: str, backbone, tasks, **opts) -> MultiTaskModel:
  """Build strategy ``name`` over ``backbone`` (a Backbone) and ``tasks`` (Tasks)."""
  valid = options(name)
  for key in opts:
    if key not in valid:
      raise _unknown(f"option of sharing {name}:", key, valid)
  tasks = tuple(tasks)
  if not tasks:
    raise ValueError("sharing: need at least one task")
  task_names = [t.name for t in tasks]
  if len(set(task_names)) != len(task_names):
    raise ValueError(f"sharing: task names must be unique, got {task_names}")
  if not backbone.stages:
    raise ValueError(f"backbone {backbone.name!r} has no stage")
  return _REGISTRY[name](backbone, tasks, **opts)


def stage_defs(backbone, copies: int = 1) -> tuple:
  """Fresh unbound stage modules (built outside any flax context)."""
  return tuple(f() for f in backbone.stages)


def head_defs(tasks) -> tuple:
  return tuple(t.head() for t in tasks)
