"""SDMGrad (Xiao et al. 2023): direction-oriented multi-objective gradient descent (+ SDMGrad-OS)."""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mtl_jax.combiners._qp import project_simplex
from mtl_jax.combiners.base import GRAMIAN, Method, register


class SDMGradState(NamedTuple):
  w: jax.Array  # (K,) simplex weights, warm-started across steps as in the official code
  key: jax.Array  # uint32[2] raw PRNG key (objective sampling; unused without ``os_n``)


def sdmgrad_inner(gramian, w0, lamda: float = 0.3, niter: int = 20, lr: float = 10.0,
                  momentum: float = 0.5):
  """The official inner loop: ``niter`` projected SGD-with-momentum steps on the simplex.

  The objective is ``1/2 w^T G w + lamda w^T G 1/K (+ const)`` on ``G`` divided by ``s^2``,
  ``s = mean_k sqrt(G_kk + 1e-4)``; its gradient ``G w + lamda G 1/K`` is what both official
  versions (``methods/weight_methods.py`` and ``mtrl_files/sdmgrad.py``) feed to
  ``torch.optim.SGD(lr=10, momentum=0.5)`` (buffer ``b <- momentum b + grad``, the first step
  ``b = grad``; ``w <- proj(w - lr b)``), the momentum buffer starting afresh at every call.
  """
  g = jnp.asarray(gramian, jnp.float32)
  scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0) + 1e-4))
  gg = g / scale**2
  gmean = jnp.mean(gg, axis=1)

  def step(carry, _):
    w, buf, first = carry
    grad = gg @ w + lamda * gmean
    buf = jnp.where(first, grad, momentum * buf + grad)
    return (project_simplex(w - lr * buf), buf, False), None

  (w, _, _), _ = jax.lax.scan(step, (w0, jnp.zeros_like(w0), True), None, length=int(niter))
  return w


def _sample_tasks(key, k: int, os_n: int):
  """Bernoulli(os_n / K) per task, redrawn until at least one task is sampled (official)."""

  def draw(carry):
    key, _ = carry
    key, sub = jax.random.split(key)
    return key, jax.random.bernoulli(sub, os_n / k, (k,))

  key, mask = draw((key, None))
  return jax.lax.while_loop(lambda c: ~jnp.any(c[1]), draw, (key, mask))


@register("sdmgrad")
def sdmgrad(num_tasks: int, lamda: float = 0.3, niter: int = 20, lr: float = 10.0,
            momentum: float = 0.5, os_n: Optional[int] = None, seed: int = 0) -> Method:
  """Stochastic Direction-oriented Multi-objective Gradient descent (and SDMGrad-OS).

  Xiao, P., Ban, H. & Ji, K. (2023). "Direction-oriented Multi-objective Learning: Simple and
  Provable Stochastic Algorithms". NeurIPS 2023. Official code: github.com/OptMN-Lab/sdmgrad
  (``SDMGrad.sdmgrad`` in ``methods/weight_methods.py``; ``sdmgrad`` / ``sdmgrad_os`` in
  ``mtrl_files/sdmgrad.py``).

  The simplex weights ``w`` approximately minimise ``|| J^T w + lamda g0 ||^2 / 2`` with
  ``g0 = J^T 1/K`` (the mean gradient) by :func:`sdmgrad_inner` (``niter`` projected SGD steps
  with momentum, gradient ``G w + lamda G 1/K`` on the normalised Gramian); ``w`` persists between
  steps (warm start, initially ``1/K``). The update is ``(J^T w + lamda g0) / (1 + lamda)``, i.e.
  the weights ``(w + lamda / K) / (1 + lamda)``. ``lamda -> inf`` gives the mean gradient,
  ``lamda = 0`` an approximate MGDA. Reference: K=2, ``J = diag(1, 0.5)``, 20 iterations give the
  official weights (0.858, 0.142).

  SDMGrad-OS (objective sampling, ``os_n=n``): each step every task is kept with probability
  ``n / K`` (redrawn until one is kept), the others' gradients are zeroed (their Gramian rows and
  columns), the same inner loop runs on its own warm-started ``w``, and the update is scaled by
  ``K / n`` (the official ``sdmgrad_os``, method name ``sdmgrad_os<n>``). The draws come from the
  state's key (``seed``, ours), split once per step.

  Hyper-parameters (official defaults): ``lamda=0.3``, ``niter=20`` (``run.sh``), inner ``lr=10``,
  ``momentum=0.5`` (fixed in the official code, exposed here), ``os_n=None`` (plain SDMGrad).

  Task-specific parameters: ``specific='sum'``; the official trainers leave each head with its
  own task's unweighted gradient and overwrite only the shared gradient.

  Deviations: the paper's stochastic estimator uses independent mini-batches for the two factors
  of the Gramian and for the update; like the official MTRL routine, this combiner receives one set
  of task gradients and uses it for all three. The NYU-v2/Cityscapes trainer multiplies the update
  by K ("to match the sum loss"); our weights sum to 1 as in the MTRL code and the paper (a
  constant factor, immaterial under Adam). SDMGrad-OS: the engine still computes every task's
  gradient (the official code back-propagates only the sampled ones; the result is the same).
  LibMTL's port (lr 5, another normalisation) differs from the official code; we follow the
  official one.
  """
  if niter < 1:
    raise ValueError(f"sdmgrad: niter must be >= 1, got {niter}")
  if os_n is not None and not 1 <= int(os_n) <= num_tasks:
    raise ValueError(f"sdmgrad: os_n must be None or in 1..{num_tasks}, got {os_n}")
  k = num_tasks

  def init(params):
    del params
    return SDMGradState(jnp.full((k,), 1.0 / k, jnp.float32), jax.random.PRNGKey(seed))

  def weigh(gramian, losses, state):
    del losses
    g = jnp.asarray(gramian, jnp.float32)
    key, gamma, mask = state.key, 1.0, jnp.ones((k,), jnp.float32)
    if os_n is not None:
      key, keep = _sample_tasks(key, k, int(os_n))
      mask, gamma = keep.astype(jnp.float32), k / int(os_n)
      g = g * mask[:, None] * mask[None, :]
    w = sdmgrad_inner(g, state.w, lamda, niter, lr, momentum)
    weights = gamma * mask * (w + lamda / k) / (1.0 + lamda)
    return weights, SDMGradState(w, key)

  return Method("sdmgrad", k, GRAMIAN, init=init, weigh=weigh, specific="sum")
