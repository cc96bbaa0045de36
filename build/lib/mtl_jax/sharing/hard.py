"""Hard parameter sharing and hierarchical supervision.

* ``hard`` (Caruana 1997): one trunk (all backbone stages), one head per task.
* ``hierarchical`` (Søgaard & Goldberg 2016, "Deep multi-task learning with low level tasks
  supervised at lower layers"): the head of task t reads the output of stage ``depths[t]``
  (1-based: after that many stages), e.g. POS low, chunking higher, NER at the top. Stages above
  the deepest head are not built. ``depths`` default: every head at the top (= ``hard``).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import flax.linen as nn

from mtl_jax.sharing.base import (Defs, MultiTaskModel, head_defs, path_mask, register, run,
                                  stage_defs)

PARTS = ("all", "encode", "decode")


class TrunkModel(nn.Module):
  """A shared trunk; task k's head reads the output of stage ``depths[k]`` (1-based).

  ``part='encode'`` returns the representation (hard: the trunk output; hierarchical: a dict
  ``{depth: output}`` of the depths some head reads), ``part='decode'`` maps it to predictions.
  """

  stages: Defs
  heads: Defs
  task_names: tuple
  depths: tuple
  single_output: bool = True  # encode returns the top output itself (not a dict)

  @nn.compact
  def __call__(self, x, train: bool = False, part: str = "all"):
    if part not in PARTS:
      raise ValueError(f"unknown part {part!r}; valid: {', '.join(PARTS)}")
    needed = sorted(set(self.depths))
    if part == "decode":
      feats = {needed[-1]: x} if self.single_output else x
    else:
      feats = {}
      for i, stage in enumerate(self.stages.modules[:needed[-1]]):
        x = run(self, f"stage_{i}", stage, x, train)
        if i + 1 in needed:
          feats[i + 1] = x
      if part == "encode":
        return feats[needed[-1]] if self.single_output else feats
    return {
        t: run(self, f"head_{t}", h, feats[d], train, stage=False)
        for t, h, d in zip(self.task_names, self.heads.modules, self.depths)
    }


def _shared(params):
  return path_mask(params, ("stage_",))


@register("hard", split=True)
def hard(backbone, tasks) -> MultiTaskModel:
  """Hard sharing: every stage shared, one head per task (no option)."""
  names = tuple(t.name for t in tasks)
  s = len(backbone.stages)
  module = TrunkModel(Defs(stage_defs(backbone)), Defs(head_defs(tasks)), names, (s,) * len(names))
  return MultiTaskModel("hard", module, names, _shared, has_split=True,
                        sample_input=backbone.sample_input)


def resolve_depths(depths, task_names, num_stages) -> tuple:
  if depths is None:
    return (num_stages,) * len(task_names)
  if isinstance(depths, Mapping):
    unknown = set(depths) - set(task_names)
    if unknown:
      raise ValueError(f"hierarchical depths: unknown task(s) {sorted(unknown)}; valid: "
                       f"{', '.join(task_names)}")
    depths = [depths.get(t, num_stages) for t in task_names]
  depths = tuple(int(d) for d in depths)
  if len(depths) != len(task_names):
    raise ValueError(f"hierarchical depths: need {len(task_names)} depths (one per task), "
                     f"got {len(depths)}")
  for d in depths:
    if not 1 <= d <= num_stages:
      raise ValueError(f"hierarchical depths must be in 1..{num_stages} (stages), got {d}")
  return depths


@register("hierarchical", split=True)
def hierarchical(backbone, tasks, *,
                 depths: Optional[Union[Sequence[int], Mapping[str, int]]] = None
                 ) -> MultiTaskModel:
  """Hierarchical supervision: ``depths`` (per task, or ``{task: depth}``; missing tasks at the
  top) = the number of stages below each head. All built stages are shared."""
  names = tuple(t.name for t in tasks)
  d = resolve_depths(depths, names, len(backbone.stages))
  module = TrunkModel(Defs(stage_defs(backbone)), Defs(head_defs(tasks)), names, d,
                      single_output=False)
  return MultiTaskModel("hierarchical", module, names, _shared, options={"depths": d},
                        has_split=True, sample_input=backbone.sample_input)
