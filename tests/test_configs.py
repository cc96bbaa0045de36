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
  assert (c.data.image_size, c.train.select) == (64, "mean_main")
  assert (c.optimizer.name, c.optimizer.schedule, c.data.get("augment", False)) == (
      "adam", "constant", False)
  # NYUv2 and Cityscapes: the CAGrad / Nash-MTL / FAMO trainers (MTAN, Adam 1e-4, StepLR(100, 0.5)
  # over 200 epochs; MTAN's scale-crop + flip on both: CAGrad's run.sh passes
  # --apply_augmentation), selection by validation Delta_m (the docstrings' deviation: the papers
  # average the last epochs)
  for name, batch, augment in (("nash_nyuv2", 2, True), ("nash_cityscapes", 8, True)):
    d = _load(name).get_config("")
    o = d.optimizer
    assert (o.name, o.learning_rate, o.schedule, o.decay_boundaries, o.decay_rate) == (
        "adam", 1e-4, "step", (0.5,), 0.5), name
    assert (d.train.batch_size, d.train.num_epochs, d.data.augment) == (batch, 200, augment)
    assert (d.model.sharing, d.train.select) == ("mtan", "delta_m")
  m = _load("nash_multimnist").get_config("")
  assert (m.optimizer.name, m.optimizer.learning_rate, m.train.batch_size,
          m.train.num_epochs) == ("adam", 5e-4, 256, 100)
  # MGDA's train_multi_task.py: lr *= 0.85 at the start of epochs 10, 20, ..., 100 (1-based)
  o = m.optimizer
  assert (o.schedule, o.decay_rate) == ("step", 0.85) and not m.data.get("augment", False)
  steps_per_epoch = 50_000 // 256
  assert [round(f * 100 * steps_per_epoch) for f in o.decay_boundaries] == [
      e * steps_per_epoch for e in range(9, 100, 10)]
  assert _load("nash_digits").get_config("").optimizer.schedule == "constant"


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown config variant 'fast'; valid: '', smoke, quick"):
    _load("nash_celeba").get_config("fast")
