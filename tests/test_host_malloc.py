"""mtl_jax.host_malloc: which environments get the glibc malloc tunables, and that they take."""

import os
import platform
import subprocess
import sys

import pytest

from mtl_jax import host_malloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc only")


@needs_glibc
def test_cpu_runs_get_every_tunable_and_the_users_own_settings_win():
  env = host_malloc.tuned_environ({"JAX_PLATFORMS": "cpu",
                                   "GLIBC_TUNABLES": "glibc.malloc.arena_max=8"})
  items = env["GLIBC_TUNABLES"].split(":")
  assert "glibc.malloc.arena_max=8" in items and "glibc.malloc.arena_max=1" not in items
  for key, value in host_malloc.TUNABLES[1:]:
    assert f"{key}={value}" in items
  # applied once: a re-executed process (or a child that inherits it) does nothing more
  assert host_malloc.tuned_environ(env) is None


@pytest.mark.parametrize("environ", [{"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": "tpu,cpu"},
                                     {"JAX_PLATFORMS": "cpu", "MTL_JAX_MALLOC": "0"}])
def test_accelerator_runs_and_the_opt_out_are_left_alone(environ):
  assert host_malloc.tuned_environ(environ) is None


@needs_glibc
def test_reexec_sets_the_tunables_for_the_new_process(tmp_path):
  script = tmp_path / "probe.py"
  script.write_text(
      "import os, sys\n"
      f"sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})\n"
      "from mtl_jax import host_malloc\n"
      "host_malloc.reexec_if_useful()\n"
      "print(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])\n")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MTL_JAX_MALLOC",
                                                          "MTL_JAX_MALLOC_APPLIED")}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, str(script), "--flag=1"], env=env, capture_output=True,
                       text=True, check=True).stdout
  assert "glibc.malloc.arena_max=1" in out and "['--flag=1']" in out

