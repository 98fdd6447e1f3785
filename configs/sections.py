"""The sections of the config schema (configs/schema.py holds the whole `MaskGITConfig`): tokenizer, transformer,
sampler, train and data, each a frozen dataclass whose `validate(prefix)` raises `ConfigError` naming the dotted
field and what is allowed; and the checks they share.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from configs import recipes
from maskgit_common.errors import UserError

# Official mask schedules (maskgit/libml/mask_schedule.py); "powX" accepts any positive exponent X.
OFFICIAL_SCHEDULES = ("uniform", "linear", "cosine", "log", "exp")


class ConfigError(UserError, ValueError):
  """A config value is invalid; the message names the dotted field."""


def _check(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"{field}: {message}")


def _check_int(value, field: str, lo: int | None = None, hi: int | None = None) -> None:
  _check(isinstance(value, int) and not isinstance(value, bool), field, f"must be an integer, got {value!r}")
  if lo is not None:
    _check(value >= lo, field, f"must be >= {lo}, got {value}")
  if hi is not None:
    _check(value <= hi, field, f"must be <= {hi}, got {value}")


def _check_float(value, field: str, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> None:
  _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), field,
         f"must be a finite number, got {value!r}")
  if lo is not None:
    if lo_open:
      _check(value > lo, field, f"must be > {lo}, got {value}")
    else:
      _check(value >= lo, field, f"must be >= {lo}, got {value}")
  if hi is not None:
    _check(value <= hi, field, f"must be <= {hi}, got {value}")


def _check_choice(value, field: str, choices: Sequence[str]) -> None:
  _check(value in choices, field, f"must be one of {list(choices)}, got {value!r}")


def check_schedule_name(value, field: str) -> None:
  """Schedules: the official ones, `powX` with X > 0, and curves named after the seed's shapes (`arccos`, `square`,
  `root`; the official decoder uses them its own way, SamplerConfig says how)."""
  if isinstance(value, str) and value.startswith("pow"):
    try:
      exponent = float(value[3:])
    except ValueError:
      exponent = -1.0
    _check(exponent > 0, field, f"'powX' needs a positive number X (e.g. 'pow2.5'), got {value!r}")
    return
  _check_choice(value, field, OFFICIAL_SCHEDULES + ("arccos", "square", "root"))


# Model families (docs/ARCHITECTURE.md, "Model families"): the default is the official MaskGIT in both sections.
TOKENIZER_ARCHS = ("maskgit", "taming")
TRANSFORMER_ARCHS = ("maskgit", "seed")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """The VQGAN tokenizer. `arch` picks the family:

  maskgit  the official tokenizer without attention (official `config.vqvae`), images in [0, 1].
  taming   taming-transformers' VQGAN (`taming.models.vqgan.VQModel`, as valeoai MaskGIT-pytorch ships it): attention
           blocks, strided-conv downsampling, images in [-1, 1]. Its model.yaml names map to ours: ch -> filters,
           ch_mult -> channel_multipliers, embed_dim -> embedding_dim, n_embed -> codebook_size; z_channels,
           resolution, attn_resolutions, dropout_rate, in_channels and out_channels (ddconfig) are taming-only
           (left at their defaults for maskgit). GroupNorm is 32 groups, eps 1e-6 in both families.
  """
  arch: str = "maskgit"
  filters: int = 128
  channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  embedding_dim: int = 256
  codebook_size: int = 1024
  norm_type: str = "GN"
  activation_fn: str = "swish"
  quantizer: str = "vq"
  conv_downsample: bool = False
  # GroupNorm: flax defaults (32 groups, eps 1e-6), which the official code uses.
  num_groups: int = 32
  norm_eps: float = 1e-6
  # Training losses (official vqgan_config).
  commitment_cost: float = 0.25
  entropy_loss_ratio: float = 0.1
  entropy_temperature: float = 0.01
  entropy_loss_type: str = "softmax"
  # taming only (ddconfig): latent channels before quant_conv, the resolution that attn_resolutions count from
  # (the 512px seed model keeps the 256px VQGAN's resolution: 256), where AttnBlocks go, ResnetBlock dropout.
  z_channels: int = 0
  resolution: int = 0
  attn_resolutions: tuple[int, ...] = ()
  dropout_rate: float = 0.0
  in_channels: int = 3
  out_channels: int = 3

  def validate(self, prefix: str = "tokenizer") -> None:
    _check_choice(self.arch, f"{prefix}.arch", TOKENIZER_ARCHS)
    _check_int(self.filters, f"{prefix}.filters", 1)
    _check(len(self.channel_multipliers) >= 1, f"{prefix}.channel_multipliers", "needs at least one level")
    for i, m in enumerate(self.channel_multipliers):
      _check_int(m, f"{prefix}.channel_multipliers[{i}]", 1)
    _check_int(self.num_res_blocks, f"{prefix}.num_res_blocks", 1)
    _check_int(self.embedding_dim, f"{prefix}.embedding_dim", 1)
    _check_int(self.codebook_size, f"{prefix}.codebook_size", 2)
    _check_choice(self.norm_type, f"{prefix}.norm_type", ("GN",))
    _check_choice(self.activation_fn, f"{prefix}.activation_fn", ("swish", "relu"))
    _check_choice(self.quantizer, f"{prefix}.quantizer", ("vq",))
    _check(self.conv_downsample is False, f"{prefix}.conv_downsample",
           "only False is implemented (maskgit: 2x2 average pooling, as the released models; taming always "
           "downsamples with its own zero-padded stride-2 conv)")
    _check_int(self.num_groups, f"{prefix}.num_groups", 1)
    for i, m in enumerate(self.channel_multipliers):
      _check(self.filters * m % self.num_groups == 0, f"{prefix}.filters",
             f"filters * channel_multipliers[{i}] = {self.filters * m} must be a multiple of "
             f"num_groups={self.num_groups} (GroupNorm)")
    _check_float(self.norm_eps, f"{prefix}.norm_eps", 0.0, lo_open=True)
    _check_float(self.commitment_cost, f"{prefix}.commitment_cost", 0.0)
    _check_float(self.entropy_loss_ratio, f"{prefix}.entropy_loss_ratio", 0.0)
    _check_float(self.entropy_temperature, f"{prefix}.entropy_temperature", 0.0, lo_open=True)
    _check_choice(self.entropy_loss_type, f"{prefix}.entropy_loss_type", ("softmax", "argmax"))
    for i, r in enumerate(self.attn_resolutions):
      _check_int(r, f"{prefix}.attn_resolutions[{i}]", 1)
    _check_float(self.dropout_rate, f"{prefix}.dropout_rate", 0.0)
    _check(self.dropout_rate < 1.0, f"{prefix}.dropout_rate", "must be < 1")
    _check_int(self.in_channels, f"{prefix}.in_channels", 1)
    _check_int(self.out_channels, f"{prefix}.out_channels", 1)
    if self.arch == "taming":
      _check_int(self.z_channels, f"{prefix}.z_channels", 1)
      _check_int(self.resolution, f"{prefix}.resolution", 1)
      # taming builds VectorQuantizer2(beta=0.25) and swish/GroupNorm everywhere; nothing else is implemented.
      _check(self.commitment_cost == 0.25, f"{prefix}.commitment_cost", "must be 0.25 for arch=taming (beta of "
             "taming's VectorQuantizer2)")
      _check(self.activation_fn == "swish", f"{prefix}.activation_fn", "must be 'swish' for arch=taming")
    else:
      defaults = {f.name: f.default for f in dataclasses.fields(self)}
      for name in ("z_channels", "resolution", "attn_resolutions", "dropout_rate", "in_channels", "out_channels"):
        default = defaults[name]
        _check(getattr(self, name) == default, f"{prefix}.{name}",
               f"applies to arch=taming only; leave it at {default!r} for arch={self.arch!r}")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.channel_multipliers) - 1)

  @property
  def level_resolutions(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """taming: (encoder, decoder) resolution of each level 0..n-1, the counts `attn_resolutions` is matched
    against, with taming's integer arithmetic: the encoder halves `resolution` at each downsample, the decoder
    starts from resolution // 2**(n-1) and doubles (so they differ when `resolution` is not a multiple of f)."""
    n = len(self.channel_multipliers)
    encoder = tuple(self.resolution // 2 ** lvl for lvl in range(n))
    decoder = tuple((self.resolution // 2 ** (n - 1)) * 2 ** (n - 1 - lvl) for lvl in range(n))
    return encoder, decoder


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """The bidirectional transformer. `arch` picks the family:

  maskgit  the official post-LN BERT (official `config.transformer`; `num_embeds` is the hidden size).
  seed     valeoai MaskGIT-pytorch v1 `MaskTransformer`: pre-LN blocks, exact GELU, first/last layer stacks, a
           per-position output bias, the class token last (maskgit_common/token_layout.py). Its names map to ours:
           hidden_dim -> num_embeds, depth -> num_layers, heads -> num_heads, mlp_dim -> intermediate_size,
           dropout -> dropout_rate; codebook_size is tokenizer.codebook_size, nclass is num_class.
           `layer_norm_eps` is the eps of first_layer/last_layer (1e-12); the blocks use torch's default 1e-5.
  `mask_token_id` is the official field (-1) for both: the seed's mask id K comes from the token layout.
  """
  arch: str = "maskgit"
  num_layers: int = 24
  num_embeds: int = 768
  num_heads: int = 16
  intermediate_size: int = 3072
  dropout_rate: float = 0.1
  mask_token_id: int = -1
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12  # BERT value, official LAYERNORM_EPSILON

  def validate(self, prefix: str = "transformer") -> None:
    _check_choice(self.arch, f"{prefix}.arch", TRANSFORMER_ARCHS)
    _check_int(self.num_layers, f"{prefix}.num_layers", 1)
    _check_int(self.num_embeds, f"{prefix}.num_embeds", 1)
    _check_int(self.num_heads, f"{prefix}.num_heads", 1)
    _check(self.num_embeds % self.num_heads == 0, f"{prefix}.num_heads",
           f"must divide num_embeds={self.num_embeds}, got {self.num_heads}")
    _check_int(self.intermediate_size, f"{prefix}.intermediate_size", 1)
    _check_float(self.dropout_rate, f"{prefix}.dropout_rate", 0.0, 1.0)
    _check(self.dropout_rate < 1.0, f"{prefix}.dropout_rate", "must be < 1")
    _check(self.mask_token_id == -1, f"{prefix}.mask_token_id",
           "must be -1 (the official id; it indexes the last embedding row)")
    _check_float(self.initializer_range, f"{prefix}.initializer_range", 0.0, lo_open=True)
    _check_float(self.layer_norm_eps, f"{prefix}.layer_norm_eps", 0.0, lo_open=True)

  @property
  def head_dim(self) -> int:
    return self.num_embeds // self.num_heads


DECODERS = ("official", "seed", "halton")
SEED_SCHEDULES = ("root", "linear", "square", "cosine", "arccos")  # the seed's adap_sche shapes


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Iterative parallel decoding: `decoder` picks the rules (official | seed | halton; configs/samplers.py says what
  each reproduces and which field it reads), the other fields their settings. Defaults are the official decoder
  (`parallel_decode.decode`); every decoder is a plan for one decode loop (maskgit_common/decode_plan.py).
  Fields for one decoder only must stay at their defaults with another (the error names them).
  With decoder=official, mask_schedule `arccos`, `square`, `root` are curves named after the seed's shapes used the
  official way (floor(N0 * gamma((t+1)/T)) re-masked): they do NOT give the seed's per-step counts (decoder=seed
  does). edit_start_iter None = the decoder's default (official: 2, as the official editing demo, at most T - 1;
  seed, halton: 0, as the seed's inpainting).
  """
  num_iter: int = 8
  start_iter: int = 0
  choice_temperature: float = 4.5  # official `sample_choice_temperature`; the seed's r_temp
  mask_schedule: str = "cosine"
  edit_start_iter: int | None = None
  guidance_scale: float = 0.0  # the seed's and Halton's w
  guidance_schedule: str = "constant"
  softmax_temperature: float = 1.0
  choice_temperature_schedule: str = "linear"
  randomize: str = "official"
  tokens_per_step: tuple[int, ...] = ()
  order: str = "confidence"
  decoder: str = "official"
  top_k: int = 0
  sm_temp: float = 1.0  # seed: logits * sm_temp; halton: the last step's scale (its sm_temp_max)
  random_init: bool = False  # seed
  sm_temp_min: float = 1.0  # halton
  temp_pow: float = 1.0  # halton
  temp_warmup: int = 0  # halton
  halton_randomize: bool = False  # halton
  halton_points: int = 10_000  # halton, and order='halton'; 0 = until every cell is covered

  # Finite is not enough: the decoder multiplies and divides float32 logits by these, and e.g. a guidance scale of
  # 1e308 overflows to inf/NaN and decodes garbage without an error. The bounds are far beyond any useful value
  # (official choice temperature 4.5, guidance scales of a few units, the tests' strongest 100).
  MAX_SCALE = 1e3

  def validate(self, prefix: str = "sampler") -> None:
    _check_int(self.num_iter, f"{prefix}.num_iter", 1)
    _check_int(self.start_iter, f"{prefix}.start_iter", 0, self.num_iter - 1)
    _check_float(self.choice_temperature, f"{prefix}.choice_temperature", 0.0, self.MAX_SCALE)
    check_schedule_name(self.mask_schedule, f"{prefix}.mask_schedule")
    if self.edit_start_iter is not None:
      _check_int(self.edit_start_iter, f"{prefix}.edit_start_iter", 0, self.num_iter - 1)
    _check_float(self.guidance_scale, f"{prefix}.guidance_scale", 0.0, self.MAX_SCALE)
    _check_choice(self.guidance_schedule, f"{prefix}.guidance_schedule", ("constant", "linear"))
    _check_float(self.softmax_temperature, f"{prefix}.softmax_temperature", 0.0, self.MAX_SCALE, lo_open=True)
    _check(self.softmax_temperature >= 1.0 / self.MAX_SCALE, f"{prefix}.softmax_temperature",
           f"must be >= {1.0 / self.MAX_SCALE} (a smaller one overflows the float32 logits), got "
           f"{self.softmax_temperature}")
    _check_choice(self.choice_temperature_schedule, f"{prefix}.choice_temperature_schedule", ("linear", "constant"))
    _check_choice(self.randomize, f"{prefix}.randomize", ("official", "linear", "warm_up", "random", "none"))
    _check(isinstance(self.tokens_per_step, tuple), f"{prefix}.tokens_per_step", "must be a list of integers")
    if self.tokens_per_step:
      _check(len(self.tokens_per_step) == self.num_iter, f"{prefix}.tokens_per_step",
             f"needs one count per step (num_iter={self.num_iter}), got {len(self.tokens_per_step)}")
      for i, n in enumerate(self.tokens_per_step):
        _check_int(n, f"{prefix}.tokens_per_step[{i}]", 1)
    _check_choice(self.order, f"{prefix}.order", ("confidence", "halton"))
    _check_choice(self.decoder, f"{prefix}.decoder", DECODERS)
    _check_int(self.top_k, f"{prefix}.top_k", 0)
    _check_float(self.sm_temp, f"{prefix}.sm_temp", 0.0, lo_open=True)
    _check(isinstance(self.random_init, bool), f"{prefix}.random_init", "must be true or false")
    _check_float(self.sm_temp_min, f"{prefix}.sm_temp_min", 0.0, lo_open=True)
    _check_float(self.temp_pow, f"{prefix}.temp_pow")
    _check_int(self.temp_warmup, f"{prefix}.temp_warmup", 0)
    _check(isinstance(self.halton_randomize, bool), f"{prefix}.halton_randomize", "must be true or false")
    _check_int(self.halton_points, f"{prefix}.halton_points", 0)
    self._validate_decoder(prefix)

  def _validate_decoder(self, prefix: str) -> None:
    """Fields of one decoder stay at their defaults with the others, so no setting is silently ignored."""
    own = {"official": ("guidance_schedule", "softmax_temperature", "choice_temperature_schedule", "order"),
           "seed": ("random_init",), "halton": ("sm_temp_min", "temp_pow", "temp_warmup", "halton_randomize")}
    own["seed+halton"] = ("sm_temp",)
    defaults = {f.name: f.default for f in dataclasses.fields(self)}
    for owners, names in own.items():
      if self.decoder in owners.split("+"):
        continue
      for name in names:
        _check(getattr(self, name) == defaults[name], f"{prefix}.{name}",
               f"applies to decoder={owners.replace('+', ' or ')} only; leave it at {defaults[name]!r} for "
               f"decoder={self.decoder!r}")
    if self.decoder == "seed":
      _check_choice(self.mask_schedule, f"{prefix}.mask_schedule", SEED_SCHEDULES)
      _check(self.randomize != "official", f"{prefix}.randomize", "decoder='seed' randomizes as the seed does: "
             "one of ['linear', 'warm_up', 'random', 'none'] (the seed's default is 'linear')")
      _check(self.num_iter >= 2, f"{prefix}.num_iter", "decoder='seed' needs at least 2 steps (it divides by T - 1)")
    if self.decoder == "halton":
      _check(not self.tokens_per_step, f"{prefix}.tokens_per_step", "decoder='halton' has its own cumulative "
             "count; leave tokens_per_step empty")

  @property
  def is_official(self) -> bool:
    """True when no option changes the official decoder."""
    return (self.decoder == "official" and self.guidance_scale == 0 and self.softmax_temperature == 1
            and self.choice_temperature_schedule == "linear" and self.randomize == "official"
            and not self.tokens_per_step and self.order == "confidence" and self.top_k == 0)

  @property
  def edit_start(self) -> int:
    """The step an edit starts at: edit_start_iter, or the decoder's default (see the class docstring)."""
    if self.edit_start_iter is not None:
      return self.edit_start_iter
    return min(2, self.num_iter - 1) if self.decoder == "official" else 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Training recipe; the tokenizer trainer reads the shared fields (batch size, lr, warmup, steps, seed, precision,
  cadence) and its own `tokenizer_*` fields.

  `recipe` names the recipe the recipe fields (configs/recipes.py) started from: "official" (the paper and the
  released maskgit_class_cond_config; the defaults below) or "seed" (valeoai MaskGIT-pytorch v1's train_one_epoch).
  Setting `train.recipe` through `with_overrides` / `--set` first sets every recipe field to that recipe's value;
  the other overrides then apply on top, so a user can mix (e.g. the seed's recipe with EMA). Every field keeps its
  own meaning whatever the recipe: the label only says where the values came from (`recipe_changes` lists the
  fields that differ from it).
  """
  recipe: str = "official"
  batch_size: int = 256  # examples per optimizer step, over all devices (split into grad_accum micro-batches)
  num_train_steps: int = 2_000_000
  lr: float = 1e-4
  beta1: float = 0.9
  beta2: float = 0.96
  weight_decay: float = 4.5e-2
  warmup_steps: int = 5000
  # Warmup: "official" lr * (step + 1) / warmup_steps (the first step moves); "seed" the seed's
  # adapt_learning_rate, lr * iter / (warmup_steps * grad_accum) with iter its micro-batch count (0 at step 0).
  warmup_rule: str = "official"
  lr_schedule: str = "constant"  # after warmup: "constant" or "cosine"
  grad_clip_norm: float = 1.0  # 0 disables clipping
  # Clipping: "optax" (clip_by_global_norm: g * max / norm only when norm > max) or "torch" (the seed's
  # clip_grad_norm_: every g * min(1, max / (norm + 1e-6))).
  clip_rule: str = "optax"
  label_smoothing: float = 0.1
  mask_schedule: str = "cosine"
  compute_loss_for_all: bool = False  # official default: loss on masked tokens only
  masking: str = "count"  # "count": exactly ceil(gamma(r) L) tokens (official); "bernoulli": each w.p. gamma(r) (seed)
  polyak_decay: float = 0.999  # EMA of the weights; 0 disables it
  class_dropout: float = 0.0  # probability of replacing the label by the null class (classifier-free guidance)
  # "parity" (float32, highest matmul precision), "fast" (bfloat16 compute, both backends) or "fp16" (torch on
  # CUDA: float16 autocast with a GradScaler, the seed's torch.cuda.amp; elsewhere float32, as the seed on a CPU).
  precision: str = "parity"
  seed: int = 42
  log_every_steps: int = 50
  checkpoint_every_steps: int = 10_000
  keep_checkpoints: int = 3
  grad_accum: int = 1  # micro-batches per optimizer step: the same update within float rounding, less memory
  # Tokenizer training (Adam): the official vqgan_config betas; codebook restarts every N steps (0: off).
  tokenizer_beta1: float = 0.0
  tokenizer_beta2: float = 0.99
  tokenizer_codebook_restart_every: int = 0

  def validate(self, prefix: str = "train") -> None:
    _check_choice(self.recipe, f"{prefix}.recipe", tuple(recipes.RECIPES))
    _check_int(self.batch_size, f"{prefix}.batch_size", 1)
    _check_int(self.grad_accum, f"{prefix}.grad_accum", 1)
    _check(self.batch_size % self.grad_accum == 0, f"{prefix}.grad_accum",
           f"must divide train.batch_size={self.batch_size}, got {self.grad_accum}")
    _check_int(self.num_train_steps, f"{prefix}.num_train_steps", 1)
    _check_float(self.lr, f"{prefix}.lr", 0.0, lo_open=True)
    _check_float(self.beta1, f"{prefix}.beta1", 0.0, 1.0)
    _check_float(self.beta2, f"{prefix}.beta2", 0.0, 1.0)
    _check_float(self.weight_decay, f"{prefix}.weight_decay", 0.0)
    _check_int(self.warmup_steps, f"{prefix}.warmup_steps", 0)
    _check_choice(self.warmup_rule, f"{prefix}.warmup_rule", ("official", "seed"))
    _check_choice(self.lr_schedule, f"{prefix}.lr_schedule", ("constant", "cosine"))
    _check_float(self.grad_clip_norm, f"{prefix}.grad_clip_norm", 0.0)
    _check_choice(self.clip_rule, f"{prefix}.clip_rule", ("optax", "torch"))
    _check_float(self.label_smoothing, f"{prefix}.label_smoothing", 0.0, 1.0)
    check_schedule_name(self.mask_schedule, f"{prefix}.mask_schedule")
    _check(isinstance(self.compute_loss_for_all, bool), f"{prefix}.compute_loss_for_all", "must be true or false")
    _check_choice(self.masking, f"{prefix}.masking", ("count", "bernoulli"))
    _check_float(self.polyak_decay, f"{prefix}.polyak_decay", 0.0, 1.0)
    _check_float(self.class_dropout, f"{prefix}.class_dropout", 0.0, 1.0)
    _check_choice(self.precision, f"{prefix}.precision", ("parity", "fast", "fp16"))
    _check_int(self.seed, f"{prefix}.seed", 0)
    _check_int(self.log_every_steps, f"{prefix}.log_every_steps", 1)
    _check_int(self.checkpoint_every_steps, f"{prefix}.checkpoint_every_steps", 1)
    _check_int(self.keep_checkpoints, f"{prefix}.keep_checkpoints", 1)
    _check_float(self.tokenizer_beta1, f"{prefix}.tokenizer_beta1", 0.0, 1.0)
    _check(self.tokenizer_beta1 < 1.0, f"{prefix}.tokenizer_beta1", "must be < 1")
    _check_float(self.tokenizer_beta2, f"{prefix}.tokenizer_beta2", 0.0, 1.0)
    _check(self.tokenizer_beta2 < 1.0, f"{prefix}.tokenizer_beta2", "must be < 1")
    _check_int(self.tokenizer_codebook_restart_every, f"{prefix}.tokenizer_codebook_restart_every", 0)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where training images come from."""
  dataset: str = "synthetic"  # "synthetic" (built in, offline), "folder" (class per subfolder), "tokens" (a cache)
  data_dir: str = ""
  token_cache: str = ""
  random_flip: bool = True
  # Random-crop augmentation: the token cache holds this many crops per image, evenly spaced along its longer side
  # after the shorter side is resized to image_size; each training example takes one at random (1: the centre crop).
  random_crops: int = 1
  num_workers: int = 0
  class_names: tuple[str, ...] = ()  # optional, for labelled sample grids; empty = numbers


  def validate(self, prefix: str = "data") -> None:
    _check_choice(self.dataset, f"{prefix}.dataset", ("synthetic", "folder", "tokens"))
    _check(isinstance(self.data_dir, str), f"{prefix}.data_dir", "must be a string")
    _check(isinstance(self.token_cache, str), f"{prefix}.token_cache", "must be a string")
    if self.dataset == "folder":
      _check(bool(self.data_dir), f"{prefix}.data_dir", "is required when data.dataset='folder'")
    if self.dataset == "tokens":
      _check(bool(self.token_cache), f"{prefix}.token_cache", "is required when data.dataset='tokens'")
    _check_int(self.random_crops, f"{prefix}.random_crops", 1)
    _check_int(self.num_workers, f"{prefix}.num_workers", 0)
    for i, name in enumerate(self.class_names):
      _check(isinstance(name, str), f"{prefix}.class_names[{i}]", f"must be a string, got {name!r}")
