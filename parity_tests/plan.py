"""What a golden case must yield: its fixture format and the checks that format declares, with their input files.

A case never loses a check silently. Its format (recognised from config.json and its files) declares every check
the case must yield and the files each one reads; the runner then reports every declared check:
  - an input file is missing          -> FAIL, naming the file;
  - no implementation for this format -> NOT YET (failed, `"not_yet": true` in the report), never skipped or passed;
  - otherwise                         -> the check's own verdict.
Implementations are registered by (format name, check kind) in `checks.CHECKS` and the backends' `CHECKS`.

Formats (their file lists are the fixture FORMAT.md files):
  official  google-research/maskgit fixtures (parity_tests/data/FORMAT.md): config.json with `vqvae`/`transformer`
  seed      valeoai MaskGIT-pytorch v1 fixtures (parity_tests/data/SEED_FORMAT.md): config.json with `maskgit`/`vqgan`

A new format is one more `CaseFormat` in FORMATS: how to recognise it and the checks it declares.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

PER_BACKEND = ("jax", "torch")


@dataclasses.dataclass(frozen=True)
class PlannedCheck:
  """One check a case must yield. `name` is the report name without the backend prefix (docs/ARCHITECTURE.md names:
  "tokenizer.codes", "sample.default.tokens", ...); `kind` selects the implementation ("sample.tokens")."""
  name: str
  kind: str
  inputs: tuple[str, ...]  # files it reads, relative to the case directory: missing -> FAIL naming them
  optional: tuple[str, ...] = ()  # read only to explain a failure (the detail says when one is missing)
  backends: tuple[str, ...] = PER_BACKEND  # the backends that run it
  prefixed: bool = True  # reported as "<backend>.<name>"; False: once, as "<name>" (conversion.roundtrip)
  args: tuple = ()  # passed to the implementation after (backend case, case), e.g. the sample variant

  def report_name(self, backend: str) -> str:
    return f"{backend}.{self.name}" if self.prefixed else self.name


@dataclasses.dataclass(frozen=True)
class CaseFormat:
  name: str
  reference: str  # where the format is described
  files: tuple[str, ...]  # the files every case of this format holds (FORMAT.md), config.json included
  recognise: Callable  # (config dict or None, case) -> bool
  checks: Callable  # (config dict or None, case) -> list[PlannedCheck]

  def describe(self) -> str:
    return f"{self.name} ({self.reference}): {', '.join(self.files)}"


# Official fixtures ------------------------------------------------------------------------------------------------
_TOK, _TR = "tokenizer.msgpack", "transformer.msgpack"


def _official_checks(config, case):
  decode = (config or {}).get("decode", {})
  checks = [
      PlannedCheck("tokenizer.codes", "tokenizer.codes", (_TOK, "tokenizer_io.npz")),
      PlannedCheck("tokenizer.decode", "tokenizer.decode", (_TOK, "tokenizer_io.npz")),
      PlannedCheck("transformer.logits", "transformer.logits", (_TR, "transformer_io.npz"),
                   optional=("transformer_intermediates.npz",)),
      PlannedCheck("schedule", "schedule", ("mask_schedule.npz", "decode.npz")),
      PlannedCheck("decode.tokens", "decode.tokens", (_TR, "decode.npz")),
  ]
  # Editing: the config's decode section names edit_start_iter for a case with an edit (FORMAT.md: every case).
  if "edit_start_iter" in decode or case.has("edit.npz"):
    checks.append(PlannedCheck("edit.tokens", "edit.tokens", (_TR, "edit.npz")))
  checks.append(PlannedCheck("conversion.roundtrip", "conversion.roundtrip", (_TOK, _TR), backends=("torch",),
                             prefixed=False))
  return checks


OFFICIAL = CaseFormat(
    name="official", reference="parity_tests/data/FORMAT.md",
    files=("config.json", _TOK, _TR, "tokenizer_io.npz", "transformer_io.npz", "transformer_intermediates.npz",
           "mask_schedule.npz", "decode.npz", "edit.npz"),
    recognise=lambda config, case: config is None or "vqvae" in config or "transformer" in config,
    checks=_official_checks)


# Seed fixtures (valeoai MaskGIT-pytorch v1) -----------------------------------------------------------------------
_PTH, _CKPT, _YAML = "MaskGIT/current.pth", "VQGAN/last.ckpt", "VQGAN/model.yaml"
_SAMPLE = re.compile(r"^sample_(\w+)\.npz$")


def _seed_variants(config, case):
  """Sample variants the case declares (config.json `sampler.variants`, its `files`) or holds (sample_*.npz)."""
  config = config or {}
  names = set(config.get("sampler", {}).get("variants", {}))
  names |= {m.group(1) for m in map(_SAMPLE.match, config.get("files", {})) if m}
  if os.path.isdir(case.path):
    names |= {m.group(1) for m in map(_SAMPLE.match, os.listdir(case.path)) if m}
  return sorted(names)


def _seed_checks(config, case):
  vqgan, tokens = (_CKPT, _YAML), (_PTH, _CKPT, _YAML)
  checks = [
      PlannedCheck("tokenizer.codes", "tokenizer.codes", vqgan + ("tokenizer_io.npz",)),
      PlannedCheck("tokenizer.decode", "tokenizer.decode", vqgan + ("tokenizer_io.npz",)),
      PlannedCheck("transformer.logits", "transformer.logits", (_PTH, "transformer_io.npz")),
  ]
  for variant in _seed_variants(config, case):
    file = f"sample_{variant}.npz"
    checks.append(PlannedCheck(f"sample.{variant}.tokens", "sample.tokens", tokens + (file,), args=(variant,)))
    checks.append(PlannedCheck(f"sample.{variant}.images", "sample.images", tokens + (file,), args=(variant,)))
  checks.append(PlannedCheck("train.step", "train.step", tokens + ("train_step.npz",)))
  checks.append(PlannedCheck("conversion.roundtrip", "conversion.roundtrip", tokens, backends=("torch",),
                             prefixed=False))
  return checks


SEED = CaseFormat(
    name="seed", reference="parity_tests/data/SEED_FORMAT.md",
    files=("config.json", _PTH, _CKPT, _YAML, "tokenizer_io.npz", "transformer_io.npz", "sample_<variant>.npz",
           "train_step.npz"),
    recognise=lambda config, case: ("maskgit" in config and "vqgan" in config) if config is not None
    else case.has(_PTH),
    checks=_seed_checks)

FORMATS = (SEED, OFFICIAL)  # the first that recognises a case; official is the fallback


def case_format(case) -> CaseFormat:
  config = case.official_or_none()
  return next((f for f in FORMATS if f.recognise(config, case)), OFFICIAL)


def planned_checks(case, backend: str) -> list[PlannedCheck]:
  """The checks `backend` must report for `case`, in report order."""
  fmt = case_format(case)
  return [c for c in fmt.checks(case.official_or_none(), case) if backend in c.backends]


def what_a_case_looks_like() -> str:
  """One line for error messages: the files of a case, per format."""
  return "; ".join(f.describe() for f in (OFFICIAL, SEED))
