"""linear scalarisation (equal weights) on CelebA-40 under the FAMO protocol (see ``celeba_base``).

    python launch/train.py --config=configs/ls_celeba.py:smoke --workdir=/tmp/ls_celeba
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from celeba_base import get_base  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str = ""):
  c = get_base(arg)
  c.combiner.name = "ls"
  return c
