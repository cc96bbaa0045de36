r"""The report of a study: tables, findings and plots over the runs of a sweep (or any workdirs).

    python launch/report.py --workdir=/tmp/qm9_sweep --out=/tmp/qm9_report
    python launch/report.py --workdir=/tmp/qm9_sweep --out=/tmp/r --target_delta_m=50 \
      --toy=/tmp/toy          # also show launch/toy.py's trajectories
    python launch/report.py --workdir=/tmp/qm9_sweep --out=/tmp/r --published
    python launch/report.py --published      # only the published tables

``--published`` prints, per task mix, our Δm% next to the published Δm% of the same method on the
runs' benchmark (marked ``(pub.)``, with the paper it comes from), and our single-task runs next
to the published STL figures (:mod:`mtl_jax.analysis.published`); without ``--workdir`` it prints
the published tables of every benchmark.

Writes ``OUT/report.md`` (per task mix: per-task test metrics mean ± std over seeds, Δm% against
the single-task runs or the benchmark's reference numbers, mean rank, parameters and their
reduction against K single-task models, steps/s, time to a target Δm%; the negative-transfer,
overfitting and gradient-conflict findings; links to the PNGs), every table also as ``.tex``
(booktabs) and ``.csv``, ``OUT/report.json`` and ``OUT/plots/*.png``. See
:mod:`mtl_jax.analysis.study`.
"""

import os
import sys


from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position

_WORKDIR = flags.DEFINE_string("workdir", None, "a sweep directory or any tree of run workdirs")
_OUT = flags.DEFINE_string("out", None, "report directory")
_ALPHA = flags.DEFINE_float("alpha", 0.05, "significance level of the negative-transfer test")
_TARGET = flags.DEFINE_float("target_delta_m", None,
                             "Δm% target of 'time to target' (default: the worst final Δm% of "
                             "each task mix)")
_TOY = flags.DEFINE_string("toy", None, "launch/toy.py output directory (or its toy.png) to show")
_TITLE = flags.DEFINE_string("title", "", "report title")
_EARLY = flags.DEFINE_float("early_frac", 0.5, "early peak: best step within this fraction")
_DROP = flags.DEFINE_float("drop_tol_pct", 2.0, "early peak: final worse than best by > this %")
_PUBLISHED = flags.DEFINE_bool("published", False, "print the published Δm% (and STL figures) of "
                               "the runs' benchmark next to ours, each with its source")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from mtl_jax.analysis import published  # pylint: disable=g-import-not-at-top
  if _PUBLISHED.value and not _WORKDIR.value and not _OUT.value:
    for b in published.BENCHMARKS:
      print("\n".join(published.delta_m_lines(b)))
    return
  if not _WORKDIR.value or not _OUT.value:
    _fail("--workdir and --out are required (or --published alone for the published tables)")
  from mtl_jax.analysis import overfitting  # pylint: disable=g-import-not-at-top
  from mtl_jax.analysis import study  # pylint: disable=g-import-not-at-top
  th = overfitting.Thresholds(early_frac=_EARLY.value, drop_tol_pct=_DROP.value)
  try:
    numbers = study.build_report(_WORKDIR.value, _OUT.value, alpha=_ALPHA.value,
                                 target_delta_m=_TARGET.value, thresholds=th, toy=_TOY.value,
                                 title=_TITLE.value)
  except (FileNotFoundError, ValueError) as e:
    _fail(str(e).splitlines()[0])
  for mix, m in numbers["mixes"].items():
    print(f"task mix {mix} (Δm% against {m['delta_m_source']}):")
    for name, d in m["methods"].items():
      dm = d["delta_m"]
      txt = (f"{sum(dm) / len(dm):+.2f}" if dm else "n/a")
      print(f"  {name:24s} Δm% {txt:>9s}  mean rank {d['mean_rank']:.2f}")
    if _PUBLISHED.value:
      _print_published(m)
  if _PUBLISHED.value:
    _print_published_stl(numbers["stl"])
  for x in numbers.get("stale", []):
    print(f"left out (stale: finished with another config than the sweep's): {x['label']}")
  print(f"wrote {os.path.join(_OUT.value, 'report.md')}")


def _print_published(m: dict) -> None:
  from mtl_jax.analysis import published  # pylint: disable=g-import-not-at-top
  if m["benchmark"] not in published.BENCHMARKS:
    print(f"  no published numbers for benchmark {m['benchmark']!r} (published: "
          f"{', '.join(published.BENCHMARKS)})")
    return
  ours = {name: d["delta_m"] for name, d in m["methods"].items()}
  print("\n".join(published.comparison_lines(m["benchmark"], ours, m["tasks"],
                                              m["delta_m_source"])))


def _print_published_stl(stl: dict) -> None:
  from mtl_jax.analysis import published  # pylint: disable=g-import-not-at-top
  by_bench = {}
  for t, d in stl.items():
    by_bench.setdefault(d["benchmark"], {})[t] = d["mean"]
  for b, ours in by_bench.items():
    if b in published.BENCHMARKS:
      print("\n".join(published.stl_lines(b, ours)))


def _fail(msg: str) -> None:
  sys.stderr.write(f"error: {msg}\n")
  sys.stderr.flush()
  sys.exit(2)


if __name__ == "__main__":
  app.run(main)
