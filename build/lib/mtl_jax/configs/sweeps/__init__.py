"""Sweep configs for ``launch/sweep.py``."""
