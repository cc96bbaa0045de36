"""Losses and streaming metrics of mtl_jax.tasks against their definitions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from mtl_jax import tasks as T

floats = st.floats(-5, 5, allow_nan=False, width=32)

# Compile without LLVM's optimisation passes (same semantics; the programs are tiny) and run each
# check as one program rather than op-by-op dispatch.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
_BCE = jit(lambda logits, y: T.bce_with_logits(logits[:, None], y))


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.float32, 7, elements=floats), hnp.arrays(np.bool_, 7),
       hnp.arrays(np.bool_, 7))
def test_bce_masks_nan_labels(logits, labels, missing):
  y = np.where(missing, np.nan, labels.astype(np.float32))
  got = float(_BCE(logits, y))
  keep = ~missing
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  ref = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  expect = ref[keep].mean() if keep.any() else 0.0
  np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-5)


def test_losses_degenerate_and_gradients():
  # No valid label: 0 loss and zero (finite) gradient, never NaN.
  losses = (T.bce_with_logits, T.l1_loss, T.l2_loss)

  @jit  # every loss and gradient below: one program
  def run(ones, nan):
    return ([(loss(ones, nan), jax.grad(lambda p: loss(p, nan))(ones)) for loss in losses],
            T.cross_entropy(jnp.zeros((2, 4)), jnp.array([-1, -1])),
            T.bce_with_logits(jnp.array([1e4, -1e4]), jnp.array([0.0, 1.0])))

  values, ce, big = run(np.ones(3, np.float32), np.full((3,), np.nan, np.float32))
  for value, g in values:
    assert float(value) == 0.0
    assert np.all(np.asarray(g) == 0)
  assert float(ce) == 0.0
  # Large logits stay finite.
  assert np.isfinite(float(big))
  with pytest.raises(ValueError, match="does not match"):
    T.l1_loss(jnp.ones((3, 2)), jnp.ones(3))


def test_cross_entropy_ignores_label_and_matches_definition():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4)).astype(np.float32)
  labels = np.array([[0, 3, -1], [255, 2, 1]])
  got = float(T.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  valid = [(0, 0, 0), (0, 1, 3), (1, 1, 2), (1, 2, 1)]  # -1 ignored, 255 out of range ignored
  np.testing.assert_allclose(got, -np.mean([logp[i, j, c] for i, j, c in valid]), rtol=1e-5)
  got = float(T.cross_entropy(jnp.asarray(logits), jnp.asarray(np.where(labels == -1, 255, labels)),
                              ignore_index=255))
  valid = [(0, 0, 0), (0, 1, 3), (1, 1, 2), (1, 2, 1)]
  np.testing.assert_allclose(got, -np.mean([logp[i, j, c] for i, j, c in valid]), rtol=1e-5)


# The hand-written losses these replaced (optax.losses now), kept here as the reference: the values
# and gradients must not move, masked entries and extreme logits included.
def _previous_bce(pred, target):
  valid = ~jnp.isnan(target)
  t = jnp.where(valid, target, 0.0)
  loss = jnp.maximum(pred, 0.0) - pred * t + jnp.log1p(jnp.exp(-jnp.abs(pred)))
  return T._masked_mean(loss, valid)


def _previous_ce(logits, labels, ignore_index=-1):
  c = logits.shape[-1]
  valid = (labels != ignore_index) & (labels >= 0) & (labels < c)
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return T._masked_mean(-jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0], valid)


@jit
def _both_losses(x, y, logits, labels):
  def pair(f, g, *a):
    return (f(*a), g(*a), jax.grad(f)(*a), jax.grad(g)(*a))
  return (pair(T.bce_with_logits, _previous_bce, x, y),
          pair(T.cross_entropy, _previous_ce, logits, labels))


def test_losses_match_previous_implementation_masked_and_extreme():
  # logits from tiny to 1e4 (where exp overflows float32) with soft, hard and missing labels
  x = np.array([0.0, 1e-6, -3.5, 17.0, 88.0, 1e4, -1e4, 2.5, -60.0, 1e4], np.float32)
  y = np.array([0.0, 1.0, 0.3, 1.0, 0.0, 0.0, 1.0, np.nan, 1.0, np.nan], np.float32)
  rng = np.random.default_rng(1)
  logits = (rng.normal(size=(3, 5, 6)) * np.array([1, 30, 1e3])[:, None, None]).astype(np.float32)
  logits[0, 0] = [1e4, -1e4, 0, 0, 0, 0]
  labels = rng.integers(-1, 7, size=(3, 5))  # -1 ignored, 6 out of range: both masked
  labels[0, 0] = 1  # the -1e4 logit's class: loss 2e4, finite
  (bce, bce0, gb, gb0), (ce, ce0, gc, gc0) = _both_losses(x, y, logits, labels)
  for new, old in ((bce, bce0), (ce, ce0), (gc, gc0)):
    assert np.all(np.isfinite(np.asarray(new)))
    np.testing.assert_allclose(np.asarray(new), np.asarray(old), rtol=2e-6, atol=1e-7)
  # BCE's gradient against the analytic one, (sigmoid(x) - t) / n_valid: the previous formula's
  # max/abs kinks gave 0 at x = 0 exactly (true value 0.5 / n); optax's is exact there.
  keep = ~np.isnan(y)
  sig = 1 / (1 + np.exp(-np.clip(x.astype(np.float64), -500, 500)))
  want = np.where(keep, sig - np.nan_to_num(y), 0.0) / keep.sum()
  np.testing.assert_allclose(np.asarray(gb), want, rtol=1e-5, atol=1e-8)
  assert float(np.asarray(gb0)[0]) == 0.0 and float(np.asarray(gb)[0]) == pytest.approx(0.5 / 8)
  assert float(ce) > 1e3  # the extreme entry is counted, not clipped
  # masked entries carry no gradient
  assert np.all(np.asarray(gb)[np.isnan(y)] == 0)
  masked = (labels < 0) | (labels >= 6)
  assert masked.any() and np.all(np.asarray(gc)[masked] == 0)


def test_depth_and_cosine_losses_mask_missing_pixels():
  pred = jnp.array([[1.0, 2.0], [3.0, 5.0]])
  depth = jnp.array([[2.0, 0.0], [1.0, 5.0]])  # 0 = no depth
  np.testing.assert_allclose(float(T.l1_loss(pred, depth, invalid_value=0.0)), (1 + 2 + 0) / 3)
  n = jnp.array([[[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])  # second pixel: no normal
  p = jnp.array([[[0.0, 0.0, 7.0], [1.0, 0.0, 0.0]]])
  assert float(T.cosine_loss(p, n)) == pytest.approx(0.0, abs=1e-6)
  p = jnp.array([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
  assert float(T.cosine_loss(p, n)) == pytest.approx(1.0, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.float32, 12, elements=floats), hnp.arrays(np.bool_, 12),
       st.integers(1, 11))
def test_binary_f1_streams_over_batches(logits, labels, cut):
  y = labels.astype(np.float32)
  m = T.binary_f1()
  total = T.evaluate_metrics([m], [(logits[:cut], y[:cut]), (logits[cut:], y[cut:])])["f1"]
  pred = logits > 0
  tp, fp, fn = np.sum(pred & labels), np.sum(pred & ~labels), np.sum(~pred & labels)
  expect = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
  np.testing.assert_allclose(total, expect, rtol=1e-6)
  acc = T.evaluate_metrics([T.binary_accuracy()], [(logits, y)])["accuracy"]
  np.testing.assert_allclose(acc, np.mean(pred == labels))


def test_regression_metrics_and_nan_targets():
  pred = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
  y = np.array([2.0, np.nan, 1.0, 4.0], np.float32)
  r = T.evaluate_metrics([T.mae(), T.rmse(), T.mae("mae_mev", scale=1000.0)],
                         [(pred[:2], y[:2]), (pred[2:], y[2:])])
  np.testing.assert_allclose(r["mae"], (1 + 2 + 0) / 3)
  np.testing.assert_allclose(r["rmse"], np.sqrt((1 + 4 + 0) / 3))
  np.testing.assert_allclose(r["mae_mev"], 1000.0)


def test_segmentation_miou_and_pixel_accuracy():
  labels = np.array([[0, 0, 1, -1], [2, 2, 1, 1]])
  pred_cls = np.array([[0, 1, 1, 2], [2, 0, 1, 1]])
  logits = np.eye(3)[pred_cls].astype(np.float32)
  task = T.segmentation_task("seg", 3)
  r = T.evaluate_metrics(task.metrics, [(logits[:1], labels[:1]), (logits[1:], labels[1:])])
  # class 0: inter 1, union 3; class 1: inter 3, union 4; class 2: inter 1, union 2
  np.testing.assert_allclose(r["miou"], np.mean([1 / 3, 3 / 4, 1 / 2]))
  np.testing.assert_allclose(r["pixel_accuracy"], 5 / 7)
  assert task.main_metric == "miou" and T.main_metric(task).higher_is_better


def test_depth_metrics():
  pred = np.array([[1.0, 2.0, 9.0]], np.float32)
  depth = np.array([[2.0, 4.0, 0.0]], np.float32)
  r = T.evaluate_metrics(T.depth_task().metrics, [(pred, depth)])
  np.testing.assert_allclose(r["abs_err"], 1.5)
  np.testing.assert_allclose(r["rel_err"], (0.5 + 0.5) / 2)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_normal_angle_metrics(seed):
  rng = np.random.default_rng(seed)
  n = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
  n /= np.linalg.norm(n, axis=-1, keepdims=True)
  p = n + 0.7 * rng.normal(size=n.shape).astype(np.float32)
  n[0, 0, 0] = 0.0  # a pixel without a normal
  r = T.evaluate_metrics(T.normal_task().metrics, [(p[:1], n[:1]), (p[1:], n[1:])])
  valid = np.any(n != 0, -1)
  cos = np.sum(p / np.linalg.norm(p, axis=-1, keepdims=True) * n, -1)[valid]
  ang = np.degrees(np.arccos(np.clip(cos, -1, 1)))
  np.testing.assert_allclose(r["mean_angle"], ang.mean(), rtol=1e-3, atol=1e-3)
  # The streaming median is within one histogram bin of the exact one.
  assert abs(r["median_angle"] - np.median(ang)) <= T.ANGLE_BIN + 1e-3
  for t in (11.25, 22.5, 30):
    np.testing.assert_allclose(r[f"within_{t:g}"], np.mean(ang < t), atol=1.5 / ang.size)


def test_histogram_median():
  hist = np.zeros(10)
  hist[3] = 4
  assert T.histogram_median(hist, 1.0) == pytest.approx(3.5)
  assert np.isnan(T.histogram_median(np.zeros(4), 1.0))


def test_task_constructors_and_errors():
  import flax.linen as nn
  for task in (T.binary_task("a"), T.regression_task("r", dim=2),
               T.classification_task("c", 5), T.token_classification_task("pos", 7),
               T.segmentation_task("s", 4), T.depth_task(), T.normal_task()):
    assert isinstance(task.head(), nn.Module) and task.metrics
    assert T.main_metric(task).name == (task.main_metric or task.metrics[0].name)
  assert not T.depth_task().metrics[0].higher_is_better
  assert T.binary_task("a").metrics[0].name == "f1"
  with pytest.raises(ValueError, match="valid: l1, l2, mse, mae"):
    T.regression_task("r", loss="huber")
  with pytest.raises(ValueError, match="11.25, 22.5, 30"):
    T.normal_within(45)
  # The token head keeps the positions; the binary head squeezes to (B,).
  z = jnp.ones((2, 3, 4))
  head = T.token_classification_task("pos", 7).head()
  assert head.apply(head.init(jax.random.key(0), z), z).shape == (2, 3, 7)
  head = T.binary_task("a").head()
  img = jnp.ones((2, 4, 4, 8))
  assert head.apply(head.init(jax.random.key(0), img), img).shape == (2,)
