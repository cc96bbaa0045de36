"""mtl_jax: multi-task learning research in JAX/Flax.

    import optax, mtl_jax
    tx = optax.chain(mtl_jax.combiners.nash_mtl(num_tasks=40), optax.adam(3e-4))

The public surface, each imported on first use (``import mtl_jax`` itself imports no JAX):

* :mod:`mtl_jax.combiners`: gradient combiners as optax transformations, and their registry;
* :mod:`mtl_jax.autodiff`: the engine (task losses -> Jacobian / Gramian / feature Gramian -> update);
* :mod:`mtl_jax.sharing`: sharing strategies over a backbone and task heads;
* :mod:`mtl_jax.models`: backbones and heads;
* :mod:`mtl_jax.layers`: the dense layer and convolution the engine can tap, mixed-precision casts;
* :mod:`mtl_jax.data`: the benchmarks;
* :mod:`mtl_jax.train`: the SPMD train step, evaluation and the fit loop;
* :mod:`mtl_jax.analysis`: Δm%, transfer, overfitting, conflict, affinity, tables and plots.
"""

import importlib

__version__ = "0.3.0"

__all__ = ["analysis", "autodiff", "combiners", "data", "layers", "models", "sharing", "train"]


def __getattr__(name):
  if name in __all__:
    module = importlib.import_module(f"{__name__}.{name}")
    globals()[name] = module
    return module
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}; public: {', '.join(__all__)}")


def __dir__():
  return sorted(list(globals()) + __all__)
