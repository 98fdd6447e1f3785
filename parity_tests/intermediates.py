"""Named intermediates of either backend under the official module paths, so a parity failure names its layer.

The models' `forward` / `__call__` are only the maths; the intermediates are taken from outside:
  JAX    flax's own `capture_intermediates=True`, whose tree paths already are the official module paths:
         `flatten_flax(state)` -> {"TransformerLayer_0/Mlp_0/layer_output": array, ..., "output": logits}.
  torch  forward hooks on the submodules the conversion table names: every table rule pairs an official parameter
         path with a torch state_dict key, so stripping the parameter name pairs the modules that hold them
         (`params/TransformerLayer_0/Attention_0/self_attention/query/kernel` <->
         `layers.0.attention.self_attention.query.weight`), and every enclosing module with them.
         `capture_torch(model, rules, run)` records each such module's output, in the official layout.

The official layout of an output follows from the table's transforms (the same ones the weights go through):
a module whose kernel is `qkv_kernel` (flax (D, heads, head_dim)) outputs (..., heads, head_dim) where torch's
Linear gives (..., heads * head_dim); a module inside a conv stack (a top-level submodule holding a `conv` kernel:
the tokenizer's encoder and decoder) outputs NHWC where torch gives NCHW. The model's own output (key "output")
is at the public API boundary and is never changed. A module called more than once keeps its first output, as
`flatten_flax` takes the first call's.

Framework-free: the torch side only calls methods of the module and tensors it is given.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

OUTPUT = "output"  # the key of the whole model's output, in both backends


def flatten_flax(intermediates) -> dict:
  """flax `capture_intermediates` state -> {official module path: array}; the top-level output is "output".

  The keys match `transformer_intermediates.npz` (e.g. "TransformerLayer_0/Attention_0/self_attention/query").
  """
  flat = {}

  def visit(node, path):
    for name, value in node.items():
      if name == "__call__":
        flat["/".join(path) or OUTPUT] = value[0]
      else:
        visit(value, path + (name,))

  visit(intermediates.get("intermediates", intermediates), ())
  return flat


@dataclasses.dataclass
class _Module:
  torch_name: str
  transforms: set = dataclasses.field(default_factory=set)  # transforms of every parameter at or below it
  heads: tuple | None = None  # (heads, head_dim) when the module's own kernel is a qkv_kernel
  nchw: bool = False  # inside a conv stack: torch's feature maps are NCHW where flax's are NHWC


def _torch_parts(module_name: str) -> list[str]:
  """"layers.0.attention" -> ["layers.0", "attention"]: a list index belongs to the container before it, as flax
  folds the index into the module name (TransformerLayer_0)."""
  parts = []
  for part in module_name.split("."):
    if part.isdigit() and parts:
      parts[-1] += "." + part
    else:
      parts.append(part)
  return parts


def module_paths(rules: Iterable) -> dict[str, _Module]:
  """{official module path: _Module} for every module the conversion table's rules name, and their parents.

  A rule whose two paths do not nest alike (the official `MlmLayer_0/mlm_bias/bias` is a parameter of torch's
  `mlm`, not a module) names no module; its parents are named by the other rules. A conv stack is a top-level
  submodule holding a `conv` kernel (the tokenizer's encoder and decoder): every module in it, norms included,
  works on NCHW feature maps in torch.
  """
  modules = {}
  for rule in rules:
    official = rule.jax_path.split("/")[1:-1]  # drop the "params" collection and the parameter name
    torch_parts = _torch_parts(rule.torch_key.rsplit(".", 1)[0]) if "." in rule.torch_key else []
    if len(official) != len(torch_parts):
      continue
    for depth in range(1, len(official) + 1):
      path = "/".join(official[:depth])
      module = modules.setdefault(path, _Module(".".join(torch_parts[:depth])))
      module.transforms.add(rule.transform)
      if depth == len(official) and rule.transform == "qkv_kernel":
        module.heads = tuple(rule.shape[1:])
  for path, module in modules.items():
    module.nchw = "conv" in modules[path.split("/")[0]].transforms
  return modules


def _official_layout(module: _Module) -> Callable[[Any], Any]:
  def convert(x):
    if isinstance(x, (tuple, list)):
      return type(x)(convert(v) for v in x)
    if not hasattr(x, "detach"):
      return x
    x = x.detach()
    if module.heads is not None:
      return x.reshape(*x.shape[:-1], *module.heads)
    if module.nchw and x.dim() == 4:
      return x.permute(0, 2, 3, 1)
    return x
  return convert


def capture_torch(model, rules: Iterable, run: Callable[[], Any]) -> tuple[Any, dict]:
  """(run(), {official module path: output}) with forward hooks on `model`'s modules named by `rules`.

  rules: the model's conversion table (`conversion.param_table(config, which)`); run: calls the model, e.g.
  `lambda: transformer(ids)`. Raises ValueError when the table names a module the model does not have.
  """
  named = dict(model.named_modules())
  record, handles = {}, []

  def hook(key, convert):
    def record_output(module, args, output):
      if key not in record:
        record[key] = convert(output)
      # Returns None: a forward hook that returns a value replaces the module's output.
    return record_output

  try:
    for path, module in module_paths(rules).items():
      if module.torch_name not in named:
        raise ValueError(f"the conversion table names torch module {module.torch_name!r} (official {path!r}), "
                         f"which {type(model).__name__} does not have")
      handles.append(named[module.torch_name].register_forward_hook(hook(path, _official_layout(module))))
    handles.append(model.register_forward_hook(hook(OUTPUT, lambda x: x.detach() if hasattr(x, "detach") else x)))
    result = run()
  finally:
    for handle in handles:
      handle.remove()
  return result, record
