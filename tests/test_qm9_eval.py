"""QM9 evaluation path: the reported MAE is the MAE of the model over the same molecules.

Regression tests for the ``ls_qm9.py:quick`` report (test MAE of size-dependent targets worse than
predicting the mean while the training loss fell): ``eval_limit`` kept the N *smallest indices* of
the sorted test split, and QM9 is ordered by molecule size, so the quick run was evaluated on the
smallest molecules only. The MPNN's fast path (edge network computed once for all passes) is
checked against the per-pass formulation.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import evaluation
from mtl_jax import train as T
from mtl_jax.data import qm9
from mtl_jax.models import mpnn

from mtl_jax.configs import ls_qm9


def _smoke(**overrides):
  c = ls_qm9.get_config("smoke")
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


# ------------------------------------------------------------------------------- subsets

def test_eval_limit_is_a_random_subset_not_the_smallest_indices():
  full = qm9.split_indices(130_831, 0)
  lim = qm9.split_indices(130_831, 0, train_limit=5000, eval_limit=1000)
  assert {k: len(v) for k, v in lim.items()} == {"test": 1000, "validation": 1000, "train": 5000}
  for k in lim:
    assert np.all(np.diff(lim[k]) > 0)  # sorted, distinct
    assert np.isin(lim[k], full[k]).all()  # a subset of its split
    # QM9's indices grow with molecule size: a representative subset spans them. The N smallest
    # indices of a 10,000 split end near index 13,000 (median ~6,500) against a median ~65,000.
    assert abs(np.median(lim[k]) - np.median(full[k])) < 0.05 * 130_831
  # the first N of the permuted split: nested as N grows, and deterministic
  small = qm9.split_indices(130_831, 0, eval_limit=100)["test"]
  assert np.isin(small, lim["test"]).all()
  np.testing.assert_array_equal(small, qm9.split_indices(130_831, 0, eval_limit=100)["test"])
  with pytest.raises(ValueError, match="train_limit / eval_limit must be >= 0"):
    qm9.split_indices(1000, 0, eval_limit=-1)


def test_eval_limit_subset_has_the_split_target_distribution():
  """Targets that grow with the index (as QM9's extensive targets do) keep their mean."""
  y = np.arange(130_831, dtype=np.float64)
  full = qm9.split_indices(130_831, 0)["test"]
  sub = qm9.split_indices(130_831, 0, eval_limit=1000)["test"]
  assert abs(y[sub].mean() - y[full].mean()) < 4 * y[full].std() / np.sqrt(1000)


# ------------------------------------------------------- evaluation MAE == direct numpy MAE

@pytest.fixture(scope="module")
def built():
  # 96 fabricated molecules: 8 test molecules in eval batches of 3 (a padded last batch)
  c = _smoke(**{"train.eval_batch_size": 3})
  bench, model, _, _ = T.build(c)
  sample = bench.loader("train", 8, 0, False).fetch(np.arange(8))["inputs"]
  variables = model.init(jax.random.key(3), sample)
  return c, bench, model, variables


def test_evaluate_equals_numpy_mae_over_single_molecules(built):
  c, bench, model, variables = built
  names = [t.name for t in bench.tasks]
  ids = bench.info["splits"]["test"]
  assert len(ids) % 3 != 0  # the last evaluation batch is padded
  res = evaluation.evaluate(T.eval_apply(model), variables,
                            bench.loader("test", 3, 0, False), bench.tasks)
  # direct: each molecule alone in its own batch, de-standardised with the training mean/std and
  # compared with the raw targets of the cache
  cache = qm9.load_cache(c)
  raw = np.asarray(cache["targets"], np.float64)[ids]
  mean = np.array([bench.info["mean"][t] for t in names])
  std = np.array([bench.info["std"][t] for t in names])
  store = qm9.GraphStore(cache, "pyg", c.data.graph)
  apply = jax.jit(T.eval_apply(model))
  preds = []
  for m in ids:
    g = mpnn.pad_graphs([store.molecule(int(m))], 16, 128, max_graphs=1)
    out = apply(variables, g)
    preds.append([float(out[t][0]) for t in names])
  direct = np.abs(np.asarray(preds) * std + mean - raw).mean(0)
  got = np.array([res[t]["mae"] for t in names])
  np.testing.assert_allclose(got, direct, rtol=2e-4)


def test_predicting_the_training_mean_gives_the_mean_absolute_deviation(built):
  c, bench, model, variables = built
  names = [t.name for t in bench.tasks]
  zero = jax.tree.map(jnp.zeros_like, variables)  # outputs exactly 0 = the training mean
  res = evaluation.evaluate(T.eval_apply(model), zero, bench.loader("validation", 3, 0, False),
                            bench.tasks)
  cache = qm9.load_cache(c)
  raw = np.asarray(cache["targets"], np.float64)[bench.info["splits"]["validation"]]
  mean = np.array([bench.info["mean"][t] for t in names])
  np.testing.assert_allclose([res[t]["mae"] for t in names], np.abs(raw - mean).mean(0),
                             rtol=1e-5)


def test_train_mae_after_fitting_a_tiny_slice_is_small():
  """16 training molecules, 120 full-batch steps: the train-set MAE (through the evaluation path)
  falls far below the MAE of predicting the mean, for every target."""
  c = _smoke(**{"data.train_limit": 16, "train.batch_size": 16, "train.num_steps": 120,
                "model.width": 16, "optimizer.learning_rate": 3e-3})
  state, history = T.run_steps(c, 120)
  assert np.all(np.isfinite(history[-1]["losses"]))
  bench, model, _, _ = T.build(c)
  variables = T._variables(jax.device_get(state.params), jax.device_get(state.batch_stats), {})
  res = evaluation.evaluate(T.eval_apply(model), variables, bench.loader("train", 8, 0, False),
                            bench.tasks)
  names = [t.name for t in bench.tasks]
  raw = np.asarray(qm9.load_cache(c)["targets"], np.float64)[bench.info["splits"]["train"]]
  baseline = np.abs(raw - raw.mean(0)).mean(0)
  ratio = np.array([res[t]["mae"] for t in names]) / baseline
  assert np.all(ratio < 0.5), dict(zip(names, ratio.round(3)))


# ------------------------------------------------------------- MPNN: edge network hoisted

def _per_pass_reference(params, g, num_passes):
  """The MPNN encoder written literally, recomputing Theta(e) in every pass (PyG's NNConv)."""
  p = params
  dense = lambda q, v: v @ q["kernel"] + q["bias"]
  nmask = g["node_mask"].astype(jnp.float32)[:, None]
  x = jax.nn.relu(dense(p["embed"], g["nodes"])) * nmask
  h = x
  gru = nn_gru_reference(p["gru"])
  for _ in range(num_passes):
    theta = dense(p["conv"]["edge_fc2"], jax.nn.relu(dense(p["conv"]["edge_fc1"], g["edges"])))
    theta = theta.reshape(len(g["edges"]), x.shape[1], -1)
    msg = jnp.einsum("ed,edf->ef", x[g["senders"]], theta) * g["edge_mask"][:, None]
    tot = jax.ops.segment_sum(msg, g["receivers"], num_segments=x.shape[0])
    cnt = jax.ops.segment_sum(g["edge_mask"].astype(jnp.float32), g["receivers"],
                              num_segments=x.shape[0])
    m = jax.nn.relu(tot / jnp.maximum(cnt, 1.0)[:, None] + dense(p["conv"]["root"], x))
    h = gru(h, m) * nmask
    x = h
  return x


def nn_gru_reference(p):
  """flax ``GRUCell`` (PyTorch's GRU equations): r, z gates; n = tanh(W_in x + b + r (W_hn h))."""
  def dense(q, v, bias=True):
    return v @ q["kernel"] + (q["bias"] if bias else 0.0)

  def cell(h, x):
    r = jax.nn.sigmoid(dense(p["ir"], x) + dense(p["hr"], h, False))
    z = jax.nn.sigmoid(dense(p["iz"], x) + dense(p["hz"], h, False))
    n = jnp.tanh(dense(p["in"], x) + r * dense(p["hn"], h))
    return (1.0 - z) * n + z * h
  return cell


def test_mpnn_encoder_matches_the_per_pass_formulation_and_its_gradients():
  bb = mpnn.mpnn(width=1 / 8, edge_hidden=16)
  enc = bb.stages[0]()
  g = bb.sample_input()
  v = enc.init(jax.random.key(0), g, False)
  out = enc.apply(v, g, False)["nodes"]
  ref = _per_pass_reference(v["params"], g, 3)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  w = jax.random.normal(jax.random.key(1), out.shape)
  ga = jax.grad(lambda p: jnp.sum(enc.apply({"params": p}, g, False)["nodes"] * w))(v["params"])
  gb = jax.grad(lambda p: jnp.sum(_per_pass_reference(p, g, 3) * w))(v["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ga, gb)
  with pytest.raises(ValueError, match="expected in_features=8"):
    mpnn.NNConv(8).init(jax.random.key(0), jnp.zeros((6, 4)), g)
