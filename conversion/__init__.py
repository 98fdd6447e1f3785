"""The weights layer: every checkpoint format in and out, framework-free (numpy, msgpack, safetensors only).

Canonical weights are, per part ("tokenizer", "transformer"), a flat dict {flax path: np.ndarray} in the JAX layout
("params/..."; for the official family exactly the released tree). One table per model family maps each flax path
to its torch key and a pure layout transform (`conversion.tables`); one module per file format reads and writes
them (`conversion.formats`). Backends import this package, never the reverse: `maskgit_torch.checkpoint` and
`maskgit_jax.checkpoint` only turn canonical weights into their framework's variables and back.

  read(path, config=None) -> Checkpoint(config, parts, format, paths, extras)
  write(dst, config, parts, format="torch"|"jax"|"seed", overwrite=False, protect=(), extras=None)
  convert(src, dst, to="torch"|"jax"|"seed", config=None, overwrite=False) -> Converted
Formats read: ours (torch, jax), the official msgpack files, one weights file, and valeoai MaskGIT-pytorch's own
files ("seed": MaskGIT/*.pth, VQGAN/last.ckpt + model.yaml; conversion/formats/seed.py). `extras` is what a source
holds besides the weights ({part: {...}}: the seed's iter, epoch, AdamW state, ...), carried through conversions.
  check(config, part, flat, layout="jax"|"torch") -> list[str]; check_config(config, {part: weights}) raises
  to_torch_layout(config, part, flat) / from_torch_layout(config, part, state)
  infer_config(tokenizer_tree, transformer_tree, num_class=None, image_size=None)
"""

from conversion.api import Checkpoint, Converted, convert, read, resolve_config, write
from conversion.checks import check, check_config, compare
from conversion.errors import CheckpointError, CheckpointFormatError, ConversionError
from conversion.formats import FORMATS
from conversion.infer import infer_config, match_presets
from conversion.layout import from_torch_layout, ordered, to_torch_layout
from conversion.rules import TRANSFORMS, Rule, Transform, to_jax, to_torch, torch_shape
from conversion.tables import PARTS, TABLES, param_table
from conversion.tree import as_flat, flatten, unflatten

__all__ = [
    "Checkpoint", "CheckpointError", "CheckpointFormatError", "ConversionError", "Converted", "FORMATS", "PARTS",
    "Rule", "TABLES", "TRANSFORMS", "Transform", "as_flat", "check", "check_config", "compare", "convert", "flatten",
    "from_torch_layout", "infer_config", "match_presets", "ordered", "param_table", "read", "resolve_config",
    "to_jax", "to_torch", "to_torch_layout", "torch_shape", "unflatten", "write",
]
