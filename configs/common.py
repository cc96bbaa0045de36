"""The config schema every experiment config fills in (ml_collections, big_vision style).

A benchmark's defaults live in ``configs/<benchmark>_base.py`` (``get_base(variant)``); an
experiment file such as ``configs/nash_celeba.py`` is a few lines over them. Variants, selected with
``--config=configs/X.py:variant``: ``''`` (the paper's protocol), ``'smoke'`` (mock data, a few
steps, tiny model) and ``'quick'`` (real offline data where there is one, CPU minutes).
"""

import ml_collections

VARIANTS = ("", "smoke", "quick")


class VariantError(ValueError):
  """An unknown ``:variant`` of a config file (one line, naming the valid ones)."""


def check_variant(variant, valid=VARIANTS) -> str:
  """The variant string, stripped; a one-line :class:`VariantError` when it is not in ``valid``."""
  variant = (variant or "").strip()
  if variant not in valid:
    names = ", ".join(repr(v) if not v else v for v in valid)
    raise VariantError(f"unknown config variant {variant!r}; valid: {names}")
  return variant


def smoke(c, steps: int = 4, batch: int = 8):
  """The shared smoke settings: mock data, a few steps, small batches."""
  c.data.mock = True
  c.train.batch_size = batch
  c.train.eval_batch_size = batch
  c.train.num_steps = steps
  c.train.eval_every = steps // 2
  c.train.log_every = 1
  c.train.checkpoint_every = steps // 2
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Task mix: a list of task names of the benchmark (any subset, any order), or 'all'.
  c.tasks = "all"

  c.data = ml_collections.ConfigDict()
  c.data.name = ""  # celeba | qm9 | multimnist | nyuv2 | cityscapes | conll2003 | glue | digits
  c.data.mock = False  # tfds.testing.mock_data / fabricated arrays of the right shapes
  c.data.data_dir = ""  # tfds data_dir or dataset folder ("" = the library's default)
  c.data.image_size = 0  # 0 = the benchmark's default
  # grain worker processes decoding files (CelebA, NYUv2, Cityscapes): -1 = one per core less one
  c.data.workers = -1

  c.model = ml_collections.ConfigDict()
  c.model.backbone = ""  # "" = the benchmark's default backbone
  c.model.width = 0  # 0 = the backbone's default width; smaller for smoke runs
  c.model.sharing = "hard"  # hard | soft | cross_stitch | hierarchical | sparse | mtan | mmoe | ...
  c.model.sharing_options = ml_collections.ConfigDict()  # strategy-specific (e.g. soft: lam)
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params, optimizer: float32)

  c.combiner = ml_collections.ConfigDict()
  c.combiner.name = "ls"
  c.combiner.hparams = ml_collections.ConfigDict()  # passed as keyword arguments

  c.engine = ml_collections.ConfigDict()
  c.engine.mode = ""  # losses | gramian | jacobian | features; "" = chosen from the combiner (below)
  c.engine.reduction = "exact"  # exact | local (see mtl_jax.autodiff)
  # auto | all | off: which shared layers a weighting's 'jacobian' mode taps (mtl_jax.taps: their
  # Gramian share from inputs and output cotangents, no per-task kernel gradients)
  c.engine.layer_gramian = "auto"
  # With mode "": a Gramian weighting runs in 'jacobian' mode (fast, holds the K x P_shared
  # Jacobian) when that Jacobian fits in this many MiB, else in the streamed 'gramian' mode.
  c.engine.jacobian_budget_mb = 1024.0
  # True: every mean over the devices (gradients, losses, Gramians) is an all-gather and a sum in
  # device order (mtl_jax.autodiff.device_mean): the same bits however the devices are split into
  # processes (2 x 2 = 1 x 4; not inside synchronised batch norm, flax's own pmean); costs an
  # all-gather (N copies of the reduced quantity per device) where an all-reduce would do.
  # False: all-reduce (pmean), whose summation order between processes is the collective
  # library's (gloo, NCCL): the same run agrees with 1 x 4 to rounding, not to the bit.
  c.engine.fixed_order = False

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"  # adam | adamw | sgd
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"  # constant | cosine | step | plateau
  c.optimizer.warmup_steps = 0
  c.optimizer.grad_clip = 0.0  # 0 = off
  c.optimizer.momentum = 0.9  # sgd only
  c.optimizer.decay_rate = 0.1  # 'step' schedule: multiply by this at each boundary
  c.optimizer.decay_boundaries = (0.5, 0.75)  # 'step' schedule: fractions of the total steps
  # 'plateau' schedule (PyTorch ReduceLROnPlateau, mode 'min', on validation -selection_score, i.e.
  # Δm% under select='delta_m', stepped at every evaluation: set eval_every to one epoch);
  # defaults are PyTorch's.
  c.optimizer.plateau_factor = 0.1
  c.optimizer.plateau_patience = 10  # evaluations without improvement tolerated
  c.optimizer.plateau_min_lr = 0.0

  # The sharing structure during training (mtl_jax.structure.dynamic): 'none' (the model as
  # config.model.sharing builds it) | 'fixed' (branched over structure.tree) | 'affinity' (hard
  # sharing for warmup_steps, per-stage gradient affinity over the last `window` of them, the tree
  # choose_tree picks under `budget`, a function-preserving split; again at each split_steps) |
  # 'conflict' (Recon: the top_k stages with the highest conflict score become task-specific) |
  # 'learn_to_branch' (a Gumbel-softmax search of warmup_steps steps, then the found tree trains).
  c.structure = ml_collections.ConfigDict()
  c.structure.method = "none"
  c.structure.tree = ()  # 'fixed' (or the starting tree): per stage, groups of task names/indices
  c.structure.warmup_steps = 100
  c.structure.window = 50  # steps before each split whose per-stage Gramians are averaged
  c.structure.budget = 0.5  # stage parameters over the independent networks' (1/K .. 1)
  c.structure.split_steps = ()  # later steps at which to measure and split again (affinity)
  c.structure.choose = "auto"  # choose_tree: auto | exhaustive | agglomerative
  # affinity: what choose_tree reads, 'cosine' (the per-stage gradient cosine from the engine's
  # Gramians) | 'lookahead' (TAG's lookahead loss change per stage, Fifty et al. 2021)
  c.structure.affinity = "cosine"
  c.structure.top_k = 1  # conflict: stages turned task-specific
  c.structure.conflict_threshold = 0.0  # conflict: a pair conflicts when its cosine is below it
  c.structure.restart = False  # affinity / conflict: retrain the chosen tree from step 0 (Recon)
  c.structure.tau_start = 5.0  # learn_to_branch: the Gumbel-softmax temperature at the start
  c.structure.branch_learning_rate = 0.0  # learn_to_branch: the logits' rate (0 = the model's)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.num_steps = 0  # 0 = use num_epochs
  c.train.num_epochs = 1
  c.train.eval_every = 500
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.eval_batch_size = 256
  # > 0: each evaluation also scores N training batches, a fixed random subset (the 'train' split
  # of the eval records: the train/validation gap of mtl_jax.analysis.overfitting); 0 = off.
  c.train.eval_train_batches = 0
  c.train.on_nonfinite = "stop"  # stop | skip
  # Model selection on validation: auto (the benchmark's info['select'], else delta_m when it has
  # references for every task, else mean_main) | delta_m | mean_main (mean of signed main metrics).
  c.train.select = "auto"
  return c
