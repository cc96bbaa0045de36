"""A Task: its name, head, loss and metrics (with direction).

Contract (used by sharing/, data/, train.py and evaluation.py):

* ``loss(pred, target) -> scalar``: mean over the valid entries of the batch (masked losses ignore
  missing labels, e.g. an ignore index or NaN targets).
* ``metrics``: each :class:`Metric` is streaming: ``stats(pred, target) -> dict of arrays`` gives
  jit-able sufficient statistics of one batch (sums and counts), which add up over batches, and
  ``result(stats) -> float`` turns the summed statistics into the number a paper reports (F1, mIoU,
  MAE, ...). ``higher_is_better`` gives the direction used by Δm% and mean rank.
* ``head()``: a fresh flax module mapping the shared representation to this task's prediction.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Metric:
  name: str
  higher_is_better: bool
  stats: Callable[[Array, Array], dict[str, Array]]
  result: Callable[[dict[str, Any]], float]


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  head: Callable[[], Any]  # () -> flax.linen.Module
  loss: Callable[[Array, Array], Array]
  metrics: tuple[Metric, ...] = ()
  main_metric: str = ""  # the metric used for model selection ("" = the first metric)
