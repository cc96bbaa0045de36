import os
import shutil
import tempfile

import pytest

# Tests run on the CPU; several tests force host devices themselves in a subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Compile fast: the suite's cost is XLA compiling small programs, not running them. XLA's CPU
# backend at optimisation level 1 without LLVM's expensive passes compiles a smoke training step
# with ~40% less CPU here (celeba :smoke, 2 steps: 12-13 s vs 20-21 s user) and the tiny programs
# run about as fast. Every comparison in the suite is between programs built under the same flags,
# or against a float64 reference with a stated tolerance. Level 0 is NOT used: it miscompiles the
# SegNet backward here (NaN conv gradients under batch norm at step 2 of nash_nyuv2:smoke, finite at
# levels 1-3). MTL_JAX_TEST_XLA_OPT=1 tests with XLA's default optimisation instead.
if os.environ.get("MTL_JAX_TEST_XLA_OPT") != "1":
  os.environ["XLA_FLAGS"] = " ".join([
      os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=1",
      "--xla_llvm_disable_expensive_passes=true"]).strip()

# One persistent compilation cache for the run (pytest-xdist workers and subprocesses inherit it):
# the subprocesses that compile the same step again -- a resumed run, the same config twice --
# load it instead. Removed at the end unless the caller chose the directory.
_CACHE_CREATED = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_CREATED = tempfile.mkdtemp(prefix="mtl_jax_tests_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_CREATED
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_sessionfinish(session, exitstatus):
  del exitstatus
  if _CACHE_CREATED and not hasattr(session.config, "workerinput"):  # the process that made it
    shutil.rmtree(_CACHE_CREATED, ignore_errors=True)


# The longest files start first, so that pytest-xdist's two workers finish together instead of
# one waiting on a long test that was collected last (whole files move, so module-scoped fixtures
# stay shared and the order inside a file is unchanged). `-n 2` alone means `--dist load`, whose
# first step hands each worker a block of len(tests) / 8 consecutive tests (xdist 3.8: ~89 here):
# the first block held nearly every long file, so they ran one after another on one worker. Under
# that default the files are therefore dealt out whole, in this order, one at a time to whichever
# worker is free (`--dist loadfile` without xdist's reordering by test count); an explicit other
# `--dist` is left alone. Order: the per-file wall times of a full `-n 2 --durations=0` run.
_LONG_FIRST = ("test_readme.py", "test_benchmark.py", "test_smoke_configs.py", "test_sharing.py",
               "test_sweep_report.py", "test_dynamic.py", "test_combiners_contract.py",
               "test_notebook.py", "test_multiprocess.py", "test_mixed_precision.py",
               "test_resume.py", "test_qm9_devices.py", "test_train.py", "test_data_grain.py",
               "test_qm9_eval.py", "test_methods_round2.py", "test_conv.py", "test_branched.py",
               "test_structure.py", "test_engine.py", "test_solvers.py", "test_combiners_grad.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_LONG_FIRST)}
  items.sort(key=lambda it: rank.get(os.path.basename(str(it.fspath)), len(rank)))


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """`-n N` without `--dist`: whole files in `_LONG_FIRST` order (see above)."""
  if config.getvalue("dist") != "load":
    return None  # the caller chose a distribution
  from xdist.scheduler import LoadFileScheduling  # pylint: disable=g-import-not-at-top
  config.option.loadscopereorder = False  # keep the collection's (longest-first) order
  return LoadFileScheduling(config, log)
