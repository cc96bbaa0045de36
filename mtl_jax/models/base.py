"""The backbone contract shared by models/ and sharing/.

A :class:`Backbone` is a sequence of *stages*; every stage factory makes a fresh flax module with
``__call__(x, train: bool) -> x`` (``x`` may be any pytree, e.g. a padded graph batch). Running the
stages in order gives the shared representation that task heads consume. Sharing strategies that
need intermediate depths (cross-stitch, MTAN, hierarchical heads, soft-sharing towers) work stage by
stage; hard sharing simply chains them.
"""

from __future__ import annotations

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
