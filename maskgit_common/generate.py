"""Sampling and editing into picture files, for a pipeline of either backend: what `run.py sample` and `run.py
edit` do, callable from a notebook the same way.

Framework-free: the pipeline comes in as an object with the interface of docs/API.md ("Pipelines"). Every check
that needs no model (output paths and formats, step counts, labels) runs before the decoder does, so a bad flag
costs nothing and never leaves a half-done result.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from maskgit_common import editing, images
from maskgit_common.errors import UserError

GREY = 0.5  # decoding-step frames: cells masked again for the next step


class GenerateError(UserError, ValueError):
  """A label or step count the model cannot use; the message names the flag."""


def parse_classes(text: str | None, num_class: int, flag: str = "classes") -> list[int]:
  """Labels from "1,2,3" (default: every class once, up to 10), each in [0, num_class)."""
  if text is None or not str(text).strip():
    return list(range(min(num_class, 10)))
  try:
    labels = [int(c) for c in str(text).split(",") if c.strip()]
  except ValueError:
    raise GenerateError(f"--{flag} must be comma-separated integers, got {text!r}") from None
  bad = [c for c in labels if not 0 <= c < num_class]
  if bad or not labels:
    raise GenerateError(f"--{flag} {text!r}: labels must lie in [0, {num_class}) for this model")
  return labels


def check_steps(steps: int | None, config, start_iter: int = 0) -> int:
  """The number of decoding steps: `steps`, or sampler.num_iter when None (0 is an error, not the default). The
  decoder runs steps start_iter .. steps - 1, so there must be at least one after `start_iter`."""
  steps = config.sampler.num_iter if steps is None else steps
  if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
    raise GenerateError(f"--steps must be a positive integer, got {steps!r}")
  if steps <= start_iter:
    raise GenerateError(f"--steps {steps}: an edit starts decoding at step sampler.edit_start_iter = {start_iter}, "
                        f"so it needs --steps > {start_iter} (or --set sampler.edit_start_iter=N with N < {steps})")
  return int(steps)


def grid_scale(config) -> int:
  """Small images are enlarged in grids so the labels above them fit."""
  return max(1, 96 // config.image_size)


def _host(x) -> np.ndarray:
  return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def decoding_frames(model, decoded) -> np.ndarray:
  """(B, n, H, W, 3): per sample and executed step, that step's prediction (every position decoded), grey where
  the position is masked again for the next step, as the official demo shows the process. The last frame is the
  final image (the official loop still re-masks a token after its last step; that mask is never used)."""
  config = model.config
  side, f = config.latent_size, config.downsample_factor
  # (n, B, L) at the image positions (the token layout's: the class token dropped). The seed's decoder can draw
  # the mask id K (maskgit_common/token_layout.py); it is shown as code K - 1, as the seed's final clamp decodes it.
  run = int(_host(decoded.steps_run))  # the seed's decoder stops once every token is known
  sampled = np.clip(decoded.image(_host(decoded.step_sampled_ids))[:run], 0, config.codebook_size - 1)
  masking = decoded.image(_host(decoded.step_masking))[:run].copy()
  masking[-1] = False
  n, b, _ = sampled.shape
  frames = model.decode_tokens(sampled.reshape(n * b, side, side)).reshape(n, b, *(config.image_size,) * 2, 3)
  grey = np.kron(masking.reshape(n, b, side, side), np.ones((f, f)))[..., None] > 0
  return np.where(grey, GREY, np.clip(frames, 0, 1)).transpose(1, 0, 2, 3, 4)


def save_decoding_steps(model, decoded, path: str, names: Sequence[str], log=print) -> str:
  """One row per sample, one column per executed step (`decoding_frames`), labelled with the step number."""
  frames = decoding_frames(model, decoded)
  b, n = frames.shape[:2]
  start = _host(decoded.final_seqs).shape[1] - n  # an edit starts at sampler.edit_start_iter
  labels = [f"{names[i]} t={start + t + 1}" for i in range(b) for t in range(n)]
  images.save_grid(frames.reshape(b * n, *frames.shape[2:]), path, labels=labels, ncol=n,
                   scale=grid_scale(model.config))
  log(f"wrote {path}: {n} decoding steps per sample (grey = masked again for the next step)")
  return path


def sample(model, labels: Sequence[int], *, steps: int | None = None, seed: int = 0, out: str = "samples.png",
           save_steps: str | None = None, backend: str = "", log=print) -> np.ndarray:
  """Class-conditional samples as a labelled grid at `out` (and the decoding steps at `save_steps`); the images."""
  images.check_output_paths({"out": out, "save_steps": save_steps})
  steps = check_steps(steps, model.config)
  labels = [int(l) for l in labels]
  generated, _, decoded = model.generate(labels, seed=seed, num_iter=steps, return_output=True)
  names = model.class_names(labels)
  images.save_grid(generated, out, labels=names, scale=grid_scale(model.config))
  log(f"wrote {out}: {len(labels)} samples, classes {labels}, {steps} steps, backend {backend or '?'}, seed {seed}")
  if save_steps:
    save_decoding_steps(model, decoded, save_steps, names, log)
  return generated


def edit(model, inputs: editing.EditInputs, label: int, *, steps: int | None = None, seed: int = 0,
         out: str = "edited.png", grid: str | None = None, save_steps: str | None = None, image_path: str = "",
         backend: str = "", log=print) -> np.ndarray:
  """Regenerates the masked tokens of `inputs.image` with class `label`; writes the edited image alone to `out`
  (the official blend of the regenerated pixels into the input) and, when asked, the four panels input | mask |
  regenerated | edited to `grid` and the decoding steps to `save_steps`. Returns the edited image."""
  config = model.config
  images.check_output_paths({"out": out, "grid": grid, "save_steps": save_steps}, {"image": image_path})
  (label,) = parse_classes(str(label), config.num_class, flag="class")
  mode, mask = editing.edit_mode(inputs.latent_mask), inputs.latent_mask
  image = inputs.image[None]
  decoded = None
  if mode == "none":
    log("the mask marks no token: nothing to regenerate, the output is the input")
    regenerated = edited = image
  elif mode == "generate":
    log("the mask marks every token: plain class-conditional generation")
    regenerated, _, decoded = model.generate([label], seed=seed, num_iter=check_steps(steps, config),
                                             return_output=True)
    edited = regenerated
  else:
    steps = check_steps(steps, config, start_iter=config.sampler.edit_start)  # the decoder's default when None
    regenerated, _, decoded = model.edit(image, mask, [label], seed=seed, num_iter=steps, return_output=True)
    edited = editing.composite(image, regenerated, mask, config)
  edited = np.clip(edited, 0, 1)
  name = model.class_names([label])[0]
  images.save_image(edited[0], out)
  log(f"wrote {out}: the edited image ({int(mask.sum())}/{mask.size} tokens regenerated), class {label} ({name}), "
      f"backend {backend or '?'}")
  if grid:
    panels = [image[0], editing.mask_panel(image[0], mask, config), np.clip(regenerated[0], 0, 1), edited[0]]
    images.save_grid(np.stack(panels), grid, labels=["input", "mask", "regenerated", "edited"],
                     scale=grid_scale(config))
    log(f"wrote {grid}: input | mask (red = regenerated) | regenerated | edited")
  if save_steps and decoded is None:
    log(f"nothing was decoded (the mask marks no token): no decoding steps written to {save_steps}")
  elif save_steps:
    save_decoding_steps(model, decoded, save_steps, [name], log)
  return edited[0]
