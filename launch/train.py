r"""Train one multi-task model from a config.

    python launch/train.py --config=configs/nash_celeba.py:smoke --workdir=/tmp/w \
      --config.combiner.name=pcgrad --config.tasks=Smiling,Male

Rerunning the same command resumes from the workdir's latest checkpoint (a newest checkpoint that
does not restore is moved aside to ``<step>.corrupt`` and the one before it is used). Several
processes (hosts): on a Cloud TPU pod slice or under SLURM, the same command on each with
``--distributed`` (or ``MTL_JAX_DISTRIBUTED=1``): ``jax.distributed.initialize()`` takes the
coordinator, the process count and the id from the environment; elsewhere (a GPU cluster, CPU
processes on one machine) one command per process with ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` (or ``MTL_JAX_COORDINATOR_ADDRESS``, ``MTL_JAX_NUM_PROCESSES``,
``MTL_JAX_PROCESS_ID``). A SIGTERM to any one process makes all of them checkpoint the same step
and exit 143 (JAX's preemption service; see ``mtl_jax.train._Stop``).

The terminal shows a start-up block, a line before each long phase (data, compiling), a progress
bar (with ``--progress`` or on a terminal) and the selected step's test metrics with Δm%; the full
log, without orbax's INFO lines, is ``<workdir>/train.*INFO*``.

Exit status: 0 done; 2 a problem the user can fix, in one line (unknown config key, combiner,
sharing, dataset, task or variant; missing or unparsable config file; a workdir that is a file or
not writable; data not prepared; checkpoints none of which restores); 3 a non-finite loss with
``config.train.on_nonfinite='stop'``; 4 every step skipped as non-finite
(``on_nonfinite='skip'``): the run finished but learned nothing; 143 stopped by SIGTERM after
saving a checkpoint (preempted: rerun to resume), as a shell reports a SIGTERM-killed process.
"""

import os
import socket
import sys


if __name__ == "__main__":
  from mtl_jax import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.reexec_if_useful()  # glibc malloc tunables for XLA-CPU steps (MTL_JAX_MALLOC=0: off)

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position
from absl import logging  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file [:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (resumes if it has checkpoints)")
_PROGRESS = flags.DEFINE_bool("progress", None,
                              "progress bar on stderr (default: only when stderr is a terminal)")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None,
    "several processes: call jax.distributed.initialize() (coordinator, process count and id from "
    "the three flags below, else from the cluster: Cloud TPU, SLURM, ...); env "
    "MTL_JAX_DISTRIBUTED=1")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0's coordinator (implies --distributed); env MTL_JAX_COORDINATOR_ADDRESS")
_NUM_PROCESSES = flags.DEFINE_string(
    "num_processes", None, "number of processes (implies --distributed); env MTL_JAX_NUM_PROCESSES")
_PROCESS_ID = flags.DEFINE_string(
    "process_id", None, "this process's id, 0..num_processes-1 (implies --distributed); env "
    "MTL_JAX_PROCESS_ID")

EXIT_USER, EXIT_NONFINITE, EXIT_ALL_SKIPPED, EXIT_PREEMPTED = 2, 3, 4, 143
_LOADED = []  # the config the --config flag loaded (flag_error_line checks overrides against it)


def _fail(msg: str, code: int) -> None:
  sys.stderr.write(f"error: {msg}\n")
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access  (no traceback, no atexit noise)


def _say(line: str) -> None:
  print(line, flush=True)


class _DropOrbaxInfo:
  """A logging filter: orbax's INFO lines (about half of a run's log) stay out of our log."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or f"{os.sep}orbax{os.sep}" not in record.pathname


def _open_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    _fail(f"--workdir {workdir!r} is a file, not a directory", EXIT_USER)
  try:
    os.makedirs(workdir, exist_ok=True)
    # one probe per process: several processes may open the same workdir at once
    probe = os.path.join(workdir, f".write_test.{socket.gethostname()}.{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    _fail(f"--workdir {workdir!r} is not writable ({e.strerror})", EXIT_USER)
  # Log to a file in the workdir (each process its own), warnings and errors also to stderr.
  logging.get_absl_handler().use_absl_log_file("train", workdir)
  logging.get_absl_handler().addFilter(_DropOrbaxInfo())
  logging.set_stderrthreshold("warning")


def _print_result(summary: dict, bench, workdir: str) -> None:
  """The selected step's test metrics (with units where the benchmark has them) and Δm%."""
  units = summary.get("units") or {}
  for task, metrics in (summary.get("test") or {}).items():
    vals = metrics.items() if isinstance(metrics, dict) else [("value", metrics)]
    unit = f" {units[task]}" if task in units else ""
    _say(f"test {task}: " + ", ".join(f"{k} {float(v):.6g}{unit}" for k, v in vals))
  _say(f"num_params {summary.get('num_params'):,}; step {summary['step']} params_checksum "
       f"{summary['params_checksum']}; summary -> {os.path.join(workdir, 'summary.json')}")
  dm = summary.get("delta_m")
  if dm is None:
    _say(f"Δm% n/a: benchmark {bench.name!r} has no single-task reference "
         f"(test metrics of step {summary['selected_step']}, selected by {summary['selection']})")
    return
  source = bench.info.get("reference_source") or f"the single-task (STL) reference of {bench.name}"
  _say(f"Δm% {float(dm):+.2f} (lower is better) against {source}, at step "
       f"{summary['selected_step']} selected by validation {summary['selection']}")


_DIST_ENV = {"coordinator_address": "MTL_JAX_COORDINATOR_ADDRESS",
             "num_processes": "MTL_JAX_NUM_PROCESSES", "process_id": "MTL_JAX_PROCESS_ID"}


def _given_process_settings() -> dict:
  """``{name: (value, where it came from)}`` of the coordinator / count / id given by a flag or,
  failing that, by its environment variable."""
  given = {}
  for flag in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID):
    if flag.value not in (None, ""):
      given[flag.name] = (flag.value.strip(), f"--{flag.name}")
    elif os.environ.get(_DIST_ENV[flag.name], "").strip():
      given[flag.name] = (os.environ[_DIST_ENV[flag.name]].strip(), _DIST_ENV[flag.name])
  return given


def _int_setting(given: dict, name: str, low: int, high=None) -> int:
  value, where = given[name]
  ok = value.isdigit() and int(value) >= low and (high is None or int(value) < high)
  if not ok:
    valid = f"an integer >= {low}" if high is None else f"an integer in 0..{high - 1}"
    _fail(f"{where}={value!r} is not {valid}", EXIT_USER)
  return int(value)


def distributed_settings():
  """``None`` (one process, no ``jax.distributed``) or the keyword arguments of
  ``jax.distributed.initialize``: ``{}`` (coordinator, process count and id detected from the
  cluster: Cloud TPU, SLURM, Open MPI, ...) or all three given. Inconsistent values are one line."""
  dist = _DISTRIBUTED.value
  if dist is None:
    env = os.environ.get("MTL_JAX_DISTRIBUTED", "").strip().lower()
    if env not in ("", "0", "1", "false", "true"):
      _fail(f"MTL_JAX_DISTRIBUTED={env!r}; valid: 0, 1, false, true", EXIT_USER)
    dist = {"": None, "0": False, "false": False}.get(env, True)
  given = _given_process_settings()
  wheres = ", ".join(w for _, w in given.values())
  if dist is False and given:
    _fail(f"--nodistributed (or MTL_JAX_DISTRIBUTED=0) contradicts {wheres}; drop one", EXIT_USER)
  if not given:
    return {} if dist else None
  if len(given) < 3:
    missing = ", ".join(f"--{n} (or {e})" for n, e in _DIST_ENV.items() if n not in given)
    _fail(f"{wheres} given without {missing}: give all three, one command per process, or none "
          f"of them with --distributed to take them from the cluster (Cloud TPU, SLURM, ...)",
          EXIT_USER)
  addr, where = given["coordinator_address"]
  host, _, port = addr.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    _fail(f"{where}={addr!r} is not host:port (e.g. 10.0.0.1:8476)", EXIT_USER)
  n = _int_setting(given, "num_processes", 1)
  return {"coordinator_address": addr, "num_processes": n,
          "process_id": _int_setting(given, "process_id", 0, n)}


def _init_distributed(settings: dict) -> None:
  """``jax.distributed.initialize`` (before any other JAX call). CPU processes run their
  cross-process collectives over gloo (the CPU backend has no others); JAX's preemption service
  (on by default) turns a SIGTERM to any process into one agreed stopping step
  (``mtl_jax.train`` asks orbax's ``CheckpointManager.reached_preemption`` every step)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**settings)
  except (RuntimeError, ValueError, TypeError) as e:
    what = ", ".join(f"{k}={v!r}" for k, v in settings.items()) or "from the cluster environment"
    _fail(f"jax.distributed.initialize ({what}) failed: {str(e).strip().splitlines()[0]}",
          EXIT_USER)


def _shutdown_distributed(settings) -> None:
  """Leave the distributed runtime together (its shutdown is a barrier over the processes), so
  no process exits while another still writes its part of the last checkpoint."""
  if settings is not None:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.shutdown()


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; use --config, --workdir, --config.<key>=<value>",
          EXIT_USER)
  if _WORKDIR.value is None:
    _fail("--workdir is required", EXIT_USER)
  workdir = _WORKDIR.value
  dist = distributed_settings()
  _open_workdir(workdir)
  if dist is not None:
    _init_distributed(dist)
  from mtl_jax import config_utils  # pylint: disable=g-import-not-at-top
  from mtl_jax import train  # pylint: disable=g-import-not-at-top

  try:
    config = _CONFIG.value
    config.keys()  # a missing config file raises here, not in the flag parser
  except OSError as e:  # config_flags defers a missing config file to the first access
    _fail(config_utils.flag_error_line(e, sys.argv), EXIT_USER)
  logging.info("config:\n%s", config)
  _say(f"loading {config.data.name} data and building the model (a first run featurises or "
       f"indexes the dataset: QM9 takes minutes once, then it is cached)…")
  try:
    built = train.build(config)  # validate and build first: configuration errors are one line
  except (config_utils.ConfigError, ValueError, KeyError, TypeError, OSError) as e:
    _fail(str(e).splitlines()[0] if str(e) else repr(e), EXIT_USER)
  try:
    summary = train.fit(config, workdir, progress=_PROGRESS.value, built=built, echo=True)
  except train.NonFiniteError as e:
    _fail(str(e), EXIT_NONFINITE)
  except train.CheckpointError as e:
    _fail(str(e), EXIT_USER)
  if summary is None:
    logging.warning("stopped by SIGTERM; rerun the same command to resume")
    _shutdown_distributed(dist)
    sys.stdout.flush()
    os._exit(EXIT_PREEMPTED)  # pylint: disable=protected-access
  import jax  # pylint: disable=g-import-not-at-top
  process = jax.process_index()
  _shutdown_distributed(dist)
  if process:  # process 0 prints the result and writes summary.json; the others say they agree
    _say(f"process {process}: step {summary['step']} params_checksum {summary['params_checksum']}")
  else:
    _print_result(summary, built[0], workdir)
  if summary["skipped_steps"] >= summary["step"]:
    _fail(f"every one of the {summary['step']} steps was skipped as non-finite "
          f"(config.train.on_nonfinite='skip'): the parameters are the initial ones", EXIT_ALL_SKIPPED)


def _remember_loaded_config() -> None:
  """Keep the config the ``--config`` flag loads, so that a bad override can be named against it
  without loading the file a second time."""
  parser = flags.FLAGS["config"].parser
  load = parser.parse

  def parse(argument):
    _LOADED.append(load(argument))
    return _LOADED[-1]

  parser.parse = parse


def _parse(argv):
  """absl flag parsing with flag errors (unknown --config.key, bad value, missing or broken config
  file, unknown variant) as one line."""
  _remember_loaded_config()
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError,
          SyntaxError) as e:
    from mtl_jax import config_utils  # pylint: disable=g-import-not-at-top
    _fail(config_utils.flag_error_line(e, argv, _LOADED[-1] if _LOADED else None), EXIT_USER)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse)
