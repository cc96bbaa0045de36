"""The loss-based weightings (si, rlw, dwa, uw, gradnorm, famo, gls, stch) against their papers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtl_jax import autodiff
from mtl_jax import combiners
from mtl_jax.combiners import base

MINE = ("si", "rlw", "dwa", "uw", "gradnorm", "famo", "gls", "stch")
SETTINGS = settings(max_examples=15, deadline=None)


def _problem(seed, k, p=5):
  """Positive losses ``L(theta) = exp(A theta + b)`` and a random theta."""
  a, b, theta = _random_problem(seed, k, p)
  return (lambda t: jnp.exp(a @ t + b)), theta


def _random_problem(seed, k, p=5):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(k, p)) * 0.5, jnp.float32),
          jnp.asarray(rng.normal(size=(k,)), jnp.float32),
          jnp.asarray(rng.normal(size=(p,)), jnp.float32))


def _update(tx, state, loss, theta):
  """One transform step on the params tree ``{'t': theta}``."""
  grads = {"t": jax.jacrev(loss)(theta)}
  upd, state = jax.jit(tx.update)(grads, state, {"t": theta}, task_losses=loss(theta))
  return upd["t"], state


def _step(m, state, losses, gram=None):
  return jax.jit(m.weigh)(gram, jnp.asarray(losses, jnp.float32), state)


# ----------------------------------------------------------------------------------------------
# SI, GLS, STCH: the update is the gradient of the transformed objective.


def _objective(name, k, mu=None):
  if name == "si":
    return lambda l: jnp.sum(jnp.log(l))
  if name == "gls":
    return lambda l: jnp.prod(l) ** (1.0 / k)
  if name == "stch":
    return lambda l: k * mu * jax.scipy.special.logsumexp(jnp.log(l) / mu)
  raise ValueError(name)


@functools.lru_cache(maxsize=None)
def _gradient_check(name, k, **hp):
  """A jitted ``(a, b, theta) -> (transform update, gradient of the method's objective)``.

  The losses are ``exp(A theta + b)``; compiled once per (method, K, hyper-parameters).
  """
  tx = combiners.get(name, k, **hp)
  objective = _objective(name, k, **hp)

  @jax.jit
  def check(a, b, theta):
    loss = lambda t: jnp.exp(a @ t + b)
    grads = {"t": jax.jacrev(loss)(theta)}
    upd, _ = tx.update(grads, tx.init({"t": theta}), {"t": theta}, task_losses=loss(theta))
    return upd["t"], jax.grad(lambda t: objective(loss(t)))(theta)

  return check


@SETTINGS
@given(seed=st.integers(0, 10_000), k=st.sampled_from([1, 2, 5]))
def test_si_update_is_gradient_of_sum_log_losses(seed, k):
  upd, ref = _gradient_check("si", k)(*_random_problem(seed, k))
  np.testing.assert_allclose(upd, ref, rtol=2e-4, atol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 10_000), k=st.sampled_from([1, 2, 5]))
def test_gls_update_is_gradient_of_geometric_mean(seed, k):
  upd, ref = _gradient_check("gls", k)(*_random_problem(seed, k))
  np.testing.assert_allclose(upd, ref, rtol=2e-4, atol=1e-5)


def test_gls_is_finite_where_the_literal_product_underflows():
  m = combiners.method("gls", 40)
  w, _ = _step(m, m.init(None), jnp.full((40,), 1e-3))
  # prod = 1e-120 underflows float32, the log-space root does not: w_k = 1e-3 / (40 * 1e-3).
  np.testing.assert_allclose(w, np.full(40, 1 / 40), rtol=1e-4)


@SETTINGS
@given(seed=st.integers(0, 10_000), k=st.sampled_from([1, 3]), mu=st.sampled_from([0.1, 2.0]))
def test_stch_update_is_gradient_of_smooth_tchebycheff(seed, k, mu):
  upd, ref = _gradient_check("stch", k, mu=mu)(*_random_problem(seed, k))
  np.testing.assert_allclose(upd, ref, rtol=5e-4, atol=1e-5)


def test_stch_approaches_max_weighting_as_mu_goes_to_zero():
  losses = jnp.array([1.0, 3.0, 2.0])
  spread = []
  for mu in (1.0, 0.1, 1e-3):
    m = combiners.method("stch", 3, mu=mu)
    w, _ = _step(m, m.init(None), losses)
    # w_k L_k is the weight on d log L_k: K softmax(log L / mu) -> K one-hot(argmax L).
    share = np.asarray(w * losses) / 3
    spread.append(share[1])
  assert spread[0] < spread[1] < spread[2]
  np.testing.assert_allclose(share, [0, 1, 0], atol=1e-6)


def test_stch_warmup_is_log_loss_then_uses_averaged_nadir():
  m = combiners.method("stch", 2, mu=0.5, warmup_steps=3, nadir_steps=2)
  hist = jnp.array([[4.0, 1.0], [2.0, 1.0], [1.0, 3.0], [1.0, 1.0]])
  state = m.init(None)
  for t in range(3):
    w, state = _step(m, state, hist[t])
    np.testing.assert_allclose(w, 1.0 / hist[t], rtol=1e-6)
  nadir = (hist[1] + hist[2]) / 2
  np.testing.assert_allclose(state.nadir, nadir, rtol=1e-6)
  w, state = _step(m, state, hist[3])
  u = jnp.log(hist[3] / nadir)
  ref = 2 * jax.nn.softmax(u / 0.5) / hist[3]
  np.testing.assert_allclose(w, ref, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# RLW.


def test_rlw_weights_positive_sum_to_one_fresh_each_step_and_seeded():
  def run(seed, n=4):
    m = combiners.method("rlw", 5, seed=seed)
    state, out = m.init(None), []
    for _ in range(n):
      w, state = _step(m, state, jnp.ones(5))
      out.append(np.asarray(w))
    return np.stack(out)

  a, b, c = run(0), run(0), run(1)
  assert np.all(a > 0)
  np.testing.assert_allclose(a.sum(1), 1.0, rtol=1e-6)
  assert not np.allclose(a[0], a[1])
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_rlw_weights_are_softmax_of_standard_normal():
  m = combiners.method("rlw", 3, seed=7)
  w, _ = _step(m, m.init(None), jnp.ones(3))
  _, sub = jax.random.split(jax.random.PRNGKey(7))
  np.testing.assert_allclose(w, jax.nn.softmax(jax.random.normal(sub, (3,))), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# DWA.


def test_dwa_weights_equal_formula_on_crafted_history():
  k, window, temp = 3, 2, 2.0
  m = combiners.method("dwa", k, iteration_window=window, temp=temp)
  hist = np.array([[1.0, 2.0, 4.0], [1.0, 2.0, 2.0], [0.9, 1.0, 3.0], [0.5, 1.0, 1.0],
                   [0.5, 2.0, 1.0]], np.float32)
  state = m.init(None)
  for t in range(2 * window - 1):  # not two full windows yet: weights 1 (the paper's first epochs)
    w, state = _step(m, state, hist[t])
    np.testing.assert_allclose(w, np.ones(k))
  for t in range(2 * window - 1, len(hist)):
    w, state = _step(m, state, hist[t])
    seen = hist[t - 2 * window + 1:t + 1]
    ratio = seen[window:].mean(0) / seen[:window].mean(0)
    ref = k * np.exp(ratio / temp) / np.exp(ratio / temp).sum()
    np.testing.assert_allclose(w, ref, rtol=1e-5)
    assert abs(float(w.sum()) - k) < 1e-4


def test_dwa_gives_more_weight_to_the_slower_task():
  m = combiners.method("dwa", 2, iteration_window=3)
  state = m.init(None)
  for t in range(10):
    w, state = _step(m, state, [0.5 ** t, 0.99 ** t])
  assert w[1] > w[0]


# ----------------------------------------------------------------------------------------------
# UW.


def test_uw_weights_converge_to_one_over_two_sigma_squared_optimum():
  losses = jnp.array([0.5, 2.0, 8.0])
  m = combiners.method("uw", 3)

  def body(state, _):
    w, state = m.weigh(None, losses, state)
    return state, w

  state, ws = jax.jit(lambda s: jax.lax.scan(body, s, None, length=3000))(m.init(None))
  # At fixed losses the optimum of 0.5 (exp(-s) L + s) is exp(s) = sigma^2 = L: w = 1 / (2 L).
  np.testing.assert_allclose(ws[-1], 1.0 / (2.0 * losses), rtol=0.03)
  np.testing.assert_allclose(jnp.exp(state.logsigma), losses, rtol=0.03)
  np.testing.assert_allclose(ws[0], 0.5)  # exp(-0) / 2 at the start


def test_uw_update_is_the_likelihood_gradient():
  loss, theta = _problem(3, 3)
  tx = combiners.uw(num_tasks=3)
  state = tx.init({"t": theta})
  _, state = _update(tx, state, loss, theta)
  upd, state = _update(tx, state, loss, theta)  # the second step weighs with s_1 != 0
  s = jnp.asarray(state.method.logsigma)
  # s_1: the log-variances after one internal Adam step from s_0 = 0 at the same losses.
  m = combiners.method("uw", 3)
  _, st1 = m.weigh(None, loss(theta), m.init(None))
  ref = jax.grad(lambda t: jnp.sum(0.5 * (jnp.exp(-st1.logsigma) * loss(t) + st1.logsigma)))(theta)
  np.testing.assert_allclose(upd, ref, rtol=1e-5, atol=1e-6)
  assert not np.allclose(s, st1.logsigma)


# ----------------------------------------------------------------------------------------------
# GradNorm.


def _gradnorm_run(losses_fn, norms, steps=400, alpha=1.5):
  m = combiners.method("gradnorm", len(norms), alpha=alpha)
  gram = jnp.diag(jnp.asarray(norms, jnp.float32) ** 2)

  def body(state, t):
    w, state = m.weigh(gram, losses_fn(t), state)
    return state, w

  state, ws = jax.jit(lambda s: jax.lax.scan(body, s, jnp.arange(steps)))(m.init(None))
  return state, ws


def test_gradnorm_equalises_weighted_gradient_norms():
  norms = np.array([1.0, 10.0])
  state, ws = _gradnorm_run(lambda t: jnp.array([1.0, 1.0]), norms)
  np.testing.assert_allclose(ws[0], [1.0, 1.0])
  g = np.asarray(ws[-20:]).mean(0) * norms
  assert abs(g[0] / g[1] - 1.0) < 0.1, g
  np.testing.assert_allclose(np.asarray(ws).sum(1), 2.0, rtol=1e-5)
  assert np.all(np.asarray(ws) > 0)


def test_gradnorm_targets_follow_inverse_training_rate():
  # Equal gradient norms; task 0's loss stays, task 1's halves: r = (4/3, 2/3), so the weighted
  # norms must settle at the ratio r0^alpha / r1^alpha = 2^1.5.
  losses = lambda t: jnp.where(t == 0, jnp.array([1.0, 1.0]), jnp.array([1.0, 0.5]))
  state, ws = _gradnorm_run(losses, np.array([3.0, 3.0]))
  w = np.asarray(ws[-20:]).mean(0)
  np.testing.assert_allclose(w[0] / w[1], 2 ** 1.5, rtol=0.1)
  np.testing.assert_allclose(state.initial_losses, [1.0, 1.0])


def test_gradnorm_through_the_transform_uses_shared_gradient_norms():
  k = 2
  tx = combiners.gradnorm(num_tasks=k, shared_mask={"shared": True, "head": False})
  params = {"shared": jnp.zeros(3), "head": jnp.zeros(2)}
  grads = {"shared": jnp.array([[1.0, 0, 0], [0, 10.0, 0]]),
           "head": jnp.array([[100.0, 0], [0, 1.0]])}  # head norms must be ignored
  state = tx.init(params)
  upd = jax.jit(tx.update)
  for _ in range(300):
    _, state = upd(grads, state, params, task_losses=jnp.ones(k))
  w = state.method.weights
  assert w[0] > 1.5 and w[1] < 0.5, w


# ----------------------------------------------------------------------------------------------
# FAMO.


def test_famo_first_weights_and_objective_gradient():
  loss, theta = _problem(5, 4)
  tx = combiners.famo(num_tasks=4)
  upd, _ = _update(tx, tx.init({"t": theta}), loss, theta)

  def objective(t, z):
    d = loss(t) + 1e-8
    c = jax.lax.stop_gradient(jnp.sum(z / d))
    return jnp.sum(jnp.log(d) * z / c)

  ref = jax.grad(objective)(theta, jnp.full((4,), 0.25))
  np.testing.assert_allclose(upd, ref, rtol=1e-4, atol=1e-6)


def test_famo_logit_step_matches_the_official_update():
  m = combiners.method("famo", 3, gamma=0.001, w_lr=0.025)
  l0, l1 = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.5, 1.9, 3.0])
  _, s1 = _step(m, m.init(None), l0)
  np.testing.assert_allclose(s1.logits, 0.0)
  w, s2 = _step(m, s1, l1)
  delta = np.log(np.asarray(l0) + 1e-8) - np.log(np.asarray(l1) + 1e-8)
  z = np.full(3, 1 / 3)
  d = z * (delta - z @ delta)  # J_softmax^T delta
  # first torch Adam step from w = 0 (the weight decay term is 0 there): -lr * d / (|d| + eps)
  ref = -0.025 * d / (np.abs(d) + 1e-8)
  np.testing.assert_allclose(s2.logits, ref, rtol=1e-4, atol=1e-7)
  zz = jax.nn.softmax(jnp.asarray(ref))
  np.testing.assert_allclose(w, (zz / l1) / jnp.sum(zz / l1), rtol=1e-5)


def test_famo_shifts_weight_toward_the_slower_task():
  m = combiners.method("famo", 2)

  def body(state, t):
    losses = jnp.array([0.9 ** t, 0.99 ** t])  # task 0 falls fast, task 1 slowly
    w, state = m.weigh(None, losses, state)
    return state, w

  state, _ = jax.jit(lambda s: jax.lax.scan(body, s, jnp.arange(50.0)))(m.init(None))
  z = jax.nn.softmax(state.logits)
  assert z[1] > 0.6, z


# ----------------------------------------------------------------------------------------------
# All of them: jit, degenerate losses, engine path, bad input.


@pytest.mark.parametrize("name", MINE)
@pytest.mark.parametrize("k", [1, 2, 40])
def test_finite_on_degenerate_losses(name, k):
  m = combiners.method(name, k)
  rng = np.random.default_rng(k)
  cases = [np.zeros(k), -np.abs(rng.normal(size=k)), np.logspace(-4, 4, k),
           np.full(k, 1e-30), np.ones(k)]
  gram = jnp.diag(jnp.asarray(np.logspace(-4, 4, k), jnp.float32))
  gram = gram.at[0, 0].set(0.0)  # a task with zero gradient
  weigh = jax.jit(m.weigh)
  state = m.init(None)
  for _ in range(2):
    for losses in cases:
      w, state = weigh(gram if m.needs == base.GRAMIAN else None,
                       jnp.asarray(losses, jnp.float32), state)
      assert w.shape == (k,)
      assert np.all(np.isfinite(w)), (name, losses, w)
      assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)
                 if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating))


@pytest.mark.parametrize("name", MINE)
def test_engine_and_transform_agree(name):
  k = 3
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(k, 4)), jnp.float32)
  params = {"shared": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
            "head": jnp.asarray(rng.normal(size=(k,)), jnp.float32)}
  loss_fn = lambda p: (jnp.exp(0.3 * (a @ p["shared"]) + p["head"]), None)
  mask = {"shared": True, "head": False}
  m = combiners.method(name, k)
  tx = m.transform(mask)
  state = tx.init(params)
  out = jax.jit(lambda s, p: autodiff.combine(m, s, loss_fn, p, shared_mask=mask))(state, params)
  grads = jax.jacrev(lambda p: loss_fn(p)[0])(params)
  upd, new = jax.jit(tx.update)(grads, state, params, task_losses=loss_fn(params)[0])
  for key in params:
    np.testing.assert_allclose(out.update[key], upd[key], rtol=1e-4, atol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5), out.state, new)


def test_nan_loss_skips_step_and_keeps_state():
  tx = combiners.uw(num_tasks=2)
  params = {"t": jnp.zeros(2)}
  state = tx.init(params)
  upd, new = tx.update({"t": jnp.ones((2, 2))}, state, params,
                       task_losses=jnp.array([1.0, jnp.nan]))
  np.testing.assert_array_equal(upd["t"], 0.0)
  assert int(new.skipped) == 1
  np.testing.assert_array_equal(new.method.logsigma, state.method.logsigma)


@pytest.mark.parametrize("name,hp,match", [
    ("si", dict(task_weights=[1.0]), "task_weights"),
    ("si", dict(eps=0.0), "eps"),
    ("gls", dict(eps=-1.0), "eps"),
    ("dwa", dict(iteration_window=0), "iteration_window"),
    ("dwa", dict(temp=0.0), "temp"),
    ("uw", dict(method_params_lr=0.0), "method_params_lr"),
    ("gradnorm", dict(weight_lr=-1.0), "weight_lr"),
    ("gradnorm", dict(alpha=-1.0), "alpha"),
    ("famo", dict(w_lr=0.0), "w_lr"),
    ("famo", dict(gamma=-1.0), "gamma"),
    ("famo", dict(min_losses=[0.0]), "min_losses"),
    ("stch", dict(mu=0.0), "mu"),
    ("stch", dict(warmup_steps=2, nadir_steps=3), "nadir_steps"),
    ("rlw", dict(sigma=1.0), "valid"),
])
def test_bad_hyper_parameters_raise_one_line(name, hp, match):
  with pytest.raises(ValueError, match=match) as e:
    combiners.method(name, 2 if "min_losses" not in hp and "task_weights" not in hp else 3, **hp)
  assert "\n" not in str(e.value)
