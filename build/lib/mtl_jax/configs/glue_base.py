"""GLUE mix (SST-2, CoLA, MRPC, RTE) as a multi-input benchmark: one batch per task per step
(``mtl_jax.data.nlp``). Protocol (this library's; no MTL-optimisation paper fixes one): the
``transformer`` encoder from scratch (width 128, 2 layers), masked-mean pooling, one logit per task,
Adam 1e-3, batch 32 per task, 3 epochs of the largest task (SST-2, 60k held-in sentences), GLUE's
metrics (accuracy; CoLA MCC; MRPC F1), the tfds validation split as test, selection on the mean
validation main metric.

Variants: ``''``; ``'smoke'`` mock data, width 16, max length 16, a few steps; ``'quick'``
prepared tfds data, 300 steps, max length 64.
"""

from mtl_jax.configs.conll_base import get_base as _text


def get_base(variant: str = ""):
  c = _text(variant, name="glue", train_size=60_614)
  c.data.validation_fraction = 0.1
  if not variant:
    c.train.num_epochs = 3
  return c
