"""The ``:smoke`` config variants run end to end through the launcher's code path (issue 5).

Two subprocesses (JAX starts once in each) load a representative subset of the shipped smoke
configs, one per data module — digits (real, offline), NYUv2 (fabricated dense arrays), CoNLL-2003
(tfds mock, token tasks), GLUE (tfds mock, multi-input); CelebA (tfds mock) and QM9 (fabricated
molecules) are run by tests/test_readme.py through launch/train.py — and run each as ``launch/train.py`` does (``train.build`` then ``train.fit``) for 2 steps with
one evaluation and one checkpoint, in its own workdir. The test checks that each run writes a
``summary.json`` whose selected test metrics name every task of the config with finite values.

Every smoke config (all 15) was run through ``launch/train.py`` itself; this test keeps a cheap
guard on the path they share.
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# config file (under configs/) -> its smoke tasks (what summary.json must name).
# CelebA (nash_celeba:smoke, 3 tasks) and QM9 (ls_qm9:smoke, default.py:smoke) run through
# launch/train.py itself in tests/test_readme.py, with the same per-task checks of summary.json.
CASES = {
    "nash_digits": ["left", "right"],
    "nash_nyuv2": ["segmentation", "depth", "normal"],
    "nash_conll": ["pos", "chunks", "ner"],
    "nash_glue": ["sst2", "cola", "mrpc", "rte"],  # multi-input: one batch per task
}

SCRIPT = r"""
import json, os, sys, time
sys.path.insert(0, %(root)r)
os.chdir(%(root)r)
from mtl_jax import config_utils, train

out = {}
for name in %(names)r:
  cpu = time.process_time()
  config = config_utils.load_config_file(os.path.join("configs", name + ".py") + ":smoke")
  with config.unlocked():
    config.train.num_steps = 2
    config.train.eval_every = 2
    config.train.checkpoint_every = 2
    config.train.log_every = 1
  built = train.build(config)  # the launcher validates and builds first, then fits
  workdir = os.path.join(%(tmp)r, name)
  summary = train.fit(config, workdir, progress=False, built=built)
  with open(os.path.join(workdir, "summary.json")) as f:
    written = json.load(f)
  out[name] = {"tasks": [t.name for t in built[0].tasks], "step": written["step"],
               "test": written["test"], "num_params": written["num_params"],
               "returned_step": summary["step"], "cpu_s": time.process_time() - cpu}
  sys.stderr.write(f"{name}: {out[name]['cpu_s']:.1f} CPU s\n")
print("RESULT " + json.dumps(out))
"""


def _is_finite_number(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


# Two subprocesses of two configs each, so that pytest-xdist can put them on different workers.
GROUPS = (("nash_digits", "nash_nyuv2"), ("nash_conll", "nash_glue"))


def test_groups_cover_every_case():
  assert sorted(n for g in GROUPS for n in g) == sorted(CASES)


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: "+".join(g))
def test_smoke_configs_run_end_to_end(tmp_path, group):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  script = SCRIPT % {"root": ROOT, "names": list(group), "tmp": str(tmp_path)}
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
  results = json.loads(line[len("RESULT "):])
  assert sorted(results) == sorted(group)
  for name in group:
    expected, r = CASES[name], results[name]
    assert r["step"] == 2 and r["returned_step"] == 2, name
    assert r["num_params"] > 0, name
    assert r["tasks"] == expected, name
    assert sorted(r["test"]) == sorted(r["tasks"]), name  # per-task metrics for every task
    for task, metrics in r["test"].items():
      assert isinstance(metrics, dict) and metrics, (name, task)
      for metric, value in metrics.items():
        assert _is_finite_number(value), (name, task, metric, value)
