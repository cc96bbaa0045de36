"""Backbones (each a :class:`~mtl_jax.models.base.Backbone` of stages) and generic task heads.

``models.get(name, **options)`` builds a registered backbone, ``models.names()`` lists them;
modules register with ``@mtl_jax.models.registry.register('name')``. Every module of this package
is imported here so that each registers its backbones.
"""

import importlib
import pkgutil

from mtl_jax.models.base import Backbone
from mtl_jax.models.registry import get, names, options, register

for _info in pkgutil.iter_modules(__path__):
  if _info.name not in ("base", "registry") and not _info.name.startswith("_"):
    importlib.import_module(f"{__name__}.{_info.name}")
