"""CelebA: 40 binary face attributes (Liu et al., 2015) under the FAMO protocol.

Protocol (Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023, and its
repository's ``experiments/celeba``): the aligned 218×178 images resized to 64×64 (torchvision
``Resize((64, 64))`` on PIL images, i.e. antialiased bilinear, then ``ToTensor``: values in [0, 1],
no normalisation), the official train / validation / test partition (162,770 / 19,867 / 19,962), one
binary task per attribute with BCE, F1 per attribute, model selection on mean validation F1.

Source: tfds ``celeb_a`` read with ``tfds.data_source`` (no TensorFlow), prepared from the official
files with ``python launch/prepare.py celeba --source=DIR`` (:mod:`mtl_jax.data.prepare`). Tasks are
named as tfds names the attributes (``5_o_Clock_Shadow`` ... ``Young``); ``config.tasks`` selects
any subset in any order.

Pipeline: the JPEGs are decoded (by tfds) and resized with PIL's BILINEAR on the 8-bit images,
exactly torchvision's ``Resize`` on PIL images, in ``config.data.workers`` grain worker processes
(-1: one per core less one; see :class:`mtl_jax.data.base.ArrayLoader`).

Batch: ``{'inputs': float32 [B, 64, 64, 3], 'targets': {attr: float32 [B] in {0, 1}}}``.
"""

from __future__ import annotations

import numpy as np

from mtl_jax.data import common, tfds_utils
from mtl_jax.data.base import ArrayLoader, Benchmark
from mtl_jax.data.registry import register

TFDS_NAME = "celeb_a"

# The tfds attribute order (alphabetical, as list_attr_celeba.txt).
ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
    "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young")

# Single-task F1 per attribute in the tfds order, published by the FAMO authors (REFERENCES.md).
STL_F1 = (
    0.6736886, 0.68121034, 0.81524944, 0.5760289, 0.7205613, 0.8555076, 0.38203922, 0.58225113,
    0.787647, 0.8321292, 0.5029583, 0.68694085, 0.6781237, 0.5240381, 0.5161666, 0.95694304,
    0.6968786, 0.67976356, 0.8808315, 0.8582131, 0.97034, 0.93267566, 0.5057539, 0.40307626,
    0.9703734, 0.48644206, 0.60786104, 0.5261031, 0.56907415, 0.59815097, 0.6858371, 0.924108,
    0.5424991, 0.7406311, 0.71019936, 0.87365365, 0.9305602, 0.33704284, 0.7647628, 0.91907)

SPLITS = ("train", "validation", "test")
SPLIT_SIZES = {"train": 162770, "validation": 19867, "test": 19962}
MOCK_SIZES = {"train": 48, "validation": 16, "test": 16}
IMAGE_SIZE = 64


def images_to_model(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 ``[B, H, W, 3]`` → float32 ``[B, size, size, 3]`` in [0, 1] (Resize then ToTensor)."""
  return common.resize_bilinear(images, (size, size)).astype(np.float32) / 255.0


def make_fetch(source, attributes, size):
  """``indices -> batch`` over a random-access source of tfds examples (or a stacked dict)."""

  def fetch(indices):
    if isinstance(source, dict):  # materialised (mock) examples
      images = source["image"][indices]
      attrs = {a: source["attributes"][a][indices] for a in attributes}
    else:
      idx = [int(i) for i in indices]
      examples = (source.__getitems__(idx) if hasattr(source, "__getitems__")
                  else [source[i] for i in idx])
      images = np.stack([e["image"] for e in examples])
      attrs = {a: np.array([e["attributes"][a] for e in examples]) for a in attributes}
    return {
        "inputs": images_to_model(images, size),
        "targets": {a: attrs[a].astype(np.float32) for a in attributes},
    }

  return fetch


def _tasks(attributes):
  """One-logit heads on the pooled 512-d representation, BCE, F1 (main) and accuracy."""
  from mtl_jax import tasks as T  # pylint: disable=g-import-not-at-top

  return tuple(T.binary_task(a) for a in attributes)


@register("celeba")
def get_benchmark(config) -> Benchmark:
  attributes = common.select(config.tasks, ATTRIBUTES, "CelebA attributes")
  size = int(common.config_get(config, "data.image_size", 0) or IMAGE_SIZE)
  mock = bool(common.config_get(config, "data.mock", False))
  data_dir = common.config_get(config, "data.data_dir", "")
  workers = common.workers(config, file_backed=not mock)
  if mock:
    sources = {s: common.stack(tfds_utils.mock_examples(TFDS_NAME, s, MOCK_SIZES[s]))
               for s in SPLITS}
    sizes = dict(MOCK_SIZES)
  else:
    sizes = tfds_utils.split_sizes(TFDS_NAME, data_dir)
    sources = {s: tfds_utils.open_source(TFDS_NAME, s, data_dir) for s in SPLITS}

  def loader(split, batch_size, seed=0, shuffle=None, process_index=0, process_count=1,
             position=0):
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    shuffle = split == "train" if shuffle is None else shuffle
    return ArrayLoader(sizes[split], make_fetch(sources[split], attributes, size), batch_size,
                       seed=seed, shuffle=shuffle, process_index=process_index,
                       process_count=process_count, position=position, workers=workers)

  stl = dict(zip(ATTRIBUTES, STL_F1))
  return Benchmark(
      name="celeba", tasks=_tasks(attributes),
      backbone=common.backbone(config, "celeba_cnn", image_size=size), loader=loader,
      reference={a: {"f1": stl[a]} for a in attributes}, split_sizes=sizes,
      info={"select": "mean_main", "image_size": size, "mock": mock, "source": "tfds celeb_a",
            "workers": workers,
            "paper": "FAMO (Liu et al., NeurIPS 2023), CelebA protocol"})
