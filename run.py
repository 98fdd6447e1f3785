"""MaskGIT in JAX and PyTorch: one entry point.

  python run.py sample   [--backend torch|jax] [--checkpoint DIR] [--classes 1,2,3] [--steps 8] [--seed 0] [--out F]
  python run.py edit     --image in.png (--mask m.png | --box top,left,height,width) [--class N] [--out out.png]
  python run.py train    --backend torch|jax --config PRESET_OR_JSON --workdir DIR [--set train.lr=3e-4 ...]
  python run.py convert  --src PATH --dst DIR --to torch|jax [--config JSON]
  python run.py parity   --golden DIR --backend jax|torch|both --report FILE.json
  python run.py eval     [--checkpoint DIR] --ref STATS_OR_FOLDER [--num_samples N] [--inception_weights F] --out DIR

Every subcommand takes `--backend`; `--set section.field=value` overrides any config field (configs/schema.py).
Precision flags are set here, never inside model code (`--precision parity|fast`).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from maskgit_common.errors import UserError

REPO = os.path.dirname(os.path.abspath(__file__))
DEMO_CHECKPOINT = os.path.join(REPO, "demo", "checkpoint")
COMMANDS = ("sample", "edit", "train", "convert", "parity", "eval")

FLAGS = flags.FLAGS
flags.DEFINE_enum("backend", None, ["torch", "jax", "both"],
                  "Which framework runs the model (default torch; parity: both).")
flags.DEFINE_enum("precision", "parity", ["parity", "fast"],
                  "parity: float32, highest matmul precision, TF32 off. fast: bfloat16 compute.")
flags.DEFINE_bool("torch_compile", False, "sample/edit/eval --backend torch: torch.compile the transformer, the "
                  "sampler step and the tokenizer decoder (seconds of compilation per batch shape; worth it for "
                  "many batches). JAX always compiles its decode with jit.")
flags.DEFINE_string("device", "auto", "torch device (cpu, cuda, cuda:1) or 'auto'; JAX uses its default backend.")
flags.DEFINE_string("checkpoint", None, "Checkpoint directory (config.json + weights). Default: the demo model.")
flags.DEFINE_string("config", None, "Preset name (imagenet_256, imagenet_512, tiny) or a config.json path.")
flags.DEFINE_multi_string("set", [], "Config override section.field=value; repeatable.")
flags.DEFINE_string("classes", None, "Comma-separated class labels to sample (default: every class once, up to 10).")
flags.DEFINE_integer("steps", None, "Decoding steps (default: the config's sampler.num_iter).")
flags.DEFINE_enum("decoder", None, ["official", "seed", "halton"], "sample/edit/eval: official (google-research/"
                  "maskgit), seed (valeoai MaskGIT-pytorch v1) or halton (Halton-MaskGIT); another decoder than the "
                  "checkpoint's takes its published settings (configs/samplers.py), --set sampler.* on top.")
flags.DEFINE_integer("top_k", None, "sample/edit/eval: draw each token among the k most likely (0 = all).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("out", None, "Output PNG (sample/edit).")
flags.DEFINE_string("workdir", None, "Training directory (checkpoints, logs); an existing run resumes.")
flags.DEFINE_enum("stage", "transformer", ["tokenizer", "transformer", "all"],
                  "train: which model to train. tokenizer exports <workdir>/tokenizer, which the transformer stage "
                  "then uses; all = tokenizer, then transformer.")
flags.DEFINE_bool("multihost", False, "train --backend jax: join a multi-process run through jax.distributed "
                  "(run the same command on every host). Alone: jax finds the cluster (TPU pods, SLURM, Open MPI); "
                  "elsewhere give --coordinator_address, --num_processes, --process_id. Also on when "
                  "JAX_COORDINATOR_ADDRESS is set.")
flags.DEFINE_string("coordinator_address", None, "train --multihost: HOST:PORT where process 0 listens (default "
                    "$JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "train --multihost: number of processes (default $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "train --multihost: this process's id in [0, num_processes) (default "
                     "$JAX_PROCESS_ID).")
flags.DEFINE_bool("allow_config_change", False, "train: resume a checkpoint with settings that differ from the "
                  "ones it was trained with (each change is listed; without this flag a change is refused).")
flags.DEFINE_bool("ignore_corrupt_checkpoints", False, "train: when every checkpoint of the workdir is corrupt, set "
                  "them aside (<name>.corrupt) and start from step 0 instead of refusing.")
flags.DEFINE_string("tokenizer", None, "train: tokenizer checkpoint for the transformer stage (default "
                    "<workdir>/tokenizer, else a random tokenizer with a warning).")
flags.DEFINE_string("src", None, "convert: source checkpoint (official msgpack pair/dir, our checkpoint dir, "
                    "or safetensors).")
flags.DEFINE_string("dst", None, "convert: destination directory (must not exist or be empty).")
flags.DEFINE_enum("to", None, ["torch", "jax"], "convert: target backend layout.")
flags.DEFINE_bool("overwrite", False, "convert: replace an existing destination.")
flags.DEFINE_string("golden", None, "parity: a fixture directory (one case or a folder of cases).")
flags.DEFINE_string("report", None, "parity: where to write the JSON report.")
flags.DEFINE_string("image", None, "edit: input image.")
flags.DEFINE_string("mask", None, "edit: PNG mask, white = regenerate.")
flags.DEFINE_string("box", None, "edit: top,left,height,width in pixels of the region to regenerate.")
flags.DEFINE_integer("class", None, "edit: target class of the regenerated region.")
flags.DEFINE_string("extend", None, "edit (outpainting): top,bottom,left,right pixels to add around --image; the "
                    "new area is generated.")
flags.DEFINE_string("save_steps", None, "sample/edit: also write a grid of the intermediate decoding states here.")
flags.DEFINE_alias("save-steps", "save_steps")  # the spelling the issue and the seed's docs use
flags.DEFINE_integer("num_samples", 1000, "eval: how many class-balanced samples to generate.")
flags.DEFINE_string("ref", None, "eval: reference images (folder or .npz batch) or statistics (ADM / pytorch-fid / "
                    "ours) to compare with.")
flags.DEFINE_string("samples", None, "eval: score this folder / .npz of images instead of generating.")
flags.DEFINE_string("inception_weights", None, "eval: FID Inception weights pt_inception-2015-12-05-6726825d.pth "
                    "(hash-checked; see docs/EVAL.md). Without it a RANDOM-INIT extractor is used and the report "
                    "says so.")
flags.DEFINE_integer("batch_size", 50, "eval: generation and feature batch size.")
for _name in ("num_samples", "inception_weights", "batch_size"):  # dashed spellings, as in the issues
  flags.DEFINE_alias(_name.replace("_", "-"), _name)


class UsageError(UserError):
  """A wrong flag or path; printed without a traceback."""


def set_precision(backend: str, precision: str) -> None:
  """Parity mode (DESIGN §2): float32 with the highest matmul precision and TF32 off."""
  if backend == "jax":
    import jax
    jax.config.update("jax_default_matmul_precision", "highest" if precision == "parity" else "default")
  else:
    import torch
    torch.backends.cuda.matmul.allow_tf32 = precision != "parity"
    torch.backends.cudnn.allow_tf32 = precision != "parity"
    torch.set_float32_matmul_precision("highest" if precision == "parity" else "high")


def model_backend() -> str:
  """--backend for commands that run one model: torch (default) or jax."""
  backend = FLAGS.backend or "torch"
  if backend == "both":
    raise UsageError("--backend both is only for `parity`; choose torch or jax")
  return backend


def require_backend(backend: str) -> None:
  """A clear message, instead of an ImportError, when the chosen backend is not installed."""
  module = "torch" if backend == "torch" else "flax"
  try:
    __import__(module)
  except ImportError:
    extra = "torch] torch==2.13.0" if backend == "torch" else "jax]"
    raise UsageError(f"--backend {backend} needs {module}, which is not installed: "
                     f"pip install -e \".[{extra}\"") from None


def parse_classes(text: str | None, num_class: int) -> list[int]:
  if not text:
    return list(range(min(num_class, 10)))
  try:
    labels = [int(c) for c in text.split(",") if c.strip()]
  except ValueError:
    raise UsageError(f"--classes must be comma-separated integers, got {text!r}") from None
  bad = [c for c in labels if not 0 <= c < num_class]
  if bad or not labels:
    raise UsageError(f"--classes {text!r}: labels must lie in [0, {num_class}) for this model")
  return labels


def out_path(default: str, flag: str = "out") -> str:
  """--out (or --save_steps): a regular file to create or replace, in an existing or creatable directory."""
  path = getattr(FLAGS, flag) or default
  if os.path.exists(path) and not os.path.isfile(path):
    raise UsageError(f"--{flag} {path}: exists and is not a regular file; give a .png path")
  return path


def checkpoint_path() -> str:
  path = FLAGS.checkpoint or DEMO_CHECKPOINT
  if not os.path.isdir(path):
    hint = "" if FLAGS.checkpoint else " (the embedded demo model is missing from this checkout)"
    raise UsageError(f"--checkpoint {path}: no such directory{hint}")
  return path


def load_pipeline():
  """The backend's MaskGIT pipeline from --checkpoint, with --set overrides applied to its config."""
  backend = model_backend()
  if FLAGS.torch_compile and backend != "torch":
    raise UsageError("--torch_compile is for --backend torch (the JAX decode is always one jitted program)")
  require_backend(backend)
  set_precision(backend, FLAGS.precision)
  if backend == "torch":
    from maskgit_torch import pipeline
  else:
    from maskgit_jax import pipeline
  if backend == "jax":
    model = pipeline.MaskGIT.from_checkpoint(checkpoint_path(), overrides=FLAGS.set, device=FLAGS.device,
                                             precision=FLAGS.precision)
  else:
    model = pipeline.MaskGIT.from_checkpoint(checkpoint_path(), overrides=FLAGS.set, device=FLAGS.device,
                                             precision=FLAGS.precision, torch_compile=FLAGS.torch_compile)
  from configs import samplers
  model.config = samplers.with_decoder(model.config, FLAGS.decoder, FLAGS.top_k, FLAGS.set)
  return model


def cmd_sample() -> None:
  model = load_pipeline()
  config = model.config
  labels = parse_classes(FLAGS.classes, config.num_class)
  steps = FLAGS.steps or config.sampler.num_iter
  if steps < 1:
    raise UsageError(f"--steps must be >= 1, got {steps}")
  out = out_path("samples.png")
  if FLAGS.save_steps:
    out_path("", "save_steps")
  images, _, decoded = model.generate(labels, seed=FLAGS.seed, num_iter=steps, return_output=True)
  from maskgit_common.images import save_grid
  names = model.class_names(labels)
  save_grid(images, out, labels=names, scale=grid_scale(config))
  print(f"wrote {out}: {len(labels)} samples, classes {labels}, {steps} steps, backend {model_backend()}, "
        f"seed {FLAGS.seed}")
  if FLAGS.save_steps:
    save_decoding_steps(model, decoded, FLAGS.save_steps, names)


def cmd_convert() -> None:
  for name in ("src", "dst", "to"):
    if not getattr(FLAGS, name):
      raise UsageError(f"convert needs --{name}")
  import conversion
  config = None
  if FLAGS.config:
    import configs
    config = configs.resolve(FLAGS.config).with_overrides(FLAGS.set)
  out = conversion.convert(FLAGS.src, FLAGS.dst, to=FLAGS.to, config=config, overwrite=FLAGS.overwrite)
  print(out.summary(FLAGS.to))


def cmd_parity() -> int:
  if not FLAGS.golden:
    raise UsageError("parity needs --golden DIR (a fixture case or a folder of cases)")
  from parity_tests import runner
  backend = FLAGS.backend or "both"
  report = runner.run_parity(FLAGS.golden, backend, report_path=FLAGS.report, device=FLAGS.device,
                             precision=FLAGS.precision)
  return 0 if report["passed"] else 1


def multihost_settings(backend: str):
  """(coordinator_address, num_processes, process_id) for jax.distributed, each None when not given, or None when
  this is not a multi-host run. Flags first, then the JAX_* environment variables."""
  env = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
         "process_id": "JAX_PROCESS_ID"}
  values = {}
  for name, var in env.items():
    value = getattr(FLAGS, name)
    if value is None and os.environ.get(var):
      value = os.environ[var]
      if name != "coordinator_address":
        try:
          value = int(value)
        except ValueError:
          raise UsageError(f"{var}={value!r} must be an integer") from None
    values[name] = value
  if not (FLAGS.multihost or any(getattr(FLAGS, n) is not None for n in env) or os.environ.get(env[
      "coordinator_address"])):
    return None
  if backend != "jax":
    raise UsageError("--multihost and its flags are for --backend jax; torch multi-node training runs under torchrun")
  return values["coordinator_address"], values["num_processes"], values["process_id"]


def cmd_train() -> None:
  if not FLAGS.workdir:
    raise UsageError("train needs --workdir DIR (checkpoints and logs go there; an existing run resumes)")
  if FLAGS.tokenizer and FLAGS.stage == "tokenizer":
    raise UsageError("--tokenizer is the input of the transformer stage; --stage tokenizer trains one")
  if FLAGS.tokenizer and not os.path.exists(FLAGS.tokenizer):
    raise UsageError(f"--tokenizer {FLAGS.tokenizer}: no such file or directory")
  if FLAGS.stage != "transformer" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
    raise UsageError("tokenizer training runs in one process; start it without torchrun (--stage tokenizer)")
  import configs
  config = configs.resolve(FLAGS.config or "tiny").with_overrides(FLAGS.set)
  backend = model_backend()
  require_backend(backend)
  multihost = multihost_settings(backend)
  if multihost is not None and FLAGS.stage != "transformer":
    raise UsageError("--multihost trains the transformer; train the tokenizer in one process (--stage tokenizer)")
  set_precision(backend, config.train.precision)
  if backend == "torch":
    from maskgit_torch import train, train_tokenizer
  else:
    from maskgit_jax import train, train_tokenizer
  if multihost is not None:
    train.initialize_distributed(*multihost)
  policy = {"allow_config_change": FLAGS.allow_config_change,
            "ignore_corrupt_checkpoints": FLAGS.ignore_corrupt_checkpoints}
  if FLAGS.stage in ("tokenizer", "all"):
    summary = train_tokenizer.train_tokenizer(config, FLAGS.workdir, **policy)
    print(f"tokenizer: {summary['step']} steps, exported to {summary['export_dir']}")
  if FLAGS.stage in ("transformer", "all"):
    summary = train.train(config, FLAGS.workdir, tokenizer=FLAGS.tokenizer, **policy)
    print(f"transformer: {summary['step']} steps, exported to {summary['export']}")


def grid_scale(config) -> int:
  return max(1, 96 // config.image_size)


def save_decoding_steps(model, decoded, path: str, names) -> None:
  """One row per sample, one column per executed step: the step's predictions (every position decoded), with the
  positions masked again for the next step greyed out, as the official demo shows the process; the last column is
  the final image."""
  import numpy as np
  from maskgit_common.images import save_grid
  config = model.config
  side, f = config.latent_size, config.downsample_factor
  sampled = np.asarray(decoded.step_sampled_ids)[:, :, 1:]  # (n, B, L)
  masking = np.asarray(decoded.step_masking)[:, :, 1:].copy()
  masking[-1] = False  # the last step's samples are the output (the official loop still re-masks one, unused)
  n, b, _ = sampled.shape
  frames = model.decode_tokens(sampled.reshape(n * b, side, side)).reshape(n, b, config.image_size,
                                                                          config.image_size, 3)
  grey = np.kron(masking.reshape(n, b, side, side), np.ones((f, f)))[..., None] > 0
  frames = np.where(grey, 0.5, np.clip(frames, 0, 1))
  start = np.asarray(decoded.final_seqs).shape[1] - n  # edits start at sampler.edit_start_iter
  labels = [f"{names[i]} t={start + t + 1}" for i in range(b) for t in range(n)]
  save_grid(frames.transpose(1, 0, 2, 3, 4).reshape(b * n, *frames.shape[2:]), path, labels=labels, ncol=n,
            scale=grid_scale(config))
  print(f"wrote {path}: {n} decoding steps per sample (grey = masked again for the next step)")


def _ints(text: str, count: int, flag: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",")]
  except ValueError:
    values = []
  if len(values) != count or any(v < 0 for v in values):
    raise UsageError(f"--{flag} needs {count} comma-separated non-negative integers, got {text!r}")
  return values


def edit_inputs(config):
  """(image (H, H, 3), latent mask (h, h), description) from --image and --mask / --box / --extend."""
  import numpy as np
  from PIL import Image
  from maskgit_common import editing
  from maskgit_common.images import load_image
  if not FLAGS.image:
    raise UsageError("edit needs --image (a PNG/JPEG to edit)")
  if not os.path.isfile(FLAGS.image):
    raise UsageError(f"--image {FLAGS.image}: no such file")
  chosen = [name for name in ("mask", "box", "extend") if getattr(FLAGS, name)]
  if len(chosen) != 1:
    raise UsageError("edit needs exactly one of --mask m.png (white = regenerate), --box top,left,height,width "
                     f"(pixels of the resized image) or --extend top,bottom,left,right (outpainting); got {chosen}")
  size = config.image_size
  try:
    original = load_image(FLAGS.image)
  except ValueError as e:
    raise UsageError(str(e)) from None
  note = ""
  if FLAGS.extend:
    top, bottom, left, right = _ints(FLAGS.extend, 4, "extend")
    canvas, pixel_mask = editing.outpaint_canvas(original, top=top, bottom=bottom, left=left, right=right)
    image = np.asarray(Image.fromarray((canvas * 255).round().astype(np.uint8)).resize((size, size),
                                                                                      Image.BICUBIC)) / 255.0
    latent_mask = editing.latent_mask_from_pixels(pixel_mask, config)
    note = f"outpainting: canvas {canvas.shape[1]}x{canvas.shape[0]} resized to {size}x{size}"
  else:
    image = load_image(FLAGS.image, size)
    if original.shape[:2] != (size, size):
      note = f"resized {original.shape[1]}x{original.shape[0]} -> {size}x{size} (the model's image size)"
    if FLAGS.mask:
      try:
        latent_mask = editing.latent_mask_from_png(FLAGS.mask, config)
      except (OSError, ValueError) as e:
        raise UsageError(f"--mask {FLAGS.mask}: {e}") from None
    else:
      top, left, height, width = _ints(FLAGS.box, 4, "box")
      if top + height > size or left + width > size or not height or not width:
        raise UsageError(f"--box {FLAGS.box} must lie inside the {size}x{size} image and be non-empty")
      latent_mask = editing.latent_mask_from_bbox(config, top, left, height, width)
  return np.asarray(image, np.float32), latent_mask, note


def cmd_edit() -> None:
  import numpy as np
  from maskgit_common import editing
  from maskgit_common.images import save_grid
  model = load_pipeline()
  config = model.config
  if FLAGS["class"].value is None:
    raise UsageError(f"edit needs --class N (the class of the regenerated region, in [0, {config.num_class}))")
  label = parse_classes(str(FLAGS["class"].value), config.num_class)
  image, latent_mask, note = edit_inputs(config)
  if note:
    print(note)
  mode = editing.edit_mode(latent_mask)
  out = out_path("edited.png")
  if FLAGS.save_steps:
    out_path("", "save_steps")
  decoded = None
  if mode == "none":
    print("the mask marks no token: nothing to regenerate, the output is the input")
    edited = blended = image[None]
  elif mode == "generate":
    print("the mask marks every token: plain class-conditional generation")
    edited, _, decoded = model.generate(label, seed=FLAGS.seed, num_iter=FLAGS.steps, return_output=True)
    blended = edited
  else:
    edited, _, decoded = model.edit(image[None], latent_mask, label, seed=FLAGS.seed, num_iter=FLAGS.steps,
                                    return_output=True)
    blended = editing.composite(image[None], edited, latent_mask, config)
  f = config.downsample_factor
  mask_picture = np.repeat(np.kron(latent_mask, np.ones((f, f)))[None, ..., None], 3, axis=-1)
  save_grid(np.concatenate([image[None], mask_picture, np.clip(edited, 0, 1), np.clip(blended, 0, 1)]), out,
            labels=["input", "mask", "regenerated", "blended"], scale=grid_scale(config))
  print(f"wrote {out}: input | mask ({int(latent_mask.sum())}/{latent_mask.size} tokens) | regenerated | blended, "
        f"class {label[0]} ({model.class_names(label)[0]}), backend {model_backend()}")
  if FLAGS.save_steps and decoded is not None:
    save_decoding_steps(model, decoded, FLAGS.save_steps, model.class_names(label))


def eval_generate_fn(model, decoder, steps: int, noise_for=None):
  """generate_fn for maskgit_common.evaluate: tokens from `model` (either backend), images decoded from them by
  `decoder`, the torch pipeline, in float32.

  One decoder for both backends: the two tokenizers agree to ~5e-6, which still flips a few uint8 pixels in 1e5,
  so identical tokens would give slightly different Inception features. Decoding every backend's tokens with the
  same tokenizer makes samples with identical tokens score identically. `noise_for(labels, seed)` injects the
  draws (tests: the same recorded draws in both backends); by default each backend draws from `seed`.
  """
  def generate(labels, seed):
    labels = [int(l) for l in labels]
    noise = noise_for(labels, seed) if noise_for else None
    _, tokens = model.generate(labels, seed=seed, num_iter=steps, noise=noise)
    return decoder.decode_tokens(tokens), tokens
  return generate


def cmd_eval() -> None:
  if not FLAGS.ref:
    raise UsageError("eval needs --ref: a folder or .npz of reference images, or reference statistics")
  if not os.path.exists(FLAGS.ref):
    raise UsageError(f"--ref {FLAGS.ref}: no such file or directory")
  out = FLAGS.out or "eval"
  require_backend("torch")  # the Inception feature extractor is a torch module, whichever backend samples
  from maskgit_common import evaluate
  from maskgit_torch import inception
  extractor = inception.build_extractor(FLAGS.inception_weights, device=FLAGS.device, batch_size=FLAGS.batch_size)
  if FLAGS.samples:
    evaluate.evaluate_folder(FLAGS.samples, extractor, out, FLAGS.ref, batch_size=FLAGS.batch_size)
    return
  model = load_pipeline()
  steps = FLAGS.steps or model.config.sampler.num_iter
  decoder = model
  if model_backend() != "torch":
    from maskgit_torch import pipeline as torch_pipeline
    decoder = torch_pipeline.MaskGIT.from_checkpoint(checkpoint_path(), overrides=FLAGS.set, device=FLAGS.device)
  generate = eval_generate_fn(model, decoder, steps)
  settings = {"backend": model_backend(), "checkpoint": os.path.abspath(checkpoint_path()), "steps": steps,
              "precision": FLAGS.precision, "overrides": list(FLAGS.set), "decoder": "torch (fp32)"}
  if FLAGS.torch_compile:  # compiled kernels round differently: not the same samples as an eager run's
    settings["torch_compile"] = True
  evaluate.evaluate(generate, extractor, FLAGS.num_samples, model.config.num_class, out, FLAGS.ref,
                    batch_size=FLAGS.batch_size, seed=FLAGS.seed, settings=settings)


def main(argv) -> int:
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(__doc__)
    got = f"got {argv[1]!r}" if len(argv) > 1 else "none given"
    print(f"error: the first argument must be a subcommand, one of {', '.join(COMMANDS)} ({got})",
          file=sys.stderr)
    return 2
  if len(argv) > 2:
    print(f"error: unexpected arguments {argv[2:]}; options are flags like --out FILE", file=sys.stderr)
    return 2
  command = argv[1]
  logging.set_verbosity(logging.WARNING)
  try:
    result = globals()[f"cmd_{command}"]()
  except UserError as e:  # bad input: its message names the flag, file, key or field; no traceback
    print(f"error: {e}", file=sys.stderr)
    return 2
  return int(result or 0)


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
