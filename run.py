"""MaskGIT in JAX and PyTorch: one entry point. Flags are parsed here; each subcommand is one library call.

  python run.py sample   [--backend torch|jax] [--checkpoint DIR] [--classes 1,2,3] [--steps 8] [--seed 0] [--out F]
  python run.py edit     --image in.png (--mask m.png | --box top,left,height,width | --extend t,b,l,r) --class N
                         [--out edited.png] [--grid panels.png]
  python run.py train    --backend torch|jax --config PRESET_OR_JSON --workdir DIR [--set train.lr=3e-4 ...]
  python run.py convert  --src PATH --dst DIR --to torch|jax|seed [--config JSON]
  python run.py parity   --golden DIR --backend jax|torch|both --report FILE.json
  python run.py eval     [--checkpoint DIR] --ref STATS_OR_FOLDER [--num_samples N] [--inception_weights F] --out DIR

`--set section.field=value` overrides any config field (configs/schema.py). Precision flags are set here, never
inside model code (`--precision parity|fast`). A flag the subcommand does not use is refused, naming the
subcommands it belongs to (`USED_BY`). Any user error (maskgit_common.errors.UserError) is printed as one line.
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
flags.DEFINE_string("device", "auto", "cpu, cuda (gpu), cuda:N, tpu (JAX) or auto; a device this machine lacks is "
                    "an error, never a silent fall back to the CPU.")
flags.DEFINE_string("checkpoint", None, "Checkpoint directory (config.json + weights). Default: the demo model.")
flags.DEFINE_string("config", None, "Preset name (imagenet_256, imagenet_512, tiny, seed_imagenet_256, "
                    "seed_imagenet_512) or a config.json path.")
flags.DEFINE_multi_string("set", [], "Config override section.field=value; repeatable.")
flags.DEFINE_string("classes", None, "Comma-separated class labels to sample (default: every class once, up to 10).")
flags.DEFINE_integer("steps", None, "Decoding steps (default: the config's sampler.num_iter).")
flags.DEFINE_enum("decoder", None, ["official", "seed", "halton"], "sample/edit/eval: official (google-research/"
                  "maskgit), seed (valeoai MaskGIT-pytorch v1) or halton (Halton-MaskGIT); another decoder than the "
                  "checkpoint's takes its published settings (configs/samplers.py), --set sampler.* on top.")
flags.DEFINE_integer("top_k", None, "sample/edit/eval: draw each token among the k most likely (0 = all).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("out", None, "sample: the grid picture (default samples.png); edit: the edited image alone "
                    "(default edited.png); eval: the output folder (default eval). The suffix names the format "
                    "(.png, .jpg, ...).")
flags.DEFINE_string("grid", None, "edit: also write the four panels input | mask | regenerated | edited here.")
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
                    "<workdir>/tokenizer, else a random tokenizer with a warning); also the seed's VQGAN folder "
                    "(last.ckpt + model.yaml).")
flags.DEFINE_string("init", None, "train: start the transformer from this checkpoint when the workdir has none: any "
                    "transformer checkpoint, or the seed's MaskGIT .pth (its weights, AdamW state, iter and "
                    "global_epoch, as the seed's main.py --resume with --vit-folder). A workdir with checkpoints "
                    "resumes from its own.")
flags.DEFINE_bool("init_optimizer", True, "train --init: also load the file's AdamW state (--noinit_optimizer: a "
                  "fresh optimizer, as the seed's own --resume).")
flags.DEFINE_string("data", None, "train: an image folder (one subfolder per class, ImageNet layout) to train on: "
                    "--set data.dataset=folder --set data.data_dir=DIR.")
flags.DEFINE_string("src", None, "convert: source checkpoint (official msgpack pair/dir, our checkpoint dir, "
                    "a safetensors file, or valeoai MaskGIT-pytorch files: pretrained_maskgit/, a .pth, a VQGAN "
                    "folder).")
flags.DEFINE_string("dst", None, "convert: destination directory (must not exist or be empty).")
flags.DEFINE_enum("to", None, ["torch", "jax", "seed"], "convert: torch or jax (our checkpoint directories), or "
                  "seed (valeoai MaskGIT-pytorch's MaskGIT/*.pth + VQGAN/last.ckpt + model.yaml; seed models only).")
flags.DEFINE_bool("overwrite", False, "convert: replace an existing destination.")
flags.DEFINE_string("golden", None, "parity: a fixture directory (one case or a folder of cases).")
flags.DEFINE_string("report", None, "parity: where to write the JSON report (checked writable before the run).")
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



# Which subcommands use each flag. A flag given on the command line to a subcommand that does not use it is
# refused (it would be silently ignored), naming the subcommands it belongs to. Aliases count as their target.
MODEL_COMMANDS = ("sample", "edit", "eval")
USED_BY = {
    "backend": ("sample", "edit", "eval", "train", "parity"),
    "precision": ("sample", "edit", "eval", "parity"),
    "torch_compile": MODEL_COMMANDS,
    "device": ("sample", "edit", "eval", "train", "parity"),
    "checkpoint": MODEL_COMMANDS,
    "config": ("train", "convert"),
    "set": ("sample", "edit", "eval", "train", "convert"),
    "classes": ("sample",),
    "steps": MODEL_COMMANDS,
    "seed": MODEL_COMMANDS,
    "out": MODEL_COMMANDS,
    "grid": ("edit",),
    "workdir": ("train",),
    "stage": ("train",),
    "multihost": ("train",),
    "coordinator_address": ("train",),
    "num_processes": ("train",),
    "process_id": ("train",),
    "allow_config_change": ("train",),
    "ignore_corrupt_checkpoints": ("train",),
    "decoder": MODEL_COMMANDS,
    "top_k": MODEL_COMMANDS,
    "tokenizer": ("train",),
    "init": ("train",),
    "init_optimizer": ("train",),
    "data": ("train",),
    "src": ("convert",),
    "dst": ("convert",),
    "to": ("convert",),
    "overwrite": ("convert",),
    "golden": ("parity",),
    "report": ("parity",),
    "image": ("edit",),
    "mask": ("edit",),
    "box": ("edit",),
    "class": ("edit",),
    "extend": ("edit",),
    "save_steps": ("sample", "edit"),
    "num_samples": ("eval",),
    "ref": ("eval",),
    "samples": ("eval",),
    "inception_weights": ("eval",),
    "batch_size": ("eval",),
}
HINTS = {("precision", "train"): "train takes its precision from the config: --set train.precision=fast"}


class UsageError(UserError):
  """A wrong flag or path; printed without a traceback."""


def check_flags(command: str) -> None:
  """Refuses every flag given on the command line that `command` does not use (module comment above USED_BY)."""
  for name, commands in USED_BY.items():
    if command not in commands and FLAGS[name].present:
      hint = HINTS.get((name, command), f"it is a flag of {', '.join(commands)}; remove it")
      raise UsageError(f"{command} does not use --{name} ({hint})")


def set_precision(backend: str, precision: str) -> None:
  """Parity mode (docs/ARCHITECTURE.md, "Numerics contract"): float32 with the highest matmul precision and TF32 off."""
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


def resolve_device(backend: str):
  """--device through the backend's one device helper: DeviceError (one line) for a device this machine lacks."""
  require_backend(backend)
  if backend == "torch":
    from maskgit_torch import device
  else:
    from maskgit_jax import device
  return device.resolve(FLAGS.device)


def check_devices(command: str) -> None:
  """Before any slow work: --device must exist for every backend the subcommand runs."""
  if command == "train" and multihost_settings(model_backend()) is not None:
    return  # listing JAX's devices would start its backend, which jax.distributed.initialize must come before
  if command in ("sample", "edit", "eval", "train"):
    backends = {model_backend()} | ({"torch"} if command == "eval" else set())  # eval's extractor is torch
  elif command == "parity":
    backends = {"jax", "torch"} if (FLAGS.backend or "both") == "both" else {FLAGS.backend}
  else:
    return
  for backend in sorted(backends):
    resolve_device(backend)


def checkpoint_path() -> str:
  path = FLAGS.checkpoint or DEMO_CHECKPOINT
  if not os.path.exists(path):
    hint = "" if FLAGS.checkpoint else " (the embedded demo model is missing from this checkout)"
    raise UsageError(f"--checkpoint {path}: no such directory{hint}")
  return path


def load_pipeline(backend: str | None = None, precision: str | None = None, torch_compile: bool | None = None):
  """A MaskGIT pipeline of `backend` (default --backend) from --checkpoint, --set overrides applied."""
  backend = backend or model_backend()
  precision = precision or FLAGS.precision
  torch_compile = FLAGS.torch_compile if torch_compile is None else torch_compile
  if torch_compile and backend != "torch":
    raise UsageError("--torch_compile is for --backend torch (the JAX decode is always one jitted program)")
  require_backend(backend)
  set_precision(backend, precision)
  if backend == "torch":
    from maskgit_torch import pipeline
    extra = {"torch_compile": torch_compile}
  else:
    from maskgit_jax import pipeline
    extra = {}
  path = checkpoint_path()
  # A checkpoint without a transformer is refused by from_checkpoint with a CheckpointError naming it.
  model = pipeline.MaskGIT.from_checkpoint(path, overrides=FLAGS.set, device=FLAGS.device, precision=precision,
                                           **extra)
  from configs import samplers
  model.config = samplers.with_decoder(model.config, FLAGS.decoder, FLAGS.top_k, FLAGS.set)
  return model


def cmd_sample() -> None:
  from maskgit_common import generate, images
  out = FLAGS.out or "samples.png"
  images.check_output_paths({"out": out, "save_steps": FLAGS.save_steps})
  model = load_pipeline()
  labels = generate.parse_classes(FLAGS.classes, model.config.num_class)
  generate.sample(model, labels, steps=FLAGS.steps, seed=FLAGS.seed, out=out, save_steps=FLAGS.save_steps,
                  backend=model_backend())


def cmd_edit() -> None:
  from maskgit_common import editing, generate, images
  out = FLAGS.out or "edited.png"
  images.check_output_paths({"out": out, "grid": FLAGS.grid, "save_steps": FLAGS.save_steps},
                            {"image": FLAGS.image, "mask": FLAGS.mask})
  if FLAGS["class"].value is None:
    raise UsageError("edit needs --class N (the class of the regenerated region)")
  model = load_pipeline()
  inputs = editing.edit_inputs(model.config, FLAGS.image, mask=FLAGS.mask, box=FLAGS.box, extend=FLAGS.extend)
  if inputs.note:
    print(inputs.note)
  generate.edit(model, inputs, FLAGS["class"].value, steps=FLAGS.steps, seed=FLAGS.seed, out=out, grid=FLAGS.grid,
                save_steps=FLAGS.save_steps, image_path=FLAGS.image, backend=model_backend())


def cmd_eval() -> None:
  import evaluation
  from evaluation import references, report
  if not FLAGS.ref:
    raise UsageError("eval needs --ref: a folder or .npz of reference images, or reference statistics")
  out = FLAGS.out or "eval"
  # Every cheap check before the slow work (the extractor, the model, the reference features).
  report.check_request(None if FLAGS.samples else FLAGS.num_samples, FLAGS.batch_size, prefix="--")
  references.check_reference_path(FLAGS.ref)
  report.check_out_dir(out, "--out")
  if FLAGS.samples:
    if not os.path.exists(FLAGS.samples):
      raise UsageError(f"--samples {FLAGS.samples}: no such file or folder")
    unused = [f"--{n}" for n in ("checkpoint", "steps", "seed", "num_samples", "torch_compile", "set")
              if FLAGS[n].present]
    if unused:
      raise UsageError(f"eval --samples scores the given images; it does not use {', '.join(unused)}")
  require_backend("torch")  # the Inception feature extractor is a torch module, whichever backend samples
  from evaluation import inception
  extractor = inception.build_extractor(FLAGS.inception_weights, device=FLAGS.device, batch_size=FLAGS.batch_size)
  if FLAGS.samples:
    evaluation.evaluate_folder(FLAGS.samples, extractor, out, FLAGS.ref, batch_size=FLAGS.batch_size)
    return
  model = load_pipeline()
  # Images are decoded by one float32 eager torch pipeline for every backend (evaluation/sampler.py).
  exact_torch = model_backend() == "torch" and FLAGS.precision == "parity" and not FLAGS.torch_compile
  decoder = model if exact_torch else load_pipeline("torch", "parity", torch_compile=False)
  evaluation.evaluate_pipeline(model, decoder, checkpoint_path(), extractor, FLAGS.ref, out,
                               backend=model_backend(), num_samples=FLAGS.num_samples, batch_size=FLAGS.batch_size,
                               seed=FLAGS.seed, steps=FLAGS.steps, precision=FLAGS.precision,
                               torch_compile=FLAGS.torch_compile)


def cmd_parity() -> int:
  if not FLAGS.golden:
    raise UsageError("parity needs --golden DIR (a fixture case or a folder of cases)")
  from maskgit_common import fileio
  from parity_tests import runner
  if FLAGS.device not in runner.DEVICES:
    raise UsageError(f"parity --device {FLAGS.device}: use one of {', '.join(runner.DEVICES)}")
  if FLAGS.precision not in runner.PRECISIONS:
    raise UsageError(f"parity --precision {FLAGS.precision}: the parity tolerances are defined for "
                     f"{', '.join(runner.PRECISIONS)} only")
  if FLAGS.report:
    fileio.check_writable(FLAGS.report, "--report")
  report = runner.run_parity(FLAGS.golden, FLAGS.backend or "both", report_path=FLAGS.report, device=FLAGS.device,
                             precision=FLAGS.precision)
  return 0 if report["passed"] else 1


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


def train_device(backend: str) -> dict:
  """--device for the trainers: the torch ones take it; the JAX ones run on every local device of JAX's default
  backend, so a named device is refused rather than ignored."""
  if backend == "torch":
    return {"device": resolve_device("torch")}  # a torch.device: the tokenizer trainer does not take "auto"
  if FLAGS.device != "auto":
    raise UsageError(f"train --backend jax --device {FLAGS.device}: the JAX trainer runs data parallel on every "
                     "local device of JAX's default backend; leave --device at auto (JAX_PLATFORMS=cpu forces the "
                     "CPU)")
  return {}


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
  if (FLAGS.init or FLAGS["init_optimizer"].present) and FLAGS.stage == "tokenizer":
    raise UsageError("--init starts the transformer stage; --stage tokenizer trains a tokenizer from scratch")
  if FLAGS.init and not os.path.exists(FLAGS.init):
    raise UsageError(f"--init {FLAGS.init}: no such file or directory")
  if FLAGS.data and not os.path.isdir(FLAGS.data):
    raise UsageError(f"--data {FLAGS.data}: not a directory (give an image folder: one subfolder per class)")
  import configs
  data = ["data.dataset=folder", f"data.data_dir={FLAGS.data}"] if FLAGS.data else []
  config = configs.resolve(FLAGS.config or "tiny").with_overrides(data + list(FLAGS.set))
  backend = model_backend()
  require_backend(backend)
  multihost = multihost_settings(backend)
  if multihost is not None and FLAGS.stage != "transformer":
    raise UsageError("--multihost trains the transformer; train the tokenizer in one process (--stage tokenizer)")
  if config.train.precision == "fp16" and FLAGS.stage != "transformer":
    raise UsageError("train.precision=fp16 is for the transformer stage; the tokenizer trainer runs parity or fast "
                     "(--set train.precision=parity)")
  # fp16 keeps float32 matmuls exact where it is not float16 autocast (the seed's amp is off on a CPU).
  set_precision(backend, "fast" if config.train.precision == "fast" else "parity")
  if backend == "torch":
    from maskgit_torch import train, train_tokenizer
  else:
    from maskgit_jax import train, train_tokenizer
  if multihost is not None:
    train.initialize_distributed(*multihost)
  policy = {"allow_config_change": FLAGS.allow_config_change,
            "ignore_corrupt_checkpoints": FLAGS.ignore_corrupt_checkpoints}
  if FLAGS.stage in ("tokenizer", "all"):
    summary = train_tokenizer.train_tokenizer(config, FLAGS.workdir, **policy, **train_device(backend))
    print(f"tokenizer: {summary['step']} steps, exported to {summary['export_dir']}")
  if FLAGS.stage in ("transformer", "all"):
    summary = train.train(config, FLAGS.workdir, tokenizer=FLAGS.tokenizer, init=FLAGS.init,
                          init_optimizer=FLAGS.init_optimizer, **policy, **train_device(backend))
    print(f"transformer: {summary['step']} steps, exported to {summary['export']}")


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
    check_flags(command)
    check_devices(command)
    result = globals()[f"cmd_{command}"]()
  except UserError as e:  # bad input: its message names the flag, file, key or field; no traceback
    print(f"error: {e}", file=sys.stderr)
    return 2
  return int(result or 0)


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
