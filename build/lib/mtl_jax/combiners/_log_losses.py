"""Log-loss variants: a gradient method applied to the gradients of ``log L_k``.

The FAMO repository (Liu, Liang, Chen, Liu, "FAMO: Fast Adaptive Multitask Optimization",
NeurIPS 2023; github.com/Cranial-XIX/FAMO, ``methods/weight_methods.py``: ``LOG_MGDA``,
``LOG_CAGrad``, ``LOG_IMTLG``) runs MGDA, CAGrad and IMTL-G on the task gradients of the log
losses, ``nabla log(L_k + 1e-8) = g_k / (L_k + 1e-8)``, as baselines next to FAMO (which balances
log-loss decrease itself). We register them as ``log_mgda``, ``log_cagrad`` and ``log_imtl``.

With ``D = diag(L + 1e-8)`` the Gramian of the log gradients is ``D^-1 G D^-1``; a base weighting's
weights ``v`` on the log gradients are ``w = v / (L + 1e-8)`` on the task gradients. One generic
wrapper (:func:`log_loss_method`) does this for any Gramian weighting, so the base methods' files
are untouched and each variant takes its base method's hyper-parameters and defaults. The
official variants differ after that step, and so do ours:

* ``log_mgda``: the min-norm weights ``v`` (on the simplex) of the log gradients, then the loss
  ``sum_k v_k log(L_k + 1e-8) / c`` with ``c = sum_k v_k / (L_k + 1e-8)``: ``w`` is normalised to
  sum to 1 (so ``mgda``'s ``scale_by_k`` has no effect). Heads: ``w_k g_k`` (``specific='weighted'``).
* ``log_cagrad``: CAGrad's update on the log gradients, times K (``sum_scale``) as the official
  ``overwrite_grad``, then its norm clipped to ``max_norm=1.0`` (the official ``LOG_CAGrad.backward``
  calls ``clip_grad_norm_`` on the shared parameters after writing the update; an extra
  hyper-parameter next to ``cagrad``'s; ``<= 0``: no clip). Heads: ``specific='sum'``, see the
  deviations.
* ``log_imtl``: IMTL-G's ``alpha`` on the log gradients, the loss ``sum_k alpha_k log(L_k + 1e-8)``.
  Heads: ``w_k g_k`` (``specific='weighted'``). Only ``mode='gradient'`` (the official LOG_IMTLG).

Why names and not a ``log_losses=True`` option on ``mgda`` / ``cagrad`` / ``imtl``: these are the
official names; the post-processing above is per method (an option would special-case each base
method's file); and the wrapper composes with any weighting without touching the solvers.

Deviations: ``log_cagrad``'s heads get their own task's gradient ``g_k`` (the contract's ``'sum'``);
the official code leaves them ``nabla log L_k = g_k / L_k``, a per-task scale the contract's two
head rules cannot express (with Adam, a per-tensor scale mostly cancels). The official
``LOG_CAGrad`` takes ``log L`` without the ``+ 1e-8``. Losses are floored at 0 before adding 1e-8 (a
negative loss has no log; the official code gives NaN).
"""

from __future__ import annotations

import functools
import inspect

import jax.numpy as jnp

from mtl_jax.combiners.base import Method, register
from mtl_jax.combiners import _cagrad, _imtl, _mgda
from mtl_jax.combiners._ntkmtl import clip_weights

_EPS = 1e-8  # the official ``(loss + 1e-8).log()``


def log_loss_method(base: Method, name: str, normalize: bool = False,
                    specific: str | None = None, max_norm: float = 0.0) -> Method:
  """``base`` applied to the gradients of ``log(L_k + 1e-8)``; weights returned for the ``g_k``.

  ``normalize``: divide the weights by their sum (LOG_MGDA's ``c``); ``specific``: the head rule
  (default: the base method's); ``max_norm > 0``: scale the weights so that the shared update's
  norm is at most ``max_norm`` (LOG_CAGrad's ``clip_grad_norm_``).
  """
  if not base.is_weighting or base.fresh is not None:
    raise ValueError(f"{name}: the log-loss wrapper takes a weighting without weight re-use, "
                     f"got {base.name!r}")

  def weigh(gramian, losses, state):
    d = jnp.maximum(jnp.asarray(losses, jnp.float32), 0.0) + _EPS
    g = None if gramian is None else gramian / (d[:, None] * d[None, :])
    v, state = base.weigh(g, losses, state)
    w = v / d
    if normalize:
      w = w / jnp.sum(w)
    if max_norm > 0 and gramian is not None:
      w = clip_weights(w, gramian, max_norm)
    return w, state

  return Method(name, base.num_tasks, base.needs, init=base.init, weigh=weigh,
                specific=specific or base.specific)


def _variant(name, base_fn, normalize=False, specific=None, check=None, clip=None):
  """Register ``name``: the base method's hyper-parameters and defaults (plus ``max_norm=clip``
  when ``clip`` is given)."""

  @functools.wraps(base_fn)
  def make(num_tasks, **hp):
    if check is not None:
      check(hp)
    max_norm = float(hp.pop("max_norm", clip or 0.0))
    return log_loss_method(base_fn(num_tasks, **hp), name, normalize, specific, max_norm)

  if clip is not None:
    sig = inspect.signature(base_fn)
    extra = inspect.Parameter("max_norm", inspect.Parameter.KEYWORD_ONLY, default=clip)
    make.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])
  make.__name__ = make.__qualname__ = name
  make.__doc__ = f"{name}: ``{base_fn.__name__}`` on the gradients of the log losses. See {__name__}."
  return register(name)(make)


def _gradient_mode_only(hp):
  if hp.get("mode", "gradient") != "gradient":
    raise ValueError(f"log_imtl: only mode='gradient' (the official LOG_IMTLG), got {hp['mode']!r}")


log_mgda = _variant("log_mgda", _mgda.mgda, normalize=True)
log_cagrad = _variant("log_cagrad", _cagrad.cagrad, specific="sum", clip=1.0)
log_imtl = _variant("log_imtl", _imtl.imtl, check=_gradient_mode_only)
