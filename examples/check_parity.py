"""Runs the parity checks of both backends against the official code's recorded outputs, on this machine.

  python examples/check_parity.py [--golden parity_tests/data] [--backend both] [--report runs/parity_report.json]

Each case directory under --golden holds official checkpoints and what the official code computed from them
(parity_tests/data/FORMAT.md); the runner checks tokenizer codes, reconstructions, logits, schedules and whole
decoding/editing trajectories against it. `python run.py parity` and `python -m parity_tests` do the same.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from a plain clone

from parity_tests.report import format_table  # pylint: disable=wrong-import-position
from parity_tests.runner import DEVICES, run_parity  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--golden", default=os.path.join(REPO, "parity_tests", "data"),
                      help="one case directory or a directory of cases")
  parser.add_argument("--backend", default="both", choices=("jax", "torch", "both"))
  parser.add_argument("--device", default="auto", choices=DEVICES)
  parser.add_argument("--report", default=os.path.join(REPO, "runs", "parity_report.json"))
  args = parser.parse_args(argv)

  # The runner sets parity precision itself (float32, highest matmul precision, TF32 off) and restores it.
  report = run_parity(args.golden, args.backend, args.report, device=args.device, precision="parity")
  print(format_table(report))
  print(f"JSON report: {os.path.abspath(args.report)}")
  return report


if __name__ == "__main__":
  sys.exit(0 if main()["passed"] else 1)
