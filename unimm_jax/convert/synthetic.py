"""A synthetic upstream checkpoint of any size, for measuring the streaming import (``python -m unimm_jax.bench
--what=import``): random bfloat16 weights in the LLaDA layout (``config.json``, sharded safetensors with their
index, a ``tokenizer.json``), written one tensor at a time, so a multi-billion-parameter checkpoint is made on a
small host.
"""

from __future__ import annotations

import copy
import json
import math
import time

import ml_dtypes
import numpy as np
from etils import epath

from unimm_jax import configuration
from unimm_jax.convert import llada
from unimm_jax import safetensors_io as st


def synthetic_config(d_model: int, layers: int, heads: int, mlp: int, vocab: int = 126_464,
                     max_len: int = 4096) -> dict:
  cfg = copy.deepcopy(llada.LLADA_8B)
  cfg.update(d_model=d_model, n_layers=layers, n_heads=heads, n_kv_heads=heads, mlp_hidden_size=mlp,
             embedding_size=vocab, vocab_size=vocab, max_sequence_length=max_len)
  return cfg


def param_count(cfg: dict) -> int:
  s = llada.upstream_sizes(cfg)
  d, f = s["d_model"], s["mlp"]
  return 2 * s["vocab"] * d + d + s["n_layers"] * (4 * d * d + 3 * d * f + 2 * d)


def _tokenizer_json(cfg: dict) -> str:
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(1000)}}
  specials = {"<|startoftext|>": 126080, "<|endoftext|>": cfg["eos_token_id"], "<|mdm_mask|>": cfg["mask_token_id"]}
  vocab.update(specials)
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(list(specials))
  return tok.to_str()


def write_synthetic(directory, cfg: dict, *, seed: int = 0, max_shard_bytes: int = 2 * 2**30) -> dict:
  """Writes the checkpoint; returns {'params', 'bytes', 'largest_tensor_bytes', 'write_s'}."""
  directory = epath.Path(directory)
  start = time.perf_counter()
  config = llada.apply_backbone(configuration.base_config(), cfg, 64)
  rng = np.random.default_rng(seed)
  planned = []
  for mp in llada.tensor_map(config, llada.upstream_sizes(cfg)["vocab"]):
    for name, shape in zip(mp.sources, mp.shapes):
      scale = 1.0 if len(shape) == 1 else 1.0 / math.sqrt(shape[-1])
      make = (lambda shape=shape, scale=scale: (rng.standard_normal(shape, np.float32) * scale)
              .astype(ml_dtypes.bfloat16))
      planned.append(st.Planned(name, tuple(shape), np.dtype(ml_dtypes.bfloat16), make))
  st.write_checkpoint(directory, planned, max_shard_bytes=max_shard_bytes)
  (directory / "config.json").write_text(json.dumps(cfg, indent=2))
  (directory / "tokenizer.json").write_text(_tokenizer_json(cfg))
  (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                               "pad_token": "<|endoftext|>"}))
  return {"params": param_count(cfg), "bytes": sum(t.nbytes for t in planned),
          "largest_tensor_bytes": max(t.nbytes for t in planned), "write_s": time.perf_counter() - start}
