import os
import shutil
import tempfile

# Tests run on the CPU; several tests force host devices themselves in a subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
