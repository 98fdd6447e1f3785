"""`python -m parity_tests --golden DIR --backend jax|torch|both --report FILE.json` (see runner.py)."""

import sys

from parity_tests.runner import main

if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
