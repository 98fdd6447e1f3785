"""Test-wide settings: parity precision (DESIGN §2) before any test touches jax or torch."""

import os

os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
