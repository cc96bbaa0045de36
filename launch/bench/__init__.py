"""The benchmark harness of ``launch/benchmark.py`` (not part of the installed library).

``python launch/benchmark.py`` puts ``launch/`` first on ``sys.path``, so this package imports as
``bench`` there (and in its compile-worker subprocesses); tests put ``launch/`` on the path the
same way. Nothing here is imported by :mod:`mtl_jax`.

* :mod:`bench.steps`: the benchmark problem (the CelebA CNN with K binary heads on a random batch)
  and its steps -- the trainer's own step (:func:`mtl_jax.train.make_train_step`) and sharding
  (:func:`mtl_jax.train.shard_batch`), plus the references (a plain flax step, the Jacobian alone);
* :mod:`bench.timing`: compiling, timing, memory analysis;
* :mod:`bench.solves`: the weightings' solve times on random Gramians;
* :mod:`bench.malloc`: the compile workers' environment without the malloc tunables.
"""
