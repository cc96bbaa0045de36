"""The one place jaxopt is imported.

jaxopt (0.8.x) is no longer maintained and emits a ``DeprecationWarning`` ("JAXopt is no longer
maintained...") when imported. It still works with current JAX and is the solver library the design
names for Nash-MTL's bargaining problem, so it is imported here with exactly that warning silenced;
every other warning still shows. Import solvers from this module (``from mtl_jax._jaxopt import
LevenbergMarquardt``) so that swapping jaxopt out later is a one-file change.
"""

import warnings

with warnings.catch_warnings():
  warnings.filterwarnings(
      "ignore", message=r".*JAXopt is no longer maintained.*", category=DeprecationWarning)
  import jaxopt  # noqa: E402

LevenbergMarquardt = jaxopt.LevenbergMarquardt
LBFGS = jaxopt.LBFGS


__all__ = ["LevenbergMarquardt", "LBFGS", "jaxopt"]
