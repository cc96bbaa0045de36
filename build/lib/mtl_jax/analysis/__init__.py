"""Analysis of multi-task runs: the questions a study asks of its workdirs.

* :mod:`~mtl_jax.analysis.runs`: read workdirs (``summary.json``, ``metrics.jsonl``, ``sweep.json``).
* :mod:`~mtl_jax.analysis.transfer`: negative transfer, per task multi-task vs single-task over
  seeds with Welch's t-test.
* :mod:`~mtl_jax.analysis.overfitting`: train/validation gap, peak step, loss variance; flags for
  early-peaking, overfitting and oscillating tasks.
* :mod:`~mtl_jax.analysis.conflict`: gradient conflict from the logged Gramian statistics.
* :mod:`~mtl_jax.analysis.affinity`: lookahead inter-task affinity (Fifty et al. 2021) and a
  suggested grouping.
* :mod:`~mtl_jax.analysis.tables`: Markdown, LaTeX (booktabs) and CSV tables.
* :mod:`~mtl_jax.analysis.plots`: the PNG figures.
* :mod:`~mtl_jax.analysis.published`: the papers' Δm% per method and benchmark, and their STL
  figures, each with its source.
* :mod:`~mtl_jax.analysis.study`: the whole report of ``launch/report.py``.
"""

from mtl_jax.analysis import affinity
from mtl_jax.analysis import conflict
from mtl_jax.analysis import overfitting
from mtl_jax.analysis import published
from mtl_jax.analysis import runs
from mtl_jax.analysis import tables
from mtl_jax.analysis import transfer

__all__ = ["affinity", "conflict", "overfitting", "published", "runs", "tables", "transfer"]
