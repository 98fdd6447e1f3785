"""The parity report: package versions, the JSON file (docs/ARCHITECTURE.md, 'Parity runner and report') and the
table printed to stdout."""

import importlib.metadata
import json
import os
import platform
import sys

from maskgit_common import fileio

# Read from the installed distributions, so recording a version never imports jax or torch.
_PACKAGES = ("numpy", "jax", "jaxlib", "flax", "torch", "msgpack", "safetensors", "maskgit")


def versions():
  found = {"python": platform.python_version()}
  for name in _PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  found["platform"] = f"{platform.system()} {platform.machine()}"
  return found


def write_report(report, path):
  """Writes the JSON atomically (maskgit_common.fileio)."""
  fileio.atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")


def _num(value):
  return "-" if value is None else f"{value:.3g}"


def format_table(report):
  """Case, check, pass, max diff, tolerance; then the detail of every failed check."""
  status = lambda r: ("PASS" if r["passed"] else "NOT YET" if r.get("not_yet") else
                      "FAIL (host)" if r.get("host_limited") else "FAIL")
  rows = [(case, check, status(r), _num(r["max_abs_diff"]), _num(r["tolerance"]))
          for case, checks in report["cases"].items() for check, r in checks.items()]
  header = ("case", "check", "pass", "max diff", "tolerance")
  widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
  line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
  out = [f"device: {report['device']}   precision: {report['precision']}",
         line(header), line("-" * w for w in widths)]
  out += [line(row) for row in rows]
  failed = [(case, check, r) for case, checks in report["cases"].items()
            for check, r in checks.items() if not r["passed"]]
  if failed:
    out.append("")
    out += [f"{status(r)} {case} {check}: {r['detail']}" for case, check, r in failed]
  total = sum(len(checks) for checks in report["cases"].values())
  out.append("")
  out.append(f"{'PASSED' if report['passed'] else 'FAILED'}: {total - len(failed)}/{total} checks passed")
  not_yet = sum(bool(r.get("not_yet")) for _, _, r in failed)
  if not_yet:
    out.append(f"{not_yet} declared check(s) NOT YET implemented for their case format: reported, counted as not "
               f"passed")
  host = sum(bool(r.get("host_limited")) for checks in report["cases"].values() for r in checks.values())
  if host:
    out.append(f"{host} failed check(s) marked FAIL (host): our output equals the official code's bit for bit on "
               f"this host, and the official code itself misses the fixture's bound here (see the detail)")
  return "\n".join(out)


def print_progress(case, check, r):
  status = "PASS" if r["passed"] else "NOT YET" if r.get("not_yet") else "FAIL"
  print(f"[parity] {case} {check}: {status} (max diff {_num(r['max_abs_diff'])})", file=sys.stderr, flush=True)
