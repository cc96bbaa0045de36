"""Linear scalarisation (equal weights) on QM9, the LS row of Nash-MTL's Table 3, over
``qm9_base``.

    python launch/train.py --config=configs/ls_qm9.py:quick --workdir=/tmp/ls_qm9
"""

from mtl_jax.configs.qm9_base import get_base


def get_config(arg: str = ""):
  c = get_base(arg)
  c.combiner.name = "ls"
  return c
