"""Compiling, timing and XLA memory analysis of jitted steps. Everything here measures; nothing is
asserted."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def compile_step(step, state, batch, compiler_options=None):
  """``(compiled, compile seconds)``; the compiled function runs ``(state, batch)``.

  ``compiler_options``: XLA debug options for this program only (``{"xla_cpu_...": value}``).
  """
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile(compiler_options=compiler_options or None)
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


def time_threaded(compiled, state, batch, steps: int) -> tuple[list, Any]:
  """Run ``steps`` consecutive steps threading the state; per-step wall seconds and the state."""
  times = []
  for _ in range(int(steps)):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    block((state, metrics))
    times.append(time.perf_counter() - t0)
  return times, state
