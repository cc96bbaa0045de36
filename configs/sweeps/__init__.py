"""Sweep configs for ``launch/sweep.py``."""

import ml_collections


def structure_variants(tree: str, recon: bool = False) -> ml_collections.ConfigDict:
  """The ``sharing_variants`` of a structure study (``structure_qm9.py``, ``structure_digits.py``):
  ``branched`` (the hand-written ``tree`` override, ``structure.method=fixed``), ``affinity``,
  ``conflict`` (Recon-style, the top stage in the same run), ``learn_to_branch``, and with
  ``recon`` Recon's retrain-from-scratch of the conflict choice."""
  v = {"branched": ("branched", "structure.method=fixed", tree),
       "affinity": ("hard", "structure.method=affinity"),
       "conflict": ("hard", "structure.method=conflict", "structure.top_k=1")}
  if recon:
    v["recon"] = v["conflict"] + ("structure.restart=True",)
  v["learn_to_branch"] = ("hard", "structure.method=learn_to_branch")
  return ml_collections.ConfigDict(v)
