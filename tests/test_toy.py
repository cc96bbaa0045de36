"""The Nash-MTL toy: losses against the formulas, and a short run of launch/toy.py."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference(x1, x2, scale=0.1):
  lower = 5e-6
  f1 = np.log(max(abs(0.5 * (-x1 - 7) - np.tanh(-x2)), lower)) + 6
  f2 = np.log(max(abs(0.5 * (-x1 + 3) + np.tanh(-x2) + 2), lower)) + 6
  c1 = max(np.tanh(0.5 * x2), 0)
  c2 = max(np.tanh(-0.5 * x2), 0)
  f1_sq = ((-x1 + 7)**2 + 0.1 * (-x2 - 8)**2) / 10 - 20
  f2_sq = ((-x1 - 7)**2 + 0.1 * (-x2 - 8)**2) / 10 - 20
  return np.array([scale * (c1 * f1 + c2 * f1_sq), c1 * f2 + c2 * f2_sq])


def test_losses_match_formulas():
  rng = np.random.default_rng(0)
  pts = list(toy.STARTS) + [tuple(p) for p in rng.uniform(-10, 10, size=(20, 2))] + [(-7.0, 0.0)]
  # all points in one compiled call (eager op-by-op dispatch per point was most of the time)
  got = jax.jit(jax.vmap(toy.losses))(jnp.asarray(pts, jnp.float32))
  for (x1, x2), row in zip(pts, np.asarray(got)):
    np.testing.assert_allclose(row, reference(x1, x2), rtol=1e-5, atol=1e-5)


def test_pareto_grid_and_membership():
  front, ls = toy.pareto_front_grid(161)
  assert front[:, 0].min() >= -7.2 and front[:, 0].max() <= 7.2
  assert np.all((front[:, 1] > -8.6) & (front[:, 1] < -7.9))
  # no grid point of the front dominates another
  for i in range(0, len(ls), max(1, len(ls) // 20)):
    dom = np.all(ls <= ls[i], axis=1) & np.any(ls < ls[i], axis=1)
    assert not dom.any()
  assert toy.in_pareto_set((0.0, -8.3)) and not toy.in_pareto_set((9.0, 9.0))


def test_launch_toy_short(tmp_path):
  spec = importlib.util.spec_from_file_location("launch_toy", os.path.join(ROOT, "launch", "toy.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  res = mod.main(["--methods=ls,mgda", f"--out={tmp_path}", "--steps=20", "--grid=81"])
  assert set(res) == {"ls", "mgda"}
  data = json.load(open(tmp_path / "toy.json"))
  runs = data["results"]["mgda"]["runs"]
  assert len(runs) == 5 and all(np.all(np.isfinite(r["end"])) for r in runs)
  # 20 Adam steps of lr 1e-3 move each coordinate by at most ~0.02
  for r in runs:
    assert np.max(np.abs(np.array(r["end"]) - np.array(r["start"]))) <= 0.021
  assert (tmp_path / "toy.png").exists()


def test_toy_figure_axes_are_labelled():
  spec = importlib.util.spec_from_file_location("launch_toy", os.path.join(ROOT, "launch", "toy.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  traj = np.zeros((3, len(toy.STARTS), 2))  # (T, starts, 2): the figure only, no run
  front, _ = toy.pareto_front_grid(41)
  fig = mod.figure({"ls": traj, "mgda": traj + 1}, front)
  try:
    panels = fig.get_axes()
    assert [ax.get_title() for ax in panels] == ["ls", "mgda"]
    for ax in panels:
      assert ax.get_xlabel().startswith("x1") and ax.get_ylabel() == "x2"
  finally:
    import matplotlib.pyplot as plt
    plt.close(fig)
