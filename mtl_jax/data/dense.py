"""NYUv2 and Cityscapes in the MTAN-preprocessed folder format (Liu et al., "End-to-End
Multi-Task Learning with Attention", CVPR 2019; github.com/lorenmt/mtan ``create_dataset.py``).

Layout (the files MTAN's download links unpack to; one ``.npy`` per example, ``i = 0 .. n-1``)::

  {root}/{train,val}/image/{i}.npy    float [H, W, 3] in [0, 1]
  {root}/{train,val}/label/{i}.npy    float [H, W], class id, -1 = ignore     (NYUv2, 13 classes)
  {root}/{train,val}/label_7/{i}.npy  float [H, W], class id, -1 = ignore     (Cityscapes, 7 classes)
  {root}/{train,val}/depth/{i}.npy    float [H, W, 1], 0 = no measurement
  {root}/{train,val}/normal/{i}.npy   float [H, W, 3], unit normals            (NYUv2 only)

NYUv2: 795 train / 654 val at 288×384; Cityscapes: 2,975 train / 500 val at 128×256. As MTAN,
CAGrad and Nash-MTL do, ``val`` serves both as ``validation`` and as ``test`` (the papers report
the last / best epoch on it); say so when comparing.

Augmentation (``data.augment``, default on for training in the configs, as Nash-MTL/CAGrad run
NYUv2 and CAGrad/FAMO run Cityscapes): the RandomScaleCrop of the MTAN repository (credited there to Jialong Wu): a scale ``s`` drawn
from (1.0, 1.2, 1.5), a random crop of (H/s, W/s) resized back to (H, W) — image and normals
bilinear (align corners), labels and depth nearest, depth divided by ``s`` — then a horizontal flip
with probability 1/2 (the normals' x component negated). The random draws of a batch come from a
generator seeded by ``(seed, batch indices)``, so a resumed run sees the same augmentations.

Batch: ``{'inputs': float32 [B, H, W, 3], 'targets': {'segmentation': int32 [B, H, W] (-1 ignore),
'depth': float32 [B, H, W, 1], 'normal': float32 [B, H, W, 3]}}``.
Single-task references: CAGrad (Liu et al., NeurIPS 2021) baselines, as used for Δm by Nash-MTL
(Navon et al., ICML 2022; ``experiments/*/utils.py`` of its repository).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from mtl_jax.data import common
from mtl_jax.data.tfds_utils import DatasetNotPreparedError
from mtl_jax.data.base import ArrayLoader, Benchmark
from mtl_jax.data.registry import register

SPLITS = ("train", "validation", "test")
FOLDER = {"train": "train", "validation": "val", "test": "val"}
SCALES = (1.0, 1.2, 1.5)


@dataclasses.dataclass(frozen=True)
class DenseSpec:
  name: str
  tasks: tuple[str, ...]
  num_classes: int
  label_folder: str
  shape: tuple[int, int]
  split_sizes: dict
  reference: dict
  download: str


NYUV2 = DenseSpec(
    name="nyuv2", tasks=("segmentation", "depth", "normal"), num_classes=13, label_folder="label",
    shape=(288, 384), split_sizes={"train": 795, "val": 654},
    reference={
        "segmentation": {"miou": 0.3830, "pixel_accuracy": 0.6376},
        "depth": {"abs_err": 0.6754, "rel_err": 0.2780},
        "normal": {"mean_angle": 25.01, "median_angle": 19.21, "within_11.25": 0.3014,
                   "within_22.5": 0.5720, "within_30": 0.6915},
    },
    download="the MTAN-preprocessed NYUv2 (nyuv2.zip, linked from github.com/lorenmt/mtan README)")

CITYSCAPES = DenseSpec(
    name="cityscapes", tasks=("segmentation", "depth"), num_classes=7, label_folder="label_7",
    shape=(128, 256), split_sizes={"train": 2975, "val": 500},
    reference={
        "segmentation": {"miou": 0.7401, "pixel_accuracy": 0.9316},
        "depth": {"abs_err": 0.0125, "rel_err": 27.77},
    },
    download="the MTAN-preprocessed Cityscapes (cityscapes.zip, linked from "
             "github.com/lorenmt/mtan README)")

SPECS = {"nyuv2": NYUV2, "cityscapes": CITYSCAPES}
MOCK_SIZES = {"train": 8, "val": 4}


def default_root(spec: DenseSpec) -> str:
  return os.path.expanduser(f"~/mtl_data/{spec.name}")


def _folders(spec: DenseSpec) -> dict[str, str]:
  f = {"segmentation": spec.label_folder, "depth": "depth", "normal": "normal"}
  return {"image": "image", **{t: f[t] for t in spec.tasks}}


def missing_message(spec: DenseSpec, path: str) -> str:
  return (f"{spec.name} folder {path} not found: download {spec.download}, run `python "
          f"launch/prepare.py {spec.name} --source=<the zip or its unpacked folder>` (installs it "
          f"in {default_root(spec)}; --data_dir=ROOT elsewhere, then config.data.data_dir=ROOT), "
          f"or use config.data.mock=True")


def count_examples(spec: DenseSpec, root: str, folder: str) -> int:
  """Number of examples of one split folder, checking that every task folder is there."""
  for sub in _folders(spec).values():
    path = os.path.join(root, folder, sub)
    if not os.path.isdir(path):
      raise DatasetNotPreparedError(missing_message(spec, path))
  return sum(1 for f in os.listdir(os.path.join(root, folder, "image")) if f.endswith(".npy"))


def write_fabricated(spec: DenseSpec, root: str, sizes=None, shape=None, seed: int = 0) -> str:
  """Writes a small folder of fabricated arrays in the MTAN layout (for tests and mock runs)."""
  sizes = sizes or MOCK_SIZES
  h, w = shape or spec.shape
  rng = np.random.default_rng(seed)
  for folder, n in sizes.items():
    for sub in _folders(spec).values():
      os.makedirs(os.path.join(root, folder, sub), exist_ok=True)
    for i in range(n):
      ex = fabricate_example(spec, (h, w), rng)
      for key, sub in _folders(spec).items():
        np.save(os.path.join(root, folder, sub, f"{i}.npy"), ex[key])
  return root


def fabricate_example(spec: DenseSpec, shape, rng) -> dict[str, np.ndarray]:
  """One example with the value ranges of the real files (float arrays as MTAN stores them)."""
  h, w = shape
  normal = rng.normal(size=(h, w, 3))
  depth = rng.uniform(0.5, 10.0, size=(h, w, 1)) * (rng.uniform(size=(h, w, 1)) > 0.1)
  return {
      "image": rng.uniform(size=(h, w, 3)).astype(np.float32),
      "segmentation": rng.integers(-1, spec.num_classes, size=(h, w)).astype(np.float32),
      "depth": depth.astype(np.float32),
      "normal": (normal / np.linalg.norm(normal, axis=-1, keepdims=True)).astype(np.float32),
  }


def _bilinear_align_corners(x: np.ndarray, i, j, h, w, out_h, out_w) -> np.ndarray:
  """Crop ``x[i:i+h, j:j+w]`` ([H, W, C]) resized to (out_h, out_w), align_corners=True."""
  ys = i + np.linspace(0, h - 1, out_h)
  xs = j + np.linspace(0, w - 1, out_w)
  y0 = np.floor(ys).astype(int)
  x0 = np.floor(xs).astype(int)
  y1 = np.minimum(y0 + 1, i + h - 1)
  x1 = np.minimum(x0 + 1, j + w - 1)
  wy = (ys - y0)[:, None, None]
  wx = (xs - x0)[None, :, None]
  top = x[y0][:, x0] * (1 - wx) + x[y0][:, x1] * wx
  bottom = x[y1][:, x0] * (1 - wx) + x[y1][:, x1] * wx
  return top * (1 - wy) + bottom * wy


def _nearest(x: np.ndarray, i, j, h, w, out_h, out_w) -> np.ndarray:
  """Crop resized with torch's ``mode='nearest'`` convention: source = floor(dst * in / out)."""
  ys = i + np.minimum((np.arange(out_h) * h) // out_h, h - 1)
  xs = j + np.minimum((np.arange(out_w) * w) // out_w, w - 1)
  return x[ys][:, xs]


def random_scale_crop_flip(ex: dict[str, np.ndarray], rng) -> dict[str, np.ndarray]:
  """MTAN's RandomScaleCrop followed by a random horizontal flip, on one [H, W, C] example."""
  height, width = ex["image"].shape[:2]
  s = SCALES[rng.integers(len(SCALES))]
  h, w = int(height / s), int(width / s)
  i, j = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
  out = {"image": _bilinear_align_corners(ex["image"], i, j, h, w, height, width)}
  if "segmentation" in ex:
    out["segmentation"] = _nearest(ex["segmentation"], i, j, h, w, height, width)
  if "depth" in ex:
    out["depth"] = _nearest(ex["depth"], i, j, h, w, height, width) / s
  if "normal" in ex:
    out["normal"] = _bilinear_align_corners(ex["normal"], i, j, h, w, height, width)
  if rng.uniform() < 0.5:
    out = {k: v[:, ::-1] for k, v in out.items()}
    if "normal" in out:
      out["normal"] = out["normal"] * np.array([-1.0, 1.0, 1.0], np.float32)
  return out


def _resize_nearest(x: np.ndarray, shape) -> np.ndarray:
  rows = common.nearest_indices(x.shape[0], shape[0])
  cols = common.nearest_indices(x.shape[1], shape[1])
  return x[rows][:, cols]


def make_fetch(spec: DenseSpec, root: str, folder: str, tasks, augment: bool, seed: int,
               shape=None):
  """``indices -> batch`` reading the .npy files of one split folder."""
  folders = _folders(spec)

  def load(i):
    ex = {k: np.load(os.path.join(root, folder, folders[k], f"{int(i)}.npy"))
          for k in ("image",) + tuple(tasks)}
    if "segmentation" in ex:
      ex["segmentation"] = ex["segmentation"][..., None]
    return ex

  def fetch(indices):
    rng = np.random.default_rng([seed, *map(int, indices)]) if augment else None
    examples = []
    for i in indices:
      ex = load(i)
      if shape is not None and ex["image"].shape[:2] != tuple(shape):
        ex = {k: _resize_nearest(v, shape) for k, v in ex.items()}
      if augment:
        ex = random_scale_crop_flip(ex, rng)
      examples.append(ex)
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    targets = {}
    for t in tasks:
      if t == "segmentation":
        targets[t] = np.rint(batch[t][..., 0]).astype(np.int32)
      else:
        targets[t] = batch[t].astype(np.float32)
    return {"inputs": batch["image"].astype(np.float32), "targets": targets}

  return fetch


def _tasks(spec: DenseSpec, names):
  """MTAN's prediction layers (``models.segnet.conv_head``: conv3x3 → conv1x1; normals
  L2-normalised), cross-entropy / L1 on valid depth / cosine loss, and the MTAN metrics."""
  import functools  # pylint: disable=g-import-not-at-top

  from mtl_jax import tasks as T  # pylint: disable=g-import-not-at-top
  from mtl_jax.models import segnet  # pylint: disable=g-import-not-at-top

  head = functools.partial
  make = {
      "segmentation": lambda: T.segmentation_task(
          "segmentation", spec.num_classes, head=head(segnet.conv_head, spec.num_classes)),
      "depth": lambda: T.depth_task("depth", head=head(segnet.conv_head, 1)),
      "normal": lambda: T.normal_task("normal", head=head(segnet.conv_head, 3, normalize=True)),
  }
  return tuple(make[n]() for n in names)


def build(spec: DenseSpec, config) -> Benchmark:
  tasks = common.select(config.tasks, spec.tasks, f"{spec.name} tasks")
  mock = bool(common.config_get(config, "data.mock", False))
  workers = common.workers(config, file_backed=not mock)
  seed = int(common.config_get(config, "seed", 0))
  size = int(common.config_get(config, "data.image_size", 0))
  shape = None
  if size:  # image height; width keeps the benchmark's aspect ratio
    shape = (size, int(round(size * spec.shape[1] / spec.shape[0])))
  augment = bool(common.config_get(config, "data.augment", False))
  if mock:
    import tempfile  # pylint: disable=g-import-not-at-top

    root = tempfile.mkdtemp(prefix=f"mtl_jax_mock_{spec.name}_")
    write_fabricated(spec, root, shape=shape or spec.shape, seed=seed)
  else:
    root = common.config_get(config, "data.data_dir", "") or default_root(spec)
  counts = {f: count_examples(spec, root, f) for f in ("train", "val")}
  sizes = {s: counts[FOLDER[s]] for s in SPLITS}

  def loader(split, batch_size, seed=0, shuffle=None, process_index=0, process_count=1,
             position=0):
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    shuffle = split == "train" if shuffle is None else shuffle
    fetch = make_fetch(spec, root, FOLDER[split], tasks, augment and split == "train", seed,
                       shape)
    return ArrayLoader(sizes[split], fetch, batch_size, seed=seed, shuffle=shuffle,
                       process_index=process_index, process_count=process_count,
                       position=position, workers=workers)

  hw = tuple(shape or spec.shape)
  levels = 5
  while levels > 1 and (hw[0] % 2**levels or hw[1] % 2**levels):
    levels -= 1
  return Benchmark(
      name=spec.name, tasks=_tasks(spec, tasks),
      backbone=common.backbone(config, "segnet", levels=levels, image_size=hw),
      loader=loader, reference={t: spec.reference[t] for t in tasks}, split_sizes=sizes,
      info={"root": root, "mock": mock, "augment": augment, "workers": workers,
            "shape": shape or spec.shape,
            "paper": "MTAN (Liu et al., CVPR 2019) preprocessing; CAGrad/Nash-MTL STL baseline"})


@register("nyuv2")
def get_nyuv2(config) -> Benchmark:
  return build(NYUV2, config)


@register("cityscapes")
def get_cityscapes(config) -> Benchmark:
  return build(CITYSCAPES, config)
