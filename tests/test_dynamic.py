"""Dynamic sharing structure in the trainer (issue 17.5): config.structure validation, an affinity
run that splits (synthetic and QM9 smoke), resume across a split after a crash with the
uninterrupted run's params_checksum, conflict with restart = a fixed run of the chosen tree."""

import json
import os

import jax
import numpy as np
import pytest

from mtl_jax import config_utils, train
from mtl_jax.configs import nash_qm9, synthetic
from mtl_jax.structure import affinity as A, dynamic


def _syn(**structure):
  c = synthetic.get_config("smoke")
  c.data.batch_norm = True  # batch statistics are split with the parameters
  c.train.num_steps = 10
  c.train.checkpoint_every = 2
  c.train.eval_every = 5
  for k, v in structure.items():
    c.structure[k] = v
  return c


@pytest.mark.parametrize("change, needle", [
    (dict(method="grow"), "valid: none, fixed, affinity, conflict, learn_to_branch"),
    (dict(method="affinity", window=9, warmup_steps=4), "window must be in 1..warmup_steps"),
    (dict(method="fixed"), "needs config.structure.tree"),
    (dict(method="affinity", split_steps=(5,), warmup_steps=4, window=2), "at least window"),
    (dict(method="conflict", split_steps=(9,)), "split_steps is for method 'affinity'"),
    (dict(method="fixed", tree=((0, 1, 2, 3),), restart=True), "restart is for methods"),
    (dict(method="affinity", budget=1.5), "budget is a fraction"),
    (dict(method="affinity", choose="greedy"), "valid: auto, exhaustive, agglomerative"),
    (dict(method="affinity", affinity="tag"), "valid: cosine, lookahead"),
    (dict(method="conflict", affinity="lookahead"), "'lookahead' is for method 'affinity'"),
])
def test_structure_config_errors_are_one_line(change, needle):
  c = _syn(**change)
  with pytest.raises(config_utils.ConfigError, match=needle) as e:
    config_utils.validate(c)
  assert "\n" not in str(e.value)


def test_structure_needs_a_branchable_sharing():
  c = _syn(method="affinity")
  c.model.sharing = "mtan"
  with pytest.raises(config_utils.ConfigError, match="must be hard or branched, got 'mtan'"):
    config_utils.validate(c)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def test_affinity_splits_and_resumes_across_the_split_exactly(tmp_path, monkeypatch):
  """Uninterrupted vs crashed twice (inside the measuring window, then after the split) and
  resumed: the same trees and the same final params_checksum."""
  cfg = lambda: _syn(method="affinity", warmup_steps=4, window=3)
  ref = train.fit(cfg(), str(tmp_path / "ref"))
  st = ref["structure"]
  assert st["method"] == "affinity" and set(st["trees"]) == {"0", "4"}
  assert st["trees"]["0"] == [[[0, 1, 2, 3]], [[0, 1, 2, 3]]]
  split = st["splits"][-1]
  assert split["split"] and split["window_steps"] == 3 and st["tree"] == st["trees"]["4"]
  assert len(split["affinity"]) == 2 and len(split["affinity"][0]) == 4  # (S, K, K) cosines
  assert split["affinity"] == split["cosine"] and "lookahead" not in split
  assert ref["num_params"] == split["num_params"] > st["splits"][0]["num_params"]
  logged = [r["structure"] for r in _records(tmp_path / "ref") if "structure" in r]
  assert [r["step"] for r in logged] == [0, 4] and logged[-1]["tree"] == st["tree"]
  assert os.listdir(tmp_path / "ref" / "tensorboard")

  save = train._save
  for crash_at in (2, 6):  # step 2: the window's sums are in the checkpoint; 6: after the split
    def crashing(run, p, out, crash_at=crash_at):
      save(run, p, out)
      if run.step >= crash_at:
        raise KeyboardInterrupt(f"simulated crash at step {run.step}")
    monkeypatch.setattr(train, "_save", crashing)
    with pytest.raises(KeyboardInterrupt):
      train.fit(cfg(), str(tmp_path / "crashed"))
  monkeypatch.setattr(train, "_save", save)
  res = train.fit(cfg(), str(tmp_path / "crashed"))
  assert res["structure"]["trees"] == st["trees"]
  assert res["params_checksum"] == ref["params_checksum"]


def test_lookahead_measuring_step_is_tags_affinity_and_chooses_the_tree():
  """The trainer's measuring step with affinity='lookahead' (one compiled step, no fit): its
  ``lookahead`` metric is TAG's Z at the step's parameters (the reference: stage_affinity on the
  same batch and dropout key), the window keeps it across a checkpoint (JSON) and decide reads
  its normalised mean."""
  c = _syn(method="affinity", warmup_steps=4, window=3, affinity="lookahead")
  p = train.build_program(c)
  batch = next(p.loader)
  params, bs, key = jax.device_get((p.state.params, p.state.batch_stats, p.state.rng))  # before
  # the step donates them
  _, m = p.measure_fn(p.state, train.shard_batch(batch, p.mesh))
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key), 0), 0)  # step 0,
  # device 0: the step's dropout key
  ref = A.stage_affinity(p.model, {"params": params, "batch_stats": bs}, p.bench.tasks, [batch],
                         lookahead_lr=c.optimizer.learning_rate, rng=rng)
  np.testing.assert_allclose(m["lookahead"], ref.lookahead, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(m["stage_gramians"], ref.gramian, rtol=1e-4, atol=1e-7)
  w = dynamic.Window(0.0)
  w.add(m["stage_gramians"], m["lookahead"])
  w = dynamic.Window.from_json(json.loads(json.dumps(w.to_json())), 0.0)
  rec = dynamic.decide(c.structure, w, p.tree, [1.0, 1.0], 4, ["a", "b", "c", "d"])
  np.testing.assert_allclose(rec["lookahead"], m["lookahead"], rtol=1e-6)
  np.testing.assert_allclose(rec["affinity"], A.normalised_lookahead(m["lookahead"]), rtol=1e-6)
  assert rec["cosine"] != rec["affinity"] and rec["tree"] != [[[0, 1, 2, 3]]] * 2


def test_conflict_restart_is_a_fixed_run_of_the_chosen_tree(tmp_path):
  """PCGrad needs a Gramian over shared parameters: with top_k = every stage (both conflict here)
  the tree keeps stage 0 shared (a share-nothing tree crashed the Gramian step)."""
  c = _syn(method="conflict", warmup_steps=3, window=3, top_k=2, restart=True)
  c.data.batch_norm = False
  c.combiner.name = "pcgrad"
  out = train.fit(c, str(tmp_path / "recon"))
  tree = out["structure"]["tree"]
  assert out["step"] == 13 and out["structure"]["restart_step"] == 3
  rec = out["structure"]["splits"][-1]
  assert rec["share"] and min(rec["conflict"]) > 0  # stage 0 would have been chosen
  assert tree == [[[0, 1, 2, 3]], [[0], [1], [2], [3]]]
  f = _syn(method="fixed", tree=tuple(tuple(tuple(g) for g in s) for s in tree))
  f.data.batch_norm = False
  f.combiner.name = "pcgrad"
  fixed = train.fit(f, str(tmp_path / "fixed"))
  assert fixed["params_checksum"] == out["params_checksum"]


# The smoke twin of the done-when command (nash_qm9.py:smoke, method=affinity: one split
# at step 2, the tree changed) is the README's own command: tests/test_readme.py::test_structure_blocks.


def test_learn_to_branch_searches_then_trains_the_found_tree(tmp_path):
  c = _syn(method="learn_to_branch", warmup_steps=6)
  c.data.batch_norm = False
  out = train.fit(c, str(tmp_path / "ltb"))
  rec = out["structure"]["splits"][0]
  assert out["structure"]["method"] == "learn_to_branch" and rec["search_steps"] == 6
  assert out["structure"]["tree"] == rec["tree"] and out["num_params"] == rec["num_params"]
  assert set(rec["probabilities"]) == {"branch_1", "branch_heads"}
