"""Training: the TrainState, one jitted SPMD step, evaluation, checkpoints and the run loop.

The step (:func:`make_train_step`) is a single ``jax.jit`` of a ``jax.shard_map`` over a 1-D
``data`` mesh of every device (``jax.make_mesh``); batches are sharded on their leading axis
(a benchmark whose batches cannot be cut there, QM9's flat padded graph batches, sets
``per_device_batches``: its training loader stacks one self-contained sub-batch per local device on
a new leading axis, and each device drops that axis of its slice). On each device:

1. the K task losses of its shard (single-input batch: one forward pass, all heads; multi-input
   batch ``{task: batch}``: task k's loss on its own batch, batch-norm state threaded through the
   tasks in order, as LibMTL's multi_input loop does);
2. the engine, :func:`mtl_jax.autodiff.combine`, with ``axis_name='data'`` and
   ``reduction=config.engine.reduction``: ``exact`` averages the per-task quantities (losses,
   Jacobian / Gramian / feature Gramian) over devices *before* the combiner, so the update is the
   global-batch method; ``local`` combines per device and averages the updates (cheaper; an
   approximation except for ``ls``);
3. synchronised batch norm: every :func:`mtl_jax.models.base.batch_norm` layer averages its
   batch statistics over the devices (``models.base.sync_batch_norm``), so a step on N devices
   normalises with the global batch's statistics and gives the result of one device;
4. the gradient of the sharing strategy's regulariser (soft sharing) added to the combined gradient;
5. the optax optimizer. A step whose losses or gradients are not finite changes nothing but
   ``step`` and the combiner's skip counter (params, optimizer and batch-norm state are kept).

Metrics come out of the same step: task losses, the combiner's weights, gradient norms and
conflict statistics from the Gramian the engine already computed (none in the ``losses`` mode),
the norms of the combined gradient and of the parameter update, and the regulariser.

:func:`fit` is the run, a short sequence of named steps over one :class:`Run` record:
:func:`build_program` (build from the config, initialise, jit; shared with :func:`run_steps`),
:func:`restore_latest` (the newest checkpoint that restores; a corrupt one is moved aside to
``<step>.corrupt``), then ``_loop`` — train, and at its boundaries ``_read_pending`` (the host's one
read of the device's metrics since the last boundary: stacked on the device, one ``device_get``,
checked step by step for NaN/Inf so a non-finite step is reported at its own step; at a log-only
boundary the next step is dispatched first and runs during the read), ``_log`` every
``log_every`` steps, ``_evaluate``
every ``eval_every`` (best-on-validation selection, the plateau schedule), ``_save`` every
``checkpoint_every`` / at the end / on SIGTERM — and ``_summary`` (``summary.json``, with the
config's digest). Between boundaries the host never waits for the device: the next batch is read
while the device runs the step. Steps/s counts training steps only (not the compiling first step,
evaluation or checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, NamedTuple, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from mtl_jax import autodiff
from mtl_jax import combiners
from mtl_jax import config_utils
from mtl_jax import evaluation
from mtl_jax import layers
from mtl_jax import logging_utils
from mtl_jax.models.base import sync_batch_norm
from mtl_jax.structure import dynamic
from mtl_jax.structure import tree as T

AXIS = "data"
_clock = time.perf_counter  # the run's timer (a test replaces it)
PyTree = Any


class TrainState(NamedTuple):
  params: PyTree
  batch_stats: PyTree  # {} when the model has no batch norm
  opt_state: PyTree
  combiner_state: combiners.CombinerState
  step: jax.Array  # int32: steps done
  rng: jax.Array  # uint32 key data; the key of step s is fold_in(rng, s) (and the device index)
  # optax.contrib.reduce_on_plateau's state: its ``scale`` multiplies every update (1.0 unless
  # config.optimizer.schedule == 'plateau', stepped on the host after each evaluation)
  plateau: PyTree


class NonFiniteError(RuntimeError):
  """A task loss (or the combined gradient) was NaN or Inf and ``on_nonfinite='stop'``."""


# ---------------------------------------------------------------------------------------------
# Model: the sharing strategy's MultiTaskModel, seen through a few pure functions.


def build_backbone(config, bench):
  """The benchmark's backbone, or ``config.model.backbone`` (at ``config.model.width``)."""
  if not config.model.backbone:
    return bench.backbone
  from mtl_jax import models  # pylint: disable=g-import-not-at-top
  opts = {"width": int(config.model.width)} if config.model.width else {}
  return models.get(config.model.backbone, **opts)


def build_model(config, bench, tree=None):
  """The sharing strategy ``config.model.sharing`` over the backbone and the benchmark's tasks.

  Returns a :class:`mtl_jax.sharing.MultiTaskModel`. ``config.model.backbone`` (with
  ``config.model.width`` when non-zero) replaces the benchmark's default backbone;
  ``config.model.dtype`` (``float32`` | ``bfloat16``) is the compute dtype (parameters and optimizer
  stay float32). With ``config.structure.method`` other than ``'none'`` the model is ``branched``
  over ``tree`` (default: the run's starting tree, :func:`mtl_jax.structure.dynamic.initial_tree`).
  """
  from mtl_jax import sharing  # pylint: disable=g-import-not-at-top
  backbone = build_backbone(config, bench)
  if _structure(config).method != "none":
    tree = dynamic.initial_tree(config) if tree is None else T.to_list(tree)
    model = sharing.get("branched", backbone, list(bench.tasks), tree=tree)
  else:
    model = sharing.get(config.model.sharing, backbone, list(bench.tasks),
                        **config.model.sharing_options.to_dict())
  dtype = config.model.get("dtype", "float32")
  if dtype not in layers.DTYPES:
    raise config_utils.one_of("model dtype", dtype, layers.DTYPES)
  return dataclasses.replace(model, compute_dtype=dtype)


def _structure(config):
  """``config.structure`` (a config without the block: method 'none')."""
  if "structure" in config:
    return config.structure
  return ml_collections.ConfigDict({"method": "none"})


def _variables(params, batch_stats, constants):
  v = dict(constants)
  v["params"] = params
  if batch_stats:
    v["batch_stats"] = batch_stats
  return v


def eval_apply(model):
  def apply(variables, inputs):
    return model.apply(variables, inputs, train=False)[0]
  return apply


def make_loss_fn(model, tasks, multi_input: bool, constants):
  """``loss_fn(params, batch_stats, batch, rng) -> (losses[K], new_batch_stats)``."""

  def forward(params, bs, inputs, rng):
    preds, upd = model.apply(_variables(params, bs, constants), inputs, train=True,
                             rngs={"dropout": rng})
    return preds, upd.get("batch_stats", bs)

  def loss_fn(params, batch_stats, batch, rng):
    losses, bs = [], batch_stats
    if multi_input:
      for i, t in enumerate(tasks):
        sub = batch[t.name]
        preds, bs = forward(params, bs, sub["inputs"], jax.random.fold_in(rng, i))
        losses.append(t.loss(preds[t.name], sub["targets"][t.name]))
    else:
      preds, bs = forward(params, bs, batch["inputs"], rng)
      losses = [t.loss(preds[t.name], batch["targets"][t.name]) for t in tasks]
    return jnp.stack([jnp.asarray(l, jnp.float32) for l in losses]), bs

  return loss_fn


def make_split_loss(model, tasks, constants):
  """The ``features``-mode :class:`~mtl_jax.autodiff.SplitLoss` (single-input batches).

  The encoder's batch-norm update is kept (``aux`` of ``encode``); batch norm inside the heads, if
  any, normalises with the batch but its running statistics are not updated in this mode.
  """

  def encode(params, batch_stats, batch, rng):
    z, upd = model.encode(_variables(params, batch_stats, constants), batch["inputs"], train=True,
                          rngs={"dropout": rng})
    return z, upd.get("batch_stats", batch_stats)

  def decode(params, z, batch_stats, batch, rng):
    preds, _ = model.decode(_variables(params, batch_stats, constants), z, train=True,
                            rngs={"dropout": jax.random.fold_in(rng, 1)})
    losses = [t.loss(preds[t.name], batch["targets"][t.name]) for t in tasks]
    return jnp.stack([jnp.asarray(l, jnp.float32) for l in losses]), None

  return autodiff.SplitLoss(encode, decode)


# ---------------------------------------------------------------------------------------------
# Optimizer.


def make_schedule(config, num_steps: int):
  o = config.optimizer
  lr, warm = float(o.learning_rate), int(o.warmup_steps)
  if o.schedule in ("constant", "plateau"):  # plateau: constant times TrainState.plateau.scale
    sched = optax.constant_schedule(lr)
  elif o.schedule == "cosine":
    sched = optax.cosine_decay_schedule(lr, max(num_steps - warm, 1))
  elif o.schedule == "step":
    bounds = {max(int(round(f * num_steps)) - warm, 1): float(o.decay_rate)
              for f in o.decay_boundaries}
    sched = optax.piecewise_constant_schedule(lr, bounds)
  else:
    raise config_utils.one_of("config.optimizer.schedule", o.schedule,
                              config_utils.CHOICES[("optimizer", "schedule")])
  if warm:
    sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warm), sched], [warm])
  return sched


def make_optimizer(config, num_steps: int) -> optax.GradientTransformation:
  o = config.optimizer
  sched = make_schedule(config, num_steps)
  if o.name == "adam":
    opt = optax.adam(sched)
    if float(o.weight_decay):  # L2 in the gradient, as torch.optim.Adam(weight_decay=...)
      opt = optax.chain(optax.add_decayed_weights(float(o.weight_decay)), opt)
  elif o.name == "adamw":
    opt = optax.adamw(sched, weight_decay=float(o.weight_decay))
  elif o.name == "sgd":
    opt = optax.sgd(sched, momentum=float(o.momentum) or None)
    if float(o.weight_decay):
      opt = optax.chain(optax.add_decayed_weights(float(o.weight_decay)), opt)
  else:
    raise config_utils.one_of("config.optimizer.name", o.name,
                              config_utils.CHOICES[("optimizer", "name")])
  if float(o.grad_clip):
    opt = optax.chain(optax.clip_by_global_norm(float(o.grad_clip)), opt)
  return opt


# ---------------------------------------------------------------------------------------------
# The step.


def make_mesh(devices=None):
  devices = devices if devices is not None else jax.devices()
  return jax.make_mesh((len(devices),), (AXIS,), devices=devices)


def make_plateau(config) -> optax.GradientTransformationExtraArgs:
  """``optax.contrib.reduce_on_plateau`` as PyTorch's ``ReduceLROnPlateau(mode='min')``, which the
  official QM9 trainers use: the rate is multiplied by ``plateau_factor`` once the monitored value
  (validation ``-selection_score``, i.e. Δm% under ``select='delta_m'``) has not improved by a
  relative 1e-4 for more than ``plateau_patience`` evaluations, never below ``plateau_min_lr``.
  PyTorch reduces when the count of bad epochs *exceeds* patience, optax when it *reaches* it,
  hence ``patience + 1``."""
  o = config.optimizer
  return optax.contrib.reduce_on_plateau(
      factor=float(o.plateau_factor), patience=int(o.plateau_patience) + 1, rtol=1e-4,
      min_scale=float(o.plateau_min_lr) / float(o.learning_rate))


def _stage_groups(stage_gramians: Optional[int], shared_mask):
  """``gramian_groups`` of the first ``stage_gramians`` stages that have shared leaves, or None."""
  if not stage_gramians:
    return None
  return {f"stage_{i}": f"stage_{i}/" for i in range(stage_gramians)
          if any(jax.tree.leaves(shared_mask.get(f"stage_{i}", {})))}


def make_train_step(model, tasks, method: combiners.Method, tx: optax.GradientTransformation,
                    mesh, *, mode: str, reduction: str = "exact", multi_input: bool = False,
                    shared_mask=None, constants=None, per_device_batches: bool = False,
                    layer_gramian: str = "auto", fixed_order: bool = False,
                    gramian_chunk: int = 1, donate: bool = True,
                    stage_gramians: Optional[int] = None, lookahead_lr: float = 0.0):
  """``step(state, batch) -> (state, metrics)``: jitted, SPMD over ``mesh``, state donated.

  ``model`` is a :class:`mtl_jax.sharing.MultiTaskModel`; ``shared_mask`` the tree of bools over
  the params; ``constants`` the model's non-trainable collections other than batch statistics
  (e.g. sparse-sharing masks), closed over as constants. ``per_device_batches``: every batch leaf
  has a leading device axis of the mesh's size (one self-contained sub-batch per device, as
  :attr:`mtl_jax.data.base.Benchmark.per_device_batches` loaders make for graph batches); each
  device drops that axis of its slice. ``fixed_order``: every mean over the devices is
  :func:`mtl_jax.autodiff.device_mean` (all-gather, sum in device order: bit-identical for any
  split of the devices into processes), except the batch statistics that synchronised batch norm
  normalises with inside the step (flax's ``nn.BatchNorm`` averages them with its own ``pmean``).
  ``layer_gramian`` and ``gramian_chunk`` go to the engine (:func:`mtl_jax.autodiff.combine`).
  ``donate=False`` keeps the input state valid after a call (to call the step again on the same
  state, as a benchmark timing one step does).
  ``stage_gramians=S`` (``jacobian`` mode, a hard or branched model): the metrics also hold
  ``stage_gramians`` (S, K, K), each stage's Gramian over its shared parameters from the engine's
  ``gramian_groups`` (zeros for a stage with no shared copy); with ``lookahead_lr > 0`` also
  ``lookahead`` (S, K, K), TAG's lookahead affinity of each stage's shared parameters at that rate
  times the plateau scale (:func:`mtl_jax.structure.affinity.lookahead_losses`: K more forward
  passes per stage, and the per-task gradients again).
  """
  groups = _stage_groups(stage_gramians, shared_mask)
  # Host copies: a device array closed over by shard_map must not carry a sharding on the
  # mesh's axes (JAX rejects closing over Explicit-axis arrays); numpy constants embed as-is.
  constants = jax.tree.map(np.asarray, dict(constants or {}))
  loss_fn = _step_loss_fn(model, tasks, mode, multi_input, constants)
  mean = ((lambda t: autodiff.device_mean(t, AXIS)) if fixed_order else
          (lambda t: jax.lax.pmean(t, AXIS)))

  def per_device(state: TrainState, batch):
    if per_device_batches:
      batch = _drop_device_axis(batch)
    rng = jax.random.wrap_key_data(state.rng)
    rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(AXIS))
    out = autodiff.combine(method, state.combiner_state, loss_fn, state.params, state.batch_stats,
                           batch, rng, mode=mode, shared_mask=shared_mask, axis_name=AXIS,
                           reduction=reduction, layer_gramian=layer_gramian,
                           fixed_order=fixed_order, gramian_chunk=gramian_chunk,
                           gramian_groups=groups)
    aux = out.aux[0] if mode == "features" else out.aux
    new_bs = mean(aux) if state.batch_stats else {}
    grad = out.update
    metrics = {}
    if model.regularizer_fn is not None:
      reg, reg_grad = jax.value_and_grad(model.regularizer_fn)(state.params)
      grad = jax.tree.map(jnp.add, grad, reg_grad)
      metrics["regularizer"] = reg
    updates, opt_state = tx.update(grad, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * state.plateau.scale.astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    ok = out.finite
    params = optax.tree.where(ok, params, state.params)
    opt_state = optax.tree.where(ok, opt_state, state.opt_state)
    new_bs = optax.tree.where(ok, new_bs, state.batch_stats)
    metrics.update(losses=out.losses, weights=out.weights, finite=ok,
                   grad_norm=optax.tree.norm(grad),
                   update_norm=jnp.where(ok, optax.tree.norm(updates), 0.0),
                   skipped=out.state.skipped)
    if out.gramian is not None:
      metrics.update(evaluation.conflict_stats(out.gramian))
    if stage_gramians:
      metrics.update(_stage_metrics(out, len(tasks), stage_gramians, lookahead_lr, loss_fn,
                                    state, batch, rng, shared_mask, mean))
    new = TrainState(params, new_bs, opt_state, out.state, state.step + 1, state.rng,
                     state.plateau)
    return new, metrics

  def per_device_sync_bn(state: TrainState, batch):
    with sync_batch_norm(AXIS):  # batch statistics of the global batch (SyncBatchNorm)
      return per_device(state, batch)

  sharded = jax.shard_map(per_device_sync_bn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=(0,) if donate else ())


def _stage_metrics(out, k: int, num_stages: int, lookahead_lr: float, loss_fn, state, batch, rng,
                   shared_mask, mean) -> dict:
  """The measuring step's structure statistics: ``stage_gramians`` (S, K, K) from the engine and,
  with ``lookahead_lr``, TAG's ``lookahead`` (S, K, K) at the state's parameters."""
  zero = jnp.zeros((k, k), jnp.float32)
  found = out.group_gramians or {}
  res = {"stage_gramians": jnp.stack([found.get(f"stage_{i}", zero) for i in range(num_stages)])}
  if lookahead_lr > 0:
    from mtl_jax.structure import affinity  # pylint: disable=g-import-not-at-top
    lr = lookahead_lr * state.plateau.scale
    before, after = affinity.lookahead_losses(loss_fn, state.params, state.batch_stats, batch,
                                              rng, lr, num_stages, shared_mask, mean)
    res["lookahead"] = affinity.lookahead_affinity(before, after)
  return res


def _step_loss_fn(model, tasks, mode: str, multi_input: bool, constants):
  """The engine's loss function for ``mode``: split at the shared representation for
  ``features`` (single-input batches and a strategy with one shared representation only)."""
  if mode != "features":
    return make_loss_fn(model, tasks, multi_input, constants)
  if multi_input:
    raise config_utils.ConfigError(
        "engine mode 'features' needs single-input batches; valid for multi-input: "
        "losses, gramian, jacobian")
  if not model.has_split:
    from mtl_jax import sharing  # pylint: disable=g-import-not-at-top
    raise config_utils.ConfigError(
        f"engine mode 'features' needs one shared representation; sharing {model.name!r} has "
        f"none (valid: {', '.join(n for n in sharing.names() if sharing.base._SPLIT.get(n))})")
  return make_split_loss(model, tasks, constants)


def _drop_device_axis(batch):
  """Inside the shard: ``[1, ...]`` (this device's slice of a per-device stack) -> ``[...]``."""
  def squeeze(x):
    if x.ndim == 0 or x.shape[0] != 1:
      raise ValueError(f"per-device batches need a leading device axis (one sub-batch per device); "
                       f"a device got a slice of shape {x.shape}")
    return x[0]
  return jax.tree.map(squeeze, batch)


def local_num_devices(mesh) -> int:
  """The number of ``mesh`` devices this process feeds (its slice of every global batch)."""
  return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def make_train_loader(bench, config, mesh):
  """The shuffled training loader of this process; for a ``per_device_batches`` benchmark it
  yields one sub-batch per local device of ``mesh`` (stacked on a leading axis)."""
  args = ("train", int(config.train.batch_size), int(config.seed), True, jax.process_index(),
          jax.process_count())
  if bench.per_device_batches:
    return bench.loader(*args, num_shards=local_num_devices(mesh))
  return bench.loader(*args)


def shard_batch(batch, mesh):
  """A host batch (this process's slice) -> global arrays sharded on the leading axis.

  For a per-device stack (``[D_local, ...]`` leaves) the leading axis is the device axis: each
  device gets exactly its own sub-batch."""
  sharding = NamedSharding(mesh, P(AXIS))
  if jax.process_count() == 1:  # the local batch is the global one: one batched transfer of the
    return jax.device_put(batch, sharding)  # whole tree (half the host time of one per leaf)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def replicate(tree, mesh):
  """Every leaf replicated over ``mesh``, each in its own buffer (via a host copy: a state whose
  leaves share one array, e.g. two fields initialised from the same zeros, could not be donated)."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.device_put(np.array(jax.device_get(x)), sharding), tree)


def init_state(config, model, bench, method: combiners.Method, tx, mesh):
  """``(state, constants)``: the replicated initial TrainState and the model's constant
  collections (neither ``params`` nor ``batch_stats``)."""
  key = jax.random.key(int(config.seed))
  init_key, data_key = jax.random.split(key)
  sample_fn = model.sample_input or bench.backbone.sample_input
  if sample_fn is None:
    raise ValueError(f"benchmark {bench.name!r}: its backbone has no sample_input for init")
  sample = sample_fn()
  # One compiled program: run eagerly, init dispatches (and compiles) each op on its own. Except
  # a branched model with several copies of a stage: XLA:CPU (jaxlib 0.10.2) never finishes the
  # jitted init of the QM9 MPNN at width 32 with 11 branches (every thread idle, the host waiting
  # on the result forever; width 8 runs); eagerly it takes ~15 s on 2 cores.
  tree = dict(model.info or {}).get("tree")
  if tree is not None and any(len(stage) > 1 for stage in tree):
    variables = model.init(init_key, sample)
  else:
    variables = jax.jit(lambda k: model.init(k, sample))(init_key)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  constants = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
  plateau = make_plateau(config)
  # The optimizer, combiner and plateau states in one program too (eagerly, a model with many
  # leaves, e.g. a branched one after a split, dispatches thousands of small ops).
  opt_state, combiner_state, plateau_state = jax.jit(
      lambda p: (tx.init(p), method.transform().init(p), plateau.init(p)))(params)
  state = TrainState(
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
      combiner_state=combiner_state,
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(data_key),
      plateau=plateau_state)
  return replicate(state, mesh), replicate(constants, mesh)


def params_checksum(params) -> str:
  """SHA-256 over the leaves' paths, dtypes, shapes and bytes (in tree order)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(params)):
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(arr.dtype).encode() + str(arr.shape).encode())
    h.update(arr.tobytes())
  return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The run.


def _select_rule(config, bench) -> str:
  rule = config.train.get("select", "auto")
  if rule != "auto":
    return rule
  if bench.info.get("select"):
    return bench.info["select"]
  has_ref = all(t.name in bench.reference for t in bench.tasks)
  return "delta_m" if has_ref else "mean_main"


def selection_score(rule: str, results, bench) -> float:
  """Higher is better."""
  if rule == "delta_m":
    dm = evaluation.delta_m(results, bench.reference, evaluation.direction(bench.tasks))
    if dm is None:
      raise ValueError(f"select='delta_m' but benchmark {bench.name!r} has no reference numbers")
    return -dm
  return evaluation.mean_main(results, bench.tasks)


class _Stop:
  """When the loop checkpoints and returns. One process: after a SIGTERM (a Python handler sets
  the flag; the loop stops after the step it is in). Several processes: a per-process flag would
  stop one process alone while the others wait for it at the next collective, so the step is
  agreed instead: JAX's preemption service (``jax.distributed``, on unless
  ``jax_enable_preemption_service`` is off) catches the SIGTERM of any process and proposes the
  step after the furthest one any process has reached, and orbax's
  ``CheckpointManager.reached_preemption(step)``, asked after every step by every process, is
  True on all of them at that same step. No Python handler is installed there (it would replace
  the service's)."""

  def __init__(self, mngr=None):
    self.flag = False
    self.previous = None
    self.mngr = mngr
    self.agreed = jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)

  def install(self):
    if not self.agreed and threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def at(self, step: int) -> bool:
    """Whether to checkpoint and stop after ``step`` (ask once per step, in step order)."""
    if self.agreed and not self.flag:
      self.flag = bool(self.mngr.reached_preemption(step))
    return self.flag

  def uninstall(self):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


def _loss_based_names(num_tasks: int) -> list[str]:
  """Registered combiners that need only the losses at ``num_tasks`` (those valid at that K)."""
  out = []
  for name in combiners.names():
    try:
      if combiners.method(name, num_tasks).needs == combiners.LOSSES:
        out.append(name)
    except ValueError:  # e.g. krum / trimmed_mean below their minimum number of tasks
      continue
  return out


def build(config):
  """Validate the config and build ``(bench, model, method)``; raises one-line errors."""
  config_utils.validate(config)
  from mtl_jax import data  # pylint: disable=g-import-not-at-top
  if config.data.name not in data.names():
    raise config_utils.one_of("dataset", config.data.name, data.names())
  bench = data.get_benchmark(config)
  hp = config.combiner.hparams.to_dict()
  method = combiners.method(config.combiner.name, len(bench.tasks), **hp)
  model = build_model(config, bench)
  mode = config.engine.mode or autodiff.default_mode(method)
  if method.needs != combiners.LOSSES:
    sample_fn = model.sample_input or bench.backbone.sample_input
    shapes = jax.eval_shape(lambda r: model.init(r, sample_fn()), jax.random.key(0))
    mask = combiners.resolve_mask(model.shared_mask, shapes["params"])
    if not any(jax.tree.leaves(mask)):
      raise config_utils.ConfigError(
          f"combiner {method.name!r} needs a Gramian over shared parameters but sharing "
          f"{model.name!r} shares none; valid combiners for it (loss-based): "
          f"{', '.join(_loss_based_names(len(bench.tasks)))}")
    if not config.engine.mode and method.needs == combiners.GRAMIAN:
      mode = auto_gramian_mode(len(bench.tasks), shapes["params"], mask,
                               config.engine.jacobian_budget_mb)
  autodiff.check_mode(method, mode)
  return bench, model, method, mode


def auto_gramian_mode(num_tasks: int, params, mask, budget_mb: float) -> str:
  """The engine mode for a Gramian weighting when the config leaves it empty: ``jacobian`` (the
  fast exact path: K vmapped VJPs, the Jacobian held) when the K x P_shared float32 Jacobian fits
  in ``budget_mb`` MiB, else ``gramian`` (streamed: no Jacobian held, about twice the arithmetic)."""
  shared = sum(int(np.prod(x.shape)) for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
               if m)
  return "jacobian" if num_tasks * shared * 4 <= budget_mb * 2**20 else "gramian"


class Program(NamedTuple):
  """What a run trains with, built once from the config (:func:`build_program`)."""
  bench: Any
  model: Any
  method: combiners.Method
  mode: str
  mesh: Any
  loader: Any  # the training loader: ``next()``, settable ``.position``, ``.batches_per_epoch``
  num_steps: int
  state: TrainState  # the initial state
  constants: PyTree
  step_fn: Callable
  tx: Any = None  # the optimizer
  # config.structure affinity / conflict: the step of the measuring windows (jacobian mode, the
  # per-stage Gramians in its metrics); None otherwise
  measure_fn: Optional[Callable] = None
  tree: Optional[tuple] = None  # a branched model's canonical tree


def _step_fns(config, bench, model, method, tx, mesh, mode, mask, constants):
  """``(step_fn, measure_fn)`` of ``model`` (:func:`make_train_step`; measure_fn: see Program)."""
  kw = dict(reduction=config.engine.reduction, multi_input=bench.multi_input, shared_mask=mask,
            constants=constants, per_device_batches=bench.per_device_batches,
            layer_gramian=config.engine.layer_gramian,
            fixed_order=bool(config.engine.get("fixed_order", False)))
  step_fn = make_train_step(model, list(bench.tasks), method, tx, mesh, mode=mode, **kw)
  measure_fn = None
  if _structure(config).method in dynamic.MEASURED:
    s = _structure(config)
    lr = float(config.optimizer.learning_rate) if s.get("affinity") == "lookahead" else 0.0
    measure_fn = make_train_step(model, list(bench.tasks), method, tx, mesh, mode="jacobian",
                                 stage_gramians=len(model.info["tree"]), lookahead_lr=lr, **kw)
  return step_fn, measure_fn


def retree(config, p: Program, tree) -> Program:
  """``p`` for the same run over a branched model of ``tree``: model, initial state, constants and
  step functions (compiled on their first call); the loader, optimizer and mesh are kept."""
  model = build_model(config, p.bench, tree)
  state, constants = init_state(config, model, p.bench, p.method, p.tx, p.mesh)
  mask = combiners.resolve_mask(model.shared_mask, jax.device_get(state.params))
  step_fn, measure_fn = _step_fns(config, p.bench, model, p.method, p.tx, p.mesh, p.mode, mask,
                                  constants)
  return p._replace(model=model, state=state, constants=constants, step_fn=step_fn,
                    measure_fn=measure_fn, tree=model.info["tree"])


def _check_batch(config, mesh) -> None:
  bsz, ndev = int(config.train.batch_size), mesh.devices.size
  if bsz % ndev:
    raise config_utils.ConfigError(
        f"config.train.batch_size {bsz} is not divisible by the {ndev} devices")


def build_step(config, num_steps: int, mesh=None, built=None) -> Program:
  """The loader-free part of :func:`build_program`: the built ``(bench, model, method, mode)``,
  the optimizer over a schedule of ``num_steps``, the initial state and the jitted step (and the
  measuring step of a dynamic structure) exactly as the trainer runs them; ``loader`` is None.
  ``mesh`` defaults to every device. The benchmarks time this step (``launch/bench``)."""
  bench, model, method, mode = built if built is not None else build(config)
  mesh = make_mesh(None) if mesh is None else mesh
  _check_batch(config, mesh)
  tx = make_optimizer(config, num_steps)
  state, constants = init_state(config, model, bench, method, tx, mesh)
  mask = combiners.resolve_mask(model.shared_mask, jax.device_get(state.params))
  step_fn, measure_fn = _step_fns(config, bench, model, method, tx, mesh, mode, mask, constants)
  s = _structure(config)
  loop_steps = int(num_steps) + (int(s.warmup_steps) if s.get("restart") else 0)
  return Program(bench, model, method, mode, mesh, None, loop_steps, state, constants,
                 step_fn, tx, measure_fn,
                 model.info["tree"] if model.name == "branched" else None)


def build_program(config, devices=None, built=None, num_steps: Optional[int] = None) -> Program:
  """Build, initialise and jit the run of ``config``: the shared start of :func:`fit` and
  :func:`run_steps` (:func:`build_step` and the training loader). ``num_steps``: the schedule's
  length (default: the config's). With ``config.structure.restart`` the run is ``warmup_steps``
  longer (the measuring steps, then the schedule from its start)."""
  built = built if built is not None else build(config)
  mesh = make_mesh(devices)
  _check_batch(config, mesh)
  loader = make_train_loader(built[0], config, mesh)
  if num_steps is None:
    num_steps = int(config.train.num_steps) or int(config.train.num_epochs) * \
        loader.batches_per_epoch
  return build_step(config, num_steps, mesh, built)._replace(loader=loader)


def run_steps(config, num_steps: int, devices=None, batches=None):
  """Train ``num_steps`` steps from the initial state without the loop's outputs (no checkpoint,
  no logging); returns ``(state, [metrics per step])``. For tests and notebooks. ``batches``
  replace the loader's; for a ``per_device_batches`` benchmark they must be per-device stacks."""
  p = build_program(config, devices, num_steps=max(int(config.train.num_steps), num_steps))
  state, history = p.state, []
  for i in range(num_steps):
    batch = batches[i] if batches is not None else next(p.loader)
    state, metrics = p.step_fn(state, shard_batch(batch, p.mesh))
    history.append(metrics)
  return state, jax.device_get(history)


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def _one_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  first = text[0].split(". See full TensorStore details")[0] if text else ""
  return f"{type(err).__name__}: {first[:200]}"


def restore_latest(mngr, target: TrainState, say=logging.info):
  """``(state, meta)`` of the newest step of ``mngr`` that restores, or ``(None, None)`` when the
  workdir has no checkpoint. A step that fails to restore (a truncated or missing array file,
  garbage metadata) is moved aside to ``<step>.corrupt`` (never deleted), one line says so, and
  the previous step is tried; :class:`CheckpointError` when none restores."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tried = []
  while (step := mngr.latest_step()) is not None:
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
      return restored["state"], restored["meta"]
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise bare Exception)
      dst = _move_aside(os.path.join(str(mngr.directory), str(step)))
      mngr.reload()
      tried.append(step)
      say(f"checkpoint step {step} does not restore ({_one_line(e)}); moved to {dst}, "
          f"trying the previous step")
  if tried:
    raise CheckpointError(f"no checkpoint in {mngr.directory} restores (tried steps "
                          f"{', '.join(map(str, tried))}, moved aside as <step>.corrupt); "
                          f"remove the workdir to start afresh")
  return None, None


def _move_aside(src: str) -> str:
  """Rename a checkpoint folder to ``<step>.corrupt`` (``.corrupt.N`` when taken). With several
  processes (one shared checkpoint folder) all pick the name before process 0 renames, and all
  go on once it has."""
  _sync_processes(f"mtl_jax: name {src}.corrupt")
  dst, n = src + ".corrupt", 1
  while os.path.exists(dst):
    dst, n = f"{src}.corrupt.{n}", n + 1
  _sync_processes(f"mtl_jax: named {src}.corrupt")
  if jax.process_index() == 0:
    os.rename(src, dst)
  _sync_processes(f"mtl_jax: moved {src} aside")
  return dst


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


class CheckpointError(RuntimeError):
  """The workdir has checkpoints but none of them restores."""


# ---------------------------------------------------------------------------------------------
# The run: fit = open outputs, restore, then the loop of steps with logging, evaluation and
# checkpoints at their boundaries, then the summary.


@dataclasses.dataclass
class Run:
  """What the loop carries from step to step (host side)."""
  state: TrainState
  step: int
  best: dict
  last_eval: int = -1
  pending: list = dataclasses.field(default_factory=list)  # (step, device metrics) not read yet
  acc: Optional[dict] = None  # {metric: (sum, count)} of the read metrics since the last record
  acc_n: int = 0
  skipped: int = 0
  ahead: bool = False  # the loader has given the batch of the next step already
  train_s: float = 0.0  # seconds in training steps (not compile, evaluation or checkpoints)
  log_s: float = 0.0  # train_s at the last log record
  log_step: int = 0
  mark: Optional[float] = None  # start of the current stretch of training steps
  loss: float = float("nan")  # mean total loss of the last log interval (the progress bar)
  untimed: int = 0  # steps that compiled a step function (not in train_s)
  tree: Optional[tuple] = None  # the branched model's current tree
  structure: list = dataclasses.field(default_factory=list)  # one record per split
  window: Optional[dynamic.Window] = None  # the measuring window's sums
  offset: int = 0  # structure.restart: the steps before the retraining (state.step restarts at 0)


class Outputs(NamedTuple):
  """Where a run writes (all no-ops on processes other than 0, except the checkpoints)."""
  mngr: Any
  jsonl: logging_utils.JsonlWriter
  tb: logging_utils.TensorBoard
  say: Callable[[str], None]


class Evaluator(NamedTuple):
  """Evaluation of a state on validation / test (and optionally N training batches)."""
  loaders: dict
  train_loader: Any
  n_train: int
  stats_fn: Callable
  reduce_fn: Optional[Callable]
  rule: str
  plateau_update: Optional[Callable]  # jitted reduce_on_plateau update, when the schedule is one


def _fetch(tree):
  """The loop's one host read of device values (at log, evaluation and checkpoint steps)."""
  return jax.device_get(tree)


def _console(echo: bool) -> Callable[[str], None]:
  def say(line: str) -> None:
    logging.info("%s", line)
    if echo and jax.process_index() == 0:
      tqdm.tqdm.write(line, file=sys.stdout)
      sys.stdout.flush()
  return say


def _open_checkpoints(config, workdir: str):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=int(config.train.keep_checkpoints),
                                           create=True))


def _open_outputs(workdir: str, mngr, start: int, say) -> Outputs:
  main = jax.process_index() == 0
  jsonl = logging_utils.JsonlWriter(os.path.join(workdir, "metrics.jsonl"), enabled=main)
  jsonl.truncate_after(start)  # a resumed run rewrites the records of the steps it repeats
  tb = logging_utils.TensorBoard(os.path.join(workdir, "tensorboard"), enabled=main,
                                 purge_step=start if start else None)
  return Outputs(mngr, jsonl, tb, say)


def _make_evaluator(config, p: Program) -> Evaluator:
  pidx, pcount = jax.process_index(), jax.process_count()
  bench, ebs = p.bench, int(config.train.eval_batch_size)
  loaders = {s: bench.loader(s, ebs, 0, False, pidx, pcount) for s in ("validation", "test")}
  # Optional: N training batches evaluated like validation (the train/validation gap of
  # mtl_jax.analysis.overfitting); 0 = off. A fixed random subset (the first N batches of a seeded
  # permutation), not the first N in storage order: a split stored sorted (QM9 by molecule index,
  # small molecules first) would otherwise give a biased sample.
  n_train = int(config.train.get("eval_train_batches", 0) or 0)
  train_loader = bench.loader("train", ebs, 0, True, pidx, pcount) if n_train else None
  stats_fn = jax.jit(evaluation.batch_stats_fn(eval_apply(p.model), list(bench.tasks),
                                               bench.multi_input))
  reduce_fn = None
  if pcount > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    reduce_fn = lambda t: jax.tree.map(lambda x: np.sum(x, 0),
                                       multihost_utils.process_allgather(t))
  plateau_update = None
  if config.optimizer.schedule == "plateau":
    tx = make_plateau(config)
    plateau_update = jax.jit(lambda s, v: tx.update({}, s, value=v)[1])
  return Evaluator(loaders, train_loader, n_train, stats_fn, reduce_fn, _select_rule(config, bench),
                   plateau_update)


def evaluate_state(ev: Evaluator, p: Program, state: TrainState) -> dict:
  """``{split: results}`` of ``state`` on validation and test (and ``train`` when asked)."""
  tasks = list(p.bench.tasks)
  variables = _variables(state.params, state.batch_stats, p.constants)
  res = {s: evaluation.evaluate(None, variables, ld, tasks, multi_input=p.bench.multi_input,
                                stats_fn=ev.stats_fn, reduce_fn=ev.reduce_fn)
         for s, ld in ev.loaders.items()}
  if ev.n_train:
    total = evaluation.accumulate(ev.stats_fn, variables,
                                  itertools.islice(ev.train_loader.epoch(), ev.n_train))
    res["train"] = evaluation.results_from_stats(tasks, ev.reduce_fn(total) if ev.reduce_fn
                                                 else total)
  return res


def _evaluate(run: Run, p: Program, ev: Evaluator, out: Outputs) -> None:
  """Evaluate, select the best step on validation, step the plateau schedule, write the record."""
  bench = p.bench
  if run.last_eval < 0:
    out.say(f"evaluating at step {run.step} (the first evaluation compiles)…")
  res = evaluate_state(ev, p, run.state)
  score = selection_score(ev.rule, res["validation"], bench)
  if run.best["score"] is None or score > run.best["score"]:
    run.best = {"score": score, "step": run.step, "validation": res["validation"],
                "test": res["test"]}
  run.last_eval = run.step
  record = {"step": run.step, "eval": res, "selection_score": score,
            "best_step": run.best["step"]}
  if ev.plateau_update is not None:
    plateau = replicate(ev.plateau_update(run.state.plateau, jnp.float32(-score)), p.mesh)
    run.state = run.state._replace(plateau=plateau)
    record["lr_scale"] = float(_fetch(plateau.scale))
  refs, direction = bench.reference, evaluation.direction(bench.tasks)
  dm = evaluation.delta_m(res["test"], refs, direction) if refs else None
  if dm is not None:
    record["test_delta_m"] = dm
  out.jsonl.write(record)
  flat = logging_utils.flatten(dict(res))
  flat.update({f"eval/{k}": record[k] for k in ("selection_score", "test_delta_m", "lr_scale")
               if k in record})
  out.tb.scalars(run.step, flat)
  logging.info("step %d eval: %s (score %.5g, best step %s)", run.step,
               json.dumps(logging_utils._plain(res)), score, run.best["step"])


def _save(run: Run, p: Program, out: Outputs) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # The loader may be one batch ahead (the next batch is read while the device runs the step).
  position = p.loader.position - (1 if run.ahead else 0)
  meta = {"position": int(position), "step": int(run.step), "best": run.best,
          "last_eval": int(run.last_eval), "step_offset": int(run.offset),
          "tree": T.to_list(run.tree) if run.tree is not None else None,
          "structure": run.structure,
          "window": run.window.to_json() if run.window is not None else None}
  # Save a copy: the checkpoint is written in the background while the next step runs, and
  # that step donates (overwrites in place) the state's buffers.
  snapshot = jax.tree.map(lambda x: jnp.array(x, copy=True), run.state)
  out.mngr.save(run.step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(snapshot),
      meta=ocp.args.JsonSave(logging_utils._plain(meta))), force=True)


_STACK_CHUNK = 32  # steps per stacking program: at most 32 small programs per metrics structure
_STACK_MIN = 8  # fewer pending steps are read as they are (a few copies; no program to compile)


@jax.jit
def _stack_chunk(metrics: list):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)


def _stack_steps(metrics: list):
  """The metrics of consecutive steps (one tree structure) stacked on the device on a new leading
  axis, so that a read is a few host copies per metric, not one per metric and step. Stacked in
  chunks of ``_STACK_CHUNK`` steps (one small program per chunk length: a long log interval
  compiles no program over thousands of arguments); returns the list of chunks. Fewer than
  ``_STACK_MIN`` steps are returned unstacked (stacked on the host after the read)."""
  if len(metrics) < _STACK_MIN:
    return metrics
  return [_stack_chunk(metrics[i:i + _STACK_CHUNK])
          for i in range(0, len(metrics), _STACK_CHUNK)]


def _step_groups(pending: list) -> list:
  """``pending`` ((step, device metrics) in step order) as runs of one tree structure (a
  measuring step's metrics have keys the train step's lack): ``[(steps, [metrics])]``."""
  groups, last = [], None
  for step, m in pending:
    td = tuple(m)  # the step's flat metrics dict: its keys are its structure
    if td != last:
      groups.append(([], []))
      last = td
    groups[-1][0].append(step)
    groups[-1][1].append(m)
  return groups


def _read_pending(run: Run, names, on_nonfinite: str, mngr, structure=None) -> None:
  """Read the metrics of the steps run since the last read and check each step for NaN/Inf in
  order, so a non-finite step is reported at its own step number. The steps' metrics are stacked
  on the device (:func:`_stack_steps`) and read in one host sync (:func:`_fetch`)."""
  groups = _step_groups(run.pending)
  fetched = _fetch([_stack_steps(ms) for _, ms in groups])
  for (steps, _), chunks in zip(groups, fetched):
    if len(steps) < _STACK_MIN:
      m = jax.tree.map(lambda *xs: np.stack(xs), *chunks)
    else:
      m = chunks[0] if len(chunks) == 1 else jax.tree.map(lambda *xs: np.concatenate(xs), *chunks)
    finite = np.asarray(m.pop("finite"), bool)
    for i in np.flatnonzero(~finite):
      _nonfinite(names, m, int(i), steps[i], on_nonfinite, mngr)
    run.skipped = int(m["skipped"][-1])
    stage, look = m.pop("stage_gramians", None), m.pop("lookahead", None)
    if stage is not None and run.window is not None:
      for i, step in enumerate(steps):
        if finite[i] and dynamic.measuring(structure, step - 1):
          run.window.add(stage[i], None if look is None else look[i])
    acc = run.acc if run.acc is not None else {}
    for k, v in m.items():  # per key: a measuring step has statistics the others lack
      total, count = acc.get(k, (0.0, 0))
      acc[k] = (total + np.asarray(v, np.float64).sum(0), count + len(steps))
    run.acc = acc
    run.acc_n += len(steps)
  run.pending = []


def _nonfinite(names, m: dict, i: int, step: int, on_nonfinite: str, mngr) -> None:
  """Report the non-finite step ``step`` (row ``i`` of the read metrics ``m``): raise
  :class:`NonFiniteError` (``stop``) or warn (``skip``)."""
  bad = [n for n, l in zip(names, np.asarray(m["losses"][i])) if not np.isfinite(l)]
  what = f"task loss {', '.join(bad)}" if bad else "combined gradient (all losses finite)"
  if on_nonfinite == "stop":
    msg = (f"non-finite {what} at step {step}; stopping, the last good checkpoint is "
           f"step {mngr.latest_step()}")
    logging.error(msg)
    raise NonFiniteError(msg)
  logging.warning("non-finite %s at step %d: step skipped (%d so far)", what, step,
                  int(m["skipped"][i]))


def _log(run: Run, names, out: Outputs) -> None:
  """One metrics record: means since the last record, steps/s of the training steps alone."""
  if not run.acc_n:
    return
  mean = {k: total / count for k, (total, count) in run.acc.items()}
  seconds = run.train_s - run.log_s
  rate = (run.step - run.log_step) / seconds if seconds > 0 else None
  record = {"step": run.step, "steps_per_sec": rate, **mean, "skipped": run.skipped}
  out.jsonl.write(record)
  out.tb.scalars(run.step, logging_utils.flatten(
      {k: v for k, v in record.items() if k != "step" and v is not None},
      {"losses": names, "weights": names, "grad_norms": names}))
  run.loss = float(np.sum(mean["losses"]))
  run.acc, run.acc_n, run.log_s, run.log_step = None, 0, run.train_s, run.step


def _pause(run: Run) -> None:
  """End a stretch of training steps (their results have been read, so the device is done)."""
  if run.mark is not None:
    run.train_s += _clock() - run.mark
    run.mark = None


def _resume_clock(run: Run) -> None:
  run.mark = _clock()


def _compile_step(run: Run, p: Program, fn, batch, out: Outputs, what: str):
  """A step that compiles ``fn`` (this process's first, a measuring window's, a new tree's):
  timed apart from the others."""
  out.say(f"compiling the {what} ({p.method.name}, engine mode "
          f"{'jacobian' if fn is p.measure_fn else p.mode}, {p.mesh.devices.size} device(s))…")
  t0 = _clock()
  run.state, metrics = fn(run.state, shard_batch(batch, p.mesh))
  jax.block_until_ready(metrics)
  out.say(f"compiled and ran the step in {_clock() - t0:.1f} s")
  return metrics


def _step_fn(run: Run, p: Program, s, last_split: int):
  """The measuring step inside a window before a split, else the train step (a run already in
  the jacobian mode measures at every step up to the last split: one compiled step, not two).
  ``s``: the config's structure block; ``last_split``: its last split step (0: none)."""
  if p.measure_fn is not None and (dynamic.measuring(s, run.step) or (
      p.mode == "jacobian" and run.step < last_split)):
    if run.window is None:
      run.window = dynamic.Window(s.conflict_threshold)
    return p.measure_fn
  return p.step_fn


def _loop(run: Run, p: Program, ev: Evaluator, out: Outputs, config, stop, progress):
  """Train to ``p.num_steps``; returns ``(preempted, p, ev)``: True when stopped by SIGTERM (after
  checkpointing), and the program and evaluator of the final tree. The host reads the device's
  results only at log, evaluation and checkpoint steps, at splits (and on SIGTERM)."""
  names = [t.name for t in p.bench.tasks]
  every = {k: int(config.train[k]) for k in ("log_every", "eval_every", "checkpoint_every")}
  structure = _structure(config)
  splits = dynamic.schedule(structure)
  last_split = max(splits, default=0)
  n, bar, compiled = p.num_steps, None, set()
  batch = next(p.loader) if run.step < n else None
  ahead = None  # the metrics of a step dispatched before the last boundary's read
  while run.step < n:
    fn = _step_fn(run, p, structure, last_split)
    if ahead is not None:
      metrics, ahead = ahead, None
    elif fn not in compiled:  # compiles: timed apart (the first one before the bar starts)
      _pause(run)
      what = ("measuring step" if fn is p.measure_fn else "train step") + (
          f" of tree {T.format_tree(p.tree, names)}" if p.tree is not None else "")
      metrics = _compile_step(run, p, fn, batch, out, what)
      compiled.add(fn)
      bar = bar if bar is not None else _bar(run.step, n, progress)
      run.log_step += 1  # steps/s counts the steps after it
      run.untimed += 1
      _resume_clock(run)
    else:
      run.state, metrics = fn(run.state, shard_batch(batch, p.mesh))
    run.step += 1
    run.pending.append((run.step, metrics))
    if run.step in splits and all(r["step"] != run.step for r in run.structure):
      _read_pending(run, names, config.train.on_nonfinite, out.mngr, structure)
      _pause(run)
      p, ev = _split(run, p, ev, out, config)
      _resume_clock(run)
    batch = next(p.loader) if run.step < n else None  # read while the device runs the step
    run.ahead = batch is not None
    at = {k: run.step % v == 0 or run.step == n for k, v in every.items()}
    if stop.at(run.step) or any(at.values()):
      if (batch is not None and not (stop.flag or at["eval_every"] or at["checkpoint_every"])
          and _step_fn(run, p, structure, last_split) is fn):
        # A log-only boundary: the next step runs on the device while the host reads and logs
        # this one's (the device never idles there; the log's host work counts as training time).
        run.state, ahead = fn(run.state, shard_batch(batch, p.mesh))
        _read_pending(run, names, config.train.on_nonfinite, out.mngr, structure)
        _pause(run)
        _resume_clock(run)
        _log(run, names, out)
        bar.set_postfix_str(f"loss {run.loss:.4g}", refresh=False)
        bar.update(1)
        continue
      _read_pending(run, names, config.train.on_nonfinite, out.mngr, structure)
      _pause(run)
      if at["log_every"]:
        _log(run, names, out)
      if at["eval_every"]:
        _evaluate(run, p, ev, out)
      if at["checkpoint_every"] or (stop.flag and out.mngr.latest_step() != run.step):
        _save(run, p, out)
      _resume_clock(run)
      bar.set_postfix_str(f"loss {run.loss:.4g}", refresh=False)
    bar.update(1)
    if stop.flag:
      bar.close()
      logging.warning("SIGTERM at step %d: checkpointed, stopping", run.step)
      out.say(f"SIGTERM at step {run.step}: checkpoint saved; rerun the same command to resume")
      return True, p, ev
  if bar is not None:
    bar.close()
  _pause(run)
  return False, p, ev


def stage_param_counts(params, tree) -> list:
  """The parameters of one copy of each stage of a branched model's ``params``."""
  return [int(sum(np.prod(x.shape) for x in jax.tree.leaves(params[f"stage_{i}"]["group_0"])))
          for i in range(len(tree))]


def _split(run: Run, p: Program, ev: Evaluator, out: Outputs, config):
  """At a split step: choose the tree from the window, split the state (or, with ``restart``,
  start the chosen tree afresh), rebuild the step; log the split. Returns ``(p, ev)``."""
  s, names = config.structure, [t.name for t in p.bench.tasks]
  window = run.window if run.window is not None else dynamic.Window(s.conflict_threshold)
  rec = dynamic.decide(s, window, run.tree, stage_param_counts(run.state.params, run.tree),
                       run.step, names, share=p.method.needs != combiners.LOSSES)
  new = T.canonical(rec["tree"], list(range(len(names))), len(run.tree))
  run.window = None
  rec["split"] = new != run.tree
  if rec["split"] or s.restart:
    old, p = run.tree, retree(config, p, new)
    if s.restart:  # Recon / TAG: the chosen tree from scratch, from the first batch
      run.state, run.offset = p.state, run.step
      p.loader.position = 0
      run.best = {"score": None, "step": None, "validation": None, "test": None}
    else:
      run.state = replicate(_surgery().split(run.state, old, new), p.mesh)
    ev = ev._replace(stats_fn=jax.jit(evaluation.batch_stats_fn(
        eval_apply(p.model), list(p.bench.tasks), p.bench.multi_input)))
  run.tree = new
  rec["num_params"] = int(p.model.num_params(jax.device_get(run.state.params)))
  run.structure.append(rec)
  _log_structure(rec, out, restart=bool(s.restart))
  return p, ev


def _surgery():
  from mtl_jax.structure import surgery  # pylint: disable=g-import-not-at-top
  return surgery


def _log_structure(rec: dict, out: Outputs, restart: bool = False) -> None:
  """A structure record to metrics.jsonl, TensorBoard and the terminal."""
  step = rec["step"]
  out.jsonl.write({"step": step, "structure": rec})
  out.tb.scalars(step, {"structure/num_params": float(rec["num_params"]),
                        "structure/budget_fraction": float(rec["fraction"]),
                        **{f"structure/groups_stage_{i}": float(len(g))
                           for i, g in enumerate(rec["tree"])}})
  out.tb.text(step, "structure/tree", rec["describe"])
  what = {True: "split", False: "kept"}[rec.get("split", True)]
  conflict = rec.get("conflict")
  tail = (f"; conflict per stage {', '.join(f'{c:.2f}' for c in conflict)}"
          if conflict is not None else "")
  out.say(f"structure at step {step} ({rec['method']}, {what}"
          f"{', retraining from step 0' if restart else ''}): {rec['describe']} "
          f"({100 * rec['fraction']:.1f}% of independent, {rec['num_params']:,} parameters{tail})")


def _bar(initial: int, total: int, progress: Optional[bool]):
  """tqdm over the steps (created after the compiling first step, so its rate excludes it)."""
  disable = (not progress) if progress is not None else not sys.stderr.isatty()
  return tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                   disable=disable or jax.process_index() != 0, file=sys.stderr)


def _mode_reason(config, p: Program) -> str:
  if config.engine.mode:
    return "set by config.engine.mode"
  if p.method.needs == combiners.LOSSES:
    return f"{p.method.name} needs only the losses"
  if p.method.needs == combiners.GRAMIAN:
    return (f"auto: the K x P_shared Jacobian {'fits' if p.mode == 'jacobian' else 'exceeds'} "
            f"config.engine.jacobian_budget_mb={config.engine.jacobian_budget_mb:g}")
  return f"{p.method.name} needs the {p.method.needs}"


def _startup_block(config, p: Program, workdir: str, num_params: int, start: int) -> list:
  bench, names = p.bench, [t.name for t in p.bench.tasks]
  shown = ", ".join(names[:8]) + (f", … ({len(names)} in all)" if len(names) > 8 else "")
  devs = p.mesh.devices.flat
  kinds = sorted({d.device_kind for d in devs})
  hp = config.combiner.hparams.to_dict()
  epochs = p.num_steps / max(p.loader.batches_per_epoch, 1)
  o = config.optimizer
  return [
      f"benchmark   {bench.name}{' (mock data)' if config.data.get('mock') else ''}: "
      f"{len(names)} tasks: {shown}",
      f"combiner    {config.combiner.name}{' ' + json.dumps(hp) if hp else ''}; sharing "
      f"{'branched' if p.tree is not None else config.model.sharing}",
      f"engine      mode {p.mode} ({_mode_reason(config, p)}), reduction "
      f"{config.engine.reduction}",
      f"devices     {p.mesh.devices.size} x {'/'.join(kinds)} ({jax.default_backend()}), "
      f"{jax.process_count()} process(es)",
      *([f"structure   {_structure(config).method}: {T.format_tree(p.tree, names)}"]
        if p.tree is not None else []),
      f"parameters  {num_params:,}",
      f"steps       {p.num_steps:,} (batch {int(config.train.batch_size)}, {epochs:.3g} epochs; "
      f"{o.name} lr {float(o.learning_rate):g}, {o.schedule} schedule)",
      f"workdir     {os.path.abspath(workdir)}",
      f"resumed     at step {start}" if start else "resumed     no (a fresh run)",
  ]


def _summary(config, p: Program, run: Run, ev: Evaluator, t_start: float,
             num_params: int, timed_steps: int) -> dict:
  bench, refs = p.bench, p.bench.reference
  best = run.best
  return {
      "step": int(run.step),
      "params_checksum": params_checksum(run.state.params),
      "tasks": [t.name for t in bench.tasks],
      "test": best["test"],
      "validation": best["validation"],
      "selected_step": best["step"],
      "selection": ev.rule,
      "delta_m": (evaluation.delta_m(best["test"], refs, evaluation.direction(bench.tasks))
                  if refs else None),
      "num_params": num_params,
      # training steps only: no compilation, evaluation or checkpointing
      "steps_per_sec": timed_steps / run.train_s if timed_steps > 0 and run.train_s > 0 else None,
      "wall_time_s": _clock() - t_start,
      "skipped_steps": run.skipped,
      "num_devices": int(p.mesh.devices.size),
      "num_processes": int(jax.process_count()),
      "benchmark": bench.name,
      "combiner": config.combiner.name,
      "combiner_hparams": config.combiner.hparams.to_dict(),
      "engine_mode": p.mode,
      "reduction": config.engine.reduction,
      "layer_gramian": config.engine.layer_gramian,
      "sharing": config.model.sharing,
      "units": dict(bench.info.get("units", {})),
      "structure": _structure_summary(config, p, run),
      "config": config.to_dict(),
      "config_digest": config_utils.config_digest(config),
  }


def _tree_record(method: str, p: Program, params, split: bool, **extra) -> dict:
  """A step-0 structure record of ``p``'s tree (``params``: host copies of its parameters)."""
  names = [t.name for t in p.bench.tasks]
  return {"step": 0, "method": method, "tree": T.to_list(p.tree),
          "describe": T.format_tree(p.tree, names), "split": split,
          "fraction": T.budget_fraction(p.tree, stage_param_counts(params, p.tree)),
          **extra, "num_params": int(p.model.num_params(params))}


def _start_record(config, p: Program, run: Run) -> dict:
  """The structure record of step 0: the tree a fixed / affinity / conflict run starts from."""
  return _tree_record(config.structure.method, p, jax.device_get(run.state.params), False)


def _structure_summary(config, p: Program, run: Run) -> Optional[dict]:
  """summary.json's ``structure``: the final tree, the tree at every split step and the records
  (with the affinity that chose each split)."""
  if p.tree is None:
    return None
  names = [t.name for t in p.bench.tasks]
  return {"method": _structure(config).method, "tree": T.to_list(p.tree),
          "describe": T.format_tree(p.tree, names),
          "trees": {str(r["step"]): r["tree"] for r in run.structure},
          "restart_step": run.offset or None,
          "splits": run.structure}


def _peek_tree(mngr, p: Program):
  """The tree the newest checkpoint was saved with (None: no checkpoint, or no tree in it)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step = mngr.latest_step()
  if step is None or p.tree is None:
    return None
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception:  # pylint: disable=broad-except  (restore_latest reports a corrupt step)
    return None
  tree = meta.get("tree")
  return None if tree is None else T.canonical(tree, list(range(len(p.bench.tasks))), len(p.tree))


def _restore_into(run: Run, p: Program, mngr, say, config) -> Program:
  """Restore the newest checkpoint into ``run``; returns the program of its tree (a checkpoint
  saved after a split restores into the split model)."""
  tree = _peek_tree(mngr, p)
  if tree is not None and tree != p.tree:
    p = retree(config, p, tree)
    run.state = p.state
  run.tree = p.tree
  state, meta = restore_latest(mngr, run.state, say)
  if state is None:
    return p
  run.state = state
  p.loader.position = int(meta["position"])
  run.best = meta["best"]
  run.last_eval = int(meta.get("last_eval", -1))
  run.offset = int(meta.get("step_offset") or 0)
  run.structure = list(meta.get("structure") or [])
  if meta.get("window"):
    run.window = dynamic.Window.from_json(meta["window"], config.structure.conflict_threshold)
  run.step = run.log_step = int(_fetch(state.step)) + run.offset
  run.skipped = int(_fetch(state.combiner_state.skipped))
  say(f"resumed at step {run.step} from {mngr.directory}"
      + (f" (tree {T.format_tree(p.tree, [t.name for t in p.bench.tasks])})"
         if p.tree is not None and run.structure else ""))
  return p


def _search_tree(config, p: Program, run: Run, out: Outputs) -> Program:
  """``learn_to_branch``: the Gumbel-softmax search over ``warmup_steps`` training batches, its
  discretised tree, the program of that tree (trained from scratch, as Guo et al. do)."""
  from mtl_jax.structure import ltb  # pylint: disable=g-import-not-at-top
  s, bench = config.structure, p.bench
  if bench.multi_input:
    raise config_utils.ConfigError("config.structure.method='learn_to_branch' needs single-input "
                                   "batches; valid for multi-input: none, fixed, affinity, conflict")
  out.say(f"learn_to_branch: searching the tree for {int(s.warmup_steps)} steps…")
  loader = bench.loader("train", int(config.train.batch_size), int(config.seed) + 1, True)
  t0 = _clock()
  search = ltb.learn_to_branch(
      build_backbone(config, bench), list(bench.tasks), (next(loader) for _ in itertools.count()),
      num_steps=int(s.warmup_steps), learning_rate=float(config.optimizer.learning_rate),
      branch_learning_rate=float(s.branch_learning_rate) or None, tau_start=float(s.tau_start),
      seed=int(config.seed))
  p = retree(config, p, search.tree)
  run.state, run.tree = p.state, p.tree
  rec = _tree_record(
      "learn_to_branch", p, jax.device_get(p.state.params), True,
      search_steps=int(s.warmup_steps), search_s=_clock() - t0,
      search_final_losses=search.losses[-1].tolist(),
      probabilities={k: v.tolist() for k, v in search.probabilities.items()})
  run.structure.append(rec)
  _log_structure(rec, out)
  return p


def fit(config: ml_collections.ConfigDict, workdir: str, *, progress: Optional[bool] = None,
        devices=None, built=None, echo: bool = False) -> Optional[dict]:
  """Train (or resume) the run of ``config`` in ``workdir``; returns the summary (None if stopped
  by SIGTERM before the end). ``built``: the result of :func:`build` when the caller has it.
  ``echo``: the start-up block, phase lines and resume/corruption notices also on stdout (the
  launcher's terminal); they always go to the INFO log."""
  t_start = _clock()
  say = _console(echo)
  say("initialising the model and the optimizer…")
  p = build_program(config, devices, built)
  os.makedirs(workdir, exist_ok=True)
  mngr = _open_checkpoints(config, workdir)
  run = Run(p.state, 0, {"score": None, "step": None, "validation": None, "test": None})
  p = _restore_into(run, p, mngr, say, config)
  start = run.step
  out = _open_outputs(workdir, mngr, start, say)
  method = _structure(config).method
  if not run.structure and method == "learn_to_branch":
    p = _search_tree(config, p, run, out)
  elif not run.structure and method != "none" and p.tree is not None:
    run.structure.append(_start_record(config, p, run))
    _log_structure(run.structure[-1], out)
  num_params = int(p.model.num_params(jax.device_get(run.state.params)))
  for line in _startup_block(config, p, workdir, num_params, start):
    say(line)
  ev = _make_evaluator(config, p)
  stop = _Stop(mngr)
  stop.install()
  try:
    preempted, p, ev = _loop(run, p, ev, out, config, stop, progress)
    if not preempted and run.last_eval != p.num_steps:
      _evaluate(run, p, ev, out)  # resumed at the end, before its evaluation
    if not preempted and mngr.latest_step() != p.num_steps:
      _save(run, p, out)
  finally:
    stop.uninstall()
    mngr.wait_until_finished()
    mngr.close()
    out.tb.close()
  if preempted:
    return None
  num_params = int(p.model.num_params(jax.device_get(run.state.params)))
  summary = _summary(config, p, run, ev, t_start, num_params, max(run.step - start - run.untimed, 0))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(logging_utils._plain(summary), f, indent=2, sort_keys=True)
  logging.info("done: step %d, checksum %s, test %s, delta_m %s", run.step,
               summary["params_checksum"], json.dumps(logging_utils._plain(run.best["test"])),
               summary["delta_m"])
  return summary
