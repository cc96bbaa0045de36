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


def build_report(root: str, out: str, *, alpha: float = 0.05,
                 target_delta_m: Optional[float] = None,
                 thresholds: overfit_lib.Thresholds = overfit_lib.Thresholds(),
                 toy: Optional[str] = None, title: str = "") -> dict:
  """Write the report of every finished run under ``root`` into ``out``; returns its numbers."""
  runs = runs_lib.find_runs(root)
  if not runs:
    raise FileNotFoundError(f"{root}: no finished run (no summary.json) under it")
  os.makedirs(os.path.join(out, "plots"), exist_ok=True)
  hib = directions(runs)
  metrics = {t: list(ms) for t, ms in hib.items()}
  main = {t: ms[0] for t, ms in metrics.items()}
  stl = runs_lib.single_task_runs(runs)
  groups = runs_lib.group_runs(runs)
  benchmarks = sorted({r.benchmark for r in runs})
  md = [f"# {title or 'Study report'}", "",
        f"Runs under `{os.path.abspath(root)}`: {len(runs)} finished "
        f"({sum(len(v) for v in stl.values())} single-task, "
        f"{len(runs) - sum(len(v) for v in stl.values())} multi-task); benchmark(s): "
        f"{', '.join(benchmarks)}. Test metrics of the model selected on validation; "
        f"mean ± sample std over seeds.", ""]
  numbers: dict[str, Any] = {"mixes": {}, "stl": {}}
  files = []

  def emit(table: tables.Table, name: str):
    md.append(tables.to_markdown(table))
    for ext, fn in (("tex", tables.to_latex), ("csv", tables.to_csv)):
      path = os.path.join(out, f"{name}.{ext}")
      with open(path, "w") as f:
        f.write(fn(table))
      files.append(path)
    md.append(f"([LaTeX]({name}.tex), [CSV]({name}.csv))")
    md.append("")

  def image(path: str, alt: str):
    rel = os.path.relpath(path, out)
    files.append(path)
    md.append(f"![{alt}]({rel})")
    md.append("")

  # ---- single-task baselines
  stl_mean = {t: {m: float(runs_lib.metric_samples(rs, t, m).mean())
                  for m in metrics.get(t, []) if runs_lib.metric_samples(rs, t, m).size}
              for t, rs in stl.items()}
  if stl:
    md += ["## Single-task baselines", ""]
    rows = []
    for t, rs in stl.items():
      m = main[t]
      rows.append([t, m, _ms(runs_lib.metric_samples(rs, t, m)), len(rs),
                   int(np.mean([r.summary.get("num_params", 0) for r in rs])),
                   _ms([r.summary.get("steps_per_sec") for r in rs])])
      numbers["stl"][t] = {"mean": stl_mean[t], "n": len(rs)}
    emit(tables.Table(["task", "metric", "test", "seeds", "params", "steps/s"], rows,
                      caption="Single-task (STL) runs", label="tab:stl"), "stl")

  for mix, methods in groups.items():
    mix_label = runs_lib.mix_name(mix)
    tag = _slug(f"mix_{len(mix)}_{mix_label}")[:60]
    k = len(mix)
    md += [f"## Task mix: {mix_label if k <= 6 else f'{k} tasks'}" + (
        f" ({', '.join(mix)})" if k > 6 else ""), ""]
    have_stl = all(t in stl_mean for t in mix)
    ref = {t: stl_mean[t] for t in mix} if have_stl else None
    mix_hib = {t: hib[t] for t in mix}
    source = ("the single-task runs above (mean over their seeds)" if have_stl else
              "the benchmark's published single-task numbers (the runs' own Δm%)")
    # per-method numbers
    rows_data = {}
    for name, rs in methods.items():
      if have_stl:
        dms = [evaluation.delta_m({t: r.test.get(t, {}) for t in mix}, ref, mix_hib) for r in rs]
      else:
        dms = [r.summary.get("delta_m") for r in rs]
      stl_params = (sum(np.mean([r.summary.get("num_params", 0) for r in stl[t]]) for t in mix)
                    if have_stl else None)
      params = float(np.mean([r.summary.get("num_params", 0) for r in rs]))
      rows_data[name] = {"runs": rs, "delta_m": [d for d in dms if d is not None],
                         "params": params, "stl_params": stl_params,
                         "sps": [r.summary.get("steps_per_sec") for r in rs],
                         "mean": _mean_results(rs, mix, metrics)}
    ranks = evaluation.mean_rank({n: d["mean"] for n, d in rows_data.items()},
                                 {t: hib[t] for t in mix}) if len(rows_data) > 1 else \
        {n: 1.0 for n in rows_data}
    finals = [float(np.mean(d["delta_m"])) for d in rows_data.values() if d["delta_m"]]
    target = target_delta_m if target_delta_m is not None else (max(finals) if finals else None)
    # main table
    header = ["method"] + [f"{t} {main[t]} {'↑' if hib[t][main[t]] else '↓'}" for t in mix] + \
        ["Δm% ↓", "mean rank ↓", "params", "vs K×STL", "steps/s",
         f"steps to Δm%≤{target:.3g}" if target is not None else "steps to target",
         "seconds to target"]
    cols = {t: tables.mark_best([_ms(runs_lib.metric_samples(d["runs"], t, main[t]))
                                 for d in rows_data.values()], hib[t][main[t]]) for t in mix}
    dm_cells = tables.mark_best([_ms(d["delta_m"]) for d in rows_data.values()], False)
    rows = []
    numbers["mixes"][mix_label] = {"tasks": list(mix), "delta_m_source": source,
                                   "target_delta_m": target, "methods": {}}
    for i, (name, d) in enumerate(rows_data.items()):
      tt = [time_to_target(r, target, ref, mix_hib) if target is not None else (None, None)
            for r in d["runs"]]
      steps_t = [s for s, _ in tt if s is not None]
      secs_t = [s for _, s in tt if s is not None]
      reached = f"{len(steps_t)}/{len(tt)}"
      red = (_reduction(d["params"], d["stl_params"]) if d["stl_params"] else "–")
      rows.append([f"{name} (n={len(d['runs'])})"] + [cols[t][i] for t in mix] +
                  [dm_cells[i], ranks[name], int(d["params"]), red, _ms(d["sps"]),
                   (f"{np.mean(steps_t):.0f} ({reached})" if steps_t else f"not reached ({reached})"),
                   _ms(secs_t) if secs_t else "–"])
      numbers["mixes"][mix_label]["methods"][name] = {
          "delta_m": d["delta_m"], "mean_rank": ranks[name], "params": d["params"],
          "stl_params": d["stl_params"], "steps_per_sec": d["sps"], "test_mean": d["mean"],
          "steps_to_target": steps_t, "seconds_to_target": secs_t}
    if target is None:
      ttt = "Time to target: no Δm% available, so none."
    else:
      ttt = (f"Time to target: first evaluation with test Δm% ≤ {target:.3g}"
             f"{' (default: the worst final Δm% of the mix)' if target_delta_m is None else ''}; "
             f"seconds = steps / steps per second (training only).")
    md.append(f"Δm% against {source}; lower is better, 0 = on par with single-task learning. "
              f"Mean rank over the {len(rows_data)} methods and {k} tasks. {ttt} Best per column "
              f"in bold.")
    md.append("")
    emit(tables.Table(header, rows, caption=f"Task mix {mix_label}: test metrics, Δm% and cost",
                      label=f"tab:{tag}"), f"table_{tag}")

    # negative transfer
    stl_tasks = [t for t in mix if t in stl_mean]
    if stl_tasks:
      md += ["### Negative transfer", ""]
      if not have_stl:
        md += [f"Single-task runs exist for {', '.join(stl_tasks)} only; the other tasks are "
               "not compared.", ""]
      stl_s = {t: {main[t]: runs_lib.metric_samples(stl[t], t, main[t])} for t in stl_tasks}
      nt_rows, nt_num, gains = [], {}, {}
      for name, d in rows_data.items():
        mtl_s = {t: {main[t]: runs_lib.metric_samples(d["runs"], t, main[t])} for t in mix}
        res = transfer_lib.negative_transfer(mtl_s, stl_s, hib, alpha)
        md.append("- " + transfer_lib.summary_line(name, res, alpha))
        nt_num[name] = [r.__dict__ for r in res]
        for r in res:
          nt_rows.append([name, r.task, f"{r.rel_gain_pct:+.2f}", r.p_value, r.verdict])
        gains[name] = {}
        for t in stl_tasks:
          per_seed = []
          for r in d["runs"]:
            v = r.test.get(t, {}).get(main[t])
            s = stl_mean[t][main[t]]
            if v is not None and s:
              sign = 1.0 if hib[t][main[t]] else -1.0
              per_seed.append(sign * (float(v) - s) / abs(s) * 100.0)
          if per_seed:
            gains[name][t] = (float(np.mean(per_seed)),
                              float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0)
      md.append("")
      hurt_any = {t for name in nt_num for t in
                  transfer_lib.hurt_tasks([transfer_lib.TaskTransfer(**x) for x in nt_num[name]])}
      md.append(f"Tasks hurt by sharing under at least one method: "
                f"{', '.join(sorted(hurt_any)) or 'none'}.")
      md.append("")
      emit(tables.Table(["method", "task", "change vs STL (%)", "Welch p", "verdict"], nt_rows,
                        caption=f"Per-task change against STL (positive = better), mix "
                        f"{mix_label}", label=f"tab:nt_{tag}"), f"transfer_{tag}")
      numbers["mixes"][mix_label]["negative_transfer"] = nt_num
      image(plots.delta_bars(gains, os.path.join(out, "plots", f"delta_{tag}.png"),
                             title=f"Per-task change vs single-task ({mix_label}; + = better)"),
            "per-task change vs STL")

    # overfitting / instability
    md += ["### Overfitting and instability", "", overfit_lib.criteria(thresholds), ""]
    of_num = {}
    for name, d in rows_data.items():
      curves = [overfit_lib.run_curves(r, hib, main, thresholds) for r in d["runs"]]
      md.append("- " + overfit_lib.describe(name, curves, thresholds, with_criteria=False))
      of_num[name] = [[c.__dict__ for c in cs] for cs in curves]
    md.append("")
    numbers["mixes"][mix_label]["overfitting"] = of_num
    tc = {}
    for name, d in rows_data.items():
      tc[name] = {}
      for t in mix:
        c = _eval_curve(d["runs"], t, main[t])
        if c is not None:
          tc[name][t] = c
    lc = {}
    for name, d in rows_data.items():
      lc[name] = {}
      for t in mix:
        per = [runs_lib.series(r.train, "losses", list(r.tasks).index(t)) for r in d["runs"]]
        per = [p for p in per if len(p[0])]
        if per:
          n = min(len(p[0]) for p in per)
          vals = np.stack([p[1][:n] for p in per])
          lc[name][t] = (per[0][0][:n], vals.mean(0),
                         vals.std(0, ddof=1) if len(per) > 1 else None)
    if any(lc.values()):
      image(plots.training_curves(lc, {t: "training loss" for t in mix},
                                  os.path.join(out, "plots", f"loss_{tag}.png"),
                                  title=f"Training loss per task ({mix_label}; mean over "
                                  f"seeds, logged interval means)", log_y=True),
            "training loss")
    if any(tc.values()):
      image(plots.training_curves(tc, {t: f"validation {main[t]}" for t in mix},
                                  os.path.join(out, "plots", f"curves_{tag}.png"),
                                  title=f"Validation metric during training ({mix_label}; "
                                  f"mean ± std over seeds)"), "training curves")

    # gradient conflict
    md += ["### Gradient conflict", ""]
    ts_all, cf_num = {}, {}
    for name, d in rows_data.items():
      r0 = d["runs"][0]
      if not conflict_lib.has_conflict_stats(r0):
        continue
      s = conflict_lib.summarize(r0)
      cf_num[name] = s
      ts_all[name] = conflict_lib.conflict_timeseries(r0)
      pairs = s["pairs"]
      pair_txt = ("; most conflicting pairs: " + ", ".join(
          f"{a}–{b} ({c:+.2f})" for a, b, c in pairs[:5])) if pairs else (
              "; no pair with a negative mean cosine" if pairs is not None else "")
      md.append(f"- **{name}** (seed {r0.seed}, second half of training): mean pairwise cosine "
                f"{s['mean_cosine']:+.3f}, min {s['min_cosine']:+.3f}, conflict rate "
                f"{s['conflict_rate']:.2f}, norm spread {s['norm_spread']:.3g}{pair_txt}.")
      cos = conflict_lib.cosine_matrix(r0)
      if cos is not None:
        md.append("")
        image(plots.conflict_heatmap(cos, list(mix),
                                     os.path.join(out, "plots", f"cosine_{tag}_{_slug(name)}.png"),
                                     title=f"Mean pairwise gradient cosine, {name} "
                                     f"(2nd half of training)"), f"cosine heatmap {name}")
    if ts_all:
      md.append("")
      image(plots.conflict_timeseries(ts_all, os.path.join(out, "plots", f"conflict_{tag}.png"),
                                      title=f"Gradient conflict during training ({mix_label})"),
            "conflict over time")
    else:
      md += ["No run of this mix logged conflict statistics (loss-only combiners never form the "
             "Gramian).", ""]
    numbers["mixes"][mix_label]["conflict"] = cf_num

    # combiner weights
    wts = {}
    for name, d in rows_data.items():
      steps, w = runs_lib.series(d["runs"][0].train, "weights")
      if len(steps) and np.ndim(w) == 2:
        wts[name] = (steps, w)
    if wts:
      md += ["### Combiner weights", ""]
      image(plots.weights_over_time(wts, list(mix),
                                    os.path.join(out, "plots", f"weights_{tag}.png"),
                                    title=f"Task weights during training ({mix_label}; seed "
                                    f"{min(r.seed for d in rows_data.values() for r in d['runs'])})"),
            "combiner weights")

    # two-task trade-off
    if k == 2:
      pts = {}
      for name, d in rows_data.items():
        a = runs_lib.metric_samples(d["runs"], mix[0], main[mix[0]])
        b = runs_lib.metric_samples(d["runs"], mix[1], main[mix[1]])
        if a.size and b.size:
          pts[name] = (a.mean(), a.std(ddof=1) if a.size > 1 else 0.0, b.mean(),
                       b.std(ddof=1) if b.size > 1 else 0.0)
      stl_pt = ((stl_mean[mix[0]][main[mix[0]]], stl_mean[mix[1]][main[mix[1]]])
                if have_stl else None)
      if pts:
        md += ["### Trade-off", ""]
        image(plots.tradeoff_scatter(pts, list(mix), [main[mix[0]], main[mix[1]]],
                                     os.path.join(out, "plots", f"tradeoff_{tag}.png"), stl_pt,
                                     title=f"Trade-off {mix[0]} vs {mix[1]} (test; mean ± std)"),
              "two-task trade-off")

  if toy:
    png = os.path.join(toy, "toy.png") if os.path.isdir(toy) else toy
    if not os.path.exists(png):
      raise FileNotFoundError(f"--toy {toy}: no toy.png (run launch/toy.py --out=DIR first)")
    dst = os.path.join(out, "plots", "toy.png")
    shutil.copyfile(png, dst)
    md += ["## Toy problem (Nash-MTL Fig. 1)", "", "Trajectories of each combiner from the five "
           "starts over the loss contours (written by `launch/toy.py`).", ""]
    image(dst, "toy trajectories")

  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(_plain(numbers), f, indent=1, default=str)
  numbers["files"] = files + [os.path.join(out, "report.md"), os.path.join(out, "report.json")]
  return numbers


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
