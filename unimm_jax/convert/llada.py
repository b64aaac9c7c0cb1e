"""LLaDA-class backbones (``GSAI-ML/LLaDA-8B-Base`` / ``-Instruct``; the LLM of MMaDA, Lumina-DiMOO, LLaDA-V):
their configuration, their tensor names, and how each maps onto unimm_jax's transformer.

The upstream (``modeling_llada.py``, an OLMo-style "llama" block; read from Gen-Verse/MMaDA and ML-GSAI/LLaDA, and
written here from scratch) computes, for token ids ``x`` [B, S]::

    h = wte[x]                                         no embedding scale, no modality embedding
    per block:  a = attn_norm(h)                       RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, float32
                q, k, v = a @ q_proj.T, a @ k_proj.T, a @ v_proj.T      [B, S, N*H], no biases, viewed [B, S, N, H]
                q, k = rope(q), rope(k)                rotate-half rotary over the whole head, positions 0..S-1 of
                                                       the flat sequence, inv_freq = theta^(-2j/H)
                h = h + softmax(q k^T / sqrt(H)) v @ attn_out.T       bidirectional: no mask
                f = ff_norm(h)
                h = h + (silu(f @ ff_proj.T) * (f @ up_proj.T)) @ ff_out.T
    logits = ln_f(h) @ ff_out.T                        over the whole vocabulary (no restriction), MASK 126336

which is unimm_jax's transformer with ``model.rope_layout='sequence'``, ``rope_fraction=1``, ``norm_eps`` the
upstream's, ``embedding_scale=1``, ``modality_embedding=False``, ``qk_norm=False``, ``restrict_output=False``
over a text-only layout whose MASK is the upstream's own id (``sequence.mask_id``). :func:`check_config` checks
every one of these field by field; :func:`tensor_map` maps the names:

==========================================  =================================  ==================================
upstream (torch ``[out, in]``)              unimm_jax                          how
==========================================  =================================  ==================================
model.transformer.wte.weight [V, D]         token_embedding [V', D]            rows (V' = V padded, zeros)
model.transformer.blocks.i.attn_norm.weight block_i/attn_norm/scale [D]        as is
model.transformer.blocks.i.q_proj.weight    block_i/attn/qkv/kernel [D,3,N,H]  transpose, heads split, q/k/v
  (k_proj, v_proj) [N*H, D]                   (or attn/query|key|value [D,N,H]   stacked on axis 1 when fused
                                              with model.fused_qkv=False)
model.transformer.blocks.i.attn_out.weight  block_i/attn/out/kernel [N,H,D]    transpose, heads split
model.transformer.blocks.i.ff_norm.weight   block_i/mlp_norm/scale [D]         as is
model.transformer.blocks.i.ff_proj.weight   block_i/mlp/wi_0/kernel [D, F]     transpose (the gate: silu of it)
model.transformer.blocks.i.up_proj.weight   block_i/mlp/wi_1/kernel [D, F]     transpose
model.transformer.blocks.i.ff_out.weight    block_i/mlp/wo/kernel [F, D]       transpose
model.transformer.ln_f.weight               final_norm/scale [D]               as is
model.transformer.ff_out.weight [V, D]      head/kernel [D, V']                transpose, columns padded (zeros)
==========================================  =================================  ==================================

With ``model.scan_layers`` the block tensors are one stack ``blocks/...`` with the layer as the leading axis.
Every mapping is a reshape and a transpose, so import then export gives the upstream's bytes back.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import ml_dtypes
import numpy as np

FORMAT = "llada"
FLOAT_DTYPES = tuple(np.dtype(t) for t in (np.float32, ml_dtypes.bfloat16, np.float16, np.float64))
PREFIX = "model.transformer."

# LLaDA-8B-Base's config.json (the fields this module reads or writes back; the Instruct model's are the same).
LLADA_8B = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096, "mlp_hidden_size": 12288,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 32, "n_kv_heads": 32,
    "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05,
    "rope": True, "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
    "torch_dtype": "bfloat16", "use_cache": False, "vocab_size": 126464, "weight_tying": False,
}


class ConvertError(ValueError):
  """An upstream checkpoint that does not match what was asked: one line naming the field or tensor."""


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
def _get(upstream: dict, key: str, default=None):
  return upstream.get(key, LLADA_8B.get(key, default) if default is None else default)


def upstream_sizes(upstream: dict) -> dict:
  """The architecture of an upstream config.json, in its own terms, with the LLaDA defaults filled in."""
  d, n = int(upstream["d_model"]), int(upstream["n_heads"])
  return {"d_model": d, "n_heads": n, "head_dim": d // n, "n_layers": int(upstream["n_layers"]),
          "mlp": int(upstream.get("mlp_hidden_size") or upstream.get("mlp_ratio", 4) * d),
          "vocab": int(upstream.get("embedding_size") or upstream["vocab_size"]),
          "mask_id": int(_get(upstream, "mask_token_id")), "rope_theta": float(_get(upstream, "rope_theta")),
          "eps": float(_get(upstream, "rms_norm_eps")), "max_len": int(_get(upstream, "max_sequence_length"))}


def apply_backbone(config, upstream: dict, seq_len: int | None = None):
  """``config`` (changed in place and returned) set to the architecture of an upstream config.json: a text-only
  layout of ``seq_len`` tokens (default: the upstream's ``max_sequence_length``)."""
  s = upstream_sizes(upstream)
  seq_len = seq_len or s["max_len"]
  m = config.model
  m.d_model, m.num_heads, m.head_dim, m.num_layers, m.mlp_dim = (s["d_model"], s["n_heads"], s["head_dim"],
                                                                s["n_layers"], s["mlp"])
  m.positions, m.rope_layout, m.rope_fraction, m.rope_theta = "rope", "sequence", 1.0, s["rope_theta"]
  m.norm_eps, m.embedding_scale, m.modality_embedding, m.restrict_output = s["eps"], 1.0, False, False
  m.qk_norm, m.directional_heads, m.cross_modal_rope, m.image_code_features = False, 0, True, False
  m.cross_modal_heads, m.value_positions = 0, False
  m.max_len = seq_len
  config.text.tokenizer, config.text.max_len, config.text.vocab_size = "hf", seq_len, s["vocab"]
  config.image.tokenizer = "none"
  config.sequence.segments = (("text", "text", seq_len),)
  config.sequence.specials = ()
  config.sequence.id_align = 1
  config.sequence.mask_id = s["mask_id"]
  config.diffusion.tasks = {"text": 1.0}
  config.diffusion.task_roles = {"text": "text:noised"}
  return config


def check_config(upstream: dict, config, layout) -> None:
  """ConvertError naming every field where ``config`` (and its ``layout``) is not the upstream's architecture."""
  s = upstream_sizes(upstream)
  m = config.model
  problems = []

  def want(what: str, upstream_value, ours_name: str, ours_value):
    if upstream_value != ours_value:
      problems.append(f"{what}={upstream_value!r} but {ours_name}={ours_value!r}")

  for key, ok in (("weight_tying", False), ("alibi", False), ("include_bias", False), ("include_qkv_bias", False),
                  ("scale_logits", False), ("input_emb_norm", False), ("rope", True), ("block_type", "llama"),
                  ("layer_norm_type", "rms"), ("activation_type", "silu"), ("block_group_size", 1)):
    if key in upstream and upstream[key] != ok:
      problems.append(f"config.json {key}={upstream[key]!r} is not supported (unimm_jax reads {key}={ok!r})")
  if upstream.get("bias_for_layer_norm"):
    problems.append("config.json bias_for_layer_norm=True is not supported (norms have no bias)")
  kv = upstream.get("n_kv_heads") or s["n_heads"]
  if kv != s["n_heads"]:
    problems.append(f"config.json n_kv_heads={kv} (grouped-query attention) is not supported: unimm_jax needs "
                    f"n_kv_heads = n_heads = {s['n_heads']}")
  want("config.json d_model", s["d_model"], "config.model.d_model", m.d_model)
  want("config.json n_heads", s["n_heads"], "config.model.num_heads", m.num_heads)
  want("config.json d_model/n_heads", s["head_dim"], "config.model.head_dim", m.head_dim)
  want("config.json n_layers", s["n_layers"], "config.model.num_layers", m.num_layers)
  want("config.json mlp_hidden_size", s["mlp"], "config.model.mlp_dim", m.mlp_dim)
  want("config.json embedding_size", s["vocab"], "the layout's vocabulary", layout.size)
  want("config.json mask_token_id", s["mask_id"], "config.sequence.mask_id", layout.mask_id)
  want("config.json rope_theta", s["rope_theta"], "config.model.rope_theta", float(m.rope_theta))
  want("config.json rms_norm_eps", s["eps"], "config.model.norm_eps", float(m.norm_eps))
  want("config.json rope (over the sequence)", "sequence", "config.model.rope_layout", m.rope_layout)
  want("config.json rope (every head dim)", 1.0, "config.model.rope_fraction", float(m.rope_fraction))
  want("config.json (rotary positions)", "rope", "config.model.positions", m.positions)
  want("config.json (no embedding scale)", 1.0, "config.model.embedding_scale", float(m.embedding_scale))
  want("config.json (no modality embedding)", False, "config.model.modality_embedding", m.modality_embedding)
  want("config.json attention_layer_norm", bool(upstream.get("attention_layer_norm", False)), "config.model.qk_norm",
       m.qk_norm)
  want("config.json (no directional heads)", 0, "config.model.directional_heads", m.directional_heads)
  want("config.json (no cross-modal heads)", 0, "config.model.cross_modal_heads", m.cross_modal_heads)
  want("config.json (no image code features)", False, "config.model.image_code_features", m.image_code_features)
  if layout.seq_len > s["max_len"]:
    problems.append(f"the layout's {layout.seq_len} tokens exceed config.json max_sequence_length={s['max_len']}")
  if problems:
    raise ConvertError("the upstream config does not match the target config: " + "; ".join(problems))


def upstream_config(config, layout, base: dict | None = None) -> dict:
  """The config.json of a unimm_jax model in the upstream's terms: ``base`` (the imported model's own, when
  known; else LLaDA-8B's) with the architecture fields set from ``config``."""
  out = copy.deepcopy(base if base is not None else LLADA_8B)
  m = config.model
  out.update(d_model=int(m.d_model), n_heads=int(m.num_heads), n_kv_heads=int(m.num_heads),
             n_layers=int(m.num_layers), mlp_hidden_size=int(m.mlp_dim), embedding_size=int(layout.size),
             mask_token_id=int(layout.mask_id), rope_theta=float(m.rope_theta), rms_norm_eps=float(m.norm_eps))
  if out.get("vocab_size", 0) > layout.size:
    out["vocab_size"] = int(layout.size)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Mapping:
  """One unimm_jax parameter of one layer (``layer`` None for the others) and the upstream tensors it is made of.

  ``to_ours(arrays)`` takes the upstream arrays (in ``sources`` order) to the parameter's per-layer value;
  ``to_upstream(value)`` gives them back, each in the same order.
  """

  ours: str                                       # path without the layer prefix, e.g. "attn/qkv/kernel"
  layer: int | None
  sources: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]             # the upstream shapes, in sources order
  to_ours: Callable[[list[np.ndarray]], np.ndarray]
  to_upstream: Callable[[np.ndarray], list[np.ndarray]]
  # For a single 2-D source whose rows become index ``rows_to`` of the parameter's axis of the same number (0: the
  # rows as they are, 1: transposed; past the source's rows, zeros): the importer may read it in row blocks.
  rows_to: int | None = None


def _pad_rows(rows: int):
  def to_ours(a):
    (x,) = a
    return x if x.shape[0] == rows else np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)])
  return to_ours


def tensor_map(config, vocab: int) -> list[Mapping]:
  """Every parameter of the model ``config`` makes over a vocabulary of ``vocab`` ids (the layout's size) and the
  upstream tensors it comes from."""
  m = config.model
  d, n, h, f, layers = m.d_model, m.num_heads, m.head_dim, m.mlp_dim, m.num_layers
  v = vocab
  v_pad = -(-v // m.vocab_multiple) * m.vocab_multiple
  out = [
      Mapping("token_embedding", None, (PREFIX + "wte.weight",), ((v, d),), _pad_rows(v_pad), lambda x: [x[:v]],
              rows_to=0),
      Mapping("final_norm/scale", None, (PREFIX + "ln_f.weight",), ((d,),), lambda a: a[0], lambda x: [x]),
      Mapping("head/kernel", None, (PREFIX + "ff_out.weight",), ((v, d),), lambda a: _pad_rows(v_pad)(a).T,
              lambda x: [x[:, :v].T], rows_to=1),
  ]
  heads_in = lambda w: w.reshape(n, h, d).transpose(2, 0, 1)           # [N*H, D] -> [D, N, H]
  heads_out = lambda k: k.transpose(1, 2, 0).reshape(n * h, d)         # [D, N, H] -> [N*H, D]
  for i in range(layers):
    b = f"{PREFIX}blocks.{i}."
    per = [
        ("attn_norm/scale", (b + "attn_norm.weight",), ((d,),), lambda a: a[0], lambda x: [x]),
        ("mlp_norm/scale", (b + "ff_norm.weight",), ((d,),), lambda a: a[0], lambda x: [x]),
        ("attn/out/kernel", (b + "attn_out.weight",), ((d, n * h),),
         lambda a: a[0].T.reshape(n, h, d), lambda x: [x.reshape(n * h, d).T]),
        ("mlp/wi_0/kernel", (b + "ff_proj.weight",), ((f, d),), lambda a: a[0].T, lambda x: [x.T], 1),
        ("mlp/wi_1/kernel", (b + "up_proj.weight",), ((f, d),), lambda a: a[0].T, lambda x: [x.T], 1),
        ("mlp/wo/kernel", (b + "ff_out.weight",), ((d, f),), lambda a: a[0].T, lambda x: [x.T], 1),
    ]
    qkv = tuple(b + f"{p}_proj.weight" for p in "qkv")
    if m.fused_qkv:
      per.append(("attn/qkv/kernel", qkv, ((n * h, d),) * 3, lambda a: np.stack([heads_in(w) for w in a], axis=1),
                  lambda x: [heads_out(x[:, j]) for j in range(3)]))
    else:
      for name, src in zip(("query", "key", "value"), qkv):
        per.append((f"attn/{name}/kernel", (src,), ((n * h, d),), lambda a: heads_in(a[0]),
                    lambda x: [heads_out(x)]))
    out += [Mapping(ours, i, *rest) for ours, *rest in per]
  return out


def param_path(mapping: Mapping, scan_layers: bool) -> str:
  """The flat parameter name (``bundle.flatten``'s) the mapping fills: ``block_i/...``, or ``blocks/...`` (one
  slice of the stack) with ``model.scan_layers``."""
  if mapping.layer is None:
    return mapping.ours
  return f"blocks/{mapping.ours}" if scan_layers else f"block_{mapping.layer}/{mapping.ours}"


def check_tensors(reader, mappings: list[Mapping]) -> None:
  """ConvertError for the first upstream tensor that is missing, unknown, or of the wrong shape or dtype."""
  wanted = {}
  for mp in mappings:
    for name, shape in zip(mp.sources, mp.shapes):
      wanted[name] = shape
  have = set(reader.names())
  for name in sorted(have - set(wanted)):
    raise ConvertError(f"{reader.directory}: unknown tensor {name} (not part of a LLaDA model of this config)")
  for name, shape in wanted.items():
    if name not in have:
      raise ConvertError(f"{reader.directory}: missing tensor {name} (expected shape {list(shape)})")
    info = reader.info(name)
    if info.shape != tuple(shape):
      raise ConvertError(f"{reader.directory / info.file}: tensor {name} has shape {list(info.shape)}, the config "
                         f"makes {list(shape)}")
    if info.dtype not in FLOAT_DTYPES:
      raise ConvertError(f"{reader.directory / info.file}: tensor {name} has dtype {info.dtype}, expected a float")
