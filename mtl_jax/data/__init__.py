"""Benchmarks: one module per benchmark, each registering ``get_benchmark(config) -> Benchmark``.

    bench = mtl_jax.data.get_benchmark(config)   # dispatches on config.data.name
    mtl_jax.data.names()                          # ['celeba', 'cityscapes', ...]

Every module of this package is imported here so that each registers itself (see ``registry``).
"""

import importlib
import pkgutil

from mtl_jax.data.base import ArrayLoader, Benchmark
from mtl_jax.data.registry import get, get_benchmark, names, register

for _info in pkgutil.iter_modules(__path__):
  if _info.name not in ("base", "registry") and not _info.name.startswith("_"):
    importlib.import_module(f"{__name__}.{_info.name}")
