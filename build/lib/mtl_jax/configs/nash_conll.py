"""Nash-MTL (Navon et al., ICML 2022) on ``conll_base`` (the benchmark's protocol there).

    python launch/train.py --config=configs/nash_conll.py:smoke --workdir=/tmp/nash_conll
"""

from mtl_jax.configs.conll_base import get_base


def get_config(arg: str = ""):
  c = get_base(arg)
  c.combiner.name = "nash_mtl"
  return c
