"""The stored sampler-option cases (parity_tests/data_options, made by our JAX backend from a vendored official
case's weights and recorded draws): torch reproduces every one step for step and JAX still reproduces it. That each
option changes the decode is tested with inputs built for it in tests/test_sampler_options.py (on this case some
options move few tokens: a random-init transformer barely reads the class token, so CFG changes 1 token here)."""

import json
import os

import numpy as np
import pytest

from parity_tests import option_cases
from parity_tests.case import Case

PARITY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "parity_tests")
DATA = os.path.join(PARITY, "data_options")
with open(os.path.join(DATA, "cases.json")) as _f:
  INDEX = json.load(_f)
CASE = Case(os.path.join(PARITY, "data", INDEX["source_case"]))


def stored(option):
  with np.load(os.path.join(DATA, f"{option}.npz")) as f:
    return {k: f[k] for k in f}


def overrides(option):
  return {k: tuple(v) if isinstance(v, list) else v for k, v in INDEX["options"][option].items()}


def test_every_option_has_a_stored_case():
  assert sorted(INDEX["options"]) == sorted(option_cases.OPTIONS)
  for option in option_cases.OPTIONS:
    assert overrides(option) == option_cases.sampler_overrides(option, CASE.config), option


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("option", sorted(option_cases.OPTIONS))
def test_backend_reproduces_the_stored_trajectory(option, backend):
  decode = option_cases.torch_decode if backend == "torch" else option_cases.jax_decode
  ours, ref = decode(CASE, overrides(option)), stored(option)
  for field in option_cases.FIELDS:
    np.testing.assert_array_equal(np.asarray(ours[field]).astype(ref[field].dtype), ref[field],
                                  err_msg=f"{option}/{field}")

