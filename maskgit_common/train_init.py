"""Starting a transformer run from another checkpoint (`run.py train --init PATH`), and the seed's `.pth` export.

docs/ARCHITECTURE.md, "Training recipes". Framework-free: numpy in, numpy out; the trainers turn an `InitPoint`
into their own model and optimizer state (maskgit_torch/train.py, maskgit_jax/train.py).

`read_init(path, config, num_examples)` reads any transformer checkpoint `conversion.read` accepts, the seed's
`MaskGIT/*.pth` included (valeoai MaskGIT-pytorch v1, `Trainer.save_network`: iter, global_epoch, model_state_dict,
optimizer_state_dict, in the Checkpoint's `extras["transformer"]`). From it, where the file has them:
  - the weights (the seed's state_dict keys are our torch keys; canonical weights through the seed table);
  - its AdamW state: `state[i] = {step, exp_avg, exp_avg_sq}` for the i-th parameter of the seed's order
    (`conversion.tables.seed.state_dict_order`), as canonical (JAX-layout) moments keyed like the weights, so the
    JAX trainer builds optax's ScaleByAdamState from it and the torch trainer torch.optim.AdamW's state;
  - `iter` -> our step: iter counts the seed's micro-batches, so step = iter // train.grad_accum;
  - `global_epoch` -> our data position: the start of that epoch (global_epoch * num_examples), where the seed's
    `fit` restarts it.
The seed's own `--resume` loads the weights, iter and global_epoch but never the optimizer state (a fresh AdamW);
`load_optimizer=False` (run.py --noinit_optimizer) does the same.

`write_seed(path, ...)`: the inverse, a `.pth` the seed's `main.py --resume` (and `MaskTransformer` +
`torch.optim.AdamW`, strictly) loads: weights in the seed's key order, AdamW state with torch 2.x's param_group
keys, iter = step * grad_accum, global_epoch = position // num_examples. Written through the weights layer
(`conversion.write(..., format="seed")`, which imports torch inside to write the pickle).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from maskgit_common.errors import UserError

TRANSFORMER = "transformer"
# <workdir>/seed/MaskGIT/current.pth: the seed's main.py --vit-folder <workdir>/seed/MaskGIT/ --resume reads it.
SEED_EXPORT = os.path.join("seed", "MaskGIT", "current.pth")


def seed_export_path(workdir: str) -> str:
  return os.path.join(workdir, SEED_EXPORT)


def announce(config, backend: str, cuda: bool) -> None:
  """One line naming the run's recipe and every recipe field set otherwise; a note when fp16 runs float32 here."""
  from configs import recipes  # pylint: disable=import-outside-toplevel
  from maskgit_common.workdir import say  # pylint: disable=import-outside-toplevel
  changed = recipes.changes(config)
  say(f"train.recipe={config.train.recipe}" + ("; set otherwise: " + ", ".join(
      f"{key}={value!r} (recipe: {want!r})" for key, value, want in changed) if changed else ""))
  if config.train.precision == "fp16" and not (backend == "torch" and cuda):
    say(f"train.precision=fp16 is float16 autocast with loss scaling on CUDA torch only (the seed's torch.cuda.amp);"
        f" this {backend} run on {'CUDA' if cuda else 'this device'} computes in float32, as the seed does on a "
        f"CPU (train.precision=fast: bfloat16)")


class InitError(UserError, ValueError):
  """A --init checkpoint cannot start this run; the message names the file and why."""


@dataclasses.dataclass
class InitPoint:
  """What a run starts from: canonical transformer weights, optionally Adam moments, and where it stands."""
  path: str
  weights: dict  # {flax path: np.ndarray} (canonical)
  adam: dict | None  # {"count": int, "mu": {flax path: array}, "nu": {...}} (canonical layout) or None
  step: int  # optimizer steps already taken
  position: int  # data position (examples consumed)
  source: dict  # what the file said (iter, global_epoch) for messages and the checkpoint meta

  def describe(self) -> str:
    said = ", ".join(f"{k} {v}" for k, v in self.source.items())
    optimizer = "its AdamW state" if self.adam is not None else "a fresh optimizer"
    return (f"initialised from {self.path}" + (f" ({said})" if said else "") + f" with {optimizer}: starting at "
            f"step {self.step}, data position {self.position}")


def _read(path: str, config) -> tuple[dict, dict]:
  """(canonical transformer weights, the file's transformer extras: iter, global_epoch, optimizer_state_dict)."""
  import conversion  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    raise InitError(f"--init {path}: no such file or directory")
  checkpoint = conversion.read(path, config, parts=(TRANSFORMER,), require=(TRANSFORMER,))
  return checkpoint.parts[TRANSFORMER], dict((checkpoint.extras or {}).get(TRANSFORMER, {}))


def read_tokenizer(path: str, config) -> dict:
  """Canonical tokenizer weights from any checkpoint `conversion.read` accepts (the seed's VQGAN folder or
  last.ckpt too: `--tokenizer pretrained_maskgit/VQGAN`)."""
  import conversion  # pylint: disable=import-outside-toplevel
  return conversion.read(path, config, parts=("tokenizer",), require=("tokenizer",)).parts["tokenizer"]


def _adam_from_seed(path: str, config, optimizer_state: dict) -> dict:
  """The seed's AdamW state_dict -> {"count", "mu", "nu"} canonical, via the seed table's parameter order."""
  import conversion  # pylint: disable=import-outside-toplevel
  from conversion.tables import seed as seed_table  # pylint: disable=import-outside-toplevel
  order = seed_table.state_dict_order(config, TRANSFORMER)
  groups = optimizer_state.get("param_groups", [])
  indices = [i for g in groups for i in g.get("params", [])]
  state = optimizer_state.get("state", {})
  if indices != list(range(len(order))) or sorted(state) != indices:
    raise InitError(f"--init {path}: optimizer_state_dict holds {len(state)} parameter states over parameter "
                    f"indices {indices[:3]}...{indices[-2:]}; the seed's AdamW over this config's transformer has "
                    f"{len(order)} (one group, indices 0..{len(order) - 1})")
  steps = {float(np.asarray(state[i]["step"])) for i in indices}
  if len(steps) != 1:
    raise InitError(f"--init {path}: the AdamW step counts differ between parameters ({sorted(steps)[:4]})")
  moments = {}
  for name, key in (("mu", "exp_avg"), ("nu", "exp_avg_sq")):
    torch_state = {order[i]: np.asarray(state[i][key], np.float32) for i in indices}
    moments[name] = conversion.from_torch_layout(config, TRANSFORMER, torch_state, source=f"{path} ({key})")
  return {"count": int(steps.pop()), **moments}


def read_init(path: str, config, num_examples: int, load_optimizer: bool = True) -> InitPoint:
  """The InitPoint of `path` for this run (module docstring); InitError naming the file when it cannot serve."""
  weights, extras = _read(path, config)
  k = config.train.grad_accum
  it, epoch = int(extras.get("iter", 0)), int(extras.get("global_epoch", 0))
  adam = None
  if load_optimizer and extras.get("optimizer_state_dict") is not None:
    adam = _adam_from_seed(path, config, extras["optimizer_state_dict"])
  source = {k_: extras[k_] for k_ in ("iter", "global_epoch") if k_ in extras}
  return InitPoint(os.path.abspath(path), weights, adam, step=it // k, position=epoch * num_examples, source=source)


def seed_param_group(train, lr: float, num_params: int) -> dict:
  """torch.optim.AdamW's param_group as torch 2.x saves it, for the seed's optimizer (Trainer.get_optim)."""
  return {"lr": float(lr), "betas": (float(train.beta1), float(train.beta2)), "eps": 1e-08,
          "weight_decay": float(train.weight_decay), "amsgrad": False, "maximize": False, "foreach": None,
          "capturable": False, "differentiable": False, "fused": None, "decoupled_weight_decay": True,
          "params": list(range(num_params))}


def write_seed(path: str, config, weights: dict, adam: dict | None, step: int, position: int, num_examples: int,
               lr: float) -> str:
  """Writes the seed's `.pth` (module docstring) at `path` = DIR/MaskGIT/NAME from canonical weights and Adam
  moments, through the weights layer (`conversion.write(DIR, format="seed")`, DIR replaced atomically)."""
  import conversion  # pylint: disable=import-outside-toplevel
  from conversion.tables import seed as seed_table  # pylint: disable=import-outside-toplevel
  order = seed_table.state_dict_order(config, TRANSFORMER)
  extras = {"iter": int(step) * config.train.grad_accum, "global_epoch": int(position) // max(1, num_examples),
            "file_name": os.path.basename(path)}
  if adam is not None:
    mu, nu = (conversion.to_torch_layout(config, TRANSFORMER, dict(adam[m])) for m in ("mu", "nu"))
    count = np.asarray(float(adam["count"]), np.float32)
    extras["optimizer_state_dict"] = {
        "state": {i: {"step": count.copy(), "exp_avg": np.asarray(mu[key], np.float32),
                      "exp_avg_sq": np.asarray(nu[key], np.float32)} for i, key in enumerate(order)},
        "param_groups": [seed_param_group(config.train, lr, len(order))]}
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  conversion.write(root, config, {TRANSFORMER: weights}, format="seed", overwrite=True,
                   extras={TRANSFORMER: extras})
  return path
