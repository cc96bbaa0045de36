"""Nash-MTL (Navon et al., ICML 2022) on ``glue_base`` (the benchmark's protocol there).

    python launch/train.py --config=configs/nash_glue.py:smoke --workdir=/tmp/nash_glue
"""

from mtl_jax.configs.glue_base import get_base


def get_config(arg: str = ""):
  c = get_base(arg)
  c.combiner.name = "nash_mtl"
  return c
