"""launch/colab.ipynb: valid notebook JSON, its code cells run top to bottom (CPU, smoke config), and
its install cell keeps an accelerator JAX.

The cells run as one plain Python script in a subprocess (the notebook has no shell magics), from a
scratch HOME with no prepared CelebA, so the notebook picks ``configs/nash_celeba.py:smoke``. pip
runs for real but is told through its own environment variables (``PIP_DRY_RUN``, ``PIP_REPORT``,
``PIP_NO_INDEX``, ``PIP_FIND_LINKS``) to resolve only, offline, and report what it would install.

The accelerator cases fake an installed accelerator JAX: ``*.dist-info`` folders (name and version
only) on ``PYTHONPATH``, which pip and ``importlib.metadata`` see before the real site-packages, and
wheels of the CPU pins' versions (metadata only) in ``PIP_FIND_LINKS``, so that a command that
would swap the runtime's jax/jaxlib for ours resolves to doing so and the report shows it.
"""

import json
import os
import re
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")
TESTED_JAX = re.search(r"^jax\[cpu\]==([\d.]+)", open(os.path.join(ROOT, "requirements.txt")).read(),
                       re.M).group(1)
ACCELERATOR = re.compile(r"^(libtpu(-nightly)?|jax-(cuda|rocm)\d+-(plugin|pjrt))$")


def _cells(kind="code"):
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  return [c for c in nb["cells"] if c["cell_type"] == kind]


def _source(cell):
  return "".join(cell["source"])


def _install_cell():
  (cell,) = [c for c in _cells() if "def install_command" in _source(c)]
  return _source(cell)


def _norm(name):
  return re.sub(r"[-_.]+", "-", name).lower()


def _pip_env(tmp_path, **extra):
  env = dict(os.environ, HOME=str(tmp_path / "home"), MTL_JAX_REPO=ROOT, MPLBACKEND="Agg",
             PIP_DRY_RUN="1", PIP_NO_INDEX="1", PIP_REPORT=str(tmp_path / "pip_report.json"),
             PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1", TMPDIR=str(tmp_path),
             # pip's legacy spelling: "false" here *disables* build isolation (offline: the
             # editable metadata is built with the installed setuptools)
             PIP_NO_BUILD_ISOLATION="false")
  env.pop("TFDS_DATA_DIR", None)
  env.update(extra)
  (tmp_path / "home").mkdir(exist_ok=True)
  return env


def _would_install(tmp_path):
  with open(tmp_path / "pip_report.json") as f:
    return {_norm(i["metadata"]["name"]): i["metadata"]["version"] for i in json.load(f)["install"]}


def test_notebook_json_is_valid():
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5
  assert nb["metadata"]["kernelspec"]["name"] == "python3"
  ids = [c["id"] for c in nb["cells"]]
  assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[A-Za-z0-9-_]{1,64}", i) for i in ids)
  for c in nb["cells"]:
    assert c["cell_type"] in ("code", "markdown") and isinstance(c["metadata"], dict)
    assert isinstance(c["source"], list) and all(isinstance(s, str) for s in c["source"])
    if c["cell_type"] == "code":  # committed without outputs, and plain Python (no ! or % magics)
      assert c["outputs"] == [] and c["execution_count"] is None
      compile(_source(c), c["id"], "exec")


PRELUDE = """
import os, sys
FORKS_AFTER_JAX = []
os.register_at_fork(before=lambda: FORKS_AFTER_JAX.append('jax' in sys.modules))
"""

# After the cells: every figure's axes, the forks this process made, and whether it initialised a
# JAX backend: JAX installs its "os.fork() was called" warning when it does, so one deliberate fork
# (after the record above is taken) shows it.
EPILOGUE = """
import json, warnings
import matplotlib.pyplot as plt
axes = [dict(title=ax.get_title(), xlabel=ax.get_xlabel(), ylabel=ax.get_ylabel(),
             lines=len(ax.get_lines()), visible=ax.axison)
        for n in plt.get_fignums() for ax in plt.figure(n).get_axes()]
forks = list(FORKS_AFTER_JAX)
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter('always')
  pid = os.fork()
  if pid == 0:
    os._exit(0)
  os.waitpid(pid, 0)
backend = any('os.fork() was called' in str(w.message) for w in caught)
print('NOTEBOOK_STATE ' + json.dumps(dict(axes=axes, forks_after_jax=forks, backend_initialised=backend,
                                          workdir=WORKDIR, config=CONFIG)))
"""


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("notebook")
  script = tmp_path / "notebook.py"
  script.write_text("\n\n".join([PRELUDE] + [_source(c) for c in _cells()] + [EPILOGUE]))
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_pip_env(tmp_path),
                        capture_output=True, text=True, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  (line,) = [l for l in proc.stdout.splitlines() if l.startswith("NOTEBOOK_STATE ")]
  return json.loads(line.split(" ", 1)[1]), out, tmp_path


def test_notebook_runs_top_to_bottom_on_cpu(notebook_run):
  state, out, tmp_path = notebook_run
  # no CelebA in the scratch HOME: the smoke config on mock data, trained to the end
  assert state["config"] == "configs/nash_celeba.py:smoke"
  assert "no accelerator JAX here" in out and "-r requirements.txt" in out
  # the CPU set is what this venv has: pip would only (re)install the checkout
  assert set(_would_install(tmp_path)) == {"mtl-jax"}
  summary = json.load(open(os.path.join(state["workdir"], "summary.json")))
  assert summary["combiner"] == "nash_mtl" and summary["step"] > 0
  assert "selected step" in out and "cpu" in out  # the summary line, the device check
  assert "pip install tensorboard" in out or "tensorboard" in sys.modules  # optional, says how


def test_notebook_never_forks_or_starts_jax_in_the_kernel(notebook_run):
  state, _, _ = notebook_run
  assert state["forks_after_jax"] == []  # subprocess starts children without os.fork
  assert not state["backend_initialised"]  # the devices stay free for the training process


def test_notebook_figures_are_labelled(notebook_run):
  state, _, _ = notebook_run
  drawn = [a for a in state["axes"] if a["visible"]]
  assert len(drawn) >= 3 and all(a["lines"] > 0 for a in drawn)
  for a in drawn:
    assert a["title"] and a["xlabel"] and a["ylabel"], a
  assert all(a["title"] for a in state["axes"])


def _fake_dist_info(site, name, version):
  d = site / f"{name.replace('-', '_')}-{version}.dist-info"
  d.mkdir(parents=True)
  (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
  (d / "RECORD").write_text("")


def _fake_wheel(wheels, name, version, requires=(), extras=()):
  """A metadata-only wheel: enough for pip to resolve (and, in dry-run, report) installing it."""
  dist = f"{name.replace('-', '_')}-{version}"
  meta = [f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
  meta += [f"Provides-Extra: {e}" for e in extras] + [f"Requires-Dist: {r}" for r in requires]
  with zipfile.ZipFile(wheels / f"{dist}-py3-none-any.whl", "w") as z:
    z.writestr(f"{dist}.dist-info/METADATA", "\n".join(meta) + "\n")
    z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(f"{dist}.dist-info/RECORD", "")


def _jax_release_wheels(wheels, v):
  """jax, jaxlib and the CUDA 12 plugin of release ``v``, as their real metadata ties them."""
  _fake_wheel(wheels, "jax", v, extras=("cpu", "cuda12", "tpu"), requires=(
      f'jaxlib=={v}', f'jaxlib=={v}; extra == "cpu"',
      f'jax-cuda12-plugin[with-cuda]=={v}; extra == "cuda12"', 'libtpu==0.0.42.*; extra == "tpu"'))
  _fake_wheel(wheels, "jaxlib", v)
  _fake_wheel(wheels, "jax-cuda12-plugin", v, extras=("with-cuda",),
              requires=(f"jax-cuda12-pjrt=={v}",))
  _fake_wheel(wheels, "jax-cuda12-pjrt", v)
  _fake_wheel(wheels, "libtpu", "0.0.42")


def _accelerator_env(tmp_path, installed):
  site, wheels = tmp_path / "site", tmp_path / "wheels"
  wheels.mkdir()
  for name, version in installed.items():
    _fake_dist_info(site, name, version)
  _jax_release_wheels(wheels, TESTED_JAX)
  return _pip_env(tmp_path, PYTHONPATH=str(site), PIP_FIND_LINKS=str(wheels))


def _jax_family(dists):
  return {n: v for n, v in dists.items() if n in ("jax", "jaxlib") or ACCELERATOR.match(n)}


def _after(installed, tmp_path):
  return {**installed, **_would_install(tmp_path)}


def _assert_one_accelerator_release(final):
  """jax, jaxlib and every device plugin of one release: the accelerator JAX still works."""
  plugins = {n: v for n, v in final.items() if ACCELERATOR.match(n)}
  assert plugins, final
  assert final["jax"] == final["jaxlib"], final
  for n, v in plugins.items():
    if n.startswith("jax-"):
      assert v == final["jax"], final


def _run_install_cell(tmp_path, installed):
  """The notebook's install cell alone, where ``installed`` is the runtime's JAX (pip: dry run)."""
  env = _accelerator_env(tmp_path, installed)
  cell = tmp_path / "install.py"
  cell.write_text(_install_cell())
  proc = subprocess.run([sys.executable, str(cell)], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return env, proc


NEW = "9.9.0"  # newer than anything mtl_jax needs, and unlike our CPU pin
RUNTIMES = {
    "cuda12": {"jax": NEW, "jaxlib": NEW, "jax-cuda12-plugin": NEW, "jax-cuda12-pjrt": NEW},
    "tpu": {"jax": NEW, "jaxlib": NEW, "libtpu": "0.0.99"},
}


@pytest.mark.parametrize("kind", sorted(RUNTIMES))
def test_install_cell_keeps_an_accelerator_jax(tmp_path, kind):
  installed = RUNTIMES[kind]
  env, proc = _run_install_cell(tmp_path, installed)
  assert f"keeping this runtime's {kind} JAX" in proc.stdout
  would = _would_install(tmp_path)
  assert not _jax_family(would) and "mtl-jax" in would, would

  # The check can fail: the CPU install (what the notebook used to run) swaps jax and jaxlib for
  # our pins here, leaving the runtime's plugin behind.
  os.remove(tmp_path / "pip_report.json")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt"], cwd=ROOT,
                 env=env, check=True, capture_output=True)
  assert _jax_family(_would_install(tmp_path)) == {"jax": TESTED_JAX, "jaxlib": TESTED_JAX}


def test_install_cell_moves_an_old_accelerator_jax_as_one_release(tmp_path):
  installed = {"jax": "0.1.0", "jaxlib": "0.1.0", "jax-cuda12-plugin": "0.1.0",
               "jax-cuda12-pjrt": "0.1.0"}
  _, proc = _run_install_cell(tmp_path, installed)
  assert f"jax[cuda12]=={TESTED_JAX}" in proc.stdout
  would = _would_install(tmp_path)
  assert {"jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt"} <= set(would), would
  _assert_one_accelerator_release(_after(installed, tmp_path))
