"""The benchmark registry (a dict and a decorator), kept apart from ``data/__init__`` so that
benchmark modules can import it without an import cycle.

    @register("celeba")
    def get_benchmark(config) -> Benchmark: ...

``mtl_jax.data.get_benchmark(config)`` dispatches on ``config.data.name``.
"""

from __future__ import annotations

from typing import Any, Callable

_REGISTRY: dict[str, Callable[[Any], Any]] = {}


def register(name: str):
  """Decorator: registers ``fn(config) -> Benchmark`` under ``name`` (lower case)."""

  def wrap(fn):
    if name in _REGISTRY and _REGISTRY[name] is not fn:
      raise ValueError(f"benchmark {name!r} is already registered")
    _REGISTRY[name] = fn
    return fn

  return wrap


def names() -> list[str]:
  """The registered benchmark names, sorted."""
  return sorted(_REGISTRY)


def get(name: str) -> Callable[[Any], Any]:
  """The ``get_benchmark`` function registered as ``name``; unknown names list the valid ones."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(names())}")
  return _REGISTRY[name]


def get_benchmark(config) -> Any:
  """Builds the Benchmark named by ``config.data.name``."""
  return get(str(config.data.name))(config)
