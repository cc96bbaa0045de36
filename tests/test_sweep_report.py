"""launch/sweep.py and launch/report.py: grid expansion, resumability, the report on fabricated
workdirs, and one small real run (digits) end to end."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from mtl_jax import evaluation
from mtl_jax.analysis import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_sweep_module():
  spec = importlib.util.spec_from_file_location("_sweep_under_test",
                                                os.path.join(ROOT, "launch", "sweep.py"))
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses look their module up
  spec.loader.exec_module(mod)
  return mod


sweep = _load_sweep_module()


def sweep_config(**kw):
  d = dict(base="configs/nash_digits.py:smoke", overrides=("train.num_steps=4",),
           combiners=("ls", "pcgrad"), sharing=("hard",), seeds=(0, 1),
           task_mixes=("left,right",), all_tasks=("left", "right"), single_task=True,
           single_task_combiner="ls", single_task_overrides=("train.log_every=1",),
           single_task_tasks="")
  d.update(kw)
  return ml_collections.ConfigDict(d)


def test_expand_grid_order_and_commands(tmp_path):
  runs = sweep.expand(sweep_config())
  names = [r.name for r in runs]
  assert names[:4] == ["stl/left/s0", "stl/right/s0", "stl/left/s1", "stl/right/s1"]
  assert names[4:] == ["left+right/hard/ls/s0", "left+right/hard/pcgrad/s0",
                       "left+right/hard/ls/s1", "left+right/hard/pcgrad/s1"]
  stl = runs[0]
  cmd = stl.command(str(tmp_path), "configs/x.py:smoke", "python")
  assert "--config.tasks=left" in cmd and "--config.combiner.name=ls" in cmd
  assert cmd[-2:] == ["--config.train.num_steps=4", "--config.train.log_every=1"]
  assert stl.workdir(str(tmp_path)) == os.path.join(str(tmp_path), "stl", "left", "s0")
  mtl = runs[-1]
  assert "--config.tasks=left,right" in mtl.command("/w", "b", "python")
  assert len(sweep.expand(sweep_config(single_task=False))) == 4
  assert len(sweep.expand(sweep_config(task_mixes="all"))) == 8  # STL from all_tasks


def test_expand_errors():
  c = sweep_config()
  del c["combiners"]
  with pytest.raises(ValueError, match="lacks combiners"):
    sweep.expand(c)
  with pytest.raises(ValueError, match="key=value"):
    sweep.expand(sweep_config(overrides=("num_steps",)))
  c = sweep_config(task_mixes="all")
  c.all_tasks = ()
  with pytest.raises(ValueError, match="all_tasks"):
    sweep.expand(c)
  with pytest.raises(ValueError, match="duplicate"):
    sweep.expand(sweep_config(seeds=(0, 0)))
  with pytest.raises(ValueError, match="unknown combiner 'nash'.*valid:"):
    sweep.check_names(sweep.expand(sweep_config(combiners=("nash",))))


def _write_config(tmp_path, body):
  path = tmp_path / "sw.py"
  path.write_text("import ml_collections\n\ndef get_config():\n  c = ml_collections.ConfigDict()\n"
                  + "".join(f"  {line}\n" for line in body))
  return str(path)


def _finished(sweep_dir, name, config):
  """A finished run's summary.json recording ``config``."""
  run = sweep_dir.joinpath(*name.split("/"))
  run.mkdir(parents=True)
  (run / "summary.json").write_text(json.dumps({"config": config, "tasks": ["left"]}))
  return run


_EMIT_SWEEP = ["c.base = 'configs/nash_digits.py:smoke'", "c.overrides = ('train.num_steps=2',)",
               "c.combiners = ('ls', 'mgda')", "c.sharing = ('hard',)", "c.seeds = (0,)",
               "c.task_mixes = ('left,right',)", "c.single_task = True", "return c"]


def _sweep_cli(*args, cwd):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sweep.py"), *args],
                        cwd=cwd, capture_output=True, text=True, timeout=300)


def test_sweep_cli_done_stale_and_emitted_commands(tmp_path):
  """Done = finished with the config the sweep would run now (its digest); a run finished with
  another config stops the sweep (listed with what differs) or, with --stale=rerun, is moved
  aside and rerun; the emitted commands hold absolute paths only. Run from another directory."""
  from mtl_jax import config_utils  # pylint: disable=g-import-not-at-top
  cfg = _write_config(tmp_path, _EMIT_SWEEP)
  wd = tmp_path / "sweep"
  runs = {r.name: r for r in sweep.expand(ml_collections.ConfigDict(dict(
      base="configs/nash_digits.py:smoke", overrides=("train.num_steps=2",),
      combiners=("ls", "mgda"), sharing=("hard",), seeds=(0,), task_mixes=("left,right",),
      single_task=True)))}
  base = sweep.resolve_base("configs/nash_digits.py:smoke")
  assert os.path.isabs(base) and base.endswith("configs/nash_digits.py:smoke")
  now = {n: sweep.run_config(r, str(wd), base).to_dict() for n, r in runs.items()}
  _finished(wd, "left+right/hard/ls/s0", now["left+right/hard/ls/s0"])  # done
  old = json.loads(json.dumps(now["stl/left/s0"]))
  old["train"]["num_steps"] = 150  # an earlier sweep's setting
  stale_dir = _finished(wd, "stl/left/s0", old)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  dry = _sweep_cli(f"--config={cfg}", f"--workdir={wd}", "--dry_run", cwd=elsewhere)
  assert dry.returncode == 0, dry.stderr
  assert "4 runs (2 single-task), 1 already done, 3 to run (1 stale)" in dry.stdout
  assert "[stale] stl/left/s0 (train.num_steps 150 -> 2)" in dry.stdout
  assert "[done] left+right/hard/ls/s0" in dry.stdout
  emit = tmp_path / "cmds.txt"
  stop = _sweep_cli(f"--config={cfg}", f"--workdir={wd}", f"--emit={emit}", cwd=elsewhere)
  assert stop.returncode == 2 and not emit.exists()
  assert stop.stderr.strip().splitlines()[-1].startswith("error: 1 finished run(s) were made "
                                                         "with another config")
  out = _sweep_cli(f"--config={cfg}", f"--workdir={wd}", f"--emit={emit}", "--stale=rerun",
                   cwd=elsewhere)
  assert out.returncode == 0, out.stderr
  moved = f"{stale_dir}.stale-{config_utils.config_digest(old)}"
  assert f"moved to {moved}" in out.stdout
  with open(os.path.join(moved, "summary.json")) as f:
    assert json.load(f)["config"] == old  # kept, not deleted
  lines = emit.read_text().splitlines()
  assert len(lines) == 3 and not any("/ls/s0" in l for l in lines)
  assert any("--config.tasks=left " in l + " " for l in lines)
  for l in lines:  # absolute interpreter, script, config and workdir: they run from anywhere
    args = shlex.split(l)
    assert all(os.path.isabs(a) for a in args[:2]), args
    assert os.path.isabs(args[2].split("=", 1)[1]) and os.path.isabs(args[3].split("=", 1)[1])
  manifest = json.loads((wd / "sweep.json").read_text())
  assert [r["name"] for r in manifest["runs"]][0] == "stl/left/s0"
  want = {n: config_utils.config_digest(c) for n, c in now.items()}
  assert {r["name"]: r["config_digest"] for r in manifest["runs"]} == want


def test_sweep_cli_list_syntax_and_bad_names(tmp_path):
  """The README's list syntax (``--config.combiners=ls,famo``, ``--config.seeds=0,1``; a tuple
  of mixes, each comma-separated); bad names and bad overrides are one line, exit 2."""
  cfg = _write_config(tmp_path, _EMIT_SWEEP)
  wd = tmp_path / "sweep"
  out = _sweep_cli(f"--config={cfg}", f"--workdir={wd}", "--dry_run", "--config.combiners=ls,famo",
                   "--config.seeds=0,1", "--config.task_mixes=('left,right','left')", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  names = [l.split("]", 1)[1].split(":")[0].strip() for l in out.stdout.splitlines()
           if l.startswith("[")]
  assert sorted(n for n in names if not n.startswith("stl/")) == sorted(
      f"{mix}/hard/{c}/s{s}" for mix in ("left+right", "left") for c in ("ls", "famo")
      for s in (0, 1))
  assert sweep.expand(sweep_config(combiners="ls, famo", seeds=("0,1",)))[4].combiner == "ls"
  for flag, msg in (("--config.combiners=('lss',)", "error: unknown combiner 'lss'"),
                    ("--config.combiners=ls,lss", "error: unknown combiner 'lss'"),
                    ("--config.overrides=('train.nosuch=1',)", "error: run stl/left/s0: ")):
    bad = _sweep_cli(f"--config={cfg}", f"--workdir={wd}", "--dry_run", flag, cwd=tmp_path)
    assert bad.returncode == 2, flag
    assert bad.stderr.strip().splitlines()[-1].startswith(msg), bad.stderr
  for spec, msg in ((f"{cfg}:nosuch", "error: config file"), (f"{tmp_path}/nope.py",
                                                                 "error: config file")):
    bad = _sweep_cli(f"--config={spec}", f"--workdir={wd}", "--dry_run", cwd=tmp_path)
    assert bad.returncode == 2, spec  # an unknown variant, a missing file: one line, no traceback
    assert len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith(msg), bad.stderr



# ---------------------------------------------------------------------------------------------
# Fabricated workdirs.

STL = {"a": [1.0, 1.1], "b": [2.0, 2.2]}
METHODS = {
    "ls": {"a": [1.5, 1.6, 1.55], "b": [1.0, 1.1, 1.05]},  # hurts a, helps b
    "pcgrad": {"a": [1.05, 1.0, 1.1], "b": [2.1, 2.0, 2.05]},  # neutral
}


def _write_run(path, tasks, test, seed, combiner, num_params, conflict=False):
  os.makedirs(path, exist_ok=True)
  recs = []
  for i in range(1, 7):
    r = {"step": 5 * i, "losses": [1.0 / i] * len(tasks), "weights": [1.0 / len(tasks)] *
         len(tasks), "steps_per_sec": 10.0}
    if conflict:
      cos = np.array([[1.0, -0.3], [-0.3, 1.0]])
      r.update(cosine=cos.tolist(), mean_cosine=-0.3, min_cosine=-0.3, conflict_rate=1.0,
               norm_spread=1.5, grad_norms=[1.0, 1.5])
    recs.append(r)
    if i % 2 == 0:
      scale = 1.0 + (6 - i) / 6.0  # improves towards the test values
      ev = {s: {t: {"mae": test[t] * scale} for t in tasks} for s in ("validation", "test",
                                                                     "train")}
      recs.append({"step": 5 * i, "eval": ev})
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for r in recs:
      f.write(json.dumps(r) + "\n")
  summary = {"tasks": tasks, "test": {t: {"mae": v} for t, v in test.items()},
             "combiner": combiner, "sharing": "hard", "config": {"seed": seed},
             "num_params": num_params, "steps_per_sec": 10.0, "benchmark": "fake",
             "delta_m": None, "step": 30}
  with open(os.path.join(path, "summary.json"), "w") as f:
    json.dump(summary, f)


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory):
  root = tmp_path_factory.mktemp("fab")
  for t, vals in STL.items():
    for s, v in enumerate(vals):
      _write_run(root / "stl" / t / f"s{s}", [t], {t: v}, s, "ls", 100)
  for m, per in METHODS.items():
    for s in range(3):
      _write_run(root / "a+b" / m / f"s{s}", ["a", "b"], {t: per[t][s] for t in per}, s, m, 120,
                 conflict=(m == "pcgrad"))
  (root / "unfinished").mkdir()  # no summary: ignored
  out = root / "report"
  numbers = study.build_report(str(root), str(out))
  return root, out, numbers


def test_report_numbers(fabricated):
  _, _, numbers = fabricated
  mix = numbers["mixes"]["a+b"]
  assert "single-task runs" in mix["delta_m_source"]
  ref = {t: {"mae": float(np.mean(v))} for t, v in STL.items()}
  hib = {"a": {"mae": False}, "b": {"mae": False}}
  for m, per in METHODS.items():
    want = [evaluation.delta_m({t: {"mae": per[t][s]} for t in per}, ref, hib) for s in range(3)]
    np.testing.assert_allclose(mix["methods"][m]["delta_m"], want)
    assert mix["methods"][m]["stl_params"] == 200 and mix["methods"][m]["params"] == 120
  ranks = evaluation.mean_rank(
      {m: {t: {"mae": float(np.mean(v))} for t, v in per.items()} for m, per in METHODS.items()},
      hib)
  assert mix["methods"]["ls"]["mean_rank"] == ranks["ls"] == 1.5
  nt = {r["task"]: r["verdict"] for r in mix["negative_transfer"]["ls"]}
  assert nt == {"a": "hurt", "b": "helped"}
  assert {r["verdict"] for r in mix["negative_transfer"]["pcgrad"]} == {"neutral"}
  # default target: the worst mean final Δm% of the mix; the fabricated eval curves improve
  # monotonically to the test values, so a seed reaches it exactly when its final Δm% does, at the
  # last evaluation (step 30 = 3 s at 10 steps/s)
  target = max(np.mean(d["delta_m"]) for d in mix["methods"].values())
  assert mix["target_delta_m"] == pytest.approx(target)
  for d in mix["methods"].values():
    n = sum(x <= target for x in d["delta_m"])
    assert n >= 1 and d["steps_to_target"] == [30.0] * n
    np.testing.assert_allclose(d["seconds_to_target"], [3.0] * n)


def test_report_files(fabricated):
  _, out, _ = fabricated
  md = (out / "report.md").read_text()
  for piece in ("## Single-task baselines", "## Task mix: a+b", "Δm%", "mean rank",
                "### Negative transfer", "**ls**: hurts 1/2 tasks: a (", "helps 1: b (",
                "Tasks hurt by sharing under at least one method: a.", "### Overfitting",
                "### Gradient conflict", "a–b (-0.30)", "| 40.0% fewer |", "(n=3)"):
    assert piece in md, piece
  pngs = [l.split("](")[1].rstrip(")") for l in md.splitlines() if l.startswith("![")]
  assert len(pngs) >= 5
  for p in pngs:
    with open(out / p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", p
  tex = (out / "table_mix_2_a_b.tex").read_text()
  assert r"\toprule" in tex and r"\bottomrule" in tex
  csv = (out / "table_mix_2_a_b.csv").read_text().splitlines()
  assert csv[0].startswith("method,a mae ↓,a mae ↓_std,b mae ↓")
  assert len(csv) == 3
  assert json.loads((out / "report.json").read_text())["mixes"]["a+b"]["tasks"] == ["a", "b"]


GOLDEN = os.path.join(ROOT, "tests", "data", "report_golden")


def _report_files(out):
  """``{relative path: bytes}`` of a report directory."""
  files = {}
  for dirpath, _, names in os.walk(out):
    for n in names:
      path = os.path.join(dirpath, n)
      with open(path, "rb") as f:
        files[os.path.relpath(path, out)] = f.read()
  return files


def test_report_byte_identical_to_golden(fabricated):
  """``build_report``'s output on the fabricated runs is byte for byte the one recorded before it
  was split into sections (``MTL_UPDATE_GOLDEN=1`` rewrites the record): the text files verbatim
  (the root's path replaced by ``<ROOT>``), the PNGs by SHA-256 when matplotlib is the version
  that wrote them. Two reports: the defaults, and a title, a fixed target and a toy picture."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top
  root, out1, _ = fabricated
  out2 = root / "report_toy"
  study.build_report(str(root), str(out2), toy=str(out1 / "plots" / "delta_mix_2_a_b.png"),
                     title="Golden", target_delta_m=5.0)
  got = {}
  for tag, out in (("defaults", out1), ("toy", out2)):
    for rel, data in _report_files(out).items():
      key = f"{tag}/{rel}"
      got[key] = (hashlib.sha256(data).hexdigest().encode() if rel.endswith(".png") else
                  data.replace(str(root).encode(), b"<ROOT>"))
  pngs = {k: v.decode() for k, v in got.items() if k.endswith(".png")}
  texts = {k: v for k, v in got.items() if not k.endswith(".png")}
  record = os.path.join(GOLDEN, "png_sha256.json")
  if os.environ.get("MTL_UPDATE_GOLDEN"):
    for k, v in texts.items():
      os.makedirs(os.path.dirname(os.path.join(GOLDEN, k)), exist_ok=True)
      with open(os.path.join(GOLDEN, k), "wb") as f:
        f.write(v)
    with open(record, "w") as f:
      json.dump({"matplotlib": matplotlib.__version__, "png": pngs}, f, indent=1, sort_keys=True)
  with open(record) as f:
    want_png = json.load(f)
  assert sorted(pngs) == sorted(want_png["png"])
  if want_png["matplotlib"] == matplotlib.__version__:
    assert pngs == want_png["png"]
  want = {k: v for k, v in _report_files(GOLDEN).items() if k != "png_sha256.json"}
  assert sorted(texts) == sorted(want)
  for k, v in texts.items():
    assert v == want[k], k


def test_report_without_stl_uses_reference_and_errors(tmp_path):
  _write_run(tmp_path / "r0", ["a", "b"], {"a": 1.0, "b": 2.0}, 0, "ls", 10)
  with open(tmp_path / "r0" / "summary.json") as f:
    s = json.load(f)
  s["delta_m"] = 12.5
  with open(tmp_path / "r0" / "summary.json", "w") as f:
    json.dump(s, f)
  numbers = study.build_report(str(tmp_path), str(tmp_path / "rep"))
  mix = numbers["mixes"]["a+b"]
  assert "published" in mix["delta_m_source"] and mix["methods"]["ls"]["delta_m"] == [12.5]
  empty = tmp_path / "empty"
  empty.mkdir()
  out = subprocess.run([sys.executable, "launch/report.py", f"--workdir={empty}",
                        f"--out={tmp_path / 'x'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 2 and out.stderr.strip().startswith("error: ")
  assert "no finished run" in out.stderr
  with pytest.raises(ValueError, match="unknown direction of metric 'weird'"):
    study.metric_direction("weird")


def test_report_leaves_out_stale_runs_of_a_sweep(tmp_path):
  """A run the manifest lists with another config digest than its own is not in the tables; the
  report says so."""
  from mtl_jax.analysis import runs as runs_lib  # pylint: disable=g-import-not-at-top
  runs = []
  for m in ("ls", "pcgrad"):
    _write_run(tmp_path / "a+b" / m / "s0", ["a", "b"], {"a": 1.0, "b": 2.0}, 0, m, 10)
    run = runs_lib.load_run(str(tmp_path / "a+b" / m / "s0"))
    runs.append({"name": f"a+b/hard/{m}/s0", "workdir": f"a+b/{m}/s0",
                 "config_digest": runs_lib.recorded_digest(run.summary)})
  runs[1]["config_digest"] = "0123456789abcdef"  # the sweep now asks pcgrad for another config
  (tmp_path / "sweep.json").write_text(json.dumps({"runs": runs}))
  found, stale = runs_lib.scan(str(tmp_path))
  assert [r.combiner for r in found] == ["ls"]
  assert [(x.label, x.expected) for x in stale] == [("a+b/hard/pcgrad/s0", "0123456789abcdef")]
  numbers = study.build_report(str(tmp_path), str(tmp_path / "rep"))
  assert set(numbers["mixes"]["a+b"]["methods"]) == {"ls"}
  assert numbers["stale"][0]["label"] == "a+b/hard/pcgrad/s0"
  md = (tmp_path / "rep" / "report.md").read_text()
  assert "Left out: 1 stale run(s)" in md and "a+b/hard/pcgrad/s0" in md


# ---------------------------------------------------------------------------------------------
# One small real run: the digits benchmark through launch/sweep.py, then the report.


def test_real_digits_sweep_and_report(tmp_path):
  cfg = _write_config(tmp_path, [
      "c.base = 'configs/nash_digits.py:smoke'",
      "c.overrides = ('train.num_steps=4', 'train.eval_every=2', 'train.log_every=1', "
      "'train.checkpoint_every=4', 'train.eval_train_batches=1')",
      "c.combiners = ('mgda',)", "c.sharing = ('hard',)", "c.seeds = (0,)",
      "c.task_mixes = ('left,right',)", "c.single_task = False", "return c"])
  wd = tmp_path / "sw"
  # from another directory than the repository's (the run itself goes in its own workdir)
  out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sweep.py"), f"--config={cfg}",
                        f"--workdir={wd}"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  run_dir = wd / "left+right" / "hard" / "mgda" / "s0"
  assert (run_dir / "summary.json").exists()
  # the trainer's recorded config has the digest the sweep computes from the command
  again = _sweep_cli(f"--config={cfg}", f"--workdir={wd}", "--dry_run", cwd=tmp_path)
  assert "1 already done, 0 to run" in again.stdout and "[done]" in again.stdout
  longer = _sweep_cli(f"--config={cfg}", f"--workdir={wd}", "--dry_run",
                      "--config.overrides=('train.num_steps=6', 'train.eval_every=2', "
                      "'train.log_every=1', 'train.checkpoint_every=4', "
                      "'train.eval_train_batches=1')", cwd=tmp_path)
  assert "1 to run (1 stale)" in longer.stdout
  assert "[stale] left+right/hard/mgda/s0 (train.num_steps 4 -> 6)" in longer.stdout
  numbers = study.build_report(str(wd), str(tmp_path / "rep"))
  mix = numbers["mixes"]["left+right"]
  assert set(mix["methods"]) == {"mgda"}
  conflict = mix["conflict"]["mgda"]
  assert -1 <= conflict["mean_cosine"] <= 1 and conflict["pairs"] is not None
  curves = mix["overfitting"]["mgda"][0]
  assert {c["task"] for c in curves} == {"left", "right"}
  assert all(c["gap_final"] is not None for c in curves)  # the train split was evaluated
  md = (tmp_path / "rep" / "report.md").read_text()
  assert "cosine heatmap mgda" in md and "combiner weights" in md and "two-task trade-off" in md


# ---------------------------------------------------------------------------------------------
# The structure section (issue 17.7) on fabricated runs with structure records.

_HARD, _INDEP = [[[0, 1]], [[0, 1]]], [[[0, 1]], [[0], [1]]]


def _structure_run(path, test, seed, combiner, num_params, method=None, restart=False):
  """A fabricated run; with ``method`` its summary holds a structure block: the hard start and
  one split at step 10 (with the per-stage cosines that chose it)."""
  _write_run(path, ["a", "b"], test, seed, combiner, num_params)
  with open(os.path.join(path, "summary.json")) as f:
    summary = json.load(f)
  summary["wall_time_s"] = 3.0 + seed
  if method is not None:
    aff = [[[1.0, 0.8], [0.8, 1.0]], [[1.0, -0.4], [-0.4, 1.0]]]
    recs = [{"step": 0, "method": method, "tree": _HARD, "split": False, "fraction": 0.5,
             "num_params": 100, "describe": "{a,b} | {a,b}"},
            {"step": 10, "method": method, "tree": _INDEP, "split": True, "fraction": 0.75,
             "num_params": num_params, "describe": "{a,b} | {a} {b}", "affinity": aff,
             "conflict": [0.0, 1.0], "window_steps": 5}]
    summary["sharing"] = "branched" if method == "fixed" else "hard"
    summary["config"]["structure"] = {"restart": restart}
    summary["structure"] = {"method": method, "tree": _INDEP, "describe": "{a,b} | {a} {b}",
                            "trees": {"0": _HARD, "10": _INDEP}, "splits": recs,
                            "restart_step": 10 if restart else None}
  with open(os.path.join(path, "summary.json"), "w") as f:
    json.dump(summary, f)


def test_report_structure_section(tmp_path):
  from mtl_jax.analysis import structure as structure_lib
  for t, vals in STL.items():
    for s, v in enumerate(vals):
      _write_run(tmp_path / "stl" / t / f"s{s}", [t], {t: v}, s, "ls", 100)
  # (strategy label, combiner, method, restart, params, test values of a and b per seed)
  grid = [("hard", "ls", None, False, 100, ([1.2, 1.3], [2.0, 2.1])),
          ("affinity", "ls", "affinity", False, 150, ([1.0, 1.1], [2.0, 2.2])),
          ("recon", "ls", "conflict", True, 150, ([1.1, 1.2], [2.1, 2.2])),
          ("branched", "nash_mtl", "fixed", False, 200, ([0.9, 1.0], [1.9, 2.0]))]
  for label, comb, method, restart, n, (a, b) in grid:
    for s in range(2):
      _structure_run(tmp_path / "a+b" / label / comb / f"s{s}", {"a": a[s], "b": b[s]}, s, comb,
                     n, method, restart)
  out = tmp_path / "rep"
  numbers = study.build_report(str(tmp_path), str(out))
  mix = numbers["mixes"]["a+b"]
  names = ["ls", "ls/affinity", "ls/recon", "nash_mtl/branched"]
  assert set(mix["methods"]) == set(names)
  assert [mix["structure"][n]["strategy"] for n in names] == ["hard", "affinity", "recon",
                                                              "branched"]
  dm = {n: float(np.mean(mix["methods"][n]["delta_m"])) for n in names}
  params = {n: mix["methods"][n]["params"] for n in names}
  # the front by brute force: no other method with <= params and <= Δm%, one strictly
  want = sorted((n for n in names if not any(
      params[o] <= params[n] and dm[o] <= dm[n] and (params[o], dm[o]) != (params[n], dm[n])
      for o in names)), key=lambda n: (params[n], dm[n]))
  assert mix["pareto_front"] == want == ["ls", "ls/affinity", "nash_mtl/branched"]
  assert structure_lib.pareto_front({"x": (1, 2), "y": (1, 1), "z": (2, 0)}) == ["y", "z"]
  assert structure_lib.leaf_order([[[0, 1, 2, 3]], [[0, 2], [1, 3]], [[0], [2], [1], [3]]]) == \
      [0, 2, 1, 3]
  md = (out / "report.md").read_text()
  assert "### Sharing structure" in md and "Pareto front of sharing" in md
  # per-task Δm% of ls/affinity on a: (mean of 1.0, 1.1 vs the STL mean 1.05) = 0
  csv = (out / "structure_mix_2_a_b.csv").read_text().splitlines()
  row = next(r for r in csv if r.startswith("ls/affinity,"))
  assert row.split(",")[1:4] == ["affinity", "ls", "150"], row
  plots_dir = out / "plots"
  pngs = {p.name for p in plots_dir.iterdir()}
  for n in ("ls_affinity", "ls_recon", "nash_mtl_branched"):
    for s in range(2):
      assert f"tree_mix_2_a_b_{n}_s{s}.png" in pngs
      assert f"affinity_mix_2_a_b_{n}_s{s}_step10.png" in pngs
  assert "pareto_mix_2_a_b.png" in pngs and not any(p.startswith("tree_mix_2_a_b_ls_s") for p in pngs)
