"""launch/prepare.py on fabricated miniatures of the official files: the folders it writes are
read by tfds.data_source (no TensorFlow) and by the benchmarks with the right labels and splits."""

import gzip
import io
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs.common import base_config
import mtl_jax.data as D
from mtl_jax.data import celeba, prepare, tfds_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Five images: partition 0, 1, 2, 0, 2 (train / validation / test); attributes vary by image.
PARTITION = [0, 1, 2, 0, 2]


def _attrs(i):
  return [1 if (i + j) % 3 == 0 else -1 for j in range(40)]


def _celeba_folder(root, landmarks=True):
  os.makedirs(root / "img_align_celeba")
  rng = np.random.default_rng(0)
  for i in range(5):
    img = np.full((218, 178, 3), 40 * i, np.uint8) + rng.integers(0, 3, (218, 178, 3), np.uint8)
    Image.fromarray(img).save(root / "img_align_celeba" / f"{i + 1:06d}.jpg", quality=95)
  lines = ["5", " ".join(celeba.ATTRIBUTES)]
  lines += [f"{i + 1:06d}.jpg " + " ".join(f"{v:2d}" for v in _attrs(i)) for i in range(5)]
  (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
  (root / "list_eval_partition.txt").write_text(
      "".join(f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate(PARTITION)))
  if landmarks:
    names = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y " \
            "rightmouth_x rightmouth_y"
    rows = [f"{i + 1:06d}.jpg " + " ".join(str(10 * i + k) for k in range(10)) for i in range(5)]
    (root / "list_landmarks_align_celeba.txt").write_text("\n".join(["5", names] + rows) + "\n")
  return root


def _run(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "prepare.py"), *args],
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_celeba_prepare_command_then_benchmark(tmp_path):
  src = _celeba_folder(tmp_path / "celeba")
  out = tmp_path / "tfds"
  proc = _run("celeba", f"--source={src}", f"--data_dir={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "prepared" in proc.stdout and (out / "celeb_a" / "2.1.0" / "dataset_info.json").exists()
  source = tfds_utils.open_source("celeb_a", "train", str(out))
  assert len(source) == 2
  ex = source[1]  # train files sorted: 000001, 000004
  assert ex["image"].shape == (218, 178, 3) and abs(float(ex["image"].mean()) - 121) < 2
  assert ex["landmarks"]["nose_x"] == 34 and ex["identity"]["Identity_No"] == 0
  assert [bool(ex["attributes"][a]) for a in celeba.ATTRIBUTES] == [v > 0 for v in _attrs(3)]
  c = base_config()
  c.data.name, c.data.data_dir, c.data.image_size, c.data.workers = "celeba", str(out), 16, 0
  c.tasks = "Male,5_o_Clock_Shadow"  # index 20, 0
  bench = D.get_benchmark(c)
  assert bench.split_sizes == {"train": 2, "validation": 1, "test": 2}
  test = next(bench.loader("test", 2, shuffle=False))
  assert test["inputs"].shape == (2, 16, 16, 3)
  # test files 000003 (i=2) and 000005 (i=4): pixel level 80 and 160 (+0..2 noise, JPEG)
  np.testing.assert_allclose(test["inputs"].mean((1, 2, 3)), [81 / 255, 161 / 255], atol=3 / 255)
  for a, j in (("Male", 20), ("5_o_Clock_Shadow", 0)):
    np.testing.assert_array_equal(test["targets"][a], [_attrs(2)[j] > 0, _attrs(4)[j] > 0])
  # Preparing again refuses (one line, exit 2) rather than overwriting.
  again = _run("celeba", f"--source={src}", f"--data_dir={out}")
  assert again.returncode == 2 and "already prepared" in again.stderr
  assert len(again.stderr.strip().splitlines()) == 1


def test_bad_name_and_missing_files_are_one_line(tmp_path):
  for args, text in ((("imagenet", f"--source={tmp_path}"), "unknown dataset 'imagenet'; valid:"),
                     (("celeba", f"--source={tmp_path}"), "list_attr_celeba.txt not found"),
                     (("mnist", f"--source={tmp_path / 'no'}"), "does not exist")):
    proc = _run(*args)
    assert proc.returncode == 2 and text in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1


def _idx(path, array):
  header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(str(path) + ".gz", "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_prepare_feeds_multimnist(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (("train", 12), ("t10k", 4)):
    _idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
    _idx(tmp_path / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
  prepare.prepare("mnist", str(tmp_path), str(tmp_path / "tfds"), log=lambda *_: None)
  src = tfds_utils.open_source("mnist", "train", str(tmp_path / "tfds"))
  assert len(src) == 12 and src[7]["label"] == 7 and src[7]["image"].shape == (28, 28, 1)
  raw = prepare.read_idx(str(tmp_path / "train-images-idx3-ubyte"))
  np.testing.assert_array_equal(src[7]["image"][..., 0], raw[7])


def test_conll_and_glue_readers(tmp_path):
  (tmp_path / "train.txt").write_text(
      "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n")
  sents = list(prepare.read_conll(str(tmp_path / "train.txt")))
  assert [s["tokens"] for s in sents] == [["EU", "rejects"], ["Peter"]]
  assert sents[0]["ner"] == ["B-ORG", "O"] and sents[1]["pos"] == ["NNP"]
  rte = tmp_path / "RTE"
  rte.mkdir()
  (rte / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tA \"q\t B\tnot_entailment\n")
  (rte / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tC\tD\tentailment\n")
  assert prepare.glue_tasks(str(tmp_path)) == ["rte"]
  assert list(prepare.read_glue(str(rte / "train.tsv"), "rte")) == [
      {"idx": 0, "label": 1, "sentence1": 'A "q', "sentence2": " B"}]
  prepare.prepare("glue", str(tmp_path), str(tmp_path / "tfds"), log=lambda *_: None)
  dev = tfds_utils.open_source("glue/rte", "validation", str(tmp_path / "tfds"))
  assert dev[0]["sentence1"] == b"C" and dev[0]["label"] == 0


def test_tfrecord_folder_converted(tmp_path):
  """A tfrecord-built folder (tfds build's default) becomes readable by data_source."""
  src = _celeba_folder(tmp_path / "celeba", landmarks=False)
  out = tmp_path / "tfds"
  prepare.prepare("celeba", str(src), str(out), log=lambda *_: None)
  vdir = out / "celeb_a" / "2.1.0"
  for shard in [f for f in os.listdir(vdir) if ".array_record-" in f]:  # rewrite as tfrecord
    from array_record.python import array_record_data_source as ards
    records = [r for r in ards.ArrayRecordDataSource([str(vdir / shard)])]
    with open(vdir / shard.replace(".array_record-", ".tfrecord-"), "wb") as f:
      for r in records:
        f.write(struct.pack("<Q", len(r)) + b"\0" * 4 + r + b"\0" * 4)
    os.remove(vdir / shard)
  info = json.loads((vdir / "dataset_info.json").read_text())
  info["fileFormat"] = "tfrecord"
  (vdir / "dataset_info.json").write_text(json.dumps(info))
  with pytest.raises(tfds_utils.DatasetNotPreparedError, match="prepare.py convert"):
    tfds_utils.open_source("celeb_a", "train", str(out))
  prepare.convert(str(vdir), log=lambda *_: None)
  source = tfds_utils.open_source("celeb_a", "test", str(out))
  assert len(source) == 2 and source[0]["image"].shape == (218, 178, 3)


def test_train_without_data_is_one_line_naming_the_command(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "train.py"),
       f"--config={os.path.join(ROOT, 'configs', 'nash_celeba.py')}", f"--workdir={tmp_path / 'w'}"],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", TFDS_DATA_DIR=str(tmp_path / "none")))
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "`python launch/prepare.py celeba --source=DIR" in lines[0], lines
