"""launch/train.py at the door (issue 14.5 / 14.7): every failure a user can cause is one line and
a non-zero exit; a :smoke run's terminal shows the start-up block, the phase lines, a progress bar
with the running loss, "resumed at step N" and a final Δm% line naming its reference, and its log
file holds none of orbax's INFO lines."""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "launch", "train.py")
SMOKE = os.path.join(ROOT, "configs", "synthetic.py") + ":smoke"


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  return env


def _launch(*args, cwd=None):
  return subprocess.run([sys.executable, TRAIN, *args], env=_env(), capture_output=True,
                        text=True, timeout=300, cwd=cwd or ROOT)


def _one_error_line(proc, code=2):
  assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  err = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("error: "), proc.stderr[-2000:]
  return err[0]


def _read_only_dir(tmp_path):
  if os.geteuid() == 0:  # root writes through permission bits: sysfs refuses new entries
    return "/sys/kernel/mtl_jax_read_only_workdir"
  d = tmp_path / "ro"
  d.mkdir()
  d.chmod(0o555)
  return str(d / "w")


def test_user_failures_are_one_line(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n")
  cases = [
      ([f"--config={SMOKE}", f"--workdir={a_file}"], "is a file, not a directory"),
      ([f"--config={SMOKE}", f"--workdir={_read_only_dir(tmp_path)}"], "is not writable"),
      ([f"--config={tmp_path / 'nope.py'}", f"--workdir={tmp_path / 'w'}"], "not found"),
      ([f"--config={bad}", f"--workdir={tmp_path / 'w'}"], "does not parse: invalid syntax"),
      ([f"--config={SMOKE[:-len(':smoke')]}:bogus", f"--workdir={tmp_path / 'w'}"],
       "unknown config variant 'bogus'; valid: '', smoke, quick, multi"),
      ([f"--config={SMOKE}", f"--workdir={tmp_path / 'w'}", "--config.train.nope=1"],
       "unknown config key 'config.train.nope'; valid keys of config.train:"),
  ]
  for args, needle in cases:
    line = _one_error_line(_launch(*args))
    assert needle in line, (args, line)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("launch") / "w"
  first = _launch(f"--config={SMOKE}", f"--workdir={wd}", "--progress")
  assert first.returncode == 0, first.stderr[-3000:]
  again = _launch(f"--config={SMOKE}", f"--workdir={wd}")
  assert again.returncode == 0, again.stderr[-3000:]
  return wd, first, again


def test_terminal_shows_startup_phases_progress_and_result(smoke_run):
  wd, first, _ = smoke_run
  out = first.stdout.splitlines()
  for start in ("loading synthetic data", "initialising the model", "benchmark   synthetic: 4 tasks",
                "combiner    ls", "engine      mode losses (ls needs only the losses)",
                "devices     1 x ", "parameters  ", "steps       12 (batch 8",
                f"workdir     {wd}", "resumed     no", "compiling the train step",
                "evaluating at step 6", "test reg0: mae "):
    assert any(l.startswith(start) for l in out), (start, first.stdout)
  assert out.index(next(l for l in out if l.startswith("compiling"))) < \
      out.index(next(l for l in out if l.startswith("test reg0")))
  assert re.fullmatch(r"Δm% [+-]\d+\.\d\d \(lower is better\) against the single-task \(STL\) "
                      r"reference of synthetic, at step \d+ selected by validation mean_main",
                      out[-1]), out[-1]
  # tqdm on stderr with the running loss
  assert "12/12" in first.stderr and "loss " in first.stderr and "step/s" in first.stderr


def test_resume_is_on_the_terminal_and_orbax_stays_out_of_the_log(smoke_run):
  wd, _, again = smoke_run
  assert any(l.startswith("resumed at step 12 from ") for l in again.stdout.splitlines())
  assert any(l.startswith("resumed     at step 12") for l in again.stdout.splitlines())
  info = "".join(open(f).read() for f in glob.glob(os.path.join(wd, "train*INFO*")))
  assert "compiling the train step" in info and "resumed at step 12" in info
  assert "orbax" not in info.replace(str(wd), ""), [l for l in info.splitlines() if "orbax" in l][:3]


def test_no_restorable_checkpoint_is_one_line_exit_2(smoke_run, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  wd = tmp_path / "w"
  shutil.copytree(smoke_run[0], wd)
  for meta in glob.glob(str(wd / "checkpoints" / "*" / "state" / "_METADATA")):
    with open(meta, "w") as f:
      f.write("garbage")
  line = _one_error_line(_launch(f"--config={SMOKE}", f"--workdir={wd}"))
  assert "no checkpoint in " in line and "restores" in line


def test_every_step_skipped_warns_and_exits_4(tmp_path):
  proc = _launch(f"--config={SMOKE}", f"--workdir={tmp_path / 'w'}", "--config.data.noise=nan",
                 "--config.train.on_nonfinite=skip")
  assert proc.returncode == 4, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-1] == (
      "error: every one of the 12 steps was skipped as non-finite "
      "(config.train.on_nonfinite='skip'): the parameters are the initial ones")


def test_flag_error_line_never_loads_the_config_file(tmp_path):
  from mtl_jax import config_utils  # pylint: disable=g-import-not-at-top
  marker = tmp_path / "ran"
  spec = tmp_path / "cfg.py"
  spec.write_text(f"open({str(marker)!r}, 'w').close()\ndef get_config():\n  return None\n")
  argv = ["train.py", f"--config={spec}", "--config.train.nope=1"]
  line = config_utils.flag_error_line(AttributeError("'nope'"), argv)
  assert line == "'nope'" and not marker.exists()
  from mtl_jax.configs import synthetic  # pylint: disable=g-import-not-at-top
  line = config_utils.flag_error_line(AttributeError("'nope'"), argv, synthetic.get_config("smoke"))
  assert line.startswith("unknown config key 'config.train.nope'; valid keys of config.train: ")
  assert not marker.exists()
