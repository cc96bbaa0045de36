"""QM9, 11 tasks: the Nash-MTL protocol (Navon et al. 2022, Table 3; official code
``AvivNavon/nash-mtl``, ``experiments/quantum_chemistry/trainer.py``).

Paper/official protocol: MPNN (NNConv + GRU, Set2Set) width 64, 3 message passes; complete graphs
with distances; targets standardised; 300 epochs, batch 120, Adam 1e-3 with ``ReduceLROnPlateau``
(factor 0.7, patience 5 epochs, min 1e-5, on the validation Delta_m); model selection by
validation Delta_m; test MAE per target (meV for homo, lumo, zpve, U0, U, H, G) and Delta_m against
the repository's STL MAEs.

Schedule here: ``optimizer.schedule='plateau'`` (``optax.contrib.reduce_on_plateau`` with
PyTorch's ``ReduceLROnPlateau`` semantics, :func:`mtl_jax.train.make_plateau`), stepped on the
validation Delta_m at every evaluation, and evaluation is every epoch. Deviation: the training
loader drops the last incomplete batch of an epoch (923 full batches of 120 from 110,831
molecules; PyG's loader also gives the 71-molecule remainder as a 924th batch); the official
scheduler also lowers the rate of a method's own parameters (one torch optimizer holds both),
here it scales the model's update only.

Variants: ``''`` the protocol; ``'smoke'`` fabricated molecules, tiny MPNN, a few steps (no files,
no RDKit); ``'quick'`` real QM9 offline from qm9pack (the featurised cache is built once, about a
minute, under ``~/.cache/mtl_jax/qm9``), bonded graphs, width 32, 200 steps of batch 64,
evaluation on 1,000 validation / 1,000 test molecules drawn at random from their splits
(``data.eval_limit``; the first indices would be the smallest molecules): about 2-3 CPU minutes.
"""

from mtl_jax.configs.common import base_config, check_variant


def get_base(variant: str = ""):
  variant = check_variant(variant)
  c = base_config()
  c.data.name = "qm9"
  c.data.source = "qm9pack"  # qm9pack (offline) | tfds (qm9/original, when prepared)
  c.data.feature_set = "pyg"  # pyg (PyG's features as Nash-MTL trained on them) | full (RDKit)
  c.data.graph = "complete"  # complete (PyG's Complete + Distance) | bonds
  c.data.split_seed = 0
  c.data.num_validation = 10_000
  c.data.num_test = 10_000
  c.data.limit = 0  # read only the first N molecules (0 = all 130,831)
  c.data.train_limit = 0  # train on a seeded random N of the training split (0 = all)
  c.data.eval_limit = 0  # evaluate on a seeded random N of validation / test (0 = all)
  c.data.cache_dir = ""  # "" = ~/.cache/mtl_jax/qm9 (or <data_dir>/qm9_cache)
  c.data.mock_size = 256  # fabricated molecules when data.mock
  c.model.backbone = ""  # "" = the benchmark default, the MPNN of mtl_jax.models.mpnn
  c.model.width = 64
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "plateau"  # ReduceLROnPlateau on validation Delta_m, as the official code
  c.optimizer.plateau_factor = 0.7
  c.optimizer.plateau_patience = 5  # epochs (= evaluations: eval_every is one epoch)
  c.optimizer.plateau_min_lr = 1e-5
  c.train.batch_size = 120
  c.train.num_epochs = 300
  c.train.num_steps = 0
  c.train.eval_every = 923  # one epoch: 110,831 training molecules in full batches of 120
  c.train.log_every = 100
  c.train.checkpoint_every = 923
  c.train.eval_batch_size = 120
  c.train.select = "delta_m"
  if variant == "smoke":
    c.data.mock = True
    c.data.mock_size = 96
    c.model.width = 8
    c.train.batch_size = 8
    c.train.num_steps = 6
    c.train.eval_every = 3
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.train.eval_batch_size = 8
    c.structure.warmup_steps = 2  # --config.structure.method=affinity splits after step 2
    c.structure.window = 2
  elif variant == "quick":
    c.data.graph = "bonds"  # 8x fewer edges than complete graphs: CPU minutes
    c.data.eval_limit = 1000
    c.model.width = 32
    c.train.batch_size = 64
    c.train.num_steps = 200
    c.train.eval_every = 100
    c.train.log_every = 20
    c.train.checkpoint_every = 100
    c.train.eval_batch_size = 125
    c.structure.warmup_steps = 60  # --config.structure.method=affinity splits after step 60
    c.structure.window = 20
  return c
