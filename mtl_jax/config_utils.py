"""Config validation: every unknown key or name is one line naming the valid choices.

:func:`validate` checks a config against the schema of ``configs/common.py`` (sections
``train``, ``optimizer``, ``engine``, ``combiner``, ``model``: no unknown keys; ``data`` and the
option dicts ``combiner.hparams`` / ``model.sharing_options`` are free-form because benchmarks and
methods define their own) and checks the enumerated choices. Names of combiners, sharing strategies,
benchmarks and tasks are checked against their registries by the trainer when it builds them; the
registries raise the same one-line errors.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import re
from typing import Any, Iterable

import ml_collections

CHOICES = {
    ("engine", "mode"): ("", "losses", "gramian", "jacobian", "features"),
    ("engine", "reduction"): ("exact", "local"),
    ("engine", "layer_gramian"): ("auto", "all", "off"),
    ("optimizer", "name"): ("adam", "adamw", "sgd"),
    ("optimizer", "schedule"): ("constant", "cosine", "step", "plateau"),
    ("train", "on_nonfinite"): ("stop", "skip"),
    ("train", "select"): ("auto", "delta_m", "mean_main"),
    ("structure", "method"): ("none", "fixed", "affinity", "conflict", "learn_to_branch"),
    ("structure", "choose"): ("auto", "exhaustive", "agglomerative"),
    ("structure", "affinity"): ("cosine", "lookahead"),
}
FREE_FORM = {("data",), ("combiner", "hparams"), ("model", "sharing_options")}


class ConfigError(ValueError):
  """A config problem, described in one line."""


def _schema() -> ml_collections.ConfigDict:
  from mtl_jax.configs import common  # pylint: disable=g-import-not-at-top
  return common.base_config()


def one_of(kind: str, name: Any, valid: Iterable[str]) -> ConfigError:
  valid = [str(v) for v in valid]
  close = difflib.get_close_matches(str(name), valid, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return ConfigError(f"unknown {kind} {name!r}{hint}; valid: {', '.join(repr(v) if v == '' else v for v in valid)}")


def unknown_key(where: str, key: str, valid: Iterable[str]) -> ConfigError:
  valid = sorted(str(v) for v in valid)
  close = difflib.get_close_matches(str(key), valid, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return ConfigError(f"unknown config key '{where}.{key}'{hint}; valid keys of {where}: "
                     f"{', '.join(valid)}")


def _check_keys(cfg, schema, path: tuple) -> None:
  if path in FREE_FORM:
    return
  for key in cfg.keys():
    if key not in schema:
      raise unknown_key(".".join(("config",) + path), key, schema.keys())
    sub, ref = cfg[key], schema[key]
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(sub, ml_collections.ConfigDict):
        raise ConfigError(f"config.{'.'.join(path + (key,))} must be a section, got {sub!r}")
      _check_keys(sub, ref, path + (key,))


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` (one line) on an unknown key or an invalid enumerated choice."""
  schema = _schema()
  _check_keys(config, schema, ())
  for (section, key), valid in CHOICES.items():
    if section in config and key in config[section]:
      value = config[section][key]
      if value not in valid:
        raise one_of(f"config.{section}.{key}", value, valid)
  train = config.train
  for key in ("batch_size", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints"):
    if key in train and int(train[key]) < 1:
      raise ConfigError(f"config.train.{key} must be >= 1, got {train[key]}")
  if int(train.num_steps) < 0 or (int(train.num_steps) == 0 and int(train.num_epochs) < 1):
    raise ConfigError("set config.train.num_steps > 0 or config.train.num_epochs >= 1")
  if float(config.optimizer.learning_rate) <= 0:
    raise ConfigError(f"config.optimizer.learning_rate must be > 0, got "
                      f"{config.optimizer.learning_rate}")
  if "structure" in config:
    from mtl_jax.structure import dynamic  # pylint: disable=g-import-not-at-top
    try:
      dynamic.check(config.structure, config.model.sharing)
    except dynamic.StructureError as e:
      raise ConfigError(str(e)) from None
  o = config.optimizer
  if o.schedule == "plateau":
    if not 0 < float(o.plateau_factor) < 1:
      raise ConfigError(f"config.optimizer.plateau_factor must be in (0, 1), got {o.plateau_factor}")
    if int(o.plateau_patience) < 0 or float(o.plateau_min_lr) < 0:
      raise ConfigError("config.optimizer.plateau_patience and plateau_min_lr must be >= 0, got "
                        f"{o.plateau_patience} and {o.plateau_min_lr}")


def task_list(tasks: Any) -> list[str] | str:
  """``config.tasks`` as given (``'all'``, ``'Smiling,Male'`` or a list) -> ``'all'`` or a list."""
  if isinstance(tasks, str):
    if tasks.strip().lower() == "all":
      return "all"
    return [t.strip() for t in tasks.split(",") if t.strip()]
  return [str(t) for t in tasks]


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``'configs/x.py:variant'`` -> ``get_config(variant)`` of that file (as config_flags does)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_mtl_jax_user_config", path)
  if module_spec is None or not os.path.exists(path):
    raise ConfigError(f"config file {path!r} not found")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_override_paths(config: ml_collections.ConfigDict, paths: Iterable[str]) -> None:
  """Raise a one-line :class:`ConfigError` for the first ``a.b.c`` override not in ``config``."""
  for path in paths:
    node, walked = config, ["config"]
    for key in path.split("."):
      if not isinstance(node, (ml_collections.ConfigDict, dict)) or key not in node:
        valid = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
        raise unknown_key(".".join(walked), key, valid)
      node, walked = node[key], walked + [key]


def flag_error_line(err: BaseException, argv: list[str],
                    config: ml_collections.ConfigDict | None = None) -> str:
  """One line for an error raised while parsing ``--config`` flags. ``config``: the config the
  ``--config`` flag loaded, if it got that far (a bad ``--config.a.b`` override is then named with
  the valid keys); the config file is never loaded again here."""
  spec, paths = None, []
  for a in argv[1:]:
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a.startswith("--config."):
      paths.append(a[len("--config."):].split("=", 1)[0])
  path = (spec or "").partition(":")[0]
  if config is not None and paths:
    try:
      check_override_paths(config, paths)
    except ConfigError as e:
      return str(e)
  if isinstance(err, SyntaxError):
    return f"config file {path!r} does not parse: {err.msg} (line {err.lineno})"
  text = str(err)
  if path and ("No such file or directory" in text or "Failed loading config file" in text):
    return f"config file {path!r} not found"
  lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
  if not lines:
    return repr(err)
  if len(lines) > 1:  # a traceback inside the message: its last line is the error itself
    last = lines[-1]
    ours = re.match(r"^([\w.]+\.)?(VariantError|ConfigError): (.*)$", last)
    if ours:  # ours: already one line naming the choices
      return ours.group(3)
    return f"config file {path!r}: {last}" if path else last
  return lines[0]


def config_digest(config) -> str:
  """A short, stable digest of everything a config asks for (the sweep compares it with a finished
  run's ``summary.json`` to tell a done run from a stale one). Key order does not matter; tuples and
  lists are the same; a value's type matters only through its JSON form."""
  tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config

  def plain(x):
    if isinstance(x, dict):
      return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [plain(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
      return x.item()
    return x

  text = json.dumps(plain(tree), sort_keys=True, separators=(",", ":"), default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]
