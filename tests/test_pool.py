"""The elementwise-backward max pool (mtl_jax.models.pool) against flax.linen.max_pool."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import example, given, settings, strategies as st

from mtl_jax import layers
from mtl_jax.models import pool


@st.composite
def pool_case(draw):
  kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
  return dict(shape=(draw(st.integers(1, 3)), draw(st.integers(kh, 3 * kh + 2)),
                     draw(st.integers(kw, 3 * kw + 2)), draw(st.integers(1, 4))),
              window=(kh, kw), ties=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _input(case):
  key = jax.random.key(case["seed"])
  if case["ties"]:  # few distinct values: most windows hold several maxima (as after a ReLU)
    return jnp.floor(3 * jax.random.uniform(key, case["shape"])) - 1.0
  return jax.random.normal(key, case["shape"])


@settings(max_examples=4, deadline=None)
@given(pool_case())
@example(dict(shape=(2, 5, 7, 3), window=(2, 2), ties=True, seed=1))  # the CNNs' pool; cropped
@example(dict(shape=(1, 6, 8, 2), window=(3, 2), ties=True, seed=2))
def test_value_and_gradients_are_bit_identical_to_flax_including_ties_and_cropped_edges(case):
  """Tiling windows (VALID, stride == window) with edges VALID drops: same value, same vmapped VJP
  (the engine's K-task Jacobian; the first maximum of a window in row-major order gets the
  gradient, as select-and-scatter). Each example compiles anew (one program: op by op it was
  ~4x slower): few examples, small shapes."""
  x, win = _input(case), case["window"]
  ref = lambda x: nn.max_pool(x, win, strides=win)
  new = lambda x: pool.max_pool(x, win, strides=win)
  shape = jax.eval_shape(ref, x).shape
  cts = jax.random.normal(jax.random.key(case["seed"] + 1), (3,) + shape)

  @jax.jit
  def both(x, cts):
    (y_ref, vjp_ref), (y_new, vjp_new) = jax.vjp(ref, x), jax.vjp(new, x)
    return y_ref, y_new, jax.vmap(vjp_ref)(cts)[0], jax.vmap(vjp_new)(cts)[0]

  y_ref, y_new, g_ref, g_new = both(x, cts)
  np.testing.assert_array_equal(y_new, y_ref)
  np.testing.assert_array_equal(g_new, g_ref)


def test_the_backward_pass_has_no_scatter_and_other_pools_fall_back_to_flax():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  grad = jax.grad(lambda x: jnp.sum(pool.max_pool(x, (2, 2), strides=(2, 2)) ** 2))
  hlo = jax.jit(grad).lower(x).as_text()
  assert "select_and_scatter" not in hlo and "scatter" not in hlo
  # overlapping windows and padding: flax's own pooling (and its gradient), unchanged
  for kwargs in (dict(window_shape=(3, 3), strides=(2, 2)),
                 dict(window_shape=(2, 2), strides=(2, 2), padding=((1, 1), (1, 1)))):
    flax_kwargs = dict(kwargs)
    np.testing.assert_array_equal(pool.max_pool(x, **kwargs), nn.max_pool(x, **flax_kwargs))
    g_new = jax.grad(lambda x: jnp.sum(pool.max_pool(x, **kwargs) ** 2))(x)
    g_ref = jax.grad(lambda x: jnp.sum(nn.max_pool(x, **flax_kwargs) ** 2))(x)
    np.testing.assert_array_equal(g_new, g_ref)


def test_forward_mode_matches_flax_inside_and_outside_conv_forward_mode():
  """The engine's gramian mode linearises under ``layers.tracing(forward_mode=True)``; the pool's
  custom_jvp serves forward and reverse mode alike, with ties."""
  x = jnp.floor(3 * jax.random.uniform(jax.random.key(1), (2, 4, 6, 3)))
  t = jax.random.normal(jax.random.key(2), x.shape)
  f = lambda x: pool.max_pool(x, (2, 2), strides=(2, 2))
  y_ref, dy_ref = jax.jvp(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), (x,), (t,))
  for forward in (False, True):
    if forward:
      with layers.tracing(forward_mode=True):
        y, dy = jax.jvp(f, (x,), (t,))
    else:
      y, dy = jax.jvp(f, (x,), (t,))
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dy, dy_ref)
