"""mtl_jax.analysis.published (the papers' Δm% and STL figures) and launch/report.py --published."""

import json
import os
import subprocess
import sys

import pytest

from mtl_jax import combiners
from mtl_jax.analysis import published

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_table_pins_the_papers_numbers_and_sources():
  # one row per source and the corner cases of REFERENCES.md's table
  pins = {("ls", "qm9"): (177.6, "nash_mtl"), ("ls", "celeba"): (4.15, "famo"),
          ("ls", "cityscapes"): (22.60, "nash_mtl"),  # Nash-MTL's, not FAMO's duplicated SI row
          ("imtl", "nyuv2"): (-0.76, "nash_mtl"), ("famo", "qm9"): (58.5, "famo"),
          ("fairgrad", "celeba"): (0.37, "fairgrad"), ("go4align", "nyuv2"): (-6.08, "go4align"),
          ("mgda", "cityscapes"): (44.14, "nash_mtl"), ("nash_mtl", "nyuv2"): (-4.04, "nash_mtl")}
  for (m, b), (v, src) in pins.items():
    e = published.delta_m(m, b)
    assert (e.delta_m, e.source) == (v, src), (m, b)
  assert published.delta_m("fairgrad", "qm9") is None and published.delta_m("si", "celeba") is None
  assert published.delta_m("pcgrad/mtan", "qm9").delta_m == 125.7  # combiner/sharing keys
  assert len(published.DELTA_M) == 12 + 3 * 9  # QM9: 12 methods; CelebA, NYUv2, Cityscapes: 9
  assert {e.source for e in published.DELTA_M.values()} == set(published.SOURCES)
  assert set(published.SHORT) == set(published.SOURCES)
  # every method is one of our combiners (GO4Align: being added by the methods work of issue 16)
  assert set(published.methods()) - set(combiners.names()) <= {"go4align"}
  with pytest.raises(ValueError, match="no published numbers for benchmark 'mnist'; valid: qm9"):
    published.delta_m("ls", "mnist")


def test_stl_reference_is_the_data_modules_baseline():
  qm9 = published.stl_reference("qm9")
  assert len(qm9) == 11 and qm9["mu"] == {"mae": 0.0671} and qm9["Cv"] == {"mae": 0.07212}
  celeba = published.stl_reference("celeba")
  assert len(celeba) == 40 and celeba["5_o_Clock_Shadow"]["f1"] == pytest.approx(0.6736886)
  assert celeba["Young"]["f1"] == pytest.approx(0.91907)
  nyu = published.stl_reference("nyuv2")
  assert nyu["segmentation"]["miou"] == 0.3830 and nyu["normal"]["within_30"] == 0.6915
  assert set(published.stl_reference("cityscapes")) == {"segmentation", "depth"}


def test_comparison_lines_mark_published_and_task_set():
  lines = published.comparison_lines("qm9", {"nash_mtl": [60.0, 64.0], "ls": [float("nan")],
                                             "upgrad": [10.0]}, ["mu", "homo"], "STL runs")
  text = "\n".join(lines)
  assert "2 of 11 tasks" in lines[0] and "not comparable" in lines[0]
  row = {l.split()[0]: l for l in lines[2:] if not l.startswith("  sources") and
         not l.startswith("    ")}
  assert "+62.00 ± 2.83" in row["nash_mtl"] and "+62.00 (pub.)" in row["nash_mtl"]
  assert "n/a" in row["ls"] and "+177.60 (pub.)" in row["ls"]  # no finite Δm% of ours
  assert "+10.00" in row["upgrad"] and "(pub.)" not in row["upgrad"]  # nothing published
  assert row["go4align"].split()[1] == "–"  # published only
  assert "Navon et al." in text and "Shen et al." in text
  full = published.comparison_lines("nyuv2", {}, ["segmentation", "depth", "normal"], "x")
  assert "not comparable" not in full[0]


def _run(path, tasks, test, combiner, seed, delta_m=None):
  os.makedirs(path)
  summary = {"tasks": tasks, "test": {t: {"mae": v} for t, v in test.items()}, "combiner":
             combiner, "sharing": "hard", "config": {"seed": seed}, "num_params": 10,
             "steps_per_sec": 5.0, "benchmark": "qm9", "delta_m": delta_m, "step": 10}
  with open(os.path.join(path, "summary.json"), "w") as f:
    json.dump(summary, f)


def _report(*args, cwd):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "report.py"), *args],
                        cwd=cwd, capture_output=True, text=True, timeout=300)


def test_report_cli_published(tmp_path):
  alone = _report("--published", cwd=tmp_path)
  assert alone.returncode == 0, alone.stderr
  for piece in ("QM9, 11 targets", "CelebA, 40 attributes", "NYUv2", "Cityscapes",
                "go4align", "+177.60", "Navon et al., Multi-Task Learning as a Bargaining Game"):
    assert piece in alone.stdout, piece
  for s in range(2):
    _run(tmp_path / "w" / f"stl_mu{s}", ["mu"], {"mu": 0.10}, "ls", s)
    _run(tmp_path / "w" / f"stl_homo{s}", ["homo"], {"homo": 80.0}, "ls", s)
    _run(tmp_path / "w" / f"ls{s}", ["mu", "homo"], {"mu": 0.12, "homo": 88.0}, "ls", s)
    _run(tmp_path / "w" / f"nash{s}", ["mu", "homo"], {"mu": 0.11, "homo": 84.0}, "nash_mtl", s)
  out = _report(f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'rep'}", "--published",
                cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  text = out.stdout
  assert "ours vs published on qm9" in text and "2 of 11 tasks" in text
  nash = next(l for l in text.splitlines() if l.strip().startswith("nash_mtl") and "pub." in l)
  assert "+7.50" in nash and "+62.00 (pub.)" in nash and "Nash-MTL 2022" in nash
  ls = next(l for l in text.splitlines() if l.strip().startswith("ls ") and "pub." in l)
  assert "+15.00" in ls and "+177.60 (pub.)" in ls
  mu = next(l for l in text.splitlines() if l.strip().startswith("mu mae"))
  assert "0.1" in mu and "0.0671 (pub.)" in mu
  plain = _report(f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'rep2'}", cwd=tmp_path)
  assert plain.returncode == 0 and "(pub.)" not in plain.stdout
