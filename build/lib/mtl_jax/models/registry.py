"""The backbone registry: ``@register('name')`` on a ``(**options) -> Backbone`` constructor.

Lives apart from ``models/__init__`` so backbone modules can import it without an import cycle.
"""

from __future__ import annotations

import inspect
from typing import Callable

from mtl_jax.models.base import Backbone
from mtl_jax._choices import unknown as _unknown

_REGISTRY: dict[str, Callable[..., Backbone]] = {}


def register(name: str):
  """Decorator: ``@register('celeba_cnn') def celeba_cnn(width=1.0, ...) -> Backbone``."""

  def deco(fn):
    if name in _REGISTRY:
      raise ValueError(f"backbone {name!r} registered twice")
    _REGISTRY[name] = fn
    return fn

  return deco


def names() -> list[str]:
  return sorted(_REGISTRY)




def options(name: str) -> dict:
  """The options of a backbone and their defaults."""
  if name not in _REGISTRY:
    raise _unknown("backbone", name, _REGISTRY)
  sig = inspect.signature(_REGISTRY[name])
  return {p.name: p.default for p in sig.parameters.values()
          if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def get(name: str, **opts) -> Backbone:
  """The :class:`Backbone` ``name`` built with ``opts``; unknown names/options raise listing the valid ones."""
  valid = options(name)
  for key in opts:
    if key not in valid:
      raise _unknown(f"option of backbone {name}:", key, valid)
  return _REGISTRY[name](**opts)
