"""A tiny Lumina-DiMOO checkpoint in the upstream's layout, its prompts token for token, and its samplers in numpy.

Written from the public Alpha-VLLM/Lumina-DiMOO code (read, not copied), independent of unimm_jax's modules, so an
importer and a JAX sampler can be checked against the model they claim to reproduce:

* network: ``model/modeling_xllmx_dimoo.py`` ``LLaDAForMultiModalGeneration`` is ``LLaDAModelLM`` (the LLaDA-8B
  network of ``model/modeling_llada.py``) with only a new ``forward``; tensor names, shapes and the numerics are
  LLaDA's, so the writer and the forward come from ``llada_upstream``. What differs is the vocabulary (LLaDA's text
  ids, 7 new special ids, then the 8,192 aMUSEd-VQ codes) and ``architectures``;
* prompts: ``utils/prompt_utils.py``, ``utils/image_utils.py`` ``add_break_line`` / ``encode_img_with_breaks``,
  ``inference/inference_t2i.py``, ``inference/inference_mmu.py`` (the text before the image is tokenized by the
  tokenizer; every image / answer / newline / MASK token is inserted as an id);
* samplers: ``generators/image_generation_generator.py`` ``generate_image`` (MaskGIT, cosine schedule, CFG on the
  code logits) and ``generators/text_understanding_generator.py`` ``generate_text_understanding`` (LLaDA's block
  sampler starting at the answer), with ``utils/generation_utils.py``.

The tiny vocabulary keeps the real one's order and gaps around each special (``REAL_IDS`` vs ``TINY_IDS``).
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np

import llada_upstream as _llada
from llada_upstream import random_tensors, tensor_shapes, write_safetensors  # pylint: disable=unused-import

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary. Real ids: config.py SPECIAL_TOKENS, train/train.py, text_understanding_generator.py (126081),
# VLMEvalKit/vlmeval/vlm/lumina_dimmo/model.py (126339). Text ids 0..126079 are LLaDA's BPE.
# ---------------------------------------------------------------------------------------------------------------
REAL_IDS = {
    "bos": 126080,          # <|startoftext|> (LLaDA)
    "eos": 126081,          # <|endoftext|> (LLaDA); the understanding sampler's early-stop id
    "newline": 126084,      # <end-of-line>, after every row of image tokens (config.py "newline_token")
    "mask": 126336,         # <|mdm_mask|> (config.py "mask_token")
    "pad": 126339,          # fills the answer after </answer> in training (train/train.py); name unknown
    "start_header": 126346, "end_header": 126347, "eot": 126348,   # LLaDA's chat ids, unused by Lumina-DiMOO
    "boi": 126349,          # <IMAGE>  (config.py "boi")
    "eoi": 126350,          # </IMAGE> (config.py "eoi")
    "uncondition": 126351,  # <uncondition> (config.py "uncondition"); reached through the text "<uncondition>"
    "boa": 126354,          # <answer>  (config.py "answer_start")
    "eoa": 126355,          # </answer> (config.py "answer_end")
    "image_offset": 126356,  # code k is id 126356 + k (config.py "image_token_offset"), k < 8192
}
REAL_CODEBOOK = 8192
REAL_VOCAB = REAL_IDS["image_offset"] + REAL_CODEBOOK   # 134548: logits width the t2i sampler needs (see below)

# Tiny ids: 126080.. map to 64.., 126336.. map to 80.. (same gaps); <system>.. sit in the reserved range (their
# real ids are not in the code: assumed single added tokens, as the "[:-1] ... [-1:]" image splice suggests).
TINY_IDS = {"bos": 64, "eos": 65, "newline": 68, "system": 69, "system_end": 70, "user": 71, "user_end": 72,
            "mask": 80, "pad": 83, "start_header": 90, "end_header": 91, "eot": 92, "boi": 93, "eoi": 94,
            "uncondition": 95, "boa": 98, "eoa": 99, "image_offset": 100}
TINY_CODEBOOK = 64   # tests/vqgan_upstream.py tiny_config's num_vq_embeddings
NAMES = {"bos": "<|startoftext|>", "eos": "<|endoftext|>", "newline": "<end-of-line>", "system": "<system>",
         "system_end": "</system>", "user": "<user>", "user_end": "</user>", "mask": "<|mdm_mask|>",
         "pad": "<|pad|>", "start_header": "<|start_header_id|>", "end_header": "<|end_header_id|>",
         "eot": "<|eot_id|>", "boi": "<IMAGE>", "eoi": "</IMAGE>", "uncondition": "<uncondition>",
         "boa": "<answer>", "eoa": "</answer>"}
VAE_SCALE = 16   # utils/image_utils.py calculate_vq_params: grid = (height // 16, width // 16)

# utils/prompt_utils.py create_prompt_templates / generate_multimodal_understanding_prompt
T2I_SYSTEM = "Generate an image according to the text prompt."
MMU_SYSTEM = ("You are a multimodal model that can process both text and images. Answer the following question "
              "based on the provided images. Analyze each image and combine relevant details to answer.")
WORDS = ("Generate an image according to the text prompt . You are a multimodal model that can process both and "
         "images Answer following question based on provided Analyze each combine relevant details answer red blue "
         "green circle square small large left right of what colour is ? yes no Please describe this in").split()


def tiny_config(**overrides) -> dict:
  """config.json: LLaDAConfig's fields (model/configuration_llada.py ModelConfig), nothing added by Lumina-DiMOO,
  ``architectures`` ["LLaDAForMultiModalGeneration"]. ``vocab_size == embedding_size`` = image offset + codebook
  (real: 134548, assumed): generate_image reads the code offset as ``logits.shape[-1] - 8192``."""
  v = TINY_IDS["image_offset"] + TINY_CODEBOOK
  cfg = {
      "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
      "architectures": ["LLaDAForMultiModalGeneration"], "attention_dropout": 0.0, "attention_layer_norm": False,
      "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False, "block_group_size": 1,
      "block_type": "llama", "d_model": 32, "embedding_dropout": 0.0, "embedding_size": v,
      "eos_token_id": TINY_IDS["eos"], "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
      "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
      "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
      "mask_token_id": TINY_IDS["mask"], "max_sequence_length": 4096, "mlp_hidden_size": 48, "mlp_ratio": 4,
      "model_type": "llada", "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2,
      "pad_token_id": TINY_IDS["eos"], "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05,
      "rope": True, "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
      "torch_dtype": "bfloat16", "use_cache": False, "vocab_size": v, "weight_tying": False,
  }
  cfg.update(overrides)
  return cfg


def tokenizer_json(cfg: dict) -> str:
  """A word-level ``tokenizers`` model over ids 0..V-1: [UNK] 0, words 1.., ``NAMES`` as added special tokens at
  ``TINY_IDS``, codes ``<image_k>`` and ``<|reserved_token_i|>`` fillers as plain entries (their real names are
  unknown). No post-processor: whether the real tokenizer adds BOS/EOS is not in the code; the builders below take
  whatever ids it returns."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  vocab = {"[UNK]": 0}
  for w in WORDS:
    vocab.setdefault(w, len(vocab))
  assert len(vocab) <= TINY_IDS["bos"], "tiny text vocabulary overflows into the special ids"
  names = {TINY_IDS[k]: NAMES[k] for k in NAMES}
  codes = range(TINY_IDS["image_offset"], cfg["embedding_size"])
  names.update({i: f"<image_{i - TINY_IDS['image_offset']}>" for i in codes})
  for i in range(len(vocab), cfg["embedding_size"]):
    vocab[names.get(i, f"<|reserved_token_{i}|>")] = i
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens([NAMES[k] for k in NAMES])
  return tok.to_str()


def write_checkpoint(directory, cfg: dict, tensors: dict[str, np.ndarray], shards: int = 2) -> None:
  """The HF directory as ``LLaDAForMultiModalGeneration.from_pretrained`` reads it: config.json,
  ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` with LLaDA's names
  (``model.transformer.wte.weight`` [V, D], ``model.transformer.blocks.{i}.{attn_norm,ff_norm,q_proj,k_proj,v_proj,
  attn_out,ff_proj,up_proj,ff_out}.weight``, ``model.transformer.ln_f.weight``, ``model.transformer.ff_out.weight``
  [V, D]; base_model_prefix "model"), bfloat16 or float32, tokenizer.json + tokenizer_config.json. The real repo
  also holds ``vqvae/`` (diffusers VQModel: tests/vqgan_upstream.py ``write_model``)."""
  directory = pathlib.Path(directory)
  _llada.write_checkpoint(directory, cfg, tensors, shards)   # config, shards, index (and LLaDA's tokenizer files)
  (directory / "tokenizer.json").write_text(tokenizer_json(cfg))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": NAMES["bos"], "eos_token": NAMES["eos"], "pad_token": NAMES["eos"],
       "model_max_length": cfg["max_sequence_length"], "tokenizer_class": "PreTrainedTokenizerFast"}))


def reference_logits(cfg: dict, tensors: dict[str, np.ndarray], ids, attention_mask=None) -> np.ndarray:
  """float32 [B, S, V]: ``LLaDAForMultiModalGeneration.forward(ids, infer=True).logits``.

  The wrapper right-pads ragged rows with id 0 and builds ``attention_bias`` from their lengths, but
  ``LLaDABlock.attention`` calls ``F.scaled_dot_product_attention(..., attn_mask=None)``: the mask never reaches
  the attention. So every position attends to every position, pads included, exactly LLaDA's forward
  (``llada_upstream.reference_logits``). ``attention_mask`` is accepted and ignored for the same reason.
  """
  del attention_mask
  bad = {k: cfg[k] for k in ("alibi", "weight_tying", "scale_logits", "input_emb_norm") if cfg[k]}
  assert not bad and cfg["n_kv_heads"] == cfg["n_heads"], f"not the released model's settings: {bad}"
  rows = [list(map(int, r)) for r in ids]   # ids: int [B, S] (array) or ragged lists
  s = max(len(r) for r in rows)
  return _llada.reference_logits(cfg, tensors, np.array([r + [0] * (s - len(r)) for r in rows], np.int64))


# ---------------------------------------------------------------------------------------------------------------
# Prompts (pure functions over id lists)
# ---------------------------------------------------------------------------------------------------------------
def t2i_texts(prompt: str) -> tuple[str, str]:
  """prompt_utils.generate_text_to_image_prompt: the conditional and the unconditional text, to be tokenized."""
  head = "<system>" + T2I_SYSTEM + "</system>" + "<user>"
  return head + prompt + "</user>", head + "<uncondition>" + "</user>"


def mmu_text(question: str) -> str:
  """prompt_utils.generate_multimodal_understanding_prompt: the understanding text, to be tokenized."""
  return "<system>" + MMU_SYSTEM + "</system>" + "<user>" + question + "</user>"


def add_break_line(seq: list, h: int, w: int, newline: int) -> list:
  """image_utils.add_break_line: ``h`` chunks of ``w`` items from the front, each followed by ``newline``; anything
  past ``h * w`` is dropped."""
  return [t for i in range(h) for t in list(seq[i * w:(i + 1) * w]) + [newline]]


def t2i_sequence(cond_ids: list, h: int, w: int, ids: dict = TINY_IDS) -> tuple[list, int]:
  """inference_t2i.py: ``cond + [<answer>, <IMAGE>] + (MASK * w + [<end-of-line>]) * h + [</IMAGE>, </answer>]``.

  ``h, w`` = height // 16, width // 16 (the size is signalled only by the row ends; no size tokens). Returns the
  ids (int [L]) and ``code_start = len(cond) + 2``, the first grid position. The unconditional input is
  ``tokenizer(t2i_texts(p)[1])`` followed, at every step, by the current ``x[code_start - 2:]``.
  """
  grid = add_break_line([ids["mask"]] * (h * w), h, w, ids["newline"])
  return list(cond_ids) + [ids["boa"], ids["boi"]] + grid + [ids["eoi"], ids["eoa"]], len(cond_ids) + 2


def mmu_sequence(prompt_ids: list, codes: np.ndarray, gen_length: int, *, rebreak: bool,
                 ids: dict = TINY_IDS) -> tuple[list, int]:
  """inference_mmu.py: ``prompt[:-1] + image + prompt[-1:] + [<answer>] + MASK * gen_length + [</answer>]``.

  ``codes`` int [h, w] (VQ indices, raster order); ``image`` = encode_img_with_breaks = ``[<IMAGE>] + rows of (code
  + offset, then <end-of-line>) + [</IMAGE>]``. ``rebreak=True`` is the script as written: it applies
  ``add_break_line(image, h, w)`` a second time, which keeps the first h*w items of the broken list (leading
  <IMAGE> included, misaligned row ends) and drops the last h + 2 (the final codes and </IMAGE>).
  ``rebreak=False`` is train/train.py's understanding layout (and VLMEvalKit's image splice). Returns the ids and
  ``code_start = len(prompt) + len(image) + 1``, the first answer MASK.
  """
  h, w = codes.shape
  rows = [[int(c) + ids["image_offset"] for c in row] + [ids["newline"]] for row in codes]
  image = [ids["boi"]] + [t for r in rows for t in r] + [ids["eoi"]]
  if rebreak:
    image = add_break_line(image, h, w, ids["newline"])
  seq = list(prompt_ids[:-1]) + image + list(prompt_ids[-1:])
  return seq + [ids["boa"]] + [ids["mask"]] * gen_length + [ids["eoa"]], len(seq) + 1


# ---------------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------------
def gumbel(u: np.ndarray) -> np.ndarray:
  """generation_utils.gumbel_noise from uniforms u in [0, 1): -log(-log(u + 1e-20) + 1e-20)."""
  return -np.log(-np.log(u + 1e-20) + 1e-20)


def keep_masked(n: int, step: int, timesteps: int) -> int:
  """generate_image's count still masked after ``step``: floor(n * cos(pi/2 * (step+1)/T)), at least 1, and 0 at
  the last step; float32 as upstream (cosine_schedule on a float32 tensor)."""
  if step >= timesteps - 1:
    return 0
  frac = np.cos(np.float32(0.5 * math.pi) * np.float32((step + 1) / timesteps))
  return max(int(np.floor(np.float32(n) * frac)), 1)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference_t2i_generate(cfg, tensors, seq, uncond_ids, code_start: int, *, timesteps: int, cfg_scale: float = 0.0,
                           temperature: float = 0.0, codebook_size: int = TINY_CODEBOOK,
                           newline_id: int = TINY_IDS["newline"], u_sample=None, u_remask=None,
                           seed: int = 0) -> np.ndarray:
  """int [1, h*w]: image_generation_generator.generate_image (use_cache=False), the code token ids (subtract the
  image offset for VQ indices), newlines removed, as upstream returns them. Batch 1 only, as upstream asserts.

  N = the MASKs of ``seq`` (int [1, L]) in raster order. Per step t: stop if none masked; cond logits
  ``x -> logits[:, masked, off:off+K]`` with off = V - K (the code slice); with ``cfg_scale`` s > 0 also
  ``uncond_ids + x[code_start-2:]`` at the same masked positions and ``(1 + s) * cond - s * uncond``; sample
  ``argmax(l / T + gumbel(u))`` (argmax when temperature == 0) at every masked position and write it; conf = softmax(l)
  at the sample; then re-mask the ``keep_masked(N, t, T)`` least confident of this step's positions by
  ``mask_by_random_topk``: c = log(max(conf, 1e-20)) + temperature * gumbel(u'), cut = sort(c)[clip(k, 0, n-1)],
  re-mask c < cut. Decoded tokens are never re-masked. Randomness: uniforms ``u_sample`` [T, N, K] and
  ``u_remask`` [T, N] indexed by code position (upstream draws fresh torch.rand for only the masked rows;
  same distribution); if None, drawn from ``np.random.default_rng(seed)``. Upstream runs the logits and the CFG
  mix in bfloat16; here float64 on float32 logits.
  """
  x = np.array(seq, np.int64).reshape(1, -1)
  mask = cfg["mask_token_id"]
  code_pos = np.flatnonzero(x[0] == mask)                              # int [N]
  n_codes, k = len(code_pos), codebook_size
  rng = np.random.default_rng(seed)
  if temperature > 0 and u_sample is None:
    u_sample = rng.random((timesteps, n_codes, k))
  if temperature > 0 and u_remask is None:
    u_remask = rng.random((timesteps, n_codes))
  for step in range(timesteps):
    pos = np.flatnonzero(x[0] == mask)                                 # int [n] masked positions
    if pos.size == 0:
      break
    rows = np.searchsorted(code_pos, pos)
    keep = keep_masked(n_codes, step, timesteps)
    full = reference_logits(cfg, tensors, x)[0]
    off = full.shape[-1] - k
    logits = full[pos, off:off + k].astype(np.float64)                # [n, K]
    if cfg_scale > 0:
      un = np.concatenate([np.asarray(uncond_ids, np.int64), x[0, code_start - 2:]])[None]
      upos = len(uncond_ids) + pos - (code_start - 2)
      un_logits = reference_logits(cfg, tensors, un)[0, upos, off:off + k].astype(np.float64)
      logits = (1 + cfg_scale) * logits - cfg_scale * un_logits
    if temperature == 0:
      sampled = logits.argmax(-1)
    else:
      sampled = (logits / temperature + gumbel(u_sample[step][rows])).argmax(-1)
    conf = _softmax(logits)[np.arange(pos.size), sampled]               # [n]
    x[0, pos] = sampled + off
    c = np.log(np.maximum(conf, 1e-20))
    if temperature != 0:
      c = c + temperature * gumbel(u_remask[step][rows])
    cut = np.sort(c)[min(max(keep, 0), pos.size - 1)]
    x[0, pos[c < cut]] = mask
  codes = x[0, code_start:-2]
  return codes[codes != newline_id][None]


def reference_mmu_generate(cfg, tensors, seq, code_start: int, *, steps: int, gen_length: int, block_length: int,
                           temperature: float = 0.0, cfg_scale: float = 0.0, u_noise=None, seed: int = 0,
                           suppress_mask: bool = False) -> np.ndarray:
  """int [1, L]: text_understanding_generator.generate_text_understanding (remasking='low_confidence').

  LLaDA's block sampler with the blocks counted from ``code_start`` (the first answer MASK): gen_length /
  block_length blocks left to right, steps / num_blocks steps each; per block, n = its MASKs, reveal n // S per
  step and one more in the first n % S steps. Per step: logits over the whole vocabulary (no slicing); with
  ``cfg_scale`` s: ``un + (s + 1) * (cond - un)``, un = the pass with every originally unmasked token (prompt,
  image, <answer>, </answer>) set to MASK; x0 = argmax(exp(l) / (-log u) ** temperature) (argmax(l) at 0; u
  float64 uniforms [L, V] per step, ``u_noise`` [steps, L, V] or drawn from ``default_rng(seed)``); confidence =
  softmax(l)[x0] at MASK positions, -inf past the current block and elsewhere; reveal the top ones (ties: lowest
  position). Upstream's early stop (once id 126081 appears) references undefined names (``input_p_len``,
  ``rows``) and would raise; here every block runs. ``suppress_mask`` sets the MASK logit to -inf (upstream
  does not; random weights can otherwise "reveal" MASK).
  """
  x = np.array(seq, np.int64).reshape(1, -1)
  mask = cfg["mask_token_id"]
  prompt_index = x[0] != mask
  assert gen_length % block_length == 0 and steps % (gen_length // block_length) == 0
  per_block = steps // (gen_length // block_length)
  rng, step_no = np.random.default_rng(seed), 0
  for nb in range(gen_length // block_length):
    lo, hi = code_start + nb * block_length, code_start + (nb + 1) * block_length
    n = int((x[0, lo:hi] == mask).sum())
    transfer = [n // per_block + (i < n % per_block) for i in range(per_block)]
    for i in range(per_block):
      mask_index = x[0] == mask
      logits = reference_logits(cfg, tensors, x)[0].astype(np.float64)   # [L, V]
      if cfg_scale > 0:
        un = np.where(prompt_index, mask, x[0])[None]
        un_logits = reference_logits(cfg, tensors, un)[0].astype(np.float64)
        logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
      if suppress_mask:
        logits[:, mask] = -np.inf
      if temperature == 0:
        x0 = logits.argmax(-1)
      else:
        u = u_noise[step_no] if u_noise is not None else rng.random(logits.shape)
        x0 = (np.exp(logits) / (-np.log(u)) ** temperature).argmax(-1)
      step_no += 1
      x0_p = _softmax(logits)[np.arange(x.shape[1]), x0]
      x0_p[hi:] = -np.inf
      confidence = np.where(mask_index, x0_p, -np.inf)
      top = np.argsort(-confidence, kind="stable")[:transfer[i]]
      x[0, top] = np.where(mask_index, x0, x[0])[top]
  return x


# ---------------------------------------------------------------------------------------------------------------
# Smoke run: python tests/lumina_dimoo_upstream.py
# ---------------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
  import tempfile  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

  # The tiny layout keeps the real gaps around each special id.
  for key in ("bos", "eos", "newline"):
    assert TINY_IDS[key] - TINY_IDS["bos"] == REAL_IDS[key] - REAL_IDS["bos"], key
  for key in ("pad", "start_header", "end_header", "eot", "boi", "eoi", "uncondition", "boa", "eoa", "image_offset"):
    assert TINY_IDS[key] - TINY_IDS["mask"] == REAL_IDS[key] - REAL_IDS["mask"], key
  assert REAL_VOCAB == 134548

  cfg = tiny_config()
  tensors = random_tensors(cfg, seed=0)
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = pathlib.Path(tmp) / "Lumina-DiMOO"
    write_checkpoint(ckpt, cfg, tensors, shards=2)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensor_shapes(cfg)), "index misses tensors"
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
  assert tok.get_vocab_size() == cfg["vocab_size"]

  cond_text, uncond_text = t2i_texts("a small red circle on the left")
  cond, uncond = tok.encode(cond_text).ids, tok.encode(uncond_text).ids
  assert 0 not in cond and cond[0] == TINY_IDS["system"] and cond[-1] == TINY_IDS["user_end"], cond
  assert uncond[-2:] == [TINY_IDS["uncondition"], TINY_IDS["user_end"]], uncond
  h, w = 3, 4                                                          # a 48 x 64 image
  seq, code_start = t2i_sequence(cond, h, w)
  print("t2i  cond", cond, "\n     grid", seq[code_start - 2:], "code_start", code_start)
  for temp in (0.0, 1.0):
    codes = reference_t2i_generate(cfg, tensors, seq, uncond, code_start, timesteps=4, cfg_scale=4.0,
                                   temperature=temp, seed=1)
    assert codes.shape == (1, h * w) and (codes >= TINY_IDS["image_offset"]).all(), codes
    print(f"t2i  temperature {temp}: VQ codes", (codes - TINY_IDS["image_offset"]).reshape(h, w).tolist())

  question = tok.encode(mmu_text("what colour is the circle ?")).ids
  image = np.random.default_rng(2).integers(0, TINY_CODEBOOK, (h, w))
  for rebreak in (False, True):
    mseq, mstart = mmu_sequence(question, image, 8, rebreak=rebreak)
    print(f"mmu  rebreak={rebreak}: image+answer", mseq[len(question) - 1:], "code_start", mstart)
  mseq, mstart = mmu_sequence(question, image, 8, rebreak=False)
  assert mseq[mstart - 1] == TINY_IDS["boa"] and mseq[-1] == TINY_IDS["eoa"]
  out = reference_mmu_generate(cfg, tensors, mseq, mstart, steps=4, gen_length=8, block_length=4,
                               suppress_mask=True)
  assert (out[0, :mstart] == mseq[:mstart]).all() and (out != cfg["mask_token_id"]).all()
  out_t = reference_mmu_generate(cfg, tensors, mseq, mstart, steps=4, gen_length=8, block_length=4,
                                 temperature=1.0, cfg_scale=1.0, seed=3)
  print("mmu  answer ids", out[0, mstart:-1].tolist(), repr(tok.decode(out[0, mstart:-1].tolist())))
  print("mmu  sampled (T=1, cfg=1)", out_t[0, mstart:-1].tolist())
  print("ok")
