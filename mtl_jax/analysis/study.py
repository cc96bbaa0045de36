"""A study report over many runs: the tables, findings and pictures of ``launch/report.py``.

:func:`build_report` reads every finished run under a directory (a sweep of ``launch/sweep.py`` or
any tree of workdirs), groups the multi-task runs by task mix and method (combiner, sharing) with
the seeds as repetitions, takes the single-task runs (one task trained alone) as the STL baseline,
and writes into ``out``:

* ``report.md``: per task mix, the main table (per-task test metric mean ± std over seeds, Δm%
  mean ± std, mean rank, parameters and their reduction against K single-task models, steps/s,
  time to reach a target Δm%), the STL table, the negative-transfer findings (Welch t-test per
  task), the overfitting/instability findings, the gradient-conflict summary, and links to the PNGs;
* ``<table>.tex`` (booktabs) and ``<table>.csv`` for every table; ``report.json`` with the numbers;
* ``plots/*.png``.

Δm% (:func:`mtl_jax.evaluation.delta_m`) is computed per seed against the mean over seeds of the
STL runs when every task of the mix has one; otherwise against the benchmark's published
single-task numbers (the runs' own ``summary['delta_m']``), and the report says which. The mean
rank (:func:`mtl_jax.evaluation.mean_rank`) ranks the methods of one mix on their seed-mean
metrics, every (task, metric) pair counted once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from mtl_jax import evaluation
from mtl_jax.analysis import conflict as conflict_lib
from mtl_jax.analysis import overfitting as overfit_lib
from mtl_jax.analysis import plots
from mtl_jax.analysis import runs as runs_lib
from mtl_jax.analysis import structure as structure_lib
from mtl_jax.analysis import tables
from mtl_jax.analysis import transfer as transfer_lib

# Directions of the metric names the library's tasks report (mtl_jax.tasks, data/*), used when a
# summary does not carry them.
LOWER_IS_BETTER = ("mae", "rmse", "abs_err", "rel_err", "mean_angle", "median_angle", "loss",
                   "error", "mse")
HIGHER_IS_BETTER = ("accuracy", "f1", "miou", "pixel_accuracy", "mcc", "pearson", "spearman",
                    "auc", "precision", "recall")


def metric_direction(name: str) -> bool:
  """``higher_is_better`` of a metric name; one-line error for an unknown name."""
  if name in LOWER_IS_BETTER:
    return False
  if name in HIGHER_IS_BETTER or name.startswith("within_"):
    return True
  raise ValueError(f"unknown direction of metric {name!r}; known lower-is-better: "
                   f"{', '.join(LOWER_IS_BETTER)}; higher-is-better: "
                   f"{', '.join(HIGHER_IS_BETTER)}, within_*")


def directions(runs: Sequence[runs_lib.Run]) -> dict[str, dict[str, bool]]:
  """``{task: {metric: higher_is_better}}`` over the runs (the summary's ``higher_is_better`` if
  it has one, else :func:`metric_direction`)."""
  out: dict[str, dict[str, bool]] = {}
  for r in runs:
    given = r.summary.get("higher_is_better") or {}
    for t, ms in runs_lib.task_metrics([r]).items():
      for m in ms:
        known = given.get(t, {}).get(m)
        out.setdefault(t, {})[m] = bool(known) if known is not None else metric_direction(m)
  return out


def _samples(rs: Sequence[runs_lib.Run], tasks, metrics) -> dict:
  return {t: {m: runs_lib.metric_samples(rs, t, m) for m in metrics[t]} for t in tasks}


def _mean_results(rs: Sequence[runs_lib.Run], tasks, metrics) -> dict:
  s = _samples(rs, tasks, metrics)
  return {t: {m: (float(v.mean()) if v.size else math.nan) for m, v in ms.items()}
          for t, ms in s.items()}


def _reduction(params: float, stl_params: float) -> str:
  """The multi-task model's size against K single-task models, e.g. ``66.6% fewer``."""
  frac = 1 - params / stl_params
  return f"{abs(frac) * 100:.1f}% {'fewer' if frac >= 0 else 'more'}"


def _ms(x) -> tables.MeanStd:
  x = np.asarray([v for v in x if v is not None and math.isfinite(v)], np.float64)
  if x.size == 0:
    return tables.MeanStd(math.nan, math.nan, 0)
  return tables.MeanStd(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0, int(x.size))


def _delta_m_curve(run: runs_lib.Run, ref, hib) -> tuple[np.ndarray, np.ndarray]:
  steps, dms = [], []
  for r in run.evals:
    test = r["eval"].get("test")
    if not test:
      continue
    if ref is None:
      dm = r.get("test_delta_m")
    else:
      dm = evaluation.delta_m(test, ref, hib)
    if dm is None:
      continue
    steps.append(float(r["step"]))
    dms.append(float(dm))
  return np.asarray(steps), np.asarray(dms)


def time_to_target(run: runs_lib.Run, target: float, ref, hib) -> tuple[Optional[float],
                                                                          Optional[float]]:
  """``(step, seconds)`` of the first evaluation whose test Δm% is at most ``target`` (seconds =
  step / the run's steps per second, i.e. training time without evaluation); ``(None, None)``
  if never reached."""
  steps, dms = _delta_m_curve(run, ref, hib)
  hit = np.nonzero(dms <= target)[0]
  if hit.size == 0:
    return None, None
  step = float(steps[hit[0]])
  sps = run.summary.get("steps_per_sec")
  return step, (step / float(sps) if sps else None)


def _eval_curve(rs, task, metric, split="validation"):
  per = [runs_lib.eval_series(r, split, task, metric) for r in rs]
  per = [p for p in per if len(p[0])]
  if not per:
    return None
  n = min(len(p[0]) for p in per)
  steps = per[0][0][:n]
  vals = np.stack([p[1][:n] for p in per])
  return steps, vals.mean(0), (vals.std(0, ddof=1) if len(per) > 1 else None)


def _slug(s: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in s).strip("_") or "x"


@dataclasses.dataclass
class _Doc:
  """The report being written: its Markdown lines and the files written for it."""
  out: str
  md: list = dataclasses.field(default_factory=list)
  files: list = dataclasses.field(default_factory=list)

  def table(self, table: tables.Table, name: str) -> None:
    """The table in Markdown, and as ``<name>.tex`` and ``<name>.csv`` linked below it."""
    self.md.append(tables.to_markdown(table))
    for ext, fn in (("tex", tables.to_latex), ("csv", tables.to_csv)):
      path = os.path.join(self.out, f"{name}.{ext}")
      with open(path, "w") as f:
        f.write(fn(table))
      self.files.append(path)
    self.md += [f"([LaTeX]({name}.tex), [CSV]({name}.csv))", ""]

  def image(self, path: str, alt: str) -> None:
    self.files.append(path)
    self.md += [f"![{alt}]({os.path.relpath(path, self.out)})", ""]

  def plot(self, name: str) -> str:
    return os.path.join(self.out, "plots", f"{name}.png")


@dataclasses.dataclass
class _Study:
  """What every section reads: the runs, metric directions, main metrics, STL runs and options."""
  runs: list
  hib: dict  # {task: {metric: higher_is_better}}
  metrics: dict  # {task: [metric names]}
  main: dict  # {task: main metric}
  stl: dict  # {task: [single-task runs]}
  stl_mean: dict  # {task: {metric: mean over the STL seeds}}
  alpha: float
  thresholds: overfit_lib.Thresholds


@dataclasses.dataclass
class _Mix:
  """One task mix: its tasks, label, file tag, Δm% reference and the per-method numbers."""
  tasks: tuple
  label: str
  tag: str
  ref: Optional[dict]  # the STL means when every task has single-task runs, else None
  source: str
  rows: dict  # {method: {'runs', 'delta_m', 'params', 'stl_params', 'sps', 'mean'}}
  numbers: dict  # this mix's part of report.json

  @property
  def have_stl(self) -> bool:
    return self.ref is not None


def _study(runs, alpha, thresholds) -> _Study:
  hib = directions(runs)
  metrics = {t: list(ms) for t, ms in hib.items()}
  stl = runs_lib.single_task_runs(runs)
  stl_mean = {t: {m: float(runs_lib.metric_samples(rs, t, m).mean())
                  for m in metrics.get(t, []) if runs_lib.metric_samples(rs, t, m).size}
              for t, rs in stl.items()}
  return _Study(runs, hib, metrics, {t: ms[0] for t, ms in metrics.items()}, stl, stl_mean,
                alpha, thresholds)


def build_report(root: str, out: str, *, alpha: float = 0.05,
                 target_delta_m: Optional[float] = None,
                 thresholds: overfit_lib.Thresholds = overfit_lib.Thresholds(),
                 toy: Optional[str] = None, title: str = "") -> dict:
  """Write the report of every finished run under ``root`` into ``out``; returns its numbers."""
  runs, stale = runs_lib.scan(root)
  if not runs:
    raise FileNotFoundError(f"{root}: no finished run (no summary.json) under it"
                            + (f"; {len(stale)} stale run(s) left out" if stale else ""))
  os.makedirs(os.path.join(out, "plots"), exist_ok=True)
  s = _study(runs, alpha, thresholds)
  doc = _Doc(out, _header(root, s, title, stale))
  numbers: dict[str, Any] = {"mixes": {}, "stl": {}}
  if stale:
    numbers["stale"] = [dataclasses.asdict(x) for x in stale]
  _stl_section(doc, s, numbers["stl"])
  for mix, methods in runs_lib.group_runs(runs).items():
    m = _mix(s, mix, methods)
    numbers["mixes"][m.label] = m.numbers
    _main_table(doc, s, m, target_delta_m)
    _transfer_section(doc, s, m)
    _overfitting_section(doc, s, m)
    _conflict_section(doc, m)
    _weights_section(doc, m)
    _tradeoff_section(doc, s, m)
    _structure_section(doc, s, m)
  if toy:
    _toy_section(doc, toy)
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(doc.md) + "\n")
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(_plain(numbers), f, indent=1, default=str)
  numbers["files"] = doc.files + [os.path.join(out, "report.md"),
                                  os.path.join(out, "report.json")]
  return numbers


def _header(root: str, s: _Study, title: str, stale: Sequence[runs_lib.Stale] = ()) -> list[str]:
  n_stl = sum(len(v) for v in s.stl.values())
  benchmarks = sorted({r.benchmark for r in s.runs})
  lines = [f"# {title or 'Study report'}", "",
           f"Runs under `{os.path.abspath(root)}`: {len(s.runs)} finished ({n_stl} single-task, "
           f"{len(s.runs) - n_stl} multi-task); benchmark(s): {', '.join(benchmarks)}. Test "
           f"metrics of the model selected on validation; mean ± sample std over seeds.", ""]
  if stale:
    lines += [f"Left out: {len(stale)} stale run(s), finished with another config than the "
              f"sweep lists for them (rerun the sweep with `--stale=rerun`): "
              f"{', '.join(x.label for x in stale)}.", ""]
  return lines


def _stl_section(doc: _Doc, s: _Study, numbers: dict) -> None:
  """The single-task baselines' table."""
  if not s.stl:
    return
  doc.md += ["## Single-task baselines", ""]
  rows = []
  for t, rs in s.stl.items():
    m = s.main[t]
    rows.append([t, m, _ms(runs_lib.metric_samples(rs, t, m)), len(rs),
                 int(np.mean([r.summary.get("num_params", 0) for r in rs])),
                 _ms([r.summary.get("steps_per_sec") for r in rs])])
    numbers[t] = {"mean": s.stl_mean[t], "n": len(rs),
                  "benchmark": ",".join(sorted({r.benchmark for r in rs}))}
  doc.table(tables.Table(["task", "metric", "test", "seeds", "params", "steps/s"], rows,
                         caption="Single-task (STL) runs", label="tab:stl"), "stl")


def _mix(s: _Study, mix: tuple, methods: Mapping[str, list]) -> _Mix:
  """The per-method numbers of one mix: Δm% per seed, parameters, steps/s, seed-mean metrics."""
  have_stl = all(t in s.stl_mean for t in mix)
  ref = {t: s.stl_mean[t] for t in mix} if have_stl else None
  mix_hib = {t: s.hib[t] for t in mix}
  stl_params = (sum(np.mean([r.summary.get("num_params", 0) for r in s.stl[t]]) for t in mix)
                if have_stl else None)
  rows = {}
  for name, rs in methods.items():
    if have_stl:
      dms = [evaluation.delta_m({t: r.test.get(t, {}) for t in mix}, ref, mix_hib) for r in rs]
    else:
      dms = [r.summary.get("delta_m") for r in rs]
    rows[name] = {"runs": rs, "delta_m": [d for d in dms if d is not None],
                  "params": float(np.mean([r.summary.get("num_params", 0) for r in rs])),
                  "stl_params": stl_params, "sps": [r.summary.get("steps_per_sec") for r in rs],
                  "mean": _mean_results(rs, mix, s.metrics)}
  label = runs_lib.mix_name(mix)
  source = ("the single-task runs above (mean over their seeds)" if have_stl else
            "the benchmark's published single-task numbers (the runs' own Δm%)")
  bench = ",".join(sorted({r.benchmark for rs in methods.values() for r in rs}))
  return _Mix(mix, label, _slug(f"mix_{len(mix)}_{label}")[:60], ref, source, rows,
              {"benchmark": bench})


def _main_table(doc: _Doc, s: _Study, m: _Mix, target_delta_m: Optional[float]) -> None:
  """Per-task test metrics, Δm%, mean rank, parameters, steps/s and time to a target Δm%."""
  k, main, hib = len(m.tasks), s.main, s.hib
  doc.md += [f"## Task mix: {m.label if k <= 6 else f'{k} tasks'}" + (
      f" ({', '.join(m.tasks)})" if k > 6 else ""), ""]
  ranks = evaluation.mean_rank({n: d["mean"] for n, d in m.rows.items()},
                               {t: hib[t] for t in m.tasks}) if len(m.rows) > 1 else \
      {n: 1.0 for n in m.rows}
  finals = [float(np.mean(d["delta_m"])) for d in m.rows.values() if d["delta_m"]]
  target = target_delta_m if target_delta_m is not None else (max(finals) if finals else None)
  header = ["method"] + [f"{t} {main[t]} {'↑' if hib[t][main[t]] else '↓'}" for t in m.tasks] + \
      ["Δm% ↓", "mean rank ↓", "params", "vs K×STL", "steps/s",
       f"steps to Δm%≤{target:.3g}" if target is not None else "steps to target",
       "seconds to target"]
  cols = {t: tables.mark_best([_ms(runs_lib.metric_samples(d["runs"], t, main[t]))
                               for d in m.rows.values()], hib[t][main[t]]) for t in m.tasks}
  dm_cells = tables.mark_best([_ms(d["delta_m"]) for d in m.rows.values()], False)
  m.numbers.update({"tasks": list(m.tasks), "delta_m_source": m.source,
                    "target_delta_m": target, "methods": {}})
  rows = []
  for i, (name, d) in enumerate(m.rows.items()):
    steps_t, secs_t, cells = _to_target(d["runs"], target, m.ref, {t: hib[t] for t in m.tasks})
    red = (_reduction(d["params"], d["stl_params"]) if d["stl_params"] else "–")
    rows.append([f"{name} (n={len(d['runs'])})"] + [cols[t][i] for t in m.tasks] +
                [dm_cells[i], ranks[name], int(d["params"]), red, _ms(d["sps"])] + cells)
    m.numbers["methods"][name] = {
        "delta_m": d["delta_m"], "mean_rank": ranks[name], "params": d["params"],
        "stl_params": d["stl_params"], "steps_per_sec": d["sps"], "test_mean": d["mean"],
        "steps_to_target": steps_t, "seconds_to_target": secs_t}
  if target is None:
    ttt = "Time to target: no Δm% available, so none."
  else:
    ttt = (f"Time to target: first evaluation with test Δm% ≤ {target:.3g}"
           f"{' (default: the worst final Δm% of the mix)' if target_delta_m is None else ''}; "
           f"seconds = steps / steps per second (training only).")
  doc.md += [f"Δm% against {m.source}; lower is better, 0 = on par with single-task learning. "
             f"Mean rank over the {len(m.rows)} methods and {k} tasks. {ttt} Best per column "
             f"in bold.", ""]
  doc.table(tables.Table(header, rows, caption=f"Task mix {m.label}: test metrics, Δm% and cost",
                         label=f"tab:{m.tag}"), f"table_{m.tag}")


def _to_target(rs, target, ref, hib) -> tuple[list, list, list]:
  """Steps and seconds to ``target`` of the seeds that reach it, and the table's two cells."""
  tt = [time_to_target(r, target, ref, hib) if target is not None else (None, None) for r in rs]
  steps_t = [s for s, _ in tt if s is not None]
  secs_t = [s for _, s in tt if s is not None]
  reached = f"{len(steps_t)}/{len(tt)}"
  return steps_t, secs_t, [
      (f"{np.mean(steps_t):.0f} ({reached})" if steps_t else f"not reached ({reached})"),
      _ms(secs_t) if secs_t else "–"]


def _transfer_section(doc: _Doc, s: _Study, m: _Mix) -> None:
  """Negative transfer: per method and task, the change against STL and Welch's t-test."""
  main, hib = s.main, s.hib
  stl_tasks = [t for t in m.tasks if t in s.stl_mean]
  if not stl_tasks:
    return
  doc.md += ["### Negative transfer", ""]
  if not m.have_stl:
    doc.md += [f"Single-task runs exist for {', '.join(stl_tasks)} only; the other tasks are "
               "not compared.", ""]
  stl_s = {t: {main[t]: runs_lib.metric_samples(s.stl[t], t, main[t])} for t in stl_tasks}
  nt_rows, nt_num, gains = [], {}, {}
  for name, d in m.rows.items():
    mtl_s = {t: {main[t]: runs_lib.metric_samples(d["runs"], t, main[t])} for t in m.tasks}
    res = transfer_lib.negative_transfer(mtl_s, stl_s, hib, s.alpha)
    doc.md.append("- " + transfer_lib.summary_line(name, res, s.alpha))
    nt_num[name] = [r.__dict__ for r in res]
    nt_rows += [[name, r.task, f"{r.rel_gain_pct:+.2f}", r.p_value, r.verdict] for r in res]
    gains[name] = _gains(s, d["runs"], stl_tasks)
  hurt_any = {t for name in nt_num for t in
              transfer_lib.hurt_tasks([transfer_lib.TaskTransfer(**x) for x in nt_num[name]])}
  doc.md += ["", f"Tasks hurt by sharing under at least one method: "
             f"{', '.join(sorted(hurt_any)) or 'none'}.", ""]
  doc.table(tables.Table(["method", "task", "change vs STL (%)", "Welch p", "verdict"], nt_rows,
                         caption=f"Per-task change against STL (positive = better), mix "
                         f"{m.label}", label=f"tab:nt_{m.tag}"), f"transfer_{m.tag}")
  m.numbers["negative_transfer"] = nt_num
  doc.image(plots.delta_bars(gains, doc.plot(f"delta_{m.tag}"),
                             title=f"Per-task change vs single-task ({m.label}; + = better)"),
            "per-task change vs STL")


def _gains(s: _Study, rs, tasks) -> dict:
  """``{task: (mean, std)}`` over seeds of the signed change against STL, in % (+ = better)."""
  out = {}
  for t in tasks:
    metric, ref = s.main[t], s.stl_mean[t][s.main[t]]
    sign = 1.0 if s.hib[t][metric] else -1.0
    per_seed = [sign * (float(v) - ref) / abs(ref) * 100.0 for v in
                (r.test.get(t, {}).get(metric) for r in rs) if v is not None and ref]
    if per_seed:
      out[t] = (float(np.mean(per_seed)),
                float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0)
  return out


def _overfitting_section(doc: _Doc, s: _Study, m: _Mix) -> None:
  """Peak step, train/validation gap and oscillation per method; loss and validation curves."""
  doc.md += ["### Overfitting and instability", "", overfit_lib.criteria(s.thresholds), ""]
  of_num = {}
  for name, d in m.rows.items():
    curves = [overfit_lib.run_curves(r, s.hib, s.main, s.thresholds) for r in d["runs"]]
    doc.md.append("- " + overfit_lib.describe(name, curves, s.thresholds, with_criteria=False))
    of_num[name] = [[c.__dict__ for c in cs] for cs in curves]
  doc.md.append("")
  m.numbers["overfitting"] = of_num
  tc = {name: {t: c for t in m.tasks
               if (c := _eval_curve(d["runs"], t, s.main[t])) is not None}
        for name, d in m.rows.items()}
  lc = {name: {t: c for t in m.tasks if (c := _loss_curve(d["runs"], t)) is not None}
        for name, d in m.rows.items()}
  if any(lc.values()):
    doc.image(plots.training_curves(lc, {t: "training loss" for t in m.tasks},
                                    doc.plot(f"loss_{m.tag}"),
                                    title=f"Training loss per task ({m.label}; mean over "
                                    f"seeds, logged interval means)", log_y=True),
              "training loss")
  if any(tc.values()):
    doc.image(plots.training_curves(tc, {t: f"validation {s.main[t]}" for t in m.tasks},
                                    doc.plot(f"curves_{m.tag}"),
                                    title=f"Validation metric during training ({m.label}; "
                                    f"mean ± std over seeds)"), "training curves")


def _loss_curve(rs, task):
  """``(steps, mean, std or None)`` over seeds of one task's logged training loss."""
  per = [runs_lib.series(r.train, "losses", list(r.tasks).index(task)) for r in rs]
  per = [p for p in per if len(p[0])]
  if not per:
    return None
  n = min(len(p[0]) for p in per)
  vals = np.stack([p[1][:n] for p in per])
  return per[0][0][:n], vals.mean(0), vals.std(0, ddof=1) if len(per) > 1 else None


def _conflict_section(doc: _Doc, m: _Mix) -> None:
  """Gradient conflict of the first seed of each method that logged Gramian statistics."""
  doc.md += ["### Gradient conflict", ""]
  ts_all, cf_num = {}, {}
  for name, d in m.rows.items():
    r0 = d["runs"][0]
    if not conflict_lib.has_conflict_stats(r0):
      continue
    st = cf_num[name] = conflict_lib.summarize(r0)
    ts_all[name] = conflict_lib.conflict_timeseries(r0)
    pairs = st["pairs"]
    pair_txt = ("; most conflicting pairs: " + ", ".join(
        f"{a}–{b} ({c:+.2f})" for a, b, c in pairs[:5])) if pairs else (
            "; no pair with a negative mean cosine" if pairs is not None else "")
    doc.md.append(f"- **{name}** (seed {r0.seed}, second half of training): mean pairwise cosine "
                  f"{st['mean_cosine']:+.3f}, min {st['min_cosine']:+.3f}, conflict rate "
                  f"{st['conflict_rate']:.2f}, norm spread {st['norm_spread']:.3g}{pair_txt}.")
    cos = conflict_lib.cosine_matrix(r0)
    if cos is not None:
      doc.md.append("")
      doc.image(plots.conflict_heatmap(cos, list(m.tasks),
                                       doc.plot(f"cosine_{m.tag}_{_slug(name)}"),
                                       title=f"Mean pairwise gradient cosine, {name} "
                                       f"(2nd half of training)"), f"cosine heatmap {name}")
  if ts_all:
    doc.md.append("")
    doc.image(plots.conflict_timeseries(ts_all, doc.plot(f"conflict_{m.tag}"),
                                        title=f"Gradient conflict during training ({m.label})"),
              "conflict over time")
  else:
    doc.md += ["No run of this mix logged conflict statistics (loss-only combiners never form "
               "the Gramian).", ""]
  m.numbers["conflict"] = cf_num


def _weights_section(doc: _Doc, m: _Mix) -> None:
  """The combiner weights over time (first seed of each method that logged them)."""
  wts = {}
  for name, d in m.rows.items():
    steps, w = runs_lib.series(d["runs"][0].train, "weights")
    if len(steps) and np.ndim(w) == 2:
      wts[name] = (steps, w)
  if not wts:
    return
  seed = min(r.seed for d in m.rows.values() for r in d["runs"])
  doc.md += ["### Combiner weights", ""]
  doc.image(plots.weights_over_time(wts, list(m.tasks), doc.plot(f"weights_{m.tag}"),
                                    title=f"Task weights during training ({m.label}; seed "
                                    f"{seed})"), "combiner weights")


def _tradeoff_section(doc: _Doc, s: _Study, m: _Mix) -> None:
  """Two tasks: each method's test metrics as a point (mean ± std over seeds), STL marked."""
  if len(m.tasks) != 2:
    return
  (ta, tb), main = m.tasks, s.main
  pts = {}
  for name, d in m.rows.items():
    a = runs_lib.metric_samples(d["runs"], ta, main[ta])
    b = runs_lib.metric_samples(d["runs"], tb, main[tb])
    if a.size and b.size:
      pts[name] = (a.mean(), a.std(ddof=1) if a.size > 1 else 0.0, b.mean(),
                   b.std(ddof=1) if b.size > 1 else 0.0)
  if not pts:
    return
  stl_pt = (s.stl_mean[ta][main[ta]], s.stl_mean[tb][main[tb]]) if m.have_stl else None
  doc.md += ["### Trade-off", ""]
  doc.image(plots.tradeoff_scatter(pts, [ta, tb], [main[ta], main[tb]],
                                   doc.plot(f"tradeoff_{m.tag}"), stl_pt,
                                   title=f"Trade-off {ta} vs {tb} (test; mean ± std)"),
            "two-task trade-off")


def _structure_section(doc: _Doc, s: _Study, m: _Mix) -> None:
  """The sharing structure (when a run of the mix has one): the strategies' table, the Δm% vs
  parameters scatter with its Pareto front, and per run its trees and the affinity that chose
  each split."""
  if not any(runs_lib.structure_of(r.summary) for d in m.rows.values() for r in d["runs"]):
    return
  doc.md += ["### Sharing structure", "",
             "Each method's sharing strategy (a `config.structure` method, or the model's fixed "
             "sharing), its parameters (final model), Δm% and per-task Δm% against "
             + (m.source if m.have_stl else "the runs' own reference") +
             " (lower is better; mean ± std over seeds) and wall time per run (compilation, "
             "evaluation and the structure search included).", ""]
  _structure_table(doc, s, m)
  pts = {name: (d["params"], float(np.mean(d["delta_m"])),
                float(np.std(d["delta_m"], ddof=1)) if len(d["delta_m"]) > 1 else 0.0)
         for name, d in m.rows.items() if d["delta_m"]}
  if pts:
    front = structure_lib.pareto_front({k: (p, dm) for k, (p, dm, _) in pts.items()})
    m.numbers["pareto_front"] = front
    doc.md += [f"Pareto front of sharing (no other method has both fewer parameters and a lower "
               f"Δm%): {', '.join(front)}.", ""]
    doc.image(structure_lib.pareto_scatter(pts, doc.plot(f"pareto_{m.tag}"),
                                           title=f"Δm% against parameters ({m.label}; mean ± "
                                           f"std over seeds)"), "Pareto front of sharing")
  _structure_pictures(doc, m)


def _affinity_kind(rec) -> str:
  """What a split record's ``affinity`` holds: TAG's normalised lookahead or the gradient cosine."""
  return "TAG lookahead (Z_ij / sqrt(Z_ii Z_jj))" if "lookahead" in rec and rec.get(
      "method") == "affinity" and rec.get("affinity") != rec.get("cosine") else "gradient cosine"


def _structure_table(doc: _Doc, s: _Study, m: _Mix) -> None:
  rows, num = [], {}
  for name, d in m.rows.items():
    r0 = d["runs"][0]
    per_task = []
    if m.have_stl:
      gains = _gains(s, d["runs"], m.tasks)
      per_task = [tables.MeanStd(-gains[t][0], gains[t][1], len(d["runs"])) if t in gains
                  else "–" for t in m.tasks]
    else:
      per_task = ["–"] * len(m.tasks)
    wall = [r.summary.get("wall_time_s") for r in d["runs"] if r.summary.get("wall_time_s")]
    rows.append([name, runs_lib.strategy(r0.summary), r0.combiner, int(d["params"]),
                 _ms(d["delta_m"]) if d["delta_m"] else "–"] + per_task +
                [_ms(wall) if wall else "–"])
    num[name] = {"strategy": runs_lib.strategy(r0.summary), "combiner": r0.combiner,
                 "params": d["params"], "wall_time_s": wall,
                 "trees": [(runs_lib.structure_of(r.summary) or {}).get("tree")
                           for r in d["runs"]]}
  m.numbers["structure"] = num
  doc.table(tables.Table(["method", "strategy", "combiner", "params", "Δm% ↓"] +
                         [f"{t} Δm% ↓" for t in m.tasks] + ["time (s)"], rows,
                         caption=f"Sharing strategies on {m.label}: parameters, Δm% and time",
                         label=f"tab:structure_{m.tag}"), f"structure_{m.tag}")


def _structure_pictures(doc: _Doc, m: _Mix) -> None:
  """Per run with a structure: its trees (start and every split) and the per-stage cosines of
  each measured split."""
  for name, d in m.rows.items():
    for r in d["runs"]:
      st = runs_lib.structure_of(r.summary)
      if st is None:
        continue
      recs = structure_lib.records(st)
      tag = _slug(f"{m.tag}_{name}_s{r.seed}")
      doc.md += [f"**{name}**, seed {r.seed} ({runs_lib.strategy(r.summary)}): final tree "
                 f"`{st.get('describe', '')}`.", ""]
      doc.image(structure_lib.tree_picture(recs, list(r.tasks), doc.plot(f"tree_{tag}"),
                                           title=f"Sharing structure of {name}, seed {r.seed}"),
                f"tree {name} seed {r.seed}")
      for rec in recs:
        if rec.get("affinity") is None:
          continue
        doc.image(structure_lib.stage_heatmaps(
            rec["affinity"], list(r.tasks), doc.plot(f"affinity_{tag}_step{int(rec['step'])}"),
            conflict=rec.get("conflict"),
            title=f"{name}, seed {r.seed}: per-stage {_affinity_kind(rec)} over the "
            f"{rec.get('window_steps', '?')} steps before step {int(rec['step'])} "
            f"({rec['method']}: {'split' if rec.get('split') else 'kept'})"),
            f"affinity {name} seed {r.seed} step {int(rec['step'])}")


def _toy_section(doc: _Doc, toy: str) -> None:
  """Copy ``launch/toy.py``'s picture into the report."""
  png = os.path.join(toy, "toy.png") if os.path.isdir(toy) else toy
  if not os.path.exists(png):
    raise FileNotFoundError(f"--toy {toy}: no toy.png (run launch/toy.py --out=DIR first)")
  dst = doc.plot("toy")
  shutil.copyfile(png, dst)
  doc.md += ["## Toy problem (Nash-MTL Fig. 1)", "", "Trajectories of each combiner from the five "
             "starts over the loss contours (written by `launch/toy.py`).", ""]
  doc.image(dst, "toy trajectories")


def _plain(x):
  if isinstance(x, Mapping):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, np.ndarray):
    return _plain(x.tolist())
  if isinstance(x, (np.floating, float)):
    x = float(x)
    return x if math.isfinite(x) else str(x)
  if isinstance(x, np.integer):
    return int(x)
  return x
