"""`python -m parity_tests`: runs every parity check (parity_tests/checks.py) over a directory of golden cases.

  python -m parity_tests --golden DIR --backend jax|torch|both --report FILE.json [--device auto] [--precision parity]

DIR is one case directory (it holds config.json) or a directory of them (searched one level deep), in the fixture
format of parity_tests/data/FORMAT.md (or the seed fixtures' FORMAT.md). Each case yields every check its
format declares (parity_tests/plan.py): a missing input file fails the checks that read it, naming the file, and a
declared check this version does not implement is reported as NOT YET (failed). The report is the JSON of
docs/ARCHITECTURE.md ('Parity runner and report'); a table goes to stdout. Exit status 0 iff every check passed, 1
if any failed, 2 for a usage error (e.g. a missing DIR, or one that holds no case).

jax and torch are imported only for their own checks, so `--backend torch` runs without jax installed. A check
that raises is recorded as failed with the exception, and the run goes on.
"""

import argparse
import importlib
import sys
import traceback

from parity_tests import checks, plan
from parity_tests.case import Case, GoldenDirError, find_cases, result
from parity_tests.report import format_table, print_progress, versions, write_report

BACKENDS = ("jax", "torch", "both")
DEVICES = ("auto", "cpu", "gpu", "cuda", "tpu")
PRECISIONS = ("parity",)  # the tolerances (docs/ARCHITECTURE.md, 'Parity targets') hold for float32 parity only


def _failure(e):
  """A raised check as a failed entry: exception type and message, and where it was raised."""
  frames = traceback.extract_tb(e.__traceback__)
  where = f" [at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}]" if frames else ""
  return result(False, None, None, f"{type(e).__name__}: {e}{where}")


def check_names(backend, case):
  """The checks a backend reports on a case, as the case's format declares them (docs/ARCHITECTURE.md, 'Parity
  runner and report')."""
  return [c.report_name(backend) for c in plan.planned_checks(case, backend)]


def evaluate(planned, b, case, implementations):
  """One declared check: FAIL naming its missing input files, NOT YET without an implementation, else its verdict."""
  missing = case.missing(planned.inputs)
  if missing:
    return result(False, None, None, f"missing input file{'s' * (len(missing) > 1)} {', '.join(missing)} in "
                                     f"{case.path}: the case's format declares this check, which reads "
                                     f"{', '.join(planned.inputs)}")
  fmt = plan.case_format(case)
  fn = implementations.get((fmt.name, planned.kind))
  if fn is None:
    entry = result(False, None, None, f"not yet implemented: {fmt.name} cases declare a {planned.kind} check "
                                      f"({fmt.reference}), which this version does not have")
    entry["not_yet"] = True
    return entry
  return fn(b, case, *planned.args)


def _run_backend(backend, cases, results, device, precision, verbose):
  """Runs one backend's declared checks on every case into `results`; returns its device description."""

  def record(case, name, fn):
    try:
      entry = fn()
    except Exception as e:  # pylint: disable=broad-except
      entry = _failure(e)
    results[case.name][name] = entry
    if verbose:
      print_progress(case.name, name, entry)

  try:
    module = importlib.import_module(f"parity_tests.checks_{backend}")
    session = module.Session(device, precision)
  except Exception as e:  # pylint: disable=broad-except
    # Not installed, or the device is not there: every check of this backend fails, saying why.
    for case in cases:
      for name in check_names(backend, case):
        record(case, name, lambda e=e: _raise(e))
    return f"unavailable ({type(e).__name__}: {e})"
  implementations = {**checks.CHECKS, **getattr(module, "CHECKS", {})}
  with session:
    for case in cases:
      try:
        b = session.open(case)
      except Exception as e:  # pylint: disable=broad-except
        b = e  # every check of this case fails with it, and the run goes on
      for planned in plan.planned_checks(case, backend):
        record(case, planned.report_name(backend),
               lambda planned=planned, b=b, case=case: _raise(b) if isinstance(b, Exception)
               else evaluate(planned, b, case, implementations))
  return session.description


def _raise(e):
  raise e


def run_parity(golden, backend, report_path=None, device="auto", precision="parity", verbose=False):
  """Runs the parity checks of `backend` ("jax", "torch" or "both") on every case in `golden`.

  Returns the report dict (docs/ARCHITECTURE.md, 'Parity runner and report') and writes it as JSON to
  `report_path` if given. Raises GoldenDirError (a ValueError) if `golden` is missing or holds no case, ValueError
  for an unknown backend/device/precision.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
  if device not in DEVICES:
    raise ValueError(f"device must be one of {list(DEVICES)}, got {device!r}")
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
  cases = [Case(path) for path in find_cases(golden)]
  results = {case.name: {} for case in cases}
  devices = {}
  for name in (("jax", "torch") if backend == "both" else (backend,)):
    devices[name] = _run_backend(name, cases, results, device, precision, verbose)
  report = {
      "device": "; ".join(f"{name}: {d}" for name, d in devices.items()),
      "devices": devices,
      "device_requested": device,
      "precision": precision,
      "backend": backend,
      "golden": golden,
      "versions": versions(),
      "passed": bool(results) and all(r["passed"] for checks_ in results.values() for r in checks_.values()),
      "cases": results,
  }
  if report_path:
    write_report(report, report_path)
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m parity_tests",
      description="MaskGIT parity checks against golden fixtures of the official code "
                  "(docs/ARCHITECTURE.md, 'Parity targets' and 'Parity runner and report').")
  parser.add_argument("--golden", required=True, help="a case directory, or a directory of case directories")
  parser.add_argument("--backend", required=True, choices=BACKENDS)
  parser.add_argument("--report", default=None, help="write the JSON report here")
  parser.add_argument("--device", default="auto", choices=DEVICES,
                      help="auto: torch on cuda if available, jax on its default backend")
  parser.add_argument("--precision", default="parity", choices=PRECISIONS)
  args = parser.parse_args(argv)
  try:
    report = run_parity(args.golden, args.backend, args.report, args.device, args.precision, verbose=True)
  except GoldenDirError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_table(report))
  if args.report:
    print(f"report: {args.report}")
  return 0 if report["passed"] else 1
