"""Checkpoint conversion: official/JAX flax msgpack <-> torch safetensors, driven by `conversion/table.py`.

Sources `convert` reads (and refuses when ambiguous):
  - an official msgpack pair: a directory with tokenizer.msgpack + transformer.msgpack, or the released names
    tokenizer_<name>_checkpoint + maskgit_<name>_checkpoint; the config comes from a config.json beside them (ours,
    or an official ConfigDict dump like the golden fixtures), else from `config=`, else `infer_config`;
  - a JAX export directory (config.json + tokenizer.msgpack + transformer.msgpack, official layout);
  - a torch checkpoint directory (config.json + tokenizer.safetensors + transformer.safetensors);
  - one raw .msgpack / released checkpoint / .safetensors file (which model it holds is read from its keys; the
    config from `config=`, or, for official files, a preset whose parameter shapes match exactly).
Nothing here imports jax or flax: msgpack is read with maskgit_common.msgpack_io.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Mapping

import numpy as np
import torch

from configs import PRESETS, ConfigError, MaskGITConfig, TokenizerConfig, TransformerConfig
from conversion.table import Rule, param_table, to_jax, to_torch, torch_shape
from maskgit_common import fileio
from maskgit_common.msgpack_io import CheckpointFormatError, flatten, read_msgpack, unflatten, write_msgpack
from maskgit_torch import checkpoint as torch_checkpoint
from maskgit_common.errors import UserError

WHICH = ("tokenizer", "transformer")
_MSGPACK_NAMES = {"tokenizer": re.compile(r"^(tokenizer\.msgpack|tokenizer_\w+_checkpoint)$"),
                  "transformer": re.compile(r"^(transformer\.msgpack|(maskgit|transformer)_\w+_checkpoint)$")}


class ConversionError(UserError, ValueError):
  """A checkpoint cannot be converted; the message lists every problem found."""


# Tensor <-> numpy, keeping the dtype (bfloat16 goes through its bits: numpy has no native bfloat16) --------------
def _to_tensor(x: np.ndarray) -> torch.Tensor:
  if x.dtype.name == "bfloat16":
    return torch.from_numpy(np.array(x).view(np.uint16)).view(torch.bfloat16)
  return torch.from_numpy(np.array(x))  # a private, writable copy: never aliases the source tree


def _to_numpy(t) -> np.ndarray:
  if not isinstance(t, torch.Tensor):
    return np.asarray(t)
  t = t.detach().to("cpu")
  if t.dtype == torch.bfloat16:
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


# Key and shape checks ----------------------------------------------------------------------------------------------
def _flat_jax(tree_or_flat: Mapping) -> dict:
  """Nested {'params': ...} or flat {'params/a/b': x}; a tree without the 'params' level gets it."""
  flat = flatten(tree_or_flat) if any(isinstance(v, Mapping) for v in tree_or_flat.values()) else dict(tree_or_flat)
  if flat and not any(k.startswith("params/") for k in flat):
    flat = {f"params/{k}": v for k, v in flat.items()}
  return flat


def _problems(rules: list[Rule], got: Mapping, layout: str) -> list[str]:
  key = (lambda r: r.jax_path) if layout == "jax" else (lambda r: r.torch_key)
  shape = (lambda r: tuple(r.shape)) if layout == "jax" else torch_shape
  expected = {key(r): shape(r) for r in rules}
  got_shapes = {k: tuple(np.shape(v)) for k, v in got.items()}
  problems = [f"missing: {k} (expected shape {s})" for k, s in expected.items() if k not in got_shapes]
  problems += [f"unexpected: {k} (shape {s})" for k, s in got_shapes.items() if k not in expected]
  problems += [f"wrong shape: {k}: got {got_shapes[k]}, expected {s}" for k, s in expected.items()
               if k in got_shapes and got_shapes[k] != s]
  for k, v in got.items():
    dtype = v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype  # a stray scalar leaf has no .dtype
    floating = dtype.is_floating_point if isinstance(dtype, torch.dtype) else (
        np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16")
    if k in expected and not floating:
      problems.append(f"wrong dtype: {k}: got {dtype}, expected a floating point type")
  return problems


def _problem_message(problems: list[str], which: str, layout: str, source: str = "",
                     differences: list[str] = ()) -> str:
  """One paragraph: which model and file, the counts, the config fields that differ (if known), every problem."""
  where = f" ({source})" if source else ""
  kinds = {kind: sum(p.startswith(kind) for p in problems) for kind in ("missing", "unexpected", "wrong")}
  fields = "".join(f"\n  config field {d}" for d in differences)
  return (f"{which} {'official/JAX' if layout == 'jax' else 'torch'} parameters{where} do not match the config: "
          f"{kinds['missing']} missing, {kinds['unexpected']} unexpected, {kinds['wrong']} mis-shaped/typed"
          f"{fields}\n  " + "\n  ".join(problems))


def _check_message(config: MaskGITConfig, flat: Mapping, which: str, layout: str, source: str = "") -> str | None:
  """None when `flat` fits `config`, else the full problem message (with the config fields that differ)."""
  problems = _problems(param_table(config, which), flat, layout)
  if not problems:
    return None
  return _problem_message(problems, which, layout, source, _config_differences(config, flat, which, layout))


def jax_to_torch(tree_or_flat: Mapping, config: MaskGITConfig, which: str, _consume: bool = False) -> dict:
  """Official/JAX params (nested {'params': ...} or flat 'params/a/b' paths) -> torch state_dict.

  Raises ConversionError listing every missing, unexpected and mis-shaped parameter at once. With `_consume`
  (internal, used by `convert` on a flat dict it owns) each source array is dropped once converted, so peak memory
  stays near one copy of the model.
  """
  flat = tree_or_flat if _consume else _flat_jax(tree_or_flat)
  rules = param_table(config, which)
  message = _check_message(config, flat, which, "jax")
  if message:
    raise ConversionError(message)
  state = {}
  for rule in rules:
    x = flat.pop(rule.jax_path) if _consume else flat[rule.jax_path]
    state[rule.torch_key] = _to_tensor(to_torch(rule, x))
  return state


def torch_to_jax(state_dict: Mapping, config: MaskGITConfig, which: str) -> dict:
  """torch state_dict -> {'params': ...} nested numpy tree in the official layout and key order (flax sorts keys),
  so writing it gives the same bytes as the official checkpoint. Raises ConversionError listing every problem."""
  rules = param_table(config, which)
  message = _check_message(config, state_dict, which, "torch")
  if message:
    raise ConversionError(message)
  return unflatten({rule.jax_path: to_jax(rule, _to_numpy(state_dict[rule.torch_key])) for rule in rules})


# Config inference ----------------------------------------------------------------------------------------------
def _indices(flat: Mapping, prefix: str) -> list[int]:
  pattern = re.compile(re.escape(prefix) + r"(\d+)/")
  return sorted({int(m.group(1)) for k in flat for m in [pattern.match(k)] if m})


def _shape(flat: Mapping, path: str, what: str) -> tuple:
  if path not in flat:
    raise ConversionError(f"cannot infer {what}: the checkpoint has no {path}")
  return tuple(np.shape(flat[path]))


def _tokenizer_fields(flat: Mapping) -> dict:
  """The TokenizerConfig fields an official/JAX tokenizer tree's shapes imply (num_groups/eps are not in shapes)."""
  codebook_size, embedding_dim = _shape(flat, "params/quantizer/codebook", "codebook_size/embedding_dim")
  filters = _shape(flat, "params/encoder/Conv_0/kernel", "filters")[3]
  # The decoder has one conv in, one after each upsampling and one out: levels = number of decoder convs - 1.
  num_levels = len(_indices(flat, "params/decoder/Conv_"))
  num_levels -= 1
  encoder_blocks = len(_indices(flat, "params/encoder/ResBlock_"))
  if num_levels < 1 or encoder_blocks % (num_levels + 1):
    raise ConversionError(f"cannot infer the tokenizer layout: {encoder_blocks} encoder ResBlocks do not split into "
                          f"{num_levels} levels + 1 group of equal size")
  num_res_blocks = encoder_blocks // (num_levels + 1)
  multipliers = []
  for level in range(num_levels):
    width = _shape(flat, f"params/encoder/ResBlock_{level * num_res_blocks}/Conv_1/kernel", "channel_multipliers")[3]
    if width % filters:
      raise ConversionError(f"cannot infer channel_multipliers: level {level} width {width} is not a multiple of "
                            f"filters={filters}")
    multipliers.append(width // filters)
  return dict(filters=filters, channel_multipliers=tuple(multipliers), num_res_blocks=num_res_blocks,
              embedding_dim=embedding_dim, codebook_size=codebook_size)


def _infer_tokenizer(flat: Mapping) -> TokenizerConfig:
  return TokenizerConfig(**_tokenizer_fields(flat))


def _transformer_fields(flat: Mapping) -> dict:
  """The TransformerConfig fields (plus seq_len, vocab_size) an official/JAX transformer tree's shapes imply."""
  vocab, hidden = _shape(flat, "params/Embed_0/word_embeddings/embedding", "vocab/hidden size")
  seq_len = _shape(flat, "params/Embed_0/position_embeddings/embedding", "sequence length")[0]
  _, heads, _ = _shape(flat, "params/TransformerLayer_0/Attention_0/self_attention/query/kernel", "num_heads")
  intermediate = _shape(flat, "params/TransformerLayer_0/Mlp_0/intermediate_output/kernel", "intermediate_size")[1]
  return dict(num_layers=len(_indices(flat, "params/TransformerLayer_")), num_embeds=hidden, num_heads=heads,
              intermediate_size=intermediate, seq_len=seq_len, vocab_size=vocab)


def _config_differences(config: MaskGITConfig, flat: Mapping, which: str, layout: str) -> list[str]:
  """The config fields an official/JAX tree's shapes imply differently from `config` (best effort: [] when the
  tree is too damaged to tell, or is a torch state dict). Lets a mismatch error name the field, not only paths."""
  if layout != "jax":
    return []
  try:
    implied = _tokenizer_fields(flat) if which == "tokenizer" else _transformer_fields(flat)
  except ConversionError:
    return []
  section = getattr(config, which)
  differences = []
  for name, value in implied.items():
    if name in ("seq_len", "vocab_size"):
      field, ours = {"seq_len": ("seq_len (= (image_size / downsample_factor) ** 2 + 1)", config.seq_len),
                     "vocab_size": ("vocab_size (= codebook_size + num_class + 1)", config.vocab_size)}[name]
    else:
      field, ours = f"{which}.{name}", getattr(section, name)
    if ours != value:
      differences.append(f"{field}: the config has {ours!r}, the checkpoint implies {value!r}")
  return differences


def infer_config(tokenizer_tree: Mapping | None, transformer_tree: Mapping | None, num_class: int | None = None,
                 image_size: int | None = None) -> MaskGITConfig:
  """The MaskGITConfig implied by official checkpoint shapes (every tree is then checked against it).

  Tokenizer: K and embedding_dim from the codebook, filters from the first conv, levels from the decoder convs,
  num_res_blocks and channel_multipliers from the encoder ResBlocks. Transformer: layers, hidden size, heads (from
  the query kernel), MLP size; S -> latent side -> image_size = side * f; V -> num_class = V - K - 1. The rest
  (sampler, training) are the defaults, or a preset's when the model matches a preset exactly.
  """
  if tokenizer_tree is None:
    raise ConversionError("cannot infer a config without the tokenizer (the codebook size K separates the "
                          "transformer vocabulary V = K + num_class + 1); pass config=")
  tok_flat = _flat_jax(tokenizer_tree)
  try:
    tokenizer = _infer_tokenizer(tok_flat)
  except ConfigError as e:
    raise ConversionError(f"the tokenizer checkpoint implies an invalid config: {e}") from None
  f = 2 ** (len(tokenizer.channel_multipliers) - 1)
  transformer = TransformerConfig()
  if transformer_tree is not None:
    tr_flat = _flat_jax(transformer_tree)
    fields = _transformer_fields(tr_flat)
    seq_len, vocab = fields.pop("seq_len"), fields.pop("vocab_size")
    try:
      transformer = TransformerConfig(**fields)
    except ConfigError as e:
      raise ConversionError(f"the transformer checkpoint implies an invalid config: {e}") from None
    side = math.isqrt(seq_len - 1)
    if side * side != seq_len - 1:
      raise ConversionError(f"{seq_len} position embeddings is not 1 class token + a square of image tokens")
    inferred_classes, inferred_size = vocab - tokenizer.codebook_size - 1, side * f
    for name, given, inferred in (("num_class", num_class, inferred_classes), ("image_size", image_size,
                                                                               inferred_size)):
      if given is not None and given != inferred:
        raise ConversionError(f"{name}={given} was given but the checkpoints imply {name}={inferred}")
    num_class, image_size = inferred_classes, inferred_size
  elif num_class is None or image_size is None:
    raise ConversionError("without the transformer, infer_config needs num_class= and image_size=")
  try:
    config = MaskGITConfig(name="converted", image_size=image_size, num_class=num_class, tokenizer=tokenizer,
                           transformer=transformer)
  except ConfigError as e:
    raise ConversionError(f"the checkpoints imply an invalid config: {e}") from None
  for make in PRESETS.values():  # a released model gets its preset's name and sampler settings
    preset = make()
    if (preset.image_size, preset.num_class, preset.tokenizer, preset.transformer) == (
        config.image_size, config.num_class, config.tokenizer, config.transformer):
      config = preset
      break
  trees = {"tokenizer": tok_flat}
  if transformer_tree is not None:
    trees["transformer"] = tr_flat
  check_config(config, trees)
  return config


def check_config(config: MaskGITConfig, trees: Mapping[str, Mapping]) -> None:
  """Checks {'tokenizer': tree, 'transformer': tree} (official/JAX trees or torch state dicts) against `config`,
  raising one ConversionError that lists every problem of every tree."""
  messages = []
  for which, tree in trees.items():
    if tree is None:
      continue
    layout = _layout(tree)
    message = _check_message(config, _flat_jax(tree) if layout == "jax" else tree, which, layout)
    if message:
      messages.append(message)
  if messages:
    raise ConversionError("\n".join(messages))


def _layout(tree: Mapping) -> str:
  if any(isinstance(v, Mapping) for v in tree.values()) or any("/" in k for k in tree):
    return "jax"
  return "torch"


# Reading sources -------------------------------------------------------------------------------------------------
def _which_from_keys(keys, path: str) -> str:
  keys = list(keys)
  roots = {k.replace("params/", "", 1).split("/")[0].split(".")[0] for k in keys}
  if roots and roots <= {"encoder", "decoder", "quantizer"}:
    return "tokenizer"
  if roots and roots <= {"Embed_0", "MlmLayer_0", "embed", "layers", "mlm"} | {
      r for r in roots if r.startswith("TransformerLayer_")}:
    return "transformer"
  raise ConversionError(f"{path} holds neither a MaskGIT tokenizer nor a transformer (top-level names: "
                        f"{sorted(roots)[:8]})")


def _read_config_json(path: str) -> MaskGITConfig:
  """Our schema, or an official ConfigDict dump (sections vqvae/transformer, as in the golden fixtures)."""
  try:
    return MaskGITConfig.load(path)
  except ConfigError as ours:
    try:
      with open(path) as f:
        data = json.load(f)
      if isinstance(data, dict) and "vqvae" in data and "transformer" in data:
        return MaskGITConfig.from_official(data, name=os.path.basename(os.path.dirname(os.path.abspath(path))))
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
      pass
    raise ConversionError(f"cannot use {path}: {ours}") from None


def _resolve_config(config) -> MaskGITConfig | None:
  if config is None or isinstance(config, MaskGITConfig):
    return config
  if isinstance(config, str):
    if config in PRESETS:
      return PRESETS[config]()
    return _read_config_json(config)
  raise ConversionError(f"config must be a MaskGITConfig, a preset name or a config.json path, got {config!r}")


def _find_weights(directory: str) -> tuple[str, dict]:
  names = sorted(os.listdir(directory))
  msgpack_files = {w: [n for n in names if _MSGPACK_NAMES[w].match(n)] for w in WHICH}
  torch_files = {w: [n for n in names if n == torch_checkpoint.WEIGHT_FILES[w]] for w in WHICH}
  has_msgpack, has_torch = any(msgpack_files.values()), any(torch_files.values())
  if has_msgpack and has_torch:
    raise ConversionError(f"{directory} is ambiguous: it holds both msgpack "
                          f"({sum(msgpack_files.values(), [])}) and safetensors ({sum(torch_files.values(), [])}) "
                          f"weights; pass one file, or a directory with one format")
  if not has_msgpack and not has_torch:
    raise ConversionError(f"{directory} holds no MaskGIT checkpoint: expected tokenizer.msgpack/transformer.msgpack, "
                          f"the released tokenizer_*_checkpoint/maskgit_*_checkpoint, or tokenizer.safetensors/"
                          f"transformer.safetensors; found {names[:20]}")
  files = msgpack_files if has_msgpack else torch_files
  for which, found in files.items():
    if len(found) > 1:
      raise ConversionError(f"{directory} is ambiguous: several {which} checkpoints {found}; pass the file to "
                            f"convert, or keep one per directory")
  return ("jax" if has_msgpack else "torch"), {w: os.path.join(directory, f[0]) for w, f in files.items() if f}


def _load(path: str, layout: str) -> dict:
  """A flat dict: 'params/a/b' -> np.ndarray (msgpack) or torch key -> tensor (safetensors)."""
  if layout == "jax":
    return flatten(read_msgpack(path))
  return torch_checkpoint.read_state_dict(path)


def _match_preset(flat: Mapping, which: str, layout: str) -> MaskGITConfig | None:
  matches = [make() for make in PRESETS.values()
             if not _problems(param_table(make(), which), flat, layout)]
  return matches[0] if len(matches) == 1 else None


def _open_source(src: str, config) -> tuple[MaskGITConfig, str, dict, dict]:
  """-> (config, layout, {which: path}, {which: already loaded flat dict})."""
  config = _resolve_config(config)
  loaded = {}
  if os.path.isdir(src):
    layout, paths = _find_weights(src)
    config_json = os.path.join(src, torch_checkpoint.CONFIG_FILE)
    if config is None and os.path.isfile(config_json):
      config = _read_config_json(config_json)
    if config is None:
      if layout == "torch":
        raise ConversionError(f"{src} has torch weights but no config.json; pass config=")
      loaded = {w: _load(p, layout) for w, p in paths.items()}
      config = infer_config(loaded.get("tokenizer"), loaded.get("transformer"))
    return config, layout, paths, loaded
  if not os.path.isfile(src):
    raise ConversionError(f"conversion source {src} does not exist")
  layout = "torch" if src.endswith(".safetensors") else "jax"
  flat = _load(src, layout)
  which = _which_from_keys(flat, src)
  if config is None:
    config = _match_preset(flat, which, layout) if layout == "jax" else None
    if config is None:
      raise ConversionError(f"{src} is a single {which} file: its config cannot be inferred alone; pass config= "
                            f"(a MaskGITConfig, a preset name or a config.json path)")
  return config, layout, {which: src}, {which: flat}


def _check_destination(dst: str, overwrite: bool, src: str) -> None:
  try:
    fileio.check_replaceable(dst, overwrite=overwrite, protect=(src,))
  except fileio.DestinationError as e:
    raise ConversionError(f"{e}; nothing was written") from None


def convert(src: str, dst: str, to: str = "torch", config=None, overwrite: bool = False) -> MaskGITConfig:
  """Converts a checkpoint (see the module docstring for accepted sources) into directory `dst`.

  to="torch": config.json + tokenizer.safetensors + transformer.safetensors (maskgit_torch.load_checkpoint_dir).
  to="jax":   config.json + tokenizer.msgpack + transformer.msgpack in the official layout (flax `to_bytes`).
  `dst` is assembled beside itself and renamed into place; an existing non-empty `dst` is refused unless
  `overwrite`, and on any error nothing at `dst` changes. Returns the config written.
  """
  if to not in ("torch", "jax"):
    raise ConversionError(f"to must be 'torch' or 'jax', got {to!r}")
  _check_destination(dst, overwrite, src)  # before reading anything: a refused destination costs nothing
  try:
    config, layout, paths, loaded = _open_source(src, config)
  except (torch_checkpoint.CheckpointError, CheckpointFormatError) as e:
    raise ConversionError(str(e)) from None
  # Models already read are checked before anything is written; the rest as they are read. Every problem of every
  # model (and unreadable files) is collected, so the one error lists them all; the temporary directory is removed.
  errors = [m for w, flat in loaded.items() if (m := _check_message(config, flat, w, layout, paths[w]))]
  if errors:
    raise ConversionError("\n".join(errors))
  try:
    with fileio.atomic_directory(dst, overwrite=overwrite, protect=(src,)) as tmp:
      config.save(os.path.join(tmp, torch_checkpoint.CONFIG_FILE))
      for which, path in paths.items():
        # One model at a time, each source array dropped once converted: peak memory ~ one copy of the largest.
        try:
          flat = loaded.pop(which) if which in loaded else _load(path, layout)
        except (torch_checkpoint.CheckpointError, CheckpointFormatError) as e:
          errors.append(str(e))
          continue
        message = _check_message(config, flat, which, layout, path)
        if message or errors:  # after a failure only check the rest; writing it would be wasted
          errors += [message] if message else []
          del flat
          continue
        if to == "torch":
          out = jax_to_torch(flat, config, which, _consume=True) if layout == "jax" else flat
          del flat
          torch_checkpoint.write_state_dict(os.path.join(tmp, torch_checkpoint.WEIGHT_FILES[which]), out, which)
        else:
          out = torch_to_jax(flat, config, which) if layout == "torch" else unflatten(
              {r.jax_path: flat[r.jax_path] for r in param_table(config, which)})
          del flat
          write_msgpack(os.path.join(tmp, f"{which}.msgpack"), out)
        del out
      if errors:
        raise ConversionError("\n".join(errors))  # inside the block: atomic_directory removes tmp, dst untouched
  except fileio.DestinationError as e:
    raise ConversionError(str(e)) from None
  return config


def read_checkpoint(src: str, config=None) -> tuple[MaskGITConfig, str, dict]:
  """Reads any source `convert` accepts, without writing anything -> (config, layout, {which: flat weights}).

  layout is "jax" (flat 'params/a/b' numpy arrays, official layout) or "torch" (state_dict tensors); every model
  read is checked against the config, all problems listed in one ConversionError. The pipelines use it to load a
  checkpoint of either layout.
  """
  try:
    config, layout, paths, loaded = _open_source(src, config)
    for which, path in paths.items():
      if which not in loaded:
        loaded[which] = _load(path, layout)
  except (torch_checkpoint.CheckpointError, CheckpointFormatError) as e:
    raise ConversionError(str(e)) from None
  errors = [m for w, flat in loaded.items() if (m := _check_message(config, flat, w, layout, paths[w]))]
  if errors:
    raise ConversionError("\n".join(errors))
  return config, layout, loaded
