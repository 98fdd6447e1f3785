"""Regenerates a box of an image with a chosen class (MaskGIT inpainting) and blends it back in.

  python examples/inpaint.py [--checkpoint demo/checkpoint] [--image in.png | --index 3]
      [--box top,left,height,width] [--class 2] [--backend torch|jax] [--out runs/examples/inpaint.png]

The image is tokenized; the tokens under the box (grown by one latent cell, the official rule) are replaced by the
mask token, and the transformer fills them in, conditioned on the class, starting from sampler.edit_start_iter as
the official editing demo does. Tokens outside the box never change. The decoded image is blended into the
original with the official feathered mask. Writes: original | box | decoded | blended.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from a plain clone

import numpy as np  # pylint: disable=wrong-import-position

from maskgit_common import data, editing, images  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_pipeline(backend: str, checkpoint: str):
  if backend == "jax":
    from maskgit_jax.pipeline import MaskGIT  # pylint: disable=import-outside-toplevel
  else:
    from maskgit_torch.pipeline import MaskGIT  # pylint: disable=import-outside-toplevel
  return MaskGIT.from_checkpoint(checkpoint)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", default=os.path.join(REPO, "demo", "checkpoint"))
  parser.add_argument("--image", default=None, help="an RGB picture (resized to the model's image size)")
  parser.add_argument("--index", type=int, default=0, help="without --image: this image of the synthetic dataset")
  parser.add_argument("--box", default=None, help="top,left,height,width in pixels (default: the central half)")
  parser.add_argument("--class", dest="label", type=int, default=None,
                      help="class of the new content (default: 0 with --image, else the class after the image's)")
  parser.add_argument("--backend", default="torch", choices=("torch", "jax"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join(REPO, "runs", "examples", "inpaint.png"))
  args = parser.parse_args(argv)
  if not os.path.isdir(args.checkpoint):
    parser.error(f"--checkpoint {args.checkpoint} is not a checkpoint directory (config.json + weights)")

  model = load_pipeline(args.backend, args.checkpoint)
  config, size = model.config, model.config.image_size
  if args.image:
    image, label = images.load_image(args.image, size), args.label or 0
  else:
    classes = min(config.num_class, len(data.SYNTHETIC_CLASSES))  # the synthetic set has 10 classes
    image, source_label = data.synthetic_image(args.index, size, classes)
    label = (source_label + 1) % config.num_class if args.label is None else args.label
  top, left, height, width = ([int(v) for v in args.box.split(",")] if args.box
                              else (size // 4, size // 4, size // 2, size // 2))
  latent_mask = editing.latent_mask_from_bbox(config, top, left, height, width)
  print(f"box {top},{left},{height}x{width} px -> {int(latent_mask.sum())} of {latent_mask.size} tokens to "
        f"regenerate ({editing.edit_mode(latent_mask)}), class {label} ({model.class_names([label])[0]})")

  decoded, tokens = model.edit(image[None], latent_mask, [label], seed=args.seed)
  blended = editing.composite(image[None], decoded, latent_mask, config)

  original = model.encode(image[None])[0]
  keep = latent_mask < 0.5
  assert np.array_equal(tokens[0][keep], original[keep]), "a token outside the box changed"
  changed = int((tokens[0][~keep] != original[~keep]).sum())
  print(f"{args.backend}: every token outside the box kept; {changed} of {int((~keep).sum())} tokens inside "
        f"changed")

  f = config.downsample_factor
  box = np.repeat(np.repeat(latent_mask, f, axis=0), f, axis=1)[..., None] * np.ones(3, np.float32)
  scale = max(1, 96 // size)
  images.save_grid(np.stack([image, box, decoded[0], blended[0]]), args.out, scale=scale,
                   labels=["original", "box", "decoded", "blended"])
  print(f"original | box | decoded | blended: {args.out}")
  return {"tokens": tokens[0], "original_tokens": original, "latent_mask": latent_mask, "label": label,
          "blended": blended[0], "image": image, "out": args.out}


if __name__ == "__main__":
  main()
