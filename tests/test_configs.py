"""Every benchmark config file of this module's family loads and validates for each variant."""

import importlib

import pytest

from mtl_jax import config_utils

FILES = ("celeba_base", "nash_celeba", "pcgrad_celeba", "gradnorm_celeba", "ls_celeba",
         "stl_celeba", "multimnist_base", "nash_multimnist", "nyuv2_base", "nash_nyuv2",
         "cityscapes_base", "nash_cityscapes", "conll_base", "nash_conll", "glue_base",
         "nash_glue", "digits_base", "nash_digits")
DATA = {"celeba": "celeba", "multimnist": "multimnist", "nyuv2": "nyuv2",
        "cityscapes": "cityscapes", "conll": "conll2003", "glue": "glue", "digits": "digits"}


def _load(name):
  return importlib.import_module(f"mtl_jax.configs.{name}")


@pytest.mark.parametrize("variant", ["", "smoke", "quick"])
@pytest.mark.parametrize("name", FILES)
def test_config_loads_and_validates(name, variant):
  module = _load(name)
  c = module.get_base(variant) if name.endswith("_base") else module.get_config(variant)
  config_utils.validate(c)
  bench = next(v for k, v in DATA.items() if name.startswith(k) or f"_{k}" in name)
  assert c.data.name == bench
  if variant == "smoke":
    assert c.train.num_steps and c.train.num_steps <= 8
    assert c.data.mock or c.data.name == "digits"
  if variant == "":
    assert c.train.num_epochs >= 1 and c.train.num_steps == 0
  if name.startswith("nash_"):
    assert c.combiner.name == "nash_mtl"


def test_protocol_values():
  c = _load("nash_celeba").get_config("")
  assert (c.optimizer.learning_rate, c.train.batch_size, c.train.num_epochs) == (3e-4, 256, 15)
  assert c.train.select == "mean_main"
  n = _load("nash_nyuv2").get_config("")
  assert (n.optimizer.learning_rate, n.train.batch_size, n.optimizer.schedule) == (1e-4, 2, "step")
  assert _load("stl_celeba").get_config("").model.sharing == "independent"


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown config variant 'fast'; valid: '', smoke, quick"):
    _load("nash_celeba").get_config("fast")
