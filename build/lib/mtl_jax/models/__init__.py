"""Backbones (each a :class:`~mtl_jax.models.base.Backbone` of stages) and generic task heads.

``models.get(name, **options)`` builds a registered backbone, ``models.names()`` lists them;
modules register with ``@mtl_jax.models.registry.register('name')``. Every module of this package
is imported here so that each registers its backbones.
"""

from mtl_jax.models.base import Backbone
from mtl_jax.models.registry import get, names, options, register

# Each module registers its backbones on import.
from mtl_jax.models import celeba_cnn  # noqa: F401
from mtl_jax.models import dilated_resnet  # noqa: F401
from mtl_jax.models import heads  # noqa: F401
from mtl_jax.models import lenet  # noqa: F401
from mtl_jax.models import mlp  # noqa: F401
from mtl_jax.models import mpnn  # noqa: F401
from mtl_jax.models import resnet  # noqa: F401
from mtl_jax.models import segnet  # noqa: F401
from mtl_jax.models import transformer  # noqa: F401

__all__ = ["Backbone", "get", "names", "options", "register"]
