"""The synthetic benchmark (``mtl_jax/data/synthetic.py``): fabricated regression / binary tasks.

No download; used by the trainer's tests and to try a combiner in seconds.

    python launch/train.py --config=configs/synthetic.py:smoke --workdir=/tmp/syn \
      --config.combiner.name=pcgrad --config.tasks=reg0,cls1

Variants: ``''`` (4 tasks, 500 steps), ``'smoke'`` (a few steps, tiny), ``'quick'`` (200 steps),
``'multi'`` (smoke, multi-input batches).
"""

from mtl_jax.configs.common import base_config, check_variant


def get_config(arg: str = ""):
  c = base_config()
  c.data.name = "synthetic"
  c.data.num_regression = 2
  c.data.num_classification = 2
  c.data.dim = 8
  c.data.width = 16
  c.data.depth = 2
  c.data.num_train = 512
  c.data.num_eval = 128
  c.data.noise = 0.1
  c.data.label_noise = 0.0
  c.data.conflict = 0.5
  c.data.seed = 0
  c.data.multi_input = False
  c.data.batch_norm = False
  c.optimizer.learning_rate = 3e-3
  c.train.batch_size = 32
  c.train.num_steps = 500
  c.train.eval_every = 100
  c.train.log_every = 20
  c.train.checkpoint_every = 100
  c.train.eval_batch_size = 64
  variant = check_variant(arg, ("", "smoke", "quick", "multi"))
  if variant in ("smoke", "multi"):
    c.data.num_train = 64
    c.data.num_eval = 32
    c.data.width = 8
    c.train.batch_size = 8
    c.train.num_steps = 12
    c.train.eval_every = 6
    c.train.log_every = 3
    c.train.checkpoint_every = 4
    c.train.eval_batch_size = 16
    c.data.multi_input = variant == "multi"
  elif variant == "quick":
    c.train.num_steps = 200
    c.train.eval_every = 50
  return c
