"""Sharing strategies: ``sharing.get(name, backbone, tasks, **options) -> MultiTaskModel``.

``names()`` lists them, ``options(name)`` gives a strategy's options and defaults. Every module of
this package is imported here so that each registers its strategies.
"""

from mtl_jax.sharing.base import MultiTaskModel, get, names, options, register

# Each module registers its strategies on import.
from mtl_jax.sharing import branched  # noqa: F401
from mtl_jax.sharing import hard  # noqa: F401
from mtl_jax.sharing import moe  # noqa: F401
from mtl_jax.sharing import mtan  # noqa: F401
from mtl_jax.sharing import sparse  # noqa: F401
from mtl_jax.sharing import towers  # noqa: F401

__all__ = ["MultiTaskModel", "get", "names", "options", "register"]
