"""The table registry: which parameter table a config's tokenizer and transformer use.

A model family's table is one module (`official.py`, `seed.py`) with a function (config, part) -> list[Rule], and,
optionally, the config fields its shapes imply (for config inference and for naming a wrong field) and a test of
which part a bare file holds. It is registered with one line in `TABLES`, keyed by (part, arch); the arch is
`config.<part>.arch` ("maskgit" when the schema has no such field).
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

from conversion.rules import Rule
from conversion.tables import official, seed

PARTS = ("tokenizer", "transformer")
DEFAULT_ARCH = "maskgit"


class Table(NamedTuple):
  rules: Callable  # (config, part) -> list[Rule], any order (param_table sorts)
  fields: Callable[[Mapping], dict] | None = None  # flat flax tree -> the config fields its shapes imply
  holds: Callable[[set], bool] | None = None  # top-level names of a file's keys -> does it hold this part?


TABLES: dict[tuple[str, str], Table] = {
    ("tokenizer", "maskgit"): Table(official.rules, official.tokenizer_fields, official.holds_tokenizer),
    ("transformer", "maskgit"): Table(official.rules, official.transformer_fields, official.holds_transformer),
    # valeoai MaskGIT-pytorch v1: its transformer and the taming VQGAN (config inference: conversion.seed_config).
    ("transformer", "seed"): Table(seed.rules),
    ("tokenizer", "taming"): Table(seed.rules),
}


def check_part(part: str) -> None:
  if part not in PARTS:
    raise ValueError(f"part must be one of {PARTS}, got {part!r}")


def arch(config, part: str) -> str:
  check_part(part)
  return getattr(getattr(config, part), "arch", DEFAULT_ARCH)


def table(config, part: str) -> Table:
  key = (part, arch(config, part))
  if key not in TABLES:
    known = sorted(a for p, a in TABLES if p == part)
    raise ValueError(f"no conversion table for {part} arch {key[1]!r}; registered: {known}")
  return TABLES[key]


def param_table(config, part: str) -> list[Rule]:
  """Every parameter of `part` for this config, in flax's serialization order (dict keys sorted at every level,
  which the full path sort reproduces), so a tree built in this order writes the same bytes as flax."""
  return sorted(table(config, part).rules(config, part), key=lambda r: r.jax_path.split("/"))


def part_of(keys) -> str | None:
  """The part a bare file holds, from the top-level names of its keys (flax paths or torch keys), or None."""
  roots = {k.replace("params/", "", 1).split("/")[0].split(".")[0] for k in keys}
  if not roots:
    return None
  found = {part for (part, _), t in TABLES.items() if t.holds is not None and t.holds(roots)}
  return found.pop() if len(found) == 1 else None
