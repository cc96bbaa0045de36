"""Nash-MTL (Navon et al., ICML 2022) on ``multimnist_base`` (the benchmark's protocol there).

    python launch/train.py --config=configs/nash_multimnist.py:smoke --workdir=/tmp/nash_multimnist
"""

from mtl_jax.configs.multimnist_base import get_base


def get_config(arg: str = ""):
  c = get_base(arg)
  c.combiner.name = "nash_mtl"
  return c
