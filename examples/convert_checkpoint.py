"""Converts a torch checkpoint to the official JAX layout and back, and proves nothing changed on the way.

  python examples/convert_checkpoint.py [--checkpoint demo/checkpoint] [--out DIR]

Writes DIR/jax (config.json + tokenizer.msgpack + transformer.msgpack, the layout of the released MaskGIT
checkpoints) and DIR/torch (the round trip), then checks that every tensor of the round trip is bit-identical to
the original and that every msgpack array is the original tensor under the transform `conversion/tables` names.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from a plain clone

import safetensors.numpy  # pylint: disable=wrong-import-position

from configs import MaskGITConfig  # pylint: disable=wrong-import-position
import conversion  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mb(path: str) -> str:
  return f"{os.path.getsize(path) / 2**20:.2f} MB"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", default=os.path.join(REPO, "demo", "checkpoint"),
                      help="torch checkpoint directory (config.json + *.safetensors)")
  parser.add_argument("--out", default=None, help="where to write jax/ and torch/ (default: a temporary directory)")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.checkpoint):
    parser.error(f"--checkpoint {args.checkpoint} is not a checkpoint directory (config.json + weights)")
  out = args.out or tempfile.mkdtemp(prefix="maskgit_convert_")
  jax_dir, torch_dir = os.path.join(out, "jax"), os.path.join(out, "torch")

  conversion.convert(args.checkpoint, jax_dir, to="jax", overwrite=True)  # torch -> official msgpack layout
  conversion.convert(jax_dir, torch_dir, to="torch", overwrite=True)  # and back
  config = MaskGITConfig.load(os.path.join(args.checkpoint, "config.json"))

  counts = {}
  for which in ("tokenizer", "transformer"):
    src = os.path.join(args.checkpoint, f"{which}.safetensors")
    if not os.path.isfile(src):
      continue
    original = safetensors.numpy.load_file(src)
    back = safetensors.numpy.load_file(os.path.join(torch_dir, f"{which}.safetensors"))
    official = conversion.read(jax_dir, parts=(which,)).parts[which]
    assert set(back) == set(original), f"{which}: the round trip changed the tensor names"
    for rule in conversion.param_table(config, which):
      x = original[rule.torch_key]
      # Bit identity: same dtype, same shape, same bytes (array_equal alone would accept -0.0 == 0.0).
      y = back[rule.torch_key]
      assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), rule.torch_key
      assert official[rule.jax_path].tobytes() == conversion.to_jax(rule, x).tobytes(), rule.jax_path
    counts[which] = len(original)
    params = sum(v.size for v in original.values())
    print(f"{which:11s} {len(original):4d} tensors, {params:>10,d} parameters: {_mb(src)} safetensors -> "
          f"{_mb(os.path.join(jax_dir, f'{which}.msgpack'))} msgpack -> "
          f"{_mb(os.path.join(torch_dir, f'{which}.safetensors'))} safetensors, bit-identical")
  if not counts:
    raise SystemExit(f"{args.checkpoint} holds no tokenizer.safetensors or transformer.safetensors")
  print(f"JAX checkpoint: {jax_dir}\ntorch round trip: {torch_dir}")
  return {"jax_dir": jax_dir, "torch_dir": torch_dir, "tensors": counts}


if __name__ == "__main__":
  main()
