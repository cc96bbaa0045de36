"""Reading run workdirs: ``summary.json``, ``metrics.jsonl`` and a sweep's ``sweep.json``.

A *run* is one workdir written by :func:`mtl_jax.train.fit`. :func:`load_run` turns it into a
:class:`Run` (the summary, the training records and the evaluation records of ``metrics.jsonl``);
:func:`find_runs` collects every finished run under a directory (a sweep, or any tree of
workdirs). A run is *single-task* (an STL baseline) when it trained one task; runs are grouped
into *methods* by :func:`method_key` (combiner, sharing and task mix), and the seeds of a method
are its repetitions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
SWEEP = "sweep.json"


@dataclasses.dataclass
class Run:
  """One finished run.

  Attributes:
    workdir: its directory.
    summary: the parsed ``summary.json``.
    train: the training records of ``metrics.jsonl`` (those without ``eval``), in step order.
    evals: the evaluation records (``{'step', 'eval': {split: {task: {metric: v}}}, ...}``).
    label: the sweep's name for it (``''`` outside a sweep).
  """

  workdir: str
  summary: dict
  train: list
  evals: list
  label: str = ""

  @property
  def tasks(self) -> list[str]:
    return list(self.summary.get("tasks") or [])

  @property
  def seed(self) -> int:
    return int((self.summary.get("config") or {}).get("seed", 0))

  @property
  def combiner(self) -> str:
    return str(self.summary.get("combiner", ""))

  @property
  def sharing(self) -> str:
    return str(self.summary.get("sharing", ""))

  @property
  def benchmark(self) -> str:
    return str(self.summary.get("benchmark", ""))

  @property
  def is_single_task(self) -> bool:
    return len(self.tasks) == 1

  @property
  def test(self) -> dict:
    return self.summary.get("test") or {}


def _number(x: Any) -> Any:
  """``'nan'``/``'inf'`` strings (how the trainer writes non-finite floats) back to floats."""
  if isinstance(x, str) and x.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
    return float(x)
  if isinstance(x, Mapping):
    return {k: _number(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_number(v) for v in x]
  return x


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSONL file; a line cut short by a kill is skipped."""
  out = []
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        out.append(_number(json.loads(line)))
      except ValueError:
        continue
  return out


def read_summary(workdir: str) -> dict:
  """The parsed ``summary.json`` of ``workdir`` (non-finite numbers back to floats); raises
  ``FileNotFoundError`` if the run has not finished."""
  path = os.path.join(workdir, SUMMARY)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir}: no {SUMMARY} (the run has not finished)")
  with open(path) as f:
    return _number(json.load(f))


def load_run(workdir: str, label: str = "") -> Run:
  """The :class:`Run` of ``workdir``; raises ``FileNotFoundError`` if it has no ``summary.json``."""
  summary = read_summary(workdir)
  records = read_jsonl(os.path.join(workdir, METRICS))
  evals = sorted((r for r in records if "eval" in r), key=lambda r: r["step"])
  train = sorted((r for r in records if "eval" not in r), key=lambda r: r["step"])
  return Run(workdir, summary, train, evals, label)


def recorded_digest(summary: Mapping[str, Any]) -> Optional[str]:
  """The config digest of a finished run: ``summary['config_digest']`` when the trainer wrote
  one, else :func:`mtl_jax.config_utils.config_digest` of the config its summary records; None
  if it records neither."""
  from mtl_jax import config_utils  # pylint: disable=g-import-not-at-top
  if summary.get("config_digest"):
    return str(summary["config_digest"])
  if isinstance(summary.get("config"), Mapping):
    return config_utils.config_digest(summary["config"])
  return None


@dataclasses.dataclass(frozen=True)
class Stale:
  """A finished run a sweep lists with another config than the one it finished with."""
  workdir: str
  label: str
  expected: str  # the sweep's digest
  recorded: Optional[str]  # the run's


def scan(root: str) -> tuple[list[Run], list[Stale]]:
  """The finished runs under ``root`` and, in a sweep, the stale ones left out.

  With a ``sweep.json`` in ``root`` the runs are those it lists (labelled by their sweep names;
  unfinished ones skipped; one whose recorded config digest differs from the manifest's is
  *stale*: left out and returned in the second list); otherwise every directory holding a
  ``summary.json``.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root}: not a directory")
  manifest = os.path.join(root, SWEEP)
  runs, stale = [], []
  if os.path.exists(manifest):
    with open(manifest) as f:
      sweep = json.load(f)
    for r in sweep.get("runs", []):
      wd = r["workdir"] if os.path.isabs(r["workdir"]) else os.path.join(root, r["workdir"])
      if not os.path.exists(os.path.join(wd, SUMMARY)):
        continue
      run = load_run(wd, r.get("name", ""))
      want, have = r.get("config_digest"), recorded_digest(run.summary)
      if want is not None and have != want:
        stale.append(Stale(wd, run.label, want, have))
      else:
        runs.append(run)
    return runs, stale
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ("checkpoints", "tensorboard"))
    if SUMMARY in filenames:
      runs.append(load_run(dirpath, os.path.relpath(dirpath, root)))
  return sorted(runs, key=lambda r: r.workdir), stale


def find_runs(root: str) -> list[Run]:
  """Every finished, current run under ``root`` (``root`` itself included): see :func:`scan`."""
  return scan(root)[0]


def mix_name(tasks: Sequence[str], all_tasks: Optional[Sequence[str]] = None) -> str:
  """``'all'`` when ``tasks`` is the benchmark's full list, else the names joined by ``+``."""
  if all_tasks is not None and list(tasks) == list(all_tasks):
    return "all"
  return "+".join(tasks)


def structure_of(summary: Mapping[str, Any]) -> Optional[dict]:
  """The summary's ``structure`` block (a run with a ``config.structure`` method), or None."""
  st = summary.get("structure")
  return dict(st) if isinstance(st, Mapping) and st.get("method") not in (None, "none") else None


def strategy(summary: Mapping[str, Any]) -> str:
  """The sharing a run compares as: its structure method (``fixed`` is ``branched``; ``conflict``
  retrained from scratch is ``recon``), else ``config.model.sharing``."""
  st = structure_of(summary)
  if st is None:
    return str(summary.get("sharing", ""))
  method = str(st["method"])
  if method == "fixed":
    return "branched"
  restart = ((summary.get("config") or {}).get("structure") or {}).get("restart")
  if method == "conflict" and (restart or st.get("restart_step")):
    return "recon"
  return method


def method_key(run: Run) -> str:
  """The method a run is a seed of: ``combiner`` (``/strategy`` unless hard; the strategy is the
  structure method when the run has one, :func:`strategy`) (``[mix]``)."""
  name = run.combiner
  strat = strategy(run.summary)
  if strat and strat != "hard":
    name += f"/{strat}"
  return name


def group_runs(runs: Iterable[Run]) -> dict[tuple[str, ...], dict[str, list[Run]]]:
  """``{task mix (tuple of tasks): {method: [runs over seeds]}}`` for the multi-task runs."""
  out: dict[tuple[str, ...], dict[str, list[Run]]] = {}
  for r in runs:
    if r.is_single_task:
      continue
    out.setdefault(tuple(r.tasks), {}).setdefault(method_key(r), []).append(r)
  for methods in out.values():
    for rs in methods.values():
      rs.sort(key=lambda r: r.seed)
  return out


def single_task_runs(runs: Iterable[Run]) -> dict[str, list[Run]]:
  """``{task: [single-task runs over seeds]}`` (one-task runs; any combiner — with one task every
  weighting reduces to plain training up to the scale of the loss)."""
  out: dict[str, list[Run]] = {}
  for r in runs:
    if r.is_single_task:
      out.setdefault(r.tasks[0], []).append(r)
  return out


def metric_samples(runs: Sequence[Run], task: str, metric: str) -> np.ndarray:
  """The test ``metric`` of ``task`` over ``runs`` (finite values only)."""
  vals = [r.test.get(task, {}).get(metric) for r in runs]
  vals = [float(v) for v in vals if v is not None]
  return np.array([v for v in vals if math.isfinite(v)], np.float64)


def mean_std(x: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for one value, NaN for none)."""
  x = np.asarray(x, np.float64)
  if x.size == 0:
    return math.nan, math.nan
  return float(x.mean()), (float(x.std(ddof=1)) if x.size > 1 else 0.0)


def task_metrics(runs: Iterable[Run]) -> dict[str, list[str]]:
  """``{task: [metric names]}`` in the order the runs' summaries list them."""
  out: dict[str, list[str]] = {}
  for r in runs:
    for t, ms in r.test.items():
      lst = out.setdefault(t, [])
      for m in ms:
        if m not in lst:
          lst.append(m)
  return out


def series(records: Sequence[Mapping[str, Any]], key: str,
           index: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """``(steps, values)`` of a logged key over the records that have it (entry ``index`` of a
  vector-valued key)."""
  steps, vals = [], []
  for r in records:
    if key not in r:
      continue
    v = r[key]
    if index is not None:
      v = v[index]
    steps.append(float(r["step"]))
    vals.append(float(v) if not isinstance(v, list) else v)
  return np.asarray(steps), np.asarray(vals, dtype=np.float64)


def eval_series(run: Run, split: str, task: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
  """``(steps, values)`` of one evaluation metric over the run's evaluation records."""
  steps, vals = [], []
  for r in run.evals:
    v = r["eval"].get(split, {}).get(task, {}).get(metric)
    if v is None:
      continue
    steps.append(float(r["step"]))
    vals.append(float(v))
  return np.asarray(steps), np.asarray(vals, np.float64)
