"""What the papers promise for UPGrad, DualProj, Aligned-MTL, FairGrad, SDMGrad and the QP solver."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtl_jax import combiners
from mtl_jax.combiners import _qp
from mtl_jax.combiners._aligned_mtl import balance_matrix as _balance_matrix
from mtl_jax.combiners._fairgrad import solve_fairgrad

# jit once per shape (eager while_loops would recompile on every hypothesis example)
box_qp = jax.jit(_qp.box_qp)
dual_cone_weights = jax.jit(_qp.dual_cone_weights)
project_simplex = jax.jit(_qp.project_simplex)
balance_matrix = jax.jit(_balance_matrix, static_argnums=1)

KMAX = 6
SETTINGS = dict(max_examples=15, deadline=None, derandomize=True)


def jacobian(seed, k, p=8, spread=2.0):
  r = np.random.default_rng(seed)
  return r.normal(size=(k, p)) * np.exp(r.uniform(-spread, spread, size=(k, 1)))


def _weigher(name, k, **hp):
  m = combiners.method(name, k, **hp)
  fn = jax.jit(lambda g, l, s: m.weigh(g, l, s))
  return lambda g: fn(jnp.asarray(g, jnp.float32), jnp.ones((k,), jnp.float32),
                      m.init(None))[0]


_W = {}


def weigher(name, k, **hp):
  key = (name, k, tuple(sorted(hp.items())))
  if key not in _W:
    _W[key] = _weigher(name, k, **hp)
  return _W[key]


seeds = st.integers(0, 2**31 - 1)
ks = st.sampled_from([2, 3, 5])


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@settings(**SETTINGS)
@given(seed=seeds, k=ks)
def test_no_conflict_with_any_task(name, seed, k):
  """<J^T w, g_i> = (G w)_i >= 0 for every task (Quinton & Rey 2024, non-conflicting)."""
  j = jacobian(seed, k, p=max(2, k - 1))  # also rank-deficient Jacobians (p < k)
  g = j @ j.T
  w = np.asarray(weigher(name, k)(g), np.float64)
  d = j.T @ w
  inner = j @ d
  # The exact projection (no ridge, unlike TorchJD): (G w)_i >= 0 to float32's resolution of
  # (G w)_i, eps ||g_i|| S with S = sum_j |w_j| ||g_j|| (dual_cone_weights' promise on singular G).
  norms = np.linalg.norm(j, axis=1)
  slack = 50 * np.finfo(np.float32).eps * np.sum(np.abs(w) * norms) * norms
  assert np.all(inner >= -slack), (inner, slack)
  assert np.all(np.isfinite(w))


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@settings(**SETTINGS)
@given(seed=seeds, k=ks)
def test_dual_cone_kkt_and_optimality(name, seed, k):
  """w solves min v^T G' v s.t. v >= u (G' the trace-normalised Gramian; the ridge's bias is
  polished away): KKT conditions."""
  j = jacobian(seed, k)
  g = j @ j.T
  gn = g / np.trace(g)
  us = np.eye(k) / k if name == "upgrad" else np.full((1, k), 1.0 / k)
  vs = np.asarray(dual_cone_weights(jnp.asarray(us), jnp.asarray(g, jnp.float32)), np.float64)
  for u, v in zip(us, vs):
    lam = 2 * gn @ v  # the multipliers
    assert np.all(v >= u - 1e-6)
    assert np.all(lam >= -1e-5)
    assert np.all(np.abs(lam * (v - u)) <= 1e-5 * (1 + np.abs(v).max()))  # complementary slackness
  w = np.asarray(weigher(name, k)(g))
  np.testing.assert_allclose(w, vs.sum(0), rtol=1e-5, atol=1e-7)


@settings(**SETTINGS)
@given(seed=seeds, k=ks)
def test_upgrad_dualproj_are_the_mean_without_conflict(seed, k):
  r = np.random.default_rng(seed)
  j = np.abs(r.normal(size=(k, 8))) + 0.1  # all pairwise inner products positive
  g = j @ j.T
  for name in ("upgrad", "dualproj"):
    np.testing.assert_allclose(weigher(name, k)(g), np.full(k, 1.0 / k), rtol=1e-4)


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "aligned_mtl"])
def test_scale_and_permutation(name):
  """Weights are invariant to scaling all gradients, equivariant to permuting the tasks."""
  k = 5
  j = jacobian(7, k)
  g = j @ j.T
  w = np.asarray(weigher(name, k)(g))
  np.testing.assert_allclose(weigher(name, k)(g * 1e3), w, rtol=2e-4, atol=1e-6)
  if name == "aligned_mtl":  # B scales as c^0 too: lambda_R / lambda is scale free
    np.testing.assert_allclose(weigher(name, k)(g * 1e-3), w, rtol=2e-4, atol=1e-6)
  perm = np.array([3, 0, 4, 1, 2])
  np.testing.assert_allclose(weigher(name, k)(g[np.ix_(perm, perm)]), w[perm], rtol=2e-4,
                             atol=1e-6)


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@settings(**SETTINGS)
@given(seed=seeds, k=ks)
def test_aligned_mtl_condition_number_one(mode, seed, k):
  """B G B = lambda_R P: the aligned gradients B J have all non-zero singular values equal."""
  j = jacobian(seed, k, p=12, spread=1.0)
  g = j @ j.T
  b = np.asarray(balance_matrix(jnp.asarray(g, jnp.float32), mode), np.float64)
  aligned = b @ j
  sv = np.linalg.svd(aligned, compute_uv=False)
  assert sv.max() / sv.min() < 1 + 1e-2
  lam = np.sort(np.linalg.eigvalsh(g))
  ref = {"min": lam[0], "median": lam[(k - 1) // 2], "rmse": lam.mean()}[mode]
  np.testing.assert_allclose(sv**2, ref, rtol=2e-2)
  # the weights are the column sums of B: the update is the sum of the aligned gradients
  w = np.asarray(weigher("aligned_mtl", k, scale_mode=mode)(g))
  np.testing.assert_allclose(j.T @ w, aligned.sum(0), rtol=1e-3, atol=1e-4 * np.abs(aligned).max())


def test_aligned_mtl_rank_deficient_and_zero():
  j = jacobian(1, 4, p=2)  # rank 2
  g = j @ j.T
  b = np.asarray(balance_matrix(jnp.asarray(g, jnp.float32), "min"))
  sv = np.linalg.svd(b @ j, compute_uv=False)
  assert sv[0] / sv[1] < 1.01  # the two non-zero singular values are equal
  assert np.linalg.matrix_rank(b, tol=1e-4 * np.abs(b).max()) == 2
  np.testing.assert_allclose(balance_matrix(jnp.zeros((3, 3)), "min"), np.eye(3))
  with pytest.raises(ValueError, match="valid: min, median, rmse"):
    combiners.method("aligned_mtl", 3, scale_mode="max")
  # the preference vector combines the aligned gradients B J with p: update (B J)^T p
  j3 = jacobian(2, 3, p=5)
  g3 = j3 @ j3.T
  b3 = np.asarray(balance_matrix(jnp.asarray(g3, jnp.float32), "min"), np.float64)
  pref = np.array([0.2, 0.5, 0.3])
  w = np.asarray(weigher("aligned_mtl", 3, pref_vector=tuple(pref))(g3), np.float64)
  np.testing.assert_allclose(j3.T @ w, (b3 @ j3).T @ pref, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="pref_vector has shape \\(2,\\), expected \\(3,\\)"):
    combiners.method("aligned_mtl", 3, pref_vector=[1.0, 2.0])


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@settings(**SETTINGS)
@given(seed=seeds, k=ks)
def test_fairgrad_defining_equation(alpha, seed, k):
  """G w = w^{-1/alpha} (Ban & Ji 2024), on full-rank Gramians."""
  j = jacobian(seed, k, p=k + 4)
  g = j @ j.T
  w = np.asarray(weigher("fairgrad", k, alpha=alpha)(g), np.float64)
  assert np.all(w > 0)
  rhs = w**(-1.0 / alpha)
  assert np.linalg.norm(g @ w - rhs) <= 1e-3 * np.linalg.norm(rhs)


def test_fairgrad_scaling_and_permutation():
  k, alpha, c = 4, 2.0, 1e2
  j = jacobian(3, k, p=9)
  g = j @ j.T
  w = np.asarray(weigher("fairgrad", k, alpha=alpha)(g))
  np.testing.assert_allclose(weigher("fairgrad", k, alpha=alpha)(c * g),
                             w * c**(-alpha / (1 + alpha)), rtol=1e-3)
  perm = np.array([2, 0, 3, 1])
  np.testing.assert_allclose(weigher("fairgrad", k, alpha=alpha)(g[np.ix_(perm, perm)]), w[perm],
                             rtol=1e-3)
  # alpha = 1 is Nash-MTL's bargaining condition G w = 1 / w
  w1, info = solve_fairgrad(jnp.asarray(g, jnp.float32), 1.0, return_info=True)
  np.testing.assert_allclose(g @ np.asarray(w1), 1 / np.asarray(w1), rtol=1e-3)
  assert float(info.residual) < 1e-5
  with pytest.raises(ValueError, match="alpha must be > 0"):
    combiners.method("fairgrad", 2, alpha=0.0)


def test_sdmgrad_weights_and_limits():
  k = 4
  j = jacobian(5, k)
  g = jnp.asarray(j @ j.T, jnp.float32)
  m = combiners.method("sdmgrad", k)
  w, s = m.weigh(g, jnp.ones(k), m.init(None))
  assert abs(float(jnp.sum(s.w)) - 1) < 1e-5 and float(jnp.min(s.w)) >= 0
  np.testing.assert_allclose(w, (s.w + 0.3 / k) / 1.3, rtol=1e-6)
  # huge lamda: the mean gradient
  big = combiners.method("sdmgrad", k, lamda=1e6)
  wb, _ = big.weigh(g, jnp.ones(k), big.init(None))
  np.testing.assert_allclose(wb, np.full(k, 1 / k), atol=1e-5)
  # lamda = 0 and many iterations: MGDA's min-norm point (checked by its optimality on the simplex)
  m0 = combiners.method("sdmgrad", k, lamda=0.0, niter=3000, lr=0.02, momentum=0.0)
  w0, _ = m0.weigh(g, jnp.ones(k), m0.init(None))
  gn = np.asarray(g) / np.mean(np.sqrt(np.diag(np.asarray(g)) + 1e-4))**2
  grad = gn @ np.asarray(w0)
  support = np.asarray(w0) > 1e-6
  assert np.all(grad[~support] >= grad[support].min() - 1e-3)
  assert np.ptp(grad[support]) < 1e-3


@settings(**SETTINGS)
@given(seed=seeds, k=st.sampled_from([1, 2, 7]))
def test_project_simplex(seed, k):
  r = np.random.default_rng(seed)
  v = r.normal(size=k) * 3
  w = np.asarray(project_simplex(jnp.asarray(v, jnp.float32)), np.float64)
  assert abs(w.sum() - 1) < 1e-5 and np.all(w >= 0)
  # optimality: v - w = theta on the support, <= theta off it
  d = v - w
  theta = d[w > 0].mean()
  assert np.all(np.abs(d[w > 0] - theta) < 1e-5) and np.all(d[w == 0] <= theta + 1e-5)


@settings(**SETTINGS)
@given(seed=seeds, k=ks)
def test_box_qp_kkt(seed, k):
  r = np.random.default_rng(seed)
  a = r.normal(size=(k, k + 2))
  h = a @ a.T + 1e-2 * np.eye(k)
  q = r.normal(size=k)
  lo, hi = -r.uniform(0, 1, size=k), r.uniform(0, 1, size=k)
  x = np.asarray(box_qp(jnp.asarray(h), jnp.asarray(q), jnp.asarray(lo), jnp.asarray(hi)),
                 np.float64)
  gr = h @ x + q
  assert np.all(x >= lo - 1e-6) and np.all(x <= hi + 1e-6)
  tol = 1e-4 * (1 + np.abs(gr).max())
  free = (x > lo + 1e-5) & (x < hi - 1e-5)
  assert np.all(np.abs(gr[free]) < tol)
  assert np.all(gr[x <= lo + 1e-5] > -tol) and np.all(gr[x >= hi - 1e-5] < tol)


def test_box_qp_shape_error():
  with pytest.raises(ValueError, match="h must be"):
    _qp.box_qp(jnp.eye(3), jnp.ones(2))


def test_jacobian_methods_follow_their_recursions():
  """MoCo, DB-MTL and ExcessMTL against their update rules, written out in numpy (2 steps)."""
  k, p = 3, 6
  r = np.random.default_rng(0)
  gs = [r.normal(size=(k, p)) for _ in range(2)]
  ls = [np.array([0.5, 1.0, 2.0]), np.array([0.4, 0.9, 1.5])]
  params = {"w": jnp.zeros((p,))}
  run = {}
  for name in ("moco", "db_mtl", "excess_mtl"):
    m = combiners.method(name, k)
    s = m.init(params)
    outs = []
    for g, l in zip(gs, ls):
      u, spec, s = m.aggregate({"w": jnp.asarray(g, jnp.float32)}, jnp.asarray(l, jnp.float32), s)
      outs.append((np.asarray(u["w"]), np.asarray(spec)))
    run[name] = outs

  y, lam = np.zeros((k, p)), np.full(k, 1 / k)  # MoCo, LibMTL defaults
  for t, (g, l) in enumerate(zip(gs, ls), 1):
    gh = g / (np.linalg.norm(g, axis=1, keepdims=True) + 1e-8) * l[:, None]
    y = y - 0.5 / t**0.5 * (y - gh)
    z = lam - 0.1 / t**0.5 * (y @ y.T) @ lam
    lam = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(run["moco"][t - 1][0], y.T @ lam, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(run["moco"][t - 1][1], np.ones(k))

  buf = np.zeros((k, p))  # DB-MTL
  for t, (g, l) in enumerate(zip(gs, ls), 1):
    lg = g / (l[:, None] + 1e-8)
    buf = lg + 0.9 * (buf - lg)
    nrm = np.linalg.norm(buf, axis=1)
    np.testing.assert_allclose(run["db_mtl"][t - 1][0], (nrm.max() / (nrm + 1e-8)) @ buf,
                               rtol=1e-4)
    np.testing.assert_allclose(run["db_mtl"][t - 1][1], 1 / (l + 1e-8), rtol=1e-6)

  ssum, lw, init = np.zeros((k, p)), np.ones(k), None  # ExcessMTL
  for t, g in enumerate(gs, 1):
    ssum = ssum + g**2
    e = np.sum(g**2 / np.sqrt(ssum + 1e-7), axis=1)
    if init is None:
      init = e
    else:
      lw = lw * np.exp(1e-2 * e / init)
      lw = lw / lw.sum() * k
    np.testing.assert_allclose(run["excess_mtl"][t - 1][0], lw @ g, rtol=1e-5)
    np.testing.assert_allclose(run["excess_mtl"][t - 1][1], lw, rtol=1e-5)


def test_jacobian_state_only_for_shared_leaves():
  params = {"trunk": jnp.zeros((4, 3)), "head": jnp.zeros((2, 3))}
  mask = {"trunk": True, "head": False}
  for name in ("moco", "db_mtl", "excess_mtl"):
    st = combiners.get(name, 2, shared_mask=mask).init(params).method
    shapes = [x.shape for x in jax.tree.leaves(st[0])]
    assert (2, 4, 3) in shapes and (2, 1) in shapes, (name, shapes)
