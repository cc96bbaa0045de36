"""The weightings' solve times on random Gramians, each jitted and compiled, from a cold start.

* :func:`nash_solve_timing`: Nash-MTL's weighting on well-conditioned random Gramians ``A A^T``
  (``A`` Gaussian K x 2K) for several K, with the relative KKT residual of its bargaining solution;
* :func:`gramian_solve_timing`: every Gramian weighting at one K on ill-conditioned Gramians
  whose diagonal (squared gradient norms) spans ``1e0..1e8`` (issue 16: real networks' task
  gradient norms differ by decades); it times whatever solver ``combiners.method(name, K)`` has;
  with ``rank`` (e.g. K/2) on singular ones (:func:`singular_gramian`: more tasks than parameters).
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import combiners
from mtl_jax.combiners.base import init_method_state

_PARAMS = {"w": jnp.zeros((1,), jnp.float32)}  # weightings ignore the parameters' values


def random_gramian(key: jax.Array, k: int) -> jax.Array:
  """A random full-rank K x K Gramian ``A A^T`` with ``A`` Gaussian K x 2K."""
  a = jax.random.normal(key, (k, 2 * k), jnp.float32)
  return a @ a.T


def ill_conditioned_gramian(key: jax.Array, k: int, spread: float = 1e8) -> jax.Array:
  """A random K x K Gramian with diagonal ``spread ** linspace(0, 1, K)`` (shuffled): K Gaussian
  directions in 2K dimensions, scaled to gradient norms ``1 .. sqrt(spread)``."""
  kd, kp = jax.random.split(key)
  a = jax.random.normal(kd, (k, 2 * k), jnp.float32)
  a = a / jnp.linalg.norm(a, axis=1, keepdims=True)
  norms = jax.random.permutation(kp, jnp.sqrt(spread ** jnp.linspace(0.0, 1.0, k)))
  a = a * norms[:, None]
  return a @ a.T


def singular_gramian(key: jax.Array, k: int, rank: int, spread: float = 1e8) -> jax.Array:
  """A random K x K Gramian of rank ``rank`` < K (K tasks whose gradients span ``rank`` dimensions,
  as with fewer shared parameters than tasks), diagonal ``spread ** linspace(0, 1, K)``
  (shuffled), as :func:`ill_conditioned_gramian`."""
  kd, kp = jax.random.split(key)
  a = jax.random.normal(kd, (k, int(rank)), jnp.float32)
  a = a / jnp.linalg.norm(a, axis=1, keepdims=True)
  norms = jax.random.permutation(kp, jnp.sqrt(spread ** jnp.linspace(0.0, 1.0, k)))
  a = a * norms[:, None]
  return a @ a.T


def _timed(method, grams, losses) -> tuple[list, list]:
  """Wall ms of the jitted weighting on each Gramian (cold state) and its outputs."""
  state = init_method_state(method, _PARAMS)
  fn = jax.jit(lambda g, l, s: method.weigh(g, l, s))
  jax.block_until_ready(fn(grams[0], losses, state))  # compile
  times, outs = [], []
  for g in grams:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(g, losses, state))
    times.append(1e3 * (time.perf_counter() - t0))
    outs.append(out)
  return times, outs


def nash_solve_timing(ks: Sequence[int] = (2, 10, 40), repeats: int = 20, seed: int = 0) -> dict:
  """Median wall ms of Nash-MTL's jitted weighting (official defaults) and the worst relative KKT
  residual ``||G a - 1/a|| / ||1/a||`` of its bargaining solution ``a`` (the state's unclipped
  weights), per K: ``{K: {'median_ms', 'kkt_residual', 'solver'}}``."""
  out = {}
  key = jax.random.key(seed)
  for k in ks:
    k = int(k)
    key, sub = jax.random.split(key)
    grams = [random_gramian(kk, k) for kk in jax.random.split(sub, max(int(repeats), 1))]
    method = combiners.method("nash_mtl", k)
    times, outs = _timed(method, grams, jnp.ones((k,), jnp.float32))
    resid = []
    for g, (_, state) in zip(grams, outs):
      g64, a64 = np.asarray(g, np.float64), np.asarray(state.weights, np.float64)
      resid.append(float(np.linalg.norm(g64 @ a64 - 1 / a64) / np.linalg.norm(1 / a64)))
    out[k] = {"median_ms": float(np.median(times)), "kkt_residual": float(np.max(resid)),
              "solver": combiners.hparams("nash_mtl").get("solver", "")}
  return out


def gramian_weightings(names: Sequence[str] = (), k: int = 40) -> list:
  """The registered (or the given) combiners whose ``Method.needs`` is the Gramian (at K=``k``:
  some methods need a few tasks, e.g. Krum)."""
  names = list(names) or combiners.names()
  return [n for n in names if combiners.method(n, int(k)).needs == combiners.GRAMIAN]


def gramian_solve_timing(names: Sequence[str] = (), k: int = 40, repeats: int = 10,
                         spread: float = 1e8, seed: int = 0, rank: int = 0) -> dict:
  """``{name: median ms}`` of every Gramian weighting's jitted ``weigh`` at K=``k`` on ``repeats``
  ill-conditioned Gramians (:func:`ill_conditioned_gramian`; ``rank`` > 0: of that rank,
  :func:`singular_gramian`), each from the method's initial state."""
  key = jax.random.key(seed)
  keys = jax.random.split(key, max(int(repeats), 1))
  grams = [singular_gramian(kk, int(k), rank, spread) if rank else
           ill_conditioned_gramian(kk, int(k), spread) for kk in keys]
  losses = jax.random.uniform(jax.random.fold_in(key, 1), (int(k),), jnp.float32, 0.5, 1.5)
  out = {}
  for name in gramian_weightings(names, k):
    times, _ = _timed(combiners.method(name, int(k)), grams, losses)
    out[name] = float(np.median(times))
  return out


def weigh_ms(method, params, gram, losses, repeats: int = 20) -> float:
  """Median ms of the jitted weighting alone on a given Gramian and losses (its step overhead)."""
  from bench import timing  # pylint: disable=g-import-not-at-top
  state = init_method_state(method, params)
  fn = jax.jit(lambda g, l, s: method.weigh(g, l, s)[0])
  times = timing.time_calls(lambda: fn(gram, losses, state), repeats, warmup=2)
  return 1e3 * timing.median(times)
