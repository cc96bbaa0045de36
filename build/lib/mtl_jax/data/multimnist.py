"""MultiMNIST (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018)
and an offline variant built from scikit-learn's 8×8 digits (``data.name='digits'``).

Construction, as the official code (``multi_task/loaders/multi_mnist_loader.py``) does it: every
image is paired with one partner drawn at random (with replacement) from the same split; on a 36×36
canvas the image goes top-left (rows/cols 0:28) and its partner bottom-right (6:34), the overlap
taking the pixel-wise maximum; the canvas is resized back to 28×28 with nearest-neighbour
interpolation; tasks ``left`` (the top-left digit's class) and ``right`` (the partner's class).
Inputs are normalised as the official loader does (``ToTensor`` then mean 0.1307, std 0.3081).
The pairing is drawn once per split from a fixed seed (``data.pair_seed``, default 0).

Deviations: the official code draws its pairing with an unseeded ``np.random`` (so its data set
differs run to run); here it is seeded. It has no validation split; here a fixed-seed 10,000 of the
60,000 training digits form ``validation`` (pairs are drawn within each split, so no digit is shared
across splits); ``test`` is built from the 10,000 MNIST test digits.

Digits variant (offline, real data): scikit-learn's ``load_digits`` (1,797 8×8 images, values 0..16)
scaled to 0..255, upsampled 8→28 with linear interpolation (PIL BILINEAR), then the same construction; the digits
are split 60/20/20 (train/validation/test, fixed seed) and each digit is paired with
``data.pairs_per_image`` partners (default 4) from its split, giving 4,312 / 1,436 / 1,440 images.

Batch: ``{'inputs': float32 [B, 28, 28, 1], 'targets': {'left': int32 [B], 'right': int32 [B]}}``.
"""

from __future__ import annotations

import numpy as np

from mtl_jax.data import common, tfds_utils
from mtl_jax.data.base import ArrayLoader, Benchmark
from mtl_jax.data.registry import register

TASKS = ("left", "right")
SPLITS = ("train", "validation", "test")
MEAN, STD = 0.1307, 0.3081
CANVAS, DIGIT, OFFSET, OUT = 36, 28, 6, 28
MNIST_VALIDATION = 10000
MOCK_SIZES = {"train": 48, "validation": 16, "test": 16}


def overlay(left: np.ndarray, right: np.ndarray, out_size: int = OUT) -> np.ndarray:
  """Sener & Koltun's composite of two ``[N, 28, 28]`` digit stacks → ``[N, out, out]`` (float)."""
  n = left.shape[0]
  canvas = np.zeros((n, CANVAS, CANVAS), np.float32)
  canvas[:, :DIGIT, :DIGIT] = left
  canvas[:, OFFSET:OFFSET + DIGIT, OFFSET:OFFSET + DIGIT] = right
  canvas[:, OFFSET:DIGIT, OFFSET:DIGIT] = np.maximum(left[:, OFFSET:, OFFSET:],
                                                     right[:, :DIGIT - OFFSET, :DIGIT - OFFSET])
  rows = common.nearest_indices(CANVAS, out_size)
  return canvas[:, rows][:, :, rows]


def make_pairs(images: np.ndarray, labels: np.ndarray, pairs_per_image: int, seed: int):
  """Each image (on the left) with ``pairs_per_image`` partners drawn from the same set."""
  rng = np.random.default_rng(seed)
  n = len(images)
  left = np.repeat(np.arange(n), pairs_per_image)
  right = rng.integers(0, n, size=left.shape)
  composite = overlay(images[left].astype(np.float32), images[right].astype(np.float32))
  return composite, labels[left].astype(np.int32), labels[right].astype(np.int32)


def normalise(images: np.ndarray) -> np.ndarray:
  """0..255 ``[N, H, W]`` → float32 ``[N, H, W, 1]``, ``(x / 255 - mean) / std``."""
  return ((images / 255.0 - MEAN) / STD).astype(np.float32)[..., None]


def _tasks(names):
  """Sener & Koltun's task heads (dense 50 → dropout → dense 10, ``models.lenet.lenet_head``),
  cross-entropy and accuracy."""
  import functools  # pylint: disable=g-import-not-at-top

  from mtl_jax import tasks as T  # pylint: disable=g-import-not-at-top
  from mtl_jax.models import lenet  # pylint: disable=g-import-not-at-top

  return tuple(T.classification_task(n, 10, head=functools.partial(lenet.lenet_head, 10))
               for n in names)


def _array_benchmark(name, config, arrays, info):
  """A Benchmark over in-memory ``{split: (images, left, right)}``."""
  tasks = common.select(config.tasks, TASKS, f"{name} tasks")
  sizes = {s: int(len(arrays[s][0])) for s in SPLITS}
  workers = common.workers(config, file_backed=False)  # in memory: 0 unless asked for

  def loader(split, batch_size, seed=0, shuffle=None, process_index=0, process_count=1,
             position=0):
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    x, yl, yr = arrays[split]
    labels = {"left": yl, "right": yr}

    def fetch(idx):
      return {"inputs": x[idx], "targets": {t: labels[t][idx] for t in tasks}}

    shuffle = split == "train" if shuffle is None else shuffle
    return ArrayLoader(sizes[split], fetch, batch_size, seed=seed, shuffle=shuffle,
                       process_index=process_index, process_count=process_count,
                       position=position, workers=workers)

  return Benchmark(name=name, tasks=_tasks(tasks), backbone=common.backbone(config, "lenet", image_size=OUT),
                   loader=loader, reference={}, split_sizes=sizes, info=info)


def _mnist_splits(config):
  mock = bool(common.config_get(config, "data.mock", False))
  if mock:
    raw = {s: common.stack(tfds_utils.mock_examples("mnist", s if s == "test" else "train",
                                                        MOCK_SIZES[s]))
           for s in SPLITS}
    return {s: (raw[s]["image"][..., 0], raw[s]["label"]) for s in SPLITS}
  data_dir = common.config_get(config, "data.data_dir", "")
  out = {}
  for split in ("train", "test"):
    source = tfds_utils.open_source("mnist", split, data_dir)
    examples = [source[i] for i in range(len(source))]
    out[split] = (np.stack([e["image"][..., 0] for e in examples]),
                  np.array([e["label"] for e in examples]))
  train_idx, val_idx = common.split_indices(
      len(out["train"][0]), [1 - MNIST_VALIDATION / len(out["train"][0]),
                             MNIST_VALIDATION / len(out["train"][0])], seed=0)
  images, labels = out["train"]
  out["train"], out["validation"] = ((images[train_idx], labels[train_idx]),
                                     (images[val_idx], labels[val_idx]))
  return out


@register("multimnist")
def get_benchmark(config) -> Benchmark:
  pair_seed = int(common.config_get(config, "data.pair_seed", 0))
  splits = _mnist_splits(config)
  arrays = {}
  for i, s in enumerate(SPLITS):
    x, yl, yr = make_pairs(splits[s][0], splits[s][1], 1, seed=pair_seed * 7919 + i)
    arrays[s] = (normalise(x), yl, yr)
  return _array_benchmark("multimnist", config, arrays, {
      "mock": bool(common.config_get(config, "data.mock", False)), "source": "tfds mnist",
      "paper": "Sener & Koltun (NeurIPS 2018), MultiMNIST"})


DIGITS_FRACTIONS = (0.6, 0.2, 0.2)


def digits_images():
  """scikit-learn's digits as 0..255 ``[1797, 28, 28]`` (linear upsampling) and labels."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  d = load_digits()
  images = d.images.astype(np.float32) * (255.0 / 16.0)
  up = common.resize_bilinear(images, (DIGIT, DIGIT))  # upsampling: PIL's linear filter
  return np.clip(up, 0, 255), d.target.astype(np.int32)


@register("digits")
def get_digits_benchmark(config) -> Benchmark:
  pair_seed = int(common.config_get(config, "data.pair_seed", 0))
  per = int(common.config_get(config, "data.pairs_per_image", 4))
  images, labels = digits_images()
  parts = common.split_indices(len(images), DIGITS_FRACTIONS, seed=0)
  arrays = {}
  for i, (s, idx) in enumerate(zip(SPLITS, parts)):
    x, yl, yr = make_pairs(images[idx], labels[idx], per, seed=pair_seed * 7919 + i)
    arrays[s] = (normalise(x), yl, yr)
  return _array_benchmark("digits", config, arrays, {
      "mock": False, "source": "sklearn.datasets.load_digits (offline)",
      "paper": "Sener & Koltun (NeurIPS 2018) construction on 8x8 digits"})
