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
from maskgit_common.msgpack_io import CheckpointFormatError, flatten, read_msgpack, unflatten, write_msgpack
from maskgit_torch import checkpoint as torch_checkpoint

WHICH = ("tokenizer", "transformer")
_MSGPACK_NAMES = {"tokenizer": re.compile(r"^(tokenizer\.msgpack|tokenizer_\w+_checkpoint)$"),
                  "transformer": re.compile(r"^(transformer\.msgpack|(maskgit|transformer)_\w+_checkpoint)$")}


class ConversionError(ValueError):
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
    dtype = v.dtype
    floating = dtype.is_floating_point if isinstance(dtype, torch.dtype) else (
        np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16")
    if k in expected and not floating:
      problems.append(f"wrong dtype: {k}: got {dtype}, expected a floating point type")
  return problems


def _raise_problems(problems: list[str], which: str, layout: str, source: str = "") -> None:
  if problems:
    where = f" ({source})" if source else ""
    kinds = {kind: sum(p.startswith(kind) for p in problems) for kind in ("missing", "unexpected", "wrong")}
    raise ConversionError(
        f"{which} {'official/JAX' if layout == 'jax' else 'torch'} parameters{where} do not match the config: "
        f"{kinds['missing']} missing, {kinds['unexpected']} unexpected, {kinds['wrong']} mis-shaped/typed\n  "
        + "\n  ".join(problems))


def jax_to_torch(tree_or_flat: Mapping, config: MaskGITConfig, which: str, _consume: bool = False) -> dict:
  """Official/JAX params (nested {'params': ...} or flat 'params/a/b' paths) -> torch state_dict.

  Raises ConversionError listing every missing, unexpected and mis-shaped parameter at once. With `_consume`
  (internal, used by `convert` on a flat dict it owns) each source array is dropped once converted, so peak memory
  stays near one copy of the model.
  """
  flat = tree_or_flat if _consume else _flat_jax(tree_or_flat)
  rules = param_table(config, which)
  _raise_problems(_problems(rules, flat, "jax"), which, "jax")
  state = {}
  for rule in rules:
    x = flat.pop(rule.jax_path) if _consume else flat[rule.jax_path]
    state[rule.torch_key] = _to_tensor(to_torch(rule, x))
  return state


def torch_to_jax(state_dict: Mapping, config: MaskGITConfig, which: str) -> dict:
  """torch state_dict -> {'params': ...} nested numpy tree in the official layout and key order (flax sorts keys),
  so writing it gives the same bytes as the official checkpoint. Raises ConversionError listing every problem."""
  rules = param_table(config, which)
  _raise_problems(_problems(rules, state_dict, "torch"), which, "torch")
  return unflatten({rule.jax_path: to_jax(rule, _to_numpy(state_dict[rule.torch_key])) for rule in rules})


# Config inference ----------------------------------------------------------------------------------------------
def _indices(flat: Mapping, prefix: str) -> list[int]:
  pattern = re.compile(re.escape(prefix) + r"(\d+)/")
  return sorted({int(m.group(1)) for k in flat for m in [pattern.match(k)] if m})


def _shape(flat: Mapping, path: str, what: str) -> tuple:
  if path not in flat:
    raise ConversionError(f"cannot infer {what}: the checkpoint has no {path}")
  return tuple(np.shape(flat[path]))


def _infer_tokenizer(flat: Mapping) -> TokenizerConfig:
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
  return TokenizerConfig(filters=filters, channel_multipliers=tuple(multipliers), num_res_blocks=num_res_blocks,
                         embedding_dim=embedding_dim, codebook_size=codebook_size)


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
    vocab, hidden = _shape(tr_flat, "params/Embed_0/word_embeddings/embedding", "vocab/hidden size")
    seq_len = _shape(tr_flat, "params/Embed_0/position_embeddings/embedding", "sequence length")[0]
    _, heads, _ = _shape(tr_flat, "params/TransformerLayer_0/Attention_0/self_attention/query/kernel", "num_heads")
    intermediate = _shape(tr_flat, "params/TransformerLayer_0/Mlp_0/intermediate_output/kernel",
                          "intermediate_size")[1]
    try:
      transformer = TransformerConfig(num_layers=len(_indices(tr_flat, "params/TransformerLayer_")),
                                      num_embeds=hidden, num_heads=heads, intermediate_size=intermediate)
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
    got = _flat_jax(tree) if layout == "jax" else tree
    try:
      _raise_problems(_problems(param_table(config, which), got, layout), which, layout)
    except ConversionError as e:
      messages.append(str(e))
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


def convert(src: str, dst: str, to: str = "torch", config=None, overwrite: bool = False) -> MaskGITConfig:
  """Converts a checkpoint (see the module docstring for accepted sources) into directory `dst`.

  to="torch": config.json + tokenizer.safetensors + transformer.safetensors (maskgit_torch.load_checkpoint_dir).
  to="jax":   config.json + tokenizer.msgpack + transformer.msgpack in the official layout (flax `to_bytes`).
  `dst` is assembled beside itself and renamed into place; an existing non-empty `dst` is refused unless
  `overwrite`, and on any error nothing at `dst` changes. Returns the config written.
  """
  if to not in ("torch", "jax"):
    raise ConversionError(f"to must be 'torch' or 'jax', got {to!r}")
  try:
    config, layout, paths, loaded = _open_source(src, config)
  except torch_checkpoint.CheckpointError as e:
    raise ConversionError(str(e)) from None
  # Validate everything already read before writing anything (files not read yet are checked as they are read).
  for which, flat in loaded.items():
    _raise_problems(_problems(param_table(config, which), flat, layout), which, layout, paths[which])
  try:
    with torch_checkpoint.atomic_directory(dst, overwrite) as tmp:
      config.save(os.path.join(tmp, torch_checkpoint.CONFIG_FILE))
      for which, path in paths.items():
        # One model at a time, each source array dropped once converted: peak memory ~ one copy of the largest.
        flat = loaded.pop(which) if which in loaded else _load(path, layout)
        _raise_problems(_problems(param_table(config, which), flat, layout), which, layout, path)
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
  except torch_checkpoint.CheckpointError as e:
    raise ConversionError(str(e)) from None
  return config
