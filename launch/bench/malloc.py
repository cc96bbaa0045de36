"""The environment of a child process that should run without :mod:`mtl_jax.host_malloc`'s tunables.

The benchmark's compile workers, for one: XLA's compiler runs LLVM on a thread pool whose
``malloc`` calls contend for the single arena the tunables set (docs/performance.md,
"Compiling"). The child is also marked so that a launcher it runs does not re-execute itself.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

from mtl_jax import host_malloc


def untuned_environ(environ: Optional[Mapping[str, str]] = None) -> dict:
  """``environ`` without the tunables :func:`mtl_jax.host_malloc.tuned_environ` added (the user's
  own ``GLIBC_TUNABLES`` stay), with the switch :data:`mtl_jax.host_malloc.SWITCH` set off."""
  environ = dict(os.environ if environ is None else environ)
  added = set(environ.pop(host_malloc.APPLIED, "").split(":")) - {"", "none", "1"}
  kept = [t for t in environ.pop("GLIBC_TUNABLES", "").split(":") if t and t not in added]
  if kept:
    environ["GLIBC_TUNABLES"] = ":".join(kept)
  environ[host_malloc.SWITCH] = "0"
  return environ
