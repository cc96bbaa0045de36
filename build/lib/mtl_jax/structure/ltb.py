"""Learning to Branch: a Gumbel-softmax search over parent choices that ends with a task tree.

Guo, Lee, Ulbricht, "Learning to Branch for Multi-Task Learning", ICML 2020. The search space is a
tree-structured super-network: stage ``s`` has ``nodes[s]`` copies ("nodes"); every node of stage
``s >= 1`` reads the output of one node of stage ``s - 1`` and every task head reads one node of
the last stage, each choice a categorical distribution with learned logits, sampled with the
Gumbel-softmax (Jang et al. 2017; Maddison et al. 2017) so that the network weights and the
branching logits train together by back-propagation. After the search each node keeps its most
probable parent; following the tasks' paths up from the heads gives, per stage, the groups of tasks
that share a node: a tree for the ``branched`` strategy (:func:`tree_from_logits`), which is then
trained from scratch, as in the paper.

Choices, following LibMTL's implementation (``LibMTL/architecture/LTB.py``) where the paper leaves
them open: ``nodes[s] = K`` at every stage by default (the search network is as large as K
independent ones); the logits start at 0 (uniform parents); the sample is *hard* (straight-through:
one-hot forward, the soft sample's gradient backward); the temperature decays as LibMTL's
``tau = (E / 20) / sqrt(e + 1)`` over ``E = 100`` epochs, read here as a fraction of the search:
``tau(t) = tau_start / sqrt(1 + 99 t / T)`` (5 down to 0.5 by default). Deviations: (1) no warm-up
epochs with all parents summed (LibMTL's first 1% of epochs); (2) the search minimises the plain
sum of the task losses with Adam, weights and logits in the same steps (the logits may get their
own learning rate, ``branch_learning_rate``); the paper's optimisation schedule (learning rates,
epochs, any alternation) is not reproduced; (3) the
heads choose among the last stage's nodes, as the paper's task leaves do (LibMTL instead wires
task k to node k of the last stage, which is then never shared); (4) nodes
of stage 0 all read the input (the paper's root); integer leaves of a stage output (e.g. graph
indices) are taken from the chosen parent instead of being mixed. AdaShare (Sun et al. 2020) is not
offered: its per-task skip of residual blocks needs stages whose input and output shapes agree,
which most backbones here do not have.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax.sharing.base import Defs, _unfreeze, head_defs, run, stage_defs, take
from mtl_jax.structure import tree as T


def gumbel_softmax(logits: jax.Array, tau, rng, hard: bool = True) -> jax.Array:
  """A Gumbel-softmax sample over the last axis; ``hard``: one-hot forward, soft gradient."""
  g = jax.random.gumbel(rng, logits.shape, logits.dtype)
  soft = jax.nn.softmax((logits + g) / tau, axis=-1)
  if not hard:
    return soft
  one = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
  return one + soft - jax.lax.stop_gradient(soft)


def _mix(weights, x):
  """``out[j] = sum_p weights[j, p] x[p]`` for float leaves; integer leaves follow the argmax."""
  pick = jnp.argmax(weights, axis=-1)

  def one(a):
    if jnp.issubdtype(a.dtype, jnp.inexact):
      return jnp.einsum("jp,p...->j...", weights.astype(a.dtype), a,
                        precision=jax.lax.Precision.HIGHEST)
    return a[pick]

  return jax.tree.map(one, x)


class SuperNet(nn.Module):
  """The search network: ``nodes[s]`` copies of stage ``s`` (``node_<s>``, stacked), parent
  logits ``branch_<s>`` (``nodes[s] x nodes[s-1]``) and ``branch_heads`` (``K x nodes[-1]``)."""

  stages: Defs
  heads: Defs
  task_names: tuple
  nodes: tuple

  def _choice(self, name, shape, tau, train):
    logits = self.param(name, nn.initializers.zeros, shape, jnp.float32)
    if train:
      return gumbel_softmax(logits, tau, self.make_rng("gumbel"))
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), shape[-1])

  @nn.compact
  def __call__(self, x, train: bool = False, tau: float = 1.0):
    axis = None
    for s, stage in enumerate(self.stages.modules):
      if s > 0:
        x = _mix(self._choice(f"branch_{s}", (self.nodes[s], self.nodes[s - 1]), tau, train), x)
      x = run(self, f"node_{s}", stage, x, train, copies=self.nodes[s], x_axis=axis)
      axis = 0
    feats = _mix(self._choice("branch_heads", (len(self.task_names), self.nodes[-1]), tau, train), x)
    return {t: run(self, f"head_{t}", h, take(feats, k), train, stage=False)
            for k, (t, h) in enumerate(zip(self.task_names, self.heads.modules))}


def tree_from_logits(params, num_stages: int, num_tasks: int) -> tuple:
  """The discrete tree: every node keeps its most probable parent; tasks that pass through the
  same node of stage ``s`` form a group of stage ``s`` (canonical, see :mod:`..tree`)."""
  node = np.argmax(np.asarray(params["branch_heads"]), axis=-1)  # task -> node of the last stage
  per_stage = [node]
  for s in range(num_stages - 1, 0, -1):
    node = np.argmax(np.asarray(params[f"branch_{s}"]), axis=-1)[node]
    per_stage.append(node)
  per_stage = per_stage[::-1]
  tree = [[[k for k in range(num_tasks) if nodes[k] == n] for n in sorted(set(nodes.tolist()))]
          for nodes in per_stage]
  return T.canonical(tree, list(range(num_tasks)), num_stages)


def temperature(step, num_steps: int, tau_start: float = 5.0):
  """LibMTL's schedule read over the search: ``tau_start / sqrt(1 + 99 step / num_steps)``."""
  return tau_start / jnp.sqrt(1.0 + 99.0 * step / max(int(num_steps), 1))


class Search(NamedTuple):
  tree: tuple  # canonical
  variables: Any  # the super-network's variables after the search
  losses: np.ndarray  # (num_steps, K)
  probabilities: dict  # softmax of every logit matrix


def _optimizer(learning_rate, branch_learning_rate):
  if branch_learning_rate is None:
    return optax.adam(learning_rate)
  label = lambda p: {n: jax.tree.map(lambda _, b=n.startswith("branch_"): "branch" if b else "net",
                                     v) for n, v in p.items()}
  return optax.multi_transform({"net": optax.adam(learning_rate),
                                "branch": optax.adam(branch_learning_rate)}, label)


def learn_to_branch(backbone, tasks: Sequence, batches: Iterable[Any], *, num_steps: int,
                    nodes: Optional[Sequence[int]] = None, learning_rate: float = 1e-3,
                    branch_learning_rate: Optional[float] = None, tau_start: float = 5.0,
                    seed: int = 0) -> Search:
  """Search a tree over ``backbone``'s stages for ``tasks`` on single-input ``batches``
  (``{'inputs', 'targets'}``, at least ``num_steps`` of them). Returns :class:`Search`."""
  tasks = list(tasks)
  k, s = len(tasks), len(backbone.stages)
  nodes = tuple(int(n) for n in (nodes if nodes is not None else (k,) * s))
  if len(nodes) != s or min(nodes) < 1:
    raise ValueError(f"learn_to_branch: nodes needs {s} positive counts (one per stage), got {nodes}")
  if int(num_steps) < 1:
    raise ValueError(f"learn_to_branch: num_steps must be >= 1, got {num_steps}")
  net = SuperNet(Defs(stage_defs(backbone)), Defs(head_defs(tasks)),
                 tuple(t.name for t in tasks), nodes)
  it = iter(batches)
  first = next(it)
  key = jax.random.key(seed)
  variables = _unfreeze(net.init({"params": key, "dropout": key, "gumbel": key}, first["inputs"]))
  tx = _optimizer(learning_rate, branch_learning_rate)

  def loss_fn(params, bs, batch, rng, tau):
    rngs = dict(zip(("dropout", "gumbel"), jax.random.split(rng)))
    v = dict(variables, params=params, **({"batch_stats": bs} if bs else {}))
    if bs:
      preds, upd = net.apply(v, batch["inputs"], train=True, tau=tau, rngs=rngs,
                             mutable=["batch_stats"])
      bs = upd["batch_stats"]
    else:
      preds = net.apply(v, batch["inputs"], train=True, tau=tau, rngs=rngs)
    losses = jnp.stack([t.loss(preds[t.name], batch["targets"][t.name]) for t in tasks])
    return jnp.sum(losses), (losses, bs)

  @jax.jit
  def step(params, bs, opt, batch, i):
    rng = jax.random.fold_in(jax.random.key(seed + 1), i)
    grad, (losses, bs) = jax.grad(loss_fn, has_aux=True)(
        params, bs, batch, rng, temperature(i, num_steps, tau_start))
    upd, opt = tx.update(grad, opt, params)
    return optax.apply_updates(params, upd), bs, opt, losses

  params, bs = variables["params"], variables.get("batch_stats", {})
  opt = tx.init(params)
  history = []
  batch = first
  for i in range(int(num_steps)):
    params, bs, opt, losses = step(params, bs, opt, batch, i)
    history.append(np.asarray(losses))
    if i + 1 < int(num_steps):
      batch = next(it)
  params = jax.device_get(params)
  probs = {n: np.asarray(jax.nn.softmax(v, axis=-1)) for n, v in params.items()
           if n.startswith("branch_")}
  out = dict(variables, params=params, **({"batch_stats": bs} if bs else {}))
  return Search(tree_from_logits(params, s, k), out, np.stack(history), probs)
