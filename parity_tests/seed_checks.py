"""The parity checks of one seed case (valeoai MaskGIT-pytorch v1 fixtures: parity_tests/data_seed/FORMAT.md),
written once for both backends, against the seed's own code.

A seed case is recognised from its files (`MaskGIT/current.pth`, `VQGAN/last.ckpt`, `VQGAN/model.yaml`). Its
checkpoints are read through `conversion.seed_formats` with the config the case's config.json gives in the seed's
own names (`maskgit`: MaskTransformer's arguments, `vqgan`: model.yaml's params), exactly as a user with those
files and settings would. Each check takes a backend adapter (`seed_torch.SeedTorchCase`, `seed_jax.SeedJaxCase`:
numpy in, numpy out, NCHW as the fixtures) and a `case.Case`, and returns one report entry (`case.result`):

- `<backend>.tokenizer.codes`: `encode_to_indices(images_01)` (the family-common interface) and the seed-style
  `encode(images)` both give `codes` exactly; encoder_output, quant_conv_output, quantized and emb_loss within the
  backend's decode bound (detail), and the codebook distances' error against the smallest argmin margin.
- `<backend>.tokenizer.decode`: `decode_code(codes)`, `decode_code(random_codes)` and `decode(quantized)` within
  1e-5 (torch) / 1e-4 (JAX) of the seed's, and the common `decode_from_indices` on the [0, 1] scale. torch runs on
  the CPU thread count the case records (its kernels round by thread count; see seed_torch._reference_threads).
- `<backend>.transformer.logits`: every input set of transformer_io.npz, all rows and positions, within
  1e-6 * max(1, max|logits|) (torch) / 1e-5 * max(1, max|logits|) (JAX) per set; the ids are built with the token
  layout (class token last, null class for dropped labels). The row-0 intermediates (forward hooks / flax
  capture_intermediates, by module name) are compared in forward order as diagnosis: the first one off is named.
- `conversion.roundtrip`: seed files -> torch state_dict (loaded strictly into maskgit_torch) -> JAX tree (the
  shapes of maskgit_jax's init) -> seed files written by `conversion.seed_formats` -> read back: every tensor,
  the AdamW state, iter/epoch and the yaml bit-identical.
Sampler trajectories (`sample_<variant>.npz`) and the training step (`train_step.npz`) come with the next issues:
`pending_checks` names them, for the runner to report as "not yet".
"""

import importlib
import os
import tempfile

import numpy as np

from parity_tests.case import compare_all, result

SEED_FILES = ("MaskGIT/current.pth", "VQGAN/last.ckpt", "VQGAN/model.yaml")
CHECKS = ("tokenizer.codes", "tokenizer.decode", "transformer.logits")
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

_CHECKPOINTS = {}  # _fingerprint(case) -> conversion.seed_formats.SeedCheckpoint
_OPENED = {}  # (backend, _fingerprint(case), device) -> adapter


def is_seed_case(case) -> bool:
  """A seed case holds the seed's checkpoint files (and its config.json the seed's `maskgit` / `vqgan` sections)."""
  return any(case.has(f) for f in SEED_FILES) or {"maskgit", "vqgan"} <= set(case.official)


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


def checkpoint(case):
  """The case's seed files, read and checked through conversion.seed_formats (once per process and content)."""
  key = _fingerprint(case)
  if key not in _CHECKPOINTS:
    from conversion import seed_formats  # pylint: disable=import-outside-toplevel
    _CHECKPOINTS[key] = seed_formats.read_seed(case.path, case_config(case))
  return _CHECKPOINTS[key]


def open_backend(name, case, device="cpu"):
  """The backend adapter ("torch" or "jax") for this case, opened once per process (models loaded on first use);
  its module is imported only now."""
  key = (name, _fingerprint(case), str(device))
  if key not in _OPENED:
    _OPENED[key] = importlib.import_module(ADAPTERS[name]).open_case(case, device)
  return _OPENED[key]


def pending_checks(case, backends):
  """Checks this seed case's files call for that are not implemented yet (sampler, training: the next issues)."""
  variants = sorted(f[len("sample_"):-len(".npz")] for f in os.listdir(case.path)
                    if f.startswith("sample_") and f.endswith(".npz"))
  names = []
  for b in backends:
    names += [f"{b}.sample.{v}.{what}" for v in variants for what in ("tokens", "images")]
    if case.has("train_step.npz"):
      names.append(f"{b}.train.step")
  return names


def _missing(case, *files):
  absent = [f for f in files if not case.has(f)]
  return result(False, None, None, f"missing input file(s) {absent}") if absent else None


def _nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


# Tokenizer ---------------------------------------------------------------------------------------------------------
def check_codes(b, case):
  missing = _missing(case, "tokenizer_io.npz")
  if missing:
    return missing
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
  missing = _missing(case, "tokenizer_io.npz")
  if missing:
    return missing
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
  missing = _missing(case, "transformer_io.npz")
  if missing:
    return missing
  from maskgit_common.token_layout import token_layout  # pylint: disable=import-outside-toplevel
  io = case.npz("transformer_io.npz")
  layout = token_layout(checkpoint(case).config)
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


def run_backend_checks(b, case, run_check):
  """Runs the seed checks of one backend adapter through `run_check(name, fn)` (which records exceptions)."""
  run_check(f"{b.name}.tokenizer.codes", lambda: check_codes(b, case))
  run_check(f"{b.name}.tokenizer.decode", lambda: check_decode(b, case))
  run_check(f"{b.name}.transformer.logits", lambda: check_logits(b, case))


# Conversion --------------------------------------------------------------------------------------------------------
def same_tree(a, b):
  """Bitwise equality of nested extras (arrays by dtype, shape and bytes; containers by keys and order)."""
  if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
  if isinstance(a, dict):
    return isinstance(b, dict) and list(a) == list(b) and all(same_tree(a[k], b[k]) for k in a)
  if isinstance(a, (list, tuple)):
    return type(a) is type(b) and len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
  return type(a) is type(b) and a == b


def check_roundtrip(case):
  """seed files -> torch (strict load) -> JAX tree -> seed files -> read again: everything bit-identical."""
  from conversion import seed_formats  # pylint: disable=import-outside-toplevel
  from conversion.tables import seed as seed_table  # pylint: disable=import-outside-toplevel
  from parity_tests import seed_torch  # pylint: disable=import-outside-toplevel
  original = checkpoint(case)
  config, notes, bad = original.config, [], []
  torch_state = seed_torch.strict_state_dicts(config, original.weights)  # via maskgit_torch, load_state_dict(strict)
  jax_trees = {w: {r.jax_path: seed_table.to_jax(r, torch_state[w][r.torch_key])
                   for r in seed_table.param_table(config, w)} for w in torch_state}
  jax_ok, jax_note = _check_jax_shapes(config, jax_trees)
  notes.append(jax_note)
  back = {w: {r.torch_key: seed_table.to_torch(r, tree[r.jax_path]) for r in seed_table.param_table(config, w)}
          for w, tree in jax_trees.items()}
  with tempfile.TemporaryDirectory() as tmp:
    seed_formats.write_seed(os.path.join(tmp, "seed"), config, back, original.extras)
    again = seed_formats.read_seed(os.path.join(tmp, "seed"), config)
  for which, state in original.weights.items():
    differ = [k for k in state if not same_tree(state[k], again.weights[which].get(k))]
    # Lightning's callback states are keyed by its ModelCheckpoint class, which cannot be pickled without
    # lightning: last.ckpt is written with `callbacks: {}` (the seed reads only `state_dict`). All else must match.
    kept = lambda extras: {k: v for k, v in extras.get(which, {}).items() if k != "callbacks"}
    extras_same = same_tree(kept(original.extras), kept(again.extras))
    bad += differ + ([] if extras_same else [f"{which} extras"])
    notes.append(f"{which}: {len(state)} tensors" + (f", {len(differ)} differ {differ[:3]}" if differ else
                                                     " bit-identical") + ("" if extras_same else ", extras differ"))
  passed = jax_ok and not bad
  return result(passed, 0.0 if passed else None, 0, "; ".join(notes))


def _check_jax_shapes(config, jax_trees):
  """The converted trees against maskgit_jax's own parameter shapes (jax.eval_shape: nothing allocated)."""
  try:
    from parity_tests import seed_jax  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # a torch-only install: the table alone defines the tree
    return True, f"JAX trees not compared with maskgit_jax ({e})"
  differ = {w: sorted(set(seed_jax.param_shapes(config, w).items())
                      ^ {(k, tuple(np.shape(v))) for k, v in tree.items()}) for w, tree in jax_trees.items()}
  if any(differ.values()):
    return False, f"JAX trees differ from maskgit_jax's parameters: {differ}"
  return True, "JAX trees: " + ", ".join(f"{w} {len(t)} leaves" for w, t in jax_trees.items()) + " = maskgit_jax's"
