"""Sampling speed, side by side in one run: the official JAX code, maskgit_jax and maskgit_torch.

  python benchmarks/sample.py                  # CPU: tiny preset; GPU: the ImageNet-256 preset
  python benchmarks/sample.py --preset imagenet_256 --batch_sizes 1,8,64 --steps 8,12 --guidance 0,2

All implementations decode with the same random weights (JAX init, converted to torch through `conversion`).
  official   the PyPI package `maskgit` (via parity_tests/oracle.py): parallel_decode.decode and the official
             tokenizer's decode_from_indices under ONE jax.jit, as its `p_generate_samples` runs them. It has no
             guidance and no bfloat16 switch: `parity` = highest matmul precision, `default` = as released (jax's
             default precision: TF32 on Ampere/Hopper GPUs, float32 on CPUs; timed on GPUs only).
  jax/torch  our pipelines as a user calls them, `MaskGIT.generate(labels, seed)` (decode + tokens -> image + copy
             to numpy), in `parity` (float32) and `fast` (bfloat16) precision.
  torch_compiled  the torch pipeline with `torch_compile=True` (transformer, sampler step and tokenizer decoder
             compiled by torch.compile; --torch_compile_mode for the transformer, e.g. max-autotune).
  hmorimitsu hmorimitsu/maskgit-torch (a PyTorch port of the official model) from the checkout --peer_hm names, on
             the same weights (benchmarks/peer_hm.py), parity (float32) only; no guidance. Its code is not part of
             this repository.
Per row: images/s and time per batch (best of --repeats after one warm-up/compile call), tokens -> image time
alone, peak memory (torch: max_memory_allocated on CUDA; JAX: XLA's buffer plan for the decode program, arguments +
outputs + temporaries, on any device), model FLOPs (the transformer's, analytic, plus the tokenizer decoder's
convolutions, counted by torch's FlopCounterMode) and the achieved rate against the device's peak (GPU: data sheet;
CPU: a float32 GEMM this run times, printed in the header with the CPU's ISA),
the speed ratio to the official code (same batch/steps, no guidance, same run), and token agreement: `= parity` is
the fraction of tokens a fast row shares with its own parity row (same seed), `= official` the fraction maskgit_jax
shares with the official code from the same PRNG key (torch draws from torch.Generator, so no such column).
Figures are printed, never asserted: speed targets live here, not in tests.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings

# JAX must not grab 75% of a GPU that torch shares.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from maskgit_common.decode_inputs import generation_ids  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", None, "Config preset (default: imagenet_256 on a GPU, tiny on CPU).")
flags.DEFINE_list("batch_sizes", ["1", "8", "64"], "Batch sizes.")
flags.DEFINE_list("steps", ["8", "12"], "Decoding steps.")
flags.DEFINE_list("guidance", ["0", "2"], "sampler.guidance_scale values (0 = off; the official code only at 0).")
flags.DEFINE_list("impls", ["official", "jax", "torch", "torch_compiled"], "Implementations to time (official, "
                  "jax, torch, torch_compiled).")
flags.DEFINE_list("precisions", ["parity", "fast"], "parity (float32) and/or fast (bfloat16; official: `default`).")
flags.DEFINE_integer("repeats", 5, "Timed repeats per row (the best is reported), after one warm-up/compile call.")
flags.DEFINE_integer("cpu_threads", 0, "CPU only: intra-op threads for torch and XLA alike (0 = their defaults).")
flags.DEFINE_string("peer_hm", None, "A checkout of hmorimitsu/maskgit-torch to time beside the others (parity only).")
flags.DEFINE_enum("omp_wait_policy", "default", ["default", "passive"], "torch's OpenMP threads between parallel "
                  "regions: default = what a user gets (spin a while, then sleep); passive = sleep at once, for a CPU "
                  "shared with other jobs, where spinning cost 10-100x (measured on the tiny preset, 2026-11-25) but "
                  "on a quiet CPU it slows torch's convolutions (ImageNet-256 decoder, batch 1: 1.17 vs 0.83 s).")
flags.DEFINE_string("torch_compile_mode", "default", "torch_compiled: torch.compile mode of the transformer "
                    "(default, max-autotune, reduce-overhead = CUDA graphs, ...).")

# Dense peaks (TFLOP/s) from the vendors' data sheets: fp32 without TF32 for parity, bf16 tensor cores for fast.
PEAK_TFLOPS = {"H200": {"parity": 67.0, "fast": 989.0, "default": 494.0},
               "H100": {"parity": 67.0, "fast": 989.0, "default": 494.0},
               "A100": {"parity": 19.5, "fast": 312.0, "default": 156.0}}


def model_flops(config, steps: int, guidance: bool) -> float:
  """Transformer forward FLOPs per image for a whole decode (2 FLOPs per multiply-add; 2 rows with guidance)."""
  tc, s, d = config.transformer, config.seq_len, config.transformer.num_embeds
  per_layer = 2 * s * (4 * d * d + 2 * d * tc.intermediate_size) + 2 * 2 * s * s * d  # projections, MLP, attention
  head = 2 * s * (d * d + d * config.vocab_size)  # MLM dense + tied output matmul
  return steps * (tc.num_layers * per_layer + head) * (2 if guidance else 1)


def decoder_flops(config) -> float:
  """Tokens -> image FLOPs per image: the tokenizer decoder's convolutions, as torch's FlopCounterMode counts them on
  the meta device (nothing is computed)."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
  from maskgit_torch.tokenizer import VQVAE  # pylint: disable=import-outside-toplevel
  with torch.device("meta"):
    model = VQVAE(config).eval()
    codes = torch.zeros((1, config.latent_size, config.latent_size), dtype=torch.long)
  with FlopCounterMode(display=False) as counter, torch.no_grad():
    model.decode_from_indices(codes)
  return float(counter.get_total_flops())


GEMM_N = 2048
GEMM = ("gemm", "float32")  # the reference "runner" timed among the others


def cpu_gemm():
  """A float32 GEMM this CPU reaches: (n, n) @ (n, n) with torch (MKL) on torch's threads, 2 n^3 FLOPs. Timed in
  the same interleaved rounds as the rows, so the reference rate sees the same load from other jobs."""
  import torch  # pylint: disable=import-outside-toplevel
  a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
  return lambda: torch.mm(a, b)


def gemm_tflops(seconds: float) -> float:
  return 2 * GEMM_N ** 3 / seconds / 1e12


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def device_name() -> str:
  import torch  # pylint: disable=import-outside-toplevel
  if torch.cuda.is_available():
    return torch.cuda.get_device_name(0)
  import platform  # pylint: disable=import-outside-toplevel
  return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def peak_tflops(device: str, precision: str) -> float | None:
  for name, peaks in PEAK_TFLOPS.items():
    if name in device:
      return peaks[precision]
  return None


def time_best(fns: dict, repeats: int) -> dict:
  """{name: best seconds of `repeats` calls}; the callables run interleaved, after one warm-up call each
  (compilation, autotuning, allocator growth), so that load from other jobs on a shared machine hits all of them
  alike; the minimum is the figure least disturbed by such load (as `timeit` recommends)."""
  times = {name: [] for name in fns}
  for r in range(repeats + 1):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      if r:
        times[name].append(time.perf_counter() - t0)
  return {name: min(t) for name, t in times.items()}


def set_cpu_threads(threads: int) -> None:
  """The same intra-op thread count for XLA (before jax starts) and torch."""
  if threads <= 0:
    return
  eigen = "true" if threads > 1 else "false"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen={eigen}"
                             f" intra_op_parallelism_threads={threads}").strip()
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)


def xla_bytes(jitted, *args) -> int | None:
  """Bytes XLA plans for one call of a jitted function: arguments + outputs + temporaries - aliased."""
  try:
    m = jitted.lower(*args).compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return None


def class_labels(config, batch: int) -> list[int]:
  return [i % config.num_class for i in range(batch)]


def with_guidance(config, guidance: float):
  return config.replace(sampler=dataclasses.replace(config.sampler, guidance_scale=float(guidance)))


class OfficialRunner:
  """The official decode + tokenizer decode under one jit (p_generate_samples without the pmap)."""

  def __init__(self, config, variables):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from parity_tests import oracle  # pylint: disable=import-outside-toplevel
    mods = oracle.import_official()
    model, tokenizer = oracle.official_transformer(config), oracle.official_tokenizer(config)
    self.jax, self.jnp, self.config, self.variables = jax, jnp, config, variables
    k, side = config.codebook_size, config.latent_size

    def decode_tokens(v, codes):
      return tokenizer.apply(v, codes, method=tokenizer.decode_from_indices, mutable=False)

    def generate(v, ids, key, num_iter):
      logits_fn = lambda seq: model.apply(v["transformer"], seq, deterministic=True)[..., :k]
      seqs = mods.parallel_decode.decode(ids, key, logits_fn, num_iter=num_iter,
                                         choice_temperature=config.sampler.choice_temperature,
                                         mask_token_id=config.mask_token_id)
      codes = seqs[:, -1, 1:].reshape(ids.shape[0], side, side)
      return codes, decode_tokens(v["tokenizer"], codes)
    self._generate = jax.jit(generate, static_argnums=(3,))
    self._decode_tokens = jax.jit(decode_tokens)

  def _args(self, batch, num_iter, seed):
    jnp = self.jnp
    labels = jnp.asarray(class_labels(self.config, batch), jnp.int32) + self.config.codebook_size
    ids = jnp.full((batch, self.config.seq_len), self.config.mask_token_id, jnp.int32).at[:, 0].set(labels)
    return self.variables, ids, self.jax.random.PRNGKey(seed), num_iter

  def generate(self, batch: int, num_iter: int, guidance: float, seed: int = 0) -> np.ndarray:
    del guidance
    codes, images = self._generate(*self._args(batch, num_iter, seed))
    np.asarray(images)  # the images reach the host, as our pipelines return them
    return np.asarray(codes)

  def decode_tokens(self, codes):
    np.asarray(self._decode_tokens(self.variables["tokenizer"], self.jnp.asarray(codes, self.jnp.int32)))

  def peak_memory(self, batch, num_iter, guidance):
    del guidance
    return xla_bytes(self._generate, *self._args(batch, num_iter, 0))

  def sync_check(self, batch, num_iter, guidance):
    args = self._args(batch, num_iter, 0)  # built outside the guard: making them is a (wanted) transfer
    return jax_transfer_check(lambda: self._generate(*args)[1].block_until_ready())


def jax_transfer_check(fn) -> str:
  """Runs fn once with implicit host<->device transfers forbidden: a per-step host sync inside would fail it."""
  import jax  # pylint: disable=import-outside-toplevel
  try:
    with jax.transfer_guard("disallow"):
      fn()
  except Exception as e:  # pylint: disable=broad-except
    return f"transfer: {str(e).splitlines()[0][:80]}"
  return "none"


class JaxRunner:
  """maskgit_jax.pipeline.MaskGIT (its whole decode is one jitted program; the tokenizer another)."""

  def __init__(self, config, variables, precision: str):
    from maskgit_jax import pipeline  # pylint: disable=import-outside-toplevel
    self.config = config
    self.model = pipeline.MaskGIT(config, variables["tokenizer"], variables["transformer"], precision=precision)

  def generate(self, batch: int, num_iter: int, guidance: float, seed: int = 0) -> np.ndarray:
    self.model.config = with_guidance(self.config, guidance)
    return self.model.generate(class_labels(self.config, batch), seed=seed, num_iter=num_iter)[1]

  def decode_tokens(self, codes):
    self.model.decode_tokens(codes)

  def _decode_args(self, batch, num_iter):
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    m = self.model
    ids = jnp.asarray(generation_ids(class_labels(self.config, batch), self.config), jnp.int32)
    return ids, m.make_noise(0), num_iter

  def peak_memory(self, batch, num_iter, guidance):
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    m = self.model
    ids, noise, _ = self._decode_args(batch, num_iter)
    side = self.config.latent_size
    decode = xla_bytes(m._decode_program, m.transformer_variables, ids,  # pylint: disable=protected-access
                       noise, num_iter, None, with_guidance(self.config, guidance))
    image = xla_bytes(m._decode, m.tokenizer_variables,  # pylint: disable=protected-access
                      jnp.zeros((batch, side, side), jnp.int32))
    return None if decode is None or image is None else max(decode, image)

  def sync_check(self, batch, num_iter, guidance):
    import jax  # pylint: disable=import-outside-toplevel
    self.model.config = with_guidance(self.config, guidance)
    args = self._decode_args(batch, num_iter)
    return jax_transfer_check(lambda: jax.block_until_ready(self.model.decode_sequences(*args).final_seqs))


def torch_modules(config, variables) -> dict:
  """{part: torch module in eval mode}: the JAX init, converted to torch as a user would."""
  import conversion  # pylint: disable=import-outside-toplevel
  from maskgit_torch import checkpoint  # pylint: disable=import-outside-toplevel
  modules = {}
  for w, v in variables.items():
    modules[w] = checkpoint.make_model(config, w).eval()
    flat = conversion.flatten({"params": numpy_tree(v["params"])})
    modules[w].load_state_dict(checkpoint.from_flat(config, w, flat))
  return modules


class TorchRunner:
  """maskgit_torch.pipeline.MaskGIT (autocast bf16 + SDPA in fast mode), eager or with torch_compile."""

  def __init__(self, config, variables, precision: str, compiled: bool = False):
    import torch  # pylint: disable=import-outside-toplevel
    from maskgit_torch import pipeline  # pylint: disable=import-outside-toplevel
    self.torch, self.config = torch, config
    modules = torch_modules(config, variables)
    self.model = pipeline.MaskGIT(config, modules["tokenizer"], modules["transformer"], precision=precision,
                                  torch_compile=FLAGS.torch_compile_mode if compiled else False)
    self.cuda = self.model.device.type == "cuda"

  def generate(self, batch: int, num_iter: int, guidance: float, seed: int = 0) -> np.ndarray:
    self.model.config = with_guidance(self.config, guidance)
    return self.model.generate(class_labels(self.config, batch), seed=seed, num_iter=num_iter)[1]

  def decode_tokens(self, codes):
    self.model.decode_tokens(codes)

  def peak_memory(self, batch, num_iter, guidance):
    if not self.cuda:
      return None
    self.torch.cuda.synchronize()
    self.torch.cuda.reset_peak_memory_stats()
    self.generate(batch, num_iter, guidance)
    return self.torch.cuda.max_memory_allocated()

  def sync_check(self, batch, num_iter, guidance):
    """Counts the host syncs CUDA reports during decode_sequences (the final copy to numpy excluded)."""
    if not self.cuda:
      return "n/a (CPU)"
    torch, m = self.torch, self.model
    m.config = with_guidance(self.config, guidance)
    ids = torch.as_tensor(generation_ids(class_labels(self.config, batch), self.config), device=m.device)
    noise = m.make_noise(0)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      torch.cuda.set_sync_debug_mode("warn")
      try:
        m.decode_sequences(ids, noise, num_iter)
      finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return f"{len(syncs)}" + (f" ({syncs[0][:60]})" if syncs else "")


def numpy_tree(tree):
  return {k: numpy_tree(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}


def make_runner(impl, precision, config, variables):
  if impl == "official":
    return OfficialRunner(config, variables)
  if impl == "jax":
    return JaxRunner(config, variables, precision)
  if impl == "hmorimitsu":
    from benchmarks import peer_hm  # pylint: disable=import-outside-toplevel
    modules = torch_modules(config, variables)
    return peer_hm.PeerRunner(FLAGS.peer_hm, config, modules["tokenizer"], modules["transformer"])
  return TorchRunner(config, variables, precision, compiled=impl == "torch_compiled")


def set_precision(precision: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_default_matmul_precision", "highest" if precision == "parity" else None)
  torch.backends.cuda.matmul.allow_tf32 = precision != "parity"
  torch.backends.cudnn.allow_tf32 = precision != "parity"


def fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


IMPLS = ("official", "jax", "torch", "torch_compiled", "hmorimitsu")


def print_header(preset, config, device, gemm) -> float:
  """The run's header lines (versions, load, the CPU's ISA and GEMM rate, the models' FLOPs); returns the
  tokenizer decoder's FLOPs per image."""
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from maskgit_torch import device as torch_device  # pylint: disable=import-outside-toplevel
  print(f"# sample benchmark {time.strftime('%Y-%m-%d %H:%M')}: preset {preset}, device {device}, jax "
        f"{jax.__version__} ({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY') or 'unset (spin, then sleep)'}; load average {os.getloadavg()}")
  if gemm is not None:
    print(f"# CPU: {torch_device.cpu_isa()}; flags {' '.join(sorted(torch_device.cpu_features()))}; `% peak` is of "
          f"a float32 GEMM ({GEMM_N}^3, torch, {torch.get_num_threads()} threads: "
          f"{1e3 * gemm_tflops(time_best({GEMM: gemm}, 5)[GEMM]):.1f} GFLOP/s now), timed again in each row group's "
          f"rounds (`# gemm` lines)")
  image_flops = decoder_flops(config)
  print(f"# transformer: {model_flops(config, 1, False) / 1e9:.4g} GFLOP per image per step (analytic); "
        f"{model_flops(config, 8, False) / 1e9:.4g} GFLOP per image at 8 steps without guidance; tokenizer decoder "
        f"{image_flops / 1e9:.4g} GFLOP per image (counted); TFLOP/s counts both")
  return image_flops


def row_group(runners, call, config, device, gemm, on_gpu, image_flops, batch, steps, guidance):
  """Times every runner (interleaved with the GEMM reference on a CPU) at one (batch, steps, guidance) and prints
  their rows; returns the GEMM rate of these rounds (TFLOP/s) or None."""
  # The official code and hmorimitsu's port have no classifier-free guidance.
  active = {n: r for n, r in runners.items() if not (n[0] in ("official", "hmorimitsu") and guidance)}
  gen = time_best({n: call(n, lambda r=r: r.generate(batch, steps, guidance)) for n, r in active.items()}
                  | ({GEMM: gemm} if gemm else {}), FLAGS.repeats)
  reference = gemm_tflops(gen.pop(GEMM)) if gemm else None
  tokens = {n: np.asarray(call(n, lambda r=r: r.generate(batch, steps, guidance, seed=1))()) for n, r in active.items()}
  dec = time_best({n: call(n, lambda r=r, n=n: r.decode_tokens(tokens[n])) for n, r in active.items()}, FLAGS.repeats)
  official = gen.get(("official", "parity"))
  for (impl, label), runner in active.items():
    seconds = gen[(impl, label)]
    parity = tokens.get((impl, "parity"))
    same_parity = (float((tokens[(impl, label)] == parity).mean())
                   if label != "parity" and impl != "official" and parity is not None else None)
    same_official = (float((tokens[(impl, label)] == tokens[("official", "parity")]).mean())
                     if impl == "jax" and ("official", "parity") in tokens else None)
    set_precision(label)
    mem = runner.peak_memory(batch, steps, guidance)
    achieved = (model_flops(config, steps, bool(guidance)) + image_flops) * batch / seconds / 1e12
    peak = peak_tflops(device, label) if on_gpu else reference
    ratio = official / seconds if official else None
    print(f"| {impl} | {label} | {batch} | {steps} | {guidance:g} | {batch / seconds:.2f} | "
          f"{1e3 * seconds:.2f} | {1e3 * dec[(impl, label)]:.2f} | {fmt(mem and mem / 2**20, '.1f')} | "
          f"{achieved:.4f} | {fmt(peak and 100 * achieved / peak, '.1f')} | {fmt(ratio, '.2f')} | "
          f"{fmt(same_parity, '.4f')} | {fmt(same_official, '.4f')} |", flush=True)
  return reference


def main(argv):
  del argv
  impls = list(FLAGS.impls) + (["hmorimitsu"] if FLAGS.peer_hm and "hmorimitsu" not in FLAGS.impls else [])
  unknown = sorted(set(impls) - set(IMPLS))
  if unknown:
    raise app.UsageError(f"--impls: unknown {unknown}; choose from {list(IMPLS)}")
  if "hmorimitsu" in impls and not FLAGS.peer_hm:
    raise app.UsageError("--impls hmorimitsu needs --peer_hm DIR (a checkout of hmorimitsu/maskgit-torch)")
  if FLAGS.omp_wait_policy == "passive":  # read by OpenMP when torch loads, which is below
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
  set_cpu_threads(FLAGS.cpu_threads)
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from configs import get_preset  # pylint: disable=import-outside-toplevel
  from maskgit_jax import checkpoint  # pylint: disable=import-outside-toplevel

  device = device_name()
  on_gpu = torch.cuda.is_available()
  preset = FLAGS.preset or ("imagenet_256" if on_gpu else "tiny")
  config = get_preset(preset)
  variables = {w: checkpoint.init_variables(config, w, jax.random.PRNGKey(i))
               for i, w in enumerate(("tokenizer", "transformer"))}
  from maskgit_torch import device as torch_device  # pylint: disable=import-outside-toplevel
  gemm = None if on_gpu else cpu_gemm()
  image_flops = print_header(preset, config, device, gemm)
  # (impl, precision as run, precision label): the official code runs `default` (as released) only on a GPU,
  # where it differs from `parity`; it has no bfloat16 switch. hmorimitsu's port runs float32 only.
  variants = [(impl, p, "default" if impl == "official" and p == "fast" else p)
              for impl in impls for p in FLAGS.precisions
              if not (impl == "official" and p == "fast" and not on_gpu)
              and not (impl == "hmorimitsu" and p != "parity")]
  runners = {}
  for impl, precision, label in variants:
    set_precision(label)
    runners[(impl, label)] = make_runner(impl, precision, config, variables)

  def call(name, fn):
    def run():
      set_precision(name[1])  # jax: read at trace time (part of the jit cache key); torch: at every matmul
      return fn()
    return run

  print("| impl | precision | batch | steps | cfg | images/s | ms/batch | tokens->image ms | peak MiB | "
        "TFLOP/s | % peak | vs official | = parity | = official |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  t_start, references = time.perf_counter(), []
  for steps in map(int, FLAGS.steps):
    for guidance in map(float, FLAGS.guidance):
      for batch in map(int, FLAGS.batch_sizes):
        reference = row_group(runners, call, config, device, gemm, on_gpu, image_flops, batch, steps, guidance)
        if reference:
          references.append(f"batch {batch} steps {steps} cfg {guidance:g}: {1e3 * reference:.1f}")
  probe = (min(map(int, FLAGS.batch_sizes)), int(FLAGS.steps[0]))
  print()
  if references:
    print(f"# gemm: the float32 GEMM rate (GFLOP/s) in each row group's rounds: {'; '.join(references)}")
  for (impl, label), runner in runners.items():
    set_precision(label)
    for guidance in sorted({0.0} | ({max(map(float, FLAGS.guidance))} if impl not in ("official", "hmorimitsu")
                                    else set())):
      print(f"# {impl} {label} cfg {guidance:g}: host syncs/transfers during one decode (batch {probe[0]}, "
            f"{probe[1]} steps): {runner.sync_check(*probe, guidance)}")
  print(f"# torch CPU kernel choices measured in this run: {torch_device.kernel_choices() or 'none'}")
  print(f"# wall time {time.perf_counter() - t_start:.0f} s; load average at the end {os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)
