"""Layer taps (mtl_jax.taps): a layer's Gramian share and update from its inputs and output
cotangents equal the ones of the per-task kernel gradients; the engine taps only what it may."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mtl_jax import autodiff, combiners, layers, taps


def _direct(op, x, w, g):
  """Per-task kernel gradients of ``op(x, w)`` for the K cotangents ``g``: Gramian, rows."""
  _, pull = jax.vjp(lambda kernel: op(x, kernel), w)
  rows = jax.vmap(lambda c: pull(c)[0])(g).reshape(g.shape[0], -1)
  return rows @ rows.T, rows


def _site(kind, x, w, y, meta=()):
  return taps.Site(0, 0, kind, meta, x.shape, y.shape, w.shape, y.dtype)


@settings(max_examples=4, deadline=None)
@given(kh=st.integers(1, 3), kw=st.integers(1, 3), stride=st.integers(1, 2),
       dil=st.integers(1, 2), padding=st.sampled_from(["SAME", "VALID", "EXPLICIT"]),
       k=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_conv_site_gramian_and_update_match_the_task_gradients(kh, kw, stride, dil, padding, k,
                                                                seed):
  rs = np.random.RandomState(seed)
  x = jnp.asarray(rs.randn(2, 7, 6, 3), jnp.float32)
  w = jnp.asarray(rs.randn(kh, kw, 3, 4), jnp.float32)
  pad = ((1, 0), (2, 1)) if padding == "EXPLICIT" else padding
  seen = []

  class Rec(taps._Recorder):
    def visit(self, kind, meta, op, xx, ww):
      seen.append((meta, op))
      return op(xx, ww)

  def conv_of(xx, ww):
    return layers.conv_general_dilated(xx, ww, (stride, stride), pad, rhs_dilation=(dil, dil),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))

  with layers.tracing(recorder=Rec([w])):
    y = conv_of(x, w)
  ((meta, op),) = seen
  g = jnp.asarray(rs.randn(k, *y.shape), jnp.float32)
  wts = jnp.asarray(rs.rand(k), jnp.float32)
  site = _site("conv", x, w, y, meta)

  @jax.jit  # one program per example (op by op it compiled every primitive)
  def compare(x, w, g, wts):
    want, rows = _direct(op, x, w, g)
    upd = taps.site_update(x, w, op, jnp.tensordot(wts, g, axes=1))
    return want, rows, taps.site_gramian(site, x, g), upd

  want, rows, got, upd = compare(x, w, g, wts)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))
  np.testing.assert_allclose(upd.reshape(-1), wts @ rows, rtol=1e-4, atol=1e-4)


@settings(max_examples=5, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), k=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_dense_site_gramian_matches_the_task_gradients(lead, k, seed):
  rs = np.random.RandomState(seed)
  x = jnp.asarray(rs.randn(*lead, 5), jnp.float32)
  w = jnp.asarray(rs.randn(5, 3), jnp.float32)
  op = functools.partial(layers._dot, dimension_numbers=(((x.ndim - 1,), (0,)), ((), ())))
  y = op(x, w)
  g = jnp.asarray(rs.randn(k, *y.shape), jnp.float32)
  want, _ = _direct(op, x, w, g)
  np.testing.assert_allclose(taps.site_gramian(_site("dense", x, w, y), x, g), want, rtol=1e-4,
                             atol=1e-5)


class _Net(nn.Module):
  """conv -> relu -> global pool -> dense (shared) -> K heads; ``reuse`` applies the dense twice."""

  k: int = 3
  reuse: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.relu(layers.Conv(6, (3, 3), padding="SAME")(x)).mean((1, 2))
    dense = layers.Dense(6)
    h = jnp.tanh(dense(h))
    if self.reuse:
      h = jnp.tanh(dense(h))
    return nn.Dense(self.k, name="heads")(h)


def _problem(k=3, reuse=False, penalty=0.0):
  net = _Net(k, reuse)
  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 2))
  y = jax.random.normal(jax.random.key(1), (4, k))
  params = net.init(jax.random.key(2), x)["params"]

  def loss_fn(p, xb, yb):
    out = net.apply({"params": p}, xb)
    losses = jnp.mean((out - yb) ** 2, 0) * jnp.arange(1.0, k + 1)
    if penalty:  # the shared dense kernel read a second time, outside its layer
      losses = losses + penalty * jnp.sum(p["Dense_0"]["kernel"] ** 2)
    return losses, None

  mask = jax.tree_util.tree_map_with_path(lambda path, _: "heads" not in str(path), params)
  return loss_fn, params, (x, y), mask


def _kernels(params, the_plan):
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sorted(jax.tree_util.keystr(leaves[s.leaf][0]) for s in the_plan.sites)


def test_plan_taps_shared_layers_used_once_only():
  loss_fn, params, args, mask = _problem()
  p = taps.plan(loss_fn, params, args, mask, 3, select="all")
  assert _kernels(params, p) == ["['Conv_0']['kernel']", "['Dense_0']['kernel']"]
  # the heads are task-specific: never tapped, whatever the selection
  loss_fn, params, args, mask = _problem(reuse=True)
  p = taps.plan(loss_fn, params, args, mask, 3, select="all")
  assert _kernels(params, p) == ["['Conv_0']['kernel']"]  # the dense kernel is read twice
  loss_fn, params, args, mask = _problem(penalty=0.1)
  p = taps.plan(loss_fn, params, args, mask, 3, select="all")
  assert _kernels(params, p) == ["['Conv_0']['kernel']"]  # read again by the penalty
  # 'auto' follows the cost model: the dense layer's 4 rows are tapped, the convolution's 100
  # output positions (D C = 108) are not
  loss_fn, params, args, mask = _problem()
  assert _kernels(params, taps.plan(loss_fn, params, args, mask, 3)) == ["['Dense_0']['kernel']"]
  assert taps.plan(loss_fn, params, args, mask, 3, devices=8) is None  # 32 rows over 8 devices
  with pytest.raises(ValueError, match="auto, all"):
    taps.plan(loss_fn, params, args, mask, 3, select="some")


def test_cost_model_prefers_taps_for_few_rows_of_a_large_layer():
  site = taps.Site(0, 0, "conv", ((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)), (16, 4, 4, 512),
                   (16, 4, 4, 512), (3, 3, 512, 512), jnp.float32)
  tapped, rows = taps.site_costs(site, 40)
  assert tapped < rows / 10  # the CelebA CNN's last convolution at 32x32, batch 16
  big = site._replace(x_shape=(256, 16, 16, 64), y_shape=(256, 16, 16, 64),
                      w_shape=(3, 3, 64, 64))
  tapped, rows = taps.site_costs(big, 40)
  assert tapped > rows


@pytest.mark.parametrize("name,kwargs,reuse", [
    ("nash_mtl", {}, False), ("upgrad", {}, True), ("nash_mtl", {"update_weights_every": 2}, False)])
def test_engine_with_taps_equals_the_engine_without(name, kwargs, reuse):
  # reuse: the dense kernel is read twice, so only the convolution is tapped
  loss_fn, params, args, mask = _problem(reuse=reuse)
  m = combiners.method(name, 3, **kwargs)
  state = m.transform(mask).init(params)
  step = jax.jit(lambda s, lg: autodiff.combine(m, s, loss_fn, params, *args, mode="jacobian",
                                                shared_mask=mask, layer_gramian=lg),
                 static_argnums=1)
  for _ in range(2):
    a, b = step(state, "all"), step(state, "off")
    np.testing.assert_allclose(a.gramian, b.gramian, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a.weights, b.weights, rtol=1e-3, atol=1e-6)
    for u, v in zip(jax.tree.leaves(a.update), jax.tree.leaves(b.update)):
      # MGDA's and UPGrad's solvers pass the Gramian's rounding differences on to the weights
      np.testing.assert_allclose(u, v, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(v))))
    state = b.state


def test_engine_taps_degenerate_inputs():
  # a zero cotangent at every tap (zero losses) and a NaN input: the step is skipped alike
  loss_fn, params, (x, y), mask = _problem()
  zero_loss = lambda p, xb, yb: (0.0 * loss_fn(p, xb, yb)[0], None)
  m = combiners.method("nash_mtl", 3)
  state = m.transform(mask).init(params)
  for fn, xb in ((zero_loss, x), (loss_fn, x.at[0, 0, 0, 0].set(jnp.nan))):
    step = jax.jit(lambda xx, lg, fn=fn: autodiff.combine(
        m, state, fn, params, xx, y, mode="jacobian", shared_mask=mask, layer_gramian=lg),
                   static_argnums=1)
    a, b = step(xb, "all"), step(xb, "off")
    assert bool(a.finite) == bool(b.finite)
    for u, v in zip(jax.tree.leaves(a.update), jax.tree.leaves(b.update)):
      np.testing.assert_allclose(u, v, atol=1e-7)
  with pytest.raises(ValueError, match="auto, all, off"):
    autodiff.combine(m, state, loss_fn, params, x, y, mode="jacobian", layer_gramian="on")


# an aggregator (the K-leading Jacobian path): the plain sum of the shared rows
_SUM_OF_ROWS = combiners.base.Method(
    "agg", 3, combiners.JACOBIAN, init=lambda p: combiners.base.EmptyState(),
    aggregate=lambda j, l, s: (jax.tree.map(lambda r: None if r is None else r.sum(0), j,
                                            is_leaf=lambda r: r is None), jnp.ones(3), s))


@pytest.fixture(scope="module")
def grouped_steps():
  """One jitted program: the jacobian mode with per-group Gramians, tapped, held and aggregated."""
  loss_fn, params, args, mask = _problem()
  groups = {"conv": "Conv_0", "dense": "Dense_0"}

  def all_steps():
    outs = {}
    for name, lg in (("nash_mtl", "all"), ("nash_mtl", "off"), ("agg", "auto")):
      m = _SUM_OF_ROWS if name == "agg" else combiners.method(name, 3)
      state = m.transform(mask).init(params)
      outs[name, lg] = autodiff.combine(m, state, loss_fn, params, *args, mode="jacobian",
                                        shared_mask=mask, layer_gramian=lg, gramian_groups=groups)
    return outs

  return jax.jit(all_steps)(), (loss_fn, params, args, mask)


def test_group_gramians_sum_to_the_gramian_and_match_jacrev(grouped_steps):
  outs, (loss_fn, params, args, mask) = grouped_steps
  for (name, lg), out in outs.items():
    assert set(out.group_gramians) == {"conv", "dense"}
    total = out.group_gramians["conv"] + out.group_gramians["dense"]
    np.testing.assert_allclose(total, out.gramian, rtol=1e-5, atol=1e-6, err_msg=str((name, lg)))
    for group, top in (("conv", "Conv_0"), ("dense", "Dense_0")):
      sub = params[top]
      jac = jax.jacrev(lambda q: loss_fn({**params, top: q}, *args)[0])(sub)
      rows = np.concatenate([np.asarray(j).reshape(3, -1) for j in jax.tree.leaves(jac)], 1)
      np.testing.assert_allclose(out.group_gramians[group], rows @ rows.T, rtol=1e-4,
                                 atol=1e-5 * np.abs(rows @ rows.T).max(), err_msg=str((name, lg)))


def test_group_gramian_errors_are_one_line():
  loss_fn, params, args, mask = _problem()
  m = combiners.method("nash_mtl", 3)
  state = m.transform(mask).init(params)
  run = lambda **kw: autodiff.combine(m, state, loss_fn, params, *args, shared_mask=mask, **kw)
  with pytest.raises(ValueError, match="needs engine mode 'jacobian'"):
    run(mode="gramian", gramian_groups={"a": "Conv_0"})
  with pytest.raises(ValueError, match="matches no shared parameter"):
    run(mode="jacobian", gramian_groups={"a": "heads"})  # the heads are task-specific
  with pytest.raises(ValueError, match="both hold"):
    run(mode="jacobian", gramian_groups={"a": "Conv_0", "b": "Conv_0/kernel"})
