"""Helpers of ``launch/benchmark.py``: the benchmark model, jitted steps, timing and memory.

Everything here measures; nothing is asserted. The model is the CelebA CNN of the FAMO protocol
(``../shared/REFERENCES.md``) with hard sharing and K one-unit BCE heads, on random images and
labels; the step is the engine (:func:`mtl_jax.autodiff.combine`) followed by Adam (lr 3e-4, the
protocol's), one SPMD program over a 1-D ``data`` mesh as in :mod:`mtl_jax.train`.

Shared compilations: weightings with the same needs and task-specific rule are timed through
*one* compiled step per engine mode, a :func:`switch_method` whose state holds every method's
state and an index; ``lax.switch`` runs only the selected weighting, so each row is a real fused
step of that weighting (plus one conditional branch) at the cost of one compilation per group.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from mtl_jax import autodiff, combiners, models, sharing, tasks as T, train
from mtl_jax.combiners.base import Method, init_method_state

AXIS = "data"
LEARNING_RATE = 3e-4  # the FAMO CelebA protocol's Adam


@dataclasses.dataclass
class Setup:
  """The benchmark problem: model, tasks, initial variables, one batch and the loss functions."""

  model: Any
  tasks: list
  params: Any
  batch_stats: Any
  batch: dict
  mask: Any
  loss_fn: Callable
  split_loss: Callable
  num_tasks: int


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
               train.make_split_loss(model, tasks, {}), len(tasks))


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


def select(state: combiners.CombinerState, index: int) -> combiners.CombinerState:
  return state._replace(method=state.method._replace(index=jnp.asarray(index, jnp.int32)))


# ---------------------------------------------------------------------------------------------
# Steps.


class StepState(NamedTuple):
  params: Any
  batch_stats: Any
  opt_state: Any
  combiner_state: Any


def mesh_of(num_devices: int = 1):
  devices = jax.devices()[:int(num_devices)]
  if len(devices) < num_devices:
    raise ValueError(f"{num_devices} devices asked, {len(jax.devices())} present")
  return jax.make_mesh((len(devices),), (AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def put_batch(batch, mesh):
  """The batch as global arrays sharded on their leading axis over ``mesh`` (what shard_map takes)."""
  sharding = jax.sharding.NamedSharding(mesh, P(AXIS))
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding), batch)


def engine_step(setup: Setup, method: Method, mode: str, mesh, gramian_chunk: int = 1,
                layer_gramian: str = "auto"):
  """``(jitted step(state, batch, rng) -> (state, losses), initial state)``: engine + Adam."""
  tx = optax.adam(LEARNING_RATE)
  loss = setup.split_loss if mode == "features" else setup.loss_fn

  def per_device(state: StepState, batch, rng):
    out = autodiff.combine(method, state.combiner_state, loss, state.params, state.batch_stats,
                           batch, rng, mode=mode, shared_mask=setup.mask, axis_name=AXIS,
                           gramian_chunk=gramian_chunk, layer_gramian=layer_gramian)
    aux = out.aux[0] if mode == "features" else out.aux
    bs = jax.tree.map(lambda x: jax.lax.pmean(x, AXIS), aux)
    updates, opt_state = tx.update(out.update, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return StepState(params, bs, opt_state, out.state), out.losses

  step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS), P()),
                               out_specs=(P(), P()), check_vma=False))
  state = StepState(setup.params, setup.batch_stats, tx.init(setup.params),
                    method.transform(setup.mask).init(setup.params))
  return step, state


def plain_step(setup: Setup):
  """A plain single-loss flax step of the same model: ``sum_k BCE_k``, ``value_and_grad``, Adam."""
  tx = optax.adam(LEARNING_RATE)
  model, tasks = setup.model, setup.tasks

  def loss(params, bs, batch):
    preds, upd = model.apply({"params": params, "batch_stats": bs}, batch["inputs"], train=True)
    total = sum(t.loss(preds[t.name], batch["targets"][t.name]) for t in tasks)
    return total, upd["batch_stats"]

  @jax.jit
  def step(state: StepState, batch, rng):
    del rng
    (value, bs), grads = jax.value_and_grad(loss, has_aux=True)(state.params, state.batch_stats,
                                                                 batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return StepState(optax.apply_updates(state.params, updates), bs, opt_state, None), value

  return step, StepState(setup.params, setup.batch_stats, tx.init(setup.params), None)


def jacobian_step(setup: Setup):
  """Our Jacobian alone: the K vmapped VJPs (:func:`mtl_jax.autodiff.task_jacobian`), no combiner."""

  @jax.jit
  def step(state: StepState, batch, rng):
    losses, jac, _ = autodiff.task_jacobian(setup.loss_fn, state.params, state.batch_stats, batch,
                                            rng)
    return jac, losses

  return step, StepState(setup.params, setup.batch_stats, None, None)


# ---------------------------------------------------------------------------------------------
# Measuring.


def compile_step(step, state, batch, rng, compiler_options=None):
  """``(compiled, compile seconds)``; the compiled function runs ``(state, batch, rng)``.

  ``compiler_options``: XLA debug options for this program only (``{"xla_cpu_...": value}``).
  """
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, rng).compile(compiler_options=compiler_options or None)
  return compiled, time.perf_counter() - t0


def memory_mb(compiled) -> dict:
  """XLA's compiled memory analysis in MiB: ``temp``, ``argument``, ``output``, ``alias`` and
  ``peak`` = temp + argument + output (an upper bound on the live bytes of one call; no buffer is
  donated here, ``alias`` is what donation could save)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  mb = lambda b: float(b) / 2**20
  out = {"temp": mb(m.temp_size_in_bytes), "argument": mb(m.argument_size_in_bytes),
         "output": mb(m.output_size_in_bytes), "alias": mb(m.alias_size_in_bytes)}
  out["peak"] = out["temp"] + out["argument"] + out["output"]
  return out


def block(tree):
  return jax.block_until_ready(tree)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list:
  """Wall seconds of ``repeats`` calls of ``fn`` (each ``block_until_ready``) after ``warmup``."""
  for _ in range(int(warmup)):
    block(fn())
  times = []
  for _ in range(max(int(repeats), 1)):
    t0 = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t0)
  return times


def minor_faults() -> int:
  """This process's minor page faults so far (0 where ``resource`` is missing)."""
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:
    return 0
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def median(xs) -> float:
  return float(statistics.median(xs))


def time_threaded(compiled, state, batch, rng, steps: int) -> tuple[list, Any]:
  """Run ``steps`` consecutive steps threading the state; per-step wall seconds and the state."""
  times = []
  for _ in range(int(steps)):
    t0 = time.perf_counter()
    state, losses = compiled(state, batch, rng)
    block((state, losses))
    times.append(time.perf_counter() - t0)
  return times, state


def weigh_ms(method: Method, params, gram, losses, repeats: int = 20) -> float:
  """Median ms of the jitted weighting alone on a given Gramian and losses (its step overhead)."""
  state = init_method_state(method, params)
  fn = jax.jit(lambda g, l, s: method.weigh(g, l, s)[0])
  times = time_calls(lambda: fn(gram, losses, state), repeats, warmup=2)
  return 1e3 * median(times)
