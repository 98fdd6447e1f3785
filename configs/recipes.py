"""Training recipes: the value of every recipe field under `train.recipe=official` and `train.recipe=seed`.

A recipe is a set of dotted config values (docs/ARCHITECTURE.md, "Training recipes"). `train.recipe=NAME` in
`MaskGITConfig.with_overrides` (and `--set`) first writes all of NAME's values, then the other overrides apply on
top, so every difference can be chosen on its own. A config read from JSON keeps the values it stores; fields a
partial `train` section leaves out take its recipe's values.

| field | official (paper, maskgit_class_cond_config) | seed (valeoai MaskGIT-pytorch v1, Trainer/vit.py) |
|---|---|---|
| train.masking | count: exactly ceil(gamma(r) L) tokens | bernoulli: each token iff U < gamma(r) (get_mask_code) |
| train.mask_schedule | cosine | arccos (get_mask_code's default, the one train_one_epoch uses) |
| train.compute_loss_for_all | False: masked tokens only | True: CrossEntropyLoss over all B L tokens |
| train.class_dropout | 0.0 | 0.1 (--drop-label), to the null class K + 1 + C of the token layout |
| train.weight_decay | 0.045 | 1e-5 (Trainer.get_optim's AdamW) |
| train.warmup_steps | 5000 | 2500 (--warm_up) |
| train.warmup_rule | official: lr (step + 1) / W | seed: lr iter / (W grad_cum), 0 at iter 0 (adapt_learning_rate) |
| train.clip_rule | optax: clip_by_global_norm | torch: clip_grad_norm_(1.0), every g * min(1, 1 / (norm + 1e-6)) |
| train.polyak_decay | 0.999 | 0.0: no EMA |
| train.precision | parity | fp16: torch.cuda.amp autocast + GradScaler on CUDA torch (float32 elsewhere, as the seed) |
| data.random_crops | 1: the centre crop | 5 crops (the seed's RandomCrop after Resize; see DataConfig) |
Both: AdamW betas (0.9, 0.96) and eps 1e-8, lr 1e-4, label smoothing 0.1 over the token layout's classes (the seed:
K + 1, the mask id included), clip norm 1.0, a constant rate after warmup, random horizontal flips, gradient
accumulation (`train.grad_accum`, --grad-cum) over micro-batches.
"""

from __future__ import annotations

RECIPES: dict[str, dict[str, object]] = {
    "official": {
        "train.masking": "count", "train.mask_schedule": "cosine", "train.compute_loss_for_all": False,
        "train.class_dropout": 0.0, "train.weight_decay": 4.5e-2, "train.warmup_steps": 5000,
        "train.warmup_rule": "official", "train.clip_rule": "optax", "train.polyak_decay": 0.999,
        "train.precision": "parity", "data.random_crops": 1,
    },
    "seed": {
        "train.masking": "bernoulli", "train.mask_schedule": "arccos", "train.compute_loss_for_all": True,
        "train.class_dropout": 0.1, "train.weight_decay": 1e-5, "train.warmup_steps": 2500,
        "train.warmup_rule": "seed", "train.clip_rule": "torch", "train.polyak_decay": 0.0,
        "train.precision": "fp16", "data.random_crops": 5,
    },
}


def recipe_of(overrides) -> str | None:
  """The `train.recipe` an override list or mapping sets (the last one), or None."""
  items = overrides.items() if hasattr(overrides, "items") else overrides
  name = None
  for key, value in items:
    if key == "train.recipe":
      name = value
  return name


def apply(tree: dict, name: str, only_missing: dict | None = None) -> None:
  """Writes recipe `name`'s values into a config dict (`MaskGITConfig.to_dict()` shape) and sets train.recipe.

  `only_missing`: the dict as the user gave it; then only the fields it leaves out are written (partial JSON).
  Unknown names are left for the schema to reject (it names the choices).
  """
  values = RECIPES.get(name)
  tree.setdefault("train", {})["recipe"] = name
  if values is None:
    return
  for key, value in values.items():
    section, field = key.split(".")
    given = (only_missing or {}).get(section, {})
    if only_missing is None or field not in given:
      tree.setdefault(section, {})[field] = value


def changes(config) -> list[tuple[str, object, object]]:
  """(field, value, the recipe's value) for every recipe field of `config` that differs from its train.recipe."""
  out = []
  for key, want in RECIPES.get(config.train.recipe, {}).items():
    section, field = key.split(".")
    have = getattr(getattr(config, section), field)
    if have != want:
      out.append((key, have, want))
  return out


def fields(name: str, section: str) -> dict:
  """Recipe `name`'s values of one config section, as keyword arguments (presets build their sections with it)."""
  out = {k.split(".", 1)[1]: v for k, v in RECIPES[name].items() if k.startswith(section + ".")}
  return {**out, "recipe": name} if section == "train" else out
