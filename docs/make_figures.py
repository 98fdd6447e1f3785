"""Regenerates the README pictures from the demo model and its training logs (CPU, a few minutes).

  python docs/make_figures.py                   # writes docs/images/*.png
  python docs/make_figures.py --only seed_recipe  # one of: demo, seed_recipe

Every picture is made by the same commands the README shows (`run.py sample / edit`), so the README cannot show
something the code does not do. The loss plot reads the training logs kept next to the demo checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # runnable from a plain clone

from maskgit_common import fileio  # pylint: disable=wrong-import-position

OUT = os.path.join(REPO, "docs", "images")
DEMO = os.path.join(REPO, "demo")


def run(*args: str) -> None:
  print("+ python run.py", " ".join(args), flush=True)
  subprocess.run([sys.executable, os.path.join(REPO, "run.py"), *args], check=True, cwd=REPO)


def read_losses(path: str, key: str) -> tuple[np.ndarray, np.ndarray]:
  steps, values = [], []
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      if key in record:
        steps.append(record["step"])
        values.append(record[key])
  return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def line_plot(curves, path: str, title: str, reference: tuple[str, float] | None = None,
              size=(560, 300)) -> None:
  """A minimal PIL line plot: curves = [(label, steps, values, colour)], an optional dashed reference level."""
  width, height = size
  left, right, top, bottom = 56, 16, 28, 36
  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  xs = np.concatenate([c[1] for c in curves])
  ys = np.concatenate([c[2] for c in curves] + ([np.asarray([reference[1]])] if reference else []))
  x0, x1, y0, y1 = xs.min(), xs.max(), 0.0, ys.max() * 1.05
  to_px = lambda x, y: (left + (x - x0) / max(x1 - x0, 1) * (width - left - right),
                        height - bottom - (y - y0) / max(y1 - y0, 1e-9) * (height - top - bottom))
  draw.rectangle([left, top, width - right, height - bottom], outline="black")
  for i in range(5):
    y = y0 + (y1 - y0) * i / 4
    _, py = to_px(x0, y)
    draw.text((4, py - 6), f"{y:.2f}", fill="black")
  for i in range(5):
    x = x0 + (x1 - x0) * i / 4
    px, _ = to_px(x, y0)
    draw.text((px - 12, height - bottom + 6), f"{int(x)}", fill="black")
  draw.text((left, 6), title, fill="black")
  if reference:
    label, level = reference
    _, py = to_px(x0, level)
    for px in range(left, width - right, 12):
      draw.line([(px, py), (px + 6, py)], fill=(120, 120, 120))
    draw.text((width - right - 7 * len(label), py - 14), label, fill=(90, 90, 90))
  for i, (label, steps, values, colour) in enumerate(curves):
    draw.line([to_px(x, y) for x, y in zip(steps, values)], fill=colour, width=2)
    draw.text((left + 8, height - bottom - 18 - 14 * i), label, fill=colour)  # legend at the bottom left
  fileio.atomic_write(path, lambda f: image.save(f, format="PNG"))
  print(f"wrote {path}")


# The seed recipe's proof of learning (tests/test_train_recipe.py runs the same settings): the tiny preset with the
# seed's transformer and recipe, on the demo tokenizer's codes of the synthetic images, in both backends.
SEED_RECIPE_SETS = ("train.recipe=seed", "transformer.arch=seed", "train.num_train_steps=300",
                    "train.checkpoint_every_steps=300", "train.warmup_steps=20", "train.lr=0.001",
                    "train.log_every_steps=10", "train.batch_size=32")


def seed_recipe() -> None:
  """Both backends train the tiny seed model with `run.py train`; their loss curves against ln(K + 1)."""
  checkpoint = os.path.join(DEMO, "checkpoint")
  with open(os.path.join(checkpoint, "config.json")) as f:
    codebook = json.load(f)["tokenizer"]["codebook_size"]
  curves = []
  with tempfile.TemporaryDirectory() as scratch:
    sets = [f"--set={s}" for s in SEED_RECIPE_SETS + (f"data.token_cache={os.path.join(scratch, 'tokens')}",)]
    # JAX first: it tokenizes the images (jitted, faster on a CPU); torch reads the same cache.
    for backend, colour in (("jax", (40, 90, 200)), ("torch", (200, 40, 40))):
      workdir = os.path.join(scratch, backend)
      run("train", "--backend", backend, "--config", "tiny", "--tokenizer", checkpoint, "--workdir", workdir, *sets)
      curves.append((f"{backend}: loss over all tokens, K + 1 classes, label smoothing 0.1",
                     *read_losses(os.path.join(workdir, "metrics.jsonl"), "loss"), colour))
  uniform = float(np.log(codebook + 1))
  line_plot(curves, os.path.join(OUT, "seed_recipe_loss.png"),
            "tiny seed-architecture model, train.recipe=seed, synthetic data (CPU)",
            reference=(f"uniform: ln {codebook + 1} = {uniform:.2f}", uniform))


def main() -> None:
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description="Regenerates the README pictures.")
  parser.add_argument("--only", choices=("demo", "seed_recipe"), default=None)
  only = parser.parse_args().only
  os.makedirs(OUT, exist_ok=True)
  if only in (None, "seed_recipe"):
    seed_recipe()
  if only == "seed_recipe":
    return
  checkpoint = os.path.join(DEMO, "checkpoint")
  run("sample", "--checkpoint", checkpoint, "--classes", "0,1,2,3,4,5,6,7,8,9", "--seed", "1",
      "--out", os.path.join(OUT, "demo_grid.png"))
  run("sample", "--checkpoint", checkpoint, "--classes", "0,5,7", "--seed", "2", "--out",
      os.path.join(OUT, "decode_steps_final.png"), "--save_steps", os.path.join(OUT, "decode_steps.png"))
  from maskgit_common.data import synthetic_image  # pylint: disable=import-outside-toplevel
  from maskgit_common.images import to_uint8  # pylint: disable=import-outside-toplevel
  source = os.path.join(OUT, "inpaint_input.png")
  image, _ = synthetic_image(1, 32)  # a square
  fileio.atomic_write(source, lambda f: Image.fromarray(to_uint8(image)).save(f, format="PNG"))
  with tempfile.TemporaryDirectory() as scratch:  # `--out` is the edited image alone; the README shows `--grid`
    run("edit", "--checkpoint", checkpoint, "--image", source, "--box", "8,8,16,16", "--class", "0", "--seed", "3",
        "--out", os.path.join(scratch, "inpaint.png"), "--grid", os.path.join(OUT, "inpaint.png"))
    run("edit", "--checkpoint", checkpoint, "--image", source, "--extend", "0,0,0,16", "--class", "1", "--seed",
        "3", "--out", os.path.join(scratch, "outpaint.png"), "--grid", os.path.join(OUT, "outpaint.png"))
  transformer = read_losses(os.path.join(DEMO, "transformer_metrics.jsonl"), "loss")
  tokenizer = read_losses(os.path.join(DEMO, "tokenizer_metrics.jsonl"), "reconstruction_loss")
  with open(os.path.join(checkpoint, "config.json")) as f:
    codebook = json.load(f)["tokenizer"]["codebook_size"]
  line_plot([("transformer loss (masked tokens, label smoothing 0.1)", *transformer, (200, 40, 40))],
            os.path.join(OUT, "transformer_loss.png"), "demo transformer training (JAX, CPU)",
            reference=(f"uniform: ln {codebook} = {np.log(codebook):.2f}", float(np.log(codebook))))
  line_plot([("tokenizer L2 reconstruction loss", *tokenizer, (40, 90, 200))],
            os.path.join(OUT, "tokenizer_loss.png"), "demo tokenizer training (torch, CPU)")


if __name__ == "__main__":
  main()
