"""Nash-MTL (Navon et al., ICML 2022) on ``nyuv2_base`` (the benchmark's protocol there).

    python launch/train.py --config=configs/nash_nyuv2.py:smoke --workdir=/tmp/nash_nyuv2
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nyuv2_base import get_base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str = ""):
  c = get_base(arg)
  c.combiner.name = "nash_mtl"
  return c
