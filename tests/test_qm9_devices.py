"""QM9's flat padded graph batches on several devices.

A graph batch cannot be cut on its leading axis (edges index nodes, graphs own node ranges), so the
QM9 training loader stacks one self-contained padded sub-batch per local device
(``num_shards``) and the SPMD step drops that axis per device. The step on 4 forced CPU devices must
be the step on one: with full batches every device holds the same number of molecules, so the mean
over devices of the per-device MSEs is the global batch's MSE.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import ls_qm9  # pylint: disable=wrong-import-position
from configs import synthetic  # pylint: disable=wrong-import-position
from mtl_jax import data  # pylint: disable=wrong-import-position
from mtl_jax import train  # pylint: disable=wrong-import-position

DEVICES_SCRIPT = textwrap.dedent("""
  import json, sys
  import jax, numpy as np
  sys.path.insert(0, %(root)r)
  from configs import ls_qm9
  from mtl_jax import train

  assert jax.device_count() == 4, jax.devices()

  def run(devices):
    state, hist = train.run_steps(ls_qm9.get_config("smoke"), 2, devices=devices)
    leaves = jax.tree.leaves(jax.device_get(state.params))
    return (np.concatenate([np.ravel(x) for x in leaves]),
            np.stack([np.asarray(h["losses"]) for h in hist]))

  (p1, l1), (p4, l4) = run(jax.devices()[:1]), run(jax.devices())
  print("RESULT" + json.dumps({
      "params": float(np.max(np.abs(p1 - p4))), "losses": float(np.max(np.abs(l1 - l4))),
      "moved": float(np.max(np.abs(p1))), "finite": bool(np.isfinite(p4).all())}))
""")


@pytest.fixture(scope="module")
def bench():
  return data.get_benchmark(ls_qm9.get_config("smoke"))


def test_same_params_on_1_and_4_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, "-c", DEVICES_SCRIPT % {"root": ROOT}], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][6:])
  assert res["finite"]
  assert res["losses"] < 1e-5, res  # the global batch's per-task MSEs, step by step
  assert res["params"] < 1e-5, res


def test_benchmark_declares_per_device_batches(bench):
  assert bench.per_device_batches
  assert not data.get_benchmark(synthetic.get_config("smoke")).per_device_batches  # the default: batches split on their leading axis


def _molecules(graphs, targets):
  """Per real graph: (sorted node-feature rows, sorted edge rows, target row), comparable across
  batches whatever the padding."""
  out = []
  for g in np.nonzero(graphs["graph_mask"])[0]:
    nodes = np.nonzero(graphs["node_mask"] & (graphs["node_graph"] == g))[0]
    edges = np.nonzero(graphs["edge_mask"] & np.isin(graphs["receivers"], nodes))[0]
    out.append((np.sort(graphs["nodes"][nodes], 0), np.sort(graphs["edges"][edges], 0),
                targets[g]))
  return out


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_stacked_batch_is_the_flat_batch_cut_per_device(bench, shards):
  flat = next(bench.loader("train", 8, 3, True))
  stack = next(bench.loader("train", 8, 3, True, num_shards=shards))
  for leaf in jax.tree.leaves(stack):
    assert leaf.shape[0] == shards
  names = list(flat["targets"])
  y_flat = np.stack([flat["targets"][t] for t in names], 1)
  got = []
  for d in range(shards):
    g = {k: v[d] for k, v in stack["inputs"].items()}
    assert g["graph_mask"].shape == (8 // shards,)
    assert g["graph_mask"].all()  # training batches are full: every device has 8/D molecules
    # self-contained: every real edge joins two real nodes of one graph of this sub-batch
    e = g["edge_mask"]
    assert g["node_mask"][g["senders"][e]].all() and g["node_mask"][g["receivers"][e]].all()
    np.testing.assert_array_equal(g["node_graph"][g["senders"][e]],
                                  g["node_graph"][g["receivers"][e]])
    got += _molecules(g, np.stack([stack["targets"][t][d] for t in names], 1))
  want = _molecules(flat["inputs"], y_flat)
  assert len(got) == len(want) == 8
  for (na, ea, ya), (nb, eb, yb) in zip(got, want):  # the same molecules in the same order
    np.testing.assert_array_equal(na, nb)
    np.testing.assert_array_equal(ea, eb)
    np.testing.assert_array_equal(ya, yb)


def test_one_shard_is_the_flat_batch_with_a_device_axis(bench):
  flat = next(bench.loader("train", 8, 5, True))
  stack = next(bench.loader("train", 8, 5, True, num_shards=1))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b[0]), flat, stack)


def test_overflow_grows_the_capacity_of_the_whole_stack(bench):
  loader = bench.loader("train", 8, 0, True, num_shards=4)
  loader.fetch.capacity.update(nodes=4, edges=4)  # far below any sub-batch of 2 molecules
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    stack = next(loader)
  assert any("doubling" in str(w.message) for w in caught)
  caps = loader.fetch.capacity
  assert stack["inputs"]["nodes"].shape[:2] == (4, caps["nodes"])
  assert stack["inputs"]["edges"].shape[:2] == (4, caps["edges"])
  assert stack["inputs"]["graph_mask"].sum() == 8


@pytest.mark.parametrize("batch_size,shards,processes", [(8, 3, 1), (6, 2, 2), (8, -1, 1)])
def test_uneven_split_is_a_one_line_error(bench, batch_size, shards, processes):
  with pytest.raises(ValueError, match=r"must split evenly") as err:
    bench.loader("train", batch_size, 0, True, 0, processes, num_shards=shards)
  assert "\n" not in str(err.value)


def test_step_rejects_a_batch_without_the_device_axis():
  flat = {"inputs": np.zeros((6, 3)), "targets": {"a": np.zeros((6,))}}
  with pytest.raises(ValueError, match="leading device axis"):
    train._drop_device_axis(flat)
  one = train._drop_device_axis(jax.tree.map(lambda x: x[None], flat))
  assert one["inputs"].shape == (6, 3) and one["targets"]["a"].shape == (6,)


def test_trainer_loader_shards_per_local_device(bench):
  c = ls_qm9.get_config("smoke")
  mesh = train.make_mesh(jax.devices()[:1])
  assert train.local_num_devices(mesh) == 1
  batch = next(train.make_train_loader(bench, c, mesh))
  assert batch["inputs"]["graph_mask"].shape == (1, int(c.train.batch_size))
