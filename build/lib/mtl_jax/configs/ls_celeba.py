"""linear scalarisation (equal weights) on CelebA-40 under the FAMO protocol (see ``celeba_base``).

    python launch/train.py --config=configs/ls_celeba.py:smoke --workdir=/tmp/ls_celeba
"""

from mtl_jax.configs.celeba_base import get_base


def get_config(arg: str = ""):
  c = get_base(arg)
  c.combiner.name = "ls"
  return c
