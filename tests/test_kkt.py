"""Every Gramian method's own optimality conditions hold on random ill-conditioned Gramians.

Gramians ``A A^T`` of Gaussian K x P Jacobians (P in K+1..3K+2, full rank) whose row norms are
``10**U(0, s)``, ``s`` up to 4 (diagonal spread up to 1e8), K in {2, 3, 7, 40}; solved in float32
inside jit, checked in float64. Each tolerance is relative to the scale float32 rounding of the
returned weights alone produces (stated per test), so a solver that stops short fails it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize as so
from hypothesis import given, settings, strategies as st

from mtl_jax import combiners
from mtl_jax.combiners._aligned_mtl import balance_matrix
from mtl_jax.combiners._cagrad import cagrad_weights

KS = [2, 3, 7, 40]
SETTINGS = dict(max_examples=3, deadline=None, derandomize=True)
CASES = dict(seed=st.integers(0, 2**31 - 1), spread=st.floats(0.0, 4.0))
EPS32 = float(np.finfo(np.float32).eps)


def ill_gramian(seed, k, spread):
  r = np.random.default_rng(seed)
  p = int(r.integers(k + 1, 3 * k + 3))
  a = r.normal(size=(k, p)) * 10**r.uniform(0, spread, size=(k, 1))
  return a, a @ a.T


@functools.lru_cache(maxsize=None)
def weigher(name, k, **hp):
  """The method's jitted ``weigh`` from a fresh state (compiled once per name, K, hparams)."""
  m = combiners.method(name, k, **hp)
  fn = jax.jit(m.weigh)
  state = m.init(None)
  return lambda g: np.asarray(fn(jnp.asarray(g, jnp.float32), jnp.ones(k), state)[0], np.float64)


cagrad_v_w = jax.jit(lambda g: cagrad_weights(g, 0.4, 0))
balance = jax.jit(balance_matrix, static_argnums=1)


def conflict_cosines(g, w):
  """``g_k . d / (||d|| ||g_k||)`` for ``d = J^T w``."""
  return g @ w / (np.sqrt(max(w @ g @ w, 1e-300)) * np.sqrt(np.diag(g)))


def check_dual_cone_kkt(a, g, u, v):
  """``v = argmin_{v >= u} v^T G v``: feasibility, dual feasibility (no conflict),
  complementarity, and the objective against float64 NNLS (``v = u + s``, ``s >= 0``)."""
  assert np.all(v >= u - 1e-6 * np.abs(u).max())
  cos = conflict_cosines(g, v)
  assert cos.min() >= -1e-6  # J d >= -1e-6 ||d|| ||g_k||
  free = v - u > 1e-4 * np.abs(v).max()
  assert np.all(np.abs(cos[free]) <= 1e-6)  # (G v)_k = 0 where the bound is inactive
  s, _ = so.nnls(a.T, -a.T @ u, maxiter=50 * len(u))
  ref = (u + s) @ g @ (u + s)
  assert abs(v @ g @ v / ref - 1) <= 1e-5


@pytest.mark.parametrize("k", KS)
@settings(**SETTINGS)
@given(**CASES)
def test_dualproj(k, seed, spread):
  a, g = ill_gramian(seed, k, spread)
  check_dual_cone_kkt(a, g, np.full(k, 1.0 / k), weigher("dualproj", k)(g))


@pytest.mark.parametrize("k", KS)
@settings(**SETTINGS)
@given(**CASES)
def test_upgrad(k, seed, spread):
  """``w = sum_i v_i``, ``v_i = argmin_{v >= e_i / K} v^T G v``: no conflict, and ``J^T w`` is the
  sum of the float64 projections to 1e-5 of their total norm (the KKT of each ``v_i`` is
  :func:`check_dual_cone_kkt`'s, tested with DualProj's ``u``)."""
  a, g = ill_gramian(seed, k, spread)
  w = weigher("upgrad", k)(g)
  assert conflict_cosines(g, w).min() >= -1e-6
  u = np.eye(k) / k
  ref = np.stack([ui + so.nnls(a.T, -a.T @ ui, maxiter=50 * k)[0] for ui in u])
  total = sum(np.linalg.norm(vi @ a) for vi in ref)
  assert np.linalg.norm((w - ref.sum(0)) @ a) <= 1e-5 * total


@pytest.mark.parametrize("k", KS)
@settings(**SETTINGS)
@given(**CASES)
def test_mgda(k, seed, spread):
  """Min-norm point: ``w`` in the simplex, ``(G w)_k >= w^T G w`` with equality on the support
  (to the float32 rounding of ``w``, which the sums ``|G| w`` carry)."""
  _, g = ill_gramian(seed, k, spread)
  w = weigher("mgda", k)(g)
  assert np.all(w >= 0) and abs(w.sum() - 1) <= 1e-5
  mu, gw = w @ g @ w, g @ w
  tol = 1e-5 * (np.abs(g) @ w) + 1e-4 * mu
  assert np.all(gw >= mu - tol)
  support = w > 1e-5 * w.max()
  assert np.all(np.abs(gw - mu)[support] <= tol[support])


@pytest.mark.parametrize("k", KS)
@settings(**SETTINGS)
@given(**CASES)
def test_cagrad(k, seed, spread):
  """The dual ``min_{w in simplex} F(w) = w^T G~ b + c' sqrt(w^T G~ w)`` on the normalised
  ``G~ = G / mean(diag G) + 1e-8`` (``b = 1/K``): ``grad F >= nu`` with equality on the support of
  ``w``, to 2e-4 of the gradient's terms (measured <= 6e-5 at K=40, spread 1e8: the solver stops
  once ``||d||^2 = c'^2`` to 1e-5, the objective is then within 1e-7 of the optimum)."""
  _, g = ill_gramian(seed, k, spread)
  _, w = (np.asarray(x, np.float64) for x in cagrad_v_w(jnp.asarray(g, jnp.float32)))
  assert np.all(w >= 0) and abs(w.sum() - 1) <= 1e-5
  gt = g / (np.trace(g) / k) + 1e-8
  cc = 0.4 * np.sqrt(np.mean(gt - 1e-8) + 1e-8) + 1e-8
  b, nw = np.full(k, 1.0 / k), np.sqrt(w @ gt @ w)
  grad = gt @ b + cc * (gt @ w) / nw
  scale = np.abs(gt) @ b + cc * (np.abs(gt) @ w) / nw
  gap = (grad - grad.min()) / scale
  assert np.all(gap[w > 1e-5 * w.max()] <= 2e-4)


@pytest.mark.parametrize("k", KS)
@settings(**SETTINGS)
@given(**CASES)
def test_fairgrad(k, seed, spread):
  _, g = ill_gramian(seed, k, spread)
  w = weigher("fairgrad", k)(g)
  assert np.all(w > 0)
  assert np.linalg.norm(g @ w - 1.0 / w) <= 1e-5 * np.linalg.norm(1.0 / w)  # alpha = 1


@pytest.mark.parametrize("k", KS)
@settings(**SETTINGS)
@given(**CASES)
def test_nash_mtl(k, seed, spread):
  _, g = ill_gramian(seed, k, spread)
  a = weigher("nash_mtl", k, max_norm=0.0)(g)  # the raw bargaining solution (no clipping)
  assert np.all(a > 0)
  assert np.linalg.norm(g @ a - 1.0 / a) <= 1e-5 * np.linalg.norm(1.0 / a)


@pytest.mark.parametrize("k", KS)
@settings(**SETTINGS)
@given(**CASES)
def test_imtl_g(k, seed, spread):
  """Equal projections ``u_k . d`` to 1e-5 ``||d||`` (float32 rounding of the exact weights alone
  gives up to 2e-6 at K=40)."""
  a, g = ill_gramian(seed, k, spread)
  w = weigher("imtl", k)(g)
  assert abs(w.sum() - 1) <= 1e-5
  proj = g @ w / np.sqrt(np.diag(g))
  assert np.max(np.abs(proj - proj.mean())) <= 1e-5 * np.linalg.norm(w @ a)


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("k", KS)
@settings(**SETTINGS)
@given(**CASES)
def test_aligned_mtl(mode, k, seed, spread):
  """On the kept eigen-space (official cut-off ``lambda > K eps lambda_max``) ``B G B`` has all
  eigenvalues ``lambda_R``, and 0 elsewhere. float32 ``eigh`` resolves an eigenpair to its
  backward error ``~eps ||G||``: the tolerance is ``10 eps lambda_max / lambda_min_kept``
  (measured <= 3); the kept rank is the official one up to that resolution."""
  _, g = ill_gramian(seed, k, spread)
  b = np.asarray(balance(jnp.asarray(g, jnp.float32), mode), np.float64)  # weights: B 1
  mu = np.sort(np.linalg.eigvalsh(b @ g @ b))[::-1]
  lam = np.sort(np.linalg.eigvalsh(g))[::-1]
  r = int(np.sum(mu > 0.5 * mu[0]))
  cut = k * EPS32 * lam[0]
  assert np.sum(lam > 10 * cut) <= r <= np.sum(lam > 0.1 * cut)
  ref = {"min": lam[r - 1], "median": lam[r - 1 - (r - 1) // 2], "rmse": lam[:r].mean()}[mode]
  tol = 10 * EPS32 * lam[0] / lam[r - 1]
  assert np.max(np.abs(mu[:r] / ref - 1)) <= tol
  assert np.all(mu[r:] <= tol * ref)
