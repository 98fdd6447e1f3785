"""Parity checks of the seed's sampler: `<backend>.sample.<variant>.tokens` and `<backend>.sample.<variant>.images`
for each `sample_<variant>.npz` of a seed case (parity_tests/data/SEED_FORMAT.md, "sample_<variant>.npz").

The backend's `decode_with_config` with `sampler.decoder=seed` (the record's call parameters, `seed_sampler`) runs
from the record's initial codes with the record's draws injected (`RecordedNoise(draws_categorical_gumbel,
draws_np_gumbel, draws_rand_like)`), on a `tokens_to_logits`: in the runner the case's seed transformer as the
backend loads it (`check_sample_tokens` / `check_sample_images` with a seed adapter), in tests also
`replay_logits` (the transformer outputs the default and inpaint variants record). Tokens: the executed step count,
every step's input codes and mask, raw predictions (`l_codes`), t after the batch clip, mask and codes after the
step, and the final codes before and after the clamp are identical. Images: the case's VQGAN `decode_code` of our
final tokens against the record's images, within 1e-5 (torch) / 1e-4 (JAX). Framework-free; each backend is
imported lazily.
"""

from __future__ import annotations

import json
import os

import numpy as np

from parity_tests.case import compare_all, result

IMAGE_TOLERANCE = {"torch": 1e-5, "jax": 1e-4}
RANDOMIZE = {"linear": "linear", "warm_up": "warm_up", "random": "random"}  # anything else: no randomization


def variants(case_dir: str) -> list[str]:
  """The `<variant>` of every sample_<variant>.npz in a case directory."""
  return sorted(f[len("sample_"):-len(".npz")] for f in os.listdir(case_dir)
                if f.startswith("sample_") and f.endswith(".npz"))


def load_record(case_dir: str, variant: str) -> dict:
  path = os.path.join(case_dir, f"sample_{variant}.npz")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing (the seed case lists sample_{variant}.npz)")
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def case_layout(case_dir: str, record: dict):
  """The seed token layout of a case (config.json `maskgit`: codebook_size, nclass; L from the record)."""
  from maskgit_common.token_layout import seed_layout  # pylint: disable=import-outside-toplevel
  with open(os.path.join(case_dir, "config.json")) as f:
    maskgit = json.load(f)["maskgit"]
  return seed_layout(int(maskgit["codebook_size"]), int(maskgit["nclass"]), int(record["init_mask"].shape[1]))


def seed_sampler(record: dict):
  """configs.SamplerConfig of the record's `MaskGIT.sample` call."""
  from configs import SamplerConfig  # pylint: disable=import-outside-toplevel
  return SamplerConfig(decoder="seed", num_iter=int(record["step"]), mask_schedule=str(record["sched_mode"]),
                       sm_temp=float(record["sm_temp"]), guidance_scale=float(record["w"]),
                       choice_temperature=float(record["r_temp"]),
                       randomize=RANDOMIZE.get(str(record["randomize"]), "none"))


def init_ids(record: dict, layout) -> np.ndarray:
  """(B, S) decoder input: the record's init_code (the mask id K where unknown) and the class token last."""
  codes = record["init_code"].reshape(len(record["labels"]), -1)
  return layout.sequence(codes, layout.class_tokens(record["labels"]))


def _backend(backend: str):
  import importlib  # pylint: disable=import-outside-toplevel
  return importlib.import_module(f"maskgit_{backend}.sampler")


def recorded_noise(backend: str, record: dict):
  return _backend(backend).RecordedNoise(record["draws_categorical_gumbel"], record["draws_np_gumbel"],
                                         record["draws_rand_like"])


def run_sample(backend: str, record: dict, tokens_to_logits, layout) -> dict:
  """Our seed decode of the record, as numpy arrays named like the record's keys."""
  sampler = _backend(backend)
  ids = init_ids(record, layout)
  if backend == "torch":
    import torch  # pylint: disable=import-outside-toplevel
    ids = torch.as_tensor(ids)
  out = sampler.decode_with_config(ids, tokens_to_logits, recorded_noise(backend, record), seed_sampler(record),
                                   layout=layout)
  get = lambda x: np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
  n, shape = int(get(out.steps_run)), record["init_code"].shape
  image = lambda x: get(out.image(x))[:n]
  final = image(out.step_state_after)[-1].reshape(shape) if n else record["init_code"]
  return {"n_steps_run": np.asarray(n), "step_code_in": image(out.step_input_ids).reshape((n,) + shape),
          "step_mask_in": image(out.step_unknown).astype(np.float32), "step_pred_code": image(out.step_predictions),
          "step_t": get(out.step_count)[:n, 0], "step_mask_out": image(out.step_masking).astype(np.float32),
          "step_code_out": image(out.step_state_after).reshape((n,) + shape), "final_code": final,
          "final_code_clamped": get(out.tokens).reshape(shape)}


def check_tokens(ours: dict, record: dict) -> dict:
  """`<backend>.sample.<variant>.tokens`: the trajectory identical at every step (module docstring)."""
  names = ["n_steps_run", "step_t", "step_code_in", "step_mask_in", "step_pred_code", "step_mask_out",
           "step_code_out", "final_code", "final_code_clamped"]
  passed, diff, detail = compare_all([(k, ours[k], record[k]) for k in names], 0)
  return result(passed, diff, 0, f"recorded draws, {int(record['n_steps_run'])} of {int(record['step'])} steps, "
                f"randomize {record['randomize']}, schedule {record['sched_mode']}: {detail}")


def check_images(images, record: dict, backend: str) -> dict:
  """`<backend>.sample.<variant>.images`: decode_code of our final tokens vs the record's images."""
  tolerance = IMAGE_TOLERANCE[backend]
  passed, diff, detail = compare_all([("images", images, record["images"])], tolerance)
  return result(passed, diff, tolerance, detail)


def check_variant(backend: str, case_dir: str, variant: str, tokens_to_logits, decode_code=None) -> dict:
  """{check name: report entry} for one sample_<variant>.npz: tokens, and images when `decode_code` (our final
  codes (B, h, h) int64 -> images like the record's (B, 3, H, H)) is given."""
  record = load_record(case_dir, variant)
  ours = run_sample(backend, record, tokens_to_logits, case_layout(case_dir, record))
  entries = {f"{backend}.sample.{variant}.tokens": check_tokens(ours, record)}
  if decode_code is not None:
    images = np.asarray(decode_code(ours["final_code_clamped"]))
    entries[f"{backend}.sample.{variant}.images"] = check_images(images, record, backend)
  return entries


def _sampled(b, case, variant: str):
  """(record, our trajectory, our images) of one variant with the adapter's model, run once per adapter: the
  tokens and images checks share it. The whole decode runs on the fixture's torch thread count (its logits then
  round exactly as the seed's; seed_torch.reference_threads)."""
  cache = b.__dict__.setdefault("_sampled", {})
  stat = os.stat(case.file(f"sample_{variant}.npz"))
  key = (case.path, variant, stat.st_size, stat.st_mtime_ns)  # a changed record is run again
  if key not in cache:
    record = case.npz(f"sample_{variant}.npz")
    with b.reference_threads():
      ours = run_sample(b.name, record, b.tokens_to_logits, case_layout(case.path, record))
      images = np.asarray(b.decode_code(ours["final_code_clamped"]))
    cache[key] = record, ours, images
  return cache[key]


def check_sample_tokens(b, case, variant: str) -> dict:
  """`<backend>.sample.<variant>.tokens` with the case's seed transformer (adapter `b`: seed_torch / seed_jax)."""
  record, ours, _ = _sampled(b, case, variant)
  return check_tokens(ours, record)


def check_sample_images(b, case, variant: str) -> dict:
  """`<backend>.sample.<variant>.images`: the case's VQGAN decoding our final tokens."""
  record, _, images = _sampled(b, case, variant)
  return check_images(images, record, b.name)


def replay_logits(backend: str, record: dict, layout):
  """tokens_to_logits giving the recorded transformer outputs (variants with step_logits_cond/uncond: default,
  inpaint): the step is the one whose recorded input codes equal the conditional rows' codes (NaN logits if none
  does, so a wrong input cannot pass); jittable in JAX."""
  if "step_logits_cond" not in record:
    raise KeyError("replay_logits: this record has no step_logits_cond (only default and inpaint do)")
  n, b = record["step_code_in"].shape[:2]
  inputs = record["step_code_in"].reshape(n, b, -1)
  cond = record["step_logits_cond"]
  logits = np.concatenate([cond, record["step_logits_uncond"]], axis=1) if "step_logits_uncond" in record else cond
  image = layout.image_slice()
  if backend == "torch":
    import torch  # pylint: disable=import-outside-toplevel
    inputs_t, logits_t = torch.as_tensor(inputs), torch.as_tensor(logits)

    def torch_fn(ids):
      match = (ids[None, :b, image] == inputs_t.to(ids.device)).flatten(1).all(-1)
      out = logits_t.to(ids.device)[match.int().argmax()][:len(ids)]
      return out if bool(match.any()) else torch.full_like(out, float("nan"))
    return torch_fn
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  inputs_j, logits_j = jnp.asarray(inputs), jnp.asarray(logits)

  def jax_fn(ids):
    match = jnp.all((ids[None, :b, image] == inputs_j).reshape(n, -1), axis=-1)
    out = logits_j[jnp.argmax(match)][:ids.shape[0]]
    return jnp.where(jnp.any(match), out, jnp.nan)
  return jax_fn
