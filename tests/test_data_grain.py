"""The grain pipeline (``workers > 0``): the same batches as in-process, in order, resumable from
``position`` (also after the loader's process is killed with SIGKILL, workers and all)."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs.common import base_config
import mtl_jax.data as D
from mtl_jax.data import base, common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(workers):
  c = base_config()
  c.data.name, c.data.mock, c.data.image_size, c.data.workers = "celeba", True, 16, workers
  c.tasks = "Male,Smiling"
  return c


def _digest(batch):
  import jax
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(batch):
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def reference():
  """Batches 0..9 (crossing epochs: 48 examples, batch 8) and the test epoch, in-process."""
  bench = D.get_benchmark(_config(0))
  loader = bench.loader("train", 8, seed=5)
  return ([_digest(next(loader)) for _ in range(10)],
          [_digest(b) for b in bench.loader("test", 6).epoch()])


def test_workers_give_the_in_process_batches_and_resume(reference):
  train, test = reference
  bench = D.get_benchmark(_config(2))
  assert bench.info["workers"] == 2
  loader = bench.loader("train", 8, seed=5)
  assert loader.batches_per_epoch == 6
  assert [_digest(next(loader)) for _ in range(4)] == train[:4] and loader.position == 4
  loader.position = 7  # what a resume does: the running pipeline is dropped and restarted at 7
  assert [_digest(next(loader)) for _ in range(3)] == train[7:10]
  loader.close()
  assert [_digest(b) for b in bench.loader("test", 6).epoch()] == test


def test_worker_defaults():
  assert common.workers(_config(-1), file_backed=False) == 0  # in memory: no processes
  assert common.workers(_config(-1), file_backed=True) == common.default_workers()
  assert 0 <= common.default_workers() <= 16
  with pytest.raises(ValueError, match="config.data.workers must be -1"):
    common.workers(_config(-3), file_backed=True)


def test_sampler_shards_and_picklable():
  import cloudpickle
  s = [base.Sampler(50, 8, seed=1, process_index=i, process_count=2) for i in range(2)]
  a, b = s[0].indices(9), s[1].indices(9)
  assert len(a) == len(b) == 4 and not set(a) & set(b)
  assert cloudpickle.loads(cloudpickle.dumps(s[0])).indices(9).tolist() == a.tolist()


_CHILD = r"""
import sys
from configs.common import base_config
import mtl_jax.data as D
from tests.test_data_grain import _config, _digest
start, log = int(sys.argv[1]), sys.argv[2]
loader = D.get_benchmark(_config(1)).loader("train", 8, seed=5, position=start)
with open(log, "a") as f:
  while loader.position < 10:
    p = loader.position
    f.write(f"{p} {_digest(next(loader))}\n"); f.flush()
    if start == 0 and p == 3:
      import time; time.sleep(600)  # killed here, its workers mid-prefetch
"""


def _children(pid):
  out = []
  for d in os.listdir("/proc"):
    try:
      with open(f"/proc/{d}/stat") as f:
        if d.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
          out.append(int(d))
    except OSError:
      pass
  return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc for the worker processes")
def test_kill9_resume_with_workers_gives_the_same_batches(reference, tmp_path):
  log = tmp_path / "batches.txt"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.Popen([sys.executable, "-c", _CHILD, "0", str(log)], cwd=ROOT, env=env)
  deadline = time.time() + 240
  while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 4):
    assert proc.poll() is None, "the loader process ended early"
    time.sleep(0.2)
  workers = _children(proc.pid)
  assert workers, "no grain worker processes"
  os.kill(proc.pid, signal.SIGKILL)  # the loader's process only: its workers must follow it
  proc.wait()
  deadline = time.time() + 30
  while time.time() < deadline and any(os.path.exists(f"/proc/{w}") for w in workers):
    time.sleep(0.2)
  assert not any(os.path.exists(f"/proc/{w}") for w in workers), "orphaned grain workers"
  done = [line.split() for line in log.read_text().splitlines()]
  assert [int(p) for p, _ in done] == [0, 1, 2, 3]
  subprocess.run([sys.executable, "-c", _CHILD, str(len(done)), str(log)], cwd=ROOT, env=env,
                 check=True, timeout=240)
  lines = [line.split() for line in log.read_text().splitlines()]
  assert [int(p) for p, _ in lines] == list(range(10))
  assert [d for _, d in lines] == reference[0]
