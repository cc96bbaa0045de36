"""mtl_jax.analysis: negative transfer, overfitting, gradient conflict, task affinity, tables."""

import math

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mtl_jax import evaluation
from mtl_jax.analysis import affinity
from mtl_jax.analysis import conflict
from mtl_jax.analysis import overfitting
from mtl_jax.analysis import runs as runs_lib
from mtl_jax.analysis import tables
from mtl_jax.analysis import transfer

SETTINGS = hypothesis.settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------------------------------------
# Negative transfer.


def test_welch_matches_scipy_and_degenerate_cases():
  a, b = [1.0, 2.0, 3.5], [2.0, 4.0, 5.0, 7.0]
  t, p = transfer.welch(a, b)
  ref = stats.ttest_ind(a, b, equal_var=False)
  assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
  assert all(math.isnan(x) for x in transfer.welch([1.0], [1.0, 2.0]))
  assert transfer.welch([1.0, 1.0], [1.0, 1.0]) == (0.0, 1.0)
  t, p = transfer.welch([2.0, 2.0], [1.0, 1.0])
  assert t == math.inf and p == 0.0


def test_compare_verdicts_and_sign():
  # lower is better (MAE): multi-task clearly worse -> hurt, gain negative.
  r = transfer.compare("mu", "mae", False, [1.2, 1.21, 1.19], [1.0, 1.01, 0.99])
  assert r.verdict == transfer.HURT and r.rel_gain_pct == pytest.approx(-20.0) and r.tested
  # higher is better (accuracy): multi-task clearly better -> helped.
  r = transfer.compare("left", "accuracy", True, [0.9, 0.91, 0.89], [0.8, 0.81, 0.79])
  assert r.verdict == transfer.HELPED and r.rel_gain_pct > 0
  # noisy and overlapping -> neutral even though the mean is worse.
  r = transfer.compare("t", "mae", False, [1.0, 2.0, 0.5], [1.0, 1.5, 0.6])
  assert r.verdict == transfer.NEUTRAL
  # one seed: no test, the sign decides.
  r = transfer.compare("t", "mae", False, [2.0], [1.0, 1.1])
  assert not r.tested and math.isnan(r.p_value) and r.verdict == transfer.HURT
  with pytest.raises(ValueError, match="at least one"):
    transfer.compare("t", "mae", False, [], [1.0])
  with pytest.raises(ValueError, match="alpha"):
    transfer.compare("t", "mae", False, [1.0], [1.0], alpha=1.5)


@SETTINGS
@hypothesis.given(st.lists(st.floats(0.1, 10.0), min_size=2, max_size=6),
                  st.lists(st.floats(0.1, 10.0), min_size=2, max_size=6))
def test_compare_direction_symmetry(mtl, stl):
  """Negating the values and flipping the direction gives the same verdict and p-value."""
  a = transfer.compare("t", "m", False, mtl, stl)
  b = transfer.compare("t", "m", True, [-x for x in mtl], [-x for x in stl])
  assert a.verdict == b.verdict
  assert (math.isnan(a.p_value) and math.isnan(b.p_value)) or a.p_value == pytest.approx(b.p_value)
  assert a.rel_gain_pct == pytest.approx(b.rel_gain_pct)


def test_negative_transfer_lists_hurt_tasks():
  hib = {"a": {"mae": False}, "b": {"mae": False}, "c": {"mae": False}}
  mtl = {"a": {"mae": [2.0, 2.1, 1.9]}, "b": {"mae": [0.5, 0.51, 0.49]}, "c": {"mae": [1.0]}}
  stl = {"a": {"mae": [1.0, 1.1, 0.9]}, "b": {"mae": [1.0, 1.01, 0.99]}}
  res = transfer.negative_transfer(mtl, stl, hib)
  assert [r.task for r in res] == ["a", "b"]  # c has no STL
  assert transfer.hurt_tasks(res) == ["a"]
  line = transfer.summary_line("ls", res)
  assert "hurts 1/2" in line and "a (" in line and "Welch" in line


# ---------------------------------------------------------------------------------------------
# Fabricated runs.


def fake_run(tasks, val, train=None, losses=None, cosine=None, weights=None, seed=0,
             combiner="ls", test=None):
  """A Run with evaluation records every 10 steps (``val[task]`` lists) and training records."""
  n = len(next(iter(val.values())))
  evals = []
  for i in range(n):
    ev = {"validation": {t: {"mae": val[t][i]} for t in tasks}}
    if train is not None:
      ev["train"] = {t: {"mae": train[t][i]} for t in tasks}
    evals.append({"step": 10 * (i + 1), "eval": ev})
  recs = []
  if losses is not None:
    for i, row in enumerate(losses):
      r = {"step": 5 * (i + 1), "losses": list(row)}
      if weights is not None:
        r["weights"] = list(weights[i])
      if cosine is not None:
        c = np.asarray(cosine[i])
        r["cosine"] = c.tolist()
        iu = np.triu_indices(len(tasks), 1)
        r["mean_cosine"] = float(c[iu].mean())
        r["min_cosine"] = float(c[iu].min())
        r["conflict_rate"] = float((c[iu] < 0).mean())
        r["norm_spread"] = 2.0
        r["grad_norms"] = [1.0] * len(tasks)
      recs.append(r)
  summary = {"tasks": list(tasks), "combiner": combiner, "sharing": "hard",
             "config": {"seed": seed}, "test": test or {}}
  return runs_lib.Run("/nowhere", summary, recs, evals)


def test_overfitting_flags_early_peak_and_gap():
  val = {"a": [1.0, 0.5, 0.6, 0.7, 0.8, 0.9], "b": [1.0, 0.8, 0.6, 0.5, 0.45, 0.4]}
  train = {"a": [1.0, 0.45, 0.4, 0.3, 0.2, 0.1], "b": [1.0, 0.78, 0.58, 0.48, 0.43, 0.38]}
  losses = [[1.0 / (i + 1), 1.0 / (i + 1)] for i in range(12)]
  run = fake_run(["a", "b"], val, train, losses)
  hib = {"a": {"mae": False}, "b": {"mae": False}}
  curves = {c.task: c for c in overfitting.run_curves(run, hib)}
  a, b = curves["a"], curves["b"]
  assert a.peak_step == 20 and a.best == 0.5 and a.final_drop_pct == pytest.approx(80.0)
  assert a.early_peak and a.overfit and a.gap_growth_pct > 5
  assert a.gap_first == pytest.approx(0.0) and a.gap_final == pytest.approx(0.8)
  assert b.peak_step == 60 and not b.early_peak and not b.overfit and not b.oscillating
  text = overfitting.describe("ls", [list(curves.values())])
  assert "early-peaking tasks: a;" in text and "overfitting: a;" in text
  assert "gap per task (median; + = better on training data): a +0.8, b +0.02" in text


def test_overfitting_oscillation_and_jitter():
  val = {"a": [1.0, 0.5, 0.9, 0.4, 0.95, 0.35]}
  run = fake_run(["a"], val, losses=[[1.0], [3.0], [1.0], [3.0], [1.0], [3.0], [1.0], [3.0]])
  c = overfitting.run_curves(run, {"a": {"mae": False}})[0]
  assert c.reversals == 4 and c.oscillating
  assert c.gap_first is None and c.overfit is False  # no train evaluation, no early peak
  a = math.log(3.0)  # second half 1,3,1,3: log-changes +a, -a, +a
  assert c.loss_jitter == pytest.approx(float(np.std([a, -a, a])))
  smooth = overfitting.loss_jitter(np.exp(-np.arange(20) / 5.0))
  assert smooth[0] == pytest.approx(0.0, abs=1e-9)


def test_reversals_ignores_small_moves():
  assert overfitting.reversals(np.array([1.0, 1.001, 0.999, 1.0005]), tol=0.01) == 0
  assert overfitting.reversals(np.array([1.0, 2.0, 1.0]), tol=0.5) == 1


# ---------------------------------------------------------------------------------------------
# Gradient conflict.


# The trainer's statistics, jitted as in the trainer: one compilation per Gramian shape instead of
# one per primitive and shape.
_CONFLICT_STATS = jax.jit(evaluation.conflict_stats)


@SETTINGS
@hypothesis.given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 10_000))
def test_cosine_from_gramian_matches_trainer(k, p, seed):
  j = np.random.default_rng(seed).normal(size=(k, p))
  g = j @ j.T
  cos = conflict.cosine_from_gramian(g)
  assert np.all(np.abs(cos) <= 1 + 1e-9)
  np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-9)
  ref = _CONFLICT_STATS(jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(np.asarray(ref["cosine"]), cos, atol=1e-4)
  if k > 1:
    iu = np.triu_indices(k, 1)
    assert float(ref["conflict_rate"]) == pytest.approx(float((cos[iu] < 0).mean()))


def test_conflict_timeseries_and_window():
  c1 = np.array([[1, -0.5, 0.2], [-0.5, 1, 0.1], [0.2, 0.1, 1.0]])
  c2 = np.array([[1, -0.1, 0.4], [-0.1, 1, -0.3], [0.4, -0.3, 1.0]])
  run = fake_run(["a", "b", "c"], {"a": [1.0], "b": [1.0], "c": [1.0]},
                 losses=[[1, 1, 1]] * 4, cosine=[c1, c1, c2, c2])
  ts = conflict.conflict_timeseries(run)
  np.testing.assert_array_equal(ts["step"], [5, 10, 15, 20])
  assert ts["conflict_rate"][0] == pytest.approx(1 / 3) and ts["conflict_rate"][-1] == \
      pytest.approx(2 / 3)
  # default window: the second half, steps 10..20 -> c1, c2, c2
  np.testing.assert_allclose(conflict.cosine_matrix(run), (c1 + 2 * c2) / 3)
  np.testing.assert_allclose(conflict.cosine_matrix(run, (0, 100)), (c1 + c2) / 2)
  pairs = conflict.conflicting_pairs(c2, ["a", "b", "c"])
  assert [(a, b) for a, b, _ in pairs] == [("b", "c"), ("a", "b")]
  with pytest.raises(ValueError, match="no logged cosine"):
    conflict.cosine_matrix(run, (100, 200))
  assert conflict.summarize(fake_run(["a"], {"a": [1.0]}, losses=[[1.0]])) is None


# ---------------------------------------------------------------------------------------------
# Task affinity (TAG).


def quad_losses(params, batch):
  """L_k = 0.5 ||w - c_k||^2 + 0.5 (h_k - 1)^2: shared w, task-specific h."""
  c = batch["c"]
  shared = 0.5 * jnp.sum((params["w"][None] - c) ** 2, axis=1)
  return shared + 0.5 * (params["h"] - 1.0) ** 2 + 1.0


def test_lookahead_affinity_matches_closed_form():
  c = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  params = {"w": jnp.array([0.3, -0.2]), "h": jnp.array([0.0, 0.5, 2.0])}
  lr = 0.1
  mask = {"w": True, "h": False}
  z = np.asarray(affinity.lookahead_affinity(quad_losses, params, {"c": c}, lr, mask))
  base = np.asarray(quad_losses(params, {"c": c}))
  for i in range(3):
    w_i = params["w"] - lr * (params["w"] - c[i])  # only the shared weights move
    after = np.asarray(quad_losses({"w": w_i, "h": params["h"]}, {"c": c}))
    np.testing.assert_allclose(z[i], 1 - after / base, rtol=1e-5, atol=1e-6)
  assert np.all(np.diag(z) > 0)  # a task's own step lowers its loss
  assert z[0, 2] < 0  # opposite targets: task 0's step raises task 2's loss


def test_lookahead_affinity_everything_shared_moves_heads_too():
  c = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  params = {"w": jnp.zeros(2), "h": jnp.zeros(2)}
  z_all = affinity.lookahead_affinity(quad_losses, params, {"c": c}, 0.1)
  z_shared = affinity.lookahead_affinity(quad_losses, params, {"c": c}, 0.1,
                                         {"w": True, "h": False})
  # moving task i's head lowers only task i's loss: the diagonal differs, off-diagonal does not
  np.testing.assert_allclose(np.asarray(z_all)[0, 1], np.asarray(z_shared)[0, 1], rtol=1e-6)
  assert float(z_all[0, 0]) > float(z_shared[0, 0])


def test_affinity_over_window_is_the_mean_and_trains():
  c = jnp.array([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]])
  params = {"w": jnp.array([0.0, 0.0]), "h": jnp.zeros(3)}
  batches = [{"c": c}] * 4
  res = affinity.affinity_over_window(quad_losses, params, batches, 0.05,
                                      shared_mask={"w": True, "h": False})
  assert res.per_step.shape == (4, 3, 3)
  np.testing.assert_allclose(res.mean, res.per_step.mean(0))
  assert float(jnp.sum(quad_losses(res.params, {"c": c}))) < float(
      jnp.sum(quad_losses(params, {"c": c})))
  every2 = affinity.affinity_over_window(quad_losses, params, batches, 0.05, every=2)
  assert every2.per_step.shape[0] == 2
  with pytest.raises(ValueError, match="empty window"):
    affinity.affinity_over_window(quad_losses, params, [], 0.05)


@SETTINGS
@hypothesis.given(st.integers(1, 7), st.integers(1, 4))
def test_partitions_count_is_stirling(n, k):
  parts = list(affinity.partitions(n, k))
  assert len(parts) == affinity.stirling2(n, k) if k <= n else len(parts) == 0
  for p in parts:
    assert sorted(i for g in p for i in g) == list(range(n)) and all(p)


def test_group_score_by_hand():
  z = np.array([[0.0, 0.2, -0.1], [0.4, 0.0, 0.3], [0.1, -0.2, 0.0]])
  # group {0,1}: onto 0 from 1: 0.4; onto 1 from 0: 0.2; {2} alone: 0
  assert affinity.group_score(z, [[0, 1], [2]]) == pytest.approx(0.6)
  # one group {0,1,2}: onto 0 (0.4+0.1)/2, onto 1 (0.2-0.2)/2, onto 2 (-0.1+0.3)/2
  assert affinity.group_score(z, [[0, 1, 2]]) == pytest.approx(0.25 + 0.0 + 0.1)


@SETTINGS
@hypothesis.given(st.integers(0, 10_000))
def test_suggest_groups_recovers_planted_blocks(seed):
  rng = np.random.default_rng(seed)
  labels = np.array([0, 0, 1, 1, 1, 2, 2])
  z = np.where(labels[:, None] == labels[None, :], 1.0, -1.0) + 0.1 * rng.normal(size=(7, 7))
  tasks = [f"t{i}" for i in range(7)]
  ex = affinity.suggest_groups(z, tasks, max_groups=3)
  gr = affinity.suggest_groups(z, tasks, max_groups=3, exhaustive_limit=0)
  want = sorted([["t0", "t1"], ["t2", "t3", "t4"], ["t5", "t6"]])
  assert ex[3].exhaustive and not gr[3].exhaustive
  assert sorted(ex[3].groups) == want and sorted(gr[3].groups) == want
  assert set(ex) == {2, 3}
  assert gr[3].score <= ex[3].score + 1e-9  # exhaustive is optimal


def test_suggest_groups_errors():
  with pytest.raises(ValueError, match="shape"):
    affinity.suggest_groups(np.zeros((2, 2)), ["a", "b", "c"])
  with pytest.raises(ValueError, match="at least 2"):
    affinity.suggest_groups(np.zeros((1, 1)), ["a"])
  with pytest.raises(ValueError, match="max_groups"):
    affinity.suggest_groups(np.zeros((2, 2)), ["a", "b"], max_groups=1)


# ---------------------------------------------------------------------------------------------
# Tables.


def test_tables_render_every_format():
  cells = tables.mark_best([tables.MeanStd(1.5, 0.1, 3), tables.MeanStd(1.2, 0.05, 3),
                            tables.MeanStd(math.nan, math.nan, 0)], higher_is_better=False)
  assert [c.bold for c in cells] == [False, True, False]
  t = tables.Table(["method", "mu mae ↓", "Δm%"], [["ls_1", cells[0], 12.5],
                                                     ["nash_mtl", cells[1], -3.25],
                                                     ["x|y", cells[2], None]],
                   caption="QM9 & friends 50%", label="tab:x")
  md = tables.to_markdown(t)
  assert "| ls_1 | 1.500 ± 0.10 | 12.50 |" in md and "**1.200 ± 0.050**" in md
  assert "x\\|y" in md and "| – |" in md
  tex = tables.to_latex(t)
  for piece in (r"\toprule", r"\midrule", r"\bottomrule", r"\textbf{1.200 $\pm$ 0.050}",
                r"ls\_1", r"QM9 \& friends 50\%", r"$\Delta$m\%", r"\label{tab:x}"):
    assert piece in tex
  csv = tables.to_csv(t).splitlines()
  assert csv[0] == "method,mu mae ↓,mu mae ↓_std,Δm%"
  assert csv[1].startswith("ls_1,1.5,0.1,12.5")
  with pytest.raises(ValueError, match="cells"):
    tables.Table(["a", "b"], [["only one"]])


def test_fmt_number():
  assert tables.fmt_number(0.000012345) == "1.234e-05"
  assert tables.fmt_number(123.456) == "123.5"
  assert tables.fmt_number(7) == "7" and tables.fmt_number(math.nan) == "–"


def test_tag_from_a_real_config():
  """TAG on the digits benchmark (real data, smoke-sized LeNet), two steps."""
  from mtl_jax import config_utils  # pylint: disable=g-import-not-at-top
  config = config_utils.load_config_file("configs/nash_digits.py:smoke")
  names, res, groups = affinity.from_config(config, num_steps=2, lr=0.1)
  assert names == ["left", "right"] and res.per_step.shape == (2, 2, 2)
  assert np.all(np.isfinite(res.mean))
  assert np.all(np.diag(res.mean) > 0)  # a task's own SGD step lowers its loss
  assert sorted(sum(groups[2].groups, [])) == ["left", "right"]


def test_plots_write_png_and_reject_empty_input(tmp_path):
  from mtl_jax.analysis import plots  # pylint: disable=g-import-not-at-top
  z = np.array([[0.1, -0.05], [0.02, 0.2]])
  path = plots.affinity_heatmap(z, ["a", "b"], str(tmp_path / "aff.png"))
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  path = plots.tradeoff_scatter({"ls": (1.0, 0.1, 2.0, 0.2)}, ["a", "b"], ["mae", "mae"],
                                str(tmp_path / "t.png"), stl=(0.9, 1.8))
  assert (tmp_path / "t.png").stat().st_size > 1000
  with pytest.raises(ValueError, match="exactly 2 tasks"):
    plots.tradeoff_scatter({}, ["a", "b", "c"], ["m"] * 3, str(tmp_path / "x.png"))
  with pytest.raises(ValueError, match="no curve"):
    plots.training_curves({}, {}, str(tmp_path / "y.png"))
  with pytest.raises(ValueError, match="no run logged"):
    plots.conflict_timeseries({}, str(tmp_path / "z.png"))
