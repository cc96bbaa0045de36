"""The defining property of each method added in issue 16.3 (ConFIG, Krum, TrimmedMean, MoDo,
GO4Align, NTKMTL, the log-loss variants, GradVac's layer / matrix groups), each checked against a
float64 NumPy reference written from the paper's / official code's maths. The registry-wide
contract (jit, degenerate input, NaN skip, engine modes, shard_map) is tests/test_combiners_contract;
GradVac's grouped forms (not the default, so not in that file) get the same checks here."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from mtl_jax import autodiff, combiners
from mtl_jax.combiners._config import config_weights
from mtl_jax.combiners._go4align import kmeans_1d
from mtl_jax.combiners._gradvac import grouped_gradvac, leaf_groups
from mtl_jax.combiners._krum import krum_weights
from mtl_jax.combiners._mgda import min_norm_weights
from mtl_jax.combiners._pcgrad import task_orders
from tests.test_combiners_contract import (MASK, degenerate_rows, loss_fn, make_batch, make_params,
                                           synthetic_grads)

SETTINGS = settings(max_examples=25, deadline=None)


def spread_jacobian(seed, k, p=24, decades=8):
  """(K, P) float64 rows of norms 10^[0, decades]."""
  r = np.random.default_rng(seed)
  j = r.normal(size=(k, p))
  return j / np.linalg.norm(j, axis=1, keepdims=True) * 10.0**r.uniform(0, decades, size=(k, 1))


def weigh(name, jac, losses=None, state=None, **hp):
  m = combiners.method(name, jac.shape[0], **hp)
  s = m.init(None) if state is None else state
  l = jnp.ones(jac.shape[0]) if losses is None else jnp.asarray(losses, jnp.float32)
  g = jnp.asarray(jac @ jac.T, jnp.float32)
  w, s = jax.jit(m.weigh)(g, l, s)
  return np.asarray(w, np.float64), s


# ---------------------------------------------------------------------------------------------
# ConFIG


@SETTINGS
@given(seed=st.integers(0, 10**6), k=st.integers(2, 8))
def test_config_equal_positive_cosines_and_projection_length(seed, k):
  """Norms spread 1e0..1e8: the update has the same positive cosine with every task gradient and
  length sum_k g_k . d_hat, as the official pinv(U) @ 1 in float64."""
  jac = spread_jacobian(seed, k)
  w, _ = weigh("config", jac)
  upd = w @ jac
  cos = jac @ upd / (np.linalg.norm(jac, axis=1) * np.linalg.norm(upd))
  assert cos.min() > 0
  np.testing.assert_allclose(cos, cos.mean(), rtol=1e-3)
  units = jac / np.linalg.norm(jac, axis=1, keepdims=True)
  d = np.linalg.pinv(units) @ np.ones(k)
  d_hat = d / np.linalg.norm(d)
  ref = np.sum(jac @ d_hat) * d_hat
  np.testing.assert_allclose(upd, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def test_config_preference_vector_and_degenerate():
  jac = spread_jacobian(1, 3, decades=2)
  pref = np.array([1.0, 2.0, 3.0])
  w, _ = weigh("config", jac, pref_vector=pref)
  upd = w @ jac
  cos = jac @ upd / np.linalg.norm(jac, axis=1)
  np.testing.assert_allclose(cos / cos[0], pref, rtol=1e-3)
  # two exactly opposite gradients: no conflict-free direction, a zero update (official: 0/0)
  w, _ = weigh("config", np.array([[1.0, 2.0], [-1.0, -2.0]]))
  np.testing.assert_array_equal(w, 0.0)
  # a duplicated task and a zero task change nothing about the others' equal cosines
  j = spread_jacobian(2, 3, decades=1)
  j = np.concatenate([j, j[:1], 0 * j[:1]])
  w, _ = weigh("config", j)
  upd = w @ j
  cos = j[:4] @ upd / np.linalg.norm(j[:4], axis=1)
  np.testing.assert_allclose(cos, cos[0], rtol=1e-3)
  assert np.all(np.isfinite(config_weights(jnp.zeros((3, 3)), jnp.ones(3))))


# ---------------------------------------------------------------------------------------------
# Krum and TrimmedMean


def krum_reference(jac, f, m):
  k = jac.shape[0]
  dist = np.linalg.norm(jac[:, None] - jac[None], axis=-1)
  scores = [np.sum(np.sort(np.delete(dist[i], i))[:k - f - 2]) for i in range(k)]
  chosen = np.argsort(scores, kind="stable")[:m]
  w = np.zeros(k)
  w[chosen] = 1.0 / m
  return w


@SETTINGS
@given(seed=st.integers(0, 10**6), k=st.integers(3, 9), f=st.integers(0, 3), m=st.integers(1, 3))
def test_krum_selects_smallest_neighbour_distance_sums(seed, k, f, m):
  if k < f + 3 or k < m:
    return
  jac = spread_jacobian(seed, k, decades=1)
  w = np.asarray(krum_weights(jnp.asarray(jac @ jac.T, jnp.float32), f, m))
  np.testing.assert_allclose(w, krum_reference(jac, f, m), atol=1e-6)


def test_krum_ignores_an_outlier_and_validates():
  r = np.random.default_rng(0)
  jac = np.ones((5, 10)) + 0.1 * r.normal(size=(5, 10))
  jac[3] = 1e6  # a Byzantine row
  w, _ = weigh("krum", jac, n_byzantine=1, n_selected=2)
  assert w[3] == 0 and np.isclose(w.sum(), 1.0)
  with pytest.raises(ValueError, match="n_byzantine \\+ 3"):
    combiners.method("krum", 3, n_byzantine=1)
  w, _ = weigh("krum", jac[:1])
  np.testing.assert_array_equal(w, [1.0])


@SETTINGS
@given(seed=st.integers(0, 10**6), k=st.integers(3, 9), t=st.integers(0, 3))
def test_trimmed_mean_drops_extremes_coordinatewise(seed, k, t):
  if k < 2 * t + 1:
    return
  r = np.random.default_rng(seed)
  params, grads = synthetic_grads(k, r.normal(size=(k, 20)))
  tx = combiners.get("trimmed_mean", k, shared_mask=MASK, trim_number=t)
  upd, _ = jax.jit(lambda g: tx.update(g, tx.init(params), params,
                                       task_losses=jnp.ones(k)))(grads)
  rows = np.concatenate([np.asarray(grads["trunk"]["w"]).reshape(k, -1),
                         np.asarray(grads["trunk"]["b"])], axis=1)
  ref = np.sort(rows, axis=0)[t:k - t].mean(axis=0)
  got = np.concatenate([np.asarray(upd["trunk"]["w"]).ravel(), np.asarray(upd["trunk"]["b"])])
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  # heads: their own unweighted gradient
  np.testing.assert_allclose(np.asarray(upd["heads"]["b"]),
                             np.asarray(grads["heads"]["b"]).sum(0), rtol=1e-6)
  if t:  # making the extremes more extreme changes nothing
    big = rows.copy()
    big[np.argmax(rows, axis=0), np.arange(20)] += 1e6
    big[np.argmin(rows, axis=0), np.arange(20)] -= 1e6
    np.testing.assert_allclose(np.sort(big, axis=0)[t:k - t].mean(0), ref, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# MoDo


def simplex_projection(y):
  """Sorting-based Euclidean projection (the official ``_projection2simplex``), float64."""
  u = np.sort(y)[::-1]
  css = np.cumsum(u) - 1
  rho = np.nonzero(u - css / np.arange(1, len(y) + 1) > 0)[0][-1]
  return np.maximum(y - css[rho] / (rho + 1), 0)


def test_modo_lambda_steps_match_the_official_update():
  jac = spread_jacobian(3, 4, decades=1)
  g = jac @ jac.T
  gamma, rho = 1e-3, 0.1
  lam = np.full(4, 0.25)
  state = None
  for _ in range(5):
    w, state = weigh("modo", jac, state=state, gamma=gamma, rho=rho)
    lam = simplex_projection(lam - gamma * (g @ lam + rho * lam))
    np.testing.assert_allclose(w, lam, rtol=1e-4, atol=1e-6)
  assert np.isclose(w.sum(), 1.0) and np.all(w >= 0)


def test_modo_converges_to_the_regularised_min_norm_point():
  jac = spread_jacobian(4, 3, decades=0.5)
  g = jac @ jac.T
  m = combiners.method("modo", 3, gamma=0.05 / np.trace(g), rho=0.0)
  step = jax.jit(m.weigh)
  s = m.init(None)
  for _ in range(4000):
    w, s = step(jnp.asarray(g, jnp.float32), jnp.ones(3), s)
  ref = np.asarray(min_norm_weights(jnp.asarray(g, jnp.float32)))
  assert float(w @ g @ w) <= float(ref @ g @ ref) * (1 + 1e-3)


# ---------------------------------------------------------------------------------------------
# GO4Align


def kmeans_cost(x, labels):
  return sum(np.sum((x[labels == c] - x[labels == c].mean())**2) for c in np.unique(labels))


@SETTINGS
@given(seed=st.integers(0, 10**6), k=st.integers(2, 7), m=st.integers(2, 4))
def test_go4align_kmeans_is_the_global_optimum(seed, k, m):
  m = min(m, k)
  x = np.random.default_rng(seed).exponential(size=k).astype(np.float32)
  got = np.asarray(kmeans_1d(jnp.asarray(x), m))
  assert len(np.unique(got)) <= m
  best = min(kmeans_cost(x.astype(np.float64), np.array(lab))
             for lab in itertools.product(range(m), repeat=k) if len(set(lab)) == m)
  _, labels = np.unique(got, return_inverse=True)
  np.testing.assert_allclose(kmeans_cost(x.astype(np.float64), labels), best, rtol=1e-4,
                             atol=1e-7)
  for c in np.unique(got):  # each weight is its group's mean
    np.testing.assert_allclose(c, x[got == c].mean(), rtol=1e-5)


def test_go4align_indicators_and_one_group():
  losses = np.array([0.5, 1.0, 4.0, 4.1])
  eta = 0.3
  p = np.full(4, 0.25) * np.exp(-eta * losses)
  p /= p.sum()
  gamma = losses.sum() / losses * p
  w, _ = weigh("go4align", np.eye(4), losses=losses, num_groups=1, robust_step_size=eta)
  np.testing.assert_allclose(w, gamma.mean(), rtol=1e-5)
  w, _ = weigh("go4align", np.eye(4), losses=losses, num_groups=4, robust_step_size=eta)
  np.testing.assert_allclose(w, gamma, rtol=1e-5)
  w, _ = weigh("go4align", np.eye(4), losses=losses, num_groups=2, robust_step_size=eta)
  assert len(np.unique(np.round(w, 5))) == 2


# ---------------------------------------------------------------------------------------------
# NTKMTL


def test_ntkmtl_weights_and_clip():
  jac = spread_jacobian(5, 4, decades=3)
  g = jac @ jac.T
  w, _ = weigh("ntkmtl", jac, max_norm=0.0)
  np.testing.assert_allclose(w, 4 * (np.trace(g) / np.diag(g))**0.5, rtol=1e-4)
  w, _ = weigh("ntkmtl", jac, max_norm=1.0, ntk_exp=0.75)
  assert np.linalg.norm(w @ jac) <= 1.0 + 1e-4
  ref = (np.trace(g) / np.diag(g))**0.75
  np.testing.assert_allclose(w / w[0], ref / ref[0], rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Log-loss variants


@pytest.mark.parametrize("name", ["log_imtl", "log_cagrad", "log_mgda"])
def test_log_variants_are_invariant_to_loss_scales(name):
  """The defining property of a log-loss method: scaling task k's loss by c_k (its gradient too)
  leaves nabla log L_k and hence the update unchanged (log_mgda: up to its sum-to-1 rescaling)."""
  jac = spread_jacobian(6, 3, decades=1)
  losses = np.array([0.3, 1.2, 2.5])
  c = np.array([1e-2, 1.0, 1e3])
  w1, _ = weigh(name, jac, losses=losses)
  w2, _ = weigh(name, jac * c[:, None], losses=losses * c)
  u1, u2 = w1 @ jac, w2 @ (jac * c[:, None])
  if name == "log_mgda":
    u1, u2 = u1 / np.linalg.norm(u1), u2 / np.linalg.norm(u2)
    np.testing.assert_allclose(w1.sum(), 1.0, rtol=1e-5)
  np.testing.assert_allclose(u2, u1, rtol=2e-3, atol=2e-3 * np.abs(u1).max())


def test_log_imtl_is_imtl_on_log_gradients():
  jac = spread_jacobian(7, 3, decades=1)
  losses = np.array([0.3, 1.2, 2.5])
  d = losses + 1e-8
  w_log, _ = weigh("log_imtl", jac, losses=losses)
  w_base, _ = weigh("imtl", jac / d[:, None], losses=losses)
  np.testing.assert_allclose(w_log, w_base / d, rtol=1e-4)
  assert combiners.hparams("log_cagrad") == {**combiners.hparams("cagrad"), "max_norm": 1.0}
  assert combiners.hparams("log_mgda") == combiners.hparams("mgda")
  big = spread_jacobian(7, 3, decades=4)  # LOG_CAGrad clips the shared update to norm 1
  w, _ = weigh("log_cagrad", big, losses=np.array([1e-3, 1e-2, 1.0]))
  assert np.linalg.norm(w @ big) <= 1.0 + 1e-4
  w, _ = weigh("log_cagrad", big, losses=np.array([1e-3, 1e-2, 1.0]), max_norm=0.0)
  assert np.linalg.norm(w @ big) > 1.0
  with pytest.raises(ValueError, match="mode='gradient'"):
    combiners.method("log_imtl", 3, mode="loss")


# ---------------------------------------------------------------------------------------------
# GradVac groups


def gradvac_reference(rows, groups, orders, phi, beta):
  """LibMTL's GradVac loop (float64) on ``rows`` (K, P) with column groups ``groups``."""
  k = rows.shape[0]
  pc = rows.copy()
  phi = phi.copy()
  for i in range(k):
    for j in orders[i]:
      for gi, cols in enumerate(groups):
        a, b = pc[i, cols], rows[j, cols]
        rho = a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-8)
        t = phi[gi, i, j]
        if rho < t:
          w = np.linalg.norm(a) * (t * np.sqrt(1 - rho**2) - rho * np.sqrt(1 - t**2)) / (
              np.linalg.norm(b) * np.sqrt(1 - t**2) + 1e-8)
          pc[i, cols] = a + b * w
        phi[gi, i, j] = (1 - beta) * t + beta * rho
  return pc.sum(0), phi


@pytest.mark.parametrize("group", ["layer", "matrix"])
def test_gradvac_groups_match_libmtl_loop(group):
  k = 3
  r = np.random.default_rng(8)
  jac = {"a": {"w": r.normal(size=(k, 4, 2)), "b": r.normal(size=(k, 2))},
         "c": {"w": r.normal(size=(k, 3))}}
  ids, n = leaf_groups(jac, group)
  assert n == (2 if group == "layer" else 3)
  leaves = jax.tree.leaves(jac)
  sizes = [x[0].size for x in leaves]
  offs = np.cumsum([0] + sizes)
  groups = [np.concatenate([np.arange(offs[i], offs[i + 1]) for i in range(len(leaves))
                            if ids[i] == g]) for g in range(n)]
  rows = np.concatenate([x.reshape(k, -1) for x in leaves], axis=1)
  orders = task_orders(jax.random.key(0), k, include_self=False)
  phi = np.zeros((n, k, k))
  phi[:, 0, 1] = 0.9  # targets that trigger the vaccine
  phi[:, 2, 0] = 0.5
  f32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), jac)
  upd, new_phi = grouped_gradvac(f32, jnp.asarray(phi, jnp.float32), orders, 0.5, group)
  ref, ref_phi = gradvac_reference(rows, groups, np.asarray(orders), phi, 0.5)
  got = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(upd)])
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(new_phi), ref_phi, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module", params=["layer", "matrix"])
def grouped_runs(request):
  """One jitted program per group: degenerate cases, NaN loss, K=1 and the engine vs optax."""
  group = request.param
  params = make_params()
  x, y = make_batch()
  r = np.random.default_rng(3)
  cases = [synthetic_grads(3, degenerate_rows(c, r))[1]
           for c in ("zero_task", "identical", "spread")]
  tx = optax.chain(combiners.get("gradvac", 3, shared_mask=MASK, group=group), optax.adam(1e-2))
  m = combiners.method("gradvac", 3, group=group)
  p1 = make_params(1)
  tx1 = combiners.get("gradvac", 1, shared_mask=MASK, group=group)
  g1 = synthetic_grads(1, r.normal(size=(1, 20)))[1]

  @jax.jit
  def program():
    s0 = tx.init(params)
    outs = [tx.update(g, s0, params, task_losses=jnp.asarray([0.7, 1.3, 2.1]))
            for g in cases]
    nan = tx.update(cases[0], s0, params, task_losses=jnp.asarray([0.7, jnp.nan, 2.1]))
    one = tx1.update(g1, tx1.init(p1), p1, task_losses=jnp.ones(1))
    cs = m.transform(MASK).init(params)
    eng = autodiff.combine(m, cs, loss_fn, params, x, y, mode="jacobian", shared_mask=MASK)
    _, jac, _ = autodiff.task_jacobian(loss_fn, params, x, y)
    l, _ = loss_fn(params, x, y)
    opt = m.transform(MASK).update(jac, cs, params, task_losses=l)
    return outs, nan, one, (eng.update, opt[0]), g1
  return group, jax.device_get(program())


def _finite(t):
  return all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(t))


def test_gradvac_groups_contract(grouped_runs):
  group, (outs, nan, one, (eng, opt), g1) = grouped_runs
  for upd, state in outs:
    assert _finite(upd) and _finite(state), group
    assert int(state[0].skipped) == 0
  upd, state = nan
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(upd))
  assert int(state[0].skipped) == 1
  for a, b in zip(jax.tree.leaves(one[0]), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b)[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(eng), jax.tree.leaves(opt)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="valid: all, layer, matrix"):
    combiners.method("gradvac", 3, group="block")


def test_config_two_tasks_is_the_official_closed_form():
  """K=2: the official ``ConFIG_update_double`` (orthogonal components, no inverse)."""
  j = spread_jacobian(9, 2, decades=3)
  u1, u2 = j / np.linalg.norm(j, axis=1, keepdims=True)
  or1 = j[1] - (j[1] @ u1) * u1  # the part of g2 orthogonal to g1
  or2 = j[0] - (j[0] @ u2) * u2
  o1, o2 = or1 / np.linalg.norm(or1), or2 / np.linalg.norm(or2)
  best = (o2 @ u1) / (o1 @ u2) * o1 + o2
  d_hat = best / np.linalg.norm(best)
  ref = np.sum(j @ d_hat) * d_hat
  w, _ = weigh("config", j)
  np.testing.assert_allclose(w @ j, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


NEW = ("config", "krum", "modo", "ntkmtl", "go4align", "log_mgda", "log_cagrad", "log_imtl")


@pytest.mark.parametrize("name", NEW)
def test_new_weightings_finite_on_norms_spread_1e0_to_1e8(name):
  """The contract file spreads norms over 1e-4..1e4; the brief's 1e0..1e8 (K=5), plus a
  duplicated and a zero task."""
  jac = spread_jacobian(10, 5, decades=8)
  jac[3] = jac[0]
  jac[4] = 0.0
  losses = np.array([0.5, 2.0, 1e3, 0.5, 1e-3])
  w, _ = weigh(name, jac, losses=losses)
  assert np.all(np.isfinite(w)), (name, w)
