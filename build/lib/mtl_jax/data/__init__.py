"""Benchmarks: one module per benchmark, each registering ``get_benchmark(config) -> Benchmark``.

    bench = mtl_jax.data.get_benchmark(config)   # dispatches on config.data.name
    mtl_jax.data.names()                          # ['celeba', 'cityscapes', ...]

Every module of this package is imported here so that each registers itself (see ``registry``).
"""

from mtl_jax.data.base import ArrayLoader, Benchmark
from mtl_jax.data.registry import get, get_benchmark, names, register

# Each module registers its benchmarks on import.
from mtl_jax.data import celeba  # noqa: F401
from mtl_jax.data import dense  # noqa: F401
from mtl_jax.data import multimnist  # noqa: F401
from mtl_jax.data import nlp  # noqa: F401
from mtl_jax.data import qm9  # noqa: F401
from mtl_jax.data import synthetic  # noqa: F401

__all__ = ["ArrayLoader", "Benchmark", "get", "get_benchmark", "names", "register"]
