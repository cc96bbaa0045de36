r"""Run a grid of training runs: combiners × sharing strategies × seeds × task mixes, plus the
single-task baselines.

    python launch/sweep.py --config=configs/sweeps/qm9_quick.py --workdir=/tmp/sweep
    python launch/sweep.py --config=configs/sweeps/qm9_quick.py --workdir=/tmp/sweep --dry_run
    python launch/sweep.py --config=configs/sweeps/qm9_quick.py --workdir=/tmp/sweep \
      --emit=cmds.txt          # one shell command per line, for a cluster's job array
    python launch/sweep.py ... --only='^stl/'   # only the single-task baselines

A sweep config (``configs/sweeps/*.py``) has ``get_config()`` returning a ConfigDict with
``base`` (a training config, ``path[:variant]``, relative to the repository root or the current
directory), ``overrides`` (``key=value`` strings applied to every run, as ``--config.key=value``),
and the axes ``combiners``, ``sharing``, ``seeds`` (tuples or comma-separated strings:
``--config.combiners=ls,famo``, ``--config.seeds=0,1``), ``task_mixes`` (a tuple of mixes, each
``'all'`` or comma-separated task names; one string is one mix); ``single_task`` adds one run per
task of every mix and seed (combiner ``single_task_combiner``, hard sharing, plus
``single_task_overrides``) — the STL baseline of Δm% and of the negative-transfer test. Any field
can be overridden on the command line. ``sharing_variants`` (optional) names entries of the
``sharing`` axis that are a registry strategy plus overrides, ``{label: (sharing, 'key=value',
...)}`` (e.g. the ``config.structure`` methods of ``configs/sweeps/structure_qm9.py``).

Runs go one after another as subprocesses of ``launch/train.py`` (single-task baselines first,
then seed by seed, so that a sweep cut short has every method at least once), each in
``<workdir>/<run name>`` and started there: every command holds absolute paths only, so the
commands of ``--emit`` run from any directory. The sweep is resumable: a run is *done* when its
``summary.json`` records the config this sweep would run now (the same
:func:`mtl_jax.config_utils.config_digest`; the config is parsed from the run's command exactly as
``launch/train.py`` parses it), and an interrupted one resumes from its checkpoint. A finished run
made with another config (e.g. the overrides changed) is *stale*: the sweep lists it with the keys
that differ and stops (exit 2), or with ``--stale=rerun`` moves its directory to
``<run>.stale-<digest>`` (nothing is deleted) and runs it afresh; ``launch/report.py`` leaves out
any finished run whose digest differs from the one ``sweep.json`` lists. The list of runs (name,
axes, workdir, command, config digest) is written to ``<workdir>/sweep.json``; each run's
stdout/stderr go to ``<run>/sweep.log``. A failing run is reported and the sweep goes on
(``--stop_on_error`` to stop); the exit status is 1 if any failed.
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


def _axis(x) -> list:
  """An axis's values: a tuple, a comma-separated string, or a tuple of such strings (how
  ``--config.combiners=ls,famo`` arrives: config_flags gives a tuple field ``('ls,famo',)``)."""
  out = []
  for v in ([x] if isinstance(x, (str, int)) else x):
    out += _list(v) if isinstance(v, str) else [v]
  return out


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
  combs = [str(c) for c in _axis(sweep.combiners)]
  shares = [str(s) for s in _axis(sweep.sharing)]
  seeds = [int(s) for s in _axis(sweep.seeds)]
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
  variants = dict(sweep.get("sharing_variants", {}) or {})
  for s in seeds:  # seed-major: a sweep cut short still has every method once
    for mix in mixes:
      for sh in shares:
        # a sharing variant: a label for (registry sharing, overrides), e.g. a structure method
        name, extra = (_variant(sh, variants[sh]) if sh in variants else (sh, ()))
        for c in combs:
          runs.append(RunSpec(f"{mix_label(mix)}/{sh}/{c}/s{s}", "mtl", c, name, s, mix,
                              common + extra))
  names = [r.name for r in runs]
  dup = {n for n in names if names.count(n) > 1}
  if dup:
    raise ValueError(f"duplicate runs in the sweep: {sorted(dup)}")
  return runs


def _variant(label: str, spec) -> tuple:
  """``sharing_variants[label]`` = (sharing name, override, ...) -> (name, overrides)."""
  spec = _list(spec) if isinstance(spec, str) else list(spec)
  if not spec:
    raise ValueError(f"sharing variant {label!r} needs (sharing name, 'key=value', ...)")
  return str(spec[0]), tuple(_check_override(str(o)) for o in spec[1:])


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


def resolve_base(base: str) -> str:
  """``path[:variant]`` with ``path`` made absolute (relative paths are tried against the
  repository root, then the current directory), so that the commands run from anywhere."""
  path, sep, variant = base.partition(":")
  for cand in ((path,) if os.path.isabs(path) else (os.path.join(ROOT, path), path)):
    if os.path.isfile(cand):
      return os.path.abspath(cand) + sep + variant
  raise ValueError(f"base config {path!r} not found (relative to {ROOT} or the current directory)")


def run_config(r: RunSpec, root: str, base: str):
  """The config ``launch/train.py`` builds from ``r``'s command (parsed the same way, by
  config_flags); a bad override is one line."""
  from mtl_jax import config_utils  # pylint: disable=g-import-not-at-top
  argv = [a for a in r.command(root, base, "python")[1:] if a.startswith("--config")]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=["train.py"] + argv)
  try:
    fv(["train.py"] + argv)
    return fv.config
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    raise ValueError(f"run {r.name}: {config_utils.flag_error_line(e, ['train.py'] + argv)}")


@dataclasses.dataclass(frozen=True)
class RunState:
  """``state``: 'todo' (no summary.json), 'done' (finished with the config the sweep would run
  now) or 'stale' (finished with another one; ``why`` says how it differs)."""
  state: str
  digest: str  # the config digest of the run as the sweep would run it now
  why: str = ""
  recorded: Optional[str] = None  # the finished run's digest


def run_state(root: str, r: RunSpec, digest: str, config=None) -> RunState:
  """Compares a finished run's recorded config digest with the sweep's ``digest``."""
  from mtl_jax.analysis import runs as runs_lib  # pylint: disable=g-import-not-at-top
  path = os.path.join(r.workdir(root), runs_lib.SUMMARY)
  if not os.path.exists(path):
    return RunState("todo", digest)
  summary = runs_lib.read_summary(r.workdir(root))
  recorded = runs_lib.recorded_digest(summary)
  if recorded == digest:
    return RunState("done", digest, recorded=recorded)
  if recorded is None:
    return RunState("stale", digest, "its summary.json records no config", None)
  return RunState("stale", digest, config_difference(summary.get("config"), config), recorded)


def config_difference(old, new, limit: int = 4) -> str:
  """The first keys whose values differ, e.g. ``train.num_steps 150 -> 300``."""
  def flat(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
      if isinstance(v, dict):
        out.update(flat(v, f"{prefix}{k}."))
      else:
        out[f"{prefix}{k}"] = list(v) if isinstance(v, (list, tuple)) else v
    return out
  a, b = flat(old), flat(new.to_dict() if hasattr(new, "to_dict") else new)
  diff = [f"{k} {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, "(absent)") != b.get(k, "(absent)")]
  if not diff:
    return "another config digest"
  return ", ".join(diff[:limit]) + (f" and {len(diff) - limit} more" if len(diff) > limit else "")


def states(root: str, base: str, runs: Sequence[RunSpec]) -> dict[str, RunState]:
  from mtl_jax import config_utils  # pylint: disable=g-import-not-at-top
  out = {}
  for r in runs:
    config = run_config(r, root, base)
    out[r.name] = run_state(root, r, config_utils.config_digest(config), config)
  return out


def move_aside(root: str, r: RunSpec, st: RunState) -> str:
  """Move a stale run's directory to ``<run>.stale-<digest>`` (nothing is deleted)."""
  wd = r.workdir(root)
  dst = f"{wd}.stale-{st.recorded or 'unknown'}"
  n = 1
  while os.path.exists(dst):
    dst, n = f"{wd}.stale-{st.recorded or 'unknown'}-{n}", n + 1
  os.rename(wd, dst)
  return dst


def write_manifest(root: str, sweep, runs: Sequence[RunSpec], python: str, base: str,
                   st: dict[str, RunState]) -> str:
  """``<root>/sweep.json``: every run with its workdir, command and config digest (the report
  leaves out a finished run whose recorded digest differs)."""
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, "sweep.json")
  data = {"base": sweep.base, "sweep": sweep.to_dict() if hasattr(sweep, "to_dict") else {},
          "runs": [{**dataclasses.asdict(r), "workdir": os.path.relpath(r.workdir(root), root),
                    "command": shlex.join(r.command(root, base, python)),
                    "config_digest": st[r.name].digest} for r in runs]}
  with open(path, "w") as f:
    json.dump(data, f, indent=1, default=list)
  return path


def run_one(root: str, base: str, r: RunSpec, python: str) -> tuple[int, float]:
  """Run ``r`` as a subprocess in its own workdir (the command depends on no directory)."""
  wd = r.workdir(root)
  os.makedirs(wd, exist_ok=True)
  t0 = time.perf_counter()
  with open(os.path.join(wd, "sweep.log"), "a") as log:
    proc = subprocess.run(r.command(root, base, python), stdout=log, stderr=subprocess.STDOUT,
                          cwd=wd, check=False)
  return proc.returncode, time.perf_counter() - t0


def _plan(sweep, root: str) -> tuple[str, list[RunSpec], list[RunSpec], dict[str, RunState]]:
  """(absolute base, every run, the runs ``--only`` selects, their states); one-line errors."""
  try:
    base = resolve_base(sweep.base) if "base" in sweep else ""
    all_runs = expand(sweep)
    check_names(all_runs)
    st = states(root, base, all_runs)
  except (ValueError, KeyError) as e:
    _fail(str(e).splitlines()[0])
  runs = all_runs
  if _ONLY.value:
    pat = re.compile(_ONLY.value)
    runs = [r for r in runs if pat.search(r.name)]
  return base, all_runs, runs, st


def _handle_stale(root: str, runs: Sequence[RunSpec], st: dict[str, RunState]) -> None:
  """Stale runs: listed and the sweep stops (default), or moved aside to be rerun."""
  stale = [r for r in runs if st[r.name].state == "stale"]
  if not stale or _DRY_RUN.value:
    return
  if _STALE.value == "stop":
    for r in stale:
      print(f"[stale] {r.name}: finished with another config ({st[r.name].why})", flush=True)
    _fail(f"{len(stale)} finished run(s) were made with another config than this sweep's; "
          f"--stale=rerun moves each to <run>.stale-<digest> and reruns it, or use another "
          f"--workdir")
  for r in stale:
    print(f"[stale] {r.name} ({st[r.name].why}): moved to {move_aside(root, r, st[r.name])}, "
          f"rerunning", flush=True)
    st[r.name] = RunState("todo", st[r.name].digest)


def _run_all(root: str, base: str, todo: Sequence[RunSpec], python: str) -> list[str]:
  failed = []
  t_all = time.perf_counter()
  for i, r in enumerate(todo):
    print(f"[{i + 1}/{len(todo)}] {r.name} ...", end=" ", flush=True)
    rc, dt = run_one(root, base, r, python)
    if rc == 0 and os.path.exists(os.path.join(r.workdir(root), "summary.json")):
      print(f"done in {dt:.0f}s", flush=True)
    else:
      print(f"FAILED (exit {rc}, {dt:.0f}s; see {os.path.join(r.workdir(root), 'sweep.log')})",
            flush=True)
      failed.append(r.name)
      if _STOP.value:
        break
  print(f"sweep finished in {time.perf_counter() - t_all:.0f}s: {len(todo) - len(failed)} ran, "
        f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}", flush=True)
  return failed


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    sweep = _CONFIG.value
    sweep.keys()  # a missing config file raises here, not in the flag parser
  except OSError as e:  # config_flags defers a missing config file to the first access
    from mtl_jax import config_utils  # pylint: disable=g-import-not-at-top
    _fail(config_utils.flag_error_line(e, sys.argv))
  if _WORKDIR.value is None and not _DRY_RUN.value:
    _fail("--workdir is required")
  root = os.path.abspath(_WORKDIR.value or "/tmp/sweep")
  base, all_runs, runs, st = _plan(sweep, root)
  python = os.path.abspath(_PYTHON.value) if os.sep in _PYTHON.value else _PYTHON.value
  count = {k: sum(st[r.name].state == k for r in runs) for k in ("done", "stale", "todo")}
  stale = f" ({count['stale']} stale)" if count["stale"] else ""
  print(f"sweep: {len(runs)} runs ({sum(r.kind == 'stl' for r in runs)} single-task), "
        f"{count['done']} already done, {count['todo'] + count['stale']} to run{stale}; "
        f"workdir {root}", flush=True)
  if _DRY_RUN.value:
    for r in runs:
      why = f" ({st[r.name].why})" if st[r.name].state == "stale" else ""
      print(f"[{st[r.name].state}] {r.name}{why}: {shlex.join(r.command(root, base, python))}")
    return
  _handle_stale(root, runs, st)
  write_manifest(root, sweep, all_runs, python, base, st)  # the whole sweep, whatever --only says
  todo = [r for r in runs if st[r.name].state == "todo"]
  if _EMIT.value:
    with open(_EMIT.value, "w") as f:
      for r in todo:
        f.write(shlex.join(r.command(root, base, python)) + "\n")
    print(f"wrote {len(todo)} commands to {_EMIT.value}")
    return
  if _run_all(root, base, todo, python):
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
  g["_STALE"] = flags.DEFINE_enum("stale", "stop", ["stop", "rerun"],
                                  "a finished run made with another config than the sweep's now: "
                                  "'stop' lists them and exits 2; 'rerun' moves each to "
                                  "<run>.stale-<digest> and runs it afresh")
  g["_PYTHON"] = flags.DEFINE_string("python", sys.executable,
                                     "the interpreter that runs launch/train.py")


def _parse(argv):
  """absl flag parsing with flag errors (a missing or broken sweep config file, an unknown
  variant, a bad --config.<key>) as one line, exit 2, as launch/train.py does."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError,
          SyntaxError) as e:
    from mtl_jax import config_utils  # pylint: disable=g-import-not-at-top
    _fail(config_utils.flag_error_line(e, argv))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse)
