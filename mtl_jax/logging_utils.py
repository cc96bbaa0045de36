"""Run outputs: JSONL metrics, TensorBoard event files (tensorboardX, no TensorFlow), a progress bar.

All writers are no-ops on processes other than 0, so the trainer can call them unconditionally.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import numpy as np


def _plain(x: Any) -> Any:
  """JSON-ready: numpy/jax scalars and arrays to Python numbers and lists; NaN/Inf as strings."""
  if isinstance(x, Mapping):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if hasattr(x, "shape") or isinstance(x, (np.generic,)):
    x = np.asarray(x)
    return _plain(x.tolist()) if x.ndim else _plain(x.item())
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)  # JSON has no NaN / Infinity
  return x


def flatten(metrics: Mapping[str, Any], names: Mapping[str, list] | None = None,
            prefix: str = "") -> dict[str, float]:
  """``{'loss': [..K..], 'lr': 0.1}`` -> ``{'loss/task_a': .., 'lr': 0.1}`` (scalars only).

  ``names`` maps a metric key to the labels of its vector entries (e.g. the task names); vectors
  without labels are indexed ``key/0``, ``key/1``, ...
  """
  out = {}
  for key, value in metrics.items():
    full = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, None, full + "/"))
      continue
    arr = np.asarray(value)
    if arr.ndim == 0:
      out[full] = float(arr)
    elif arr.ndim == 1:
      labels = (names or {}).get(key) or [str(i) for i in range(arr.shape[0])]
      for label, v in zip(labels, arr):
        out[f"{full}/{label}"] = float(v)
  return out


class JsonlWriter:
  """Appends one JSON object per line to ``path``."""

  def __init__(self, path: str, enabled: bool = True):
    self.path, self.enabled = path, enabled

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(_plain(record), sort_keys=True) + "\n")

  def truncate_after(self, step: int) -> None:
    """Drop records with ``step`` beyond ``step`` (a resumed run rewrites what it repeats)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    keep = []
    with open(self.path) as f:
      for line in f:
        try:
          if int(json.loads(line).get("step", 0)) <= step:
            keep.append(line)
        except (ValueError, AttributeError):
          continue  # a line cut short by a kill
    with open(self.path, "w") as f:
      f.writelines(keep)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class TensorBoard:
  """Scalars to TensorBoard event files with tensorboardX (no TensorFlow needed)."""

  def __init__(self, logdir: str, enabled: bool = True, purge_step: int | None = None):
    self.writer = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.writer = SummaryWriter(logdir=logdir, purge_step=purge_step)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """The finite ``values`` of ``step`` as one event (one Summary with a value per tag, as
    ``tf.summary.merge`` writes; an event per scalar costs the loop ~0.1 ms each)."""
    if self.writer is None:
      return
    from tensorboardX import summary as tbs  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto.summary_pb2 import Summary  # pylint: disable=g-import-not-at-top
    merged = [v for key, x in values.items() if math.isfinite(x)
              for v in tbs.scalar(key, x).value]
    if merged:
      self.writer.file_writer.add_summary(Summary(value=merged), global_step=step)

  def text(self, step: int, tag: str, value: str) -> None:
    if self.writer is not None:
      self.writer.add_text(tag, value, global_step=step)

  def flush(self) -> None:
    if self.writer is not None:
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


class ProgressBar:
  """A one-line progress bar on stderr with steps/s and ETA.

  Shown only when ``enabled`` is True, or, when it is None, when stderr is a terminal.
  """

  def __init__(self, total: int, start: int = 0, enabled: bool | None = None, stream=None,
               width: int = 30, min_interval: float = 0.2):
    self.stream = stream or sys.stderr
    if enabled is None:
      enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.enabled, self.total, self.start, self.width = enabled, total, start, width
    self.t0 = time.perf_counter()
    self.last = 0.0
    self.min_interval = min_interval

  @staticmethod
  def _fmt(seconds: float) -> str:
    if not math.isfinite(seconds):
      return "--:--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"

  def line(self, step: int) -> str:
    elapsed = time.perf_counter() - self.t0
    done = step - self.start
    rate = done / elapsed if elapsed > 0 and done > 0 else float("nan")
    eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
    frac = step / self.total if self.total else 1.0
    filled = int(round(self.width * frac))
    bar = "#" * filled + "-" * (self.width - filled)
    rate_s = f"{rate:.2f}" if rate == rate else "-"
    return (f"[{bar}] {step}/{self.total} {rate_s} steps/s "
            f"elapsed {self._fmt(elapsed)} ETA {self._fmt(eta)}")

  def update(self, step: int, force: bool = False) -> None:
    if not self.enabled:
      return
    now = time.perf_counter()
    if not force and now - self.last < self.min_interval and step < self.total:
      return
    self.last = now
    self.stream.write("\r" + self.line(step))
    self.stream.flush()

  def close(self) -> None:
    if self.enabled:
      self.stream.write("\n")
      self.stream.flush()
