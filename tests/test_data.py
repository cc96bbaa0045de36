"""Benchmark pipelines on mock / fabricated / offline data: shapes, dtypes, label ranges, split
sizes, determinism, resume position, error messages."""

import os

import numpy as np
import pytest

from configs.common import base_config
import mtl_jax.data as D
from mtl_jax.data import celeba, common, dense, multimnist, nlp, tfds_utils


def _config(name, **data):
  c = base_config()
  c.data.name = name
  c.data.mock = True
  for k, v in data.items():
    c.data[k] = v
  return c


@pytest.fixture(scope="module")
def benches():
  return {
      "celeba": D.get_benchmark(_config("celeba", image_size=16)),
      "multimnist": D.get_benchmark(_config("multimnist")),
      "nyuv2": D.get_benchmark(_config("nyuv2", image_size=12)),
      "cityscapes": D.get_benchmark(_config("cityscapes", image_size=8)),
      "conll2003": D.get_benchmark(_config("conll2003", max_length=12)),
      "glue": D.get_benchmark(_config("glue", max_length=12)),
  }


def test_registry_names_and_unknown():
  assert {"celeba", "multimnist", "digits", "nyuv2", "cityscapes", "conll2003", "glue"} <= set(
      D.names())
  c = _config("imagenet")
  with pytest.raises(ValueError, match="unknown benchmark 'imagenet'; valid: .*celeba"):
    D.get_benchmark(c)


def test_celeba_batch(benches):
  b = benches["celeba"]
  assert [t.name for t in b.tasks] == list(celeba.ATTRIBUTES)
  assert b.split_sizes == celeba.MOCK_SIZES
  batch = next(b.loader("train", 8))
  assert batch["inputs"].shape == (8, 16, 16, 3) and batch["inputs"].dtype == np.float32
  assert 0.0 <= batch["inputs"].min() and batch["inputs"].max() <= 1.0
  assert set(batch["targets"]) == set(celeba.ATTRIBUTES)
  for y in batch["targets"].values():
    assert y.shape == (8,) and y.dtype == np.float32 and set(np.unique(y)) <= {0.0, 1.0}
  assert b.reference["Young"]["f1"] == pytest.approx(0.91907)


def test_celeba_subset_order_and_bad_name():
  c = _config("celeba", image_size=8)
  c.tasks = "Smiling,Male"
  b = D.get_benchmark(c)
  assert [t.name for t in b.tasks] == ["Smiling", "Male"]
  assert list(next(b.loader("validation", 4))["targets"]) == ["Smiling", "Male"]
  c.tasks = "Smiling,Happy"
  with pytest.raises(ValueError, match="unknown CelebA attributes \\['Happy'\\]; valid: 5_o"):
    D.get_benchmark(c)


def test_resize_bilinear_constant_preserved_and_antialiased():
  img = np.full((1, 218, 178, 3), 77, np.uint8)
  out = common.resize_bilinear(img, (64, 64))
  assert out.dtype == np.uint8 and out.shape == (1, 64, 64, 3) and np.all(out == 77)
  np.testing.assert_allclose(common.resize_bilinear(np.full((1, 9, 7), 0.3, np.float32), (4, 3)),
                             0.3, rtol=1e-6)
  # Downscaling by 2 with the antialiased triangle filter averages neighbouring pixels.
  x = np.arange(8, dtype=np.float32)[None, None, :].repeat(2, 1)
  y = common.resize_bilinear(x, (2, 4))[0, 0]
  # Pixel 0: centre 1.0, support 2: sources 0, 1, 2 weigh 0.75, 0.75, 0.25 (edge-renormalised).
  np.testing.assert_allclose(y, [1.25 / 1.75, 2.5, 4.5, 7 - 1.25 / 1.75], rtol=1e-5)


def test_multimnist_overlay_matches_construction():
  left = np.zeros((1, 28, 28), np.float32)
  right = np.zeros((1, 28, 28), np.float32)
  left[0, 0, 0], right[0, 27, 27], left[0, 10, 10], right[0, 4, 4] = 255, 200, 50, 80
  canvas = multimnist.overlay(left, right, out_size=36)  # no resize: the 36x36 canvas
  assert canvas[0, 0, 0] == 255 and canvas[0, 33, 33] == 200
  assert canvas[0, 10, 10] == 80  # overlap: max(left 50, right[4, 4] = 80)
  assert multimnist.overlay(left, right).shape == (1, 28, 28)


def test_multimnist_and_digits(benches):
  b = benches["multimnist"]
  batch = next(b.loader("train", 8))
  assert batch["inputs"].shape == (8, 28, 28, 1) and batch["inputs"].dtype == np.float32
  for t in ("left", "right"):
    assert batch["targets"][t].dtype == np.int32
    assert 0 <= batch["targets"][t].min() and batch["targets"][t].max() <= 9
  c = base_config()
  c.data.name = "digits"
  d = D.get_benchmark(c)
  assert d.split_sizes == {"train": 4312, "validation": 1436, "test": 1440}
  x = next(d.loader("test", 16, shuffle=False))
  assert x["inputs"].shape == (16, 28, 28, 1)
  # Normalised with MNIST's statistics: background pixels are (0 - 0.1307) / 0.3081.
  assert x["inputs"].min() == pytest.approx(-0.1307 / 0.3081, rel=1e-5)
  labels = np.concatenate([d.loader("train", 512).fetch(np.arange(4312))["targets"]["left"]])
  assert set(np.unique(labels)) == set(range(10))


def test_dense_fabricated_folder_roundtrip(tmp_path):
  root = dense.write_fabricated(dense.NYUV2, str(tmp_path), sizes={"train": 5, "val": 3},
                                shape=(8, 12))
  c = base_config()
  c.data.name, c.data.data_dir = "nyuv2", root
  b = D.get_benchmark(c)
  assert b.split_sizes == {"train": 5, "validation": 3, "test": 3}
  batch = next(b.loader("test", 3, shuffle=False))
  raw = np.load(os.path.join(root, "val", "normal", "1.npy"))
  np.testing.assert_array_equal(batch["targets"]["normal"][1], raw)
  seg = batch["targets"]["segmentation"]
  assert seg.dtype == np.int32 and seg.shape == (3, 8, 12)
  assert seg.min() >= -1 and seg.max() < 13
  assert batch["targets"]["depth"].shape == (3, 8, 12, 1)
  assert set(b.reference) == {"segmentation", "depth", "normal"}
  assert b.reference["segmentation"]["miou"] == 0.3830


def test_dense_missing_folder_message(tmp_path):
  c = base_config()
  c.data.name, c.data.data_dir = "cityscapes", str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="cityscapes folder .* not found: download the "
                     "MTAN-preprocessed Cityscapes"):
    D.get_benchmark(c)


def test_augmentation_keeps_ranges_and_flips_normals():
  rng = np.random.default_rng(0)
  ex = dense.fabricate_example(dense.NYUV2, (12, 16), rng)
  ex["segmentation"] = ex["segmentation"][..., None]
  for seed in range(6):
    out = dense.random_scale_crop_flip(ex, np.random.default_rng(seed))
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ex.items()}
    assert set(np.unique(out["segmentation"])) <= set(np.unique(ex["segmentation"]))
  # Scale 1 and a flip: the image is mirrored and the normals' x component negated.
  class Fixed:
    def integers(self, lo, hi=None):
      return 0
    def uniform(self):
      return 0.0
  out = dense.random_scale_crop_flip(ex, Fixed())
  np.testing.assert_allclose(out["image"], ex["image"][:, ::-1], atol=1e-6)
  np.testing.assert_allclose(out["normal"][..., 0], -ex["normal"][:, ::-1, 0], atol=1e-6)
  np.testing.assert_array_equal(out["depth"], ex["depth"][:, ::-1])


def test_dense_mock(benches):
  b = benches["cityscapes"]
  batch = next(b.loader("train", 2))
  assert batch["inputs"].shape == (2, 8, 16, 3)
  assert set(batch["targets"]) == {"segmentation", "depth"}
  assert batch["targets"]["segmentation"].max() < 7


def test_conll(benches):
  b = benches["conll2003"]
  batch = next(b.loader("train", 4))
  tok, mask = batch["inputs"]["tokens"], batch["inputs"]["mask"]
  assert tok.shape == (4, 12) and tok.dtype == np.int32 and mask.dtype == np.bool_
  assert tok.max() < b.info["vocab_size"]
  for t, n in nlp.CONLL_CLASSES.items():
    y = batch["targets"][t]
    assert y.shape == (4, 12) and y.dtype == np.int32
    assert np.all((y == -1) == ~mask) and y.max() < n


def test_vocab_and_pairs_deterministic():
  v = nlp.build_vocab([["b", "a", "b"], ["c", "a"]], vocab_size=6, min_count=1)
  assert v == {"a": 4, "b": 5}  # ties broken by the word; 4 specials fill the rest
  assert nlp.split_words("Don't stop!") == ["don", "'", "t", "stop", "!"]
  ids = nlp.pair_ids([10] * 6, [11] * 3, max_length=8)
  assert ids == [nlp.CLS, 10, 10, nlp.SEP, 11, 11, 11, nlp.SEP]  # ties trim the first


def test_glue_multi_input(benches):
  b = benches["glue"]
  assert b.multi_input and [t.name for t in b.tasks] == list(nlp.GLUE_TASKS)
  loader = b.loader("train", 8)
  batch = next(loader)
  assert set(batch) == set(nlp.GLUE_TASKS)
  for t, sub in batch.items():
    assert list(sub["targets"]) == [t] and sub["targets"][t].shape == (8,)
    assert sub["inputs"]["tokens"].shape == (8, 12)
  # Evaluation: each task's split once; exhausted tasks are padded with ignored labels.
  sizes = {t: 0 for t in nlp.GLUE_TASKS}
  for batch in b.loader("test", 5).epoch():
    for t in sizes:
      sizes[t] += int(np.sum(~np.isnan(batch[t]["targets"][t])))
  assert sizes == b.info["task_split_sizes"]["test"]
  # The Matthews correlation of perfect and inverted predictions.
  m = nlp.matthews_corrcoef()
  y = np.array([1.0, 0.0, 1.0, 0.0])
  assert m.result(m.stats(np.array([5.0, -5.0, 5.0, -5.0]), y)) == pytest.approx(1.0)
  assert m.result(m.stats(np.array([-5.0, 5.0, -5.0, 5.0]), y)) == pytest.approx(-1.0)


@pytest.mark.parametrize("name", ["celeba", "multimnist", "nyuv2", "conll2003", "glue"])
def test_determinism_and_resume(benches, name):
  b = benches[name]
  a = b.loader("train", 4, seed=3)
  run = [next(a) for _ in range(5)]
  again = b.loader("train", 4, seed=3)
  again.position = 3
  np.testing.assert_equal(next(again), run[3])
  resumed = b.loader("train", 4, seed=3, position=4)
  np.testing.assert_equal(next(resumed), run[4])
  other = next(b.loader("train", 4, seed=4))
  assert not all(np.array_equal(u, v) for u, v in zip(_leaves(other), _leaves(run[0])))


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def test_split_sizes_and_sharding(benches):
  b = benches["multimnist"]
  for s, n in b.split_sizes.items():
    seen = np.concatenate([x["targets"]["left"] for x in b.loader(s, 5, shuffle=False).epoch()])
    assert len(seen) == n
  h0 = b.loader("train", 8, process_index=0, process_count=2)
  h1 = b.loader("train", 8, process_index=1, process_count=2)
  i0, i1 = h0.indices(0), h1.indices(0)
  assert len(i0) == len(i1) == 4 and not set(i0) & set(i1)
  with pytest.raises(ValueError, match="unknown split 'dev'; valid: train, validation, test"):
    b.loader("dev", 4)


def test_tfds_not_prepared_and_tfrecord_messages(tmp_path):
  with pytest.raises(tfds_utils.DatasetNotPreparedError,
                     match="not prepared .* `python launch/prepare.py celeba --source=DIR"):
    tfds_utils.check_prepared("celeb_a", str(tmp_path))
  vdir = tmp_path / "celeb_a" / "2.1.0"
  vdir.mkdir(parents=True)
  (vdir / "celeb_a-train.tfrecord-00000-of-00001").write_bytes(b"")
  with pytest.raises(tfds_utils.DatasetNotPreparedError,
                     match="tfrecord-only .* `python launch/prepare.py convert --source="):
    tfds_utils.check_prepared("celeb_a", str(tmp_path))
  (vdir / "celeb_a-train.array_record-00000-of-00001").write_bytes(b"")
  tfds_utils.check_prepared("celeb_a", str(tmp_path))  # array_record present: fine
  c = base_config()
  c.data.name, c.data.data_dir = "celeba", str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="tfds dataset 'celeb_a' is not prepared"):
    D.get_benchmark(c)


def test_task_losses_accept_pipeline_targets(benches):
  """Each benchmark's targets fit its tasks' losses and metrics (shapes the heads produce)."""
  import jax.numpy as jnp
  b = benches["nyuv2"]
  batch = next(b.loader("train", 2))
  t = batch["targets"]
  preds = {"segmentation": jnp.zeros(t["segmentation"].shape + (13,)),
           "depth": jnp.ones(t["depth"].shape), "normal": jnp.asarray(t["normal"])}
  for task in b.tasks:
    loss = task.loss(preds[task.name], t[task.name])
    assert np.isfinite(float(loss))
  normal = {m.name: m for m in b.tasks[2].metrics}
  assert normal["mean_angle"].result(normal["mean_angle"].stats(preds["normal"], t["normal"])) \
      == pytest.approx(0.0, abs=0.1)
