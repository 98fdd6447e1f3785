"""The seed's own files (valeoai MaskGIT-pytorch v1) in the seed's own layout, read and written safely: numpy in,
numpy out. `conversion/formats/seed.py` registers them as the weights layer's format "seed" (canonical weights
through `conversion/tables/seed.py`); this module is the file side.

Files (docs/ARCHITECTURE.md, "Seed family"; the seed fixtures' FORMAT.md, parity_tests/data/SEED_FORMAT.md, has
every detail):
  MaskGIT/<name>.pth  transformer: `{'iter', 'global_epoch', 'model_state_dict', 'optimizer_state_dict'}` as the
                      seed's Trainer.save_network writes it, a bare state_dict, or either with DDP's `module.` prefix
  VQGAN/last.ckpt     taming VQGAN, a pytorch-lightning 1.0 dict: `state_dict` (+ `loss.*`: LPIPS and the
                      discriminator, not part of the VQGAN: named and skipped), epoch, optimizer states, callbacks
  VQGAN/model.yaml    taming config: model.params.{embed_dim, n_embed, ddconfig, lossconfig}
Layouts: the Hugging Face download (`pretrained_maskgit/{VQGAN/last.ckpt, VQGAN/model.yaml, MaskGIT/*.pth}`) and
the seed's `--vqgan-folder` (`configs/model.yaml`, `ckpts/last.ckpt`); see `locate`.

Safety: the pickles are read by `conversion.formats.torch_pickle` (torch.load(weights_only=True) only). The one
stand-in is the class pytorch-lightning 1.0 pickles as a dict key of `callbacks`
(`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`, in every real taming checkpoint): for last.ckpt
alone that name is mapped to `_InertCallback`, a class with no behaviour; any other global is refused. State dicts
come back as {torch key: np.ndarray} in the seed's layout (the torch side of `conversion/tables/seed.py`);
everything else of a file (iter, epoch, the AdamW state as numpy, `loss.*`, the yaml's lossconfig) in an `extras`
dict, which the writers put back (its keys: `conversion/formats/seed.py`). Errors are the weights layer's
(`conversion.errors`): every problem of every file in one message.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, NamedTuple

import numpy as np

from conversion.errors import CheckpointFormatError, ConversionError, raise_all
from conversion.formats import torch_pickle
from maskgit_common import fileio

LIGHTNING_CALLBACK = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
TRANSFORMER_KEYS = ("iter", "global_epoch", "model_state_dict", "optimizer_state_dict")
LOSS_PREFIX = "loss."
VQMODEL_TARGET = "taming.models.vqgan.VQModel"
DEFAULT_TRANSFORMER_NAME = "current.pth"  # what the seed's Trainer.save_network writes

_log = logging.getLogger(__name__)


class _InertCallback:
  """Stands in for lightning's ModelCheckpoint class while reading last.ckpt: it is only ever a dict key there."""
  STANDS_FOR = LIGHTNING_CALLBACK


def _is_state_dict(obj) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(
      isinstance(k, str) and hasattr(v, "shape") and hasattr(v, "detach") for k, v in obj.items())


def _numpy_state(state: Mapping, path: str) -> dict:
  """{key: tensor} -> {key: np.ndarray}, DDP's `module.` prefix removed (all keys or none must carry it)."""
  keys = list(state)
  prefixed = [k.startswith("module.") for k in keys]
  if any(prefixed) and not all(prefixed):
    raise CheckpointFormatError(f"{path}: only some keys carry DDP's 'module.' prefix, e.g. "
                                f"{[k for k, p in zip(keys, prefixed) if not p][:3]}; a DDP state_dict has it on all")
  return {(k[len("module."):] if all(prefixed) else k): torch_pickle.to_numpy(v) for k, v in state.items()}


def _found(obj) -> str:
  return str(sorted(map(str, obj))[:8]) if isinstance(obj, Mapping) else type(obj).__name__


# Readers ---------------------------------------------------------------------------------------------------------
def read_transformer(path: str) -> tuple[dict, dict]:
  """A seed `.pth` -> (state {key: np.ndarray}, extras {'iter', 'global_epoch'[, 'optimizer_state_dict'],
  'file_name'}).

  Accepts Trainer.save_network's dict (its four keys; any other top-level key is an error, so nothing is dropped
  unseen) or a bare state_dict, with or without DDP's `module.` prefix. The AdamW state stays as saved: `state[i]`
  belongs to the i-th parameter of the seed's order (`conversion.tables.seed.state_dict_order`).
  """
  obj = torch_pickle.load(path, "transformer checkpoint")
  extras = {"file_name": os.path.basename(path)}
  if _is_state_dict(obj):
    return _numpy_state(obj, path), extras
  if not isinstance(obj, Mapping) or "model_state_dict" not in obj:
    raise CheckpointFormatError(
        f"{path} is a PyTorch checkpoint, but not a valeoai MaskGIT-pytorch transformer: expected a dict with "
        f"'model_state_dict' (its Trainer.save_network) or a bare state_dict of tensors, found {_found(obj)}. This "
        f"project reads that project's PyTorch files only; for other torch weights, save the state_dict with "
        f"safetensors.torch.save_file")
  unknown = sorted(str(k) for k in obj if k not in TRANSFORMER_KEYS)
  if unknown:
    raise CheckpointFormatError(f"{path}: unexpected top-level entries {unknown}; a seed checkpoint holds "
                                f"{list(TRANSFORMER_KEYS)}")
  if not _is_state_dict(obj["model_state_dict"]):
    raise CheckpointFormatError(f"{path}: 'model_state_dict' is not a dict of tensors")
  extras.update({k: int(obj[k]) for k in ("iter", "global_epoch") if k in obj})
  if obj.get("optimizer_state_dict") is not None:
    extras["optimizer_state_dict"] = torch_pickle.numpy_tree(obj["optimizer_state_dict"])
  return _numpy_state(obj["model_state_dict"], path), extras


def read_vqgan(path: str) -> tuple[dict, dict]:
  """A taming `last.ckpt` -> (VQGAN state {key: np.ndarray}, extras).

  `loss.*` entries (LPIPS, discriminator: the training loss, which the seed's VQModel never builds) are named in a
  log message and moved to extras['loss_state']; the rest of the lightning dict is kept in extras as numpy.
  A bare state_dict file is accepted too.
  """
  obj = torch_pickle.load(path, "VQGAN checkpoint", stand_ins={LIGHTNING_CALLBACK: _InertCallback})
  if _is_state_dict(obj):
    state, extras = obj, {}
  elif isinstance(obj, Mapping) and _is_state_dict(obj.get("state_dict")):
    state = obj["state_dict"]
    extras = {k: torch_pickle.numpy_tree(v) for k, v in obj.items() if k != "state_dict"}
  else:
    raise CheckpointFormatError(f"{path}: not a taming VQGAN checkpoint: expected a dict with a 'state_dict' of "
                                f"tensors (pytorch-lightning) or a bare state_dict, found {_found(obj)}")
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
    raise CheckpointFormatError(f"VQGAN config {path} does not exist")
  try:
    with open(path) as f:
      data = yaml.safe_load(f)
  except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
    raise CheckpointFormatError(f"cannot read VQGAN config {path}: {type(e).__name__}: {e}") from None
  model = data.get("model") if isinstance(data, dict) else None
  if not isinstance(model, dict) or not isinstance(model.get("params"), dict):
    raise CheckpointFormatError(f"{path}: not a taming model.yaml: expected model.params (embed_dim, n_embed, "
                                f"ddconfig)")
  if model.get("target", VQMODEL_TARGET) != VQMODEL_TARGET:
    raise CheckpointFormatError(f"{path}: model.target is {model['target']!r}; only {VQMODEL_TARGET} is "
                                f"implemented")
  return model


# Writers ---------------------------------------------------------------------------------------------------------
def _ordered_tensors(config, which: str, state: Mapping) -> dict:
  """The state as tensors in the seed's key order; ConversionError listing every key that does not fit."""
  from conversion.checks import message  # pylint: disable=import-outside-toplevel
  from conversion.tables import seed as seed_table  # pylint: disable=import-outside-toplevel
  problem = message(config, which, state, "torch")
  if problem:
    raise ConversionError(problem)
  return {k: torch_pickle.to_tensor(state[k]) for k in seed_table.state_dict_order(config, which)}


def write_transformer(path: str, config, state: Mapping, extras: Mapping | None = None) -> str:
  """Writes a `.pth` as the seed's Trainer.save_network does: iter and global_epoch (0 when unknown), the
  model_state_dict in the seed's key order, and optimizer_state_dict when extras carry one."""
  extras = extras or {}
  obj = {"iter": int(extras.get("iter", 0)), "global_epoch": int(extras.get("global_epoch", 0)),
         "model_state_dict": _ordered_tensors(config, "transformer", state)}
  if extras.get("optimizer_state_dict") is not None:
    obj["optimizer_state_dict"] = torch_pickle.torch_tree(extras["optimizer_state_dict"])
  return torch_pickle.save(path, obj)


def write_vqgan(path: str, config, state: Mapping, extras: Mapping | None = None) -> str:
  """Writes a lightning-style `last.ckpt`: the VQGAN state_dict (+ the `loss.*` entries extras kept), epoch,
  global_step, version, optimizer and scheduler states from extras. Callback states cannot be written without
  lightning's class (they are keyed by it), so `callbacks` is empty; the seed's loader reads only `state_dict`."""
  extras = extras or {}
  tensors = _ordered_tensors(config, "tokenizer", state)
  tensors.update(torch_pickle.torch_tree(dict(extras.get("loss_state", {}))))
  if sorted(extras.get("key_order", ())) == sorted(tensors):  # the order of the file read, where it applies
    tensors = {k: tensors[k] for k in extras["key_order"]}
  obj = {"epoch": extras.get("epoch", 0), "global_step": extras.get("global_step", 0),
         "pytorch-lightning_version": extras.get("pytorch-lightning_version", "1.0.8"), "callbacks": {},
         "optimizer_states": torch_pickle.torch_tree(extras.get("optimizer_states", [])),
         "lr_schedulers": torch_pickle.torch_tree(extras.get("lr_schedulers", [])), "state_dict": tensors}
  return torch_pickle.save(path, obj)


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


def locate(src: str) -> SeedFiles:
  """The seed files `src` names (None where absent; all None when it names none), without reading them:
    a `.pth`                 the transformer; its VQGAN in ./VQGAN or ../VQGAN (the Hugging Face layout)
    a `last.ckpt`/`.yaml`    the VQGAN; the other file beside it, or in ../ckpts and ../configs
    a directory              MaskGIT/*.pth (or *.pth in it, its VQGAN in ../VQGAN) and VQGAN/ (or its own
                             last.ckpt + model.yaml, or ckpts/ + configs/: the seed's --vqgan-folder layout).
  A folder holding several .pth is ambiguous: CheckpointFormatError naming them."""
  src = os.path.abspath(src)
  if os.path.isfile(src):
    if src.endswith(".pth"):
      return SeedFiles(src, *_vqgan_beside(os.path.dirname(src)))
    if not src.endswith((".ckpt", ".yaml")):
      return SeedFiles(None, None, None)
    parent = os.path.dirname(src)
    folder = os.path.dirname(parent) if os.path.basename(parent) in ("ckpts", "configs") else parent
    ckpt, yaml_file = _vqgan_in(folder)
    return SeedFiles(None, src if src.endswith(".ckpt") else ckpt, src if src.endswith(".yaml") else yaml_file)
  if not os.path.isdir(src):
    return SeedFiles(None, None, None)
  folder = os.path.join(src, "MaskGIT") if os.path.isdir(os.path.join(src, "MaskGIT")) else src
  pths = sorted(n for n in os.listdir(folder) if n.endswith(".pth") and os.path.isfile(os.path.join(folder, n)))
  if len(pths) > 1:
    raise CheckpointFormatError(f"{folder} holds several transformer checkpoints {pths}; pass the one to use (its "
                                f"VQGAN is found in ../VQGAN)")
  ckpt, yaml_file = _vqgan_in(src)
  if ckpt is None and yaml_file is None:  # only a folder of seed files looks beside itself, never any directory
    ckpt, yaml_file = (_vqgan_beside(folder) if pths else _vqgan_in(os.path.join(src, "VQGAN")))
  return SeedFiles(os.path.join(folder, pths[0]) if pths else None, ckpt, yaml_file)


def _vqgan_beside(directory: str) -> tuple[str | None, str | None]:
  """The VQGAN folder next to a transformer: DIR/VQGAN, else DIR/../VQGAN (MaskGIT/ and VQGAN/ are siblings)."""
  for candidate in (os.path.join(directory, "VQGAN"), os.path.join(os.path.dirname(directory), "VQGAN")):
    found = _vqgan_in(candidate)
    if found != (None, None):
      return found
  return None, None


def find_seed_files(src: str) -> SeedFiles:
  """`locate`, or a CheckpointFormatError when `src` does not exist or names no seed file."""
  if not os.path.exists(src):
    raise CheckpointFormatError(f"seed checkpoint {os.path.abspath(src)} does not exist")
  files = locate(src)
  if files == SeedFiles(None, None, None):
    raise CheckpointFormatError(f"{os.path.abspath(src)} holds no seed checkpoint: expected MaskGIT/*.pth and "
                                f"VQGAN/{{last.ckpt, model.yaml}} (Hugging Face layout) or configs/model.yaml + "
                                f"ckpts/last.ckpt (--vqgan-folder layout)")
  return files


class SeedCheckpoint(NamedTuple):
  config: object  # MaskGITConfig
  weights: dict  # {"transformer": {key: np.ndarray}, "tokenizer": {...}}, the parts present
  extras: dict  # {"transformer": {...}, "tokenizer": {...}}: what the writers put back
  files: SeedFiles


def read_seed(src: str, config=None) -> SeedCheckpoint:
  """Reads the seed files at `src` (find_seed_files) and checks them; one ConversionError lists every problem.

  Without `config`, it is inferred: the VQGAN from model.yaml, the transformer from the shapes with the seed's
  16 heads and dropout 0.1 (not in the shapes). With `config`, the fields the files imply differently are named.
  """
  files = find_seed_files(src)
  if files.vqgan_ckpt and not files.vqgan_yaml and config is None:
    raise ConversionError(f"{files.vqgan_ckpt}: its model.yaml is not beside it (nor in ../configs); the VQGAN's "
                          f"architecture needs it, or pass a config")
  weights, extras, sources, failures = {}, {}, {}, []
  for which, path, reader in (("transformer", files.transformer, read_transformer),
                              ("tokenizer", files.vqgan_ckpt, read_vqgan)):
    try:
      if path:
        weights[which], extras[which] = reader(path)
        sources[which] = path
    except ConversionError as e:  # every unreadable file is named in the one error below
      failures.append(e)
  model = None
  try:
    model = read_model_yaml(files.vqgan_yaml) if files.vqgan_yaml else None
  except ConversionError as e:
    failures.append(e)
  if config is None:
    raise_all(failures)
  try:
    config = _implied_and_checked(files, config, weights, extras, sources, model)
  except ConversionError as e:
    failures.append(e)
  raise_all(failures)
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
    raise ConversionError(f"{files.transformer}: no VQGAN model.yaml beside it (VQGAN/ or ../VQGAN/): the codebook "
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


LAYOUTS = ("huggingface", "vqgan_folder")


def write_files(root: str, config, weights: Mapping, extras: Mapping | None = None,
                layout: str = "huggingface") -> SeedFiles:
  """Writes the parts in `weights` ({part: seed state_dict}) as seed files under directory `root` (normally the
  temporary directory of `fileio.atomic_directory`); returns their paths:
    layout="huggingface":   MaskGIT/<name>, VQGAN/last.ckpt, VQGAN/model.yaml
    layout="vqgan_folder":  MaskGIT/<name>, VQGAN/ckpts/last.ckpt, VQGAN/configs/model.yaml, which the v1 loader
                            reads as `--vqgan-folder DST/VQGAN --vit-folder DST/MaskGIT/<name>`.
  <name> is extras["transformer"]["file_name"] (the name the .pth was read under), else current.pth."""
  if layout not in LAYOUTS:
    raise ConversionError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
  extras = extras or {}
  name = extras.get("transformer", {}).get("file_name", DEFAULT_TRANSFORMER_NAME)
  ckpt, yaml_file = (("last.ckpt", "model.yaml") if layout == "huggingface"
                     else (os.path.join("ckpts", "last.ckpt"), os.path.join("configs", "model.yaml")))
  files = SeedFiles(os.path.join(root, "MaskGIT", name) if "transformer" in weights else None,
                    os.path.join(root, "VQGAN", ckpt) if "tokenizer" in weights else None,
                    os.path.join(root, "VQGAN", yaml_file) if "tokenizer" in weights else None)
  if files.transformer:
    write_transformer(files.transformer, config, weights["transformer"], extras.get("transformer"))
  if files.vqgan_ckpt:
    write_vqgan(files.vqgan_ckpt, config, weights["tokenizer"], extras.get("tokenizer"))
    write_model_yaml(files.vqgan_yaml, config, extras.get("tokenizer"))
  return files


def write_seed(dst: str, config, weights: Mapping, extras: Mapping | None = None, overwrite: bool = False,
               layout: str = "huggingface") -> SeedFiles:
  """`write_files` into directory `dst`, checked first and atomic: nothing at `dst` changes on an error; an
  existing checkpoint directory is replaced only with `overwrite` (fileio.atomic_directory)."""
  from conversion import seed_config  # pylint: disable=import-outside-toplevel
  seed_config.check_files(config, weights, {w: "the weights to write" for w in weights})
  dst = os.path.abspath(dst)
  try:
    with fileio.atomic_directory(dst, overwrite=overwrite) as tmp:
      files = write_files(tmp, config, weights, extras, layout)
  except fileio.DestinationError as e:
    raise ConversionError(f"{e}; nothing was written") from None
  return SeedFiles(*(p.replace(tmp, dst, 1) if p else None for p in files))
