"""The accelerator benchmark's rows (issue 18.6): the trainer's own step at paper scale.

Each row is one combiner (and engine mode) on one protocol model, built from the benchmark's
config exactly as ``launch/train.py`` builds it (:func:`mtl_jax.train.build`, ``init_state``,
``make_train_step`` with donation, ``shard_batch``), on mock inputs of the protocol's shapes:

* CelebA-40 (``configs/celeba_base.py``, the FAMO protocol): the full-width CelebA CNN at 64x64,
  batch 256, 40 one-logit heads; tfds mock examples tiled to the batch (no dataset needed);
* QM9 (``configs/qm9_base.py``): the MPNN at width 64, batch 120, 11 targets; fabricated molecules
  (``data.mock``) through the trainer's own per-device graph loader.

Per row: the compile seconds (``lower`` + ``compile`` of the step), steps/s over a fixed number
of steps after one warm-up step (fewer when a row would pass its time box), the ratio of the step
time to the same model's LS row, XLA's compiled memory (temp + arguments + outputs) and the
device's peak bytes in use (``device.memory_stats()``; the process's peak so far, so it only grows
down the table) or, where the backend has no memory statistics (CPU), the host's peak RSS.
Everything here measures; nothing is asserted.
"""

from __future__ import annotations

import resource
import time
from typing import NamedTuple, Optional

import jax
import numpy as np

from bench import timing as bt

# (combiner, engine mode; '' = the trainer's automatic choice)
CELEBA_ROWS = (("ls", ""), ("nash_mtl", ""), ("nash_mtl", "features"), ("pcgrad", ""),
               ("famo", ""), ("upgrad", ""))
QM9_ROWS = (("ls", ""), ("nash_mtl", ""))


class Sizes(NamedTuple):
  """The protocol sizes (:data:`FULL`) or the CPU test's (:data:`TINY`)."""
  celeba_image: int
  celeba_batch: int
  celeba_width: int  # 0: the protocol CNN's own (64 first-conv channels)
  celeba_tasks: str  # 'all': the 40 attributes
  qm9_batch: int
  qm9_width: int
  qm9_mock_size: int


FULL = Sizes(64, 256, 0, "all", 120, 64, 256)
TINY = Sizes(16, 8, 4, "Smiling,Male,Young", 8, 8, 96)


def configs(sizes: Sizes) -> dict:
  """``{benchmark: config}``: the protocol configs at ``sizes``, on mock inputs."""
  from mtl_jax.configs import celeba_base, qm9_base  # pylint: disable=g-import-not-at-top
  c = celeba_base.get_base("")
  c.data.mock = True
  c.data.image_size, c.train.batch_size = sizes.celeba_image, sizes.celeba_batch
  c.model.width, c.tasks = sizes.celeba_width, sizes.celeba_tasks
  q = qm9_base.get_base("")
  q.data.mock, q.data.mock_size = True, sizes.qm9_mock_size
  q.train.batch_size, q.model.width = sizes.qm9_batch, sizes.qm9_width
  return {"celeba": c, "qm9": q}


def full_batch(bench, config, mesh):
  """One training batch of ``config.train.batch_size``: the trainer's loader where the split
  holds a batch (and always for per-device graph batches), else the mock split's examples tiled
  on the leading axis to the batch size."""
  from mtl_jax import train  # pylint: disable=g-import-not-at-top
  bs = int(config.train.batch_size)
  try:
    return next(train.make_train_loader(bench, config, mesh))
  except ValueError:  # the mock split is smaller than one batch
    if bench.per_device_batches:
      raise
  small = next(bench.loader("train", 8, int(config.seed), True))
  return jax.tree.map(lambda x: np.resize(x, (bs,) + x.shape[1:]), small)


def peak_memory_mb() -> tuple:
  """``(MiB, source)``: the device's peak bytes in use, else this process's peak host RSS."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host peak RSS (no device stats)"


def run_row(config, combiner: str, mode: str, steps: int, row_seconds: float,
            compiler_options: Optional[dict] = None) -> dict:
  """Build, compile (with the XLA ``compiler_options``) and time one row (see the module
  docstring)."""
  from mtl_jax import train  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.combiner.name, config.engine.mode = combiner, mode
  p = train.build_step(config, 1000)  # exactly the trainer's step for this config
  bench, model, mesh, state, step, mode = p.bench, p.model, p.mesh, p.state, p.step_fn, p.mode
  batch = train.shard_batch(full_batch(bench, config, mesh), mesh)
  compiled, compile_s = bt.compile_step(step, state, batch, compiler_options)
  t0 = time.perf_counter()
  state, metrics = compiled(state, batch)  # warm-up
  bt.block((state, metrics))
  warm_s = time.perf_counter() - t0
  n = int(max(min(steps, row_seconds // max(warm_s, 1e-9)), 3))  # the row's time box
  t0 = time.perf_counter()
  for _ in range(n):
    state, metrics = compiled(state, batch)
  bt.block((state, metrics))
  step_s = (time.perf_counter() - t0) / n
  mem, source = peak_memory_mb()
  return {"benchmark": bench.name, "combiner": combiner, "mode": mode,
          "num_tasks": len(bench.tasks), "batch_size": int(config.train.batch_size),
          "num_params": int(model.num_params(jax.device_get(state.params))),
          "compile_s": compile_s, "warmup_s": warm_s, "timed_steps": n, "step_s": step_s,
          "steps_per_s": 1.0 / step_s, "xla_memory_mb": bt.memory_mb(compiled).get("peak"),
          "peak_memory_mb": mem, "peak_memory_source": source,
          "finite": bool(np.asarray(jax.device_get(metrics["finite"])))}


def with_ratios(rows: list) -> list:
  """Each row's ``ratio_to_ls``: its step time over its benchmark's LS row's (None without one)."""
  ls = {r["benchmark"]: r["step_s"] for r in rows if r["combiner"] == "ls"}
  for r in rows:
    base = ls.get(r["benchmark"])
    r["ratio_to_ls"] = r["step_s"] / base if base else None
  return rows


def markdown(rows: list, device: str, sizes: Sizes, note: Optional[str] = None) -> str:
  """The table for ``docs/performance.md``."""
  fmt = lambda v, f: "—" if v is None else format(v, f)
  lines = [f"Device: {device}. CelebA-40: {sizes.celeba_image}x{sizes.celeba_image}, batch "
           f"{sizes.celeba_batch}; QM9 MPNN: width {sizes.qm9_width}, batch {sizes.qm9_batch}."
           + (f" {note}" if note else ""), "",
           "| model | combiner | engine mode | steps/s | step / LS | peak memory (MiB) | "
           "XLA memory (MiB) | compile (s) |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['benchmark']} | {r['combiner']} | {r['mode']} | "
                 f"{r['steps_per_s']:.2f} | {fmt(r['ratio_to_ls'], '.2f')} | "
                 f"{r['peak_memory_mb']:.0f} | {fmt(r['xla_memory_mb'], '.0f')} | "
                 f"{r['compile_s']:.1f} |")
  sources = sorted({r["peak_memory_source"] for r in rows})
  lines += ["", f"Peak memory: {', '.join(sources)} (the process's peak so far: it only grows "
            "down the table; XLA memory is the row's own compiled program)."]
  return "\n".join(lines) + "\n"
