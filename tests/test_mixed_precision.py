"""Mixed precision (``config.model.dtype='bfloat16'``): the backbones compute in bfloat16 with
float32 parameters, the layer taps keep working under the cast, the combiners get float32
Gramians, and a bf16 run's losses track the float32 run's."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import autodiff, combiners, config_utils, layers, models, sharing, taps
from mtl_jax import tasks as T
from mtl_jax import train
from mtl_jax.configs import synthetic

K = 3
BF16 = jnp.dtype("bfloat16")


def _products(jaxpr):
  """The dtypes of every dot_general / convolution operand, nested jaxprs included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      out.append((eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars)))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out.extend(_products(inner))
  return out


def _cnn(dtype):
  backbone = models.get("celeba_cnn", width=0.0625, image_size=8)
  tasks = [T.binary_task(f"t{k}") for k in range(K)]
  model = dataclasses.replace(sharing.get("hard", backbone, tasks), compute_dtype=dtype)
  variables = jax.jit(model.init)(jax.random.key(0), backbone.sample_input())
  r = np.random.default_rng(0)
  batch = {"inputs": jnp.asarray(r.random((4, 8, 8, 3)), jnp.float32),
           "targets": {t.name: jnp.asarray(r.random(4) > 0.5, jnp.float32) for t in tasks}}
  return model, tasks, variables, batch


@pytest.mark.parametrize("name,opts", [("celeba_cnn", {"width": 0.0625, "image_size": 8}),
                                       ("mpnn", {"width": 8}), ("lenet", {})])
def test_backbones_compute_in_bfloat16_with_float32_params(name, opts):
  backbone = models.get(name, **opts)
  tasks = [T.regression_task(f"t{k}") for k in range(2)] if name == "mpnn" else [
      T.binary_task(f"t{k}") for k in range(2)]
  model = dataclasses.replace(sharing.get("hard", backbone, tasks), compute_dtype="bfloat16")
  x = backbone.sample_input()
  variables = jax.eval_shape(lambda r: model.init(r, x), jax.random.key(0))
  assert {l.dtype for l in jax.tree.leaves(variables["params"])} == {jnp.dtype("float32")}
  closed = jax.make_jaxpr(lambda v: model.apply(v, x, train=True))(variables)
  prods = _products(closed.jaxpr)
  assert prods and all(set(d) == {"bfloat16"} for _, d in prods), prods
  preds, _ = jax.eval_shape(lambda v: model.apply(v, x, train=True), variables)
  assert {l.dtype for l in jax.tree.leaves(preds)} == {jnp.dtype("float32")}


@pytest.fixture(scope="module")
def cnn_engine():
  """The exact Nash-MTL engine step on a tiny CelebA CNN, bf16 and f32, with and without taps."""
  out = {}
  for dtype in ("float32", "bfloat16"):
    model, tasks, variables, batch = _cnn(dtype)
    params, bs = variables["params"], variables["batch_stats"]
    loss_fn = train.make_loss_fn(model, tasks, False, {})
    mask = model.shared_mask(params)
    m = combiners.method("mgda", K)
    state = m.transform(mask).init(params)
    args = (bs, batch, jax.random.key(0))
    plan = taps.plan(loss_fn, params, args, mask, K, select="all")
    run = lambda lg: autodiff.combine(m, state, loss_fn, params, *args, mode="jacobian",
                                      shared_mask=mask, layer_gramian=lg)
    out[dtype] = (plan, jax.jit(lambda: (run("all"), run("off")))())
  return out


def test_taps_work_under_the_bfloat16_cast_and_gramians_are_float32(cnn_engine):
  plan32, _ = cnn_engine["float32"]
  plan16, (tapped, held) = cnn_engine["bfloat16"]
  # the same layers are tapped under the cast (before cast_floating: none were)
  assert plan16 is not None and [s.leaf for s in plan16.sites] == [s.leaf for s in plan32.sites]
  assert len(plan16.sites) >= 4
  for out in (tapped, held):
    assert out.gramian.dtype == jnp.float32 and bool(out.finite)
    assert {u.dtype for u in jax.tree.leaves(out.update)} == {jnp.dtype("float32")}
  # tapped (float32 from bf16 inputs and cotangents) vs held bf16 rows: bf16 rounding apart
  g = np.asarray(held.gramian)
  np.testing.assert_allclose(tapped.gramian, g, rtol=5e-2, atol=5e-2 * np.abs(g).max())
  # and near the float32 one: batch norm over 4 examples amplifies bf16's 3 digits (measured 0.2)
  g32 = np.asarray(cnn_engine["float32"][1][1].gramian)
  assert np.linalg.norm(g - g32) < 0.3 * np.linalg.norm(g32)


def test_bfloat16_run_tracks_the_float32_run():
  """5 steps of Nash-MTL (jacobian mode, batch norm) on the synthetic smoke benchmark: every bf16
  loss within 5% (relative, + 0.02 absolute) of the float32 run's at the same step."""
  hist = {}
  for dtype in ("float32", "bfloat16"):
    c = synthetic.get_config("smoke")
    c.combiner.name = "nash_mtl"
    c.engine.mode = "jacobian"
    c.data.batch_norm = True
    c.model.dtype = dtype
    _, h = train.run_steps(c, 5)
    hist[dtype] = np.stack([np.asarray(m["losses"]) for m in h])
  assert np.all(np.isfinite(hist["bfloat16"]))
  np.testing.assert_allclose(hist["bfloat16"], hist["float32"], rtol=0.05, atol=0.02)


def test_unknown_dtype_is_one_line():
  c = synthetic.get_config("smoke")
  c.model.dtype = "float16"
  with pytest.raises(config_utils.ConfigError, match="valid: float32, bfloat16"):
    train.build(c)
  with pytest.raises(ValueError, match="valid: float32, bfloat16"):
    layers.compute_dtype("fp8")
