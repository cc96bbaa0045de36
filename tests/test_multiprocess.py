"""Multi-process training (issue 18.5): launch/train.py as 2 processes on this machine
(``jax.distributed`` with a coordinator on localhost, CPU collectives over gloo, 2 CPU devices
each) trains the synthetic :smoke model to the same ``params_checksum`` as 1 process with 4
devices; a SIGTERM to ONE of the processes makes both checkpoint the same step (JAX's preemption
service and orbax's ``reached_preemption``) and exit 143; rerunning the 2 processes resumes to the
uninterrupted checksum.

Equality of the bits needs ``config.engine.fixed_order=True``: the device means become an
all-gather and a sum in device order, whatever the split of the devices into processes. With the
default all-reduce, the cross-process sum is gloo's, in another order than XLA's in-process one
(measured on this config: parameters within 7.5e-9 of 1 x 4 after 12 steps, checksums differ);
the in-process all-reduce already sums in device order, so 1 x 4 gives the same bits either way.

Cost: 3 launches (1 x 4 reference, the interrupted 2 x 2 run, its 2 x 2 resume), one test
function (pytest-xdist may send a module's tests to different workers, and every launch pays a
JAX start and a compilation); about 35 s on 2 shared CPU cores. The final checksum checks the
whole 2 x 2 trajectory (both legs) against 1 x 4, so no separate uninterrupted 2 x 2 run is
needed. Every subprocess has a timeout and none outlives the test."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")
CONFIG = os.path.join(ROOT, "configs", "synthetic.py") + ":smoke"
STEPS = 40
FLAGS = [f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=4",
         "--config.train.keep_checkpoints=2", "--config.train.eval_every=20",
         "--config.train.log_every=5", "--config.engine.fixed_order=True"]
TIMEOUT = 180  # seconds, per launch


def _env(devices: int):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  for k in ("MTL_JAX_DISTRIBUTED", "MTL_JAX_COORDINATOR_ADDRESS", "MTL_JAX_NUM_PROCESSES",
            "MTL_JAX_PROCESS_ID"):
    env.pop(k, None)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_pair(workdir):
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, TRAIN, f"--config={CONFIG}", f"--workdir={workdir}", *FLAGS,
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs, deadline):
  """``[(returncode, stdout, stderr)]``; a process still running at ``deadline`` is killed."""
  out = []
  try:
    for p in procs:
      o, e = p.communicate(timeout=max(deadline - time.time(), 1))
      out.append((p.returncode, o, e))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return out


def _checkpoints(workdir):
  d = workdir / "checkpoints"
  return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if d.exists() else []


def _checksum(stdout):
  return re.search(r"params_checksum ([0-9a-f]{64})", stdout).group(1)


def test_two_processes_match_one_and_a_sigterm_to_one_stops_both_at_one_step(tmp_path):
  ref = subprocess.run([sys.executable, TRAIN, f"--config={CONFIG}",
                        f"--workdir={tmp_path / 'one'}", *FLAGS], env=_env(4),
                       capture_output=True, text=True, timeout=TIMEOUT)
  assert ref.returncode == 0, ref.stderr[-3000:]
  reference = json.loads((tmp_path / "one" / "summary.json").read_text())
  assert reference["num_devices"] == 4 and reference["num_processes"] == 1

  # 2 x 2, SIGTERM to process 1 alone once the step-4 checkpoint is complete.
  wd = tmp_path / "two"
  procs = _start_pair(wd)
  deadline = time.time() + TIMEOUT
  try:
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if _checkpoints(wd):
        procs[1].send_signal(signal.SIGTERM)
        break
      time.sleep(0.01)
  finally:
    legs = _finish(procs, deadline)
  assert [rc for rc, _, _ in legs] == [143, 143], [e[-2000:] for _, _, e in legs]
  stopped = {int(m) for _, _, e in legs
             for m in re.findall(r"SIGTERM at step (\d+): checkpointed", e)}
  assert len(stopped) == 1, [e[-2000:] for _, _, e in legs]  # both said so, at the same step
  step = stopped.pop()
  assert 4 < step < STEPS and _checkpoints(wd)[-1] == step
  assert not (wd / "summary.json").exists()

  # Rerun the 2 processes: they resume at that step and end with 1 x 4's parameters.
  final = _finish(_start_pair(wd), time.time() + TIMEOUT)
  assert [rc for rc, _, _ in final] == [0, 0], [e[-2000:] for _, _, e in final]
  assert f"resumed at step {step} from " in final[0][1]
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["num_devices"] == 4 and summary["num_processes"] == 2
  assert summary["params_checksum"] == reference["params_checksum"]
  assert _checksum(final[0][1]) == _checksum(final[1][1]) == reference["params_checksum"]
  assert final[1][1].strip().splitlines()[-1].startswith(f"process 1: step {STEPS} ")
  # The evaluation sums each process's float32 statistics, then the processes' sums (1 x 4: one
  # sum over all batches): the same parameters give test metrics equal to rounding (5e-8 measured).
  for task, metrics in reference["test"].items():
    for name, value in metrics.items():
      assert abs(summary["test"][task][name] - value) <= 1e-6 * max(abs(value), 1.0), (task, name)
  # Process 0 alone writes the metrics: one record per logged step, none twice.
  logged = [json.loads(l)["step"] for l in (wd / "metrics.jsonl").read_text().splitlines()
            if "losses" in json.loads(l)]
  assert logged == list(range(5, STEPS + 1, 5))
  # one TensorBoard events file per launch (the interrupted one, the resume), process 0's only
  assert len(os.listdir(wd / "tensorboard")) == 2, os.listdir(wd / "tensorboard")


def test_inconsistent_process_settings_are_one_line_exit_2(tmp_path):
  cases = [
      (["--coordinator_address=localhost:1"], {},
       "error: --coordinator_address given without --num_processes (or MTL_JAX_NUM_PROCESSES), "
       "--process_id (or MTL_JAX_PROCESS_ID): give all three"),
      (["--coordinator_address=x", "--num_processes=2", "--process_id=0"], {},
       "error: --coordinator_address='x' is not host:port"),
      (["--coordinator_address=h:1", "--num_processes=2"], {"MTL_JAX_PROCESS_ID": "2"},
       "error: MTL_JAX_PROCESS_ID='2' is not an integer in 0..1"),
      (["--nodistributed", "--process_id=0"], {},
       "error: --nodistributed (or MTL_JAX_DISTRIBUTED=0) contradicts --process_id"),
      ([], {"MTL_JAX_DISTRIBUTED": "yes"}, "error: MTL_JAX_DISTRIBUTED='yes'; valid: 0, 1"),
  ]
  for args, env, needle in cases:
    proc = subprocess.run([sys.executable, TRAIN, f"--config={CONFIG}",
                           f"--workdir={tmp_path / 'w'}", *args], env={**_env(1), **env},
                          capture_output=True, text=True, timeout=TIMEOUT)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (args, proc.stderr[-2000:])
    assert lines[0].startswith(needle), (args, lines[0])
