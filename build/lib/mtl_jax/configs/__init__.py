"""Experiment configs (ml_collections), importable as ``mtl_jax.configs``.

Each file has ``get_config(variant)``; ``launch/train.py --config=configs/X.py:variant`` loads one by
path. Benchmark defaults are in ``<benchmark>_base.py``, the schema and the variant helpers in
``common.py``.
"""
