"""The run loop (issue 18.3): the host reads the device's results only at log, evaluation and
checkpoint steps, yet a non-finite step is still reported at its own step; steps/s excludes the
compiling first step. Tiny synthetic benchmark, in-process."""

import json

import numpy as np
import pytest

from mtl_jax import config_utils
from mtl_jax import train
from mtl_jax.configs import synthetic


def _config(**over):
  c = synthetic.get_config("smoke")  # 12 steps
  c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 6, 12, 12
  for key, value in over.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


class _NaNAt:
  """A training loader (the loader contract: next(), .position, .batches_per_epoch) whose batch
  number ``bad`` (1-based) has NaN inputs."""

  def __init__(self, loader, bad):
    self.loader, self.bad = loader, bad

  @property
  def position(self):
    return self.loader.position

  @position.setter
  def position(self, value):
    self.loader.position = value

  @property
  def batches_per_epoch(self):
    return self.loader.batches_per_epoch

  def __next__(self):
    batch = next(self.loader)
    if self.loader.position == self.bad:
      batch = dict(batch, inputs=np.full_like(batch["inputs"], np.nan))
    return batch


def _nan_at(monkeypatch, bad):
  make = train.make_train_loader
  monkeypatch.setattr(train, "make_train_loader", lambda *a: _NaNAt(make(*a), bad))


def test_host_reads_only_at_boundaries_and_steps_per_sec_excludes_compile(tmp_path, monkeypatch):
  reads = []
  fetch = train._fetch
  monkeypatch.setattr(train, "_fetch", lambda tree: reads.append(1) or fetch(tree))
  # A fake clock: 1 ms a call, and 1000 s inside the compiling first step.
  clock = [0.0]

  def now():
    clock[0] += 1e-3
    return clock[0]

  first = train._compile_step

  def slow_compile(*a):
    clock[0] += 1000.0
    return first(*a)

  monkeypatch.setattr(train, "_clock", now)
  monkeypatch.setattr(train, "_compile_step", slow_compile)
  summary = train.fit(_config(), str(tmp_path / "w"), progress=False)
  assert summary["step"] == 12
  assert len(reads) == 2  # steps 6 and 12, not 12 reads
  recs = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
  rates = [r["steps_per_sec"] for r in recs if "losses" in r]
  assert len(rates) == 2 and all(r > 1.0 for r in rates), rates  # with compile: < 0.01
  assert summary["steps_per_sec"] > 1.0
  written = json.loads((tmp_path / "w" / "summary.json").read_text())
  assert written["config_digest"] == config_utils.config_digest(_config())


def test_nonfinite_stop_names_the_step_it_happened_at(tmp_path, monkeypatch):
  _nan_at(monkeypatch, 4)
  with pytest.raises(train.NonFiniteError, match=r"at step 4;"):
    train.fit(_config(), str(tmp_path / "w"), progress=False)


def test_nonfinite_skip_counts_the_step_it_happened_at(tmp_path, monkeypatch):
  _nan_at(monkeypatch, 4)
  warned = []
  monkeypatch.setattr(train.logging, "warning", lambda msg, *a: warned.append(msg % a))
  # log_every 12: one read of 12 steps, stacked on the device (>= train._STACK_MIN; the stop
  # test above reads 6 steps as they are)
  assert 12 >= train._STACK_MIN > 6
  summary = train.fit(_config(**{"train.on_nonfinite": "skip", "train.log_every": 12}),
                      str(tmp_path / "w"), progress=False)
  assert summary["skipped_steps"] == 1
  assert [w for w in warned if "non-finite" in w] == [
      "non-finite task loss reg0, reg1, cls0, cls1 at step 4: step skipped (1 so far)"]
