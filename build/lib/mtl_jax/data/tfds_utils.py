"""Reading tfds datasets through ``tfds.data_source`` (random access, no TensorFlow).

``tfds.data_source`` reads the ``array_record`` file format only. ``tfds build`` (and Colab) write
``tfrecord`` by default, so :func:`open_source` looks at the prepared folder first: a dataset that
is not prepared raises one line naming the ``launch/prepare.py`` command that builds it from the
official files (no TensorFlow: :mod:`mtl_jax.data.prepare`), a tfrecord-only dataset one line
naming the ``launch/prepare.py convert`` command that rewrites it as array_record.

Mock mode (``config.data.mock``): :func:`mock_examples` runs ``tfds.testing.mock_data`` (checked to
serve ``data_source`` in tfds 4.9.10 for celeb_a, mnist, conll2003 and glue: it fabricates random
examples from the dataset's feature spec) and materialises the examples into numpy so the loader does
not depend on the mock context staying open.
"""

from __future__ import annotations

import glob
import os
from typing import Any

# ``launch/prepare.py NAME --source=DIR`` builds each tfds dataset; what DIR holds.
PREPARE = {
    "celeb_a": ("celeba", "img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt"),
    "mnist": ("mnist", "the four MNIST idx files"),
    "conll2003": ("conll2003", "train.txt, valid.txt, test.txt"),
    "glue": ("glue", "GLUE's SST-2/, CoLA/, MRPC/, RTE/ with train.tsv, dev.tsv"),
}


class DatasetNotPreparedError(FileNotFoundError, ValueError):
  """A dataset is missing or in a format ``data_source`` cannot read (one-line message).

  Also a ``ValueError``: the configuration points at data that is not there, and the launchers
  print such errors as one line and exit with status 2."""


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds


def _import_builder(name: str) -> None:
  """Registers the builders ``tfds.data_source`` does not import on its own (text datasets)."""
  base = name.split("/")[0].split(":")[0]
  if base == "conll2003":
    from tensorflow_datasets.text.conll2003 import conll2003  # pylint: disable=g-import-not-at-top,unused-import
  elif base == "glue":
    from tensorflow_datasets.text import glue  # pylint: disable=g-import-not-at-top,unused-import


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
  command, holds = PREPARE[name.split(":")[0].split("/")[0]]
  return (f"tfds dataset {name!r} is not prepared in {data_dir}: run `python launch/prepare.py "
          f"{command} --source=DIR --data_dir={data_dir}` (DIR: {holds}), or set "
          f"config.data.data_dir to where it is prepared, or use config.data.mock=True")


def tfrecord_message(name: str, version_dir: str) -> str:
  return (f"tfds dataset {name!r} in {version_dir} is tfrecord-only and tfds.data_source reads "
          f"array_record: run `python launch/prepare.py convert --source={version_dir}` (writes "
          f"array_record files next to the tfrecord ones, no TensorFlow needed)")


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
