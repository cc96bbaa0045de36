"""PCGrad (Yu et al., NeurIPS 2020) on CelebA-40 under the FAMO protocol (see ``celeba_base``).

    python launch/train.py --config=configs/pcgrad_celeba.py:smoke --workdir=/tmp/pcgrad_celeba
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from celeba_base import get_base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str = ""):
  c = get_base(arg)
  c.combiner.name = "pcgrad"
  return c
