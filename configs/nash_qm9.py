"""Nash-MTL on QM9 (Navon et al. 2022, Table 3), over ``qm9_base``.

    python launch/train.py --config=configs/nash_qm9.py:quick --workdir=/tmp/nash_qm9

Nash-MTL's QM9 settings in the official code: ``update_weights_every=1``, ``optim_niter=20``,
``max_norm=1.0`` (the method's own defaults).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qm9_base import get_base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str = ""):
  c = get_base(arg)
  c.combiner.name = "nash_mtl"
  if (arg or "").strip() == "quick":
    # Nash-MTL needs the 11x11 Gramian (11 VJPs a step): measured here at ~2.5 CPU-s per step at
    # batch 64 (LS: ~0.25), so the quick run halves the batch to stay within CPU minutes.
    c.train.batch_size = 32
  return c
