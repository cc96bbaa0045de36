"""CoNLL-2003: POS, chunking and NER as three token-level tasks (``mtl_jax.data.nlp``).

No MTL-optimisation paper fixes a protocol for this mix; this library's: a pre-LN Transformer
encoder (``transformer``: width 128, 2 layers, 4 heads) from scratch on a word vocabulary of the
training split, per-token linear heads, Adam 1e-3, batch 32, 10 epochs, token accuracy, selection on
mean validation accuracy. No published single-task reference is attached (Δm% needs STL runs:
``sharing='independent'``).

Variants: ``''``; ``'smoke'`` mock data (tfds.testing.mock_data), width 16, a few steps;
``'quick'`` prepared tfds data, 300 steps, max length 64.
"""

from mtl_jax.configs.common import base_config, check_variant, smoke


def get_base(variant: str = "", name: str = "conll2003", train_size: int = 14_041):
  variant = check_variant(variant)
  c = base_config()
  c.data.name = name
  c.data.max_length = 128
  c.data.vocab_size = 30_000
  c.model.backbone = ""  # the benchmark default (transformer), built with its input options
  c.model.width = 128
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.train.batch_size = 32
  c.train.num_epochs = 10
  c.train.eval_every = train_size // 32
  c.train.checkpoint_every = train_size // 32
  c.train.log_every = 50
  c.train.eval_batch_size = 64
  c.train.select = "mean_main"
  if variant == "smoke":
    smoke(c)
    c.data.max_length = 16
    c.model.width = 16
  elif variant == "quick":
    c.data.max_length = 64
    c.train.num_steps = 300
    c.train.eval_every = 150
    c.train.checkpoint_every = 150
    c.train.log_every = 25
  return c
