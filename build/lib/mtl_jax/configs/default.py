"""The embedded default: Nash-MTL on real QM9 molecules, offline, in a few CPU minutes.

    python launch/train.py --config=configs/default.py --workdir=/tmp/mtl_default

``configs/nash_qm9.py:quick`` (see ``qm9_base``): the 11 QM9 targets of the Nash-MTL protocol from
the ``qm9pack`` package (the featurised cache is built once, about a minute, under
``~/.cache/mtl_jax/qm9``), the MPNN at width 32 on bonded graphs, 200 Nash-MTL steps of batch 32,
evaluation on 1,000 random validation / test molecules; prints the per-target test MAE, Delta_m%
against the published single-task MAEs, and the parameter count. The argument selects a variant of
``nash_qm9`` (default ``quick``; ``''`` is the full protocol, ``smoke`` fabricated molecules).
"""

from mtl_jax.configs import nash_qm9


def get_config(arg: str = "quick"):
  return nash_qm9.get_config("quick" if arg is None else arg)
