"""MoCo (Fernando et al. 2023): MGDA with tracked (momentum-corrected) gradient estimates.

Also home of the small tree helpers that the Jacobian methods with per-parameter state (MoCo,
DB-MTL, ExcessMTL) share.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.combiners.base import JACOBIAN, Method, register


# ---------------------------------------------------------------------------------------------
# Helpers over a shared-only Jacobian tree (``None`` at task-specific leaves).


def _is_none(x):
  return x is None


def per_task_zeros(params, shared_mask, num_tasks: int):
  """``(K, *leaf.shape)`` zeros for every shared leaf; ``(K, 1)`` placeholders elsewhere.

  ``shared_mask=None`` (the engine calling ``init(params)`` directly) allocates every leaf. The
  placeholders are not ``(K, 0)``: orbax refuses to save zero-size arrays, and the state must
  checkpoint.
  """
  if shared_mask is None:
    shared_mask = jax.tree.map(lambda _: True, params)
  return jax.tree.map(
      lambda p, m: jnp.zeros((num_tasks,) + tuple(jnp.shape(p)) if m else (num_tasks, 1),
                             jnp.float32), params, shared_mask)


def shared_map(fn, jac, *trees):
  """``fn(j, *leaves)`` on shared leaves (``j`` not None); ``trees[0]``'s leaf elsewhere."""
  return jax.tree.map(lambda j, *xs: xs[0] if j is None else fn(j, *xs), jac, *trees,
                      is_leaf=_is_none)


def shared_update(fn, jac, *trees):
  """``fn(j, *leaves)`` on shared leaves and ``None`` elsewhere (the shape of an update)."""
  return jax.tree.map(lambda j, *xs: None if j is None else fn(j, *xs), jac, *trees,
                      is_leaf=_is_none)


def _rows(x):
  return x.reshape(x.shape[0], -1).astype(jnp.float32)


def shared_gramian(jac, tree=None) -> jax.Array:
  """Gramian of ``tree``'s rows over the leaves where ``jac`` is not None (``tree=jac`` by default)."""
  tree = jac if tree is None else tree
  pairs = [(j, t) for j, t in zip(jax.tree.leaves(jac, is_leaf=_is_none),
                                  jax.tree.leaves(tree, is_leaf=_is_none)) if j is not None]
  return sum(jnp.dot(_rows(t), _rows(t).T, precision=jax.lax.Precision.HIGHEST)
             for _, t in pairs)


def row_scale(weights, x):
  """``weights[k] * x[k]`` for a leaf with a leading K axis."""
  return x * weights.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def combine_rows(weights, x):
  return jnp.tensordot(weights.astype(x.dtype), x, axes=1)


# ---------------------------------------------------------------------------------------------


class MoCoState(NamedTuple):
  y: Any  # tree: (K, *leaf.shape) tracked gradient estimates at shared leaves
  lambd: jax.Array  # (K,) weights on the simplex
  step: jax.Array  # int32: steps taken


@register("moco")
def moco(num_tasks: int, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
         gamma_sigma: float = 0.5, rho: float = 0.0) -> Method:
  """MoCo: multi-objective gradient with correction.

  Fernando, H., Shen, H., Liu, M., Chaudhury, S., Murugesan, K. & Chen, T. (2023). "Mitigating
  Gradient Bias in Multi-objective Learning: A Provably Convergent Approach". ICLR 2023.
  Reference code: LibMTL's ``MoCo`` (written from the authors' shared code; the authors' repository
  is not public).

  At step t (from 1), with task gradients ``g_k`` on the shared parameters and losses ``L_k``:

  * ``ghat_k = g_k / (||g_k|| + 1e-8) * L_k`` (the code's normalisation of each task gradient);
  * tracking: ``y_k <- y_k - beta_t (y_k - ghat_k)``, ``beta_t = beta / t^beta_sigma`` (y from 0);
  * weights: ``lambda <- softmax(lambda - gamma_t (Y Y^T + rho I) lambda)``,
    ``gamma_t = gamma / t^gamma_sigma`` (lambda from 1/K);
  * update on the shared parameters: ``Y^T lambda``.

  ``y`` depends on every past gradient, so MoCo is a Jacobian method (not a weighting) with state
  of the size of K copies of the shared parameters. Pass the shared mask to the transform
  (``combiners.moco(K, shared_mask=...)``) so that ``init`` allocates it for the shared leaves only.

  Hyper-parameters (LibMTL defaults): ``beta=0.5``, ``beta_sigma=0.5``, ``gamma=0.1``,
  ``gamma_sigma=0.5``, ``rho=0``.

  Task-specific parameters: ``specific='sum'`` (each head receives its own task's unweighted
  gradient, as LibMTL where only the shared gradient is overwritten).

  Deviations: the paper's Algorithm 1 projects ``y`` onto a bounded set and ``lambda`` onto the
  simplex by a Euclidean projection; the reference code (followed here) uses the normalised
  gradients above and a softmax instead.
  """
  k = num_tasks

  def init(params, shared_mask=None):
    return MoCoState(per_task_zeros(params, shared_mask, k),
                     jnp.full((k,), 1.0 / k, jnp.float32), jnp.zeros((), jnp.int32))

  def aggregate(jac, losses, state):
    step = state.step + 1
    t = step.astype(jnp.float32)
    sq = sum(jnp.sum(_rows(j)**2, axis=1) for j in jax.tree.leaves(jac))
    scale = losses / (jnp.sqrt(sq) + 1e-8)
    beta_t = beta / t**beta_sigma
    gamma_t = gamma / t**gamma_sigma
    y = shared_map(lambda j, yy: yy - beta_t * (yy - row_scale(scale, j)), jac, state.y)
    yy = shared_gramian(jac, y)
    lambd = jax.nn.softmax(state.lambd - gamma_t * ((yy + rho * jnp.eye(k)) @ state.lambd))
    update = shared_update(lambda j, yl: combine_rows(lambd, yl).astype(j.dtype), jac, y)
    return update, jnp.ones((k,), jnp.float32), MoCoState(y, lambd, step)

  return Method("moco", k, JACOBIAN, init=init, aggregate=aggregate, specific="sum")
