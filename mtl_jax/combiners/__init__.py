"""Gradient combiners, each an optax transformation.

    tx = optax.chain(mtl_jax.combiners.nash_mtl(num_tasks=40), optax.adam(3e-4))
    updates, state = tx.update(task_grads, state, params, task_losses=losses)

``get(name, num_tasks, shared_mask=None, **hparams)`` builds any registered method by name;
``method(name, num_tasks, **hparams)`` returns its :class:`Method` (what the engine uses);
``names()`` lists them. Every registered name is also a module-level constructor here.
"""

import functools
import importlib
import pkgutil

from mtl_jax.combiners.base import (GRAMIAN, JACOBIAN, LOSSES, CombinerState,
                                    CombinerTransformation, Method, as_optax, get, hparams,
                                    method, names, register, resolve_mask)

# Import every module of this package so that each registers its methods.
for _info in pkgutil.iter_modules(__path__):
  if _info.name not in ("base",) and not _info.name.startswith("_"):
    importlib.import_module(f"{__name__}.{_info.name}")


def _constructor(name):
  from mtl_jax.combiners import base

  fn = base._REGISTRY[name]

  @functools.wraps(fn)
  def make(num_tasks, shared_mask=None, **hp):
    return get(name, num_tasks, shared_mask=shared_mask, **hp)

  make.__name__ = name
  return make


# A registered name shadows its submodule of the same name (``combiners.ls`` is the constructor).
for _name in names():
  globals()[_name] = _constructor(_name)
