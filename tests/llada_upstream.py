"""A tiny LLaDA checkpoint in exactly the upstream's layout, and the upstream's forward pass in numpy.

Written from the upstream's public architecture (``modeling_llada.py``: ``LLaDAModelLM`` / ``LLaDALlamaBlock``,
OLMo-style names), independent of unimm_jax's modules, so that the importer is checked against the model it
claims to read:

* files: ``config.json`` (LLaDA's fields), ``model.safetensors.index.json`` with its ``weight_map``, shards
  ``model-0000i-of-0000n.safetensors`` (written here byte by byte: 8-byte header length, JSON header, data),
  ``tokenizer.json`` (a word-level ``tokenizers`` model with LLaDA's special tokens) and ``tokenizer_config.json``;
* tensors: ``model.transformer.wte.weight`` [V, D], per block ``attn_norm``, ``ff_norm`` (RMSNorm weights),
  ``q_proj``, ``k_proj``, ``v_proj`` [D, D], ``attn_out`` [D, D], ``ff_proj``, ``up_proj`` [F, D], ``ff_out``
  [D, F] (torch ``nn.Linear`` weights, [out, in]), ``ln_f``, and the output ``model.transformer.ff_out.weight``
  [V, D]; all bfloat16, as the released checkpoints are.
"""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|eot_id|>"]


def tiny_upstream_config(**overrides) -> dict:
  cfg = {
      "activation_type": "silu", "alibi": False, "architectures": ["LLaDAModelLM"], "attention_layer_norm": False,
      "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 32,
      "embedding_size": 120, "eos_token_id": 101, "flash_attention": False, "include_bias": False,
      "include_qkv_bias": False, "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
      "mask_token_id": 102, "max_sequence_length": 64, "mlp_hidden_size": 48, "mlp_ratio": 4, "model_type": "llada",
      "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "pad_token_id": 101, "rms_norm_eps": 1e-05, "rope": True,
      "rope_full_precision": True, "rope_theta": 10000.0, "scale_logits": False, "torch_dtype": "bfloat16",
      "vocab_size": 120, "weight_tying": False,
  }
  cfg.update(overrides)
  return cfg


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  d, f, v = cfg["d_model"], cfg["mlp_hidden_size"], cfg["embedding_size"]
  out = {"model.transformer.wte.weight": (v, d), "model.transformer.ln_f.weight": (d,),
         "model.transformer.ff_out.weight": (v, d)}
  for i in range(cfg["n_layers"]):
    b = f"model.transformer.blocks.{i}."
    out.update({b + "attn_norm.weight": (d,), b + "ff_norm.weight": (d,), b + "q_proj.weight": (d, d),
                b + "k_proj.weight": (d, d), b + "v_proj.weight": (d, d), b + "attn_out.weight": (d, d),
                b + "ff_proj.weight": (f, d), b + "up_proj.weight": (f, d), b + "ff_out.weight": (d, f)})
  return out


def random_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """bfloat16 weights; norm weights around 1, matrices with std 1/sqrt(fan_in) (so logits are O(1))."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in tensor_shapes(cfg).items():
    if len(shape) == 1:
      x = 1.0 + 0.2 * rng.standard_normal(shape)
    elif name.endswith("wte.weight"):
      x = rng.standard_normal(shape)
    else:
      x = rng.standard_normal(shape) / np.sqrt(shape[1])
    out[name] = x.astype(ml_dtypes.bfloat16)
  return out


def write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
  names = {np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
  header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
  for name, x in tensors.items():
    raw = np.ascontiguousarray(x).tobytes()
    header[name] = {"dtype": names[x.dtype], "shape": list(x.shape), "data_offsets": [offset, offset + len(raw)]}
    offset += len(raw)
    blobs.append(raw)
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def tokenizer_json(cfg: dict) -> str:
  """A word-level tokenizer: [UNK] 0, words 1..N, LLaDA's special tokens at the config's ids."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  words = ["the", "a", "red", "blue", "green", "circle", "square", "triangle", "is", "on", "left", "right", "top",
           "bottom", "small", "large", "and", "of", "in", "at", "what", "colour", "?", ".", "yes", "no"]
  vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
  special_ids = {"<|startoftext|>": 100, "<|endoftext|>": cfg["eos_token_id"], "<|mdm_mask|>": cfg["mask_token_id"],
                 "<|eot_id|>": 103}
  vocab.update(special_ids)
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(SPECIALS)
  return tok.to_str()


def write_checkpoint(directory, cfg: dict, tensors: dict[str, np.ndarray], shards: int = 2) -> None:
  """The upstream directory: config, index, ``shards`` safetensors files, tokenizer files."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(cfg, indent=2))
  names = list(tensors)
  files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
  parts = np.array_split(np.arange(len(names)), shards)
  weight_map = {}
  for file, idx in zip(files, parts):
    write_safetensors(directory / file, {names[i]: tensors[names[i]] for i in idx})
    weight_map.update({names[i]: file for i in idx})
  total = sum(x.nbytes for x in tensors.values())
  (directory / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  (directory / "tokenizer.json").write_text(tokenizer_json(cfg))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
       "model_max_length": cfg["max_sequence_length"]}))


# ---------------------------------------------------------------------------------------------------------------
# The upstream forward pass, in numpy (float32 throughout: rope_full_precision, RMSNorm in float32)
# ---------------------------------------------------------------------------------------------------------------
def _rms_norm(x, weight, eps):
  return x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * weight


def _rotate_half(x):
  h = x.shape[-1] // 2
  return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def reference_logits(cfg: dict, tensors: dict[str, np.ndarray], ids: np.ndarray, bias=None) -> np.ndarray:
  """float32 [B, S, V]: LLaDAModelLM's logits for int ids [B, S] (no attention mask: bidirectional); ``bias``
  float [B, 1, S, S] is added to the scaled scores (``attention_bias``, as MMaDA passes it)."""
  w = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  d, n = cfg["d_model"], cfg["n_heads"]
  hs, eps = d // n, cfg["rms_norm_eps"]
  b, s = ids.shape
  x = w["model.transformer.wte.weight"][ids]
  inv_freq = 1.0 / (cfg["rope_theta"] ** (np.arange(0, hs, 2, dtype=np.float32) / hs))
  freqs = np.arange(s, dtype=np.float32)[:, None] * inv_freq[None]
  pos = np.concatenate([freqs, freqs], axis=-1)                       # [S, hs]
  sin, cos = np.sin(pos), np.cos(pos)
  for i in range(cfg["n_layers"]):
    p = f"model.transformer.blocks.{i}."
    a = _rms_norm(x, w[p + "attn_norm.weight"], eps)
    q, k, v = (a @ w[p + f"{t}_proj.weight"].T for t in "qkv")
    q, k, v = (t.reshape(b, s, n, hs).transpose(0, 2, 1, 3) for t in (q, k, v))   # [B, nh, S, hs]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs)
    if bias is not None:
      scores = scores + bias
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    att = (scores / scores.sum(-1, keepdims=True)) @ v
    x = x + att.transpose(0, 2, 1, 3).reshape(b, s, d) @ w[p + "attn_out.weight"].T
    f = _rms_norm(x, w[p + "ff_norm.weight"], eps)
    gate, up = f @ w[p + "ff_proj.weight"].T, f @ w[p + "up_proj.weight"].T
    x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "ff_out.weight"].T
  x = _rms_norm(x, w["model.transformer.ln_f.weight"], eps)
  return x @ w["model.transformer.ff_out.weight"].T


def reference_generate(cfg: dict, tensors: dict[str, np.ndarray], prompt: np.ndarray, *, steps: int, gen_length: int,
                       block_length: int, cfg_scale: float = 0.0) -> np.ndarray:
  """int [B, P + gen_length]: LLaDA's ``generate()`` (ML-GSAI/LLaDA ``generate.py``) with ``temperature=0`` and
  ``remasking='low_confidence'``: the answer in blocks of ``block_length`` left to right, ``steps / num_blocks``
  steps a block, each step revealing the masked positions of the current block with the most probable argmax
  tokens, ``get_num_transfer_tokens`` of them (N // K a step, the first N % K one more); with ``cfg_scale``, the
  logits ``un + (cfg_scale + 1) * (cond - un)`` where the uncond pass has the prompt all MASK.

  One deviation: the MASK id's logit is set to -inf before the argmax. The released model gives MASK no
  probability, but random test weights could make it the argmax, which the upstream would then "reveal" as MASK.
  """
  mask = cfg["mask_token_id"]
  b, p = prompt.shape
  x = np.full((b, p + gen_length), mask, np.int64)
  x[:, :p] = prompt
  prompt_index = x != mask
  num_blocks = gen_length // block_length
  per_block = steps // num_blocks
  for nb in range(num_blocks):
    lo, hi = p + nb * block_length, p + (nb + 1) * block_length
    n = (x[:, lo:hi] == mask).sum(axis=1)
    transfer = np.zeros((b, per_block), np.int64) + (n // per_block)[:, None]
    for j in range(b):
      transfer[j, :n[j] % per_block] += 1
    for i in range(per_block):
      mask_index = x == mask
      logits = reference_logits(cfg, tensors, x).astype(np.float64)
      if cfg_scale > 0:
        un = np.where(prompt_index, mask, x)
        un_logits = reference_logits(cfg, tensors, un).astype(np.float64)
        logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
      logits[..., mask] = -np.inf
      x0 = logits.argmax(-1)
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      x0_p = np.take_along_axis(probs, x0[..., None], -1)[..., 0]
      x0_p[:, hi:] = -np.inf
      x0 = np.where(mask_index, x0, x)
      confidence = np.where(mask_index, x0_p, -np.inf)
      for j in range(b):
        top = np.argsort(-confidence[j], kind="stable")[:transfer[j, i]]
        x[j, top] = x0[j, top]
  return x
