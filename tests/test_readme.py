"""Every code block of README.md and docs/*.md runs as written (issue 14, item 2).

Blocks are extracted from the Markdown; each must be claimed by a handler below, so a new block
without a handler fails `test_every_block_has_a_handler`. What is run verbatim and what is
substituted (and why) is stated per handler:

* Python "own code" snippets: verbatim, from a temporary directory (not the repository root), so
  they import the installed package.
* `python -c ...` lines: verbatim, from a temporary directory.
* `python launch/train.py ...`: from the repository root (the paths are relative to it), with the
  config variant replaced by `:smoke` (mock data, a few steps) and `--workdir` by a temporary
  directory; every other flag as written.
* `python launch/toy.py ...`: `--steps=200 --grid=41` appended (35,000 steps otherwise), `--out`
  a temporary directory.
* The sweep walk-through (`launch/sweep.py`, `launch/report.py`, the notebook block): in order, on
  one temporary sweep directory, each command as written plus
  `--config.base=configs/ls_qm9.py:smoke --config.combiners=ls --config.seeds=0` and 4-step
  overrides appended (the flags given last win), `--emit`'s file in the temporary directory.
  The "abridged" sweep config block is checked line by line against the file it abridges.
* The TAG block: `:quick` -> `:smoke` and `num_steps=50` -> `num_steps=3`.
* `launch/benchmark.py` commands (minutes each): every flag they name must be a flag of that
  subcommand (its `--help`).
* The multi-host block (a `for` loop starting 2 processes): as written, with `--workdir` a
  temporary directory and the coordinator on a free port; both processes print one checksum.
* `launch/prepare.py` commands (they need the official files, downloaded by hand): the dataset
  name must be one prepare knows and every flag one it defines; `tests/test_prepare.py` runs each
  preparation on fabricated miniatures of those files.
* ```` ```text ```` blocks are diagrams, not commands.
* The "Learning the sharing structure" blocks: the smoke run and the line that prints its trees
  as written (workdir: a temporary directory; the run must split once, at step 2); the structure
  sweep with `--dry_run` appended (its smoke grid is 8 trainings; the sweep machinery itself is
  run above and in tests/test_sweep_report.py).
* Not run, with the reason: the install lines (`python3 -m venv`, `pip install`: the network;
  `.ci/run` runs them on every CI build) and `python -m pytest` (this suite).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mtl_jax import config_utils

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SMOKE_SWEEP = ["--config.base=configs/ls_qm9.py:smoke", "--config.combiners=ls",
               "--config.seeds=0",
               "--config.overrides=('train.num_steps=4','train.eval_every=4','train.log_every=2',"
               "'train.checkpoint_every=4','data.eval_limit=64')"]
SKIPPED = {  # command prefix -> why it is not run here
    "python3 -m venv": "creates an environment: .ci/run does it on every CI build",
    "pip install": "needs the network: .ci/run installs requirements.txt on every CI build",
    "python -m pytest": "this test suite itself (the --durations run too)",
}


def _blocks():
  out = []
  for path in DOCS:
    text = path.read_text()
    for m in FENCE.finditer(text):
      line = text[:m.start()].count("\n") + 1
      out.append((f"{path.relative_to(ROOT)}:{line}", m.group(1), m.group(2)))
  return out


BLOCKS = _blocks()


def _commands(body: str) -> list[str]:
  """Shell lines of a bash block: continuations joined, comments and blank lines dropped."""
  joined = body.replace("\\\n", " ")
  lines = [ln.split("  #")[0].strip() for ln in joined.splitlines()]
  return [ln for ln in lines if ln and not ln.startswith("#")]


def _kind(cmd: str) -> str:
  for prefix in SKIPPED:
    if cmd.startswith(prefix) or f"&& {prefix}" in cmd:
      return "skip"
  for kind in ("train", "toy", "sweep", "report", "benchmark", "prepare"):
    if cmd.startswith(f"python launch/{kind}.py"):
      return kind
  if cmd.startswith("python -c ") or cmd.startswith("pip list "):
    return "shell"
  return "unknown"


def _python_kind(body: str) -> str:
  if body.startswith("# configs/sweeps/"):
    return "abridged_sweep"
  if "affinity.from_config" in body:
    return "tag"
  if "runs.find_runs" in body:
    return "notebook"
  if "import" in body and "configs/" not in body and "/tmp/" not in body:
    return "own_code"
  return "unknown"


def _claims(block) -> list[str]:
  where, lang, body = block
  if lang == "python":
    return [_python_kind(body)]
  if lang == "text":
    return ["diagram"]  # a picture in text (docs/architecture.md), nothing to run
  if lang in ("bash", "sh") and body.startswith("for i in"):
    return ["multiprocess"]
  if lang in ("bash", "sh") and _is_structure(body):
    return ["structure"]
  if lang in ("bash", "sh"):
    return [_kind(c) for c in _commands(body)]
  return ["unknown"]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  return env


def _run(cmd: str, cwd, timeout: int = 300) -> str:
  res = subprocess.run(cmd, shell=True, cwd=cwd, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
  assert res.returncode == 0, f"`{cmd}` (cwd {cwd}) exited {res.returncode}:\n{res.stderr[-3000:]}"
  return res.stdout


def _is_structure(body: str) -> bool:
  return "config.structure." in body or "sweeps/structure_" in body


def _of_kind(kind: str) -> list[str]:
  return [c for where, lang, body in BLOCKS if lang in ("bash", "sh")
          and not body.startswith("for i in") and not _is_structure(body)
          for c in _commands(body) if _kind(c) == kind]


def _python_blocks(kind: str) -> list[str]:
  return [body for where, lang, body in BLOCKS if lang == "python" and _python_kind(body) == kind]


def _replace_flag(cmd: str, flag: str, value: str) -> str:
  new, n = re.subn(rf"--{flag}=\S+", f"--{flag}={value}", cmd)
  assert n == 1, f"expected one --{flag} in `{cmd}`"
  return new


def test_every_block_has_a_handler():
  assert len(BLOCKS) >= 10
  orphans = [(where, c) for block in BLOCKS for where, c in [(block[0], _claims(block))]
             if "unknown" in c]
  assert not orphans, f"code blocks no handler runs (add one to tests/test_readme.py): {orphans}"
  for prefix, why in SKIPPED.items():
    assert why  # every skip says why


@pytest.mark.parametrize("index", range(len(_python_blocks("own_code"))))
def test_own_code_snippets_run_verbatim_from_another_directory(index, tmp_path):
  body = _python_blocks("own_code")[index]
  (tmp_path / "snippet.py").write_text(body)
  out = _run(f"{shlex.quote(sys.executable)} snippet.py", tmp_path, timeout=240)
  assert out.strip(), "the snippet prints its result"


def test_shell_lines_run_verbatim(tmp_path):
  for cmd in _of_kind("shell"):
    _run(cmd, tmp_path, timeout=120)
  assert (tmp_path / "keep-jax.txt").read_text().lower().count("jax") >= 2  # jax and jaxlib pins


def test_train_commands_at_smoke_size(tmp_path):
  cmds = _of_kind("train")
  assert len(cmds) >= 3  # the main job, the training example, "look at one run first"
  for i, cmd in enumerate(cmds):
    cmd = re.sub(r"--config=(configs/\w+\.py)(:\w+)?", r"--config=\1:smoke", cmd)
    cmd = _replace_flag(cmd, "workdir", str(tmp_path / f"run{i}"))
    _run(cmd, ROOT)
    summary = json.loads((tmp_path / f"run{i}" / "summary.json").read_text())
    tasks = re.search(r"--config.tasks=(\S+)", cmd)
    if tasks:
      assert sorted(summary["test"]) == sorted(tasks.group(1).split(",")), cmd
    assert summary["test"] and summary["num_params"] > 0, cmd
    for task, metrics in summary["test"].items():  # every task's selected test metrics, finite
      assert metrics and all(math.isfinite(v) for v in metrics.values()), (cmd, task, metrics)


def test_toy_command_short(tmp_path):
  (cmd,) = _of_kind("toy")
  cmd = _replace_flag(cmd, "out", str(tmp_path)) + " --steps=200 --grid=41"
  _run(cmd, ROOT)
  assert (tmp_path / "toy.png").exists()


def test_benchmark_commands_name_real_flags():
  cmds = _of_kind("benchmark")
  assert cmds
  helps = {}
  for cmd in cmds:
    argv = shlex.split(cmd)[2:]
    sub = argv[0] if argv and not argv[0].startswith("-") else "step"  # benchmark.py's default
    if sub == "--help":
      continue
    if sub not in helps:
      helps[sub] = _run(f"python launch/benchmark.py {sub} --help", ROOT, timeout=120)
    for arg in argv:
      if arg.startswith("--") and arg != "--help":
        name = arg.split("=")[0]
        assert re.search(rf"{re.escape(name)}\b", helps[sub]), f"{cmd}: {name} is not a flag"


def test_abridged_sweep_block_matches_its_file():
  (body,) = _python_blocks("abridged_sweep")
  rel = body.splitlines()[0].split()[1]
  config = config_utils.load_config_file(str(ROOT / rel))
  stmts = re.findall(r"^c\.(\w+) = (.+?)(?=^c\.|\Z)", body, re.M | re.S)
  assert len(stmts) >= 5
  for key, value in stmts:
    value = value.split("  #")[0].strip()
    assert eval(value) == (tuple(config[key]) if isinstance(config[key], (list, tuple))  # pylint: disable=eval-used
                           else config[key]), f"README's c.{key} differs from {rel}"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
  """The README's sweep commands, in order, on one smoke-sized sweep directory."""
  tmp = tmp_path_factory.mktemp("readme_sweep")
  work = tmp / "qm9_sweep"
  cmds = _of_kind("sweep")
  assert len(cmds) >= 3
  for cmd in cmds:
    cmd = _replace_flag(cmd, "workdir", str(work))
    if "--emit=" in cmd:
      cmd = _replace_flag(cmd, "emit", str(tmp / "cmds.txt"))
    _run(cmd + " " + " ".join(shlex.quote(a) for a in SMOKE_SWEEP), ROOT, timeout=400)
  assert (work / "sweep.json").exists()
  return work


def test_sweep_then_report(sweep_dir, tmp_path):
  assert (sweep_dir / "stl" / "homo").is_dir() and (sweep_dir / "mu+homo+U0" / "hard").is_dir()
  (cmd,) = _of_kind("report")
  cmd = _replace_flag(_replace_flag(cmd, "workdir", str(sweep_dir)), "out", str(tmp_path / "r"))
  _run(cmd, ROOT)
  assert "Δm" in (tmp_path / "r" / "report.md").read_text()


def test_notebook_block_on_the_sweep(sweep_dir, tmp_path):
  (body,) = _python_blocks("notebook")
  (tmp_path / "nb.py").write_text(body.replace("/tmp/qm9_sweep", str(sweep_dir)))
  out = _run(f"{shlex.quote(sys.executable)} nb.py", tmp_path)
  assert out.startswith("ls "), out


def test_tag_block_at_smoke_size(tmp_path):
  (body,) = _python_blocks("tag")
  small = body.replace("configs/ls_qm9.py:quick", "configs/ls_qm9.py:smoke")
  small = small.replace("num_steps=50", "num_steps=3")
  assert small.count("smoke") == 1 and "num_steps=3" in small
  (tmp_path / "tag.py").write_text(small)
  out = _run(f"{shlex.quote(sys.executable)} {tmp_path / 'tag.py'}", ROOT)
  assert "[" in out


def _free_port() -> int:
  import socket
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def test_two_process_block(tmp_path):
  (body,) = [b for w, lang, b in BLOCKS if lang == "bash" and b.startswith("for i in")]
  script = _replace_flag(body, "workdir", str(tmp_path / "run"))
  script = re.sub(r"localhost:\d+", f"localhost:{_free_port()}", script)
  out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  sums = re.findall(r"params_checksum\W+([0-9a-f]{8,})", out.stdout)
  assert len(sums) == 2 and sums[0] == sums[1], out.stdout[-2000:]


def test_prepare_commands_name_real_datasets_and_flags():
  from mtl_jax.data import prepare
  cmds = _of_kind("prepare")
  assert cmds
  helps = subprocess.run("python launch/prepare.py --help", shell=True, cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120).stdout  # absl: exit 1
  for cmd in cmds:
    argv = shlex.split(cmd, comments=True)[2:]
    assert argv[0] in prepare.NAMES, f"{cmd}: unknown dataset (valid: {prepare.NAMES})"
    for arg in argv[1:]:
      assert arg.startswith("--") and f"{arg.split('=')[0]}:" in helps, f"{cmd}: {arg}"


def test_structure_blocks(tmp_path):
  blocks = [b for w, lang, b in BLOCKS if lang == "bash" and _is_structure(b)]
  assert len(blocks) == 2
  work = str(tmp_path / "structure_smoke")
  train_cmd, show = [c.replace("/tmp/structure_smoke", work) for c in _commands(blocks[0])]
  _run(train_cmd, ROOT)
  trees = eval(_run(show, tmp_path))  # pylint: disable=eval-used  (the printed dict)
  assert sorted(trees, key=int) == ["0", "2"] and trees["2"] != trees["0"], trees  # one split
  (sweep,) = _commands(blocks[1])
  out = _run(_replace_flag(sweep, "workdir", str(tmp_path / "sw")) + " --dry_run", ROOT)
  assert "sweep: 8 runs" in out and "/affinity/nash_mtl/" in out, out[-2000:]
