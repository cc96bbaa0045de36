"""Nash-MTL (Navon et al., ICML 2022) on CelebA-40 under the FAMO protocol (see ``celeba_base``).

    python launch/train.py --config=configs/nash_celeba.py:smoke --workdir=/tmp/nash_celeba
"""

from mtl_jax.configs.celeba_base import get_base


def get_config(arg: str = ""):
  c = get_base(arg)
  c.combiner.name = "nash_mtl"
  return c
