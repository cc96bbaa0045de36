"""The trainer: SPMD step on 1 vs 4 devices, exact vs local reduction, determinism, non-finite
losses, config errors. Tiny synthetic benchmark (mtl_jax/data/synthetic.py)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mtl_jax import config_utils  # noqa: E402
from mtl_jax import train  # noqa: E402
from configs import synthetic  # noqa: E402


def tiny(**over):
  c = synthetic.get_config("smoke")
  for key, value in over.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def _env(devices=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  if devices:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
  return env


SPMD_SCRIPT = textwrap.dedent("""
  import json, sys
  import jax, numpy as np
  sys.path.insert(0, %(root)r)
  from configs import synthetic
  from mtl_jax import train

  def params(name, devices, reduction="exact", mode="", bn=False):
    c = synthetic.get_config("smoke")
    c.combiner.name = name
    c.data.batch_norm = bn
    c.engine.reduction = reduction
    c.engine.mode = mode
    state, hist = train.run_steps(c, 3, devices=devices)
    leaves = jax.tree.leaves(jax.device_get((state.params, state.batch_stats)))
    return np.concatenate([np.ravel(x) for x in leaves])

  assert jax.device_count() == 4, jax.devices()
  one, four = jax.devices()[:1], jax.devices()
  out = {}
  for name in ("ls", "pcgrad"):
    a, b, c = params(name, one), params(name, four, "exact"), params(name, four, "local")
    out[f"{name}/1v4"] = float(np.max(np.abs(a - b)))
    out[f"{name}/exact_v_local"] = float(np.max(np.abs(b - c)))
  # Synchronised batch norm: the global batch's statistics on every device, so 4 devices give
  # the parameters and running statistics of 1.
  out["pcgrad_bn/1v4"] = float(np.max(np.abs(params("pcgrad", one, bn=True) -
                                             params("pcgrad", four, bn=True))))
  print("RESULT" + json.dumps(out))
""")


def test_spmd_step_on_1_and_4_devices_exact_and_local_reduction():
  """One 4-device subprocess for every SPMD claim (a JAX start and 8 compilations; one test, not a
  module fixture, so that pytest-xdist cannot run it once per worker)."""
  proc = subprocess.run([sys.executable, "-c", SPMD_SCRIPT % {"root": ROOT}], env=_env(4),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  res = json.loads(line[len("RESULT"):])
  # The same parameters (and batch-norm statistics) on 1 and 4 devices.
  for key in ("ls/1v4", "pcgrad/1v4", "pcgrad_bn/1v4"):
    assert res[key] < 1e-5, (key, res)
  # The local reduction is the exact one for LS (linear in the gradients) ...
  assert res["ls/exact_v_local"] < 1e-6, res
  # ... and a different method for a nonlinear combiner.
  assert res["pcgrad/exact_v_local"] > 1e-5, res


def test_step_metrics_and_conflict_statistics():
  c = tiny(**{"combiner.name": "pcgrad"})
  state, hist = train.run_steps(c, 2)
  m = hist[-1]
  assert int(state.step) == 2
  assert m["losses"].shape == (4,) and m["weights"].shape == (4,)
  assert bool(m["finite"])
  for key in ("mean_cosine", "conflict_rate", "norm_spread", "grad_norms", "update_norm"):
    assert key in m and np.all(np.isfinite(m[key])), key
  assert -1 <= float(m["mean_cosine"]) <= 1 and 0 <= float(m["conflict_rate"]) <= 1
  assert float(m["norm_spread"]) >= 1
  np.testing.assert_allclose(float(m["norm_spread"]),
                             m["grad_norms"].max() / m["grad_norms"].min(), rtol=1e-5)


def test_multi_input_batches_use_each_tasks_own_batch():
  c = tiny(**{"data.multi_input": True})
  state, hist = train.run_steps(c, 1)
  # Recompute the first step's losses by hand from the first multi-input batch.
  bench, model, method, mode = train.build(c)
  loader = bench.loader("train", 8, 0, True)
  batch = next(loader)
  assert set(batch) == {t.name for t in bench.tasks}
  key = jax.random.split(jax.random.key(0))[0]
  variables = model.init(key, model.sample_input())
  for k, t in enumerate(bench.tasks):
    preds, _ = model.apply(variables, batch[t.name]["inputs"], train=True)
    want = float(t.loss(preds[t.name], batch[t.name]["targets"][t.name]))
    np.testing.assert_allclose(hist[0]["losses"][k], want, rtol=1e-5)
  assert "mean_cosine" not in hist[0]  # the losses mode computes no Gramian
  # A different task's inputs would give a different loss (the batches are distinct).
  t0, t1 = bench.tasks[0], bench.tasks[1]
  preds, _ = model.apply(variables, batch[t1.name]["inputs"], train=True)
  other = float(t0.loss(preds[t0.name], batch[t1.name]["targets"][t1.name]))
  assert abs(other - hist[0]["losses"][0]) > 1e-4


TIMING_KEYS = ("steps_per_sec", "wall_time_s")  # differ between identical runs


def _fit(tmp_path, name, **over):
  return train.fit(tiny(**over), str(tmp_path / name), progress=False)


def test_same_config_and_seed_gives_identical_summary_and_outputs(tmp_path):
  over = {"combiner.name": "pcgrad"}
  a = _fit(tmp_path, "a", **over)
  b = _fit(tmp_path, "b", **over)
  for key in TIMING_KEYS:
    a.pop(key), b.pop(key)
  assert a == b
  assert a["step"] == 12 and len(a["params_checksum"]) == 64
  assert set(a["test"]) == {"reg0", "reg1", "cls0", "cls1"}
  assert a["delta_m"] is not None and a["num_params"] > 0

  wd = tmp_path / "a"
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["params_checksum"] == a["params_checksum"]
  for key in ("step", "params_checksum", "test", "delta_m", "num_params", "steps_per_sec",
              "wall_time_s", "config", "combiner", "sharing", "tasks"):
    assert key in summary, key
  recs = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  train_recs = [r for r in recs if "losses" in r]
  eval_recs = [r for r in recs if "eval" in r]
  assert [r["step"] for r in train_recs] == [3, 6, 9, 12]
  assert [r["step"] for r in eval_recs] == [6, 12]
  assert "mean_cosine" in train_recs[0] and len(train_recs[0]["weights"]) == 4
  best = max(eval_recs, key=lambda r: r["selection_score"])
  assert summary["selected_step"] == best["step"]
  assert summary["test"] == best["eval"]["test"]
  assert any(f.startswith("events") for f in os.listdir(wd / "tensorboard"))
  assert sorted(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit()) == [4, 8, 12]


def test_nonfinite_stop_names_task_and_step(tmp_path):
  with pytest.raises(train.NonFiniteError, match=r"reg0, reg1 at step 1\b"):
    _fit(tmp_path, "nan", **{"data.noise": float("nan")})
  assert not (tmp_path / "nan" / "summary.json").exists()


def test_nonfinite_skip_counts_and_keeps_params():
  c = tiny(**{"data.noise": float("nan"), "train.on_nonfinite": "skip"})
  state0, _ = train.run_steps(c, 0)
  state, hist = train.run_steps(c, 3)
  assert [bool(m["finite"]) for m in hist] == [False] * 3
  assert int(hist[-1]["skipped"]) == 3
  for a, b in zip(jax.tree.leaves(state0.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_validation_is_one_line():
  c = tiny()
  with c.unlocked():
    c.train.nope = 1
  with pytest.raises(config_utils.ConfigError, match="unknown config key 'config.train.nope'"):
    config_utils.validate(c)
  with pytest.raises(config_utils.ConfigError, match="valid: exact, local"):
    config_utils.validate(tiny(**{"engine.reduction": "global"}))
  with pytest.raises(ValueError, match="valid: .*ls"):
    train.build(tiny(**{"combiner.name": "nope"}))
  with pytest.raises(ValueError, match="valid: .*hard"):
    train.build(tiny(**{"model.sharing": "nope"}))
  with pytest.raises(ValueError, match="valid: .*synthetic"):
    train.build(tiny(**{"data.name": "nope"}))
  with pytest.raises(ValueError, match="valid: reg0, reg1, cls0, cls1"):
    train.build(tiny(tasks="reg0,nope"))
  bench, *_ = train.build(tiny(tasks="cls1,reg0"))
  assert [t.name for t in bench.tasks] == ["cls1", "reg0"]


@pytest.mark.parametrize("override,needle", [
    ("--config.combiner.name=nope", "valid: "),
    ("--config.train.nope=1", "valid keys of config.train"),
])
def test_launcher_config_errors_are_one_line(tmp_path, override, needle):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "train.py"),
       "--config=" + os.path.join(ROOT, "configs", "synthetic.py") + ":smoke",
       f"--workdir={tmp_path}", override], env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  err = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(err) == 1, proc.stderr
  assert err[0].startswith("error: ") and needle in err[0]
  assert "Traceback" not in proc.stderr


def test_sparse_sharing_masks_are_closed_over_by_the_spmd_step():
  # The sparse-sharing masks are a constant collection closed over by shard_map; device arrays
  # sharded on the mesh could not be (JAX: "Closing over inputs to shard_map ... Explicit axes").
  c = tiny(**{"model.sharing": "sparse", "combiner.name": "pcgrad"})
  state, hist = train.run_steps(c, 2)
  assert len(hist) == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))
