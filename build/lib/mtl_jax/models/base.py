"""The backbone contract shared by models/ and sharing/.

A :class:`Backbone` is a sequence of *stages*; every stage factory makes a fresh flax module with
``__call__(x, train: bool) -> x`` (``x`` may be any pytree, e.g. a padded graph batch). Running the
stages in order gives the shared representation that task heads consume. Sharing strategies that
need intermediate depths (cross-stitch, MTAN, hierarchical heads, soft-sharing towers) work stage by
stage; hard sharing simply chains them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class Backbone:
  name: str
  stages: tuple[Callable[[], nn.Module], ...]
  # Output width (channels / features) after each stage, for modules that mix stages (MTAN, MoE).
  widths: tuple[int, ...] = ()
  # A sample input (numpy pytree, batch of 2) for init and parameter counts.
  sample_input: Callable[[], Any] | None = None


# ---------------------------------------------------------------------------------------------
# Batch norm, synchronised across devices inside the trainer's SPMD step.

# Why a ContextVar: the device axis exists only while the trainer traces its per-device step
# inside ``jax.shard_map``; the same model is also initialised, evaluated and traced by the engine
# outside it, where naming an unbound axis is an error. The models are built once, from stage
# factories several levels below the sharing strategies, before any step is traced, so an
# attribute would have to be threaded through every backbone and strategy and the model built
# twice. The axis is a property of the trace, not of the model: one dynamic scope, entered by the
# trainer only (like ``mtl_jax.layers.tracing`` for the engine).
_BN_AXIS: contextvars.ContextVar = contextvars.ContextVar("mtl_jax_batch_norm_axis", default=None)


@contextlib.contextmanager
def sync_batch_norm(axis_name):
  """Within this context, :func:`batch_norm` layers built in train mode average their batch
  statistics over ``axis_name`` (``jax.lax.pmean``), so N devices normalise with the statistics
  of the global batch, as one device would (SyncBatchNorm). The trainer enters it while tracing
  the per-device step; evaluation (running averages) is unaffected."""
  token = _BN_AXIS.set(axis_name)
  try:
    yield
  finally:
    _BN_AXIS.reset(token)


def batch_norm(train: bool, **kwargs) -> nn.BatchNorm:
  """``nn.BatchNorm`` for every model of the library (``use_running_average=not train``), with the
  cross-device axis of :func:`sync_batch_norm` when one is active."""
  return nn.BatchNorm(use_running_average=not train, axis_name=_BN_AXIS.get() if train else None,
                      **kwargs)
