"""GradNorm (Chen et al., ICML 2018) on CelebA-40 under the FAMO protocol (see ``celeba_base``).

    python launch/train.py --config=configs/gradnorm_celeba.py:smoke --workdir=/tmp/gradnorm_celeba
"""

from mtl_jax.configs.celeba_base import get_base


def get_config(arg: str = ""):
  c = get_base(arg)
  c.combiner.name = "gradnorm"
  return c
