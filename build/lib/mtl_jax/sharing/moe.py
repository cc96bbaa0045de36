"""Mixture-of-experts sharing: MMoE, CGC and PLE. Experts are copies of the backbone (stacked
parameters, ``jax.vmap``); gates are per-task softmax layers.

* ``mmoe`` (Ma et al. 2018, "Modeling Task Relationships in Multi-task Learning with
  Multi-gate Mixture-of-Experts", KDD): ``num_experts`` shared experts, each the whole backbone;
  task t's input is ``sum_e softmax(W_t x)_e expert_e(x)``.
* ``cgc`` (Tang et al. 2020, "Progressive Layered Extraction (PLE)", RecSys; its single-level
  "Customized Gate Control"): ``num_shared_experts`` shared experts plus ``num_specific_experts``
  per task, each the whole backbone; task t's gate mixes its own and the shared experts.
* ``ple`` (Tang et al. 2020): one extraction level per backbone stage; level l's experts are
  copies of stage l. Task t's specific experts read t's previous-level output, the shared experts
  read the shared one; task gates mix own + shared experts, a shared gate (all but the last level)
  mixes all experts into the next shared input.

Gates are a dense layer on the flattened gate input (the raw input for MMoE and CGC, the previous
level's output in PLE), as LibMTL does for images. The authors released no code; the numbers of
experts are hyper-parameters without an official default (LibMTL requires them): ours are
``num_experts=4`` (MMoE) and one shared plus one specific expert (CGC, PLE).

Shared: the shared experts, PLE's shared gates and the specific experts below PLE's last level
(they feed the shared gate, hence every task); task-specific: the last level's specific experts,
task gates and heads.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.sharing.base import (Defs, MultiTaskModel, head_defs, path_mask, register, run,
                                  stage_defs, take)


def _flat(x, what: str):
  if not isinstance(x, jax.Array) and not hasattr(x, "shape"):
    raise ValueError(f"{what}: gates need array inputs (B, ...); got a "
                     f"{type(x).__name__} pytree")
  return x.reshape(x.shape[0], -1)


def _mix(gate, experts):
  """``sum_e gate[b, e] experts[e, b, ...]``."""
  if not isinstance(experts, jax.Array):
    raise ValueError("mixture of experts needs array expert outputs")
  return jnp.einsum("be,eb...->b...", gate.astype(experts.dtype), experts,
                    precision=jax.lax.Precision.HIGHEST)


def _run_stack(parent, prefix, stages, x, train, copies, x_axis):
  for i, stage in enumerate(stages):
    x = run(parent, f"{prefix}_{i}", stage, x, train, copies=copies, x_axis=x_axis)
    x_axis = 0
  return x


class MMoEModel(nn.Module):
  stages: Defs
  heads: Defs
  task_names: tuple
  num_experts: int

  @nn.compact
  def __call__(self, x, train: bool = False, part: str = "all"):
    if part != "all":
      raise ValueError("mmoe has no single shared representation (part='all' only)")
    g_in = _flat(x, "mmoe")
    experts = _run_stack(self, "expert", self.stages.modules, x, train, self.num_experts, None)
    out = {}
    for k, (t, head) in enumerate(zip(self.task_names, self.heads.modules)):
      gate = nn.softmax(nn.Dense(self.num_experts, name=f"gate_{k}")(g_in))
      out[t] = run(self, f"head_{t}", head, _mix(gate, experts), train, stage=False)
    return out


class PLEModel(nn.Module):
  """PLE with ``levels`` = groups of stages (CGC: one level holding every stage)."""

  stages: Defs
  heads: Defs
  task_names: tuple
  num_shared: int
  num_specific: int
  levels: tuple  # tuple of tuples of stage indices

  @nn.compact
  def __call__(self, x, train: bool = False, part: str = "all"):
    if part != "all":
      raise ValueError("cgc/ple have no single shared representation (part='all' only)")
    k, es, ek = len(self.task_names), self.num_shared, self.num_specific
    specific_in, shared_in, spec_axis = x, x, None  # level 1: every expert reads the input
    for lvl, idx in enumerate(self.levels):
      stages = [self.stages.modules[i] for i in idx]
      last = lvl == len(self.levels) - 1
      if spec_axis is None:
        spec_x = specific_in
      else:  # copy t * ek + e reads task t's input
        spec_x = jnp.repeat(specific_in, ek, axis=0)
      spec = _run_stack(self, f"specific_l{lvl}", stages, spec_x, train, k * ek, spec_axis)
      shared = _run_stack(self, f"shared_expert_l{lvl}", stages, shared_in, train, es, None)
      spec = spec.reshape((k, ek) + spec.shape[1:])
      new_specific = []
      for t in range(k):
        g_in = _flat(specific_in if spec_axis is None else specific_in[t], "cgc/ple")
        gate = nn.softmax(nn.Dense(ek + es, name=f"gate_l{lvl}_{t}")(g_in))
        new_specific.append(_mix(gate, jnp.concatenate([spec[t], shared], axis=0)))
      if not last:
        g_in = _flat(shared_in, "ple")
        gate = nn.softmax(nn.Dense(k * ek + es, name=f"shared_gate_l{lvl}")(g_in))
        all_experts = jnp.concatenate([spec.reshape((k * ek,) + spec.shape[2:]), shared], axis=0)
        shared_in = _mix(gate, all_experts)
      specific_in, spec_axis = jnp.stack(new_specific), 0
    return {t: run(self, f"head_{t}", h, take(specific_in, j), train, stage=False)
            for j, (t, h) in enumerate(zip(self.task_names, self.heads.modules))}


def _positive(name, value):
  if int(value) < 0 or int(value) != value:
    raise ValueError(f"{name} must be a non-negative integer, got {value}")
  return int(value)


@register("mmoe")
def mmoe(backbone, tasks, *, num_experts: int = 4) -> MultiTaskModel:
  """MMoE: ``num_experts`` whole-backbone experts shared by all tasks, one gate per task."""
  if _positive("num_experts", num_experts) < 1:
    raise ValueError("num_experts must be >= 1")
  names = tuple(t.name for t in tasks)
  module = MMoEModel(Defs(stage_defs(backbone)), Defs(head_defs(tasks)), names, int(num_experts))
  return MultiTaskModel("mmoe", module, names, lambda p: path_mask(p, ("expert_",)),
                        options={"num_experts": int(num_experts)},
                        sample_input=backbone.sample_input)


def _ple_model(name, backbone, tasks, num_shared, num_specific, levels):
  es = _positive("num_shared_experts", num_shared)
  ek = _positive("num_specific_experts", num_specific)
  if es < 1 or ek < 1:
    raise ValueError(f"{name}: needs at least one shared and one specific expert "
                     f"(got {es} shared, {ek} specific)")
  names = tuple(t.name for t in tasks)
  module = PLEModel(Defs(stage_defs(backbone)), Defs(head_defs(tasks)), names, es, ek, levels)
  # A specific expert below the last level feeds the shared gate, hence every task: shared.
  shared = ("shared_expert_", "shared_gate_") + tuple(
      f"specific_l{lvl}_" for lvl in range(len(levels) - 1))
  return MultiTaskModel(name, module, names, lambda p: path_mask(p, shared),
                        options={"num_shared_experts": es, "num_specific_experts": ek},
                        sample_input=backbone.sample_input)


@register("cgc")
def cgc(backbone, tasks, *, num_shared_experts: int = 1,
        num_specific_experts: int = 1) -> MultiTaskModel:
  """CGC: shared + per-task whole-backbone experts, one gate per task over its own + shared."""
  levels = (tuple(range(len(backbone.stages))),)
  return _ple_model("cgc", backbone, tasks, num_shared_experts, num_specific_experts, levels)


@register("ple")
def ple(backbone, tasks, *, num_shared_experts: int = 1,
        num_specific_experts: int = 1) -> MultiTaskModel:
  """PLE: one CGC extraction level per backbone stage, with shared gates between levels."""
  levels = tuple((i,) for i in range(len(backbone.stages)))
  return _ple_model("ple", backbone, tasks, num_shared_experts, num_specific_experts, levels)
