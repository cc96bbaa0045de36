"""The validation-driven plateau schedule (issue 16.4): PyTorch ReduceLROnPlateau semantics via
optax.contrib.reduce_on_plateau, its state in the TrainState (checkpointed), and the QM9 protocol
config's numbers (the official trainer's ReduceLROnPlateau(mode='min', factor=0.7, patience=5,
min_lr=1e-5) stepped on the validation Delta_m each epoch)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import train
from mtl_jax.configs import qm9_base, synthetic


def _torch_reduce_on_plateau(values, lr, factor, patience, min_lr, threshold=1e-4):
  """PyTorch's ReduceLROnPlateau(mode='min', threshold_mode='rel', cooldown=0), written out."""
  best, bad, out = float("inf"), 0, []
  for v in values:
    if v < best * (1 - threshold):
      best, bad = v, 0
    else:
      bad += 1
    if bad > patience:
      lr, bad = max(lr * factor, min_lr), 0
    out.append(lr)
  return out


def _schedule(config, values):
  tx = train.make_plateau(config)
  state = tx.init({"w": jnp.zeros(3)})
  update = jax.jit(lambda s, v: tx.update({}, s, value=v)[1])
  lrs = []
  for v in values:
    state = update(state, jnp.float32(v))
    lrs.append(float(state.scale) * config.optimizer.learning_rate)
  return lrs


def test_qm9_protocol_config_pins_the_official_schedule():
  c = qm9_base.get_base("")
  o = c.optimizer
  assert (o.name, o.learning_rate, o.schedule) == ("adam", 1e-3, "plateau")
  assert (o.plateau_factor, o.plateau_patience, o.plateau_min_lr) == (0.7, 5, 1e-5)
  assert (c.train.batch_size, c.train.num_epochs, c.train.select) == (120, 300, "delta_m")
  # The plateau steps at each evaluation: one per epoch of 110,831 molecules in full batches.
  assert c.train.eval_every == (130_831 - 2 * 10_000) // 120 == 923


def test_plateau_matches_pytorch_on_a_plateau_and_stops_at_min_lr():
  c = qm9_base.get_base("")
  values = [50.0, 40.0] + [40.0] * 40 + [10.0] + [10.0] * 80
  want = _torch_reduce_on_plateau(values, 1e-3, 0.7, 5, 1e-5)
  got = _schedule(c, values)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # best at epoch 1, then the 6th epoch without improvement (patience 5) lowers the rate
  assert got[6] == 1e-3 and abs(got[7] - 7e-4) < 1e-9
  assert min(got) >= 1e-5 * (1 - 1e-6) and abs(got[-1] - 1e-5) < 1e-9  # floored at min_lr


def _config():
  c = synthetic.get_config("smoke")
  c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = 8, 1, 4
  c.train.log_every, c.train.keep_checkpoints = 4, 3
  c.optimizer.learning_rate = 1e-9  # validation does not move: a plateau from the start
  c.optimizer.schedule = "plateau"
  c.optimizer.plateau_factor, c.optimizer.plateau_patience = 0.5, 1
  c.optimizer.plateau_min_lr = 0.3e-9
  return c


def _lr_scales(workdir):
  recs = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["lr_scale"]) for r in recs if "eval" in r]


def test_plateau_drops_after_patience_and_survives_resume(tmp_path):
  ref = tmp_path / "uninterrupted"
  summary = train.fit(_config(), str(ref), progress=False)
  want = [1.0, 1.0, 0.5, 0.5, 0.3, 0.3, 0.3, 0.3]  # patience 1: drop on the 2nd bad evaluation
  np.testing.assert_allclose([s for _, s in _lr_scales(ref)], want, rtol=1e-6)
  # Cut after step 4's checkpoint and resume: the plateau state (best value, bad count, scale)
  # comes back with it; a fresh one would restart at scale 1.0 and give a different tail.
  wd = tmp_path / "resumed"
  shutil.copytree(ref, wd)
  shutil.rmtree(wd / "checkpoints" / "8")
  os.remove(wd / "summary.json")
  resumed = train.fit(_config(), str(wd), progress=False)
  assert _lr_scales(wd) == _lr_scales(ref)
  assert resumed["params_checksum"] == summary["params_checksum"]


def test_the_scale_multiplies_the_update():
  c = synthetic.get_config("smoke")
  p = train.build_program(c)
  batch = train.shard_batch(next(p.loader), p.mesh)

  def update_norm(scale):
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), p.state)  # the step donates it
    state = state._replace(plateau=state.plateau._replace(scale=jnp.float32(scale)))
    _, m = p.step_fn(train.replicate(state, p.mesh), batch)
    return float(m["update_norm"])

  np.testing.assert_allclose(update_norm(0.25), 0.25 * update_norm(1.0), rtol=1e-5)
