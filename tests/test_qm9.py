"""QM9 pipeline: unit conversions by hand, featurisation of a qm9pack slice, cache, splits,
standardisation, padded batches consumed by the MPNN, determinism and resume."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from mtl_jax.data import qm9
from mtl_jax.data import qm9_features as F

LIMIT = 120  # molecules of the qm9pack slice (a second to featurise)
H2EV = 27.211386246


def _config(tmp, **data):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.tasks = "all"
  c.data = ml_collections.ConfigDict(dict(
      name="qm9", mock=False, data_dir="", source="qm9pack", feature_set="pyg", graph="complete",
      split_seed=0, num_validation=10_000, num_test=10_000, limit=LIMIT, train_limit=0,
      eval_limit=0, cache_dir=str(tmp), mock_size=96))
  c.data.update(data)
  c.model = ml_collections.ConfigDict(dict(width=8))
  return c


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("qm9cache")


@pytest.fixture(scope="module")
def bench(cache_dir):
  return qm9.get_benchmark(_config(cache_dir))


@pytest.fixture(scope="module")
def cache(cache_dir, bench):
  del bench  # built it
  return F.load_or_build("qm9pack", cache_dir=str(cache_dir), limit=LIMIT)


# ------------------------------------------------------------------------- units, by hand

def test_atomization_methane_and_water_by_hand():
  # QM9 molecule 1 (CH4): U0 = -40.47893 Ha; molecule 3 (H2O): U0 = -76.404702 Ha.
  # Atomic references (QM9 paper): H -0.500273, C -37.846772, O -75.064579 Ha.
  ch4 = -40.47893 - (4 * -0.500273 + -37.846772)  # = -0.631066 Ha
  h2o = -76.404702 - (2 * -0.500273 + -75.064579)  # = -0.339577 Ha
  assert ch4 == pytest.approx(-0.631066, abs=1e-9)
  assert h2o == pytest.approx(-0.339577, abs=1e-9)
  assert F.atomization_energy(-40.47893, ["C", "H", "H", "H", "H"]) == pytest.approx(ch4)
  assert F.atomization_energy(-76.404702, ["O", "H", "H"]) == pytest.approx(h2o)
  # In meV: -17172.18 meV (PyG's U0_atom of methane is -17.1722 eV).
  assert ch4 * H2EV * 1000 == pytest.approx(-17172.18, abs=0.01)
  with pytest.raises(ValueError, match="valid: U0, U, H, G"):
    F.atomization_energy(-1.0, ["H"], kind="E")


def test_convert_targets_methane_water_from_qm9pack():
  rec = F.read_qm9pack(limit=3)
  assert rec["index"].tolist() == [1, 2, 3]
  assert rec["symbols"][0] == ["C", "H", "H", "H", "H"] and rec["symbols"][2] == ["O", "H", "H"]
  counts = np.array([[4, 1, 0, 0, 0], [3, 0, 1, 0, 0], [2, 0, 0, 1, 0]])
  y = F.convert_targets(rec["raw"], counts)
  col = {t: k for k, t in enumerate(F.TARGETS)}
  # methane: homo -0.3877 Ha, lumo 0.1171 Ha, zpve 0.044749 Ha, mu 0 D, alpha 13.21, Cv 6.469
  assert y[0, col["homo"]] == pytest.approx(-0.3877 * H2EV * 1000)
  assert y[0, col["lumo"]] == pytest.approx(0.1171 * H2EV * 1000)
  assert y[0, col["zpve"]] == pytest.approx(0.044749 * H2EV * 1000)
  assert y[0, col["U0"]] == pytest.approx(-0.631066 * H2EV * 1000, abs=1e-3)
  assert (y[0, col["mu"]], y[0, col["alpha"]], y[0, col["Cv"]]) == (0.0, 13.21, 6.469)
  assert y[0, col["r2"]] == pytest.approx(35.3641)
  # water: U0 / U / H / G minus the O + 2 H references of the same temperature
  tot = {"U0": -76.404702, "U": -76.401867, "H": -76.400922, "G": -76.422349}
  for kind, e in tot.items():
    ref = F.ATOM_REF_HARTREE[kind]
    assert y[2, col[kind]] == pytest.approx((e - ref["O"] - 2 * ref["H"]) * H2EV * 1000, abs=1e-3)
  assert set(F.UNITS[t] for t in ("homo", "lumo", "zpve", "U0", "U", "H", "G")) == {"meV"}


# --------------------------------------------------------------------------- featurising

def test_features_of_methane_and_water(cache):
  x = F.node_features(cache, "pyg")
  assert x.shape == (len(cache["z"]), 11) and x.dtype == np.float32
  c = x[0]  # methane's carbon: one-hot C, Z = 6, no aromatic/hybridisation in PyG's set, 4 H
  np.testing.assert_array_equal(c, [0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 4])
  full = F.node_features(cache, "full")
  np.testing.assert_array_equal(full[0], [0, 1, 0, 0, 0, 6, 0, 0, 0, 1, 4])  # sp3
  o = cache["node_offsets"][2]  # water's oxygen
  np.testing.assert_array_equal(x[o], [0, 0, 0, 1, 0, 8, 0, 0, 0, 0, 2])
  assert np.all(x[:, 6:10] == 0)  # PyG's sanitize=False columns
  assert np.diff(cache["bond_offsets"])[:3].tolist() == [4, 3, 2]
  with pytest.raises(ValueError, match="valid: pyg, full"):
    F.node_features(cache, "chem")


def test_bond_types_and_one_hot_sum(cache):
  pyg, full = F.bond_types(cache, "pyg"), F.bond_types(cache, "full")
  assert pyg.max() <= 2  # PyG's SDF: Kekule orders only
  arom = cache["bond_aromatic"]
  assert arom.any(), "the slice should hold an aromatic ring (e.g. furan)"
  assert np.all(full[arom] == 3) and np.all(full[~arom] == pyg[~arom])
  assert set(np.unique(pyg[arom])) <= {0, 1}
  # valence check on SMILES-perceived molecules: bond orders sum to 4 on C, 3 on N, 2 on O
  z = cache["z"]
  for m in np.nonzero(cache["perception"] == 0)[0][:40]:
    n0, b0, b1 = cache["node_offsets"][m], cache["bond_offsets"][m], cache["bond_offsets"][m + 1]
    val = np.zeros(np.diff(cache["node_offsets"])[m])
    for (i, j), t in zip(cache["bonds"][b0:b1], pyg[b0:b1]):
      val[i] += t + 1
      val[j] += t + 1
    want = np.array([{1: 1, 6: 4, 7: 3, 8: 2, 9: 1}[int(a)] for a in z[n0:n0 + len(val)]])
    np.testing.assert_array_equal(val, want, err_msg=f"molecule {m}")


def test_cache_is_reused(cache, cache_dir, monkeypatch):
  """Needs the `cache` fixture (which builds the file): under pytest-xdist this test may be the
  first of its module on a worker."""
  del cache
  path = F.cache_path(str(cache_dir), "qm9pack", LIMIT)
  assert os.path.exists(path)
  monkeypatch.setattr(F, "featurise", lambda *a, **k: pytest.fail("cache not reused"))
  again = F.load_or_build("qm9pack", cache_dir=str(cache_dir), limit=LIMIT)
  assert len(again["index"]) == LIMIT


# ----------------------------------------------------------------------- splits, targets

def test_splits_and_standardisation(bench, cache):
  assert [t.name for t in bench.tasks] == list(F.TARGETS)
  s = bench.split_sizes
  assert s == {"test": LIMIT // 12, "validation": LIMIT // 12, "train": LIMIT - 2 * (LIMIT // 12)}
  sp = bench.info["splits"]
  allidx = np.concatenate([sp["train"], sp["validation"], sp["test"]])
  assert len(np.unique(allidx)) == LIMIT
  full = qm9.split_indices(130_831, 0)  # the protocol's sizes, computed without loading
  assert {k: len(v) for k, v in full.items()} == {"test": 10_000, "validation": 10_000,
                                                  "train": 110_831}
  np.testing.assert_array_equal(qm9.split_indices(500, 3)["test"], qm9.split_indices(500, 3)["test"])
  y = cache["targets"][sp["train"]]
  np.testing.assert_allclose(list(bench.info["mean"].values()), y.mean(0), rtol=1e-6)
  np.testing.assert_allclose(list(bench.info["std"].values()), y.std(0, ddof=1), rtol=1e-6)
  assert bench.reference == {t: {"mae": v} for t, v in qm9.REFERENCE_MAE.items()}


def test_mae_in_original_units(bench, cache):
  """Predicting the training mean (0 in standardised units) gives MAE = mean |y - mean|."""
  ld = bench.loader("validation", 8, shuffle=False)
  sums = {t.name: {"abs_err": 0.0, "count": 0.0} for t in bench.tasks}
  for b in ld.epoch():
    for t in bench.tasks:
      st = t.metrics[0].stats(np.zeros(8, np.float32), b["targets"][t.name])
      for k in st:
        sums[t.name][k] += float(st[k])
  yv = cache["targets"][bench.info["splits"]["validation"]]
  for k, t in enumerate(bench.tasks):
    want = np.abs(yv[:, k] - bench.info["mean"][t.name]).mean()
    assert t.metrics[0].result(sums[t.name]) == pytest.approx(want, rel=1e-4)
    assert not t.metrics[0].higher_is_better


# ----------------------------------------------------------------------------- batches

def test_batch_format_complete_graph(bench, cache):
  from mtl_jax.models.mpnn import GRAPH_KEYS
  ld = bench.loader("train", 6, seed=1)
  b = next(ld)
  g = b["inputs"]
  assert set(g) == set(GRAPH_KEYS)
  assert g["nodes"].shape[1] == 11 and g["edges"].shape[1] == 5 and g["graph_mask"].shape == (6,)
  assert g["senders"].dtype == np.int32 and g["node_mask"].dtype == bool
  mols = bench.info["splits"]["train"][ld.indices(0)]
  n = np.diff(cache["node_offsets"])[mols]
  assert g["node_mask"].sum() == n.sum() and g["edge_mask"].sum() == (n * (n - 1)).sum()
  e = g["edges"][g["edge_mask"]]
  assert e[:, :4].sum() == 2 * np.diff(cache["bond_offsets"])[mols].sum()  # bonds, both ways
  pos = np.concatenate([cache["pos"][cache["node_offsets"][m]:cache["node_offsets"][m + 1]]
                        for m in mols])
  s, r = g["senders"][g["edge_mask"]], g["receivers"][g["edge_mask"]]
  np.testing.assert_allclose(e[:, 4], np.linalg.norm(pos[s] - pos[r], axis=-1), rtol=1e-5)
  assert np.all(g["node_graph"][g["node_mask"]] == np.repeat(np.arange(6), n))
  assert all(v.shape == (6,) and v.dtype == np.float32 for v in b["targets"].values())
  # capacities are fixed per loader: every batch has the same shapes (one jit compilation)
  shapes = {k: v.shape for k, v in g.items()}
  for _ in range(3):
    assert {k: v.shape for k, v in next(ld)["inputs"].items()} == shapes


def test_bond_graph_and_short_eval_batch(cache_dir):
  bench = qm9.get_benchmark(_config(cache_dir, graph="bonds"))
  ld = bench.loader("test", 4, shuffle=False)
  assert ld.batches_per_epoch == 3  # 10 test molecules: 4 + 4 + 2
  last = list(ld.epoch())[-1]
  assert last["inputs"]["graph_mask"].tolist() == [True, True, False, False]
  assert all(np.isnan(v[2:]).all() and np.isfinite(v[:2]).all() for v in last["targets"].values())
  e = last["inputs"]["edges"][last["inputs"]["edge_mask"]]
  assert np.all(e[:, :4].sum(1) == 1)  # only bonds, each one bond type


def test_mpnn_consumes_batches(bench):
  b = next(bench.loader("train", 4, seed=0))
  enc, read = [f() for f in bench.backbone.stages]
  g = b["inputs"]
  key = jax.random.PRNGKey(0)
  p1 = enc.init(key, g, train=False)
  h = enc.apply(p1, g, train=False)
  p2 = read.init(key, h, train=False)
  out = read.apply(p2, h, train=False)
  assert out.shape == (4, 8) and np.all(np.isfinite(out))
  head = bench.tasks[0].head()
  pred = head.apply(head.init(key, out), out)
  assert pred.shape == (4,)
  loss = bench.tasks[0].loss(pred, b["targets"]["mu"])
  assert np.isfinite(loss)


def test_determinism_and_resume(bench):
  a = bench.loader("train", 6, seed=3)
  first = [next(a) for _ in range(5)]
  b = bench.loader("train", 6, seed=3)
  for x in first:
    y = next(b)
    for k in x["inputs"]:
      np.testing.assert_array_equal(x["inputs"][k], y["inputs"][k])
  resumed = bench.loader("train", 6, seed=3, position=3)
  np.testing.assert_array_equal(next(resumed)["inputs"]["nodes"], first[3]["inputs"]["nodes"])
  other = next(bench.loader("train", 6, seed=4))
  assert not np.array_equal(other["targets"]["mu"], first[0]["targets"]["mu"])


def test_mock_and_bad_input(cache_dir):
  c = _config(cache_dir, mock=True)
  c.tasks = "U0,homo"
  bench = qm9.get_benchmark(c)
  assert [t.name for t in bench.tasks] == ["U0", "homo"] and bench.info["source"] == "mock"
  assert sum(bench.split_sizes.values()) == 96
  b = next(bench.loader("train", 8))
  assert set(b["targets"]) == {"U0", "homo"}
  bad = {"tasks": "gap", "graph": "knn", "feature_set": "chem", "source": "web"}
  for key, value in bad.items():
    c = _config(cache_dir)
    if key == "tasks":
      c.tasks = value
    else:
      c.data[key] = value
    with pytest.raises(ValueError, match="valid:"):
      qm9.get_benchmark(c)
  with pytest.raises(ValueError, match="valid: train, validation, test"):
    qm9.get_benchmark(_config(cache_dir, mock=True)).loader("val", 8)


def test_tfds_not_prepared_message(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build qm9"):
    F.read_tfds(data_dir=str(tmp_path), limit=1)


def test_configs_variants():
  from mtl_jax.configs import ls_qm9, nash_qm9
  for mod in (nash_qm9, ls_qm9):
    full, smoke, quick = (mod.get_config(v) for v in ("", "smoke", "quick"))
    assert full.train.batch_size == 120 and full.train.num_epochs == 300
    assert full.model.width == 64 and full.optimizer.learning_rate == 1e-3
    assert smoke.data.mock and not quick.data.mock and quick.data.source == "qm9pack"
    with pytest.raises(ValueError, match="valid:"):
      mod.get_config("fast")
