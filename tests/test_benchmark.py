"""Smoke runs of launch/benchmark.py at tiny sizes (step, loop, structure, data): schema and rows, no timing."""

import argparse
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import combiners

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The benchmark harness (launch/bench/) imports as `bench`, as `python launch/benchmark.py` sees it.
sys.path.insert(0, os.path.join(ROOT, "launch"))
from bench import malloc, solves, steps as bu  # noqa: E402  pylint: disable=g-import-not-at-top
from mtl_jax import host_malloc  # noqa: E402  pylint: disable=g-import-not-at-top
COMBINERS = ("ls", "nash_mtl", "graddrop")  # one of each program kind: own, switch, aggregator


def _launcher():
  spec = importlib.util.spec_from_file_location("benchmark", os.path.join(ROOT, "launch",
                                                                          "benchmark.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _run_report(out):
  mod = _launcher()
  # No subcommand: the step benchmark is the default. The tiniest sizes; one device (no scaling
  # subprocess); one combiner of each program kind; K=2 beside K=3 for the step-vs-K scaling.
  mod.main([f"--out={out}", "--image_size=8", "--batch=4", "--num_tasks=3", "--width_mult=0.0625",
            "--repeats=1", "--ref_repeats=1", f"--combiners={','.join(COMBINERS)}", "--devices=1", "--step_ks=2",
            "--nash_ks=2,3", "--nash_repeats=2", "--solve_k=3", "--update_weights_every=2",
            "--compile_workers=1", "--compiler_option=xla_backend_optimization_level=0"])
  with open(out) as f:
    return json.load(f)


def bench_modes(name):
  m = combiners.method(name, 3)
  return {"losses": ("losses", "features"), "gramian": ("jacobian", "gramian", "features"),
          "jacobian": ("jacobian",)}[m.needs]


def test_step_benchmark_rows_schema_nash_scaling_and_checks(tmp_path):
  """One run of the harness for every claim about its report (a module fixture could run it once
  per pytest-xdist worker)."""
  report = _run_report(tmp_path / "bench.json")

  # Every (combiner, mode) row, once, with the schema.
  modes = {c: bench_modes(c) for c in COMBINERS}
  got = {(r["combiner"], r["mode"]) for r in report["rows"]}
  want = {(c, m) for c, ms in modes.items() for m in ms}
  assert got == want
  assert len(report["rows"]) == len(want)  # one row each
  for r in report["rows"]:
    for key in ("step_s", "ratio_to_ls", "ratio_to_jacobian", "peak_mem_mb"):
      assert np.isfinite(r[key]) and r[key] > 0, (r["combiner"], r["mode"], key)
    assert r["ratio_to_ls"] == pytest.approx(r["step_s"] / report["references"]["ls_s"])
    assert r["ratio_to_jacobian"] == pytest.approx(r["step_s"] / r["jacobian_ref_s"])
    if r["mode"] in ("gramian", "jacobian") and r["minor_faults"] is not None:
      # heavy rows: divided by a Jacobian-only call timed next to them (the machine drifts)
      assert r["minor_faults"] >= 0 and r["jacobian_ref_s"] > 0
    else:  # the cheap rows and Nash-MTL's reference row: the interleaved reference
      assert r["jacobian_ref_s"] == report["references"]["jacobian_s"]
    mem = r["memory_mb"]
    assert r["peak_mem_mb"] == pytest.approx(mem["temp"] + mem["argument"] + mem["output"])

  # Compiled by a worker process into the persistent cache, loaded from it here.
  assert report["compile"]["workers"] == 1
  assert report["compile"]["cache_hits"] == report["compile"]["programs"] >= len(COMBINERS) + 3
  assert set(report["compile"]["worker_compile_s"]) == set(report["compile"]["load_s"])

  # Layer taps: the ones the cost model picks at this size, listed with its figures.
  assert report["config"]["layer_gramian"] == "auto"
  for t in report["layer_taps"]:
    assert t["kind"] in ("conv", "dense") and t["tapped_madds"] < t["rows_madds"]
  assert report["references"]["nash_mtl_untapped_s"] is None  # --untapped_reference not given

  # Nash-MTL's solve, the scalings and the checks.
  assert set(report["nash_solve_ms"]) == {"2", "3"}
  assert all(v > 0 for v in report["nash_solve_ms"].values())
  assert all(v["kkt_residual"] <= 1e-3 for v in report["nash_solve"].values())
  assert set(report["scaling_k"]) == {"2", "3"}
  assert report["gramian_solve_ms"]["k"] == 3
  assert set(report["gramian_solve_ms"]["ms"]) == {"nash_mtl"}  # the one Gramian weighting run
  assert set(report["gramian_solve_ms"]["singular_ms"]) == {"nash_mtl"}
  assert report["gramian_solve_ms"]["singular_rank"] == 1
  assert set(report["scaling_devices"]) == {"1"}
  assert set(report["nash_update_weights_every"]) == {"jacobian"}  # --every_modes default
  names = [c["name"] for c in report["checks"]]
  assert any("plain flax" in n for n in names)
  assert any("gramian-mode peak memory" in n for n in names)
  assert sum("features-mode" in n for n in names) == sum(
      r["mode"] == "features" for r in report["rows"])
  # Tiny sizes: the bounds set for 32x32, batch 16, K=40 give no verdict; the solve ones (K only) do.
  assert report["bounds_applied"] is False
  for c in report["checks"]:
    assert c["ok"] == (None if c["sized"] else c["value"] <= c["bound"]), c


def test_loop_benchmark_schema(tmp_path):
  """`benchmark.py loop` at a tiny size: fit's steps/s and the bare loop's, their ratio, and the
  bound's verdict withheld away from its sizes (schema, not timing)."""
  out = tmp_path / "loop.json"
  mod = _launcher()
  report = mod.main(["loop", "--steps=6", "--batch_size=8", "--width=8", "--log_every=2",
                     "--repeats=2", f"--out={out}"])
  with open(out) as f:
    assert json.load(f) == json.loads(json.dumps(report))
  assert len(report["fit_calls"]) == len(report["bare_calls"]) == 2
  assert all(r > 0 for r in report["fit_calls"] + report["bare_calls"])
  assert report["fit_steps_per_s"] == pytest.approx(float(np.median(report["fit_calls"])))
  assert report["bare_steps_per_s"] == pytest.approx(float(np.median(report["bare_calls"])))
  assert report["step_ms"] == pytest.approx(1e3 / report["bare_steps_per_s"])
  assert report["pair_ratios"] == pytest.approx(
      [f / b for f, b in zip(report["fit_calls"], report["bare_calls"])])
  assert report["ratio"] == pytest.approx(float(np.median(report["pair_ratios"])))
  assert report["config"]["steps"] == 6 and report["bounds_applied"] is False
  (check,) = report["checks"]
  assert check["bound"] == mod.LOOP_BOUND == 0.9 and check["value"] == report["ratio"]
  assert check["ok"] is None  # not the sizes the bound was set for


def test_structure_benchmark_schema(tmp_path):
  """`benchmark.py structure` on the synthetic smoke MLP (one call per step and round): the three
  steps' seconds, the ratios to the jacobian-mode step and the bound's verdict (schema, not
  timing)."""
  out = tmp_path / "structure.json"
  mod = _launcher()
  report = mod.main(["structure", f"--config={ROOT}/configs/synthetic.py:smoke", "--steps=1",
                     "--repeats=2", f"--out={out}"])
  with open(out) as f:
    assert json.load(f) == json.loads(json.dumps(report))
  (row,) = report["rows"]
  assert row["num_tasks"] == 4 and row["num_stages"] == 2 and set(row["step_s"]) == {
      "jacobian", "stage_gramians", "lookahead"}
  assert all(len(r) == 2 and min(r) > 0 for r in row["rounds_s"].values())
  q = row["ratio_to_jacobian"]["stage_gramians"]
  assert q == pytest.approx(float(np.median([a / b for a, b in zip(
      row["rounds_s"]["stage_gramians"], row["rounds_s"]["jacobian"])])))
  assert row["check"] == {"name": "stage_gramians_overhead", "bound": 1.10, "value": q,
                          "ok": q <= 1.10}


def test_data_benchmark_schema(tmp_path):
  """`benchmark.py data` at a tiny size (fabricated JPEGs, 16x16, batch 8, workers 0 and 1; a
  2-attribute step: the 40-head one compiles for 40 s here): examples/s per worker count against
  the examples/s the training step consumes."""
  out = tmp_path / "data.json"
  _launcher().main(["data", "--workers=0,1", "--batch_size=8", "--image_size=16",
                    "--num_images=24", "--batches=2", "--steps=1", "--width=4", "--tasks=Smiling,Male",
                    f"--out={out}"])
  with open(out) as f:
    report = json.load(f)
  assert (report["batch_size"], report["image_size"], report["tasks"]) == (8, 16, "Smiling,Male")
  assert report["cpu_count"] == os.cpu_count()
  step = report["step_examples_per_s"]
  assert np.isfinite(step) and step > 0
  rates = report["pipeline_examples_per_s"]
  assert set(rates) == set(report["ratio_to_step"]) == {"0", "1"}
  for w, r in rates.items():
    assert np.isfinite(r) and r > 0
    assert report["ratio_to_step"][w] == pytest.approx(r / step)


def test_accelerator_preset_plans_every_row_and_writes_json_and_markdown(tmp_path):
  """`--preset=accelerator --tiny` on two rows (QM9 LS and Nash-MTL: the cheapest compiles here;
  all eight rows take ~90 s on this CPU): both files written, one row each, the ratio to LS."""
  from bench import accel  # pylint: disable=g-import-not-at-top
  assert set(accel.CELEBA_ROWS) == {("ls", ""), ("nash_mtl", ""), ("nash_mtl", "features"),
                                    ("pcgrad", ""), ("famo", ""), ("upgrad", "")}
  assert accel.FULL[:4] == (64, 256, 0, "all") and accel.FULL[4:6] == (120, 64)
  out = tmp_path / "acc"
  report = _launcher().main(["--preset=accelerator", "--tiny", "--steps=2", f"--out={out}",
                             "--rows=qm9:ls,qm9:nash_mtl",
                             "--compiler_option=xla_backend_optimization_level=0"])
  with open(out / "accelerator.json") as f:
    assert json.load(f) == json.loads(json.dumps(report))
  rows = report["rows"]
  assert [(r["benchmark"], r["combiner"]) for r in rows] == [("qm9", "ls"), ("qm9", "nash_mtl")]
  ls, nash = rows
  assert ls["mode"] == "losses" and nash["mode"] in ("jacobian", "gramian")
  assert ls["ratio_to_ls"] == 1.0
  assert nash["ratio_to_ls"] == pytest.approx(nash["step_s"] / ls["step_s"])
  for r in rows:
    assert r["finite"] and r["batch_size"] == accel.TINY.qm9_batch and r["num_tasks"] == 11
    assert r["steps_per_s"] == pytest.approx(1 / r["step_s"]) and r["timed_steps"] >= 2
    assert r["compile_s"] > 0 and r["peak_memory_mb"] > 0
  table = (out / "accelerator.md").read_text().splitlines()
  assert sum(line.startswith("| qm9 |") for line in table) == 2
  with pytest.raises(SystemExit, match="valid: .*celeba:upgrad"):
    _launcher().main(["--preset=accelerator", "--rows=celeba:nash"])
  with pytest.raises(SystemExit, match="valid: accelerator"):
    _launcher().main(["--preset=gpu"])


def test_bounds_get_a_verdict_only_at_the_sizes_they_were_set_for():
  mod = _launcher()
  for sizes, applied in ((mod.BOUND_SIZES, True), (dict(mod.BOUND_SIZES, num_tasks=3), False)):
    checks = []
    mod._check(checks, "LS / plain", 1.2, 1.1)
    mod._check(checks, "Nash-MTL solve at K=40 (ms)", 0.5, 2.5, sized=False)
    assert mod._apply_bounds(checks, argparse.Namespace(**sizes)) is applied
    lines = [mod._format_check(c) for c in checks]
    assert lines[0].startswith("  [FAIL]" if applied else "  [--]")
    assert ("not applied" in lines[0]) is not applied
    assert lines[1].startswith("  [ok]") and "not applied" not in lines[1]


def test_untapped_reference_and_every_tap_are_planned():
  # (the programs only: compiling them is the harness run's business)
  mod = _launcher()
  parser = argparse.ArgumentParser()
  mod._step_args(parser)
  args = parser.parse_args(["--num_tasks=3", "--untapped_reference", "--layer_gramian=all"])
  specs = mod._program_specs(["nash_mtl"], args)
  assert "nash_untapped" in specs and specs["nash_untapped"]["heavy"]
  setup = bu.make_setup(image_size=8, batch_size=4, num_tasks=3, width_mult=0.0625)
  assert [t["kind"] for t in mod._layer_taps(setup, args)] == ["conv"] * 7 + ["dense"] * 2
  args = parser.parse_args(["--num_tasks=3"])
  assert "nash_untapped" not in mod._program_specs(["nash_mtl"], args)


def test_bad_combiner_is_a_clear_error():
  with pytest.raises(ValueError, match="valid:"):
    _launcher().main(["--combiners=nash", "--devices=1"])


def test_switch_method_runs_only_the_selected_weighting():
  k = 3
  methods = [combiners.method(n, k) for n in ("mgda", "nash_mtl", "imtl")]
  sw = bu.switch_method(methods)
  a = jax.random.normal(jax.random.PRNGKey(0), (k, 5))
  gram, losses = a @ a.T, jnp.arange(1.0, k + 1)
  state = sw.init({"x": jnp.zeros(())})
  weigh = jax.jit(sw.weigh)  # one program: the index is a traced argument
  for i, m in enumerate(methods):
    w, new = weigh(gram, losses, state._replace(index=jnp.asarray(i, jnp.int32)))
    want, _ = m.weigh(gram, losses, m.init({"x": jnp.zeros(())}))
    np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-6)
    # only the selected method's state moved
    for j, (s_new, s_old) in enumerate(zip(new.states, state.states)):
      same = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(s_new),
                                                        jax.tree.leaves(s_old)))
      if j != i:
        assert same


def test_switch_method_rejects_mixed_groups():
  with pytest.raises(ValueError, match="one 'needs'"):
    bu.switch_method([combiners.method("ls", 2), combiners.method("mgda", 2)])


def test_nash_solve_timing_contract():
  out = solves.nash_solve_timing(ks=(3,), repeats=2)
  assert set(out) == {3} and out[3]["kkt_residual"] <= 1e-3 and out[3]["median_ms"] > 0


def test_ill_conditioned_gramian_spans_the_stated_diagonal():
  g = np.asarray(solves.ill_conditioned_gramian(jax.random.key(0), 6, spread=1e8), np.float64)
  np.testing.assert_allclose(np.sort(np.diag(g)), 1e8 ** np.linspace(0, 1, 6), rtol=1e-4)
  assert np.all(np.linalg.eigvalsh(g) > -1e-3 * np.max(np.diag(g)))  # a Gramian: PSD


def test_singular_gramian_has_the_stated_rank_and_diagonal():
  g = np.asarray(solves.singular_gramian(jax.random.key(0), 6, 3, spread=1e8), np.float64)
  np.testing.assert_allclose(np.sort(np.diag(g)), 1e8 ** np.linspace(0, 1, 6), rtol=1e-4)
  assert np.linalg.matrix_rank(g / np.sqrt(np.outer(np.diag(g), np.diag(g))), tol=1e-4) == 3


def test_solves_subcommand_schema(tmp_path):
  """`benchmark.py solves` at K=3 (seconds): both Gramian rows, the bounds withheld off K=40."""
  out = tmp_path / "solves.json"
  report = _launcher().main(["solves", f"--out={out}", "--solve_k=3", "--repeats=2",
                             "--nash_ks=", "--combiners=mgda,ls"])
  gs = json.loads(out.read_text())["gramian_solve_ms"]
  assert set(gs["ms"]) == set(gs["singular_ms"]) == {"mgda"} and gs["singular_rank"] == 1
  assert all(c["ok"] is None for c in report["checks"])  # all sized (K=40 only)


def test_gramian_solve_timing_covers_every_gramian_weighting():
  names = solves.gramian_weightings()
  assert "nash_mtl" in names and "mgda" in names and "ls" not in names and "graddrop" not in names
  out = solves.gramian_solve_timing(["nash_mtl", "mgda", "ls"], k=3, repeats=2)
  assert set(out) == {"nash_mtl", "mgda"} and all(v > 0 for v in out.values())


@pytest.mark.skipif(not (os.uname().sysname == "Linux"), reason="glibc only")
def test_untuned_environ_removes_only_what_was_added_and_stops_the_child_reexec():
  import platform  # pylint: disable=g-import-not-at-top
  if platform.libc_ver()[0] != "glibc":
    pytest.skip("glibc only")
  env = host_malloc.tuned_environ({"JAX_PLATFORMS": "cpu",
                                   "GLIBC_TUNABLES": "glibc.malloc.arena_max=8"})
  child = malloc.untuned_environ(env)
  assert child["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=8"  # the user's own setting stays
  assert host_malloc.tuned_environ(child) is None  # a launcher in the child does not re-exec
  tuned = host_malloc.tuned_environ({"JAX_PLATFORMS": "cpu"})
  assert "GLIBC_TUNABLES" not in malloc.untuned_environ(tuned)
