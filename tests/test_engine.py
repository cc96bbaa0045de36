"""The engine (mtl_jax.autodiff): modes agree with each other and with the optax transform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mtl_jax import autodiff
from mtl_jax.combiners.base import GRAMIAN, JACOBIAN, LOSSES, EmptyState, Method

K = 3


def _params(seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"trunk": {"w": jax.random.normal(k1, (5, 4))}, "heads": {"w": jax.random.normal(k2, (K, 4))}}


def _mask(tree):
  return {"trunk": {"w": True}, "heads": {"w": False}}


def _encode(p, x):
  return jnp.tanh(x @ p["trunk"]["w"]), None


def _decode(p, z, x):
  out = z @ p["heads"]["w"].T
  return jnp.mean(out**2, 0) * jnp.arange(1.0, K + 1), None


SPLIT = autodiff.SplitLoss(_encode, _decode)


def _loss(p, x):
  losses, _ = SPLIT(p, x)
  return losses, None


def _loss_tapped(p, x):
  """``_loss`` with the trunk as a tappable dense layer (mtl_jax.layers, mtl_jax.taps)."""
  from mtl_jax import layers
  z = jnp.tanh(layers.dot_general(x, p["trunk"]["w"], (((1,), (0,)), ((), ()))))
  return _decode(p, z, x)


def _inv_norm(specific):
  # A nonlinear Gramian weighting (inverse gradient norms), for testing the engine alone.
  return Method("inv", K, GRAMIAN, init=lambda p: EmptyState(),
                weigh=lambda g, l, s: (1 / jnp.sqrt(jnp.diag(g) + 1e-12), s), specific=specific)


def _loss_weighting():
  return Method("lw", K, LOSSES, init=lambda p: EmptyState(), weigh=lambda g, l, s: (1 / l, s))


def _x(seed=1, n=8):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, 5))


@pytest.mark.parametrize("specific", ["weighted", "sum"])
def test_modes_agree_with_each_other_and_with_optax(specific):
  m = _inv_norm(specific)
  params, x = _params(), _x()
  state = m.transform(_mask).init(params)
  ups = {
      mode: autodiff.combine(m, state, SPLIT if mode == "features" else _loss, params, x, mode=mode,
                             shared_mask=_mask).update
      for mode in ("jacobian", "gramian")
  }
  losses, jac, _ = autodiff.task_jacobian(_loss, params, x)
  ref, _ = m.transform(_mask).update(jac, state, params, task_losses=losses)
  for mode, up in ups.items():
    for a, b in zip(jax.tree.leaves(up), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=mode)


def test_features_mode_uses_representation_gramian():
  m = _inv_norm("weighted")
  params, x = _params(), _x()
  state = m.transform(_mask).init(params)
  out = autodiff.combine(m, state, SPLIT, params, x, mode="features", shared_mask=_mask)
  z, _ = _encode(params, x)
  jz = jax.jacrev(lambda zz: _decode(params, zz, x)[0])(z).reshape(K, -1)
  np.testing.assert_allclose(out.gramian, jz @ jz.T, rtol=1e-5)
  w = out.weights
  ref = jax.grad(lambda p: jnp.dot(w, _loss(p, x)[0]))(params)
  for a, b in zip(jax.tree.leaves(out.update), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_losses_mode_is_one_weighted_backward():
  m = _loss_weighting()
  params, x = _params(), _x()
  out = autodiff.combine(m, m.transform().init(params), _loss, params, x)
  assert out.gramian is None
  w = 1 / _loss(params, x)[0]
  ref = jax.grad(lambda p: jnp.dot(w, _loss(p, x)[0]))(params)
  for a, b in zip(jax.tree.leaves(out.update), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_nonfinite_loss_skips_step_and_keeps_state():
  m = _inv_norm("weighted")
  params, x = _params(), _x()
  x = x.at[0, 0].set(jnp.nan)
  state = m.transform(_mask).init(params)
  out = autodiff.combine(m, state, _loss, params, x, shared_mask=_mask)
  assert not bool(out.finite) and int(out.state.skipped) == 1
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(out.update))


def test_mode_errors_are_one_line():
  m = Method("agg", K, JACOBIAN, init=lambda p: EmptyState(),
             aggregate=lambda j, l, s: (j, jnp.ones(K), s))
  with pytest.raises(ValueError, match="valid for it: jacobian"):
    autodiff.combine(m, m.transform().init(_params()), _loss, _params(), _x(), mode="gramian")
  with pytest.raises(ValueError, match="valid: losses, gramian, jacobian, features"):
    autodiff.check_mode(m, "nope")
  with pytest.raises(ValueError, match="SplitLoss"):
    autodiff.combine(_inv_norm("sum"), m.transform().init(_params()), _loss, _params(), _x(),
                     mode="features")


SHARD_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
import sys; sys.path.insert(0, os.getcwd())
from tests.test_engine import _inv_norm, _loss_weighting, _loss, _loss_tapped, SPLIT, _params, _mask, _x
from mtl_jax import autodiff
mesh = jax.make_mesh((4,), ("data",))
params, x = _params(), _x(n=16)
xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data")))
for m in (_inv_norm("sum"), _loss_weighting()):
  state = m.transform(_mask).init(params)
  for mode in ("jacobian", "gramian", "features"):
    fn = SPLIT if mode == "features" else _loss
    ref = autodiff.combine(m, state, fn, params, x, mode=mode, shared_mask=_mask)
    for red in ("exact", "local"):
      step = jax.shard_map(
          lambda p, xb: autodiff.combine(m, state, fn, p, xb, mode=mode, shared_mask=_mask,
                                         axis_name="data", reduction=red).update,
          mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=False)
      got = jax.jit(step)(params, xs)
      err = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(got), jax.tree.leaves(ref.update)))
      print(m.name, mode, red, err)
# layer taps: the trunk's Gramian share from all devices' inputs and output cotangents
m = _inv_norm("sum")
state = m.transform(_mask).init(params)
ref = autodiff.combine(m, state, _loss, params, x, mode="jacobian", shared_mask=_mask)
step = jax.shard_map(
    lambda p, xb: autodiff.combine(m, state, _loss_tapped, p, xb, mode="jacobian",
                                   shared_mask=_mask, axis_name="data", layer_gramian="all")[:4],
    mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=False)
upd, _, _, gram = jax.jit(step)(params, xs)
err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in
          zip(jax.tree.leaves((upd, gram)), jax.tree.leaves((ref.update, ref.gramian))))
print("taps jacobian exact", err)  # relative to each leaf's largest entry
"""


def test_shard_map_exact_reduction_is_the_global_batch_method(tmp_path):
  import subprocess, sys, os
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", SHARD_SCRIPT], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)), env=env, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = [line.split() for line in res.stdout.strip().splitlines()]
  for name, mode, red, err in rows:
    if red == "exact":
      assert float(err) < 1e-5, (name, mode, red, err)
  # Both weightings are nonlinear (in the gradients, in the losses): combining per device and
  # averaging is a different method.
  local = {(n, m): float(e) for n, m, r, e in rows if r == "local"}
  assert all(err > 1e-4 for err in local.values()), local


@pytest.mark.parametrize("mode", ["gramian", "jacobian"])
def test_reused_weights_skip_the_jacobian_and_match_the_transform(mode):
  # Nash-MTL with update_weights_every=2: steps 1, 3 reuse the weights through Method.reuse (no
  # Jacobian); the update must equal the optax transform's, which always has the gradients.
  from mtl_jax import combiners
  m = combiners.method("nash_mtl", K, update_weights_every=2, max_norm=0.5)
  assert m.fresh is not None
  params = _params()
  tx = m.transform(_mask)
  s_engine = s_optax = tx.init(params)
  step = jax.jit(lambda s, x: autodiff.combine(m, s, _loss, params, x, mode=mode, shared_mask=_mask,
                                               gramian_chunk=2))
  for i in range(4):
    x = _x(seed=10 + i)
    out = step(s_engine, x)
    losses, jac, _ = autodiff.task_jacobian(_loss, params, x)
    want, s_optax = tx.update(jac, s_optax, params, task_losses=losses)
    for a, b in zip(jax.tree.leaves(out.update), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    assert bool(jnp.any(out.gramian != 0)) == (i % 2 == 0)  # zeros on reuse steps
    s_engine = out.state
  assert int(s_engine.method.step) == 4


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_streamed_gramian_any_chunk_matches_the_jacobian(chunk):
  params, x = _params(), _x()
  m = _inv_norm("weighted")
  state = m.transform(_mask).init(params)
  g = autodiff.combine(m, state, _loss, params, x, mode="gramian", shared_mask=_mask,
                       gramian_chunk=chunk).gramian
  _, jac, _ = autodiff.task_jacobian(_loss, params, x)
  np.testing.assert_allclose(g, jac["trunk"]["w"].reshape(K, -1) @ jac["trunk"]["w"].reshape(K, -1).T,
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="gramian_chunk"):
    autodiff.combine(m, state, _loss, params, x, mode="gramian", gramian_chunk=0)


def test_nonfinite_gradient_with_finite_losses_is_skipped_in_losses_mode():
  m = _loss_weighting()
  params, x = _params(), _x()

  def loss(p, x):  # finite value, infinite gradient at 0 (sqrt'(0))
    losses, _ = _loss(p, x)
    return losses + jnp.sqrt(jnp.abs(p["trunk"]["w"][0, 0] * 0.0)), None

  out = autodiff.combine(m, m.transform().init(params), loss, params, x)
  assert bool(jnp.all(jnp.isfinite(out.losses)))
  assert not bool(out.finite) and int(out.state.skipped) == 1
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(out.update))


def test_trainer_picks_the_jacobian_mode_when_it_fits_the_budget():
  from mtl_jax import train
  params = {"a": jnp.zeros((1000, 256)), "b": jnp.zeros((256,))}  # 256,256 floats shared: 1 MiB
  mask = {"a": True, "b": False}
  assert train.auto_gramian_mode(4, params, mask, budget_mb=4.0) == "jacobian"
  assert train.auto_gramian_mode(5, params, mask, budget_mb=4.0) == "gramian"


@settings(max_examples=12, deadline=None)
@given(k=st.integers(1, 5), shape=st.lists(st.integers(1, 4), min_size=0, max_size=3),
       seed=st.integers(0, 2**16))
def test_task_minor_gramian_and_weighted_sum_match_the_task_leading_layout(k, shape, seed):
  # The engine's jacobian mode holds a weighting's Jacobian task-minor; the maths must not change.
  from mtl_jax.combiners.base import gramian_of, weighted_sum
  rs = np.random.RandomState(seed)
  jac = {"a": rs.randn(k, *shape).astype(np.float32), "b": rs.randn(k, 3).astype(np.float32)}
  mask = {"a": True, "b": True}
  minor = jax.tree.map(lambda j: jnp.moveaxis(j, 0, -1), jac)
  rows = np.concatenate([jac["a"].reshape(k, -1), jac["b"]], axis=1)
  w = rs.randn(k).astype(np.float32)

  @jax.jit  # one program per example
  def both(jac, minor, w):
    return (gramian_of(minor, mask, task_axis=-1), gramian_of(jac, mask),
            {n: (weighted_sum(w, minor[n], task_axis=-1), weighted_sum(w, jac[n])) for n in jac})

  g_minor, g_major, sums = both(jac, minor, w)
  np.testing.assert_allclose(g_minor, rows @ rows.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_major, rows @ rows.T, rtol=1e-5, atol=1e-5)
  for a, b in sums.values():
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="task_axis must be 0"):
    gramian_of(jac, mask, task_axis=1)
