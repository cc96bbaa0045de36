"""Scale-invariant linear scalarisation: minimise ``sum_k log L_k``."""

import jax.numpy as jnp

from mtl_jax.combiners.base import LOSSES, EmptyState, Method, register


def positive(losses, eps):
  """Losses clamped to ``>= eps``: the log-based methods assume positive losses."""
  return jnp.maximum(jnp.asarray(losses, jnp.float32), eps)


@register("si")
def si(num_tasks: int, task_weights=None, eps: float = 1e-8) -> Method:
  """Scale-invariant loss ``sum_k c_k log L_k`` (the "SI" baseline of Navon et al., Nash-MTL, 2022).

  Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task Learning as a
  Bargaining Game", ICML 2022 (their ``ScaleInvariantLinearScalarization``, registered as
  ``scaleinvls``). Invariant to a rescaling ``L_k -> s_k L_k`` of any task.

  As a weighting: the gradient of ``c_k log L_k`` is ``(c_k / L_k) grad L_k``, so the weights are
  ``w_k = c_k / L_k`` (the losses are constants to the engine: one backward of ``sum w_k L_k``
  gives exactly the gradient of ``sum c_k log L_k``).

  Hyper-parameters (official names and defaults): ``task_weights`` (``c``, default all ones).
  ``eps`` (ours, 1e-8): the log needs positive losses; each loss is clamped to ``>= eps`` before
  dividing, so a zero or negative loss gives the finite weight ``c_k / eps`` instead of the
  official code's ``inf``/``nan`` (a negative loss has no meaning for this method).
  Task-specific parameters: ``w_k g_k`` (``specific='weighted'``), as in the official code.
  """
  c = (jnp.ones((num_tasks,), jnp.float32)
       if task_weights is None else jnp.asarray(task_weights, jnp.float32))
  if c.shape != (num_tasks,):
    raise ValueError(f"si: task_weights has shape {c.shape}, expected ({num_tasks},)")
  if not eps > 0:
    raise ValueError(f"si: eps must be > 0, got {eps}")

  def weigh(gramian, losses, state):
    del gramian
    return c / positive(losses, eps), state

  return Method("si", num_tasks, LOSSES, init=lambda params: EmptyState(), weigh=weigh)
