r"""Train one multi-task model from a config.

    python launch/train.py --config=configs/nash_celeba.py:smoke --workdir=/tmp/w \
      --config.combiner.name=pcgrad --config.tasks=Smiling,Male

Rerunning the same command resumes from the workdir's latest checkpoint. Several hosts: launch the
same command on each with ``--distributed`` (or ``MTL_JAX_DISTRIBUTED=1``), which calls
``jax.distributed.initialize()`` (coordinator from the environment, as on Cloud TPU / SLURM).

A config problem (unknown key, combiner, sharing, dataset or task name, bad choice) prints one line
naming the valid choices and exits with status 2; a non-finite loss with
``config.train.on_nonfinite='stop'`` prints one line and exits with status 3.
"""

import os
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
    "distributed", os.environ.get("MTL_JAX_DISTRIBUTED", "") not in ("", "0"),
    "call jax.distributed.initialize() (several hosts); env MTL_JAX_DISTRIBUTED=1 also sets it")


def _fail(msg: str, code: int) -> None:
  sys.stderr.write(f"error: {msg}\n")
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access  (no traceback, no atexit noise)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; use --config, --workdir, --config.<key>=<value>", 2)
  if _WORKDIR.value is None:
    _fail("--workdir is required", 2)
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  # Log to a file in the workdir (each process its own), warnings and errors also to stderr.
  logging.get_absl_handler().use_absl_log_file("train", workdir)
  logging.set_stderrthreshold("warning")
  import jax  # pylint: disable=g-import-not-at-top
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from mtl_jax import config_utils  # pylint: disable=g-import-not-at-top
  from mtl_jax import train  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  logging.info("config:\n%s", config)
  try:
    built = train.build(config)  # validate and build first: configuration errors are one line
  except (config_utils.ConfigError, ValueError, KeyError, TypeError) as e:
    _fail(str(e).splitlines()[0] if str(e) else repr(e), 2)
  try:
    summary = train.fit(config, workdir, progress=_PROGRESS.value, built=built)
  except train.NonFiniteError as e:
    _fail(str(e), 3)
  if summary is None:
    logging.warning("stopped by SIGTERM; rerun the same command to resume")
    return
  for task, metrics in (summary.get("test") or {}).items():  # the selected step's test metrics
    vals = metrics.items() if isinstance(metrics, dict) else [("value", metrics)]
    print(f"test {task}: " + ", ".join(f"{k} {float(v):.6g}" for k, v in vals))
  print(f"num_params {summary.get('num_params')}")
  print(f"step {summary['step']} params_checksum {summary['params_checksum']} "
        f"delta_m {summary['delta_m']} -> {os.path.join(workdir, 'summary.json')}")


def _parse(argv):
  """absl flag parsing with flag errors (unknown --config.key, bad value) as one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    from mtl_jax import config_utils  # pylint: disable=g-import-not-at-top
    _fail(config_utils.flag_error_line(e, argv), 2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse)
