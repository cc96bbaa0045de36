"""The canonical-layout convolution (mtl_jax.layers) against jax.lax.conv_general_dilated."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax

from mtl_jax import autodiff, combiners, models, sharing, tasks as T, train
from mtl_jax import layers

DN = ("NHWC", "HWIO", "NHWC")


def _pair(fn, x, w, g):
  y, vjp = jax.vjp(fn, x, w)
  return y, vjp(g)


@st.composite
def conv_case(draw):
  k = draw(st.integers(1, 4))
  stride = draw(st.integers(1, 3))
  dil = draw(st.integers(1, 2))
  eff = (k - 1) * dil + 1
  h = draw(st.integers(eff, eff + 6))
  w = draw(st.integers(eff, eff + 6))
  if draw(st.booleans()):
    padding = draw(st.sampled_from(["SAME", "VALID"]))
  else:
    padding = tuple((draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(2))
  return dict(shape=(draw(st.integers(1, 3)), h, w, draw(st.integers(1, 4))),
              kernel=(k, k + draw(st.integers(0, 1)), 0, draw(st.integers(1, 5))),
              strides=(stride, draw(st.integers(1, 3))), dilation=(dil, 1), padding=padding,
              seed=draw(st.integers(0, 2**16)))


@settings(max_examples=15, deadline=None)
@given(conv_case())
def test_forward_and_vjp_match_lax(case):
  r = np.random.default_rng(case["seed"])
  x = jnp.asarray(r.normal(size=case["shape"]), jnp.float32)
  kh, kw, _, co = case["kernel"]
  w = jnp.asarray(r.normal(size=(kh, kw, case["shape"][-1], co)), jnp.float32)
  kwargs = dict(window_strides=case["strides"], padding=case["padding"],
                rhs_dilation=case["dilation"], dimension_numbers=DN, precision="highest")
  try:
    want_y = lax.conv_general_dilated(x, w, **kwargs)
  except (TypeError, ValueError):  # a window larger than the padded input
    return
  if 0 in want_y.shape:
    return
  g = jnp.asarray(r.normal(size=want_y.shape), jnp.float32)
  # one program per example (op by op, each primitive compiled alone)
  want, got = jax.jit(lambda x, w, g: (
      _pair(lambda a, b: lax.conv_general_dilated(a, b, **kwargs), x, w, g),
      _pair(lambda a, b: layers.conv_general_dilated(a, b, **kwargs), x, w, g)))(x, w, g)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_other_layouts_and_groups_fall_back_to_lax():
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(2, 4, 6, 6)), jnp.float32)  # NCHW
  w = jnp.asarray(r.normal(size=(6, 2, 3, 3)), jnp.float32)  # OIHW, 2 groups
  kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"),
                feature_group_count=2)
  f = lambda a, b: layers.conv_general_dilated(a, b, **kwargs)
  assert "custom_vjp" not in str(jax.make_jaxpr(f)(x, w))
  np.testing.assert_allclose(f(x, w), lax.conv_general_dilated(x, w, **kwargs), rtol=1e-5)
  nhwc = jnp.transpose(x, (0, 2, 3, 1))
  assert "custom_vjp" in str(jax.make_jaxpr(lambda a, b: layers.conv_general_dilated(
      a, b, (1, 1), "SAME", dimension_numbers=DN))(nhwc[..., :2], jnp.transpose(w, (2, 3, 1, 0))))


def test_forward_mode_context_allows_jvp_and_vmapped_vjp_matches():
  r = np.random.default_rng(1)
  x = jnp.asarray(r.normal(size=(2, 5, 5, 3)), jnp.float32)
  w = jnp.asarray(r.normal(size=(3, 3, 3, 4)), jnp.float32)
  f = lambda a, b: layers.conv_general_dilated(a, b, (2, 2), "SAME", dimension_numbers=DN)
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(f, (x, w), (x, w))
  with layers.tracing(forward_mode=True):
    _, tangent = jax.jvp(f, (x, w), (x, w))
  ref = lambda a, b: lax.conv_general_dilated(a, b, (2, 2), "SAME", dimension_numbers=DN)
  np.testing.assert_allclose(tangent, jax.jvp(ref, (x, w), (x, w))[1], rtol=1e-4, atol=1e-4)
  # K cotangents at once (the engine's jacobian mode) and one per scan step (its gramian mode)
  gs = jnp.asarray(r.normal(size=(3,) + f(x, w).shape), jnp.float32)
  _, vjp = jax.vjp(f, x, w)
  _, vjp_ref = jax.vjp(ref, x, w)
  want = jax.vmap(vjp_ref)(gs)
  for got in (jax.vmap(vjp)(gs), jax.lax.scan(lambda c, g: (c, vjp(g)), None, gs)[1]):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_flax_conv_keeps_parameter_names_and_values():
  x = jnp.ones((1, 6, 6, 3))
  mk = lambda cls: cls(4, (3, 3), strides=2, padding=1)
  a = mk(nn.Conv).init(jax.random.key(0), x)
  b = mk(layers.Conv).init(jax.random.key(0), x)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  np.testing.assert_array_equal(a["params"]["kernel"], b["params"]["kernel"])
  np.testing.assert_allclose(mk(layers.Conv).apply(b, x), mk(nn.Conv).apply(a, x), rtol=1e-5)


def test_gramian_mode_on_a_cnn_equals_jacobian_mode():
  """The gramian mode takes its JVPs from a forward-mode linearisation with plain convolutions and
  its VJPs with the canonical ones: the Gramian and the update agree with the held Jacobian's."""
  backbone = models.get("celeba_cnn", width=0.0625, image_size=8)
  tasks = [T.binary_task(f"t{k}") for k in range(3)]
  model = sharing.get("hard", backbone, tasks)
  variables = jax.jit(model.init)(jax.random.key(0), backbone.sample_input())
  params, bs = variables["params"], variables["batch_stats"]
  r = np.random.default_rng(0)
  batch = {"inputs": jnp.asarray(r.random((4, 8, 8, 3)), jnp.float32),
           "targets": {t.name: jnp.asarray(r.random(4) > 0.5, jnp.float32) for t in tasks}}
  loss_fn = train.make_loss_fn(model, tasks, False, {})
  mask = model.shared_mask(params)
  m = combiners.method("mgda", 3)
  state = m.transform(mask).init(params)

  def run(mode):  # the jacobian mode with the Jacobian held whole (no layer taps)
    out = autodiff.combine(m, state, loss_fn, params, bs, batch, jax.random.key(0), mode=mode,
                           shared_mask=mask, layer_gramian="off")
    return out.gramian, out.update

  g_gram, u_gram = jax.jit(lambda: run("gramian"))()
  g_jac, u_jac = jax.jit(lambda: run("jacobian"))()
  np.testing.assert_allclose(g_gram, g_jac, rtol=1e-4, atol=1e-6)
  # MGDA's iterative simplex solve amplifies the float32 round-off of G (as in the contract test)
  for a, b in zip(jax.tree.leaves(u_gram), jax.tree.leaves(u_jac)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
