"""Builds the datasets of this package from their official files, without TensorFlow.

``tfds.data_source`` reads a prepared tfds folder (``dataset_info.json``, ``features.json`` and
``array_record`` shards of serialized ``tf.train.Example`` protos). ``tfds build`` needs
TensorFlow and downloads; here each dataset's official files, downloaded by hand, are parsed in
Python, encoded with the dataset's own tfds feature spec (``builder.info.features``; JPEG bytes
are stored as they are, arrays are PNG-encoded with PIL), serialized with tfds's own protos and
written with ``array_record``; the folder is written under ``<name>.incomplete`` and renamed when
complete, so an interrupted build is never read. ``python launch/prepare.py NAME --source=DIR``
is the command line.

==============  ==================================================================================
``celeba``      DIR: ``img_align_celeba/`` (the JPEGs; or ``img_align_celeba.zip``),
                ``list_attr_celeba.txt``, ``list_eval_partition.txt``; optional
                ``list_landmarks_align_celeba.txt`` and ``identity_CelebA.txt`` (tfds ``celeb_a``
                stores both; absent, they are stored as 0 and a line says so).
``mnist``       DIR: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
                ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).
                MultiMNIST is built from it on the fly (:mod:`mtl_jax.data.multimnist`).
``conll2003``   DIR: ``train.txt``, ``valid.txt``, ``test.txt`` (the CoNLL-2003 English files: one
                ``word POS chunk NER`` line per token, blank lines between sentences).
``glue``        DIR: GLUE's task folders ``SST-2/``, ``CoLA/``, ``MRPC/``, ``RTE/`` (any of them),
                each with ``train.tsv`` and ``dev.tsv`` (``test.tsv`` optional, unlabelled).
``nyuv2``,      DIR or ZIP: the MTAN-preprocessed folder (``train/image/0.npy`` ...) or its zip; it
``cityscapes``  is checked (every task folder, equal counts, shapes) and linked (a folder) or
                unpacked (a zip) to the benchmark's default root or ``--data_dir``.
``convert``     DIR: a tfds version folder written as tfrecord (``tfds build``'s default, Colab):
                array_record shards are written next to the tfrecord ones.
==============  ==================================================================================
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import struct
import zipfile
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
from PIL import Image

from mtl_jax.data import tfds_utils


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds


def png(array: np.ndarray) -> bytes:
  """A uint8 ``[H, W]`` / ``[H, W, 1]`` / ``[H, W, 3]`` array as PNG bytes (PIL)."""
  arr = np.asarray(array, np.uint8)
  arr = arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


def _writer(path: str):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  return array_record_module.ArrayRecordWriter(path, "group_size:1")


def write_tfds(name: str, splits: Mapping[str, Callable[[], Iterable[dict]]], data_dir: str,
               log=print) -> str:
  """Writes ``{split: examples}`` (each a zero-argument callable giving the examples as the
  dataset's tfds features encode them) as the prepared tfds dataset ``name`` in ``data_dir``;
  returns its version folder."""
  tfds = _tfds()
  from etils import epath  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import example_serializer  # pylint: disable=g-import-not-at-top

  tfds_utils._import_builder(name)  # pylint: disable=protected-access
  builder = tfds.builder(name, data_dir=data_dir)
  version_dir = os.fspath(builder.data_dir)
  if os.path.isdir(version_dir) and tfds_utils.file_format(version_dir) == "array_record":
    raise FileExistsError(f"{name} is already prepared in {version_dir}; delete that folder to "
                          f"prepare it again")
  tmp = version_dir + ".incomplete"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  features = builder.info.features
  serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
  infos = []
  for split, examples in splits.items():
    template = tfds.core.naming.ShardedFileTemplate(
        data_dir=epath.Path(tmp), dataset_name=builder.name, split=split,
        filetype_suffix="array_record")
    path = os.fspath(template.sharded_filepath(shard_index=0, num_shards=1))
    writer, n = _writer(path), 0
    for ex in examples():
      writer.write(serializer.serialize_example(features.encode_example(ex)))
      n += 1
    writer.close()
    infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=os.path.getsize(path),
                                     filename_template=template))
    log(f"{name} {split}: {n} examples")
  builder.info.set_splits(tfds.core.SplitDict(infos))
  builder.info.set_file_format("array_record", override=True)
  builder.info.write_to_directory(tmp)
  shutil.rmtree(version_dir, ignore_errors=True)  # only a non-array_record leftover gets here
  os.rename(tmp, version_dir)
  return version_dir


# ------------------------------------------------------------------------------------- CelebA

CELEBA_SPLITS = {"0": "train", "1": "validation", "2": "test"}


def _table(path: str, header_lines: int) -> tuple[list[str], dict[str, list[str]]]:
  """A CelebA list file: column names (the last header line; none when ``header_lines`` is 0)
  and ``{file: values}``."""
  with open(path) as f:
    lines = f.read().splitlines()
  names = lines[header_lines - 1].split() if header_lines else []
  rows = {}
  for line in lines[header_lines:]:
    parts = line.split()
    if parts:
      rows[parts[0]] = parts[1:]
  return names, rows


def _celeba_images(source: str) -> Callable[[str], bytes]:
  folder = os.path.join(source, "img_align_celeba")
  if os.path.isdir(folder):
    return lambda f: open(os.path.join(folder, f), "rb").read()
  archive = os.path.join(source, "img_align_celeba.zip")
  if os.path.isfile(archive):
    zf = zipfile.ZipFile(archive)
    return lambda f: zf.read(f"img_align_celeba/{f}")
  raise FileNotFoundError(f"{source} has neither img_align_celeba/ nor img_align_celeba.zip")


def _celeba_optional(source: str, filename: str, header_lines: int, log):
  path = os.path.join(source, filename)
  if os.path.isfile(path):
    return _table(path, header_lines)
  log(f"celeba: {filename} not in {source}: stored as 0 (the loaders here do not read it)")
  return None


def celeba_splits(source: str, log=print) -> dict[str, Callable[[], Iterator[dict]]]:
  """The official CelebA files as tfds ``celeb_a`` examples per split (its builder's fields:
  attributes ``> 0``, landmarks and identity as integers)."""
  for f in ("list_attr_celeba.txt", "list_eval_partition.txt"):
    if not os.path.isfile(os.path.join(source, f)):
      raise FileNotFoundError(f"{os.path.join(source, f)} not found (the official CelebA files)")
  attr_names, attrs = _table(os.path.join(source, "list_attr_celeba.txt"), 2)
  _, partition = _table(os.path.join(source, "list_eval_partition.txt"), 0)
  landmarks = _celeba_optional(source, "list_landmarks_align_celeba.txt", 2, log)
  identity = _celeba_optional(source, "identity_CelebA.txt", 0, log)
  read = _celeba_images(source)
  lm_names = (landmarks[0] if landmarks else
              [f"{p}_{a}" for p in ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")
               for a in "xy"])

  def example(f):
    lm = landmarks[1][f] if landmarks else [0] * len(lm_names)
    return {"image": read(f),
            "attributes": {a: int(v) > 0 for a, v in zip(attr_names, attrs[f])},
            "landmarks": {n: int(v) for n, v in zip(lm_names, lm)},
            "identity": {"Identity_No": int(identity[1][f][0]) if identity else 0}}

  files = {s: sorted(f for f, (p, *_) in partition.items() if CELEBA_SPLITS.get(p) == s)
           for s in CELEBA_SPLITS.values()}
  return {s: (lambda fs=fs: (example(f) for f in fs)) for s, fs in files.items()}


# -------------------------------------------------------------------------------------- MNIST

MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str) -> np.ndarray:
  """An IDX file (MNIST's format: magic ``0 0 type ndim``, big-endian int32 dims, uint8 data)."""
  for p in (path, path + ".gz"):
    if os.path.isfile(p):
      with (gzip.open(p) if p.endswith(".gz") else open(p, "rb")) as f:
        data = f.read()
      break
  else:
    raise FileNotFoundError(f"{path} (or {path}.gz) not found (the MNIST idx files)")
  zero, dtype, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype != 0x08:
    raise ValueError(f"{path} is not an IDX file of uint8 (magic {data[:4].hex()})")
  shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def mnist_splits(source: str, log=print) -> dict[str, Callable[[], Iterator[dict]]]:
  del log
  arrays = {s: (read_idx(os.path.join(source, i)), read_idx(os.path.join(source, l)))
            for s, (i, l) in MNIST_FILES.items()}
  return {s: (lambda x=x, y=y: ({"image": png(im), "label": int(lab)} for im, lab in zip(x, y)))
          for s, (x, y) in arrays.items()}


# ---------------------------------------------------------------------------------- CoNLL-2003

CONLL_FILES = {"train": "train.txt", "dev": "valid.txt", "test": "test.txt"}


def read_conll(path: str) -> Iterator[dict]:
  """Sentences of a CoNLL-2003 file as tfds ``conll2003`` examples (tag names; tfds's ClassLabel
  features turn them into ids); ``-DOCSTART-`` lines are document breaks, not tokens."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found (the CoNLL-2003 English files)")
  sentence = {"tokens": [], "pos": [], "chunks": [], "ner": []}
  with open(path, encoding="utf-8") as f:
    for line in list(f) + [""]:
      parts = line.split()
      if parts and parts[0] != "-DOCSTART-":
        for key, value in zip(("tokens", "pos", "chunks", "ner"), parts):
          sentence[key].append(value)
      elif sentence["tokens"]:
        yield sentence
        sentence = {"tokens": [], "pos": [], "chunks": [], "ner": []}


def conll2003_splits(source: str, log=print) -> dict[str, Callable[[], Iterator[dict]]]:
  del log
  return {s: (lambda p=os.path.join(source, f): read_conll(p)) for s, f in CONLL_FILES.items()}


# ---------------------------------------------------------------------------------------- GLUE

# GLUE folder, the tsv columns holding (sentences..., label), and whether the file has a header.
GLUE_FILES = {
    "sst2": ("SST-2", ("sentence",), (0, 1), True),
    "cola": ("CoLA", ("sentence",), (3, 1), False),
    "mrpc": ("MRPC", ("sentence1", "sentence2"), (3, 4, 0), True),
    "rte": ("RTE", ("sentence1", "sentence2"), (1, 2, 3), True),
}
RTE_LABELS = {"entailment": 0, "not_entailment": 1}  # tfds glue/rte's ClassLabel order


def read_glue(path: str, task: str) -> Iterator[dict]:
  """A GLUE ``train.tsv`` / ``dev.tsv`` as tfds ``glue/<task>`` examples (``idx`` = row)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found (GLUE's {GLUE_FILES[task][0]} folder)")
  _, fields, columns, header = GLUE_FILES[task]
  with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  for i, row in enumerate(rows[1:] if header else rows):
    label = row[columns[-1]]
    ex = {"idx": i, "label": RTE_LABELS[label] if task == "rte" else int(label)}
    ex.update({name: row[c] for name, c in zip(fields, columns[:-1])})
    yield ex


def glue_tasks(source: str) -> list[str]:
  """The GLUE tasks whose folders are in ``source``."""
  found = [t for t, (folder, *_) in GLUE_FILES.items() if os.path.isdir(os.path.join(source, folder))]
  if not found:
    raise FileNotFoundError(f"{source} holds none of GLUE's folders "
                            f"{', '.join(v[0] for v in GLUE_FILES.values())}")
  return found


def glue_splits(source: str, task: str) -> dict[str, Callable[[], Iterator[dict]]]:
  """GLUE's train and dev files (``validation``; its test labels are hidden: not written)."""
  folder = os.path.join(source, GLUE_FILES[task][0])
  return {"train": lambda: read_glue(os.path.join(folder, "train.tsv"), task),
          "validation": lambda: read_glue(os.path.join(folder, "dev.tsv"), task)}


# ---------------------------------------------------------------------- NYUv2 / Cityscapes folders


def _mtan_root(folder: str) -> str:
  """The folder holding ``train/`` and ``val/`` in ``folder`` (itself or one level below)."""
  for root in [folder] + sorted(os.path.join(folder, d) for d in os.listdir(folder)):
    if os.path.isdir(os.path.join(root, "train", "image")):
      return root
  raise FileNotFoundError(f"{folder} has no train/image/ (the MTAN-preprocessed layout)")


def check_dense_folder(spec, root: str) -> dict[str, int]:
  """Every task folder present with one file per example, example 0 of the expected shapes."""
  from mtl_jax.data import dense  # pylint: disable=g-import-not-at-top

  counts = {}
  for folder in ("train", "val"):
    n = dense.count_examples(spec, root, folder)
    for key, sub in dense._folders(spec).items():  # pylint: disable=protected-access
      m = sum(1 for f in os.listdir(os.path.join(root, folder, sub)) if f.endswith(".npy"))
      if m != n:
        raise ValueError(f"{os.path.join(root, folder, sub)} holds {m} examples, image/ {n}")
      x = np.load(os.path.join(root, folder, sub, "0.npy"))
      if x.shape[:2] != np.load(os.path.join(root, folder, "image", "0.npy")).shape[:2]:
        raise ValueError(f"{key} example 0 of {folder} has shape {x.shape}, not the image's")
    counts[folder] = n
  return counts


def install_dense(name: str, source: str, data_dir: str = "", log=print) -> str:
  """Checks the MTAN folder (or zip) ``source`` and links (or unpacks) it to ``data_dir``."""
  from mtl_jax.data import dense  # pylint: disable=g-import-not-at-top

  spec = dense.SPECS[name]
  dest = os.path.abspath(data_dir or dense.default_root(spec))
  if os.path.exists(dest):
    raise FileExistsError(f"{dest} exists; delete it or choose --data_dir to prepare {name} again")
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  if zipfile.is_zipfile(source):
    tmp = dest + ".incomplete"
    shutil.rmtree(tmp, ignore_errors=True)
    zipfile.ZipFile(source).extractall(tmp)
    root = _mtan_root(tmp)
    check_dense_folder(spec, root)
    os.rename(root, dest)
    shutil.rmtree(tmp, ignore_errors=True)
  else:
    root = _mtan_root(os.path.abspath(source))
    check_dense_folder(spec, root)
    os.symlink(root, dest)
  counts = check_dense_folder(spec, dest)
  log(f"{name}: {counts['train']} train / {counts['val']} val examples in {dest}")
  return dest


# ------------------------------------------------------------------------ tfrecord -> array_record


def read_tfrecord(path: str) -> Iterator[bytes]:
  """The records of a TFRecord file (framing: uint64 length, uint32 CRC, data, uint32 CRC; the
  CRCs are not verified, a truncated file raises)."""
  with open(path, "rb") as f:
    while True:
      head = f.read(12)
      if not head:
        return
      if len(head) < 12:
        raise ValueError(f"{path} is truncated")
      (length,) = struct.unpack("<Q", head[:8])
      data = f.read(length + 4)
      if len(data) < length + 4:
        raise ValueError(f"{path} is truncated")
      yield data[:length]


def convert(version_dir: str, log=print) -> str:
  """Writes array_record shards next to the tfrecord shards of a prepared tfds version folder
  (same records, same names with ``array_record``) and records the format in
  ``dataset_info.json`` (tfrecord kept as an alternative format)."""
  info_path = os.path.join(version_dir, "dataset_info.json")
  if not os.path.isfile(info_path):
    raise FileNotFoundError(f"{info_path} not found: --source must be a tfds version folder")
  shards = sorted(f for f in os.listdir(version_dir) if ".tfrecord-" in f)
  if not shards:
    raise FileNotFoundError(f"{version_dir} holds no .tfrecord shards")
  for shard in shards:
    writer, n = _writer(os.path.join(version_dir, shard.replace(".tfrecord-", ".array_record-"))), 0
    for record in read_tfrecord(os.path.join(version_dir, shard)):
      writer.write(record)
      n += 1
    writer.close()
    log(f"{shard}: {n} records")
  with open(info_path) as f:
    info = json.load(f)
  info["fileFormat"] = "array_record"
  info["alternativeFileFormats"] = sorted(set(info.get("alternativeFileFormats", [])) |
                                          {"tfrecord"})
  with open(info_path, "w") as f:
    json.dump(info, f, indent=2)
  return version_dir


# -------------------------------------------------------------------------------- the dispatcher

TFDS_SPLITS = {"celeba": ("celeb_a", celeba_splits), "mnist": ("mnist", mnist_splits),
               "conll2003": ("conll2003", conll2003_splits)}
NAMES = ("celeba", "mnist", "conll2003", "glue", "nyuv2", "cityscapes", "convert")


def prepare(name: str, source: str, data_dir: str = "", log=print) -> list[str]:
  """Prepares ``name`` (one of :data:`NAMES`) from ``source``; returns the folders written."""
  if name not in NAMES:
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(NAMES)}")
  if not os.path.exists(source):
    raise FileNotFoundError(f"--source {source} does not exist")
  if name == "convert":
    return [convert(source, log)]
  if name in ("nyuv2", "cityscapes"):
    return [install_dense(name, source, data_dir, log)]
  data_dir = data_dir or tfds_utils.default_data_dir()
  if name == "glue":
    return [write_tfds(f"glue/{t}", glue_splits(source, t), data_dir, log)
            for t in glue_tasks(source)]
  tfds_name, splits = TFDS_SPLITS[name]
  return [write_tfds(tfds_name, splits(source, log), data_dir, log)]
