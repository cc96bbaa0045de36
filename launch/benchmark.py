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
with their measured ratios; ``--out`` writes ``{rows: [{combiner, mode, step_s, ratio_to_ls,
ratio_to_jacobian, peak_mem_mb, ...}], nash_solve_ms: {K: ms}, references, checks, ...}``.
Weightings that share needs and task-specific rule share one compiled step per mode
(:func:`mtl_jax.bench_utils.switch_method`); the gramian/jacobian-mode rows are timed
``--heavy_repeats`` times (default once) each, the references ``--repeats`` times, interleaved.

``params``: the parameter count of every sharing strategy for a backbone and K tasks (one-unit
binary heads, as CelebA's), its ratio to K single-task models, and a JSON file
``{strategy: count, ..., "single_task": count of one single-task model}``. Counts come from
shapes only (``jax.eval_shape``), so even large backbones cost seconds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
# The step benchmark (the default subcommand).

# Issue 7's bounds, each printed with its measured ratio.
BOUNDS = {
    "gramian_weighting_overhead": 1.05,  # fused jacobian-mode step / Jacobian-only step
    "nash_solve_ms_k40": 2.5,
    "nash_kkt_residual": 1e-3,
    "gramian_mode_memory": 1.5,  # gramian-mode peak / LS peak
    "features_mode_time": 1.5,  # features-mode step / LS step
    "nash_exact_step": 1.05,  # Nash-MTL (jacobian mode) / Jacobian-only
    "nash_every_slack": 1.10,  # every-n average / (nash + (n-1) ls) / n
    "ls_overhead": 1.10,  # LS through the engine / plain flax step
}
HEAVY_MODES = ("gramian", "jacobian")


def _csv(text, cast=str):
  return [cast(x) for x in str(text).split(",") if x.strip()]


def _step_args(p: argparse.ArgumentParser):
  p.add_argument("--out", default="", help="write the JSON report here")
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--num_tasks", type=int, default=40)
  p.add_argument("--width_mult", type=float, default=1.0)
  p.add_argument("--repeats", type=int, default=5,
                 help="timed calls of the reference steps (LS, plain, Jacobian-only, Nash-MTL) and "
                 "of every step in the cheap modes (losses, features)")
  p.add_argument("--heavy_repeats", type=int, default=1,
                 help="timed calls per combiner in the gramian/jacobian modes (after one warm-up "
                 "per compiled program)")
  p.add_argument("--combiners", default="", help="comma-separated (default: all registered)")
  p.add_argument("--all_modes", action="store_true",
                 help="also time loss-only methods in the gramian/jacobian modes (they then "
                 "compute a Gramian they do not use)")
  p.add_argument("--gramian_chunk", type=int, default=1)
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
  p.add_argument("--compile_threads", type=int, default=0,
                 help="programs compiled at once (0: 1 under mtl_jax.host_malloc's single malloc "
                 "arena, where two compiling threads contend for it, else 2)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--xla_option", action="append", default=[], metavar="KEY=VALUE",
                 help="XLA option for every compiled step, e.g. xla_backend_optimization_level=0 "
                 "(repeatable; VALUE is JSON)")


def _default_modes(method, all_modes: bool):
  from mtl_jax.combiners.base import GRAMIAN, JACOBIAN, LOSSES
  if method.needs == LOSSES:
    return ("losses", "gramian", "jacobian", "features") if all_modes else ("losses", "features")
  if method.needs == GRAMIAN:
    return ("jacobian", "gramian", "features")
  assert method.needs == JACOBIAN
  return ("jacobian",)


def _programs(setup, names, args, mesh):
  """The compiled programs to time: ``{label: dict(step, state, rows=[(combiner, mode, index)])}``.

  Weightings that the engine runs alike (one ``needs`` and ``specific``) share one program per mode
  through :func:`mtl_jax.bench_utils.switch_method`: compilation, not running, is most of this
  benchmark's time on a CPU. Each Jacobian aggregator has its own program (its memory is its own).
  LS has its own program (the reference of the loss-based rows and of the plain-step bound);
  the exact Nash-MTL reference is its row in the jacobian-mode switch program.
  """
  from mtl_jax import bench_utils as bu, combiners
  k = setup.num_tasks
  progs = {}
  step, state = bu.plain_step(setup)
  progs["plain"] = dict(step=step, state=state, rows=[], heavy=False)
  step, state = bu.jacobian_step(setup)
  progs["jacobian_only"] = dict(step=step, state=state, rows=[], heavy=True)
  step, state = bu.engine_step(setup, combiners.method("ls", k), "losses", mesh)
  progs["ls"] = dict(step=step, state=state, rows=[("ls", "losses", None)], heavy=False)
  n = int(args.update_weights_every)
  if "nash_mtl" in names and n > 1:
    for mode in _csv(args.every_modes):
      m = combiners.method("nash_mtl", k, update_weights_every=n)
      step, state = bu.engine_step(setup, m, mode, mesh, args.gramian_chunk)
      progs[f"nash_every_{mode}"] = dict(step=step, state=state, rows=[], heavy=True)
  groups = {}
  for name in names:
    m = combiners.method(name, k)
    for mode in _default_modes(m, args.all_modes):
      if (name, mode) == ("ls", "losses"):
        continue  # its own program above
      if m.is_weighting:
        groups.setdefault((m.needs, m.specific, mode), []).append((name, m))
      else:  # an aggregator: its own program (a shared one would report the union's memory)
        step, state = bu.engine_step(setup, m, mode, mesh)
        progs[f"{name}/{mode}"] = dict(step=step, state=state, rows=[(name, mode, None)],
                                       heavy=mode in HEAVY_MODES)
  for (needs, specific, mode), members in groups.items():
    sw = bu.switch_method([m for _, m in members])
    step, state = bu.engine_step(setup, sw, mode, mesh, args.gramian_chunk)
    progs[f"switch:{needs}/{specific}/{mode}"] = dict(
        step=step, state=state, rows=[(n, mode, i) for i, (n, _) in enumerate(members)],
        heavy=mode in HEAVY_MODES)
  return progs


def _compile_all(progs, batch, rng, threads, options=None):
  from concurrent.futures import ThreadPoolExecutor
  from mtl_jax import bench_utils as bu

  def one(item):
    label, p = item
    compiled, secs = bu.compile_step(p["step"], p["state"], batch, rng, options)
    return label, compiled, secs

  with ThreadPoolExecutor(max(int(threads), 1)) as pool:
    for label, compiled, secs in pool.map(one, list(progs.items())):
      progs[label].update(compiled=compiled, compile_s=secs, memory=bu.memory_mb(compiled))


def _select(prog, index):
  """The program's state with the switch index set to ``index`` (None: its own method)."""
  from mtl_jax import bench_utils as bu
  state = prog["state"]
  if index is None:
    return state
  return state._replace(combiner_state=bu.select(state.combiner_state, index))


def _interleaved(fns: dict, repeats: int) -> dict:
  """Median seconds of each callable, timed round-robin (A/B interleaved) after one warm-up each."""
  from mtl_jax import bench_utils as bu
  for fn in fns.values():
    bu.block(fn())
  times = {name: [] for name in fns}
  for _ in range(max(int(repeats), 1)):
    for name, fn in fns.items():
      times[name] += bu.time_calls(fn, 1, warmup=0)
  return {name: bu.median(t) for name, t in times.items()}


def _check(checks, name, value, bound, lower_is_better=True, note=""):
  ok = bool(value <= bound) if lower_is_better else bool(value >= bound)
  checks.append({"name": name, "value": float(value), "bound": float(bound), "ok": ok,
                 "note": note})


def step_benchmark(args) -> dict:
  import jax
  import jax.numpy as jnp
  from mtl_jax import bench_utils as bu, combiners
  # combiners.nash_mtl is the registered constructor; the module holds the timing helper.
  nash_module = importlib.import_module("mtl_jax.combiners.nash_mtl")

  t_start = time.perf_counter()
  load_before = os.getloadavg()
  names = _csv(args.combiners) or combiners.names()
  for n in names:
    combiners.method(n, 2)  # unknown names fail here, listing the valid ones
  setup = bu.make_setup(args.image_size, args.batch, args.num_tasks, args.width_mult, args.seed)
  k = setup.num_tasks
  rng = jax.random.key(args.seed)
  mesh = bu.mesh_of(1)
  setup.batch = bu.put_batch(setup.batch, mesh)
  progs = _programs(setup, names, args, mesh)
  threads = args.compile_threads or (
      1 if "glibc.malloc.arena_max=1" in os.environ.get("GLIBC_TUNABLES", "") else 2)
  print(f"compiling {len(progs)} programs ({threads} at a time) ...", flush=True)
  options = _parse_options(args.xla_option)
  _compile_all(progs, setup.batch, rng, threads, options)
  compile_s = time.perf_counter() - t_start
  run = lambda label, state=None: (
      lambda: progs[label]["compiled"](state or progs[label]["state"], setup.batch, rng))

  # References, interleaved: plain flax, LS, Jacobian-only, exact Nash-MTL (jacobian mode).
  ref_fns = {label: run(label) for label in ("plain", "ls", "jacobian_only")}
  nash_at = next(((label, index) for label, p in progs.items() for c, mode, index in p["rows"]
                  if (c, mode) == ("nash_mtl", "jacobian")), None)
  if nash_at is not None:
    label, index = nash_at
    ref_fns["nash_mtl"] = run(label, _select(progs[label], index))
  ref_s = _interleaved(ref_fns, args.repeats)
  ls_s, jac_s = ref_s["ls"], ref_s["jacobian_only"]
  mem_ls = progs["ls"]["memory"].get("peak", float("nan"))

  rows = []

  def add_row(combiner, mode, step_s, label, repeats, jac_ref_s=None, faults=None):
    mem = progs[label]["memory"]
    ref = jac_ref_s or jac_s
    rows.append({
        "combiner": combiner, "mode": mode, "step_s": step_s, "ratio_to_ls": step_s / ls_s,
        "ratio_to_jacobian": step_s / ref, "jacobian_ref_s": ref,
        "peak_mem_mb": mem.get("peak", float("nan")), "memory_mb": mem, "program": label,
        "repeats": repeats, "compile_s": progs[label]["compile_s"], "minor_faults": faults})

  add_row("ls", "losses", ls_s, "ls", args.repeats)
  if nash_at is not None:
    add_row("nash_mtl", "jacobian", ref_s["nash_mtl"], nash_at[0], args.repeats)
  for label, p in progs.items():
    if label in ("plain", "jacobian_only", "ls") or label.startswith("nash_every"):
      continue
    reps = args.heavy_repeats if p["heavy"] else args.repeats
    warmed = nash_at is not None and label == nash_at[0]  # the references ran it already
    # A heavy program's rows are divided by a Jacobian-only call timed just before them: the
    # machine's speed drifts over a run by more than the 5% bound being checked.
    jac_ref = bu.median(bu.time_calls(run("jacobian_only"), 1, warmup=0)) if p["heavy"] else None
    for combiner, mode, index in p["rows"]:
      if (combiner, mode) == ("nash_mtl", "jacobian"):
        continue  # timed with the references
      state = _select(p, index)
      if not warmed:
        bu.block(run(label, state)())
      f0 = bu.minor_faults()
      times = bu.time_calls(run(label, state), reps, warmup=0)
      faults = (bu.minor_faults() - f0) // max(int(reps), 1)
      warmed = True
      add_row(combiner, mode, bu.median(times), label, reps, jac_ref, faults)
      print(f"  {combiner:<12} {mode:<9} {rows[-1]['step_s']:8.3f} s"
            + (f"  / Jacobian-only {rows[-1]['ratio_to_jacobian']:.3f}" if jac_ref else ""),
            flush=True)

  # The weighting's own cost, isolated: Gramian of the held Jacobian, weigh, weighted sum.
  jac, losses = run("jacobian_only")()
  gram_fn = jax.jit(lambda j: combiners.base.gramian_of(j, setup.mask))
  gram = gram_fn(jac)
  gramian_ms = 1e3 * bu.median(bu.time_calls(lambda: gram_fn(jac), args.repeats))
  ls_method = combiners.method("ls", k)
  sum_fn = jax.jit(lambda w, j: combiners.base.combine_jacobian(ls_method, w, j, setup.mask))
  combine_ms = 1e3 * bu.median(bu.time_calls(lambda: sum_fn(jnp.ones((k,)), jac), args.repeats))
  del jac
  weigh = {}
  for n in names:
    m = combiners.method(n, k)
    if m.is_weighting and m.needs == combiners.base.GRAMIAN:
      weigh[n] = bu.weigh_ms(m, setup.params, gram, losses)
  for row in rows:
    if row["combiner"] in weigh:
      row["weigh_ms"] = weigh[row["combiner"]]

  # Nash-MTL with update_weights_every = n: the average over 2n consecutive steps.
  nash_every = {}
  n = int(args.update_weights_every)
  for mode in HEAVY_MODES:
    label = f"nash_every_{mode}"
    if label not in progs:
      continue
    p = progs[label]
    # One warm-up cycle (a fresh and n-1 reusing steps: both branches run once), then 2n steps.
    _, warm = bu.time_threaded(p["compiled"], p["state"], setup.batch, rng, n)
    times, _ = bu.time_threaded(p["compiled"], warm, setup.batch, rng, 2 * n)
    nash_every[mode] = {"n": n, "mean_step_s": float(sum(times) / len(times)),
                        "fresh_step_s": float(max(times)), "reuse_step_s": bu.median(times),
                        "peak_mem_mb": p["memory"].get("peak", float("nan"))}

  # Nash-MTL's solve alone.
  solve = nash_module.nash_solve_timing(_csv(args.nash_ks, int), repeats=args.nash_repeats)
  nash_solve_ms = {str(kk): v["median_ms"] for kk, v in solve.items()}

  # Scaling with K (fresh setups) and with the device count (subprocesses).
  scaling_k = {str(k): {"jacobian_s": jac_s}}
  for kk in _csv(args.step_ks, int):
    if kk == k:
      continue
    sk = bu.make_setup(args.image_size, args.batch, kk, args.width_mult, args.seed)
    sk.batch = bu.put_batch(sk.batch, mesh)
    step, state = bu.jacobian_step(sk)
    compiled, _ = bu.compile_step(step, state, sk.batch, rng, options)
    scaling_k[str(kk)] = _interleaved(
        {"jacobian_s": lambda c=compiled, s=state: c(s, sk.batch, rng)}, max(args.repeats // 2, 1))
  scaling_devices = {}
  for nd in _csv(args.devices, int):
    if nd == 1:
      scaling_devices["1"] = {"ls_s": ls_s, "nash_mtl_s": ref_s.get("nash_mtl")}
      continue
    scaling_devices[str(nd)] = _device_subprocess(nd, args)

  checks = []
  by = {(r["combiner"], r["mode"]): r for r in rows}
  for (c, mode), r in sorted(by.items()):
    if c in weigh and mode == "jacobian":
      _check(checks, f"{c}: jacobian-mode step / Jacobian-only", r["ratio_to_jacobian"],
             BOUNDS["gramian_weighting_overhead"],
             note=f"isolated: Gramian {gramian_ms:.1f} ms + weigh {weigh[c]:.2f} ms + sum "
             f"{combine_ms:.1f} ms = {(gramian_ms + weigh[c] + combine_ms) / (1e3 * jac_s):.2%}")
  s40 = solve.get(40)
  if s40 is not None:
    _check(checks, "Nash-MTL solve at K=40 (ms)", s40["median_ms"], BOUNDS["nash_solve_ms_k40"])
    _check(checks, "Nash-MTL solve K=40 relative KKT residual", s40["kkt_residual"],
           BOUNDS["nash_kkt_residual"])
  gram_rows = [r for r in rows if r["mode"] == "gramian"]
  if gram_rows:
    worst = max(r["peak_mem_mb"] for r in gram_rows)
    _check(checks, "gramian-mode peak memory / LS peak", worst / mem_ls,
           BOUNDS["gramian_mode_memory"], note=f"{worst:.0f} MiB vs {mem_ls:.0f} MiB")
  for r in rows:
    if r["mode"] == "features":
      _check(checks, f"{r['combiner']}: features-mode step / LS", r["ratio_to_ls"],
             BOUNDS["features_mode_time"])
  if "nash_mtl" in ref_s:
    _check(checks, "Nash-MTL exact step / Jacobian-only", ref_s["nash_mtl"] / jac_s,
           BOUNDS["nash_exact_step"])
  for mode, e in nash_every.items():
    full = ref_s.get("nash_mtl", jac_s) if mode == "jacobian" else by.get(
        ("nash_mtl", "gramian"), {}).get("step_s", e["fresh_step_s"])
    expected = (full + (e["n"] - 1) * ls_s) / e["n"]
    e["expected_s"] = expected
    _check(checks, f"Nash-MTL update_weights_every={e['n']} ({mode}) mean step / "
           "((full + (n-1) LS) / n)", e["mean_step_s"] / expected, BOUNDS["nash_every_slack"],
           note=f"mean {e['mean_step_s']:.3f} s vs full {full:.3f} s")
  _check(checks, "LS through the engine / plain flax step", ls_s / ref_s["plain"],
         BOUNDS["ls_overhead"])

  report = {
      "config": {key: getattr(args, key) for key in (
          "image_size", "batch", "num_tasks", "width_mult", "repeats", "heavy_repeats",
          "gramian_chunk", "update_weights_every", "seed", "xla_option")},
      "machine": dict(_machine(), load_before=load_before),
      "num_params": bu.num_params(setup.params),
      "rows": rows,
      "references": {"plain_s": ref_s["plain"], "ls_s": ls_s, "jacobian_s": jac_s,
                     "nash_mtl_s": ref_s.get("nash_mtl"), "gramian_ms": gramian_ms,
                     "weighted_sum_ms": combine_ms,
                     "plain_peak_mem_mb": progs["plain"]["memory"].get("peak"),
                     "ls_peak_mem_mb": mem_ls,
                     "jacobian_peak_mem_mb": progs["jacobian_only"]["memory"].get("peak")},
      "weigh_ms": weigh,
      "nash_solve_ms": nash_solve_ms,
      "nash_solve": {str(kk): v for kk, v in solve.items()},
      "nash_update_weights_every": nash_every,
      "scaling_k": scaling_k,
      "scaling_devices": scaling_devices,
      "checks": checks,
      "compile_s": compile_s,
      "total_s": time.perf_counter() - t_start,
  }
  report["machine"]["load_after"] = os.getloadavg()
  print(format_step_report(report))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
  return report


def _machine() -> dict:
  import platform
  import jax
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
          "devices": len(jax.devices()), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def _device_subprocess(num_devices: int, args) -> dict:
  """LS and exact Nash-MTL steps on ``num_devices`` forced CPU devices (a fresh process)."""
  import subprocess
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={int(num_devices)}").strip()
  env.setdefault("JAX_PLATFORMS", "cpu")
  cmd = [sys.executable, os.path.abspath(__file__), "_devices", f"--num_devices={num_devices}",
         f"--image_size={args.image_size}", f"--batch={args.batch}",
         f"--num_tasks={args.num_tasks}", f"--width_mult={args.width_mult}",
         f"--repeats={max(args.repeats // 2, 1)}", f"--seed={args.seed}"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
  return json.loads(out.stdout.strip().splitlines()[-1])


def _devices_args(p: argparse.ArgumentParser):
  p.add_argument("--num_devices", type=int, required=True)
  for name, default in (("image_size", 32), ("batch", 16), ("num_tasks", 40), ("repeats", 2),
                        ("seed", 0)):
    p.add_argument(f"--{name}", type=int, default=default)
  p.add_argument("--width_mult", type=float, default=1.0)


@subcommand("_devices", _devices_args)
def run_devices(args) -> dict:
  """(internal) One line of JSON: LS and Nash-MTL step seconds on ``--num_devices`` devices."""
  import jax
  from mtl_jax import bench_utils as bu, combiners
  setup = bu.make_setup(args.image_size, args.batch, args.num_tasks, args.width_mult, args.seed)
  mesh = bu.mesh_of(args.num_devices)
  setup.batch = bu.put_batch(setup.batch, mesh)
  rng = jax.random.key(args.seed)
  fns = {}
  for label, (name, mode) in {"ls_s": ("ls", "losses"), "nash_mtl_s": ("nash_mtl", "jacobian")}.items():
    step, state = bu.engine_step(setup, combiners.method(name, setup.num_tasks), mode, mesh)
    compiled, _ = bu.compile_step(step, state, setup.batch, rng)
    fns[label] = (lambda c=compiled, s=state: c(s, setup.batch, rng))
  result = _interleaved(fns, args.repeats)
  print(json.dumps(result))
  return result


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
  for r in sorted(report["rows"], key=lambda r: (r["combiner"], r["mode"])):
    w = f"{r['weigh_ms']:10.2f}" if "weigh_ms" in r else f"{'':>10}"
    lines.append(f"{r['combiner']:<12}{r['mode']:<10}{r['step_s']:9.3f}{r['ratio_to_ls']:8.2f}"
                 f"{r['ratio_to_jacobian']:8.3f}{r['peak_mem_mb']:10.0f}{w}")
  lines.append("Nash-MTL solve (ms): " + ", ".join(
      f"K={kk}: {v:.2f}" for kk, v in report["nash_solve_ms"].items()))
  for mode, e in report["nash_update_weights_every"].items():
    lines.append(f"Nash-MTL update_weights_every={e['n']} ({mode}): mean {e['mean_step_s']:.3f} s/step"
                 f" (fresh {e['fresh_step_s']:.3f} s, reuse {e['reuse_step_s']:.3f} s)")
  lines.append("Jacobian-only step vs K: " + ", ".join(
      f"K={kk}: {v['jacobian_s']:.3f} s"
      for kk, v in report["scaling_k"].items()))
  lines.append("step vs devices: " + ", ".join(f"{nd}: {v}" for nd, v in
                                               report["scaling_devices"].items()))
  lines.append("checks:")
  for c in report["checks"]:
    lines.append(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['name']}: {c['value']:.4g} "
                 f"(bound {c['bound']:.4g}){' ' + c['note'] if c['note'] else ''}")
  lines.append(f"compile {report['compile_s']:.0f} s, total {report['total_s']:.0f} s")
  return "\n".join(lines)


@subcommand("step", _step_args)
def run_step(args) -> dict:
  return step_benchmark(args)


DEFAULT_SUBCOMMAND = "step"


def main(argv: Optional[Sequence[str]] = None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or (argv[0] not in SUBCOMMANDS and argv[0].startswith("-")
                  and argv[0] not in ("-h", "--help")):
    argv.insert(0, DEFAULT_SUBCOMMAND)  # `benchmark.py --out=x.json` runs the step benchmark
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (add_arguments, _) in SUBCOMMANDS.items():
    add_arguments(sub.add_parser(name))
  args = parser.parse_args(argv)
  return SUBCOMMANDS[args.command][1](args)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from mtl_jax import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.reexec_if_useful()  # glibc malloc tunables for XLA-CPU steps (MTL_JAX_MALLOC=0: off)
  main()
