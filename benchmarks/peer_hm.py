"""Drives hmorimitsu/maskgit-torch (a PyTorch port of the official model) from a checkout the user gives.

No code of that repository lives here: `import_peer(checkout)` imports its `maskgit` package from the checkout
(under a private name, since the official PyPI package is also called `maskgit`), and `PeerRunner` builds its
models as its `maskgit/inference.py` does (`vqgan_tokenizer.VQVAE(config)`, `BidirectionalTransformer(...)` from
its `maskgit_class_cond_config`), then loads OUR weights into them: `peer_state_dicts` maps our torch state dicts
onto its module tree, which it walks at run time (its checkpoints, loaded with plain unpickling, are never read).

The mapping (our torch module -> its module), checked key for key and shape for shape by a strict load:
  tokenizer  encoder/decoder conv_in, norm_out, conv_out -> the same names; our flat `blocks[k]` are its
             `res_blocks[i][j]` ResBlocks in order (its Downsample/Upsample entries have no weights), our decoder
             `upsample_convs[j]` its Conv2d entries after each Upsample; ResBlock norm0/conv0/norm1/conv1/shortcut ->
             norm0/conv0/norm1/conv1/conv_res; quantizer.codebook -> quantizer.codebook.weight
  transformer embed.word_embeddings -> tok_emb, embed.position_embeddings -> pos_emb, embed.embeddings_ln ->
             emb_ln; layers[i].attention.self_attention.{query,key,value} -> blocks[i].MultiHeadAttention.in_proj
             (concatenated q, k, v), .out -> out_proj, attention_output_ln -> AttentionLN; mlp.intermediate_output
             / layer_output -> MLP[0] / MLP[2], layer_output_ln -> MlpLN; mlm.mlm_dense / mlm_ln -> Token_Prediction
             [0] / [2], mlm.mlm_bias -> bias
Its own numerics differ from the official model where its code does (exact erf GELU, GroupNorm eps 1e-5, torch's
multinomial/Gumbel draws): the timing compares the same network sizes and weights, not the same tokens.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types

_PEER_MODULES = ("maskgit.nets.vqgan_tokenizer", "maskgit.nets.bidirectional_transformer",
                 "maskgit.libml.parallel_decode", "maskgit.configs.maskgit_class_cond_config")


class PeerError(RuntimeError):
  """A --peer_hm checkout that is not hmorimitsu/maskgit-torch or whose dependencies are missing."""


@contextlib.contextmanager
def _private_maskgit(checkout: str):
  """Imports under the name `maskgit` resolve to the checkout; the process's own `maskgit` modules (the official
  package, the parity oracle) are put back afterwards. Imported peer modules keep their own references."""
  saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "maskgit" or k.startswith("maskgit.")}
  # Its `maskgit` folder has no __init__.py (a namespace package), which the installed regular package would win
  # over on sys.path: so the parent package is made here, pointing at the checkout's folder.
  package = types.ModuleType("maskgit")
  package.__path__ = [os.path.join(checkout, "maskgit")]
  sys.modules["maskgit"] = package
  try:
    yield
  finally:
    for k in [k for k in sys.modules if k == "maskgit" or k.startswith("maskgit.")]:
      del sys.modules[k]
    sys.modules.update(saved)


def import_peer(checkout: str) -> dict:
  """{short name: module} of the peer's model, decoder and config modules, imported from `checkout`."""
  checkout = os.path.abspath(checkout)
  if not os.path.isfile(os.path.join(checkout, "maskgit", "nets", "bidirectional_transformer.py")):
    raise PeerError(f"--peer_hm {checkout}: no maskgit/nets/bidirectional_transformer.py there; pass a checkout of "
                    f"hmorimitsu/maskgit-torch")
  import importlib  # pylint: disable=import-outside-toplevel
  with _private_maskgit(checkout):
    try:
      return {name.rsplit(".", 1)[1]: importlib.import_module(name) for name in _PEER_MODULES}
    except ImportError as e:
      raise PeerError(f"--peer_hm {checkout}: importing it failed ({e}); it needs einops and ml_collections "
                      f"(pip install einops ml_collections)") from None


def peer_config(mods: dict, config):
  """Its ml_collections config with our preset's sizes (the released ImageNet-256 preset is its default)."""
  cf = mods["maskgit_class_cond_config"].get_config()
  tc, tr = config.tokenizer, config.transformer
  cf.image_size, cf.num_class = config.image_size, config.num_class
  cf.vqvae.update(filters=tc.filters, num_res_blocks=tc.num_res_blocks,
                  channel_multipliers=list(tc.channel_multipliers), embedding_dim=tc.embedding_dim,
                  codebook_size=tc.codebook_size, activation_fn=tc.activation_fn)
  cf.transformer.update(num_layers=tr.num_layers, num_embeds=tr.num_embeds, intermediate_size=tr.intermediate_size,
                        num_heads=tr.num_heads, patch_size=config.image_size // config.latent_size,
                        latent_size=config.latent_size, mask_token_id=config.vocab_size - 1)
  cf.sample_choice_temperature = config.sampler.choice_temperature
  return cf


def build_peer_models(mods: dict, cf):
  """Its tokenizer and transformer, constructed as its inference.py constructs them."""
  tokenizer = mods["vqgan_tokenizer"].VQVAE(config=cf)
  latent = cf.image_size // cf.transformer.patch_size
  transformer = mods["bidirectional_transformer"].BidirectionalTransformer(
      num_image_tokens=latent ** 2 + 1, num_codebook_vectors=cf.vqvae.codebook_size + cf.num_class + 1,
      dim=cf.transformer.num_embeds, n_layers=cf.transformer.num_layers,
      hidden_dim=cf.transformer.intermediate_size, num_heads=cf.transformer.num_heads,
      attention_dropout=cf.transformer.dropout_rate, hidden_dropout=cf.transformer.dropout_rate)
  return tokenizer.eval(), transformer.eval()


def _copy(out: dict, prefix: str, ours: dict, our_prefix: str) -> None:
  for key, value in ours.items():
    if key.startswith(our_prefix):
      out[prefix + key[len(our_prefix):]] = value


def _resblock(out, prefix, ours, our_prefix):
  for a, b in (("norm0", "norm0"), ("conv0", "conv0"), ("norm1", "norm1"), ("conv1", "conv1"),
               ("shortcut", "conv_res")):
    _copy(out, f"{prefix}{b}.", ours, f"{our_prefix}{a}.")


def tokenizer_state(peer_tokenizer, ours: dict) -> dict:
  """Our VQVAE state dict -> the peer VQVAE's, walking its res_blocks groups in call order."""
  out = {"quantizer.codebook.weight": ours["quantizer.codebook"]}
  for part in ("encoder", "decoder"):
    for name in ("conv_in", "norm_out", "conv_out"):
      _copy(out, f"{part}.{name}.", ours, f"{part}.{name}.")
    block, upsample_conv = 0, 0
    for i, group in enumerate(getattr(peer_tokenizer, part).res_blocks):
      for j, layer in enumerate(group):
        kind = type(layer).__name__
        if kind == "ResBlock":
          _resblock(out, f"{part}.res_blocks.{i}.{j}.", ours, f"{part}.blocks.{block}.")
          block += 1
        elif kind == "Conv2d":  # the conv after each Upsample (decoder)
          _copy(out, f"{part}.res_blocks.{i}.{j}.", ours, f"{part}.upsample_convs.{upsample_conv}.")
          upsample_conv += 1
        elif kind not in ("Upsample", "Downsample"):
          raise PeerError(f"peer tokenizer: unexpected {kind} at {part}.res_blocks.{i}.{j}")
  return out


def transformer_state(peer_transformer, ours: dict) -> dict:
  """Our Transformer state dict -> the peer BidirectionalTransformer's (q, k, v concatenated into in_proj)."""
  import torch  # pylint: disable=import-outside-toplevel
  out = {"tok_emb.weight": ours["embed.word_embeddings.weight"], "pos_emb": ours["embed.position_embeddings.weight"],
         "bias": ours["mlm.mlm_bias"]}
  _copy(out, "emb_ln.", ours, "embed.embeddings_ln.")
  for i in range(len(peer_transformer.blocks)):
    p, o = f"blocks.{i}.", f"layers.{i}."
    a = f"{o}attention.self_attention."
    for kind in ("weight", "bias"):
      out[f"{p}MultiHeadAttention.in_proj_{kind}"] = torch.cat([ours[f"{a}{n}.{kind}"] for n in ("query", "key",
                                                                                                   "value")])
    _copy(out, f"{p}MultiHeadAttention.out_proj.", ours, f"{a}out.")
    _copy(out, f"{p}AttentionLN.", ours, f"{o}attention.attention_output_ln.")
    _copy(out, f"{p}MLP.0.", ours, f"{o}mlp.intermediate_output.")
    _copy(out, f"{p}MLP.2.", ours, f"{o}mlp.layer_output.")
    _copy(out, f"{p}MlpLN.", ours, f"{o}mlp.layer_output_ln.")
  _copy(out, "Token_Prediction.0.", ours, "mlm.mlm_dense.")
  _copy(out, "Token_Prediction.2.", ours, "mlm.mlm_ln.")
  return out


class PeerRunner:
  """hmorimitsu/maskgit-torch's generate_samples (its parallel_decode.decode, then decode_from_indices) on our
  weights, on the CPU, under torch.inference_mode (its fastest setting: its attention's fast path needs autograd
  off; its own script runs with autograd on)."""

  def __init__(self, checkout: str, config, tokenizer, transformer):
    import torch  # pylint: disable=import-outside-toplevel
    self.torch, self.config = torch, config
    self.mods = import_peer(checkout)
    self.cf = peer_config(self.mods, config)
    self.tokenizer, self.transformer = build_peer_models(self.mods, self.cf)
    # strict: every one of its keys gets one of ours, with the same shape (a mismatch raises, naming the key).
    self.tokenizer.load_state_dict(tokenizer_state(self.tokenizer, tokenizer.state_dict()), strict=True)
    self.transformer.load_state_dict(transformer_state(self.transformer, transformer.state_dict()), strict=True)
    self.k = config.codebook_size

  def _logits(self, seq):
    return self.transformer(seq)[..., :self.k]

  def _ids(self, batch: int):
    torch, c = self.torch, self.config
    labels = torch.tensor([i % c.num_class for i in range(batch)]) + c.codebook_size
    ids = torch.full((batch, c.seq_len), self.cf.transformer.mask_token_id, dtype=torch.long)
    ids[:, 0] = labels
    return ids

  def generate(self, batch: int, num_iter: int, guidance: float, seed: int = 0):
    del guidance  # it has no classifier-free guidance
    torch, side = self.torch, self.config.latent_size
    torch.manual_seed(seed)  # its draws come from torch's global generator
    with torch.inference_mode():
      seqs = self.mods["parallel_decode"].decode(
          self._ids(batch), self._logits, num_iter=num_iter, choice_temperature=self.cf.sample_choice_temperature,
          mask_token_id=self.cf.transformer.mask_token_id)
      codes = seqs[:, -1, 1:].reshape(-1, side, side)
      images = self.tokenizer.decode_from_indices({"encoding_indices": codes})
      images.permute(0, 2, 3, 1).cpu().numpy()  # NHWC on the host, as our pipelines return them
    return codes.numpy()

  def decode_tokens(self, codes):
    torch = self.torch
    with torch.inference_mode():
      images = self.tokenizer.decode_from_indices({"encoding_indices": torch.as_tensor(codes).long()})
      images.permute(0, 2, 3, 1).cpu().numpy()

  def peak_memory(self, batch, num_iter, guidance):
    del batch, num_iter, guidance
    return None

  def sync_check(self, batch, num_iter, guidance):
    del batch, num_iter, guidance
    return "n/a (CPU)"
