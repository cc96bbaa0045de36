"""glibc malloc settings for XLA-CPU runs: keep the step's buffers mapped between steps.

XLA-CPU allocates a step's temporaries (2-4 GB for the 40-task Jacobian of the CelebA CNN) with
``malloc`` on every call. glibc serves blocks above 32 MiB with a fresh ``mmap`` and returns them
with ``munmap``, so every step page-faults its whole working set again (about a million minor
faults per step of the benchmark's Jacobian; ``docs/performance.md`` has the figures). With the
tunables below (one arena, no ``mmap`` below 4 GiB, no trimming, transparent huge pages for the
heap) no page fault follows the first step. The price: the process keeps its peak heap mapped (what
the next step needs anyway).

glibc reads ``GLIBC_TUNABLES`` only at process start, so the launchers re-execute themselves once
with it set (:func:`reexec_if_useful`); a test runner can export it for its workers
(:func:`tuned_environ`). Nothing happens off Linux/glibc, on accelerator runs (``JAX_PLATFORMS``
naming something other than cpu, or a CUDA/ROCm/TPU plugin installed and ``JAX_PLATFORMS`` unset),
when the switch ``MTL_JAX_MALLOC=0`` is set, or for tunables the user already set (theirs win).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from typing import Mapping, Optional

TUNABLES = (
    ("glibc.malloc.arena_max", "1"),
    ("glibc.malloc.mmap_threshold", str(4 << 30)),
    ("glibc.malloc.trim_threshold", str(16 << 30)),
    ("glibc.malloc.hugetlb", "1"),
)
SWITCH = "MTL_JAX_MALLOC"  # the one switch: "0" leaves malloc alone
APPLIED = "MTL_JAX_MALLOC_APPLIED"  # set by tuned_environ: the tunables it added
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu")


def _runs_on_cpu(environ: Mapping[str, str]) -> bool:
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def tuned_environ(environ: Optional[Mapping[str, str]] = None) -> Optional[dict]:
  """``environ`` with the tunables merged into ``GLIBC_TUNABLES``, or None when not applicable."""
  environ = dict(os.environ if environ is None else environ)
  if (environ.get(SWITCH, "1") == "0" or environ.get(APPLIED) or platform.system() != "Linux"
      or platform.libc_ver()[0] != "glibc" or not _runs_on_cpu(environ)):
    return None
  current = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
  keys = {t.split("=", 1)[0] for t in current}
  added = [f"{key}={value}" for key, value in TUNABLES if key not in keys]
  environ[APPLIED] = ":".join(added) or "none"  # what was added (a child can remove it)
  if added:
    environ["GLIBC_TUNABLES"] = ":".join(current + added)
  return environ


def reexec_if_useful() -> None:
  """Re-execute this process (same interpreter, options and arguments) with the tunables set.

  Call first thing in a launcher's ``__main__``; returns when nothing is to be done.
  """
  environ = tuned_environ()
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  # sys.orig_argv (Python >= 3.10) keeps the interpreter options too (-m module, -u, ...).
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], environ)
