"""Exact resume: a launch/train.py run killed with SIGKILL (or stopped by SIGTERM) after a
checkpoint and rerun with the same command ends with the uninterrupted run's params_checksum."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic.py") + ":smoke"
# Long enough to be interrupted, tiny per step; checkpoint every 4 steps, keep 2; batch norm on
# (its running statistics are part of the state that must resume exactly).
FLAGS = ["--config.train.num_steps=60", "--config.train.checkpoint_every=4",
         "--config.train.keep_checkpoints=2", "--config.train.eval_every=20",
         "--config.train.log_every=5", "--config.combiner.name=pcgrad",
         "--config.data.batch_norm=True"]


def _cmd(workdir):
  return [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--config={CONFIG}",
          f"--workdir={workdir}"] + FLAGS


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def _run(workdir):
  proc = subprocess.run(_cmd(workdir), env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((workdir / "summary.json").read_text())


def _checkpoints(workdir):
  d = workdir / "checkpoints"
  if not d.exists():
    return []
  return sorted(int(x) for x in os.listdir(d) if x.isdigit())


def _interrupt(workdir, sig, after_step):
  """Start a run, send ``sig`` once a checkpoint at ``after_step`` or later is complete."""
  proc = subprocess.Popen(_cmd(workdir), env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    done = [s for s in _checkpoints(workdir) if s >= after_step]
    if done:
      proc.send_signal(sig)
      break
    time.sleep(0.01)
  out, err = proc.communicate(timeout=120)
  return proc.returncode, err


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return workdir, _run(workdir)


@pytest.fixture(scope="module")
def reference(reference_run):
  return reference_run[1]


def test_resume_after_sigkill_is_exact(tmp_path, reference):
  rc, err = _interrupt(tmp_path, signal.SIGKILL, 8)
  assert rc == -signal.SIGKILL, err[-2000:]
  assert not (tmp_path / "summary.json").exists()  # it really was cut short
  last = _checkpoints(tmp_path)[-1]
  assert 8 <= last < 60
  resumed = _run(tmp_path)
  assert resumed["step"] == reference["step"] == 60
  assert resumed["params_checksum"] == reference["params_checksum"]
  assert resumed["test"] == reference["test"]
  assert resumed["selected_step"] == reference["selected_step"]
  # metrics.jsonl: one training record per logged step, no duplicates from the repeated steps.
  steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if "losses" in json.loads(l)]
  assert steps == list(range(5, 61, 5))
  assert len(_checkpoints(tmp_path)) <= 2


def test_sigterm_checkpoints_and_resumes(tmp_path, reference):
  rc, err = _interrupt(tmp_path, signal.SIGTERM, 4)
  assert rc == 0, err[-2000:]
  stopped = _checkpoints(tmp_path)[-1]
  assert stopped < 60 and not (tmp_path / "summary.json").exists()
  assert "SIGTERM" in err
  resumed = _run(tmp_path)
  assert resumed["params_checksum"] == reference["params_checksum"]


def test_rerun_of_a_finished_run_is_a_no_op(reference_run):
  workdir, first = reference_run
  again = _run(workdir)
  assert again["params_checksum"] == first["params_checksum"]
  assert again["test"] == first["test"]
