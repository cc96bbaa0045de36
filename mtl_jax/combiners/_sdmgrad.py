"""SDMGrad (Xiao et al. 2023): direction-oriented multi-objective gradient descent."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.combiners._qp import project_simplex
from mtl_jax.combiners.base import GRAMIAN, Method, register


class SDMGradState(NamedTuple):
  w: jax.Array  # (K,) simplex weights, warm-started across steps as in the official code


@register("sdmgrad")
def sdmgrad(num_tasks: int, lamda: float = 0.3, niter: int = 20, lr: float = 10.0,
            momentum: float = 0.5) -> Method:
  """Stochastic Direction-oriented Multi-objective Gradient descent.

  Xiao, P., Ban, H. & Ji, K. (2023). "Direction-oriented Multi-objective Learning: Simple and
  Provable Stochastic Algorithms". NeurIPS 2023. Official code: github.com/OptMN-Lab/sdmgrad
  (``sdmgrad(w, grads, lmbda, niter)`` in the NYU-v2/Cityscapes trainers).

  The simplex weights ``w`` approximately minimise ``|| J^T w + lamda g0 ||^2`` with
  ``g0 = J^T 1/K`` (the mean gradient), by ``niter`` steps of projected SGD with momentum on the
  Gramian normalised by ``s^2``, ``s = mean_k sqrt(G_kk + 1e-4)``; ``w`` persists between steps
  (warm start, initially ``1/K``) while the momentum buffer restarts at every step, as in the
  official code. The update is ``(J^T w + lamda g0) / (1 + lamda)``, i.e. the weights
  ``(w + lamda / K) / (1 + lamda)``. ``lamda -> inf`` gives the mean gradient, ``lamda = 0`` an
  approximate MGDA.

  Hyper-parameters (official defaults): ``lamda=0.3``, ``niter=20`` (``run.sh``); the inner
  optimiser is fixed in the official code to SGD with ``lr=10``, ``momentum=0.5`` on the objective
  ``w^T G w + 2 lamda w^T G 1/K + lamda^2 1^T G 1 / K^2`` (exposed here as ``lr``/``momentum``).

  Task-specific parameters: ``specific='sum'``; the official trainers leave each head with its
  own task's unweighted gradient and overwrite only the shared gradient.

  Deviations: the paper's stochastic estimator uses independent mini-batches for the two factors
  of the Gramian and for the update; like the official ``sdmgrad`` routine, this combiner receives
  one set of task gradients and uses it for all three. LibMTL's port (lr 5, un-doubled gradient,
  another normalisation) differs from the official code; we follow the official one.
  """
  if niter < 1:
    raise ValueError(f"sdmgrad: niter must be >= 1, got {niter}")
  k = num_tasks

  def weigh(gramian, losses, state):
    del losses
    g = jnp.asarray(gramian, jnp.float32)
    scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0) + 1e-4))
    gg = g / scale**2
    gmean = jnp.mean(gg, axis=1)

    def step(carry, _):
      w, buf, first = carry
      grad = 2.0 * (gg @ w) + 2.0 * lamda * gmean
      buf = jnp.where(first, grad, momentum * buf + grad)
      w = project_simplex(w - lr * buf)
      return (w, buf, False), None

    (w, _, _), _ = jax.lax.scan(step, (state.w, jnp.zeros((k,), jnp.float32), True), None,
                                length=niter)
    weights = (w + lamda / k) / (1.0 + lamda)
    return weights, SDMGradState(w)

  return Method("sdmgrad", k, GRAMIAN,
                init=lambda params: SDMGradState(jnp.full((k,), 1.0 / k, jnp.float32)),
                weigh=weigh, specific="sum")
