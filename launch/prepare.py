r"""Prepares a dataset from its official files (no TensorFlow, no download).

    python launch/prepare.py celeba --source=~/Downloads/celeba [--data_dir=~/tensorflow_datasets]
    python launch/prepare.py mnist --source=DIR          # then data.name=multimnist reads it
    python launch/prepare.py conll2003 --source=DIR
    python launch/prepare.py glue --source=DIR
    python launch/prepare.py nyuv2 --source=nyuv2.zip    # or cityscapes; a zip or its folder
    python launch/prepare.py convert --source=~/tensorflow_datasets/celeb_a/2.1.0   # tfrecord

What each needs in ``--source`` is listed in :mod:`mtl_jax.data.prepare`. ``--data_dir``: the tfds
data folder (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``; give the training run the same
as ``--config.data.data_dir``), or for nyuv2 / cityscapes the dataset root. A bad name or a missing
file is one line on stderr and exit status 2.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from mtl_jax.data import prepare

_SOURCE = flags.DEFINE_string("source", None, "folder (or zip) with the official files")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "where to write (default: see the module doc)")


def main(argv):
  logging.set_verbosity(logging.WARNING)  # tfds's INFO lines ("Load dataset info ...") are noise
  if len(argv) != 2:
    sys.stderr.write(f"error: name one dataset: {', '.join(prepare.NAMES)}\n")
    sys.exit(2)
  if not _SOURCE.value:
    sys.stderr.write("error: --source is required (the folder with the official files)\n")
    sys.exit(2)
  try:
    written = prepare.prepare(argv[1], os.path.expanduser(_SOURCE.value),
                              os.path.expanduser(_DATA_DIR.value))
  except (OSError, ValueError, KeyError) as e:
    sys.stderr.write(f"error: {str(e).splitlines()[0] if str(e) else repr(e)}\n")
    sys.exit(2)
  for path in written:
    print(f"prepared {path}")


if __name__ == "__main__":
  app.run(main)
