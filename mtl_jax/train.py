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

:func:`fit` is the run: build from the config, restore the latest checkpoint of the workdir if any,
train with evaluation every ``eval_every`` steps and best-on-validation selection, checkpoint every
``checkpoint_every`` steps / at the end / on SIGTERM, and write ``summary.json``. The host checks the
task losses of every step for NaN/Inf (the step's metrics are fetched every step anyway for the
logs; the next batch is read from the loader before waiting for them, so the host work overlaps
the device step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import signal
import threading
import time
from typing import Any, Callable, NamedTuple, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mtl_jax import autodiff
from mtl_jax import combiners
from mtl_jax import config_utils
from mtl_jax import evaluation
from mtl_jax import layers
from mtl_jax import logging_utils
from mtl_jax.models.base import sync_batch_norm

AXIS = "data"
PyTree = Any


class TrainState(NamedTuple):
  params: PyTree
  batch_stats: PyTree  # {} when the model has no batch norm
  opt_state: PyTree
  combiner_state: combiners.CombinerState
  step: jax.Array  # int32: steps done
  rng: jax.Array  # uint32 key data; the key of step s is fold_in(rng, s) (and the device index)


class NonFiniteError(RuntimeError):
  """A task loss (or the combined gradient) was NaN or Inf and ``on_nonfinite='stop'``."""


# ---------------------------------------------------------------------------------------------
# Model: the sharing strategy's MultiTaskModel, seen through a few pure functions.


def build_model(config, bench):
  """The sharing strategy ``config.model.sharing`` over the backbone and the benchmark's tasks.

  Returns a :class:`mtl_jax.sharing.MultiTaskModel`. ``config.model.backbone`` (with
  ``config.model.width`` when non-zero) replaces the benchmark's default backbone;
  ``config.model.dtype`` (``float32`` | ``bfloat16``) is the compute dtype (parameters and optimizer
  stay float32).
  """
  from mtl_jax import sharing  # pylint: disable=g-import-not-at-top
  backbone = bench.backbone
  if config.model.backbone:
    from mtl_jax import models  # pylint: disable=g-import-not-at-top
    opts = {"width": int(config.model.width)} if config.model.width else {}
    backbone = models.get(config.model.backbone, **opts)
  model = sharing.get(config.model.sharing, backbone, list(bench.tasks),
                      **config.model.sharing_options.to_dict())
  dtype = config.model.get("dtype", "float32")
  if dtype not in layers.DTYPES:
    raise config_utils.one_of("model dtype", dtype, layers.DTYPES)
  return dataclasses.replace(model, compute_dtype=dtype)


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
  if o.schedule == "constant":
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


def _global_norm(tree) -> jax.Array:
  leaves = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(leaves)) if leaves else jnp.zeros(())


def make_train_step(model, tasks, method: combiners.Method, tx: optax.GradientTransformation,
                    mesh, *, mode: str, reduction: str = "exact", multi_input: bool = False,
                    shared_mask=None, constants=None, per_device_batches: bool = False,
                    layer_gramian: str = "auto"):
  """``step(state, batch) -> (state, metrics)``: jitted, SPMD over ``mesh``, state donated.

  ``model`` is a :class:`mtl_jax.sharing.MultiTaskModel`; ``shared_mask`` the tree of bools over
  the params; ``constants`` the model's non-trainable collections other than batch statistics
  (e.g. sparse-sharing masks), closed over as constants. ``per_device_batches``: every batch leaf
  has a leading device axis of the mesh's size (one self-contained sub-batch per device, as
  :attr:`mtl_jax.data.base.Benchmark.per_device_batches` loaders make for graph batches); each
  device drops that axis of its slice.
  """
  # Host copies: a device array closed over by shard_map must not carry a sharding on the
  # mesh's axes (JAX rejects closing over Explicit-axis arrays); numpy constants embed as-is.
  constants = jax.tree.map(np.asarray, dict(constants or {}))
  if mode == "features":
    if multi_input:
      raise config_utils.ConfigError(
          "engine mode 'features' needs single-input batches; valid for multi-input: "
          "losses, gramian, jacobian")
    if not model.has_split:
      from mtl_jax import sharing  # pylint: disable=g-import-not-at-top
      raise config_utils.ConfigError(
          f"engine mode 'features' needs one shared representation; sharing {model.name!r} has "
          f"none (valid: {', '.join(n for n in sharing.names() if sharing.base._SPLIT.get(n))})")
    loss_fn = make_split_loss(model, tasks, constants)
  else:
    loss_fn = make_loss_fn(model, tasks, multi_input, constants)

  def per_device(state: TrainState, batch):
    if per_device_batches:
      batch = _drop_device_axis(batch)
    rng = jax.random.wrap_key_data(state.rng)
    rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(AXIS))
    out = autodiff.combine(method, state.combiner_state, loss_fn, state.params, state.batch_stats,
                           batch, rng, mode=mode, shared_mask=shared_mask, axis_name=AXIS,
                           reduction=reduction, layer_gramian=layer_gramian)
    aux = out.aux[0] if mode == "features" else out.aux
    new_bs = jax.tree.map(lambda x: jax.lax.pmean(x, AXIS), aux) if state.batch_stats else {}
    grad = out.update
    metrics = {}
    if model.regularizer_fn is not None:
      reg, reg_grad = jax.value_and_grad(model.regularizer_fn)(state.params)
      grad = jax.tree.map(jnp.add, grad, reg_grad)
      metrics["regularizer"] = reg
    updates, opt_state = tx.update(grad, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = out.finite
    params = optax.tree.where(ok, params, state.params)
    opt_state = optax.tree.where(ok, opt_state, state.opt_state)
    new_bs = optax.tree.where(ok, new_bs, state.batch_stats)
    metrics.update(losses=out.losses, weights=out.weights, finite=ok,
                   grad_norm=_global_norm(grad), update_norm=jnp.where(ok, _global_norm(updates), 0.0),
                   skipped=out.state.skipped)
    if out.gramian is not None:
      metrics.update(evaluation.conflict_stats(out.gramian))
    new = TrainState(params, new_bs, opt_state, out.state, state.step + 1, state.rng)
    return new, metrics

  def per_device_sync_bn(state: TrainState, batch):
    with sync_batch_norm(AXIS):  # batch statistics of the global batch (SyncBatchNorm)
      return per_device(state, batch)

  sharded = jax.shard_map(per_device_sync_bn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=(0,))


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
  # One compiled program: run eagerly, init dispatches (and compiles) each op on its own.
  variables = jax.jit(lambda k: model.init(k, sample))(init_key)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  constants = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
  state = TrainState(
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      combiner_state=method.transform().init(params),
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(data_key))
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
  """Set by SIGTERM: the loop checkpoints and returns."""

  def __init__(self):
    self.flag = False
    self.previous = None

  def install(self):
    if threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def uninstall(self):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


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
          f"{', '.join(n for n in combiners.names() if combiners.method(n, len(bench.tasks)).needs == combiners.LOSSES)}")
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


def run_steps(config, num_steps: int, devices=None, batches=None):
  """Train ``num_steps`` steps from the initial state without the loop's outputs (no checkpoint,
  no logging); returns ``(state, [metrics per step])``. For tests and notebooks. ``batches``
  replace the loader's; for a ``per_device_batches`` benchmark they must be per-device stacks."""
  bench, model, method, mode = build(config)
  mesh = make_mesh(devices)
  loader = make_train_loader(bench, config, mesh)
  tx = make_optimizer(config, max(int(config.train.num_steps), num_steps))
  state, constants = init_state(config, model, bench, method, tx, mesh)
  mask = combiners.resolve_mask(model.shared_mask, jax.device_get(state.params))
  step_fn = make_train_step(model, list(bench.tasks), method, tx, mesh, mode=mode,
                            reduction=config.engine.reduction, multi_input=bench.multi_input,
                            shared_mask=mask, constants=constants,
                            per_device_batches=bench.per_device_batches,
                            layer_gramian=config.engine.layer_gramian)
  history = []
  for i in range(num_steps):
    batch = batches[i] if batches is not None else next(loader)
    state, metrics = step_fn(state, shard_batch(batch, mesh))
    history.append(jax.device_get(metrics))
  return state, history


def fit(config: ml_collections.ConfigDict, workdir: str, *, progress: Optional[bool] = None,
        devices=None, built=None) -> Optional[dict]:
  """Train (or resume) the run of ``config`` in ``workdir``; returns the summary (None if stopped
  by SIGTERM before the end). ``built``: the result of :func:`build` when the caller has it."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  t_start = time.perf_counter()
  bench, model, method, mode = built if built is not None else build(config)
  tasks = list(bench.tasks)
  names = [t.name for t in tasks]
  mesh = make_mesh(devices)
  ndev = mesh.devices.size
  pidx, pcount = jax.process_index(), jax.process_count()
  bsz = int(config.train.batch_size)
  if bsz % ndev:
    raise config_utils.ConfigError(
        f"config.train.batch_size {bsz} is not divisible by the {ndev} devices")
  train_loader = make_train_loader(bench, config, mesh)
  num_steps = int(config.train.num_steps) or int(config.train.num_epochs) * \
      train_loader.batches_per_epoch
  tx = make_optimizer(config, num_steps)
  state, constants = init_state(config, model, bench, method, tx, mesh)
  mask = combiners.resolve_mask(model.shared_mask, jax.device_get(state.params))
  step_fn = make_train_step(model, tasks, method, tx, mesh, mode=mode,
                            reduction=config.engine.reduction, multi_input=bench.multi_input,
                            shared_mask=mask, constants=constants,
                            per_device_batches=bench.per_device_batches,
                            layer_gramian=config.engine.layer_gramian)
  num_params = int(model.num_params(jax.device_get(state.params)))

  main = pidx == 0
  os.makedirs(workdir, exist_ok=True)
  ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
  mngr = ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(
          max_to_keep=int(config.train.keep_checkpoints), create=True))
  best = {"score": None, "step": None, "validation": None, "test": None}
  last_eval = -1
  start = 0
  latest = mngr.latest_step()
  if latest is not None:
    restored = mngr.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore()))
    state = restored["state"]
    meta = restored["meta"]
    train_loader.position = int(meta["position"])
    best = meta["best"]
    last_eval = int(meta.get("last_eval", -1))
    start = int(jax.device_get(state.step))
    logging.info("resumed from %s at step %d", ckpt_dir, start)

  jsonl = logging_utils.JsonlWriter(os.path.join(workdir, "metrics.jsonl"), enabled=main)
  jsonl.truncate_after(start)
  tb = logging_utils.TensorBoard(os.path.join(workdir, "tensorboard"), enabled=main,
                                 purge_step=start if start else None)
  bar = logging_utils.ProgressBar(num_steps, start, enabled=progress if main else False)

  eval_loaders = {s: bench.loader(s, int(config.train.eval_batch_size), 0, False, pidx, pcount)
                  for s in ("validation", "test")}
  # Optional: N training batches evaluated like validation (the train/validation gap of
  # mtl_jax.analysis.overfitting); 0 = off. A fixed random subset (the first N batches of a seeded
  # permutation), not the first N in storage order: a split stored sorted (QM9 by molecule index,
  # small molecules first) would otherwise give a biased sample.
  n_train_eval = int(config.train.get("eval_train_batches", 0) or 0)
  train_eval_loader = (bench.loader("train", int(config.train.eval_batch_size), 0, True, pidx,
                                    pcount) if n_train_eval else None)
  stats_fn = jax.jit(evaluation.batch_stats_fn(eval_apply(model), tasks, bench.multi_input))
  reduce_fn = None
  if pcount > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    reduce_fn = lambda t: jax.tree.map(lambda x: np.sum(x, 0),
                                       multihost_utils.process_allgather(t))
  rule = _select_rule(config, bench)
  refs = bench.reference
  direction = evaluation.direction(tasks)

  def run_eval(step):
    nonlocal best, last_eval
    variables = _variables(state.params, state.batch_stats, constants)
    res = {s: evaluation.evaluate(None, variables, ld, tasks, multi_input=bench.multi_input,
                                  stats_fn=stats_fn, reduce_fn=reduce_fn)
           for s, ld in eval_loaders.items()}
    if n_train_eval:
      total = evaluation.accumulate(stats_fn, variables,
                                    itertools.islice(train_eval_loader.epoch(), n_train_eval))
      res["train"] = evaluation.results_from_stats(tasks, reduce_fn(total) if reduce_fn else total)
    score = selection_score(rule, res["validation"], bench)
    improved = best["score"] is None or score > best["score"]
    if improved:
      best = {"score": score, "step": step, "validation": res["validation"], "test": res["test"]}
    last_eval = step
    record = {"step": step, "eval": res, "selection_score": score, "best_step": best["step"]}
    dm = evaluation.delta_m(res["test"], refs, direction) if refs else None
    if dm is not None:
      record["test_delta_m"] = dm
    jsonl.write(record)
    flat = logging_utils.flatten({s: r for s, r in res.items()})
    flat["eval/selection_score"] = score
    if dm is not None:
      flat["eval/test_delta_m"] = dm
    tb.scalars(step, flat)
    logging.info("step %d eval: %s (score %.5g, best step %s)", step,
                 json.dumps(logging_utils._plain(res)), score, best["step"])

  def save(step, force=False):
    # The loader is one batch ahead (the next batch is read while the device runs the step).
    position = train_loader.position - (1 if batch is not None else 0)
    meta = {"position": int(position), "step": int(step), "best": best,
            "last_eval": int(last_eval)}
    # Save a copy: the checkpoint is written in the background while the next step runs, and
    # that step donates (overwrites in place) the state's buffers.
    snapshot = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(snapshot),
        meta=ocp.args.JsonSave(logging_utils._plain(meta))), force=force)

  stop = _Stop()
  stop.install()
  log_every = int(config.train.log_every)
  acc, acc_n = None, 0
  t_loop = time.perf_counter()
  t_first = None
  step = start
  skipped_total = int(jax.device_get(state.combiner_state.skipped))
  preempted = False
  batch = None
  try:
    batch = next(train_loader) if step < num_steps else None
    while step < num_steps:
      state, metrics = step_fn(state, shard_batch(batch, mesh))
      step += 1
      batch = next(train_loader) if step < num_steps else None  # overlaps the device step
      m = jax.device_get(metrics)
      if t_first is None:
        t_first = time.perf_counter()
      if not bool(m["finite"]):
        bad = [n for n, l in zip(names, np.asarray(m["losses"])) if not np.isfinite(l)]
        what = (f"task loss {', '.join(bad)}" if bad else "combined gradient (all losses finite)")
        if config.train.on_nonfinite == "stop":
          msg = (f"non-finite {what} at step {step}; stopping, the last good checkpoint is "
                 f"step {mngr.latest_step()}")
          logging.error(msg)
          raise NonFiniteError(msg)
        logging.warning("non-finite %s at step %d: step skipped (%d so far)", what, step,
                        int(m["skipped"]))
      skipped_total = int(m["skipped"])
      scal = {k: np.asarray(v, np.float64) for k, v in m.items() if k != "finite"}
      acc = scal if acc is None else jax.tree.map(np.add, acc, scal)
      acc_n += 1
      if step % log_every == 0 or step == num_steps:
        mean = jax.tree.map(lambda x: x / acc_n, acc)
        now = time.perf_counter()
        rate = (step - start) / max(now - t_loop, 1e-9)
        record = {"step": step, "steps_per_sec": rate, **mean, "skipped": skipped_total}
        jsonl.write(record)
        tb.scalars(step, logging_utils.flatten(
            {k: v for k, v in record.items() if k != "step"},
            {"losses": names, "weights": names, "grad_norms": names}))
        acc, acc_n = None, 0
      if step % int(config.train.eval_every) == 0 or step == num_steps:
        run_eval(step)
      if step % int(config.train.checkpoint_every) == 0 or step == num_steps:
        save(step, force=True)
      bar.update(step)
      if stop.flag:
        logging.warning("SIGTERM at step %d: checkpointing and stopping", step)
        if mngr.latest_step() != step:
          save(step, force=True)
        preempted = True
        break
    if not preempted and last_eval != num_steps and step == num_steps:
      run_eval(step)  # resumed at the end, before its evaluation
  finally:
    stop.uninstall()
    mngr.wait_until_finished()
    bar.close()
    tb.flush()
  if preempted:
    mngr.close()
    tb.close()
    return None
  if mngr.latest_step() != num_steps:
    save(num_steps, force=True)
    mngr.wait_until_finished()
  mngr.close()
  tb.close()

  t_end = time.perf_counter()
  timed = step - start - 1  # the first step's time includes compilation
  steps_per_sec = (timed / (t_end - t_first)) if timed > 0 and t_first else None
  final_test = None
  summary = {
      "step": int(step),
      "params_checksum": params_checksum(state.params),
      "tasks": names,
      "test": best["test"],
      "validation": best["validation"],
      "selected_step": best["step"],
      "selection": rule,
      "delta_m": (evaluation.delta_m(best["test"], refs, direction) if refs else None),
      "num_params": num_params,
      "steps_per_sec": steps_per_sec,
      "wall_time_s": t_end - t_start,
      "skipped_steps": skipped_total,
      "num_devices": int(ndev),
      "num_processes": int(pcount),
      "benchmark": bench.name,
      "combiner": config.combiner.name,
      "combiner_hparams": config.combiner.hparams.to_dict(),
      "engine_mode": mode,
      "reduction": config.engine.reduction,
      "layer_gramian": config.engine.layer_gramian,
      "sharing": config.model.sharing,
      "config": config.to_dict(),
  }
  del final_test
  if main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(logging_utils._plain(summary), f, indent=2, sort_keys=True)
    logging.info("done: step %d, checksum %s, test %s, delta_m %s", step,
                 summary["params_checksum"], json.dumps(logging_utils._plain(best["test"])),
                 summary["delta_m"])
  return summary


TIMING_KEYS = ("steps_per_sec", "wall_time_s")
