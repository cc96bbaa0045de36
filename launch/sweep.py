r"""Run a grid of training runs: combiners × sharing strategies × seeds × task mixes, plus the
single-task baselines.

    python launch/sweep.py --config=configs/sweeps/qm9_quick.py --workdir=/tmp/sweep
    python launch/sweep.py --config=configs/sweeps/qm9_quick.py --workdir=/tmp/sweep --dry_run
    python launch/sweep.py --config=configs/sweeps/qm9_quick.py --workdir=/tmp/sweep \
      --emit=cmds.txt          # one shell command per line, for a cluster's job array
    python launch/sweep.py ... --only='^stl/'   # only the single-task baselines

A sweep config (``configs/sweeps/*.py``) has ``get_config()`` returning a ConfigDict with
``base`` (a training config, ``path[:variant]``, relative to the repository root), ``overrides``
(``key=value`` strings applied to every run, as ``--config.key=value``), and the axes
``combiners``, ``sharing``, ``seeds``, ``task_mixes`` (``'all'`` or comma-separated task names);
``single_task`` adds one run per task of every mix and seed (combiner
``single_task_combiner``, hard sharing, plus ``single_task_overrides``) — the STL baseline of
Δm% and of the negative-transfer test. Any field can be overridden on the command line
(``--config.seeds=0,1``).

Runs go one after another as subprocesses of ``launch/train.py`` (single-task baselines first,
then seed by seed, so that a sweep cut short has every method at least once), each in ``<workdir>/<run name>``. The sweep is resumable: a run whose ``summary.json`` exists is
skipped, and an interrupted one resumes from its checkpoint when the sweep is rerun. The list of
runs (name, axes, workdir, command) is written to ``<workdir>/sweep.json``, which
``launch/report.py`` reads; each run's stdout/stderr go to ``<run>/sweep.log``. A failing run is
reported and the sweep goes on (``--stop_on_error`` to stop); the exit status is 1 if any failed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

REQUIRED = ("base", "combiners", "sharing", "seeds", "task_mixes")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  name: str
  kind: str  # 'mtl' | 'stl'
  combiner: str
  sharing: str
  seed: int
  tasks: str  # 'all' or comma-separated
  overrides: tuple

  def workdir(self, root: str) -> str:
    return os.path.join(root, *self.name.split("/"))

  def command(self, root: str, base: str, python: str = sys.executable) -> list[str]:
    cmd = [python, os.path.join(ROOT, "launch", "train.py"), f"--config={base}",
           f"--workdir={self.workdir(root)}", f"--config.combiner.name={self.combiner}",
           f"--config.model.sharing={self.sharing}", f"--config.seed={self.seed}",
           f"--config.tasks={self.tasks}"]
    return cmd + [f"--config.{o}" for o in self.overrides]


def _list(x) -> list:
  if isinstance(x, str):
    return [s.strip() for s in x.split(",") if s.strip()] if x else []
  if isinstance(x, int):
    return [x]
  return list(x)


def mix_label(tasks: str) -> str:
  names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks != "all" else ["all"]
  return "+".join(names)


def _check_override(o: str) -> str:
  if "=" not in o or o.startswith("-"):
    raise ValueError(f"override {o!r} must be 'key=value' (e.g. 'train.num_steps=100')")
  return o


def expand(sweep) -> list[RunSpec]:
  """The sweep's runs, single-task baselines first; raises one-line errors on a bad config."""
  missing = [k for k in REQUIRED if k not in sweep]
  if missing:
    raise ValueError(f"sweep config lacks {', '.join(missing)}; required: {', '.join(REQUIRED)}")
  combs = [str(c) for c in _list(sweep.combiners)]
  shares = [str(s) for s in _list(sweep.sharing)]
  seeds = [int(s) for s in _list(sweep.seeds)]
  # task mixes: a list of strings; a single string is one mix (it may contain commas)
  mixes = [sweep.task_mixes] if isinstance(sweep.task_mixes, str) else list(sweep.task_mixes)
  mixes = [str(m).replace(" ", "") for m in mixes]
  if not (combs and shares and seeds and mixes):
    raise ValueError("every axis (combiners, sharing, seeds, task_mixes) needs at least one value")
  common = tuple(_check_override(o) for o in _list(sweep.get("overrides", ())))
  runs = []
  if sweep.get("single_task", False):
    stl_tasks = _list(sweep.get("single_task_tasks", "")) or None
    seen = []
    for mix in mixes:
      names = stl_tasks if stl_tasks else (_all_tasks(sweep) if mix == "all" else mix.split(","))
      seen += [t for t in names if t not in seen]
    extra = tuple(_check_override(o) for o in _list(sweep.get("single_task_overrides", ())))
    comb = str(sweep.get("single_task_combiner", "ls"))
    for s in seeds:
      for t in seen:
        runs.append(RunSpec(f"stl/{t}/s{s}", "stl", comb, "hard", s, t, common + extra))
  for s in seeds:  # seed-major: a sweep cut short still has every method once
    for mix in mixes:
      for sh in shares:
        for c in combs:
          runs.append(RunSpec(f"{mix_label(mix)}/{sh}/{c}/s{s}", "mtl", c, sh, s, mix, common))
  names = [r.name for r in runs]
  dup = {n for n in names if names.count(n) > 1}
  if dup:
    raise ValueError(f"duplicate runs in the sweep: {sorted(dup)}")
  return runs


def _all_tasks(sweep) -> list[str]:
  """The task names of the base config's benchmark (for single-task runs of the 'all' mix)."""
  if "all_tasks" in sweep and sweep.all_tasks:
    return _list(sweep.all_tasks)
  raise ValueError("single_task with task mix 'all' needs the task names: set the sweep "
                   "config's all_tasks (or single_task_tasks)")


def check_names(runs: Sequence[RunSpec]) -> None:
  """Combiner and sharing names against their registries (one line naming the valid ones)."""
  from mtl_jax import combiners  # pylint: disable=g-import-not-at-top
  from mtl_jax import sharing  # pylint: disable=g-import-not-at-top
  for r in runs:
    if r.combiner not in combiners.names():
      raise ValueError(f"unknown combiner {r.combiner!r}; valid: {', '.join(combiners.names())}")
    if r.sharing not in sharing.names():
      raise ValueError(f"unknown sharing {r.sharing!r}; valid: {', '.join(sharing.names())}")


def is_done(root: str, r: RunSpec) -> bool:
  return os.path.exists(os.path.join(r.workdir(root), "summary.json"))


def write_manifest(root: str, sweep, runs: Sequence[RunSpec], python: str) -> str:
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, "sweep.json")
  data = {"base": sweep.base, "sweep": sweep.to_dict() if hasattr(sweep, "to_dict") else {},
          "runs": [{**dataclasses.asdict(r), "workdir": os.path.relpath(r.workdir(root), root),
                    "command": shlex.join(r.command(root, sweep.base, python))} for r in runs]}
  with open(path, "w") as f:
    json.dump(data, f, indent=1, default=list)
  return path


def run_one(root: str, base: str, r: RunSpec, python: str) -> tuple[int, float]:
  wd = r.workdir(root)
  os.makedirs(wd, exist_ok=True)
  t0 = time.perf_counter()
  with open(os.path.join(wd, "sweep.log"), "a") as log:
    proc = subprocess.run(r.command(root, base, python), stdout=log, stderr=subprocess.STDOUT,
                          cwd=ROOT, check=False)
  return proc.returncode, time.perf_counter() - t0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  sweep = _CONFIG.value
  if _WORKDIR.value is None and not _DRY_RUN.value:
    _fail("--workdir is required")
  root = os.path.abspath(_WORKDIR.value or "/tmp/sweep")
  try:
    base_path = sweep.base.partition(":")[0] if "base" in sweep else ""
    if base_path and not os.path.exists(os.path.join(ROOT, base_path)):
      raise ValueError(f"base config {base_path!r} not found (relative to {ROOT})")
    runs = expand(sweep)
    check_names(runs)
  except (ValueError, KeyError) as e:
    _fail(str(e).splitlines()[0])
  python = _PYTHON.value
  all_runs = runs
  if _ONLY.value:
    pat = re.compile(_ONLY.value)
    runs = [r for r in runs if pat.search(r.name)]
  todo = [r for r in runs if not is_done(root, r)]
  print(f"sweep: {len(runs)} runs ({sum(r.kind == 'stl' for r in runs)} single-task), "
        f"{len(runs) - len(todo)} already done, {len(todo)} to run; workdir {root}", flush=True)
  if _DRY_RUN.value:
    for r in runs:
      state = "done" if is_done(root, r) else "todo"
      print(f"[{state}] {r.name}: {shlex.join(r.command(root, sweep.base, python))}")
    return
  write_manifest(root, sweep, all_runs, python)  # the whole sweep, whatever --only selects
  if _EMIT.value:
    with open(_EMIT.value, "w") as f:
      for r in todo:
        f.write(shlex.join(r.command(root, sweep.base, python)) + "\n")
    print(f"wrote {len(todo)} commands to {_EMIT.value}")
    return
  failed = []
  t_all = time.perf_counter()
  for i, r in enumerate(todo):
    print(f"[{i + 1}/{len(todo)}] {r.name} ...", end=" ", flush=True)
    rc, dt = run_one(root, sweep.base, r, python)
    if rc == 0 and is_done(root, r):
      print(f"done in {dt:.0f}s", flush=True)
    else:
      print(f"FAILED (exit {rc}, {dt:.0f}s; see {os.path.join(r.workdir(root), 'sweep.log')})",
            flush=True)
      failed.append(r.name)
      if _STOP.value:
        break
  print(f"sweep finished in {time.perf_counter() - t_all:.0f}s: {len(todo) - len(failed)} ran, "
        f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}", flush=True)
  if failed:
    sys.exit(1)


def _fail(msg: str) -> None:
  sys.stderr.write(f"error: {msg}\n")
  sys.stderr.flush()
  sys.exit(2)


def _define_flags():
  """The command-line flags (defined only when run as a script, so that tests can import the
  grid logic without touching absl's global flags)."""
  g = globals()
  g["_CONFIG"] = config_flags.DEFINE_config_file("config", None, "sweep config file")
  g["_WORKDIR"] = flags.DEFINE_string("workdir", None,
                                      "sweep directory (one sub-directory per run)")
  g["_DRY_RUN"] = flags.DEFINE_bool("dry_run", False,
                                    "print the runs and their commands, run nothing")
  g["_EMIT"] = flags.DEFINE_string("emit", None, "write the commands of the unfinished runs to "
                                   "this file (one per line) instead of running them")
  g["_ONLY"] = flags.DEFINE_string("only", None, "regular expression: only runs whose name matches")
  g["_STOP"] = flags.DEFINE_bool("stop_on_error", False, "stop at the first failing run")
  g["_PYTHON"] = flags.DEFINE_string("python", sys.executable,
                                     "the interpreter that runs launch/train.py")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
