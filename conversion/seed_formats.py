"""The seed's own files (valeoai MaskGIT-pytorch v1), read and written safely: numpy in, numpy out.

Files (docs/ARCHITECTURE.md, "Seed family"; parity_tests/data_seed/FORMAT.md has every detail):
  MaskGIT/<name>.pth  transformer: `{'iter', 'global_epoch', 'model_state_dict', 'optimizer_state_dict'}` as the
                      seed's Trainer.save_network writes it, a bare state_dict, or either with DDP's `module.` prefix
  VQGAN/last.ckpt     taming VQGAN, a pytorch-lightning 1.0 dict: `state_dict` (+ `loss.*`: LPIPS and the
                      discriminator, not part of the VQGAN: named and skipped), epoch, optimizer states, callbacks
  VQGAN/model.yaml    taming config: model.params.{embed_dim, n_embed, ddconfig, lossconfig}
Layouts: the Hugging Face download (`pretrained_maskgit/{VQGAN/last.ckpt, VQGAN/model.yaml, MaskGIT/*.pth}`) and
the seed's `--vqgan-folder` (`configs/model.yaml`, `ckpts/last.ckpt`); see `find_seed_files`.

Safety: checkpoints are pickles. They are read with `torch.load(..., weights_only=True)` only, which rebuilds
tensors and plain Python types and executes nothing; a file naming any other global is refused with the global's
name. The one exception is the class pytorch-lightning 1.0 pickles as a dict key of `callbacks`
(`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`, in every real taming checkpoint): for last.ckpt
alone that name is mapped to `_InertCallback`, a class with no behaviour. torch is imported inside the functions
that need it, never at module level. State dicts come back as {torch key: np.ndarray} in the seed's layout (the
torch side of `conversion/tables/seed.py`); everything else of a file (iter, epoch, the AdamW state as numpy,
`loss.*`, the yaml's lossconfig) in an `extras` dict, which the writers put back.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
import zipfile
from typing import Mapping, NamedTuple

import numpy as np

from maskgit_common import fileio
from maskgit_common.errors import UserError

LIGHTNING_CALLBACK = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
TRANSFORMER_KEYS = ("iter", "global_epoch", "model_state_dict", "optimizer_state_dict")
LOSS_PREFIX = "loss."
VQMODEL_TARGET = "taming.models.vqgan.VQModel"

_log = logging.getLogger(__name__)


class SeedFormatError(UserError, ValueError):
  """A seed file is missing, unreadable, unsafe or does not fit; the message names the file and every problem."""


class _InertCallback:
  """Stands in for lightning's ModelCheckpoint class while reading last.ckpt: it is only ever a dict key there."""


# Tensors <-> numpy, recursively (optimizer states, callbacks) -------------------------------------------------------
def _to_numpy(t) -> np.ndarray:
  t = t.detach().cpu()
  if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16: through its bits
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def numpy_tree(obj):
  """Every torch.Tensor inside dicts/lists/tuples -> np.ndarray (the same containers otherwise)."""
  if hasattr(obj, "detach") and hasattr(obj, "numpy"):
    return _to_numpy(obj)
  if isinstance(obj, Mapping):
    return {(LIGHTNING_CALLBACK if k is _InertCallback else k): numpy_tree(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(numpy_tree(v) for v in obj)
  return obj


def torch_tree(obj):
  """The inverse of numpy_tree: np.ndarray -> a torch.Tensor owning a copy (np.generic scalars stay scalars)."""
  import torch  # pylint: disable=import-outside-toplevel
  if isinstance(obj, np.ndarray):
    if obj.dtype.name == "bfloat16":
      return torch.from_numpy(np.array(obj).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(obj))
  if isinstance(obj, Mapping):
    return {k: torch_tree(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(torch_tree(v) for v in obj)
  return obj


# Safe loading ----------------------------------------------------------------------------------------------------
def _refusal(path: str, error: Exception) -> SeedFormatError:
  text = str(error)
  named = re.search(r"GLOBAL ([\w.]+)", text)
  if named:
    return SeedFormatError(
        f"{path}: refused: the pickle names {named.group(1)}, which is not a tensor or a plain Python type; nothing "
        f"in it was executed (seed checkpoints are read with torch.load(weights_only=True) only)")
  detail = re.search(r"WeightsUnpickler error: ([^\n]*\n?[^\n]*)", text)
  reason = " ".join((detail.group(1) if detail else text.splitlines()[0]).split())
  return SeedFormatError(f"{path}: refused: not a plain checkpoint of tensors ({reason}); nothing in it was "
                         f"executed")


def torch_load(path: str, what: str, lightning: bool = False):
  """torch.load(path, weights_only=True) on the CPU, memory-mapped when the file allows; every failure is one
  SeedFormatError naming the file. `lightning`: also accept the ModelCheckpoint class key (see the module doc)."""
  import torch  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise SeedFormatError(f"{what} {path} does not exist")
  allowed = [(_InertCallback, LIGHTNING_CALLBACK)] if lightning else []
  try:
    with warnings.catch_warnings(), torch.serialization.safe_globals(allowed):
      warnings.filterwarnings("ignore", message="Detected pickle protocol")
      mmap = zipfile.is_zipfile(path)  # torch.save's zip format maps lazily; legacy pickles cannot be mapped
      return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
  except pickle.UnpicklingError as e:
    raise _refusal(path, e) from None
  except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, TypeError) as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise SeedFormatError(f"cannot read {what} {path}: truncated, damaged or not a torch checkpoint "
                          f"({type(e).__name__}: {first})") from None


def _is_state_dict(obj) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(
      isinstance(k, str) and hasattr(v, "shape") and hasattr(v, "detach") for k, v in obj.items())


def _numpy_state(state: Mapping, path: str) -> dict:
  """{key: tensor} -> {key: np.ndarray}, DDP's `module.` prefix removed (all keys or none must carry it)."""
  keys = list(state)
  prefixed = [k.startswith("module.") for k in keys]
  if any(prefixed) and not all(prefixed):
    raise SeedFormatError(f"{path}: only some keys carry DDP's 'module.' prefix, e.g. "
                          f"{[k for k, p in zip(keys, prefixed) if not p][:3]}; a DDP state_dict has it on all")
  return {(k[len("module."):] if all(prefixed) else k): _to_numpy(v) for k, v in state.items()}


# Readers ---------------------------------------------------------------------------------------------------------
def read_transformer(path: str) -> tuple[dict, dict]:
  """A seed `.pth` -> (state {key: np.ndarray}, extras {'iter', 'global_epoch'[, 'optimizer_state_dict']}).

  Accepts Trainer.save_network's dict (its four keys; any other top-level key is an error, so nothing is dropped
  unseen) or a bare state_dict, with or without DDP's `module.` prefix. The AdamW state stays as saved: `state[i]`
  belongs to the i-th parameter of the seed's order (`conversion.seed_table.state_dict_order`).
  """
  obj = torch_load(path, "transformer checkpoint")
  if _is_state_dict(obj):
    return _numpy_state(obj, path), {}
  if not isinstance(obj, Mapping) or "model_state_dict" not in obj:
    found = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise SeedFormatError(f"{path}: not a seed transformer checkpoint: expected a dict with 'model_state_dict' "
                          f"(Trainer.save_network) or a bare state_dict, found {found}")
  unknown = sorted(str(k) for k in obj if k not in TRANSFORMER_KEYS)
  if unknown:
    raise SeedFormatError(f"{path}: unexpected top-level entries {unknown}; a seed checkpoint holds "
                          f"{list(TRANSFORMER_KEYS)}")
  if not _is_state_dict(obj["model_state_dict"]):
    raise SeedFormatError(f"{path}: 'model_state_dict' is not a dict of tensors")
  extras = {k: int(obj[k]) for k in ("iter", "global_epoch") if k in obj}
  if obj.get("optimizer_state_dict") is not None:
    extras["optimizer_state_dict"] = numpy_tree(obj["optimizer_state_dict"])
  return _numpy_state(obj["model_state_dict"], path), extras


def read_vqgan(path: str) -> tuple[dict, dict]:
  """A taming `last.ckpt` -> (VQGAN state {key: np.ndarray}, extras).

  `loss.*` entries (LPIPS, discriminator: the training loss, which the seed's VQModel never builds) are named in a
  log message and moved to extras['loss_state']; the rest of the lightning dict is kept in extras as numpy.
  A bare state_dict file is accepted too.
  """
  obj = torch_load(path, "VQGAN checkpoint", lightning=True)
  if _is_state_dict(obj):
    state, extras = obj, {}
  elif isinstance(obj, Mapping) and _is_state_dict(obj.get("state_dict")):
    state = obj["state_dict"]
    extras = {k: numpy_tree(v) for k, v in obj.items() if k != "state_dict"}
  else:
    found = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise SeedFormatError(f"{path}: not a taming VQGAN checkpoint: expected a dict with a 'state_dict' of tensors "
                          f"(pytorch-lightning) or a bare state_dict, found {found}")
  state = _numpy_state(state, path)
  extras["key_order"] = list(state)  # loss.* sit between the VQGAN's keys in real files: written back in place
  loss = {k: state.pop(k) for k in [k for k in state if k.startswith(LOSS_PREFIX)]}
  if loss:
    extras["loss_state"] = loss
    groups = {}
    for k in loss:  # named by module: loss.perceptual_loss.* (LPIPS), loss.discriminator.*
      groups[".".join(k.split(".")[:2])] = groups.get(".".join(k.split(".")[:2]), 0) + 1
    _log.warning("%s: skipped %d training-loss entries, not part of the VQGAN (kept for writing back): %s", path,
                 len(loss), ", ".join(f"{g}.* ({n})" for g, n in sorted(groups.items())))
  return state, extras


def read_model_yaml(path: str) -> dict:
  """taming model.yaml -> its `model` mapping (base_learning_rate, target, params), read with yaml.safe_load."""
  import yaml  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise SeedFormatError(f"VQGAN config {path} does not exist")
  try:
    with open(path) as f:
      data = yaml.safe_load(f)
  except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
    raise SeedFormatError(f"cannot read VQGAN config {path}: {type(e).__name__}: {e}") from None
  model = data.get("model") if isinstance(data, dict) else None
  if not isinstance(model, dict) or not isinstance(model.get("params"), dict):
    raise SeedFormatError(f"{path}: not a taming model.yaml: expected model.params (embed_dim, n_embed, ddconfig)")
  if model.get("target", VQMODEL_TARGET) != VQMODEL_TARGET:
    raise SeedFormatError(f"{path}: model.target is {model['target']!r}; only {VQMODEL_TARGET} is implemented")
  return model


# Writers ---------------------------------------------------------------------------------------------------------
def _ordered_tensors(state: Mapping, order: list[str]) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  missing = [k for k in order if k not in state]
  unexpected = [k for k in state if k not in set(order)]
  if missing or unexpected:
    raise SeedFormatError(f"state_dict does not match the config: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]} ({len(missing)} missing, {len(unexpected)} unexpected)")
  return {k: (state[k] if isinstance(state[k], torch.Tensor) else torch_tree(np.asarray(state[k])))
          for k in order}


def _torch_save(path: str, obj) -> str:
  import torch  # pylint: disable=import-outside-toplevel
  return fileio.atomic_write(path, lambda f: torch.save(obj, f))


def write_transformer(path: str, config, state: Mapping, extras: Mapping | None = None) -> str:
  """Writes a `.pth` as the seed's Trainer.save_network does: iter and global_epoch (0 when unknown), the
  model_state_dict in the seed's key order, and optimizer_state_dict when extras carry one."""
  from conversion.tables import seed as seed_table  # pylint: disable=import-outside-toplevel
  extras = extras or {}
  obj = {"iter": int(extras.get("iter", 0)), "global_epoch": int(extras.get("global_epoch", 0)),
         "model_state_dict": _ordered_tensors(state, seed_table.state_dict_order(config, "transformer"))}
  if extras.get("optimizer_state_dict") is not None:
    obj["optimizer_state_dict"] = torch_tree(extras["optimizer_state_dict"])
  return _torch_save(path, obj)


def write_vqgan(path: str, config, state: Mapping, extras: Mapping | None = None) -> str:
  """Writes a lightning-style `last.ckpt`: the VQGAN state_dict (+ the `loss.*` entries extras kept), epoch,
  global_step, version, optimizer and scheduler states from extras. Callback states cannot be written without
  lightning's class (they are keyed by it), so `callbacks` is empty; the seed's loader reads only `state_dict`."""
  from conversion.tables import seed as seed_table  # pylint: disable=import-outside-toplevel
  extras = extras or {}
  tensors = _ordered_tensors(state, seed_table.state_dict_order(config, "tokenizer"))
  tensors.update(torch_tree(dict(extras.get("loss_state", {}))))
  if sorted(extras.get("key_order", ())) == sorted(tensors):  # the order of the file read, where it applies
    tensors = {k: tensors[k] for k in extras["key_order"]}
  obj = {"epoch": extras.get("epoch", 0), "global_step": extras.get("global_step", 0),
         "pytorch-lightning_version": extras.get("pytorch-lightning_version", "1.0.8"), "callbacks": {},
         "optimizer_states": torch_tree(extras.get("optimizer_states", [])),
         "lr_schedulers": torch_tree(extras.get("lr_schedulers", [])), "state_dict": tensors}
  return _torch_save(path, obj)


def write_model_yaml(path: str, config, extras: Mapping | None = None) -> str:
  """taming model.yaml for the config's tokenizer; base_learning_rate and lossconfig from extras when read."""
  import yaml  # pylint: disable=import-outside-toplevel
  from conversion.seed_config import taming_params  # pylint: disable=import-outside-toplevel
  extras = extras or {}
  params = taming_params(config.tokenizer)
  params["lossconfig"] = extras.get("lossconfig", DEFAULT_LOSSCONFIG)
  model = {"base_learning_rate": extras.get("base_learning_rate", 4.5e-6), "target": VQMODEL_TARGET,
           "params": params}
  return fileio.atomic_write_text(path, yaml.safe_dump({"model": model}, sort_keys=False))


# taming's ImageNet VQGAN training loss (configs/imagenet_vqgan.yaml), for a model.yaml written from a config alone.
DEFAULT_LOSSCONFIG = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                      "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 250001,
                                 "disc_weight": 0.8, "codebook_weight": 1.0}}


def extras_of_yaml(model: Mapping) -> dict:
  """What of a model.yaml is not the architecture (written back by write_model_yaml)."""
  extras = {"lossconfig": model["params"]["lossconfig"]} if "lossconfig" in model["params"] else {}
  if "base_learning_rate" in model:
    extras["base_learning_rate"] = model["base_learning_rate"]
  return extras

# Layouts: where the files of one seed model are --------------------------------------------------------------------
class SeedFiles(NamedTuple):
  transformer: str | None  # MaskGIT/<name>.pth
  vqgan_ckpt: str | None  # VQGAN/last.ckpt (or ckpts/last.ckpt)
  vqgan_yaml: str | None  # VQGAN/model.yaml (or configs/model.yaml)


def _vqgan_in(directory: str) -> tuple[str | None, str | None]:
  """(last.ckpt, model.yaml) of a VQGAN folder in the Hugging Face layout or the seed's --vqgan-folder layout."""
  for ckpt, yaml_file in (("last.ckpt", "model.yaml"), (os.path.join("ckpts", "last.ckpt"),
                                                         os.path.join("configs", "model.yaml"))):
    ckpt, yaml_file = os.path.join(directory, ckpt), os.path.join(directory, yaml_file)
    if os.path.isfile(ckpt) or os.path.isfile(yaml_file):
      return (ckpt if os.path.isfile(ckpt) else None), (yaml_file if os.path.isfile(yaml_file) else None)
  return None, None


def _vqgan_beside(directory: str) -> tuple[str | None, str | None]:
  """The VQGAN folder next to a transformer: DIR/VQGAN, else DIR/../VQGAN (MaskGIT/ and VQGAN/ are siblings)."""
  for candidate in (os.path.join(directory, "VQGAN"), os.path.join(os.path.dirname(directory), "VQGAN")):
    found = _vqgan_in(candidate)
    if found != (None, None):
      return found
  return None, None


def find_seed_files(src: str) -> SeedFiles:
  """The seed files `src` names: a `.pth` (its VQGAN is looked up in ../VQGAN, the Hugging Face layout), a
  `last.ckpt` or `model.yaml` (the other one beside it or in ../configs, ../ckpts), a VQGAN folder in either
  layout, or a directory holding VQGAN/ and MaskGIT/ (the download's `pretrained_maskgit`)."""
  src = os.path.abspath(src)
  if os.path.isfile(src):
    if src.endswith(".pth"):
      return SeedFiles(src, *_vqgan_beside(os.path.dirname(src)))
    parent = os.path.dirname(src)
    folder = os.path.dirname(parent) if os.path.basename(parent) in ("ckpts", "configs") else parent
    ckpt, yaml_file = _vqgan_in(folder)
    return SeedFiles(None, src if src.endswith(".ckpt") else ckpt, src if src.endswith(".yaml") else yaml_file)
  if not os.path.isdir(src):
    raise SeedFormatError(f"seed checkpoint {src} does not exist")
  ckpt, yaml_file = _vqgan_in(src)
  if ckpt is None and yaml_file is None:
    ckpt, yaml_file = _vqgan_beside(src)
  folder = os.path.join(src, "MaskGIT") if os.path.isdir(os.path.join(src, "MaskGIT")) else src
  pths = sorted(n for n in os.listdir(folder) if n.endswith(".pth"))
  if len(pths) > 1:
    raise SeedFormatError(f"{folder} holds several transformer checkpoints {pths}; pass the one to use (its VQGAN "
                          f"is found in ../VQGAN)")
  files = SeedFiles(os.path.join(folder, pths[0]) if pths else None, ckpt, yaml_file)
  if files == SeedFiles(None, None, None):
    raise SeedFormatError(f"{src} holds no seed checkpoint: expected MaskGIT/*.pth and VQGAN/{{last.ckpt, "
                          f"model.yaml}} (Hugging Face layout) or configs/model.yaml + ckpts/last.ckpt "
                          f"(--vqgan-folder layout)")
  return files


class SeedCheckpoint(NamedTuple):
  config: object  # MaskGITConfig
  weights: dict  # {"transformer": {key: np.ndarray}, "tokenizer": {...}}, the parts present
  extras: dict  # {"transformer": {...}, "tokenizer": {...}}: what the writers put back
  files: SeedFiles


def read_seed(src: str, config=None) -> SeedCheckpoint:
  """Reads the seed files at `src` (find_seed_files) and checks them; one SeedFormatError lists every problem.

  Without `config`, it is inferred: the VQGAN from model.yaml, the transformer from the shapes with the seed's
  16 heads and dropout 0.1 (not in the shapes). With `config`, the fields the files imply differently are named.
  """
  files = find_seed_files(src)
  if files.vqgan_ckpt and not files.vqgan_yaml and config is None:
    raise SeedFormatError(f"{files.vqgan_ckpt}: its model.yaml is not beside it (nor in ../configs); the VQGAN's "
                          f"architecture needs it, or pass a config")
  weights, extras, sources, failures = {}, {}, {}, []
  for which, path, reader in (("transformer", files.transformer, read_transformer),
                              ("tokenizer", files.vqgan_ckpt, read_vqgan)):
    try:
      if path:
        weights[which], extras[which] = reader(path)
        sources[which] = path
    except SeedFormatError as e:  # every unreadable file is named in the one error below
      failures.append(str(e))
  model = None
  try:
    model = read_model_yaml(files.vqgan_yaml) if files.vqgan_yaml else None
  except SeedFormatError as e:
    failures.append(str(e))
  if failures and config is None:
    raise SeedFormatError("\n".join(failures))
  try:
    config = _implied_and_checked(files, config, weights, extras, sources, model)
  except SeedFormatError as e:
    failures.append(str(e))
  if failures:
    raise SeedFormatError("\n".join(failures))
  return SeedCheckpoint(config, weights, extras, files)


def _implied_and_checked(files, config, weights, extras, sources, model):
  """The config the files imply (model.yaml or the given config's tokenizer + the transformer's shapes), checked:
  returns `config` or, when None, the implied one."""
  from conversion import seed_config  # pylint: disable=import-outside-toplevel
  if model is not None:  # the VQGAN's architecture: model.yaml, else the given config's
    extras.setdefault("tokenizer", {}).update(extras_of_yaml(model))
    params, params_source = model["params"], files.vqgan_yaml
  elif config is not None and config.tokenizer.arch == "taming":
    params, params_source = seed_config.taming_params(config.tokenizer), "the config's tokenizer"
  elif config is None:
    raise SeedFormatError(f"{files.transformer}: no VQGAN model.yaml beside it (VQGAN/ or ../VQGAN/): the codebook "
                          f"size and the downsampling factor come from it; pass the VQGAN too, or a config")
  else:
    params = None
  implied = None
  if params is not None:
    maskgit = None
    if "transformer" in weights:
      tr = config.transformer if config is not None and config.transformer.arch == "seed" else None
      maskgit = seed_config.implied_maskgit(
          weights["transformer"], seed_config.tokenizer_from_taming(params, params_source),
          heads=tr.num_heads if tr else seed_config.SEED_HEADS,
          dropout=tr.dropout_rate if tr else seed_config.SEED_DROPOUT, source=files.transformer)
    implied = seed_config.config_from_seed(params, maskgit, like=config, source=params_source,
                                           name=config.name if config is not None else "seed")
  config = config if config is not None else implied
  seed_config.check_files(config, weights, sources, implied)
  return config


def write_seed(dst: str, config, weights: Mapping, extras: Mapping | None = None, overwrite: bool = False,
               transformer_name: str = "current.pth", layout: str = "huggingface") -> SeedFiles:
  """Writes the parts in `weights` as seed files in directory `dst`, atomically (nothing at `dst` changes on an
  error; an existing checkpoint directory is replaced only with `overwrite`):
    layout="huggingface":   MaskGIT/<transformer_name>, VQGAN/last.ckpt, VQGAN/model.yaml
    layout="vqgan_folder":  MaskGIT/<transformer_name>, VQGAN/ckpts/last.ckpt, VQGAN/configs/model.yaml, which the
                            v1 loader reads as `--vqgan-folder DST/VQGAN --vit-folder DST/MaskGIT/<name>`."""
  from conversion import seed_config  # pylint: disable=import-outside-toplevel
  if layout not in ("huggingface", "vqgan_folder"):
    raise SeedFormatError(f"layout must be 'huggingface' or 'vqgan_folder', got {layout!r}")
  extras = extras or {}
  seed_config.check_files(config, weights, {w: "the weights to write" for w in weights})
  ckpt, yaml_file = (("last.ckpt", "model.yaml") if layout == "huggingface"
                     else (os.path.join("ckpts", "last.ckpt"), os.path.join("configs", "model.yaml")))
  rel = SeedFiles(os.path.join("MaskGIT", transformer_name) if "transformer" in weights else None,
                  os.path.join("VQGAN", ckpt) if "tokenizer" in weights else None,
                  os.path.join("VQGAN", yaml_file) if "tokenizer" in weights else None)
  try:
    with fileio.atomic_directory(dst, overwrite=overwrite) as tmp:
      if rel.transformer:
        write_transformer(os.path.join(tmp, rel.transformer), config, weights["transformer"],
                          extras.get("transformer"))
      if rel.vqgan_ckpt:
        write_vqgan(os.path.join(tmp, rel.vqgan_ckpt), config, weights["tokenizer"], extras.get("tokenizer"))
        write_model_yaml(os.path.join(tmp, rel.vqgan_yaml), config, extras.get("tokenizer"))
  except fileio.DestinationError as e:
    raise SeedFormatError(f"{e}; nothing was written") from None
  return SeedFiles(*(os.path.join(os.path.abspath(dst), p) if p else None for p in rel))
