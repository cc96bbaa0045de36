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
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

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


# ---------------------------------------------------------------------------------------------
# Losses. Each is ``(pred, target) -> scalar``: the mean over the *valid* entries of the batch.
# A batch with no valid entry gives 0 (and zero gradient), never NaN.


def _masked_mean(values: Array, valid: Array) -> Array:
  valid = jnp.broadcast_to(valid, values.shape)
  values = jnp.where(valid, values, 0.0)
  return jnp.sum(values) / jnp.maximum(jnp.sum(valid), 1).astype(values.dtype)


def _match(pred: Array, target: Array) -> Array:
  """Drop a trailing axis of size 1 of ``pred`` when ``target`` lacks it: (B, 1) vs (B,)."""
  if pred.ndim == target.ndim + 1 and pred.shape[-1] == 1:
    pred = pred[..., 0]
  if pred.shape != target.shape:
    raise ValueError(f"prediction shape {pred.shape} does not match target shape {target.shape}")
  return pred


def bce_with_logits(pred: Array, target: Array) -> Array:
  """Binary cross-entropy on logits (``optax.losses.sigmoid_binary_cross_entropy``, stable for
  any logit); NaN targets (missing labels) are ignored."""
  target = jnp.asarray(target, jnp.float32)
  pred = _match(pred, target).astype(jnp.float32)
  valid = ~jnp.isnan(target)
  loss = optax.losses.sigmoid_binary_cross_entropy(pred, jnp.where(valid, target, 0.0))
  return _masked_mean(loss, valid)


def cross_entropy(logits: Array, labels: Array, ignore_index: int = -1) -> Array:
  """Softmax cross-entropy over the last axis of ``logits``
  (``optax.losses.softmax_cross_entropy_with_integer_labels``); labels equal to ``ignore_index``
  (or outside ``[0, C)``) are ignored. Works for (B, C), (B, T, C) and (B, H, W, C) logits."""
  labels = jnp.asarray(labels)
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f"logits shape {logits.shape} does not match labels shape {labels.shape}")
  c = logits.shape[-1]
  valid = (labels != ignore_index) & (labels >= 0) & (labels < c)
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  return _masked_mean(nll, valid)


def _valid_regression(target: Array, invalid_value) -> Array:
  valid = ~jnp.isnan(target)
  if invalid_value is not None:
    valid &= target != invalid_value
  return valid


def l1_loss(pred: Array, target: Array, invalid_value: float | None = None) -> Array:
  """Mean absolute error over valid entries (NaN targets, and ``invalid_value`` if given)."""
  target = jnp.asarray(target, jnp.float32)
  pred = _match(pred, target).astype(jnp.float32)
  valid = _valid_regression(target, invalid_value)
  return _masked_mean(jnp.abs(pred - jnp.where(valid, target, 0.0)), valid)


def l2_loss(pred: Array, target: Array, invalid_value: float | None = None) -> Array:
  """Mean squared error over valid entries (NaN targets, and ``invalid_value`` if given)."""
  target = jnp.asarray(target, jnp.float32)
  pred = _match(pred, target).astype(jnp.float32)
  valid = _valid_regression(target, invalid_value)
  return _masked_mean(jnp.square(pred - jnp.where(valid, target, 0.0)), valid)


def _unit(x: Array, eps: float = 1e-12) -> Array:
  return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps))


def _valid_normal(target: Array) -> Array:
  """A pixel has a normal when its target vector is finite and not all zero (MTAN's mask)."""
  return jnp.all(jnp.isfinite(target), axis=-1) & jnp.any(target != 0, axis=-1)


def cosine_loss(pred: Array, target: Array) -> Array:
  """``1 - cos(pred, target)`` averaged over pixels with a normal (surface normals, last axis 3).

  As in MTAN (Liu et al. 2019) the prediction is L2-normalised; pixels whose target is all zero
  (or NaN) are ignored. The target is used as given (NYUv2 normals are unit vectors).
  """
  target = jnp.asarray(target, jnp.float32)
  if pred.shape != target.shape:
    raise ValueError(f"prediction shape {pred.shape} does not match target shape {target.shape}")
  valid = _valid_normal(target)
  t = jnp.where(valid[..., None], target, 0.0)
  cos = jnp.sum(_unit(pred.astype(jnp.float32)) * t, axis=-1)
  return _masked_mean(1.0 - cos, valid)


# ---------------------------------------------------------------------------------------------
# Streaming metrics: ``stats`` gives sums and counts for one batch (jit-able), they add up over
# batches (:func:`add_stats`), and ``result`` turns the totals into the reported number.


def add_stats(a: dict | None, b: dict) -> dict:
  """Sum two batches' statistics (``a`` may be None for the first batch)."""
  return dict(b) if a is None else jax.tree.map(lambda x, y: x + y, a, b)


def evaluate_metrics(metrics: Sequence[Metric], batches) -> dict[str, float]:
  """``{metric name: value}`` over an iterable of ``(pred, target)`` batches (host loop)."""
  totals = [None] * len(metrics)
  for pred, target in batches:
    totals = [add_stats(t, m.stats(pred, target)) for t, m in zip(totals, metrics)]
  return {m.name: (m.result(t) if t is not None else float("nan")) for m, t in zip(metrics, totals)}


def _ratio(num, den) -> float:
  num, den = float(num), float(den)
  return num / den if den > 0 else float("nan")


def accuracy(ignore_index: int = -1, name: str = "accuracy") -> Metric:
  """Top-1 accuracy of logits (B, ..., C) against integer labels; ``ignore_index`` ignored."""

  def stats(logits, labels):
    labels = jnp.asarray(labels)
    c = logits.shape[-1]
    valid = (labels != ignore_index) & (labels >= 0) & (labels < c)
    hit = (jnp.argmax(logits, axis=-1) == labels) & valid
    return {"correct": jnp.sum(hit), "count": jnp.sum(valid)}

  return Metric(name, True, stats, lambda s: _ratio(s["correct"], s["count"]))


def _binary_counts(logits, target, threshold):
  target = jnp.asarray(target, jnp.float32)
  logits = _match(logits, target)
  valid = ~jnp.isnan(target)
  pos_true = (target > 0.5) & valid
  pos_pred = (logits > threshold) & valid
  return {
      "tp": jnp.sum(pos_true & pos_pred),
      "fp": jnp.sum(~pos_true & pos_pred & valid),
      "fn": jnp.sum(pos_true & ~pos_pred),
      "count": jnp.sum(valid),
  }


def binary_accuracy(threshold: float = 0.0, name: str = "accuracy") -> Metric:
  """Accuracy of binary logits (positive when ``logit > threshold``); NaN targets ignored."""

  def result(s):
    tn = float(s["count"]) - float(s["tp"]) - float(s["fp"]) - float(s["fn"])
    return _ratio(float(s["tp"]) + tn, s["count"])

  return Metric(name, True, lambda p, t: _binary_counts(p, t, threshold), result)


def binary_f1(threshold: float = 0.0, name: str = "f1") -> Metric:
  """F1 of the positive class for binary logits: ``2 TP / (2 TP + FP + FN)`` over the whole split
  (not averaged over batches); 0 when there is neither a positive label nor a positive
  prediction (scikit-learn's ``zero_division=0``). CelebA reports it per attribute (FAMO)."""

  def result(s):
    den = 2 * float(s["tp"]) + float(s["fp"]) + float(s["fn"])
    return 2 * float(s["tp"]) / den if den > 0 else 0.0

  return Metric(name, True, lambda p, t: _binary_counts(p, t, threshold), result)


def _regression_stats(pred, target, invalid_value=None):
  target = jnp.asarray(target, jnp.float32)
  pred = _match(pred, target).astype(jnp.float32)
  valid = _valid_regression(target, invalid_value)
  err = jnp.where(valid, pred - jnp.where(valid, target, 0.0), 0.0)
  return {"abs": jnp.sum(jnp.abs(err)), "sq": jnp.sum(jnp.square(err)), "count": jnp.sum(valid)}


def mae(name: str = "mae", scale: float = 1.0) -> Metric:
  """Mean absolute error over valid entries, times ``scale`` (e.g. Hartree -> meV for QM9)."""
  return Metric(name, False, _regression_stats,
                lambda s: scale * _ratio(s["abs"], s["count"]))


def rmse(name: str = "rmse", scale: float = 1.0) -> Metric:
  """Root mean squared error over valid entries, times ``scale``."""
  return Metric(name, False, _regression_stats,
                lambda s: scale * float(np.sqrt(_ratio(s["sq"], s["count"]))))


def _confusion(logits, labels, num_classes, ignore_index):
  labels = jnp.asarray(labels)
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  pred = jnp.argmax(logits, axis=-1)
  idx = jnp.where(valid, labels * num_classes + pred, num_classes * num_classes)
  counts = jnp.bincount(idx.reshape(-1), length=num_classes * num_classes + 1)
  return {"confusion": counts[:-1].reshape(num_classes, num_classes)}  # [true, predicted]


def miou(num_classes: int, ignore_index: int = -1, name: str = "miou") -> Metric:
  """Mean intersection-over-union from the split's confusion matrix; classes absent from both
  labels and predictions are left out of the mean.

  Deviation: MTAN's official code averages a per-batch mIoU over batches; this is the
  dataset-level mIoU (the standard definition, independent of the batch size).
  """

  def result(s):
    cm = np.asarray(s["confusion"], np.float64)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    present = union > 0
    return float(np.mean(inter[present] / union[present])) if present.any() else float("nan")

  return Metric(name, True, lambda p, t: _confusion(p, t, num_classes, ignore_index), result)


def pixel_accuracy(num_classes: int, ignore_index: int = -1, name: str = "pixel_accuracy") -> Metric:
  """Fraction of labelled pixels classified correctly (from the same confusion matrix)."""

  def result(s):
    cm = np.asarray(s["confusion"], np.float64)
    return _ratio(np.trace(cm), cm.sum())

  return Metric(name, True, lambda p, t: _confusion(p, t, num_classes, ignore_index), result)


def _depth_stats(pred, target, invalid_value):
  target = jnp.asarray(target, jnp.float32)
  pred = _match(pred, target).astype(jnp.float32)
  valid = _valid_regression(target, invalid_value)
  safe_t = jnp.where(valid, target, 1.0)
  err = jnp.where(valid, jnp.abs(pred - safe_t), 0.0)
  return {"abs": jnp.sum(err), "rel": jnp.sum(jnp.where(valid, err / jnp.abs(safe_t), 0.0)),
          "count": jnp.sum(valid)}


def depth_abs_error(invalid_value: float | None = 0.0, name: str = "abs_err") -> Metric:
  """Mean |pred - depth| over pixels with a depth (MTAN: depth 0 means missing)."""
  return Metric(name, False, lambda p, t: _depth_stats(p, t, invalid_value),
                lambda s: _ratio(s["abs"], s["count"]))


def depth_rel_error(invalid_value: float | None = 0.0, name: str = "rel_err") -> Metric:
  """Mean |pred - depth| / depth over pixels with a depth (MTAN's relative error)."""
  return Metric(name, False, lambda p, t: _depth_stats(p, t, invalid_value),
                lambda s: _ratio(s["rel"], s["count"]))


ANGLE_BIN = 0.05  # degrees: resolution of the streaming median of normal angles
_ANGLE_BINS = int(round(180.0 / ANGLE_BIN))


def normal_angles(pred: Array, target: Array) -> tuple[Array, Array]:
  """Angles in degrees between predicted and target normals, and the valid-pixel mask."""
  target = jnp.asarray(target, jnp.float32)
  valid = _valid_normal(target)
  t = _unit(jnp.where(valid[..., None], target, 1.0))
  cos = jnp.clip(jnp.sum(_unit(pred.astype(jnp.float32)) * t, axis=-1), -1.0, 1.0)
  return jnp.degrees(jnp.arccos(cos)), valid


def _angle_stats(pred, target):
  angle, valid = normal_angles(pred, target)
  idx = jnp.where(valid, jnp.clip((angle / ANGLE_BIN).astype(jnp.int32), 0, _ANGLE_BINS - 1),
                  _ANGLE_BINS)
  hist = jnp.bincount(idx.reshape(-1), length=_ANGLE_BINS + 1)[:-1]
  return {
      "sum": jnp.sum(jnp.where(valid, angle, 0.0)),
      "count": jnp.sum(valid),
      "within_11.25": jnp.sum(valid & (angle < 11.25)),
      "within_22.5": jnp.sum(valid & (angle < 22.5)),
      "within_30": jnp.sum(valid & (angle < 30.0)),
      "hist": hist,
  }


def histogram_median(hist, bin_width: float) -> float:
  """The median of values binned in ``[i w, (i+1) w)``, linearly interpolated inside its bin."""
  hist = np.asarray(hist, np.float64)
  total = hist.sum()
  if total <= 0:
    return float("nan")
  cdf = np.cumsum(hist)
  i = int(np.searchsorted(cdf, total / 2.0))
  below = cdf[i - 1] if i > 0 else 0.0
  frac = (total / 2.0 - below) / hist[i] if hist[i] > 0 else 0.0
  return float((i + frac) * bin_width)


def normal_angle_mean(name: str = "mean_angle") -> Metric:
  """Mean angle (degrees) between predicted and true normals over valid pixels."""
  return Metric(name, False, _angle_stats, lambda s: _ratio(s["sum"], s["count"]))


def normal_angle_median(name: str = "median_angle") -> Metric:
  """Median angle (degrees). Streaming estimate: angles are counted in a histogram of
  ``ANGLE_BIN`` = 0.05 degree bins and the median is interpolated inside its bin, so it is within
  0.05 degree of the exact median (MTAN computes the exact median of all pixels)."""
  return Metric(name, False, _angle_stats, lambda s: histogram_median(s["hist"], ANGLE_BIN))


def normal_within(degrees: float, name: str | None = None) -> Metric:
  """Fraction of valid pixels whose angle error is below ``degrees`` (11.25, 22.5 or 30)."""
  key = {11.25: "within_11.25", 22.5: "within_22.5", 30.0: "within_30"}.get(float(degrees))
  if key is None:
    raise ValueError(f"normal_within: degrees must be one of 11.25, 22.5, 30; got {degrees}")
  return Metric(name or f"within_{degrees:g}", True, _angle_stats,
                lambda s: _ratio(s[key], s["count"]))


# ---------------------------------------------------------------------------------------------
# Task constructors (used by the data modules). ``head`` is a ``() -> flax module`` factory; the
# default is the generic head from :mod:`mtl_jax.models.heads` for that kind of target.


def _head(head, default):
  return default if head is None else head


def binary_task(name: str, head=None, threshold: float = 0.0) -> Task:
  """A binary attribute: one logit, BCE (NaN labels ignored), F1 (main) and accuracy."""
  from mtl_jax.models import heads
  return Task(name, _head(head, functools.partial(heads.DenseHead, 1, squeeze=True)),
              bce_with_logits, (binary_f1(threshold), binary_accuracy(threshold)), "f1")


REGRESSION_LOSSES = {"l1": l1_loss, "l2": l2_loss, "mse": l2_loss, "mae": l1_loss}


def regression_task(name: str, head=None, dim: int = 1, loss: str = "l2",
                    scale: float = 1.0) -> Task:
  """A real-valued target (``dim`` = 1: shape (B,)); NaN targets ignored. Metrics MAE (main) and
  RMSE, times ``scale`` (a unit conversion for reporting)."""
  if loss not in REGRESSION_LOSSES:
    raise ValueError(f"unknown regression loss {loss!r}; valid: {', '.join(REGRESSION_LOSSES)}")
  from mtl_jax.models import heads
  default = functools.partial(heads.DenseHead, int(dim), squeeze=int(dim) == 1)
  return Task(name, _head(head, default), REGRESSION_LOSSES[loss],
              (mae(scale=scale), rmse(scale=scale)), "mae")


def classification_task(name: str, num_classes: int, head=None, ignore_index: int = -1) -> Task:
  """A K-way label per example: cross-entropy (``ignore_index`` ignored) and accuracy."""
  from mtl_jax.models import heads
  loss = functools.partial(cross_entropy, ignore_index=ignore_index)
  return Task(name, _head(head, functools.partial(heads.DenseHead, int(num_classes))), loss,
              (accuracy(ignore_index),), "accuracy")


def token_classification_task(name: str, num_classes: int, head=None,
                              ignore_index: int = -1) -> Task:
  """A label per token of (B, T, C) features (POS, chunking, NER tags; padding = ``ignore_index``):
  per-token cross-entropy and token accuracy."""
  from mtl_jax.models import heads
  loss = functools.partial(cross_entropy, ignore_index=ignore_index)
  return Task(name, _head(head, functools.partial(heads.TokenHead, int(num_classes))), loss,
              (accuracy(ignore_index),), "accuracy")


def segmentation_task(name: str, num_classes: int, head=None, ignore_index: int = -1) -> Task:
  """Semantic segmentation: per-pixel cross-entropy; mIoU (main) and pixel accuracy."""
  from mtl_jax.models import heads
  loss = functools.partial(cross_entropy, ignore_index=ignore_index)
  return Task(name, _head(head, functools.partial(heads.PixelHead, int(num_classes))), loss,
              (miou(num_classes, ignore_index), pixel_accuracy(num_classes, ignore_index)),
              "miou")


def depth_task(name: str = "depth", head=None, invalid_value: float | None = 0.0) -> Task:
  """Depth (B, H, W) or (B, H, W, 1): L1 over pixels with a depth (MTAN); abs (main) and rel error."""
  from mtl_jax.models import heads
  loss = functools.partial(l1_loss, invalid_value=invalid_value)
  return Task(name, _head(head, functools.partial(heads.PixelHead, 1, squeeze=True)), loss,
              (depth_abs_error(invalid_value), depth_rel_error(invalid_value)), "abs_err")


def normal_task(name: str = "normal", head=None) -> Task:
  """Surface normals (B, H, W, 3): cosine loss; mean (main) and median angle, and the fractions
  within 11.25, 22.5 and 30 degrees."""
  from mtl_jax.models import heads
  return Task(name, _head(head, functools.partial(heads.PixelHead, 3)), cosine_loss,
              (normal_angle_mean(), normal_angle_median(), normal_within(11.25),
               normal_within(22.5), normal_within(30.0)), "mean_angle")


def main_metric(task: Task) -> Metric:
  """The task's model-selection metric (its ``main_metric``, else the first)."""
  if not task.metrics:
    raise ValueError(f"task {task.name!r} has no metric")
  if not task.main_metric:
    return task.metrics[0]
  for m in task.metrics:
    if m.name == task.main_metric:
      return m
  raise ValueError(f"task {task.name!r}: main_metric {task.main_metric!r} is not one of "
                   f"{', '.join(m.name for m in task.metrics)}")
