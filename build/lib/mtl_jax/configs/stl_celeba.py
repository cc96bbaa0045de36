"""Single-task learning on CelebA-40: 40 independent towers (``sharing='independent'``, one
CNN per attribute, the STL baseline of Δm%) trained together with equal weights; each tower sees
only its own task's gradient, so this equals 40 separate runs (FAMO protocol, ``celeba_base``).

    python launch/train.py --config=configs/stl_celeba.py:smoke --workdir=/tmp/stl_celeba
"""

from mtl_jax.configs.celeba_base import get_base


def get_config(arg: str = ""):
  c = get_base(arg)
  c.model.sharing = "independent"
  c.combiner.name = "ls"
  return c
