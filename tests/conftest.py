import os

# Tests run on the CPU; several tests force host devices themselves in a subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
