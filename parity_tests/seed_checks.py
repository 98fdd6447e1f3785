"""The parity checks of one seed case (valeoai MaskGIT-pytorch v1 fixtures: parity_tests/data/SEED_FORMAT.md),
written once for both backends, against the seed's own code.

A seed case (parity_tests/plan.py: config.json with the seed's `maskgit` / `vqgan` sections, MaskGIT/current.pth,
VQGAN/last.ckpt + model.yaml) is loaded as a user would load those files: `conversion.read(case, config)` through
the backend's `checkpoint.load_checkpoint`, with the config config.json gives in the seed's own names (`maskgit`:
MaskTransformer's arguments, `vqgan`: model.yaml's params; the head count is in no file). Each check takes a
backend adapter (`seed_torch.SeedTorchCase`, `seed_jax.SeedJaxCase`: numpy in, numpy out, NCHW as the fixtures)
and a `case.Case`, and returns one report entry (`case.result`); `CHECKS` registers them for the runner:

- `<backend>.tokenizer.codes`: `encode_to_indices(images_01)` (the family-common interface) and the seed-style
  `encode(images)` both give `codes` exactly; encoder_output, quant_conv_output, quantized and emb_loss within the
  backend's decode bound (detail), and the codebook distances' error against the smallest argmin margin.
- `<backend>.tokenizer.decode`: `decode_code(codes)`, `decode_code(random_codes)` and `decode(quantized)` within
  1e-5 (torch) / 1e-4 (JAX) of the seed's, and the common `decode_from_indices` on the [0, 1] scale. torch runs on
  the CPU thread count the case records (its kernels round by thread count; see seed_torch.reference_threads).
- `<backend>.transformer.logits`: every input set of transformer_io.npz, all rows and positions, within
  1e-6 * max(1, max|logits|) (torch) / 1e-5 * max(1, max|logits|) (JAX) per set; the ids are built with the token
  layout (class token last, null class for dropped labels). The row-0 intermediates (forward hooks / flax
  capture_intermediates, by module name) are compared in forward order as diagnosis: the first one off is named.
- `<backend>.sample.<variant>.tokens` / `.images`: parity_tests/seed_sample_checks.py, with the case's seed
  transformer and VQGAN.
- `conversion.roundtrip`: seed files -> our torch directory (loaded strictly into maskgit_torch) -> our JAX
  directory (its trees = maskgit_jax's parameters) -> seed files, every step `conversion.convert` as `run.py
  convert` does it; the final files read back bit-identical to the case's: every tensor, the AdamW state, iter,
  epoch, the lightning entries and the model.yaml text.
- `<backend>.train.step` (train_step.npz): not implemented here yet, so the runner reports it NOT YET; it is one
  entry of `CHECKS`.
"""

import importlib
import os
import tempfile

import numpy as np

from parity_tests import seed_sample_checks
from parity_tests.case import compare_all, result

SEED_FILES = ("MaskGIT/current.pth", "VQGAN/last.ckpt", "VQGAN/model.yaml")
ADAPTERS = {"torch": "parity_tests.seed_torch", "jax": "parity_tests.seed_jax"}

# Row-0 intermediates of transformer_io.npz in forward order: (fixture key, torch module, flax module path).
# "input" marks a module's input (a forward pre-hook; flax captures outputs only, so JAX skips those).
INTERMEDIATES = (
    ("l0_row0_tok_emb", "tok_emb", "tok_emb"),
    ("l0_row0_tok_plus_pos_emb", "first_layer:input", None),
    ("l0_row0_first_layer_out", "first_layer", "first_layer"),
    ("l0_row0_block0_attn_prenorm", "transformer.layers.0.0.norm", "transformer/layers_0/attention/norm"),
    ("l0_row0_block0_attn_out", "transformer.layers.0.0", "transformer/layers_0/attention"),
    ("l0_row0_block0_attn_weights_headavg", "transformer.layers.0.0.fn.mha:weights", None),
    ("l0_row0_block0_after_attn_residual", "transformer.layers.0.1:input", None),
    ("l0_row0_block0_ff_prenorm", "transformer.layers.0.1.norm", "transformer/layers_0/feed_forward/norm"),
    ("l0_row0_block0_ff_out", "transformer.layers.0.1", "transformer/layers_0/feed_forward"),
    ("l0_row0_block0_out", "transformer.layers.0", "transformer/layers_0"),
    ("l0_row0_transformer_out", "transformer", "transformer"),
    ("l0_row0_last_layer_out", "last_layer", "last_layer"),
    ("l0_row0_logits", "", "output"),
)

_OPENED = {}  # (backend, _fingerprint(case), device) -> adapter


def case_config(case):
  """The MaskGITConfig of a seed case, from config.json's `vqgan` (model.yaml) and `maskgit` (MaskTransformer)."""
  from conversion import seed_config  # pylint: disable=import-outside-toplevel
  vqgan = {k: v for k, v in case.official["vqgan"].items() if k not in ("base_learning_rate", "target")}
  maskgit = {k: v for k, v in case.official["maskgit"].items() if k != "mask_value"}
  config = seed_config.config_from_seed(vqgan, maskgit, name=case.name, source=case.file("config.json"))
  mask_value = case.official["maskgit"].get("mask_value", config.mask_token_id)
  if mask_value != config.mask_token_id:
    raise ValueError(f"{case.file('config.json')}: mask_value {mask_value} is not the seed layout's mask id "
                     f"K={config.mask_token_id}")
  return config


def _fingerprint(case):
  """The case's path and its files' sizes and times: a cache entry never outlives a change of the files."""
  stats = [os.stat(case.file(f)) for f in SEED_FILES + ("config.json",) if case.has(f)]
  return case.path, tuple((st.st_size, st.st_mtime_ns) for st in stats)


def open_backend(name, case, device="cpu"):
  """The backend adapter ("torch" or "jax") for this case, opened once per process and device (models loaded on
  first use; the runner and the tests share it, so JAX compiles once); its module is imported only now."""
  module = importlib.import_module(ADAPTERS[name])
  device = module.resolve_device(device)  # "cpu" and the runner's device object are one adapter
  key = (name, _fingerprint(case), str(device))
  if key not in _OPENED:
    _OPENED[key] = module.open_case(case, device)
  return _OPENED[key]


def _nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


# Tokenizer ---------------------------------------------------------------------------------------------------------
def check_codes(b, case):
  io = case.npz("tokenizer_io.npz")
  common = b.encode_to_indices(_nhwc(io["images_01"]))
  ours = b.encode(io["images"])
  codes_ok, codes_diff, codes_note = compare_all(
      [("codes (encode_to_indices)", common, io["codes"]), ("codes (encode)", ours["codes"], io["codes"])], 0)
  latents_ok, _, latents_note = compare_all(
      [(k, ours[k], io[k]) for k in ("encoder_output", "quant_conv_output", "quantized", "emb_loss")],
      b.decode_tolerance)
  distance_error = float(np.max(np.abs(ours["distances"].astype(np.float64) - io["distances"])))
  margin = case.official.get("checks", {}).get("tokenizer_min_argmin_margin")
  detail = (f"{codes_note}; {latents_note} (bound {b.decode_tolerance:g}); codebook distances max diff "
            f"{distance_error:.3g}" + (f" vs the smallest argmin margin {margin:.3g}" if margin else ""))
  return result(codes_ok and latents_ok, codes_diff, 0, detail)


def check_decode(b, case):
  io = case.npz("tokenizer_io.npz")
  named = [("reconstruction", b.decode_code(io["codes"]), io["reconstruction"]),
           ("random_codes_decoded", b.decode_code(io["random_codes"]), io["random_codes_decoded"]),
           ("decode_of_quantized", b.decode(io["quantized"]), io["decode_of_quantized"]),
           # The family-common interface: NHWC on the [0, 1] scale, i.e. (x + 1) / 2 of the seed's output.
           ("decode_from_indices", b.decode_from_indices(io["codes"]), _nhwc((io["reconstruction"] + 1) / 2))]
  passed, diff, detail = compare_all(named, b.decode_tolerance)
  return result(passed, diff, b.decode_tolerance, detail)


# Transformer -------------------------------------------------------------------------------------------------------
def input_ids(layout, io, name):
  """The (B, S) transformer input of one input set: codes then the class token, the null class where dropped."""
  class_tokens = np.where(io[f"{name}_drop"], layout.null_class_id, layout.class_tokens(io[f"{name}_labels"]))
  return layout.sequence(io[f"{name}_codes"], class_tokens)


def check_logits(b, case):
  from maskgit_common.token_layout import token_layout  # pylint: disable=import-outside-toplevel
  io = case.npz("transformer_io.npz")
  layout = token_layout(case_config(case))
  passed, worst, notes, bound = True, 0.0, [], 0.0
  for name in [str(n) for n in io["input_sets"]]:
    ref = io[f"{name}_logits"]
    tolerance = b.logits_rel_tolerance * max(1.0, float(np.max(np.abs(ref))))
    ok, diff, note = compare_all([(name, b.logits(input_ids(layout, io, name)), ref)], tolerance)
    passed, worst, bound = passed and ok, max(worst, diff), max(bound, tolerance)
    notes.append(f"{note} (bound {tolerance:.3g})")
  detail = "; ".join(notes) + "; " + _row0_diagnosis(b, io)
  return result(passed, worst, bound, detail)


def _row0_diagnosis(b, io):
  """Compares the row-0 intermediates in forward order; names the first one off (relative bound as the logits)."""
  if "l0_row0_input_ids" not in io:
    return "no row-0 intermediates in the case"
  try:
    ours = b.intermediates(io["l0_row0_input_ids"])
  except Exception as e:  # pylint: disable=broad-except
    return f"row-0 intermediates unavailable ({type(e).__name__}: {e})"
  compared = 0
  for key, _, _ in INTERMEDIATES:
    if key not in ours or key not in io:
      continue
    compared += 1
    ref = io[key]
    ok, _, note = compare_all([(key, ours[key], ref)], b.logits_rel_tolerance * max(1.0, float(np.max(np.abs(ref)))))
    if not ok:
      return f"first diverging row-0 intermediate: {note}"
  return f"row-0 intermediates: all {compared} compared within the bound"


# Conversion --------------------------------------------------------------------------------------------------------
def same_tree(a, b):
  """Bitwise equality of nested extras (arrays by dtype, shape and bytes; containers by keys and order)."""
  if isinstance(a, (np.ndarray, np.generic)) or isinstance(b, (np.ndarray, np.generic)):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
  if isinstance(a, dict):
    return isinstance(b, dict) and list(a) == list(b) and all(same_tree(a[k], b[k]) for k in a)
  if isinstance(a, (list, tuple)):
    return type(a) is type(b) and len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
  return type(a) is type(b) and a == b


def _comparable_extras(extras):
  """Lightning's callback states are keyed by its ModelCheckpoint class, which cannot be pickled without lightning:
  last.ckpt is written with `callbacks: {}` (the seed reads only `state_dict`). Every other extra must match."""
  return {part: {k: v for k, v in values.items() if k != "callbacks"} for part, values in extras.items()}


def check_roundtrip(case):
  """seed files -> torch directory -> JAX directory -> seed files, each step `conversion.convert` (module doc)."""
  import conversion  # pylint: disable=import-outside-toplevel
  from conversion import seed_formats  # pylint: disable=import-outside-toplevel
  config, notes = case_config(case), []
  with tempfile.TemporaryDirectory() as tmp:
    steps = [(case.path, "torch"), (os.path.join(tmp, "torch"), "jax"), (os.path.join(tmp, "jax"), "seed")]
    for src, to in steps:  # the config travels in the torch and JAX directories' config.json
      conversion.convert(src, os.path.join(tmp, to), to=to, config=config if src == case.path else None)
    notes.append(_strict_torch_load(os.path.join(tmp, "torch")))
    jax_ok, jax_note = _jax_trees_are_maskgit_jax(os.path.join(tmp, "jax"))
    notes.append(jax_note)
    original = seed_formats.read_seed(case.path, config)
    again = seed_formats.read_seed(os.path.join(tmp, "seed"), config)
    yaml_same = _text(original.files.vqgan_yaml) == _text(again.files.vqgan_yaml)
  bad = [] if yaml_same else ["model.yaml text"]
  for which, state in original.weights.items():
    differ = [k for k in state if not same_tree(state[k], again.weights[which].get(k))]
    differ += [k for k in again.weights[which] if k not in state]
    extras_same = same_tree(_comparable_extras(original.extras).get(which),
                            _comparable_extras(again.extras).get(which))
    bad += differ + ([] if extras_same else [f"{which} extras"])
    notes.append(f"{which}: {len(state)} tensors" + (f", {len(differ)} differ {differ[:3]}" if differ else
                                                     " bit-identical") + (", extras identical" if extras_same else
                                                                          ", extras differ"))
  notes.append("model.yaml text identical" if yaml_same else "model.yaml text differs")
  passed = jax_ok and not bad
  return result(passed, 0.0 if passed else None, 0, "seed -> torch -> jax -> seed (conversion.convert): "
                + "; ".join(notes))


def _text(path):
  with open(path) as f:
    return f.read()


def _strict_torch_load(torch_dir):
  """The torch directory loads into maskgit_torch's seed modules with load_state_dict(strict=True)."""
  try:
    from maskgit_torch import checkpoint  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # a JAX-only install: the conversion itself needs no torch for this step
    return f"torch directory not loaded into maskgit_torch ({e})"
  _, modules = checkpoint.load_checkpoint(torch_dir)
  return "torch directory loads strictly into " + ", ".join(type(m).__name__ for m in modules.values())


def _jax_trees_are_maskgit_jax(jax_dir):
  """The JAX directory's trees have exactly maskgit_jax's parameters (jax.eval_shape: nothing allocated)."""
  import conversion  # pylint: disable=import-outside-toplevel
  try:
    from maskgit_jax import checkpoint  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # a torch-only install: the table alone defines the tree
    return True, f"JAX trees not compared with maskgit_jax ({e})"
  ck = conversion.read(jax_dir)
  differ = {}
  for part, flat in ck.parts.items():
    expected = {k: tuple(v.shape) for k, v in conversion.flatten(checkpoint.expected_shapes(ck.config, part)).items()}
    got = {k: tuple(np.shape(v)) for k, v in flat.items()}
    if got != expected:
      differ[part] = sorted(set(got.items()) ^ set(expected.items()))[:4]
  if differ:
    return False, f"JAX trees differ from maskgit_jax's parameters: {differ}"
  return True, "JAX trees: " + ", ".join(f"{p} {len(t)} leaves" for p, t in ck.parts.items()) + " = maskgit_jax's"


# The implemented checks of the seed format, by check kind (parity_tests/plan.py declares them, the runner looks
# them up here); "train.step" is parity_tests/seed_train_checks.py, registered in checks.CHECKS.
CHECKS = {
    ("seed", "tokenizer.codes"): check_codes,
    ("seed", "tokenizer.decode"): check_decode,
    ("seed", "transformer.logits"): check_logits,
    ("seed", "sample.tokens"): lambda b, case, variant: seed_sample_checks.check_sample_tokens(b, case, variant),
    ("seed", "sample.images"): lambda b, case, variant: seed_sample_checks.check_sample_images(b, case, variant),
    ("seed", "conversion.roundtrip"): lambda b, case: check_roundtrip(case),
}
