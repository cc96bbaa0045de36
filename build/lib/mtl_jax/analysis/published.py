"""Published numbers to read our runs against: Δm% per method and benchmark, and the single-task
(STL) figures Δm% is taken against.

The Δm% table is read from the papers' tables (``REFERENCES.md`` of the project): QM9 (11 targets,
MPNN, Nash-MTL protocol), CelebA (40 attributes, FAMO protocol), NYUv2 (3 tasks, SegNet/MTAN) and
Cityscapes (2 tasks, SegNet/MTAN); lower is better. Each entry names its source (:data:`SOURCES`).
Where a paper copies another's row, the source is the paper that measured it: the QM9, NYUv2 and
Cityscapes rows of the older methods are Nash-MTL's Tables 1-3 (FAMO repeats them), their CelebA
rows FAMO's. Deviations in the sources, kept as published:

* FAMO's CelebA table appears to have its "Δm%" and "MR" headers swapped; the CelebA values here
  are the reading later papers cite.
* FAMO's Cityscapes LS row duplicates its SI row (14.11); the LS value here is Nash-MTL's (22.60).
* Re-runs with a retuned QM9 schedule (NTKMTL, 2025) report different numbers for every method and
  are not comparable with this protocol; they are not included.

The Nash-MTL toy problem (Fig. 1) publishes trajectories, not numbers: nothing to tabulate.
The STL figures are those the data modules use as their Δm% baseline
(:data:`mtl_jax.data.qm9.REFERENCE_MAE`, :data:`mtl_jax.data.celeba.STL_F1`,
:data:`mtl_jax.data.dense.NYUV2` / ``CITYSCAPES`` ``.reference``), read from there so the numbers
live in one place.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

SOURCES = {
    "nash_mtl": "Navon et al., Multi-Task Learning as a Bargaining Game (Nash-MTL), ICML 2022, "
                "Tables 1-3",
    "famo": "Liu et al., FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023, Tables 1-3",
    "fairgrad": "Ban & Ji, Fair Resource Allocation in Multi-Task Learning (FairGrad), ICML 2024, "
                "as cited by later papers",
    "go4align": "Shen et al., GO4Align: Group Optimization for Multi-Task Alignment, NeurIPS 2024, "
                "Tables 1-2",
}

SHORT = {"nash_mtl": "Nash-MTL 2022", "famo": "FAMO 2023", "fairgrad": "FairGrad 2024",
         "go4align": "GO4Align 2024"}

PROTOCOLS = {
    "qm9": "QM9, 11 targets, MPNN, 300 epochs, batch 120, Adam 1e-3 + ReduceLROnPlateau",
    "celeba": "CelebA, 40 attributes, 64x64, FAMO's CNN, 15 epochs, Adam 3e-4, batch 256",
    "nyuv2": "NYUv2, 3 tasks (13-class segmentation, depth, normals), SegNet/MTAN, 288x384",
    "cityscapes": "Cityscapes, 2 tasks (7-class segmentation, depth), SegNet/MTAN, 128x256",
}
BENCHMARKS = tuple(PROTOCOLS)
NUM_TASKS = {"qm9": 11, "celeba": 40, "nyuv2": 3, "cityscapes": 2}

_N, _F = "nash_mtl", "famo"
# method (our registry name): (QM9, CelebA, NYUv2, Cityscapes) as (Δm%, source) or None
_TABLE = {
    "ls": ((177.6, _N), (4.15, _F), (5.59, _N), (22.60, _N)),
    "si": ((77.8, _N), None, None, None),
    "rlw": ((203.8, _N), None, None, None),
    "dwa": ((175.3, _N), None, None, None),
    "uw": ((108.0, _N), None, None, None),
    "mgda": ((120.5, _N), (14.85, _F), (1.38, _N), (44.14, _N)),
    "pcgrad": ((125.7, _N), (3.17, _F), (3.97, _N), (18.29, _N)),
    "cagrad": ((112.8, _N), (2.48, _F), (0.20, _N), (11.64, _N)),
    "imtl": ((77.2, _N), (0.84, _F), (-0.76, _N), (11.10, _N)),
    "nash_mtl": ((62.0, _N), (2.84, _F), (-4.04, _N), (6.82, _N)),
    "famo": ((58.5, _F), (1.21, _F), (-4.10, _F), (8.13, _F)),
    "fairgrad": (None, (0.37, "fairgrad"), (-4.66, "fairgrad"), (5.18, "fairgrad")),
    "go4align": ((52.7, "go4align"), (0.88, "go4align"), (-6.08, "go4align"),
                 (8.11, "go4align")),
}


class Entry(NamedTuple):
  """One published Δm% (lower is better) and where it was published."""
  method: str
  benchmark: str
  delta_m: float
  source: str  # a key of SOURCES


DELTA_M = {(m, b): Entry(m, b, v[0], v[1]) for m, row in _TABLE.items()
           for b, v in zip(BENCHMARKS, row) if v is not None}


def methods(benchmark: Optional[str] = None) -> list[str]:
  """The methods with a published Δm% (on ``benchmark``), in the table's order."""
  return [m for m in _TABLE if benchmark is None or (m, benchmark) in DELTA_M]


def _check(benchmark: str) -> str:
  if benchmark not in PROTOCOLS:
    raise ValueError(f"no published numbers for benchmark {benchmark!r}; valid: "
                     f"{', '.join(BENCHMARKS)}")
  return benchmark


def delta_m(method: str, benchmark: str) -> Optional[Entry]:
  """The published Δm% of ``method`` (our registry name; ``combiner/sharing`` reads the
  combiner) on ``benchmark``, or None."""
  return DELTA_M.get((method.split("/")[0], _check(benchmark)))


def stl_reference(benchmark: str) -> dict[str, dict[str, float]]:
  """``{task: {metric: value}}``: the published single-task figures of ``benchmark``."""
  _check(benchmark)
  if benchmark == "qm9":
    from mtl_jax.data import qm9  # pylint: disable=g-import-not-at-top
    return {t: {"mae": v} for t, v in qm9.REFERENCE_MAE.items()}
  if benchmark == "celeba":
    from mtl_jax.data import celeba  # pylint: disable=g-import-not-at-top
    return {t: {"f1": v} for t, v in zip(celeba.ATTRIBUTES, celeba.STL_F1)}
  from mtl_jax.data import dense  # pylint: disable=g-import-not-at-top
  spec = dense.NYUV2 if benchmark == "nyuv2" else dense.CITYSCAPES
  return {t: dict(ms) for t, ms in spec.reference.items()}


def cite(entry: Entry) -> str:
  """The full reference of an entry."""
  return SOURCES[entry.source]


def _sources(entries) -> list[str]:
  keys = sorted({e.source for e in entries if e is not None})
  return [f"    {SHORT[k]}: {SOURCES[k]}" for k in keys]


def delta_m_lines(benchmark: str) -> list[str]:
  """The published Δm% of ``benchmark`` as text lines, each with its source."""
  lines = [f"published Δm% (lower is better), {PROTOCOLS[_check(benchmark)]}:"]
  entries = [DELTA_M[(m, benchmark)] for m in methods(benchmark)]
  lines += [f"  {e.method:12s} {e.delta_m:+8.2f}  {SHORT[e.source]}" for e in entries]
  return lines + ["  sources:"] + _sources(entries)


def comparison_lines(benchmark: str, ours: dict[str, list[float]], tasks: list[str],
                     delta_m_source: str) -> list[str]:
  """Our Δm% per method (mean ± std over seeds) next to the published one of the same method,
  the published ones marked and cited; says when our task set or protocol is not the paper's."""
  _check(benchmark)
  full = len(tasks) == NUM_TASKS[benchmark]
  lines = [f"  ours vs published on {benchmark} (published: {PROTOCOLS[benchmark]}); ours: "
           f"{len(tasks)} of {NUM_TASKS[benchmark]} tasks, Δm% against {delta_m_source}"
           + ("" if full else " — a different task set: not comparable with the published")]
  lines.append(f"  {'method':24s} {'ours Δm%':>16s} {'published Δm%':>14s}  source")
  names = list(ours) + [m for m in methods(benchmark) if m not in ours]
  entries = []
  for name in names:
    dm = [d for d in ours.get(name, []) if d is not None and math.isfinite(d)]
    mine = (f"{sum(dm) / len(dm):+.2f}" + (f" ± {_std(dm):.2f}" if len(dm) > 1 else "")
            if dm else ("–" if name not in ours else "n/a"))
    e = delta_m(name, benchmark)
    entries.append(e)
    pub, src = (f"{e.delta_m:+.2f} (pub.)", SHORT[e.source]) if e else ("–", "")
    lines.append(f"  {name:24s} {mine:>16s} {pub:>14s}  {src}")
  return lines + ["  sources:"] + _sources(entries)


def stl_lines(benchmark: str, ours: dict[str, dict]) -> list[str]:
  """Our single-task runs' test metrics (``{task: {metric: mean}}``) next to the published STL
  figures of the same tasks."""
  ref = stl_reference(benchmark)
  lines = [f"  single-task: ours vs published STL ({PROTOCOLS[benchmark]})"]
  for t, ms in ours.items():
    for m, v in ms.items():
      pub = ref.get(t, {}).get(m)
      lines.append(f"  {t + ' ' + m:32s} {v:12.5g} {pub if pub is not None else '–':>12} (pub.)")
  return lines


def _std(x: list[float]) -> float:
  m = sum(x) / len(x)
  return math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))
