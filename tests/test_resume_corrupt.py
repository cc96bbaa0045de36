"""A newest checkpoint that does not restore (issue 14.4): moved aside to ``<step>.corrupt``, one
log line, and the run resumes from the previous step to the uninterrupted run's checksum; when no
step restores, :class:`mtl_jax.train.CheckpointError` (the launcher: one line, exit 2).

One uninterrupted 12-step run (checkpoints 4, 8, 12) is the reference; each case copies its
workdir, drops step 12 and the summary (as a run killed after step 8's checkpoint), corrupts
step 8 and resumes in-process: from step 4, through 5..12, to the same parameters."""

import glob
import os
import shutil

import pytest
from absl import logging

from mtl_jax import train
from mtl_jax.configs import synthetic


def _config():
  c = synthetic.get_config("smoke")
  c.combiner.name = "pcgrad"
  c.train.keep_checkpoints = 3
  return c  # 12 steps, checkpoints every 4, evaluation every 6


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  wd = tmp_path_factory.mktemp("corrupt") / "uninterrupted"
  summary = train.fit(_config(), str(wd), progress=False)
  return wd, summary


def _array_files(step_dir):
  """The data files of the state's OCDBT store: the merged one (``state/d/``) and the per-process
  ones (``state/ocdbt.process_0/d/``); which of them a restore reads depends on the merge."""
  return glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)


def _truncate(step_dir):
  for path in _array_files(step_dir):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _garbage_metadata(step_dir):
  with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
    f.write("{not json")


def _missing_file(step_dir):
  for path in _array_files(step_dir):
    os.remove(path)


def _cut_after_step_8(reference, tmp_path):
  src, _ = reference
  wd = tmp_path / "resumed"
  shutil.copytree(src, wd)
  shutil.rmtree(wd / "checkpoints" / "12")
  os.remove(wd / "summary.json")
  return wd


@pytest.mark.parametrize("corrupt", [_truncate, _garbage_metadata, _missing_file],
                         ids=["truncated_array", "garbage_metadata", "missing_file"])
def test_corrupt_newest_step_resumes_from_the_previous_one(reference, tmp_path, corrupt,
                                                           monkeypatch):
  wd = _cut_after_step_8(reference, tmp_path)
  corrupt(str(wd / "checkpoints" / "8"))
  lines = []
  monkeypatch.setattr(logging, "info", lambda msg, *a, **k: lines.append((str(msg), a)))
  resumed = train.fit(_config(), str(wd), progress=False)
  assert resumed["params_checksum"] == reference[1]["params_checksum"]
  assert resumed["test"] == reference[1]["test"]
  lines = [m % a if a and m == "%s" else m for m, a in lines]  # fit's say() logs ("%s", line)
  notice = [l for l in lines if "does not restore" in l]
  assert len(notice) == 1 and "checkpoint step 8" in notice[0] and "\n" not in notice[0]
  assert any(l.startswith("resumed at step 4") for l in lines)
  # moved aside, not deleted
  assert (wd / "checkpoints" / "8.corrupt").is_dir()
  assert sorted(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit()) == [4, 8, 12]


def test_no_restorable_step_is_one_error(reference, tmp_path):
  wd = _cut_after_step_8(reference, tmp_path)
  for step in ("4", "8"):
    _garbage_metadata(str(wd / "checkpoints" / step))
  with pytest.raises(train.CheckpointError, match=r"no checkpoint .* restores \(tried steps 8, 4"):
    train.fit(_config(), str(wd), progress=False)
  assert (wd / "checkpoints" / "4.corrupt").is_dir() and (wd / "checkpoints" / "8.corrupt").is_dir()
