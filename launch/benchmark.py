"""Benchmarks of the library, as subcommands.

    python launch/benchmark.py --out=/tmp/bench.json          # `step`, the default
    python launch/benchmark.py params --backbone=celeba_cnn --num_tasks=40 --out=params.json

``step`` (default; issue 7): on the CelebA CNN of ``../shared/REFERENCES.md`` (hard sharing, K
one-unit BCE heads; 32x32, batch 16, K=40 by default) the median wall time of one jitted training
step (engine + Adam, after a warm-up, ``block_until_ready``) of every registered combiner in the
engine modes it supports, its ratio to our LS step and to our Jacobian-only step (the K vmapped
VJPs, no combiner), and XLA's compiled memory analysis (peak = temp + argument + output bytes, no
donation); a plain single-loss flax step of the same model; the isolated cost of the Gramian and of
each weighting; Nash-MTL's solve time for K = 2..64 and its ``update_weights_every`` average;
scaling with K and with forced CPU device counts (subprocesses with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``). Prints a table and the bounds of issue 7
with their measured ratios (a verdict only at the default sizes they were set for, ``BOUND_SIZES``); ``--out`` writes ``{rows: [{combiner, mode, step_s, ratio_to_ls,
ratio_to_jacobian, peak_mem_mb, ...}], nash_solve_ms: {K: ms}, references, checks, ...}``.
Weightings that share needs and task-specific rule share one compiled step per mode
(:func:`bench.steps.switch_method`, ``launch/bench/``); the gramian/jacobian-mode rows are timed
``--heavy_repeats`` times (default once) each, the references ``--repeats`` times, interleaved.
The weightings' jacobian mode taps the layers where that is cheaper (``--layer_gramian``,
:mod:`mtl_jax.taps`; ``layer_taps`` lists them); ``--untapped_reference`` also times the exact
Nash-MTL step without taps (``references.nash_mtl_untapped_s``).

``data``: examples/s of the CelebA input pipeline (prepared array_record of fabricated JPEGs;
64x64, batch 256) with 0, 1 and 2 grain workers, against the examples/s one LS training step of
the CelebA-40 protocol model consumes, and their ratios.

``loop``: ``fit``'s steps/s against a bare Python loop over the same jitted step (the trainer's
``build_program``: its ``make_train_step``, loader and sharding) on a synthetic MLP whose step takes
about a millisecond, interleaved; the ratio's bound (>= 0.9, issue 18) applies at the defaults.

``accelerator`` (also ``--preset=accelerator``; issue 18.6): the paper-scale steps on a GPU / TPU
(``launch/bench/accel.py``): the CelebA-40 protocol model (64x64, batch 256, full width) with LS,
Nash-MTL exact and features mode, PCGrad, FAMO, UPGrad, and QM9's MPNN (width 64, batch 120) with
LS and Nash-MTL, through the trainer's own build and step on mock inputs: compile seconds,
steps/s, ratio to LS, XLA and device peak memory; ``--out=DIR`` gets ``accelerator.json`` and
``accelerator.md``; ``--tiny`` the CPU test sizes.

``structure`` (issue 17.2; ``launch/bench/structure.py``): per config (QM9's MPNN and the digits
LeNet by default), the jacobian-mode step against the same step with the per-stage Gramians (the
measuring step of ``structure.method='affinity'``; bound <= 1.10) and with TAG's lookahead affinity
too (no bound), interleaved rounds, ratios.

``solves``: the solve-time section of ``step`` alone, in a minute: Nash-MTL's solve vs K and every
Gramian weighting at K=40 on full-rank and on singular (rank K/2) Gramians with diagonals over
1e0..1e8, with issue 16's 5 ms bounds (applied at ``--solve_k=40`` only).

``params``: the parameter count of every sharing strategy for a backbone and K tasks (one-unit
binary heads, as CelebA's), its ratio to K single-task models, and a JSON file
``{strategy: count, ..., "single_task": count of one single-task model}``. Counts come from
shapes only (``jax.eval_shape``), so even large backbones cost seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence


SUBCOMMANDS: dict[str, tuple[Callable, Callable]] = {}  # name -> (add_arguments, run)


def subcommand(name: str, add_arguments: Callable):
  """Register ``run(args)`` as subcommand ``name`` (other benchmarks add theirs the same way)."""

  def deco(fn):
    SUBCOMMANDS[name] = (add_arguments, fn)
    return fn

  return deco


def _parse_options(items: Sequence[str]) -> dict:
  out = {}
  for item in items or ():
    if "=" not in item:
      raise SystemExit(f"option {item!r} is not KEY=VALUE")
    key, value = item.split("=", 1)
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def param_report(backbone_name: str, num_tasks: int, backbone_options: Optional[dict] = None,
                 strategies: Optional[Sequence[str]] = None,
                 strategy_options: Optional[dict] = None) -> dict:
  """``{strategy: count, ..., 'single_task': count}`` for ``num_tasks`` binary tasks."""
  from mtl_jax import models, sharing, tasks as T

  if int(num_tasks) < 1:
    raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
  backbone = models.get(backbone_name, **(backbone_options or {}))
  if backbone.sample_input is None:
    raise ValueError(f"backbone {backbone_name!r} has no sample_input to count parameters with")
  sample = backbone.sample_input()
  tasks = [T.binary_task(f"task_{k}") for k in range(int(num_tasks))]
  names = list(strategies) if strategies else sharing.names()
  report = {}
  for name in names:
    opts = (strategy_options or {}).get(name, {})
    report[name] = sharing.get(name, backbone, tasks, **opts).param_count(sample)
  report["single_task"] = sharing.get("hard", backbone, tasks[:1]).param_count(sample)
  return report


def format_report(report: dict, num_tasks: int) -> str:
  single = report["single_task"]
  lines = [f"{'strategy':<14}{'parameters':>14}{'/ (K x STL)':>14}{'x STL':>9}"]
  for name, count in sorted(report.items(), key=lambda kv: kv[1]):
    if name == "single_task":
      continue
    lines.append(f"{name:<14}{count:>14,}{count / (num_tasks * single):>14.4f}"
                 f"{count / single:>9.2f}")
  lines.append(f"{'single_task':<14}{single:>14,}   (K x STL = {num_tasks * single:,})")
  return "\n".join(lines)


def _params_args(p: argparse.ArgumentParser):
  p.add_argument("--backbone", default="celeba_cnn")
  p.add_argument("--num_tasks", type=int, default=40)
  p.add_argument("--out", default="", help="write the JSON report here")
  p.add_argument("--strategies", default="", help="comma-separated (default: all)")
  p.add_argument("--backbone_option", action="append", default=[], metavar="KEY=VALUE",
                 help="backbone option, e.g. width=0.5 (repeatable; VALUE is JSON)")


@subcommand("params", _params_args)
def run_params(args) -> dict:
  strategies = [s for s in args.strategies.split(",") if s] or None
  report = param_report(args.backbone, args.num_tasks, _parse_options(args.backbone_option),
                        strategies)
  print(f"{args.backbone}, K = {args.num_tasks} tasks")
  print(format_report(report, args.num_tasks))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1, sort_keys=True)
  return report


# ---------------------------------------------------------------------------------------------
# ``data``: the CelebA input pipeline against the training step (issue 18.2).


def _data_args(p: argparse.ArgumentParser):
  p.add_argument("--workers", default="0,1,2", help="comma-separated grain worker counts")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--num_images", type=int, default=1024, help="fabricated 218x178 JPEGs")
  p.add_argument("--batches", type=int, default=8, help="timed batches per worker count")
  p.add_argument("--steps", type=int, default=3, help="timed training steps")
  p.add_argument("--width", type=int, default=0, help="CNN width (0: the protocol's 64)")
  p.add_argument("--tasks", default="all",
                 help="the step's CelebA attributes, comma-separated (default: all 40)")
  p.add_argument("--out", default="", help="write the JSON report here")


def _fabricated_celeba(root: str, n: int) -> str:
  """``n`` smooth random 218x178 JPEGs and the two list files, prepared as tfds celeb_a."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from mtl_jax.data import celeba, prepare  # pylint: disable=g-import-not-at-top

  src = os.path.join(root, "official")
  os.makedirs(os.path.join(src, "img_align_celeba"))
  rng = np.random.default_rng(0)
  attrs, parts = [f"{n}", " ".join(celeba.ATTRIBUTES)], []
  for i in range(n):
    small = rng.integers(0, 256, (28, 23, 3), np.uint8)  # upsampled: JPEG-typical content
    Image.fromarray(small).resize((178, 218), Image.BILINEAR).save(
        os.path.join(src, "img_align_celeba", f"{i + 1:06d}.jpg"), quality=90)
    attrs.append(f"{i + 1:06d}.jpg " + " ".join(rng.choice(["1", "-1"], 40)))
    parts.append(f"{i + 1:06d}.jpg {0 if i < n - 2 else i - n + 3}")
  with open(os.path.join(src, "list_attr_celeba.txt"), "w") as f:
    f.write("\n".join(attrs) + "\n")
  with open(os.path.join(src, "list_eval_partition.txt"), "w") as f:
    f.write("\n".join(parts) + "\n")
  data_dir = os.path.join(root, "tfds")
  prepare.prepare("celeba", src, data_dir, log=lambda *_: None)
  return data_dir


def _step_rate(config, batch, steps: int) -> float:
  """Training steps per second of ``config``'s jitted step on ``batch`` (the trainer's own
  build, state and step; compile and one warm-up step excluded)."""
  import jax  # pylint: disable=g-import-not-at-top

  from mtl_jax import train  # pylint: disable=g-import-not-at-top

  p = train.build_step(config, 100)  # exactly the trainer's step for this config
  state, step = p.state, p.step_fn
  sharded = train.shard_batch(batch, p.mesh)
  state, m = step(state, sharded)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, sharded)
  jax.block_until_ready(m)
  return steps / (time.perf_counter() - t)


@subcommand("data", _data_args)
def run_data(args) -> dict:
  """Examples/s of the CelebA pipeline (tfds array_record of fabricated JPEGs: read, decode,
  PIL resize, batch) with each worker count, against the examples/s one LS training step of the
  CelebA-40 protocol model consumes; ratio >= 1: the pipeline keeps the step fed."""
  from mtl_jax import data  # pylint: disable=g-import-not-at-top
  from mtl_jax.configs import celeba_base  # pylint: disable=g-import-not-at-top

  bs = args.batch_size
  with tempfile.TemporaryDirectory() as root:
    config = celeba_base.get_base("")
    config.data.data_dir = _fabricated_celeba(root, args.num_images)
    config.data.image_size, config.train.batch_size, config.model.width = (
        args.image_size, bs, args.width)
    config.tasks = args.tasks
    rates = {}
    for w in [int(x) for x in args.workers.split(",")]:
      config.data.workers = w
      loader = data.get_benchmark(config).loader("train", bs, 0, True, 0, 1)
      batch = next(loader)  # worker start-up and the first batch excluded
      t = time.perf_counter()
      for _ in range(args.batches):
        next(loader)
      rates[w] = args.batches * bs / (time.perf_counter() - t)
      loader.close()
    step_rate = _step_rate(config, batch, args.steps) * bs
  report = {"batch_size": bs, "image_size": args.image_size, "tasks": args.tasks,
            "step_examples_per_s": step_rate,
            "pipeline_examples_per_s": rates, "cpu_count": os.cpu_count(),
            "ratio_to_step": {w: r / step_rate for w, r in rates.items()}}
  print(f"CelebA pipeline, {args.image_size}x{args.image_size}, batch {bs} "
        f"({os.cpu_count()} CPUs); one LS step of the protocol model consumes "
        f"{step_rate:.0f} examples/s")
  for w, r in rates.items():
    print(f"  workers={w}: {r:8.0f} examples/s  ratio to the step {r / step_rate:.2f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
  return report


# ---------------------------------------------------------------------------------------------
# ``loop``: the trainer's loop against a bare loop over the same jitted step (issue 18.3).

LOOP_BOUND = 0.9  # fit's steps/s / the bare loop's, at LOOP_SIZES
# The sizes the bound was set for (the defaults below): a synthetic MLP whose step takes about a
# millisecond on the 2-core CPU this was measured on, the step time at which the loop's own
# per-step host work would show.
LOOP_SIZES = {"steps": 2000, "batch_size": 128, "width": 128, "depth": 2, "combiner": "ls"}


def _loop_args(p: argparse.ArgumentParser):
  p.add_argument("--steps", type=int, default=LOOP_SIZES["steps"],
                 help="training steps of each run (the first, compiling one is not timed)")
  p.add_argument("--batch_size", type=int, default=LOOP_SIZES["batch_size"])
  p.add_argument("--width", type=int, default=LOOP_SIZES["width"], help="the MLP's hidden width")
  p.add_argument("--depth", type=int, default=LOOP_SIZES["depth"])
  p.add_argument("--combiner", default=LOOP_SIZES["combiner"])
  p.add_argument("--log_every", type=int, default=20,
                 help="fit's log interval: the steps between its reads of the device's metrics")
  p.add_argument("--repeats", type=int, default=5, help="bare-loop / fit pairs, interleaved")
  p.add_argument("--out", default="", help="write the JSON report here")


def _loop_config(args):
  from mtl_jax.configs import synthetic  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config("")
  config.data.width, config.data.depth = args.width, args.depth
  config.data.num_train = max(4 * args.batch_size, 512)
  config.combiner.name = args.combiner
  t = config.train
  t.batch_size, t.num_steps, t.log_every = args.batch_size, args.steps, args.log_every
  t.eval_every = t.checkpoint_every = args.steps  # once, at the end (untimed by fit)
  return config


def _bare_rate(p, steps: int) -> tuple:
  """Steps/s of a bare Python loop over ``p``'s jitted step and loader (the program has run its
  compiling first step): the next batch, shard it, step; one wait at the end. Returns
  ``(steps/s, state)``."""
  import jax  # pylint: disable=g-import-not-at-top

  from mtl_jax import train  # pylint: disable=g-import-not-at-top
  state = p.state
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = p.step_fn(state, train.shard_batch(next(p.loader), p.mesh))
  jax.block_until_ready((state, metrics))
  return steps / (time.perf_counter() - t), state


@subcommand("loop", _loop_args)
def run_loop(args) -> dict:
  """``fit``'s steps/s (its own count: training steps only, the compiling first one excluded)
  against a bare loop over the same program (:func:`mtl_jax.train.build_program`: the trainer's
  own ``make_train_step``, loader and sharding), on the synthetic MLP; ratio >= 0.9 at
  ``LOOP_SIZES``: the loop's logging, NaN checks and progress cost at most 10%."""
  import jax  # pylint: disable=g-import-not-at-top
  from bench import timing as bt  # pylint: disable=g-import-not-at-top

  from mtl_jax import train  # pylint: disable=g-import-not-at-top
  config = _loop_config(args)
  p = train.build_program(config)
  state, m = p.step_fn(p.state, train.shard_batch(next(p.loader), p.mesh))  # compiles
  jax.block_until_ready(m)
  p = p._replace(state=state)
  fit_rates, bare_rates = [], []
  for _ in range(max(int(args.repeats), 1)):
    rate, state = _bare_rate(p, args.steps - 1)  # as many timed steps as fit's
    bare_rates.append(rate)
    p = p._replace(state=state)
    with tempfile.TemporaryDirectory() as workdir:
      fit_rates.append(train.fit(config, workdir, progress=False)["steps_per_sec"])
  fit_s, bare_s = bt.median(fit_rates), bt.median(bare_rates)
  # The ratio is the median over the adjacent (bare, fit) pairs: each pair shares the machine's
  # load of its few seconds, so a load that drifts between pairs cancels (the ratio of the two
  # medians would mix pairs run under different loads).
  ratio = bt.median([f / b for f, b in zip(fit_rates, bare_rates)])
  checks = []
  _check(checks, "fit steps/s / bare loop steps/s (median of pairs)", ratio, LOOP_BOUND,
         lower_is_better=False)
  at_sizes = all(getattr(args, k) == v for k, v in LOOP_SIZES.items())
  if not at_sizes:
    checks[0]["ok"] = None
  report = {"config": {k: getattr(args, k) for k in (*LOOP_SIZES, "log_every", "repeats")},
            "machine": _machine(), "step_ms": 1e3 / bare_s,
            "fit_steps_per_s": fit_s, "bare_steps_per_s": bare_s, "ratio": ratio,
            "fit_calls": fit_rates, "bare_calls": bare_rates,
            "pair_ratios": [f / b for f, b in zip(fit_rates, bare_rates)], "checks": checks,
            "bounds_applied": at_sizes}
  print(f"synthetic MLP (width {args.width}, depth {args.depth}, batch {args.batch_size}, "
        f"{args.combiner}), {args.steps} steps, log_every {args.log_every}: one step "
        f"{report['step_ms']:.2f} ms; fit {fit_s:.0f} steps/s, bare loop {bare_s:.0f} steps/s")
  print(_format_check(checks[0]))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
  return report


# ---------------------------------------------------------------------------------------------
# ``--preset=accelerator``: the paper-scale steps on a GPU / TPU (issue 18.6).


def _accel_args(p: argparse.ArgumentParser):
  p.add_argument("--out", default="", help="directory for accelerator.json and accelerator.md")
  p.add_argument("--tiny", action="store_true",
                 help="CPU-test sizes (16x16 CelebA, 3 attributes, width 4; QM9 width 8, batch 8)")
  p.add_argument("--steps", type=int, default=50, help="timed steps per row (after a warm-up one)")
  p.add_argument("--row_seconds", type=float, default=20.0,
                 help="time box of a row's timed steps (fewer steps when one would pass it)")
  p.add_argument("--rows", default="", help="only these rows, e.g. celeba:ls,qm9:nash_mtl")
  p.add_argument("--compiler_option", action="append", default=[], metavar="KEY=VALUE",
                 help="XLA option for every row's step, e.g. xla_backend_optimization_level=0 "
                 "(repeatable; VALUE is JSON)")


@subcommand("accelerator", _accel_args)
def run_accelerator(args) -> dict:
  """Every row of :mod:`bench.accel` (CelebA-40 protocol model: LS, Nash-MTL exact, Nash-MTL
  features mode, PCGrad, FAMO, UPGrad; QM9's MPNN: LS, Nash-MTL): steps/s, ratio to LS, peak
  memory, compile time; the JSON report and a Markdown table to ``--out``."""
  import jax  # pylint: disable=g-import-not-at-top
  from bench import accel  # pylint: disable=g-import-not-at-top
  sizes = accel.TINY if args.tiny else accel.FULL
  configs = accel.configs(sizes)
  plan = [("celeba", c, m) for c, m in accel.CELEBA_ROWS] + [("qm9", c, m)
                                                             for c, m in accel.QM9_ROWS]
  wanted = set(_csv(args.rows))
  valid = {f"{b}:{c}" for b, c, _ in plan}
  if wanted - valid:
    raise SystemExit(f"--rows: unknown {', '.join(sorted(wanted - valid))}; valid: "
                     f"{', '.join(sorted(valid))}")
  t0, rows = time.perf_counter(), []
  for bench, combiner, mode in plan:
    if wanted and f"{bench}:{combiner}" not in wanted:
      continue
    row = accel.run_row(configs[bench], combiner, mode, args.steps, args.row_seconds,
                        _parse_options(args.compiler_option))
    rows.append(row)
    print(f"{bench:7s} {combiner:9s} {row['mode']:9s} {row['steps_per_s']:9.2f} steps/s  "
          f"compile {row['compile_s']:6.1f} s  peak {row['peak_memory_mb']:8.0f} MiB", flush=True)
  accel.with_ratios(rows)
  dev = jax.devices()[0]
  device = f"{jax.device_count()} x {dev.device_kind} ({jax.default_backend()})"
  report = {"device": device, "sizes": sizes._asdict(), "tiny": bool(args.tiny), "rows": rows,
            "machine": _machine(), "wall_s": time.perf_counter() - t0,
            "config": {"steps": args.steps, "row_seconds": args.row_seconds}}
  table = accel.markdown(rows, device, sizes, "CPU test sizes, not figures." if args.tiny else None)
  print(table)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "accelerator.json"), "w") as f:
      json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "accelerator.md"), "w") as f:
      f.write(table)
  return report


# ---------------------------------------------------------------------------------------------
# ``structure``: the cost of measuring the sharing structure (issue 17.2; launch/bench/structure.py).

STRUCTURE_CONFIGS = ("configs/nash_qm9.py:quick", "configs/nash_digits.py:quick")


def _structure_args(p: argparse.ArgumentParser):
  p.add_argument("--config", action="append", default=[],
                 help=f"a config file[:variant] (repeatable; default: {', '.join(STRUCTURE_CONFIGS)})")
  p.add_argument("--steps", type=int, default=20, help="timed calls of each step per round")
  p.add_argument("--repeats", type=int, default=5, help="rounds, the three steps interleaved")
  p.add_argument("--out", default="", help="write the JSON report here")


@subcommand("structure", _structure_args)
def run_structure(args) -> dict:
  """Per config: the jacobian-mode step, the same step with the per-stage Gramians (the measuring
  step of structure.method='affinity'/'conflict', bound <= 1.10) and with TAG's lookahead too."""
  from bench import structure  # pylint: disable=g-import-not-at-top

  from mtl_jax import config_utils  # pylint: disable=g-import-not-at-top
  rows = []
  for spec in args.config or STRUCTURE_CONFIGS:
    row = structure.run(config_utils.load_config_file(spec), args.steps, args.repeats)
    rows.append({"config": spec, **row})
  print(structure.format_rows(rows), flush=True)
  report = {"rows": rows, "machine": _machine(), "bound": structure.STAGE_BOUND,
            "config": {"steps": args.steps, "repeats": args.repeats}}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
  return report


# ---------------------------------------------------------------------------------------------
# The step benchmark (the default subcommand).

# Issue 7's bounds, each printed with its measured ratio.
BOUNDS = {
    "gramian_weighting_overhead": 1.05,  # fused jacobian-mode step / Jacobian-only step
    "nash_solve_ms_k40": 2.5,
    "nash_kkt_residual": 1e-3,
    "gramian_solve_ms_k40": 5.0,  # issue 16: every Gramian weighting on ill-conditioned K=40
    "gramian_solve_singular_ms_k40": 5.0,  # the same on singular ones (rank K/2, diag 1e0..1e8)
    "gramian_mode_memory": 1.5,  # gramian-mode peak / LS peak
    "features_mode_time": 1.5,  # features-mode step / LS step
    "nash_exact_step": 1.05,  # Nash-MTL (jacobian mode) / Jacobian-only
    "nash_every_slack": 1.10,  # every-n average / (nash + (n-1) ls) / n
    "ls_overhead": 1.10,  # LS through the engine / plain flax step
}
# The sizes the bounds were set for (the defaults below). At other sizes the figures are printed
# without a verdict (``ok`` None): a tiny model's step is dominated by overheads the bounds ignore.
# The solve bounds (``sized=False``) depend on K=40 only, not on the model.
BOUND_SIZES = {"image_size": 32, "batch": 16, "num_tasks": 40, "width_mult": 1.0, "solve_k": 40}
HEAVY_MODES = ("gramian", "jacobian")
# Estimated compile seconds of a program (2-core CPU, CelebA CNN, K=40), for sharing the programs
# out to the compile workers; "devices" is the forced-device subprocess's two programs.
COMPILE_COST = {"gramian": 28, "jacobian": 20, "features": 19, "losses": 12, "plain": 7,
                "devices": 45}


def _csv(text, cast=str):
  return [cast(x) for x in str(text).split(",") if x.strip()]


def _step_args(p: argparse.ArgumentParser):
  p.add_argument("--out", default="", help="write the JSON report here")
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--num_tasks", type=int, default=40)
  p.add_argument("--width_mult", type=float, default=1.0)
  p.add_argument("--ref_repeats", type=int, default=5,
                 help="timed calls of the reference steps (LS, plain, Jacobian-only, exact "
                 "Nash-MTL), interleaved")
  p.add_argument("--repeats", type=int, default=3,
                 help="timed calls of every step in the cheap modes (losses, features)")
  p.add_argument("--heavy_repeats", type=int, default=1,
                 help="timed calls per combiner in the gramian/jacobian modes (after one warm-up "
                 "per compiled program)")
  p.add_argument("--combiners", default="", help="comma-separated (default: all registered)")
  p.add_argument("--all_modes", action="store_true",
                 help="also time loss-only methods in the gramian/jacobian modes (they then "
                 "compute a Gramian they do not use)")
  p.add_argument("--gramian_chunk", type=int, default=1)
  p.add_argument("--layer_gramian", default="auto", choices=("auto", "all", "off"),
                 help="which layers the weightings' jacobian mode taps (mtl_jax.taps)")
  p.add_argument("--untapped_reference", action="store_true",
                 help="also time the exact Nash-MTL step without layer taps (one more program "
                 "and five more references: ~30 s here)")
  p.add_argument("--update_weights_every", type=int, default=4,
                 help="n of the Nash-MTL update_weights_every measurement (0: skip)")
  p.add_argument("--every_modes", default="jacobian",
                 help="engine modes of the update_weights_every measurement (jacobian,gramian)")
  p.add_argument("--devices", default="1,2",
                 help="forced CPU device counts for the scaling runs (subprocesses)")
  p.add_argument("--step_ks", default="10,20",
                 help="task counts for the step-vs-K scaling of the Jacobian-only step")
  p.add_argument("--nash_ks", default="2,4,8,16,32,40,64")
  p.add_argument("--nash_repeats", type=int, default=20)
  p.add_argument("--solve_k", type=int, default=40,
                 help="K of every Gramian weighting's solve-time row (ill-conditioned Gramians, "
                 "diagonal 1e0..1e8; its 5 ms bound applies at 40 only)")
  p.add_argument("--compile_workers", type=int, default=2,
                 help="processes that compile the programs into JAX's persistent compilation cache "
                 "while this one traces them; this process then loads them from the cache (0: "
                 "compile here, one at a time)")
  p.add_argument("--compile_cache", default="",
                 help="persistent compilation cache directory to use and keep (default: a temporary "
                 "one, removed after the run); a rerun with the same one compiles nothing")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--compiler_option", action="append", default=[], metavar="KEY=VALUE",
                 help="XLA option for every compiled step, e.g. xla_backend_optimization_level=0 "
                 "(repeatable; VALUE is JSON). Not spelled --xla_...: JAX puts every command-line "
                 "argument that starts with --xla into its compilation-cache key")


def _default_modes(method, all_modes: bool):
  from mtl_jax.combiners.base import GRAMIAN, JACOBIAN, LOSSES
  if method.needs == LOSSES:
    return ("losses", "gramian", "jacobian", "features") if all_modes else ("losses", "features")
  if method.needs == GRAMIAN:
    return ("jacobian", "gramian", "features")
  assert method.needs == JACOBIAN
  return ("jacobian",)


def _program_specs(names, args) -> dict:
  """The programs to time, unbuilt: ``{label: dict(make, rows=[(combiner, mode, index)], heavy,
  cost, k)}``; ``make(setup, mesh)`` returns ``(jitted step, initial state)`` for the setup with
  ``k`` tasks. Cheap (no model): the compile workers are planned and started from it.

  Weightings that the engine runs alike (one ``needs`` and ``specific``) share one program per mode
  through :func:`bench.steps.switch_method`: compilation, not running, is most of this
  benchmark's time on a CPU. Each Jacobian aggregator has its own program (its memory is its own).
  LS has its own program (the reference of the loss-based rows and of the plain-step bound);
  the exact Nash-MTL reference is its row in the jacobian-mode switch program.
  """
  from bench import steps as bu, timing as bt
  from mtl_jax import combiners
  k = int(args.num_tasks)
  specs = {}

  def add(label, make, rows=(), heavy=False, cost=COMPILE_COST["losses"], kk=k):
    specs[label] = dict(make=make, rows=list(rows), heavy=heavy, cost=cost, k=kk)

  engine = lambda m, mode, chunk=1, taps=args.layer_gramian: (
      lambda setup, mesh: bu.engine_step(setup, m, mode, mesh, chunk, taps))
  add("plain", lambda setup, mesh: bu.plain_step(setup), cost=COMPILE_COST["plain"])
  add("jacobian_only", lambda setup, mesh: bu.jacobian_step(setup), heavy=True,
      cost=COMPILE_COST["plain"])
  add("ls", engine(combiners.method("ls", k), "losses"), [("ls", "losses", None)])
  if "nash_mtl" in names and args.layer_gramian != "off" and args.untapped_reference:
    add("nash_untapped", engine(combiners.method("nash_mtl", k), "jacobian", taps="off"),
        heavy=True, cost=COMPILE_COST["jacobian"])
  n = int(args.update_weights_every)
  if "nash_mtl" in names and n > 1:
    for mode in _csv(args.every_modes):
      m = combiners.method("nash_mtl", k, update_weights_every=n)
      add(f"nash_every_{mode}", engine(m, mode, args.gramian_chunk), heavy=True,
          cost=COMPILE_COST[mode] + COMPILE_COST["losses"])
  for kk in _csv(args.step_ks, int):  # the Jacobian-only step at other task counts
    if kk != k:
      add(f"scale_k:{kk}", lambda setup, mesh: bu.jacobian_step(setup),
          cost=COMPILE_COST["plain"], kk=kk)
  groups = {}
  for name in names:
    m = combiners.method(name, k)
    for mode in _default_modes(m, args.all_modes):
      if (name, mode) == ("ls", "losses"):
        continue  # its own program above
      if m.is_weighting:
        groups.setdefault((m.needs, m.specific, mode), []).append((name, m))
      else:  # an aggregator: its own program (a shared one would report the union's memory)
        add(f"{name}/{mode}", engine(m, mode), [(name, mode, None)], mode in HEAVY_MODES,
            COMPILE_COST[mode])
  for (needs, specific, mode), members in groups.items():
    sw = bu.switch_method([m for _, m in members])
    add(f"switch:{needs}/{specific}/{mode}", engine(sw, mode, args.gramian_chunk),
        [(n, mode, i) for i, (n, _) in enumerate(members)], mode in HEAVY_MODES,
        COMPILE_COST[mode])
  return specs


def _names(args) -> list:
  from mtl_jax import combiners
  names = _csv(args.combiners) or combiners.names()
  for n in names:
    combiners.method(n, 2)  # unknown names fail here, listing the valid ones
  return names


def _build(args, specs: dict, labels=None):
  """``(setup, mesh, rng, programs)``: the programs of ``specs`` (or of ``labels`` only) built
  alike in every process -- ``{label: spec + dict(step, state, batch)}``."""
  import jax
  from bench import steps as bu, timing as bt
  mesh = bu.mesh_of(1)
  setups = {}

  def setup_for(k):
    if k not in setups:
      setups[k] = bu.make_setup(args.image_size, args.batch, k, args.width_mult, args.seed)
      setups[k].batch = bu.put_batch(setups[k].batch, mesh)
    return setups[k]

  setup = setup_for(int(args.num_tasks))
  progs = {}
  for label, spec in specs.items():
    if labels is None or label in labels:
      sk = setup_for(spec["k"])
      step, state = spec["make"](sk, mesh)
      progs[label] = dict(spec, step=step, state=state, batch=sk.batch)
  return setup, mesh, jax.random.key(args.seed), progs


@contextlib.contextmanager
def _use_cache(cache_dir: str):
  """JAX's persistent compilation cache in ``cache_dir`` for every program compiled inside; the
  previous settings after. JAX decides once per process whether it uses the cache (at its first
  compilation), so the decision is reset on entry and on exit (a test runner has compiled
  before)."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  before = {name: getattr(jax.config, name) for name in names}
  for name, value in zip(names, (cache_dir, 0.0, 0)):
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    for name, value in before.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def _cache_environ(environ: dict, cache_dir: str) -> dict:
  environ = dict(environ)
  environ.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  environ.setdefault("JAX_PLATFORMS", "cpu")
  return environ


def _assign(specs: dict, workers: int, fixed_jobs: Sequence[tuple]) -> list:
  """Longest-processing-time assignment of the programs (by their estimated compile cost) and of
  the indivisible ``fixed_jobs`` (``(cost, job)``) to ``workers`` job lists."""
  slots = [[0.0, [], []] for _ in range(max(int(workers), 1))]  # load, labels, other jobs
  items = [(cost, None, job) for cost, job in fixed_jobs]
  items += [(spec["cost"], label, None) for label, spec in specs.items()]
  for cost, label, job in sorted(items, key=lambda t: -t[0]):
    slot = min(slots, key=lambda sl: sl[0])
    slot[0] += cost
    if label is None:
      slot[2].append(job)
    else:
      slot[1].append(label)
  return [(labels, jobs) for _, labels, jobs in slots if labels or jobs]


def _run_job(cmd, environ) -> str:
  import subprocess
  out = subprocess.run(cmd, env=environ, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    tail = "\n".join(out.stderr.strip().splitlines()[-5:])
    raise RuntimeError(f"compile worker {' '.join(cmd[2:4])} failed (exit {out.returncode}):\n{tail}")
  return out.stdout


def _start_workers(specs, args, cache_dir):
  """Start the compile workers (threads that run worker processes) on ``specs``; returns a
  function that waits for them and returns ``(compile seconds by label, worker setup seconds,
  device-program compile seconds)``."""
  from concurrent.futures import ThreadPoolExecutor
  from bench import malloc
  # Workers run without this process's single-arena malloc (mtl_jax.host_malloc): XLA compiles on
  # a thread pool, and under one arena its threads contend (18 s vs 13 s per step program).
  env = _cache_environ(malloc.untuned_environ(), cache_dir)
  devices = [(COMPILE_COST["devices"], ("devices", nd)) for nd in _csv(args.devices, int)
             if nd > 1]
  plan = _assign(specs, args.compile_workers, devices)
  step_argv = list(args.argv)

  def work(labels, jobs):
    out = {}
    if labels:
      cmd = [sys.executable, os.path.abspath(__file__), "_compile", *step_argv,
             "--labels=" + "|".join(labels)]
      out.update(json.loads(_run_job(cmd, env).strip().splitlines()[-1]))
    for _, nd in jobs:
      cmd, denv = _device_command(nd, args, compile_only=True)
      t = time.perf_counter()
      _run_job(cmd, dict(env, XLA_FLAGS=denv["XLA_FLAGS"]))
      out.setdefault("_devices", {})[str(nd)] = time.perf_counter() - t
    return out

  pool = ThreadPoolExecutor(len(plan))
  futures = [pool.submit(work, labels, jobs) for labels, jobs in plan]

  def wait():
    compiled, builds, devices_s = {}, [], {}
    try:
      for f in futures:
        result = f.result()
        build = result.pop("_build", None)  # None: a worker that compiled device programs only
        if build is not None:
          builds.append(build)
        devices_s.update(result.pop("_devices", {}))
        compiled.update(result)
    finally:
      pool.shutdown(cancel_futures=True)
    return compiled, builds, devices_s

  return wait


def _compile_all(progs, rng, options, wait_for_workers=None):
  """Compile every program: trace each here, then (with workers) wait for them to put the
  executables into the persistent cache and load them from it. Returns the compile report."""
  import jax
  from bench import steps as bu, timing as bt
  t0 = time.perf_counter()
  hits = []
  listener = lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None
  jax.monitoring.register_event_listener(listener)
  try:
    for p in progs.values():  # trace while the workers compile
      p["lowered"] = p["step"].lower(p["state"], p["batch"])
    worker_s, builds, device_s = wait_for_workers() if wait_for_workers else ({}, [], {})
    wait_s = time.perf_counter() - t0
    load_s = {}
    for label, p in progs.items():
      t = time.perf_counter()
      compiled = p.pop("lowered").compile(compiler_options=options or None)
      load_s[label] = time.perf_counter() - t
      p.update(compiled=compiled, memory=bt.memory_mb(compiled),
               compile_s=worker_s.get(label) or load_s[label])
  finally:
    jax.monitoring.unregister_event_listener(listener)
  return {"programs": len(progs), "cache_hits": len(hits), "worker_compile_s": worker_s,
          "worker_setup_s": builds, "devices_compile_s": device_s,
          "trace_and_wait_s": wait_s, "load_s": load_s}


def _select(prog, index):
  """The program's state with the switch index set to ``index`` (None: its own method)."""
  from bench import steps as bu, timing as bt
  state = prog["state"]
  if index is None:
    return state
  return bu.select(state, index)


def _interleaved(fns: dict, repeats: int, calls: Optional[dict] = None) -> dict:
  """Median seconds of each callable, timed round-robin (A/B interleaved) after one warm-up each;
  every call's seconds go to ``calls`` when given."""
  from bench import steps as bu, timing as bt
  for fn in fns.values():
    bt.block(fn())
  times = {name: [] for name in fns}
  for _ in range(max(int(repeats), 1)):
    for name, fn in fns.items():
      times[name] += bt.time_calls(fn, 1, warmup=0)
  if calls is not None:
    calls.update(times)
  return {name: bt.median(t) for name, t in times.items()}


def _check(checks, name, value, bound, lower_is_better=True, note="", sized=True):
  ok = bool(value <= bound) if lower_is_better else bool(value >= bound)
  checks.append({"name": name, "value": float(value), "bound": float(bound), "ok": ok,
                 "note": note, "sized": sized})


def _apply_bounds(checks, args) -> bool:
  """Whether the run is at ``BOUND_SIZES``; if not, the size-dependent checks lose their verdict."""
  at_sizes = all(getattr(args, k) == v for k, v in BOUND_SIZES.items())
  for c in checks:
    if c["sized"] and not at_sizes:
      c["ok"] = None
  return at_sizes


def _format_check(c) -> str:
  verdict = {True: "ok", False: "FAIL", None: "--"}[c["ok"]]
  return (f"  [{verdict}] {c['name']}: {c['value']:.4g} (bound {c['bound']:.4g}"
          f"{'' if c['ok'] is not None else ', not applied'}){' ' + c['note'] if c['note'] else ''}")


def step_benchmark(args) -> dict:
  from bench import solves as nash_module  # pylint: disable=g-import-not-at-top

  t_start = time.perf_counter()
  load_before = os.getloadavg()
  cache_dir = args.compile_cache or (
      tempfile.mkdtemp(prefix="mtl_jax_bench_cache_") if int(args.compile_workers) > 0 else "")
  try:
    with _use_cache(cache_dir) if cache_dir else contextlib.nullcontext():
      return _step_benchmark(args, cache_dir, load_before, t_start, nash_module)
  finally:
    if cache_dir and not args.compile_cache:
      shutil.rmtree(cache_dir, ignore_errors=True)


def _step_benchmark(args, cache_dir, load_before, t_start, nash_module):
  names = _names(args)
  specs = _program_specs(names, args)
  workers = int(args.compile_workers)
  print(f"compiling {len(specs)} programs "
        + (f"in {workers} worker processes ..." if workers else "here ..."), flush=True)
  # The workers start first: this process builds the model and traces meanwhile.
  wait = _start_workers(specs, args, cache_dir) if workers else None
  setup, _, rng, progs = _build(args, specs)
  compile_report = _compile_all(progs, rng, _parse_options(args.compiler_option), wait)
  compile_s = time.perf_counter() - t_start
  compile_report["workers"] = workers
  return _measure(args, setup, names, rng, progs, cache_dir, compile_report, compile_s,
                  load_before, t_start, nash_module)


class _Timing:
  """What the step benchmark's measuring sections share: the compiled programs and the inputs,
  then the figures each section adds (the references first: every later section divides by them).
  (A plain class: a dataclass needs its module in ``sys.modules``, and a test loads this file
  by path.)"""

  def __init__(self, args, setup, names, progs, cache_dir, nash_module):
    self.args, self.setup, self.names, self.progs = args, setup, names, progs
    self.cache_dir, self.nash_module = cache_dir, nash_module
    self.phases, self.mark = {}, time.perf_counter()
    self.nash_at = None  # (program label, switch index) of exact Nash-MTL, jacobian mode
    self.ref_s, self.ref_calls = {}, {}  # median seconds of each reference; every call's
    self.rows = []
    self.gramian_ms = self.combine_ms = float("nan")
    self.weigh, self.nash_every, self.solve, self.gramian_solve = {}, {}, {}, {}
    self.gramian_solve_singular = {}
    self.scaling_k, self.scaling_devices = {}, {}

  @property
  def ls_s(self) -> float:
    return self.ref_s["ls"]

  @property
  def jac_s(self) -> float:
    return self.ref_s["jacobian_only"]

  @property
  def mem_ls(self) -> float:
    return self.progs["ls"]["memory"].get("peak", float("nan"))

  def run(self, label, state=None):
    """A call of program ``label`` on its batch (and its own state unless ``state``)."""
    p = self.progs[label]
    return lambda: p["compiled"](state or p["state"], p["batch"])

  def phase(self, name):  # seconds since the previous phase ended
    now = time.perf_counter()
    self.phases[name] = now - self.mark
    self.mark = now

  def add_row(self, combiner, mode, step_s, label, repeats, jac_ref_s=None, faults=None):
    mem = self.progs[label]["memory"]
    ref = jac_ref_s or self.jac_s
    self.rows.append({
        "combiner": combiner, "mode": mode, "step_s": step_s, "ratio_to_ls": step_s / self.ls_s,
        "ratio_to_jacobian": step_s / ref, "jacobian_ref_s": ref,
        "peak_mem_mb": mem.get("peak", float("nan")), "memory_mb": mem, "program": label,
        "repeats": repeats, "compile_s": self.progs[label]["compile_s"], "minor_faults": faults})


def _measure(args, setup, names, rng, progs, cache_dir, compile_report, compile_s, load_before,
             t_start, nash_module):
  """The measuring sections in order, then the report (printed, and written to ``--out``)."""
  del rng
  t = _Timing(args, setup, names, progs, cache_dir, nash_module)
  _time_references(t)
  t.phase("references")
  _time_rows(t)
  t.phase("rows")
  _isolated_costs(t)
  t.phase("isolated weighting costs")
  _time_nash_every(t)
  t.phase("update_weights_every")
  t.solve = nash_module.nash_solve_timing(_csv(args.nash_ks, int), repeats=args.nash_repeats)
  t.gramian_solve = nash_module.gramian_solve_timing(names, k=args.solve_k)
  t.gramian_solve_singular = nash_module.gramian_solve_timing(names, k=args.solve_k,
                                                              rank=_singular_rank(args.solve_k))
  t.phase("Nash-MTL solve")
  _time_scaling(t)
  t.phase("scaling")
  checks = _step_checks(t)
  bounds_applied = _apply_bounds(checks, args)
  report = _step_report(t, checks, bounds_applied, compile_report, compile_s, load_before,
                        t_start)
  report["machine"]["load_after"] = os.getloadavg()
  print(format_step_report(report))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
  return report


def _time_references(t: _Timing) -> None:
  """References, interleaved: plain flax, LS, Jacobian-only, exact Nash-MTL (jacobian mode); LS
  and Nash-MTL are rows too."""
  progs = t.progs
  ref_fns = {label: t.run(label) for label in ("plain", "ls", "jacobian_only")}
  t.nash_at = next(((label, index) for label, p in progs.items() for c, mode, index in p["rows"]
                    if (c, mode) == ("nash_mtl", "jacobian")), None)
  if t.nash_at is not None:
    label, index = t.nash_at
    ref_fns["nash_mtl"] = t.run(label, _select(progs[label], index))
  if "nash_untapped" in progs:
    ref_fns["nash_untapped"] = t.run("nash_untapped")
  t.ref_s = _interleaved(ref_fns, t.args.ref_repeats, t.ref_calls)
  t.add_row("ls", "losses", t.ls_s, "ls", t.args.ref_repeats)
  if t.nash_at is not None:
    t.add_row("nash_mtl", "jacobian", t.ref_s["nash_mtl"], t.nash_at[0], t.args.ref_repeats)


def _time_rows(t: _Timing) -> None:
  """Every other (combiner, mode) row, program by program."""
  for label, p in t.progs.items():
    if label in ("plain", "jacobian_only", "ls", "nash_untapped") or label.startswith(
        ("nash_every", "scale_k:")):
      continue
    _time_program(t, label, p)


def _time_program(t: _Timing, label: str, p: dict) -> None:
  from bench import timing as bt
  reps = t.args.heavy_repeats if p["heavy"] else t.args.repeats
  warmed = t.nash_at is not None and label == t.nash_at[0]  # the references ran it already
  # The rows that carry the 5% bound (Gramian weightings, jacobian mode) are divided by the
  # median of Jacobian-only calls timed between them, one after every four rows: the machine's
  # speed drifts over a run, and single calls vary by ~2%, both near the bound. Other heavy rows
  # are divided by the interleaved reference.
  bound = label.startswith("switch:") and label.endswith("/jacobian")
  ref_times = []
  time_ref = lambda: ref_times.extend(bt.time_calls(t.run("jacobian_only"), 1, warmup=0))
  pending = []
  timed = [r for r in p["rows"] if (r[0], r[1]) != ("nash_mtl", "jacobian")]  # Nash: above
  if bound and timed:
    time_ref()
  for i, (combiner, mode, index) in enumerate(timed):
    state = _select(p, index)
    if not warmed:
      bt.block(t.run(label, state)())
    f0 = bt.minor_faults()
    times = bt.time_calls(t.run(label, state), reps, warmup=0)
    faults = (bt.minor_faults() - f0) // max(int(reps), 1)
    warmed = True
    pending.append((combiner, mode, bt.median(times), faults))
    if bound and (i % 4 == 3 or i == len(timed) - 1):
      time_ref()
  jac_ref = bt.median(ref_times) if ref_times else None
  for combiner, mode, step_s, faults in pending:
    t.add_row(combiner, mode, step_s, label, reps, jac_ref, faults)
    print(f"  {combiner:<12} {mode:<9} {step_s:8.3f} s"
          + (f"  / Jacobian-only {t.rows[-1]['ratio_to_jacobian']:.3f}" if jac_ref else ""),
          flush=True)


def _isolated_costs(t: _Timing) -> None:
  """The weighting's own cost, isolated: Gramian of the held Jacobian, weigh, weighted sum -- on
  the task-minor Jacobian, the layout the engine's jacobian mode holds for untapped leaves."""
  import jax
  import jax.numpy as jnp
  from bench import timing as bt
  from mtl_jax import combiners
  setup, k, repeats = t.setup, t.setup.num_tasks, t.args.repeats
  jac, losses = t.run("jacobian_only")()
  jac = jax.jit(lambda j: jax.tree.map(lambda x: jnp.moveaxis(x, 0, -1), j))(jac)
  gram_fn = jax.jit(lambda j: combiners.base.gramian_of(j, setup.mask, task_axis=-1))
  gram = gram_fn(jac)
  t.gramian_ms = 1e3 * bt.median(bt.time_calls(lambda: gram_fn(jac), repeats))
  ls_method = combiners.method("ls", k)
  sum_fn = jax.jit(lambda w, j: combiners.base.combine_jacobian(ls_method, w, j, setup.mask,
                                                                task_axis=-1))
  t.combine_ms = 1e3 * bt.median(bt.time_calls(lambda: sum_fn(jnp.ones((k,)), jac), repeats))
  del jac
  for n in t.names:
    m = combiners.method(n, k)
    if m.is_weighting and m.needs == combiners.base.GRAMIAN:
      t.weigh[n] = t.nash_module.weigh_ms(m, setup.params, gram, losses)
  for row in t.rows:
    if row["combiner"] in t.weigh:
      row["weigh_ms"] = t.weigh[row["combiner"]]


def _time_nash_every(t: _Timing) -> None:
  """Nash-MTL with update_weights_every = n: the average over 2n consecutive steps."""
  from bench import timing as bt
  n = int(t.args.update_weights_every)
  for mode in HEAVY_MODES:
    label = f"nash_every_{mode}"
    if label not in t.progs:
      continue
    p = t.progs[label]
    # One warm-up cycle (a fresh and n-1 reusing steps: both branches run once), then 2n steps.
    _, warm = bt.time_threaded(p["compiled"], p["state"], p["batch"], n)
    times, _ = bt.time_threaded(p["compiled"], warm, p["batch"], 2 * n)
    t.nash_every[mode] = {"n": n, "mean_step_s": float(sum(times) / len(times)),
                          "fresh_step_s": float(max(times)), "reuse_step_s": bt.median(times),
                          "peak_mem_mb": p["memory"].get("peak", float("nan"))}


def _time_scaling(t: _Timing) -> None:
  """Scaling with K (programs compiled with the others) and with the device count (subprocesses,
  their programs in the compile cache)."""
  args = t.args
  t.scaling_k = {str(t.setup.num_tasks): {"jacobian_s": t.jac_s}}
  for label in t.progs:
    if label.startswith("scale_k:"):
      t.scaling_k[label.split(":")[1]] = _interleaved({"jacobian_s": t.run(label)},
                                                       max(args.repeats // 2, 1))
  for nd in _csv(args.devices, int):
    if nd == 1:
      t.scaling_devices["1"] = {"ls_s": t.ls_s, "nash_mtl_s": t.ref_s.get("nash_mtl")}
      continue
    t.scaling_devices[str(nd)] = _device_subprocess(nd, args, t.cache_dir)


def _singular_rank(k: int) -> int:
  """Rank of the singular solve row's Gramians: K/2 (the slowest rank for the dual-cone
  projection of UPGrad / DualProj measured over K/8..K-1 at K=40)."""
  return max(1, int(k) // 2)


def _gramian_solve_checks(checks, k, full, singular):
  """Issue 16's solve bound on every Gramian weighting, full-rank and singular (sized: at K=40)."""
  for c, ms in full.items():
    _check(checks, f"{c}: weighting at K={k}, ill-conditioned Gramian (ms)", ms,
           BOUNDS["gramian_solve_ms_k40"])
  for c, ms in singular.items():
    _check(checks, f"{c}: weighting at K={k}, singular Gramian, rank {_singular_rank(k)} (ms)",
           ms, BOUNDS["gramian_solve_singular_ms_k40"])


def _gramian_solve_report(k, full, singular) -> dict:
  return {"k": k, "ms": full, "singular_rank": _singular_rank(k), "singular_ms": singular}


def _gramian_solve_lines(gs) -> list:
  order = lambda d: sorted(d.items(), key=lambda kv: -kv[1])
  return [f"Gramian weightings at K={gs['k']}, diagonal 1e0..1e8 (ms): "
          + ", ".join(f"{c} {v:.2f}" for c, v in order(gs["ms"])),
          f"Gramian weightings at K={gs['k']}, singular (rank {gs['singular_rank']}), diagonal "
          "1e0..1e8 (ms): " + ", ".join(f"{c} {v:.2f}" for c, v in order(gs["singular_ms"]))]


def _step_checks(t: _Timing) -> list:
  """Issue 7's bounds (and issue 16's solve bound), each with its measured value."""
  checks, ref_s, jac_s, ls_s = [], t.ref_s, t.jac_s, t.ls_s
  by = {(r["combiner"], r["mode"]): r for r in t.rows}
  for (c, mode), r in sorted(by.items()):
    if c in t.weigh and mode == "jacobian":
      parts = t.gramian_ms + t.weigh[c] + t.combine_ms
      _check(checks, f"{c}: jacobian-mode step / Jacobian-only", r["ratio_to_jacobian"],
             BOUNDS["gramian_weighting_overhead"],
             note=f"isolated: Gramian {t.gramian_ms:.1f} ms + weigh {t.weigh[c]:.2f} ms + sum "
             f"{t.combine_ms:.1f} ms = {parts / (1e3 * jac_s):.2%}")
  s40 = t.solve.get(40)
  if s40 is not None:
    _check(checks, "Nash-MTL solve at K=40 (ms)", s40["median_ms"], BOUNDS["nash_solve_ms_k40"],
           sized=False)
    _check(checks, "Nash-MTL solve K=40 relative KKT residual", s40["kkt_residual"],
           BOUNDS["nash_kkt_residual"], sized=False)
  _gramian_solve_checks(checks, t.args.solve_k, t.gramian_solve, t.gramian_solve_singular)
  gram_rows = [r for r in t.rows if r["mode"] == "gramian"]
  if gram_rows:
    worst = max(r["peak_mem_mb"] for r in gram_rows)
    _check(checks, "gramian-mode peak memory / LS peak", worst / t.mem_ls,
           BOUNDS["gramian_mode_memory"], note=f"{worst:.0f} MiB vs {t.mem_ls:.0f} MiB")
  for r in t.rows:
    if r["mode"] == "features":
      _check(checks, f"{r['combiner']}: features-mode step / LS", r["ratio_to_ls"],
             BOUNDS["features_mode_time"])
  if "nash_mtl" in ref_s:
    _check(checks, "Nash-MTL exact step / Jacobian-only", ref_s["nash_mtl"] / jac_s,
           BOUNDS["nash_exact_step"])
  for mode, e in t.nash_every.items():
    full = ref_s.get("nash_mtl", jac_s) if mode == "jacobian" else by.get(
        ("nash_mtl", "gramian"), {}).get("step_s", e["fresh_step_s"])
    expected = (full + (e["n"] - 1) * ls_s) / e["n"]
    e["expected_s"] = expected
    _check(checks, f"Nash-MTL update_weights_every={e['n']} ({mode}) mean step / "
           "((full + (n-1) LS) / n)", e["mean_step_s"] / expected, BOUNDS["nash_every_slack"],
           note=f"mean {e['mean_step_s']:.3f} s vs full {full:.3f} s")
  _check(checks, "LS through the engine / plain flax step", ls_s / ref_s["plain"],
         BOUNDS["ls_overhead"])
  return checks


def _step_report(t: _Timing, checks, bounds_applied, compile_report, compile_s, load_before,
                 t_start) -> dict:
  from bench import steps as bu
  args, progs, ref_s = t.args, t.progs, t.ref_s
  return {
      "config": {key: getattr(args, key) for key in (
          "image_size", "batch", "num_tasks", "width_mult", "ref_repeats", "repeats",
          "heavy_repeats",
          "gramian_chunk", "layer_gramian", "update_weights_every", "seed",
          "compiler_option")},
      "machine": dict(_machine(), load_before=load_before),
      "num_params": bu.num_params(t.setup.params),
      "rows": t.rows,
      "references": {"calls_s": t.ref_calls, "plain_s": ref_s["plain"], "ls_s": t.ls_s,
                     "jacobian_s": t.jac_s,
                     "nash_mtl_s": ref_s.get("nash_mtl"),
                     "nash_mtl_untapped_s": ref_s.get("nash_untapped"),
                     "nash_mtl_untapped_peak_mem_mb": progs.get("nash_untapped", {}).get(
                         "memory", {}).get("peak"),
                     "gramian_ms": t.gramian_ms,
                     "weighted_sum_ms": t.combine_ms,
                     "plain_peak_mem_mb": progs["plain"]["memory"].get("peak"),
                     "ls_peak_mem_mb": t.mem_ls,
                     "jacobian_peak_mem_mb": progs["jacobian_only"]["memory"].get("peak")},
      "layer_taps": _layer_taps(t.setup, args),
      "weigh_ms": t.weigh,
      "nash_solve_ms": {str(kk): v["median_ms"] for kk, v in t.solve.items()},
      "nash_solve": {str(kk): v for kk, v in t.solve.items()},
      "gramian_solve_ms": _gramian_solve_report(args.solve_k, t.gramian_solve,
                                                t.gramian_solve_singular),
      "nash_update_weights_every": t.nash_every,
      "scaling_k": t.scaling_k,
      "scaling_devices": t.scaling_devices,
      "checks": checks,
      "bounds_applied": bounds_applied,
      "compile": compile_report,
      "phases_s": t.phases,
      "compile_s": compile_s,
      "total_s": time.perf_counter() - t_start,
  }


def _layer_taps(setup, args) -> list:
  """The layers the weightings' jacobian mode taps here, with the cost model's multiply-adds."""
  import jax
  from mtl_jax import taps
  if args.layer_gramian == "off":
    return []
  plan = taps.plan(setup.loss_fn, setup.params, (setup.batch_stats, setup.batch,
                                                 jax.random.key(0)),
                   setup.mask, setup.num_tasks, select=args.layer_gramian)
  out = []
  for s in (plan.sites if plan else ()):
    tapped, rows = taps.site_costs(s, setup.num_tasks)
    out.append({"kind": s.kind, "kernel": list(s.w_shape), "output": list(s.y_shape),
                "tapped_madds": tapped, "rows_madds": rows})
  return out


def _machine() -> dict:
  import platform
  import jax
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
          "devices": len(jax.devices()), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def _device_command(num_devices: int, args, compile_only: bool = False):
  """The ``_devices`` subprocess's command line and environment (``num_devices`` forced CPUs)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={int(num_devices)}").strip()
  env.setdefault("JAX_PLATFORMS", "cpu")
  cmd = [sys.executable, os.path.abspath(__file__), "_devices", f"--num_devices={num_devices}",
         f"--image_size={args.image_size}", f"--batch={args.batch}",
         f"--num_tasks={args.num_tasks}", f"--width_mult={args.width_mult}",
         f"--repeats={max(args.repeats // 2, 1)}", f"--seed={args.seed}"]
  return cmd + (["--compile_only"] if compile_only else []), env


def _device_subprocess(num_devices: int, args, cache_dir: str = "") -> dict:
  """LS and exact Nash-MTL steps on ``num_devices`` forced CPU devices (a fresh process)."""
  import subprocess
  cmd, env = _device_command(num_devices, args)
  if cache_dir:
    env = _cache_environ(env, cache_dir)
  t0 = time.perf_counter()
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
  return dict(json.loads(out.stdout.strip().splitlines()[-1]), wall_s=time.perf_counter() - t0)


def _devices_args(p: argparse.ArgumentParser):
  p.add_argument("--num_devices", type=int, required=True)
  for name, default in (("image_size", 32), ("batch", 16), ("num_tasks", 40), ("repeats", 2),
                        ("seed", 0)):
    p.add_argument(f"--{name}", type=int, default=default)
  p.add_argument("--width_mult", type=float, default=1.0)
  p.add_argument("--compile_only", action="store_true",
                 help="compile the two programs (into the persistent cache) and time nothing")


@subcommand("_devices", _devices_args)
def run_devices(args) -> dict:
  """(internal) One line of JSON: LS and Nash-MTL step seconds on ``--num_devices`` devices."""
  import jax
  from bench import steps as bu, timing as bt
  from mtl_jax import combiners
  setup = bu.make_setup(args.image_size, args.batch, args.num_tasks, args.width_mult, args.seed)
  mesh = bu.mesh_of(args.num_devices)
  setup.batch = bu.put_batch(setup.batch, mesh)
  rng = jax.random.key(args.seed)
  fns, t0 = {}, time.perf_counter()
  for label, (name, mode) in {"ls_s": ("ls", "losses"), "nash_mtl_s": ("nash_mtl", "jacobian")}.items():
    step, state = bu.engine_step(setup, combiners.method(name, setup.num_tasks), mode, mesh)
    compiled, _ = bt.compile_step(step, state, setup.batch)
    fns[label] = (lambda c=compiled, s=state: c(s, setup.batch))
  compile_s = time.perf_counter() - t0
  result = {} if args.compile_only else dict(_interleaved(fns, args.repeats), compile_s=compile_s)
  print(json.dumps(result))
  return result


def _compile_args(p: argparse.ArgumentParser):
  _step_args(p)
  p.add_argument("--labels", required=True, help="'|'-separated program labels to compile")


@subcommand("_compile", _compile_args)
def run_compile(args) -> dict:
  """(internal) Compile some of the step benchmark's programs into the persistent cache (the
  parent sets ``JAX_COMPILATION_CACHE_DIR``); prints one line of JSON, label -> seconds."""
  from bench import steps as bu, timing as bt
  t0 = time.perf_counter()
  specs = _program_specs(_names(args), args)
  labels = args.labels.split("|")
  unknown = sorted(set(labels) - set(specs))
  if unknown:
    raise SystemExit(f"_compile: no program {unknown}; valid: {sorted(specs)}")
  _, _, rng, progs = _build(args, specs, labels)
  options = _parse_options(args.compiler_option)
  out = {"_build": time.perf_counter() - t0}
  for label in labels:
    p = progs[label]
    _, out[label] = bt.compile_step(p["step"], p["state"], p["batch"], options)
  print(json.dumps(out))
  return out


def format_step_report(report: dict) -> str:
  ref = report["references"]
  lines = [
      f"CelebA CNN, {report['config']['image_size']}x{report['config']['image_size']}, batch "
      f"{report['config']['batch']}, K={report['config']['num_tasks']}, "
      f"{report['num_params']:,} params; {report['machine']['cpu_count']} CPUs, load "
      f"{report['machine']['load_before'][0]:.1f} -> {report['machine']['load_after'][0]:.1f}",
      f"plain flax step {ref['plain_s']:.3f} s | LS {ref['ls_s']:.3f} s | Jacobian-only "
      f"{ref['jacobian_s']:.3f} s | Gramian of it {ref['gramian_ms']:.1f} ms",
      f"{'combiner':<12}{'mode':<10}{'step s':>9}{'/ LS':>8}{'/ Jac':>8}{'peak MiB':>10}"
      f"{'weigh ms':>10}"]
  if ref.get("nash_mtl_untapped_s") and ref.get("nash_mtl_s"):
    lines.insert(2, f"layer taps ({report['config']['layer_gramian']}): "
                 f"{len(report['layer_taps'])} layers; exact Nash-MTL {ref['nash_mtl_s']:.3f} s "
                 f"({ref['nash_mtl_s'] / ref['jacobian_s']:.3f}x Jacobian-only), without taps "
                 f"{ref['nash_mtl_untapped_s']:.3f} s "
                 f"({ref['nash_mtl_untapped_s'] / ref['jacobian_s']:.3f}x, peak "
                 f"{ref['nash_mtl_untapped_peak_mem_mb']:.0f} MiB)")
  for r in sorted(report["rows"], key=lambda r: (r["combiner"], r["mode"])):
    w = f"{r['weigh_ms']:10.2f}" if "weigh_ms" in r else f"{'':>10}"
    lines.append(f"{r['combiner']:<12}{r['mode']:<10}{r['step_s']:9.3f}{r['ratio_to_ls']:8.2f}"
                 f"{r['ratio_to_jacobian']:8.3f}{r['peak_mem_mb']:10.0f}{w}")
  lines.append("Nash-MTL solve (ms): " + ", ".join(
      f"K={kk}: {v:.2f}" for kk, v in report["nash_solve_ms"].items()))
  lines.extend(_gramian_solve_lines(report["gramian_solve_ms"]))
  for mode, e in report["nash_update_weights_every"].items():
    lines.append(f"Nash-MTL update_weights_every={e['n']} ({mode}): mean {e['mean_step_s']:.3f} s/step"
                 f" (fresh {e['fresh_step_s']:.3f} s, reuse {e['reuse_step_s']:.3f} s)")
  lines.append("Jacobian-only step vs K: " + ", ".join(
      f"K={kk}: {v['jacobian_s']:.3f} s"
      for kk, v in report["scaling_k"].items()))
  lines.append("step vs devices: " + ", ".join(f"{nd}: {v}" for nd, v in
                                               report["scaling_devices"].items()))
  sizes = ", ".join(f"{k}={v}" for k, v in BOUND_SIZES.items())
  lines.append("checks:" if report.get("bounds_applied", True) else
               f"checks (the bounds were set for {sizes}; at these sizes only the size-free ones "
               "get a verdict):")
  lines.extend(_format_check(c) for c in report["checks"])
  c = report["compile"]
  lines.append("measuring: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["phases_s"].items()))
  lines.append(f"compile {report['compile_s']:.0f} s ({c['programs']} programs, {c['workers']} "
               f"worker processes, {c['cache_hits']} loaded from the cache), total "
               f"{report['total_s']:.0f} s")
  return "\n".join(lines)


def _solves_args(p: argparse.ArgumentParser):
  p.add_argument("--out", default="", help="write the JSON report here")
  p.add_argument("--combiners", default="", help="comma-separated (default: every Gramian one)")
  p.add_argument("--solve_k", type=int, default=40,
                 help="K of the Gramian weightings' rows (the 5 ms bounds apply at 40 only)")
  p.add_argument("--repeats", type=int, default=10, help="Gramians per row (median reported)")
  p.add_argument("--nash_ks", default="2,4,8,16,32,40,64")
  p.add_argument("--nash_repeats", type=int, default=20)


@subcommand("solves", _solves_args)
def run_solves(args) -> dict:
  """The step benchmark's solve-time section alone (no model, no compile workers): Nash-MTL's
  solve vs K, every Gramian weighting at K=``solve_k`` on full-rank and singular (rank K/2)
  Gramians with diagonals over 1e0..1e8, and issue 16's bounds."""
  from bench import solves  # pylint: disable=g-import-not-at-top
  load_before, t0 = os.getloadavg(), time.perf_counter()
  names, k = _csv(args.combiners), int(args.solve_k)
  nash = solves.nash_solve_timing(_csv(args.nash_ks, int), repeats=args.nash_repeats)
  full = solves.gramian_solve_timing(names, k=k, repeats=args.repeats)
  singular = solves.gramian_solve_timing(names, k=k, repeats=args.repeats,
                                         rank=_singular_rank(k))
  checks = []
  if 40 in nash:
    _check(checks, "Nash-MTL solve at K=40 (ms)", nash[40]["median_ms"],
           BOUNDS["nash_solve_ms_k40"], sized=False)
  _gramian_solve_checks(checks, k, full, singular)
  for c in checks:
    if c["sized"] and k != BOUND_SIZES["solve_k"]:
      c["ok"] = None
  report = {"machine": dict(_machine(), load_before=load_before, load_after=os.getloadavg()),
            "nash_solve": {str(kk): v for kk, v in nash.items()},
            "gramian_solve_ms": _gramian_solve_report(k, full, singular), "checks": checks,
            "total_s": time.perf_counter() - t0}
  lines = ["Nash-MTL solve (ms): " + ", ".join(
      f"K={kk}: {v['median_ms']:.2f}" for kk, v in nash.items())]
  lines += _gramian_solve_lines(report["gramian_solve_ms"])
  lines += ["checks:"] + [_format_check(c) for c in checks]
  lines.append(f"load {load_before[0]:.1f} -> {report['machine']['load_after'][0]:.1f}, "
               f"{report['total_s']:.0f} s")
  print("\n".join(lines))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
  return report


@subcommand("step", _step_args)
def run_step(args) -> dict:
  return step_benchmark(args)


DEFAULT_SUBCOMMAND = "step"


def _preset(argv: list) -> list:
  """``--preset=accelerator [...]`` is the ``accelerator`` subcommand (the only preset)."""
  presets = [a for a in argv if a.startswith("--preset")]
  if not presets:
    return argv
  name = presets[0].split("=", 1)[1] if "=" in presets[0] else ""
  if name != "accelerator":
    raise SystemExit(f"--preset={name}: unknown preset; valid: accelerator")
  return ["accelerator"] + [a for a in argv if a not in presets]


def main(argv: Optional[Sequence[str]] = None):
  argv = _preset(list(sys.argv[1:] if argv is None else argv))
  if not argv or (argv[0] not in SUBCOMMANDS and argv[0].startswith("-")
                  and argv[0] not in ("-h", "--help")):
    argv.insert(0, DEFAULT_SUBCOMMAND)  # `benchmark.py --out=x.json` runs the step benchmark
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (add_arguments, _) in SUBCOMMANDS.items():
    add_arguments(sub.add_parser(name))
  args = parser.parse_args(argv)
  args.argv = argv[1:]  # the subcommand's own arguments (the compile workers get them too)
  return SUBCOMMANDS[args.command][1](args)


if __name__ == "__main__":
  if _preset(sys.argv[1:])[:1] != ["accelerator"]:  # the accelerator preset runs on the device
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from mtl_jax import host_malloc  # pylint: disable=g-import-not-at-top
    host_malloc.reexec_if_useful()  # glibc tunables for XLA-CPU steps (MTL_JAX_MALLOC=0: off)
  main()
