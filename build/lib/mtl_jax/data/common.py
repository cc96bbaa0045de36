"""Helpers shared by the benchmark modules: config access, task selection, the benchmark's
backbone, fixed-seed splits, image resizing (PIL) and the worker count of the input pipeline."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from PIL import Image


def config_get(config, path: str, default):
  """``config.a.b`` or ``default`` when the field is absent (or None)."""
  node = config
  for key in path.split("."):
    node = node.get(key, None) if hasattr(node, "get") else getattr(node, key, None)
    if node is None:
      return default
  return node


def select(names, valid, what: str) -> tuple[str, ...]:
  """``names`` ('all', a comma string or a sequence) checked against ``valid``, in given order."""
  if names in ("all", "", None):
    return tuple(valid)
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  names = tuple(names)
  bad = [n for n in names if n not in valid]
  if bad:
    raise ValueError(f"unknown {what} {bad}; valid: {', '.join(valid)}")
  if len(set(names)) != len(names):
    raise ValueError(f"duplicate {what} in {list(names)}")
  return names


# Backbones whose ``width`` option is a multiplier: ``config.model.width`` (an int, the schema's
# type) is their first layer's channels (the transformer's model width), divided by the paper's
# value at ``width=1`` to give the multiplier.
WIDTH_UNIT = {"celeba_cnn": 64, "lenet": 10, "segnet": 64, "resnet18": 64, "dilated_resnet": 64,
              "transformer": 256, "mpnn": 64}


def backbone(config, default: str, **defaults):
  """The benchmark's backbone: ``config.model.backbone`` or ``default``, ``config.model.width``
  (see ``WIDTH_UNIT``); ``defaults`` (input size, vocabulary, ...) apply to ``default`` only.
  Configs leave ``model.backbone`` empty so that this backbone, with those options, is used."""
  from mtl_jax import models  # pylint: disable=g-import-not-at-top

  name = config_get(config, "model.backbone", "") or default
  opts = dict(defaults) if name == default else {}  # the defaults fit the default backbone only
  width = config_get(config, "model.width", 0)
  if width:
    if name not in WIDTH_UNIT and isinstance(models.options(name).get("width"), float):
      raise ValueError(f"backbone {name!r} takes a width multiplier with no channel unit in "
                       f"WIDTH_UNIT; valid backbones for config.model.width: "
                       f"{', '.join(sorted(WIDTH_UNIT))} and those with an integer width")
    opts["width"] = width / WIDTH_UNIT[name] if name in WIDTH_UNIT else int(width)
  return models.get(name, **opts)


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
  """A fixed-seed partition of ``range(n)`` into consecutive chunks of the given fractions."""
  perm = np.random.default_rng(seed).permutation(n)
  cuts = np.cumsum([int(round(f * n)) for f in fractions[:-1]])
  return [np.sort(p) for p in np.split(perm, cuts)]


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output pixel for nearest-neighbour resizing (PIL's convention)."""
  return np.minimum(np.floor((np.arange(out_size) + 0.5) * in_size / out_size),
                    in_size - 1).astype(int)


def stack(examples: Sequence[Any]) -> Any:
  """Stacks a list of (nested dict) examples into arrays with a leading axis."""
  first = examples[0]
  if isinstance(first, dict):
    return {k: stack([e[k] for e in examples]) for k in first}
  return np.stack([np.asarray(e) for e in examples])


def resize_bilinear(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """``[B, H, W]`` or ``[B, H, W, C]`` images resized to ``size`` (height, width) with PIL's
  BILINEAR filter (antialiased when downscaling: what torchvision's ``Resize`` does on PIL
  images). uint8 images stay uint8 (PIL resizes them as 8-bit images, as torchvision does);
  float images are resized channel by channel as 32-bit float images."""
  h, w = size
  if images.shape[1:3] == (h, w):
    return images
  if images.dtype == np.uint8:
    return np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR))
                     for im in images])
  ims = images.astype(np.float32)
  squeeze = ims.ndim == 3
  ims = ims[..., None] if squeeze else ims
  out = np.stack([np.stack([np.asarray(Image.fromarray(im[..., c]).resize((w, h), Image.BILINEAR))
                            for c in range(ims.shape[-1])], -1) for im in ims])
  return out[..., 0] if squeeze else out


def default_workers() -> int:
  """Input worker processes when ``config.data.workers`` is -1: one per CPU core the process may
  use, less one for the training loop, at most 16 (and 0 on a single core)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(0, min(16, (cores or 1) - 1))


def workers(config, file_backed: bool) -> int:
  """``config.data.workers`` (-1 = :func:`default_workers` for a benchmark that decodes files,
  0 for one already in memory, where worker processes would only copy the arrays)."""
  n = int(config_get(config, "data.workers", -1))
  if n < -1:
    raise ValueError(f"config.data.workers must be -1 (automatic), 0 (in-process) or a worker "
                     f"count, not {n}")
  if n == -1:
    return default_workers() if file_backed else 0
  return n
