"""Gradient combiners, each an optax transformation.

    tx = optax.chain(mtl_jax.combiners.nash_mtl(num_tasks=40), optax.adam(3e-4))
    updates, state = tx.update(task_grads, state, params, task_losses=losses)

``get(name, num_tasks, shared_mask=None, **hparams)`` builds any registered method by name;
``method(name, num_tasks, **hparams)`` returns its :class:`Method` (what the engine uses);
``names()`` lists them. Every registered name is also a constructor here,
``combiners.<name>(num_tasks, shared_mask=None, **hparams)``. The methods live in private modules
(``_nash_mtl.py``, ...) so that no constructor shadows the module it comes from; import a method's
helpers from its module (``from mtl_jax.combiners._mgda import min_norm_weights``).
"""

import functools

from mtl_jax.combiners.base import (GRAMIAN, JACOBIAN, LOSSES, CombinerState,
                                    CombinerTransformation, Method, as_optax, get, hparams,
                                    method, names, register, resolve_mask)
from mtl_jax.combiners import base as _base

from mtl_jax.combiners import _aligned_mtl  # noqa: F401  (registers 'aligned_mtl')
from mtl_jax.combiners import _cagrad  # noqa: F401  (registers 'cagrad')
from mtl_jax.combiners import _db_mtl  # noqa: F401  (registers 'db_mtl')
from mtl_jax.combiners import _dualproj  # noqa: F401  (registers 'dualproj')
from mtl_jax.combiners import _dwa  # noqa: F401  (registers 'dwa')
from mtl_jax.combiners import _excess_mtl  # noqa: F401  (registers 'excess_mtl')
from mtl_jax.combiners import _fairgrad  # noqa: F401  (registers 'fairgrad')
from mtl_jax.combiners import _famo  # noqa: F401  (registers 'famo')
from mtl_jax.combiners import _gls  # noqa: F401  (registers 'gls')
from mtl_jax.combiners import _graddrop  # noqa: F401  (registers 'graddrop')
from mtl_jax.combiners import _gradnorm  # noqa: F401  (registers 'gradnorm')
from mtl_jax.combiners import _gradvac  # noqa: F401  (registers 'gradvac')
from mtl_jax.combiners import _imtl  # noqa: F401  (registers 'imtl')
from mtl_jax.combiners import _ls  # noqa: F401  (registers 'ls')
from mtl_jax.combiners import _mgda  # noqa: F401  (registers 'mgda')
from mtl_jax.combiners import _moco  # noqa: F401  (registers 'moco')
from mtl_jax.combiners import _nash_mtl  # noqa: F401  (registers 'nash_mtl')
from mtl_jax.combiners import _pcgrad  # noqa: F401  (registers 'pcgrad')
from mtl_jax.combiners import _rlw  # noqa: F401  (registers 'rlw')
from mtl_jax.combiners import _sdmgrad  # noqa: F401  (registers 'sdmgrad')
from mtl_jax.combiners import _si  # noqa: F401  (registers 'si')
from mtl_jax.combiners import _stch  # noqa: F401  (registers 'stch')
from mtl_jax.combiners import _upgrad  # noqa: F401  (registers 'upgrad')
from mtl_jax.combiners import _uw  # noqa: F401  (registers 'uw')
from mtl_jax.combiners import _config  # noqa: F401  (registers 'config')
from mtl_jax.combiners import _go4align  # noqa: F401  (registers 'go4align')
from mtl_jax.combiners import _krum  # noqa: F401  (registers 'krum')
from mtl_jax.combiners import _modo  # noqa: F401  (registers 'modo')
from mtl_jax.combiners import _ntkmtl  # noqa: F401  (registers 'ntkmtl')
from mtl_jax.combiners import _trimmed_mean  # noqa: F401  (registers 'trimmed_mean')
from mtl_jax.combiners import _log_losses  # noqa: F401  (registers 'log_mgda', 'log_cagrad', 'log_imtl')


def _constructor(name):
  """``combiners.<name>(num_tasks, shared_mask=None, **hparams)``: the optax transformation."""
  fn = _base._REGISTRY[name]  # pylint: disable=protected-access

  @functools.wraps(fn)
  def make(num_tasks, shared_mask=None, **hp):
    return get(name, num_tasks, shared_mask=shared_mask, **hp)

  make.__name__ = make.__qualname__ = name
  return make


aligned_mtl = _constructor("aligned_mtl")
cagrad = _constructor("cagrad")
db_mtl = _constructor("db_mtl")
dualproj = _constructor("dualproj")
dwa = _constructor("dwa")
excess_mtl = _constructor("excess_mtl")
fairgrad = _constructor("fairgrad")
famo = _constructor("famo")
gls = _constructor("gls")
graddrop = _constructor("graddrop")
gradnorm = _constructor("gradnorm")
gradvac = _constructor("gradvac")
imtl = _constructor("imtl")
ls = _constructor("ls")
mgda = _constructor("mgda")
moco = _constructor("moco")
nash_mtl = _constructor("nash_mtl")
pcgrad = _constructor("pcgrad")
rlw = _constructor("rlw")
sdmgrad = _constructor("sdmgrad")
si = _constructor("si")
stch = _constructor("stch")
upgrad = _constructor("upgrad")
uw = _constructor("uw")
config = _constructor("config")
go4align = _constructor("go4align")
krum = _constructor("krum")
log_cagrad = _constructor("log_cagrad")
log_imtl = _constructor("log_imtl")
log_mgda = _constructor("log_mgda")
modo = _constructor("modo")
ntkmtl = _constructor("ntkmtl")
trimmed_mean = _constructor("trimmed_mean")

__all__ = [
    "GRAMIAN",
    "JACOBIAN",
    "LOSSES",
    "CombinerState",
    "CombinerTransformation",
    "Method",
    "as_optax",
    "get",
    "hparams",
    "method",
    "names",
    "register",
    "resolve_mask",
    "aligned_mtl",
    "cagrad",
    "db_mtl",
    "dualproj",
    "dwa",
    "excess_mtl",
    "fairgrad",
    "famo",
    "gls",
    "graddrop",
    "gradnorm",
    "gradvac",
    "imtl",
    "ls",
    "mgda",
    "moco",
    "nash_mtl",
    "pcgrad",
    "rlw",
    "sdmgrad",
    "si",
    "stch",
    "upgrad",
    "uw",
    "config",
    "go4align",
    "krum",
    "log_cagrad",
    "log_imtl",
    "log_mgda",
    "modo",
    "ntkmtl",
    "trimmed_mean",
]
