"""Sharing strategies: ``sharing.get(name, backbone, tasks, **options) -> MultiTaskModel``.

``names()`` lists them, ``options(name)`` gives a strategy's options and defaults. Every module of
this package is imported here so that each registers its strategies.
"""

import importlib
import pkgutil

from mtl_jax.sharing.base import MultiTaskModel, get, names, options, register

for _info in pkgutil.iter_modules(__path__):
  if _info.name not in ("base",) and not _info.name.startswith("_"):
    importlib.import_module(f"{__name__}.{_info.name}")
