"""Reading tfds datasets through ``tfds.data_source`` (random access, no TensorFlow).

``tfds.data_source`` reads the ``array_record`` file format only. ``tfds build`` (and Colab) write
``tfrecord`` by default, so :func:`open_source` looks at the prepared folder first and, for a
tfrecord-only dataset, raises one line with the exact rebuild / convert command; a dataset that is
not prepared at all raises one line with the ``tfds build`` command (and ``manual_dir`` where the
dataset needs manual downloads).

Mock mode (``config.data.mock``): :func:`mock_examples` runs ``tfds.testing.mock_data`` (checked to
serve ``data_source`` in tfds 4.9.10 for celeb_a, mnist, conll2003 and glue: it fabricates random
examples from the dataset's feature spec) and materialises the examples into numpy so the loader does
not depend on the mock context staying open.
"""

from __future__ import annotations

import glob
import importlib
import os
from typing import Any, Sequence

import numpy as np

# Builder modules that ``tfds.data_source`` does not register on its own (text datasets).
_BUILDER_MODULES = {
    "conll2003": "tensorflow_datasets.text.conll2003.conll2003",
    "glue": "tensorflow_datasets.text.glue",
}

# Datasets whose download needs files placed by hand.
_MANUAL = {}


class DatasetNotPreparedError(FileNotFoundError):
  """A tfds dataset is missing or in a format ``data_source`` cannot read (one-line message)."""


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds


def _import_builder(name: str) -> None:
  base = name.split("/")[0].split(":")[0]
  if base in _BUILDER_MODULES:
    importlib.import_module(_BUILDER_MODULES[base])


def _version_dirs(name: str, data_dir: str) -> list[str]:
  """Prepared version folders of ``name`` (``celeb_a`` or ``glue/sst2``, optional ``:version``)."""
  base, _, version = name.partition(":")
  root = os.path.join(data_dir, *base.split("/"))
  pattern = os.path.join(root, version or "*")
  return sorted(d for d in glob.glob(pattern) if os.path.isdir(d))


def file_format(version_dir: str) -> str:
  """'array_record', 'tfrecord' or '' (no data files) for one prepared version folder."""
  files = os.listdir(version_dir)
  if any(".array_record" in f for f in files):
    return "array_record"
  if any(".tfrecord" in f for f in files):
    return "tfrecord"
  return ""


def not_prepared_message(name: str, data_dir: str) -> str:
  manual = _MANUAL.get(name.split("/")[0], "")
  extra = f" ({manual})" if manual else ""
  return (f"tfds dataset {name!r} is not prepared in {data_dir}: run `tfds build {name.split(':')[0]} "
          f"--file_format=array_record --data_dir={data_dir}`{extra}, set config.data.data_dir to "
          f"where it is, or use config.data.mock=True")


def tfrecord_message(name: str, version_dir: str) -> str:
  return (f"tfds dataset {name!r} in {version_dir} is tfrecord-only and tfds.data_source reads "
          f"array_record: convert it with `tfds convert_format --dataset_version_dir={version_dir} "
          f"--out_file_format=array_record --out_dir={version_dir}_array_record` (needs TensorFlow, "
          f"e.g. on Colab) and point config.data.data_dir there, or rebuild with `tfds build "
          f"{name.split(':')[0]} --file_format=array_record`")


def check_prepared(name: str, data_dir: str) -> None:
  """Raises :class:`DatasetNotPreparedError` unless ``name`` has an array_record version folder."""
  dirs = _version_dirs(name, data_dir)
  formats = [file_format(d) for d in dirs]
  if "array_record" in formats:
    return
  if "tfrecord" in formats:
    raise DatasetNotPreparedError(tfrecord_message(name, dirs[formats.index("tfrecord")]))
  raise DatasetNotPreparedError(not_prepared_message(name, data_dir))


def open_source(name: str, split: str, data_dir: str = "") -> Any:
  """``tfds.data_source(name, split)`` with the clear messages above."""
  data_dir = data_dir or default_data_dir()
  check_prepared(name, data_dir)
  _import_builder(name)
  return _tfds().data_source(name, split=split, data_dir=data_dir)


def split_sizes(name: str, data_dir: str = "") -> dict[str, int]:
  """Number of examples per split from the prepared dataset's metadata."""
  data_dir = data_dir or default_data_dir()
  check_prepared(name, data_dir)
  _import_builder(name)
  builder = _tfds().builder(name, data_dir=data_dir)
  return {k: int(v.num_examples) for k, v in builder.info.splits.items()}


def features(name: str) -> Any:
  """The dataset's feature spec (no data needed): class names, shapes."""
  _import_builder(name)
  return _tfds().builder(name, data_dir=os.path.join(default_data_dir(), "_unprepared")).info.features


def mock_examples(name: str, split: str, num_examples: int) -> list[dict]:
  """``num_examples`` examples of ``name`` fabricated by ``tfds.testing.mock_data`` (which draws
  them deterministically from the feature spec), as numpy."""
  tfds = _tfds()
  _import_builder(name)
  with tfds.testing.mock_data(num_examples=num_examples):
    source = tfds.data_source(name, split=split)
    return [source[i] for i in range(len(source))]


def stack(examples: Sequence[Any]) -> Any:
  """Stacks a list of (nested dict) examples into arrays with a leading axis."""
  first = examples[0]
  if isinstance(first, dict):
    return {k: stack([e[k] for e in examples]) for k in first}
  return np.stack([np.asarray(e) for e in examples])


# ---------------------------------------------------------------------------------------------
# Helpers shared by the benchmark modules.


def config_get(config, path: str, default):
  """``config.a.b`` or ``default`` when the field is absent or falsy-zero (schema defaults)."""
  node = config
  for key in path.split("."):
    node = node.get(key, None) if hasattr(node, "get") else getattr(node, key, None)
    if node is None:
      return default
  return node


def resize_matrix(in_size: int, out_size: int, antialias: bool = True) -> np.ndarray:
  """``[out, in]`` weights of linear (triangle-filter) resampling, half-pixel centres.

  With ``antialias`` the filter widens by the downscale factor, as PIL's BILINEAR (what
  torchvision's ``Resize`` on PIL images uses) and ``jax.image.resize(..., antialias=True)`` do.
  """
  scale = in_size / out_size
  support = max(scale, 1.0) if antialias else 1.0
  centres = (np.arange(out_size) + 0.5) * scale
  src = np.arange(in_size) + 0.5
  w = np.maximum(0.0, 1.0 - np.abs(src[None, :] - centres[:, None]) / support)
  return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_images(images: np.ndarray, size: tuple[int, int], antialias: bool = True) -> np.ndarray:
  """Resizes ``[B, H, W, C]`` images to ``size`` with separable linear weights (numpy only)."""
  h, w = images.shape[1:3]
  if (h, w) == tuple(size):
    return images.astype(np.float32)
  wh = resize_matrix(h, size[0], antialias)
  ww = resize_matrix(w, size[1], antialias)
  return np.einsum("oh,bhwc,pw->bopc", wh, images.astype(np.float32), ww, optimize=True)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output pixel for nearest-neighbour resizing (PIL's convention)."""
  return np.minimum(np.floor((np.arange(out_size) + 0.5) * in_size / out_size), in_size - 1).astype(int)


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
  """A fixed-seed partition of ``range(n)`` into consecutive chunks of the given fractions."""
  perm = np.random.default_rng(seed).permutation(n)
  cuts = np.cumsum([int(round(f * n)) for f in fractions[:-1]])
  return [np.sort(p) for p in np.split(perm, cuts)]
