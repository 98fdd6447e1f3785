"""MaskGIT in JAX and PyTorch: one entry point.

  python run.py sample   [--backend torch|jax] [--checkpoint DIR] [--classes 1,2,3] [--steps 8] [--seed 0] [--out F]
  python run.py edit     --image in.png (--mask m.png | --box top,left,height,width) [--class N] [--out out.png]
  python run.py train    --backend torch|jax --config PRESET_OR_JSON --workdir DIR [--set train.lr=3e-4 ...]
  python run.py convert  --src PATH --dst DIR --to torch|jax [--config JSON]
  python run.py parity   --golden DIR --backend jax|torch|both --report FILE.json
  python run.py eval     (not implemented yet)

Every subcommand takes `--backend`; `--set section.field=value` overrides any config field (configs/schema.py).
Precision flags are set here, never inside model code (`--precision parity|fast`).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

REPO = os.path.dirname(os.path.abspath(__file__))
DEMO_CHECKPOINT = os.path.join(REPO, "demo", "checkpoint")
COMMANDS = ("sample", "edit", "train", "convert", "parity", "eval")

FLAGS = flags.FLAGS
flags.DEFINE_enum("backend", None, ["torch", "jax", "both"],
                  "Which framework runs the model (default torch; parity: both).")
flags.DEFINE_enum("precision", "parity", ["parity", "fast"],
                  "parity: float32, highest matmul precision, TF32 off. fast: bfloat16 compute.")
flags.DEFINE_string("device", "auto", "torch device (cpu, cuda, cuda:1) or 'auto'; JAX uses its default backend.")
flags.DEFINE_string("checkpoint", None, "Checkpoint directory (config.json + weights). Default: the demo model.")
flags.DEFINE_string("config", None, "Preset name (imagenet_256, imagenet_512, tiny) or a config.json path.")
flags.DEFINE_multi_string("set", [], "Config override section.field=value; repeatable.")
flags.DEFINE_string("classes", None, "Comma-separated class labels to sample (default: every class once, up to 8).")
flags.DEFINE_integer("steps", None, "Decoding steps (default: the config's sampler.num_iter).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("out", None, "Output PNG (sample/edit).")
flags.DEFINE_string("workdir", None, "Training directory (checkpoints, logs); an existing run resumes.")
flags.DEFINE_enum("stage", "transformer", ["tokenizer", "transformer", "all"],
                  "train: which model to train. tokenizer exports <workdir>/tokenizer, which the transformer stage "
                  "then uses; all = tokenizer, then transformer.")
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


class UsageError(Exception):
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
    return list(range(min(num_class, 8)))
  try:
    labels = [int(c) for c in text.split(",") if c.strip()]
  except ValueError:
    raise UsageError(f"--classes must be comma-separated integers, got {text!r}") from None
  bad = [c for c in labels if not 0 <= c < num_class]
  if bad or not labels:
    raise UsageError(f"--classes {text!r}: labels must lie in [0, {num_class}) for this model")
  return labels


def checkpoint_path() -> str:
  path = FLAGS.checkpoint or DEMO_CHECKPOINT
  if not os.path.isdir(path):
    hint = "" if FLAGS.checkpoint else " (the embedded demo model is missing from this checkout)"
    raise UsageError(f"--checkpoint {path}: no such directory{hint}")
  return path


def load_pipeline():
  """The backend's MaskGIT pipeline from --checkpoint, with --set overrides applied to its config."""
  backend = model_backend()
  require_backend(backend)
  set_precision(backend, FLAGS.precision)
  if backend == "torch":
    from maskgit_torch import pipeline
  else:
    from maskgit_jax import pipeline
  return pipeline.MaskGIT.from_checkpoint(checkpoint_path(), overrides=FLAGS.set, device=FLAGS.device,
                                          precision=FLAGS.precision)


def cmd_sample() -> None:
  model = load_pipeline()
  config = model.config
  labels = parse_classes(FLAGS.classes, config.num_class)
  steps = FLAGS.steps or config.sampler.num_iter
  if steps < 1:
    raise UsageError(f"--steps must be >= 1, got {steps}")
  images, _ = model.generate(labels, seed=FLAGS.seed, num_iter=steps)
  out = FLAGS.out or "samples.png"
  from maskgit_common.images import save_grid
  names = model.class_names(labels)
  save_grid(images, out, labels=names, scale=max(1, 64 // config.image_size))
  print(f"wrote {out}: {len(labels)} samples, classes {labels}, {steps} steps, backend {model_backend()}, "
        f"seed {FLAGS.seed}")


def cmd_convert() -> None:
  for name in ("src", "dst", "to"):
    if not getattr(FLAGS, name):
      raise UsageError(f"convert needs --{name}")
  from conversion import convert  # the submodule
  config = None
  if FLAGS.config:
    import configs
    config = configs.resolve(FLAGS.config).with_overrides(FLAGS.set)
  out = convert.convert(FLAGS.src, FLAGS.dst, to=FLAGS.to, config=config, overwrite=FLAGS.overwrite)
  print(f"wrote {FLAGS.dst}: {FLAGS.to} checkpoint of {out.name} ({out.image_size}px, {out.num_class} classes)")


def cmd_parity() -> int:
  if not FLAGS.golden:
    raise UsageError("parity needs --golden DIR (a fixture case or a folder of cases)")
  from parity_tests import runner
  backend = FLAGS.backend or "both"
  report = runner.run_parity(FLAGS.golden, backend, report_path=FLAGS.report, device=FLAGS.device,
                             precision=FLAGS.precision)
  return 0 if report["passed"] else 1


def cmd_train() -> None:
  if not FLAGS.workdir:
    raise UsageError("train needs --workdir DIR (checkpoints and logs go there; an existing run resumes)")
  if FLAGS.tokenizer and FLAGS.stage == "tokenizer":
    raise UsageError("--tokenizer is the input of the transformer stage; --stage tokenizer trains one")
  import configs
  config = configs.resolve(FLAGS.config or "tiny").with_overrides(FLAGS.set)
  backend = model_backend()
  require_backend(backend)
  set_precision(backend, config.train.precision)
  if backend == "torch":
    from maskgit_torch import train, train_tokenizer
  else:
    from maskgit_jax import train, train_tokenizer
  if FLAGS.stage in ("tokenizer", "all"):
    summary = train_tokenizer.train_tokenizer(config, FLAGS.workdir)
    print(f"tokenizer: {summary['step']} steps, exported to {summary['export_dir']}")
  if FLAGS.stage in ("transformer", "all"):
    summary = train.train(config, FLAGS.workdir, tokenizer=FLAGS.tokenizer)
    print(f"transformer: {summary['step']} steps, exported to {summary['export']}")


def cmd_edit() -> None:
  raise UsageError("edit: not implemented yet (issue 6: inpainting/outpainting from a user image and mask)")


def cmd_eval() -> None:
  raise UsageError("eval: not implemented yet (issue 9: FID/IS/precision/recall)")


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
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # Known, user-facing errors carry a clear message of their own.
    known = _user_errors()
    if isinstance(e, known):
      print(f"error: {e}", file=sys.stderr)
      return 2
    raise
  return int(result or 0)


def _user_errors() -> tuple[type, ...]:
  """Error types whose message is meant for the user (bad file, bad config), printed without a traceback."""
  errors: list[type] = []
  from configs import ConfigError
  errors.append(ConfigError)
  for module, name in (("maskgit_common.msgpack_io", "CheckpointFormatError"),
                       ("conversion.convert", "ConversionError"),
                       ("maskgit_jax.checkpoint", "CheckpointError"),
                       ("maskgit_torch.checkpoint", "CheckpointError"),
                       ("maskgit_common.token_cache", "TokenCacheError"),
                       ("maskgit_common.training", "NonFiniteLossError")):
    if module in sys.modules:
      errors.append(getattr(sys.modules[module], name))
  return tuple(errors)


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
