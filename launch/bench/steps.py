"""The step benchmark's problem and programs.

The model is the CelebA CNN of the FAMO protocol (``../shared/REFERENCES.md``) with hard sharing
and K one-unit BCE heads, on random images and labels. The step timed is the trainer's own
(:func:`mtl_jax.train.make_train_step`: the engine in the named mode, then Adam at the protocol's
rate 3e-4, one SPMD program over a 1-D ``data`` mesh), built without donation so that one state
can be timed again and again; batches are placed by :func:`mtl_jax.train.shard_batch`.

Shared compilations: weightings with the same needs and task-specific rule are timed through
*one* compiled step per engine mode, a :func:`switch_method` whose state holds every method's
state and an index; ``lax.switch`` runs only the selected weighting, so each row is a real fused
step of that weighting (plus one conditional branch) at the cost of one compilation per group.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax import autodiff, combiners, models, sharing, tasks as T, train
from mtl_jax.combiners.base import Method, init_method_state

LEARNING_RATE = 3e-4  # the FAMO CelebA protocol's Adam


@dataclasses.dataclass
class Setup:
  """The benchmark problem: model, tasks, initial variables, one batch and the loss function."""

  model: Any
  tasks: list
  params: Any
  batch_stats: Any
  batch: dict
  mask: Any
  loss_fn: Callable
  num_tasks: int
  seed: int = 0


def make_setup(image_size: int = 32, batch_size: int = 16, num_tasks: int = 40,
               width_mult: float = 1.0, seed: int = 0) -> Setup:
  if min(image_size, batch_size, num_tasks) < 1 or width_mult <= 0:
    raise ValueError("image_size, batch, num_tasks must be >= 1 and width_mult > 0")
  backbone = models.get("celeba_cnn", width=float(width_mult), image_size=int(image_size))
  tasks = [T.binary_task(f"attr_{k}") for k in range(int(num_tasks))]
  model = sharing.get("hard", backbone, tasks)
  # One compiled init instead of ~100 op-by-op dispatches (each a small compilation on first use).
  variables = jax.jit(model.init)(jax.random.key(seed), backbone.sample_input())
  rs = np.random.RandomState(seed)
  batch = {
      "inputs": rs.rand(batch_size, image_size, image_size, 3).astype(np.float32),
      "targets": {t.name: (rs.rand(batch_size) > 0.5).astype(np.float32) for t in tasks},
  }
  params = variables["params"]
  return Setup(model, tasks, params, variables.get("batch_stats", {}), batch,
               model.shared_mask(params), train.make_loss_fn(model, tasks, False, {}),
               len(tasks), int(seed))


def num_params(tree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------
# Methods: one compiled step for a group of weightings.


class SwitchState(NamedTuple):
  index: jax.Array  # int32: which method's weigh runs
  states: tuple  # every method's own state


def switch_method(methods: Sequence[Method]) -> Method:
  """One weighting that runs ``methods[state.index]`` (they must share ``needs`` and ``specific``)."""
  methods = list(methods)
  needs = {m.needs for m in methods}
  specific = {m.specific for m in methods}
  if len(needs) != 1 or len(specific) != 1 or not all(m.is_weighting for m in methods):
    raise ValueError("switch_method: weightings with one 'needs' and one 'specific' only")

  def init(params, shared_mask=None):
    return SwitchState(jnp.zeros((), jnp.int32),
                       tuple(init_method_state(m, params, shared_mask) for m in methods))

  def branch(i):
    def fn(gram, losses, states):
      w, s = methods[i].weigh(gram, losses, states[i])
      return jnp.asarray(w, jnp.float32), states[:i] + (s,) + states[i + 1:]
    return fn

  def weigh(gram, losses, state):
    w, states = jax.lax.switch(state.index, [branch(i) for i in range(len(methods))], gram,
                               losses, state.states)
    return w, SwitchState(state.index, states)

  return Method("switch", methods[0].num_tasks, needs.pop(), init=init, weigh=weigh,
                specific=specific.pop())


def select(state: train.TrainState, index: int) -> train.TrainState:
  """``state`` with its switch method's index set to ``index``."""
  cs = state.combiner_state
  return state._replace(combiner_state=cs._replace(
      method=cs.method._replace(index=jnp.asarray(index, jnp.int32))))


# ---------------------------------------------------------------------------------------------
# Steps: ``(jitted step(state, batch) -> (state, outputs), initial state)``.


def mesh_of(num_devices: int = 1):
  devices = jax.devices()[:int(num_devices)]
  if len(devices) < num_devices:
    raise ValueError(f"{num_devices} devices asked, {len(jax.devices())} present")
  # Auto axes (train.make_mesh's default is Explicit): the reference steps (plain flax, the
  # Jacobian alone) run outside shard_map on the sharded batch, as a plain jit would.
  return jax.make_mesh((len(devices),), (train.AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def put_batch(batch, mesh):
  """The host batch as the trainer places it (:func:`mtl_jax.train.shard_batch`)."""
  return train.shard_batch(batch, mesh)


def _train_state(setup: Setup, tx, combiner_state) -> train.TrainState:
  """The trainer's state for the benchmark problem (the plateau schedule's scale stays 1)."""
  rng = jax.random.key_data(jax.random.key(setup.seed))
  return train.TrainState(setup.params, setup.batch_stats, tx.init(setup.params), combiner_state,
                          jnp.zeros((), jnp.int32), rng,
                          optax.contrib.reduce_on_plateau().init(setup.params))


def engine_step(setup: Setup, method: Method, mode: str, mesh, gramian_chunk: int = 1,
                layer_gramian: str = "auto"):
  """The trainer's step (:func:`mtl_jax.train.make_train_step`, no donation) with Adam."""
  tx = optax.adam(LEARNING_RATE)
  step = train.make_train_step(setup.model, setup.tasks, method, tx, mesh, mode=mode,
                               shared_mask=setup.mask, layer_gramian=layer_gramian,
                               gramian_chunk=gramian_chunk, donate=False)
  return step, _train_state(setup, tx, method.transform(setup.mask).init(setup.params))


def plain_step(setup: Setup):
  """A plain single-loss flax step of the same model: ``sum_k BCE_k``, ``value_and_grad``, Adam."""
  tx = optax.adam(LEARNING_RATE)
  model, tasks = setup.model, setup.tasks

  def loss(params, bs, batch):
    preds, upd = model.apply({"params": params, "batch_stats": bs}, batch["inputs"], train=True)
    total = sum(t.loss(preds[t.name], batch["targets"][t.name]) for t in tasks)
    return total, upd["batch_stats"]

  @jax.jit
  def step(state: train.TrainState, batch):
    (value, bs), grads = jax.value_and_grad(loss, has_aux=True)(state.params, state.batch_stats,
                                                                 batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state._replace(params=optax.apply_updates(state.params, updates), batch_stats=bs,
                          opt_state=opt_state, step=state.step + 1), value

  return step, _train_state(setup, tx, None)


def jacobian_step(setup: Setup):
  """Our Jacobian alone: the K vmapped VJPs (:func:`mtl_jax.autodiff.task_jacobian`), no combiner."""

  @jax.jit
  def step(state: train.TrainState, batch):
    rng = jax.random.wrap_key_data(state.rng)
    losses, jac, _ = autodiff.task_jacobian(setup.loss_fn, state.params, state.batch_stats, batch,
                                            rng)
    return jac, losses

  return step, train.TrainState(setup.params, setup.batch_stats, None, None, None,
                                jax.random.key_data(jax.random.key(setup.seed)), None)
