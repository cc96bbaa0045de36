"""Δm%, mean rank, conflict statistics, streaming evaluation, logging helpers."""

import io
import math
import os
import sys

from hypothesis import given, settings, strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtl_jax import evaluation  # noqa: E402
from mtl_jax import logging_utils  # noqa: E402
from mtl_jax.data import synthetic  # noqa: E402

HIB = {"a": {"f1": True}, "b": {"mae": False}}

pos = st.floats(0.01, 100.0, allow_nan=False)


def test_delta_m_by_hand():
  ref = {"a": {"f1": 0.5}, "b": {"mae": 2.0}}
  res = {"a": {"f1": 0.55}, "b": {"mae": 2.5}}
  # a: F1 up 10% (better: -10), b: MAE up 25% (worse: +25) -> mean 7.5
  assert evaluation.delta_m(res, ref, HIB) == pytest.approx(7.5)


@settings(max_examples=30, deadline=None)
@given(pos, pos, pos, pos)
def test_delta_m_properties(ra, rb, ma, mb):
  ref = {"a": {"f1": ra}, "b": {"mae": rb}}
  assert evaluation.delta_m(ref, ref, HIB) == pytest.approx(0.0, abs=1e-9)
  res = {"a": {"f1": ma}, "b": {"mae": mb}}
  dm = evaluation.delta_m(res, ref, HIB)
  want = ((-(ma - ra) / ra) + (mb - rb) / rb) * 50
  assert dm == pytest.approx(want, rel=1e-9, abs=1e-9)
  # Better on every metric -> negative; scale invariance of the relative change.
  better = {"a": {"f1": ra * 1.1}, "b": {"mae": rb * 0.9}}
  assert evaluation.delta_m(better, ref, HIB) < 0
  scaled_ref = {"a": {"f1": 3 * ra}, "b": {"mae": 3 * rb}}
  scaled = {"a": {"f1": 3 * ma}, "b": {"mae": 3 * mb}}
  assert evaluation.delta_m(scaled, scaled_ref, HIB) == pytest.approx(dm, rel=1e-9, abs=1e-9)


def test_delta_m_degenerate():
  assert evaluation.delta_m({"a": {"f1": 1.0}}, {}, HIB) is None  # nothing to compare
  # Metrics without a reference are skipped.
  dm = evaluation.delta_m({"a": {"f1": 1.0}, "b": {"mae": 1.0}}, {"b": {"mae": 2.0}}, HIB)
  assert dm == pytest.approx(-50.0)
  with pytest.raises(ValueError, match="is 0"):
    evaluation.delta_m({"b": {"mae": 1.0}}, {"b": {"mae": 0.0}}, HIB)


def test_mean_rank_with_ties_and_directions():
  table = {
      "x": {"a": {"f1": 0.9}, "b": {"mae": 1.0}},
      "y": {"a": {"f1": 0.8}, "b": {"mae": 1.0}},
      "z": {"a": {"f1": 0.7}, "b": {"mae": 0.5}},
  }
  r = evaluation.mean_rank(table, HIB)
  # a (higher better): x1 y2 z3; b (lower better): z1, x and y tie for 2-3 -> 2.5
  assert r == {"x": pytest.approx(1.75), "y": pytest.approx(2.25), "z": pytest.approx(2.0)}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=6))
def test_mean_rank_is_a_permutation_of_ranks(vals):
  table = {f"m{i}": {"a": {"f1": v}} for i, v in enumerate(vals)}
  r = evaluation.mean_rank(table, {"a": {"f1": True}})
  n = len(vals)
  assert sum(r.values()) == pytest.approx(n * (n + 1) / 2)
  best = max(range(n), key=lambda i: (vals[i], -i))
  assert r[f"m{best}"] == min(r.values())


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_conflict_stats_match_explicit_cosines(k, p, seed):
  g = np.random.default_rng(seed).standard_normal((k, p)).astype(np.float32) + 0.1
  stats = evaluation.conflict_stats(jnp.asarray(g @ g.T))
  norms = np.linalg.norm(g, axis=1)
  np.testing.assert_allclose(stats["grad_norms"], norms, rtol=1e-4)
  cos = [g[i] @ g[j] / (norms[i] * norms[j]) for i in range(k) for j in range(i + 1, k)]
  if cos:
    assert float(stats["mean_cosine"]) == pytest.approx(np.mean(cos), abs=1e-4)
    assert float(stats["conflict_rate"]) == pytest.approx(np.mean(np.array(cos) < 0), abs=1e-6)
  else:
    assert float(stats["mean_cosine"]) == 1 and float(stats["conflict_rate"]) == 0
  assert float(stats["norm_spread"]) == pytest.approx(norms.max() / norms.min(), rel=1e-4)


def test_conflict_stats_degenerate_zero_gradient():
  s = evaluation.conflict_stats(jnp.zeros((3, 3)))
  assert all(np.all(np.isfinite(np.asarray(v))) for v in s.values())
  opposite = np.array([[1.0, 0.0], [-1.0, 0.0]])
  s = evaluation.conflict_stats(jnp.asarray(opposite @ opposite.T))
  assert float(s["mean_cosine"]) == pytest.approx(-1) and float(s["conflict_rate"]) == 1


class _Cfg(dict):
  __getattr__ = dict.__getitem__


def _bench(**data):
  data = dict(seed=0, num_train=40, num_eval=23, **data)
  cfg = _Cfg(data=_Cfg(data), tasks="all", model=_Cfg(width=0))
  return synthetic.get_benchmark(cfg)


def test_evaluate_accumulates_over_uneven_batches():
  bench = _bench()
  loader = bench.loader("test", 5, 0, False)  # 23 examples: the last batch has 3
  assert loader.batches_per_epoch == 5
  w = np.linspace(-1, 1, 8).astype(np.float32)

  def apply(variables, x):
    z = x @ variables["w"]
    return {t.name: z for t in bench.tasks}

  res = evaluation.evaluate(apply, {"w": jnp.asarray(w)}, loader, bench.tasks)
  full = next(iter(bench.loader("test", 23, 0, False).epoch()))
  z = full["inputs"] @ w
  for t in bench.tasks:
    y = full["targets"][t.name]
    if t.name.startswith("reg"):
      assert res[t.name]["mae"] == pytest.approx(np.mean(np.abs(z - y)), rel=1e-5)
    else:
      assert res[t.name]["accuracy"] == pytest.approx(np.mean((z > 0) == (y > 0.5)))
  assert loader.position == 0  # evaluation does not move the loader


def test_synthetic_benchmark_is_deterministic_and_multi_input():
  a, b = _bench(), _bench()
  xa = next(a.loader("train", 8, 3, True))
  xb = next(b.loader("train", 8, 3, True))
  np.testing.assert_array_equal(xa["inputs"], xb["inputs"])
  m = _bench(multi_input=True)
  batch = next(m.loader("train", 4, 0, True))
  assert set(batch) == {"reg0", "reg1", "cls0", "cls1"}
  assert not np.allclose(batch["reg0"]["inputs"], batch["reg1"]["inputs"])
  assert m.reference["reg0"]["mae"] == pytest.approx(0.1 * math.sqrt(2 / math.pi))


def test_jsonl_flatten_and_progress_bar(tmp_path):
  w = logging_utils.JsonlWriter(str(tmp_path / "m.jsonl"))
  for s in range(1, 5):
    w.write({"step": s, "losses": np.array([1.0, float("nan")]), "x": np.float32(2)})
  w.truncate_after(2)
  recs = logging_utils.read_jsonl(str(tmp_path / "m.jsonl"))
  assert [r["step"] for r in recs] == [1, 2] and recs[0]["losses"] == [1.0, "nan"]
  flat = logging_utils.flatten({"losses": [1, 2], "lr": 0.5, "eval": {"t": {"f1": 0.3}}},
                               {"losses": ["a", "b"]})
  assert flat == {"losses/a": 1.0, "losses/b": 2.0, "lr": 0.5, "eval/t/f1": 0.3}
  buf = io.StringIO()
  bar = logging_utils.ProgressBar(10, enabled=True, stream=buf, min_interval=0)
  bar.update(5)
  assert "5/10" in buf.getvalue() and "steps/s" in buf.getvalue() and "ETA" in buf.getvalue()
  quiet = io.StringIO()
  logging_utils.ProgressBar(10, stream=quiet).update(5)  # not a TTY: nothing written
  assert quiet.getvalue() == ""


def test_colab_notebook_is_valid_nbformat_json():
  import json  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  nb = json.load(open(os.path.join(root, "launch", "colab.ipynb")))
  assert nb["nbformat"] == 4 and nb["cells"]
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and "execution_count" in cell
  code = "".join("".join(c["source"]) for c in nb["cells"])
  assert "launch/train.py" in code and "summary.json" in code and "metrics.jsonl" in code
  assert os.path.exists(os.path.join(root, "configs", "nash_celeba.py"))
