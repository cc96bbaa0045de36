"""Nash-MTL (Navon et al., ICML 2022) on ``nyuv2_base`` (the benchmark's protocol there).

    python launch/train.py --config=configs/nash_nyuv2.py:smoke --workdir=/tmp/nash_nyuv2
"""

from mtl_jax.configs.nyuv2_base import get_base


def get_config(arg: str = ""):
  c = get_base(arg)
  c.combiner.name = "nash_mtl"
  return c
