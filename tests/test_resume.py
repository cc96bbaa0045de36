"""Exact resume: a launch/train.py run stopped by SIGTERM, resumed, killed with SIGKILL after a
later checkpoint and resumed again with the same command ends with the uninterrupted run's
params_checksum (the SIGTERM leg exits 143: preempted after saving); rerunning a finished
run is a no-op.

Every launch/train.py process pays a JAX start, an initialisation and a compilation, so the
scenarios share processes: one chain (SIGTERM, resume, SIGKILL, resume) on one workdir instead
of two separate interrupted runs, and one test function (a module fixture could be built twice
when pytest-xdist sends the module's tests to different workers). A wrong SIGTERM checkpoint
would propagate through the SIGKILL leg (that leg's checkpoints are written after resuming from
it), so the final checksum checks both resumes."""

import json
import os
import signal
import subprocess
import sys
import time

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
  # no forced devices from the caller's environment (the suite's other flags are kept)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
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
  """Start (or resume) a run, send ``sig`` once a checkpoint at ``after_step`` or later is
  complete."""
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


def _train_steps(workdir):
  return [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()
          if "losses" in json.loads(l)]


def test_sigterm_then_sigkill_resume_exactly_and_a_finished_rerun_is_a_no_op(tmp_path):
  ref_dir = tmp_path / "uninterrupted"
  reference = _run(ref_dir)
  assert reference["step"] == 60

  wd = tmp_path / "interrupted"
  # SIGTERM: the run checkpoints the step it is at and exits 143 (preempted, not finished).
  rc, err = _interrupt(wd, signal.SIGTERM, 4)
  assert rc == 143, err[-2000:]
  stopped = _checkpoints(wd)[-1]
  assert 4 <= stopped < 60 and not (wd / "summary.json").exists()
  assert "SIGTERM" in err

  # Resume it, and SIGKILL it once it has written a checkpoint of its own (a later step).
  rc, err = _interrupt(wd, signal.SIGKILL, stopped + 4)
  assert rc == -signal.SIGKILL, err[-2000:]
  assert not (wd / "summary.json").exists()  # it really was cut short
  last = _checkpoints(wd)[-1]
  assert stopped + 4 <= last < 60

  # Resume again with the same command: the uninterrupted run's results.
  resumed = _run(wd)
  assert resumed["step"] == reference["step"] == 60
  assert resumed["params_checksum"] == reference["params_checksum"]
  assert resumed["test"] == reference["test"]
  assert resumed["selected_step"] == reference["selected_step"]
  # metrics.jsonl: one training record per logged step, no duplicates from the repeated steps.
  assert _train_steps(wd) == list(range(5, 61, 5))
  assert len(_checkpoints(wd)) <= 2

  # Rerunning a finished run changes nothing.
  again = _run(ref_dir)
  assert again["params_checksum"] == reference["params_checksum"]
  assert again["test"] == reference["test"]
  assert _train_steps(ref_dir) == list(range(5, 61, 5))
