"""A tiny MMaDA (Gen-Verse/MMaDA) checkpoint in the upstream's exact layout, its forward pass with the upstream's
attention mask, its prompt builders and its two samplers, in numpy.

Written from the upstream's source, independent of unimm_jax's modules (it never imports unimm_jax), so tests can
check unimm_jax's importer and pipeline against it. Builds on ``llada_upstream`` (tensor names, safetensors writer,
random weights, the forward's pieces): ``MMadaModelLM`` (models/modeling_mmada.py) subclasses ``LLaDAModelLM``
(models/modeling_llada.py) and adds no module, so the tensors are LLaDA's, ``model.transformer.*``, with the
embedding ``wte`` and the output ``ff_out`` resized to ``new_vocab_size`` rows (training/train_mmada.py:
``resize_token_embeddings(new_vocab_size)``, then ``config.embedding_size = config.vocab_size``).

Id layout (the real one minus 126000; real ids from LLaDA-8B-Instruct's tokenizer_config.json, which MMaDA reuses):
  0            [UNK] (tiny word-level model); words 1..; "\\n\\n" and "\\n" are added (non-special) tokens
  80, 81       <|startoftext|> (BOS), <|endoftext|> (EOS = pad_token of the tokenizer = config eos/pad_token_id)
  82, 83       [CLS], [gMASK]
  84..94       MMaDA's task tokens by id (training/prompting_utils.py ``reserved_token_mapping``, used with
               ``use_reserved_token=True``): <|soi|> <|eoi|> <|sov|> <|eov|> <|t2i|> <|mmu|> <|t2v|> <|v2v|> <|lvg|>
               [iPAD] <|r2i|>. In the real tokenizer these ids are named <|reserved_token_0..10|>: MMaDA never
               looks them up by name. ``task_token_names=True`` names them by MMaDA's names instead.
  95..335      <|reserved_token_11..251|>;  336 <|mdm_mask|> (MASK, config mask_token_id);  337..339 reserved
  340..345     <role> </role> <|arithmetic_start|> <|arithmetic_end|> <|number_start|> <|number_end|>
  346..348     <|start_header_id|> <|end_header_id|> <|eot_id|>
  349          = len(text tokenizer) (real 126349, GitHub Gen-Verse/MMaDA issue #49): image code c is id 349 + c
               (inference_mmu.py / train_mmada.py add ``len(uni_prompting.text_tokenizer)``; t2i_generate slices the
               logits there). So codes do NOT start at llm_vocab_size (464; real 126464, LLaDA's padded embedding):
               they occupy 349..349+codebook_size-1 and the last llm_vocab_size - 349 = 115 rows of the
               new_vocab_size = llm_vocab_size + codebook_size table (real 134541..134655) are never used.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

import llada_upstream as lu
# Re-exported, so tests need only this module for an MMaDA checkpoint.
from llada_upstream import random_tensors, tensor_shapes, write_safetensors  # pylint: disable=unused-import

TASK_TOKENS = ["<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>", "<|mmu|>", "<|t2v|>", "<|v2v|>", "<|lvg|>",
               "[iPAD]", "<|r2i|>"]
BOS, EOS, MASK, START_HEADER, END_HEADER, EOT = 80, 81, 336, 346, 347, 348
TEXT_VOCAB_SIZE = 349                       # len(text tokenizer): where image codes start
TASK = {name: 84 + i for i, name in enumerate(TASK_TOKENS)}   # reserved_token_mapping, minus 126000
WORDS = ["the", "a", "red", "blue", "green", "circle", "square", "triangle", "is", "on", "left", "right", "top",
         "bottom", "small", "large", "and", "of", "in", "at", "what", "colour", "?", ".", "yes", "no", "describe",
         "image", "this", "please", "user", "assistant"]
NEWLINES = {"\n\n": 78, "\n": 79}
USER, ASSISTANT = WORDS.index("user") + 1, WORDS.index("assistant") + 1
# LLaDA-8B-Instruct's (and so MMaDA's) chat template: BOS before the first message, content trimmed, and the
# assistant header always appended (the template has no ``add_generation_prompt`` condition).
CHAT_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                 "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                 "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                 "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}")


def tiny_config(**overrides) -> dict:
  """An MMaDA-8B ``config.json`` at tiny sizes: LLaDA-8B-Instruct's fields merged with ``config.model.mmada`` of
  configs/mmada_*.yaml (training/train_mmada.py: ``{**base_config, **mmada_config_dict}`` into ``MMadaConfig``,
  whose ``model_type`` is "mmada"; save_pretrained writes ``architectures: ["MMadaModelLM"]``), with
  ``vocab_size = embedding_size = new_vocab_size = llm_vocab_size + codebook_size`` after the resize. Unless
  overridden, the three sizes follow ``llm_vocab_size`` and ``codebook_size``."""
  cfg = {
      "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["MMadaModelLM"],
      "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
      "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "codebook_size": 64,
      "d_model": 32, "embedding_dropout": 0.0, "embedding_size": None, "eos_token_id": EOS, "flash_attention": False,
      "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
      "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
      "layer_norm_with_affine": True, "llm_vocab_size": 464, "mask_token_id": MASK, "max_sequence_length": 128,
      "mlp_hidden_size": 48, "mlp_ratio": 4, "model_type": "mmada", "multi_query_attention": None, "n_heads": 4,
      "n_kv_heads": 4, "n_layers": 2, "new_vocab_size": None, "num_new_special_tokens": 0, "num_vq_tokens": 16,
      "pad_token_id": EOS, "precision": "amp_bf16", "pretrained_model_path": "GSAI-ML/LLaDA-8B-Instruct",
      "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
      "rope_theta": 500000.0, "scale_logits": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
      "transformers_version": "4.46.3", "use_cache": False, "vocab_size": None, "w_clip_vit": False,
      "weight_tying": False,
  }
  cfg.update(overrides)
  for key in ("new_vocab_size", "vocab_size", "embedding_size"):
    if cfg[key] is None:
      cfg[key] = cfg["llm_vocab_size"] + cfg["codebook_size"]
  assert TEXT_VOCAB_SIZE + cfg["codebook_size"] <= cfg["new_vocab_size"]
  assert cfg["codebook_size"] < cfg["mask_token_id"]   # t2i_generate compares codes with MASK after the offset
  return cfg


# ---- Checkpoint files ----
def _special_names(task_token_names: bool) -> dict[int, str]:
  names = {BOS: "<|startoftext|>", EOS: "<|endoftext|>", 82: "[CLS]", 83: "[gMASK]", MASK: "<|mdm_mask|>",
           340: "<role>", 341: "</role>", 342: "<|arithmetic_start|>", 343: "<|arithmetic_end|>",
           344: "<|number_start|>", 345: "<|number_end|>", START_HEADER: "<|start_header_id|>",
           END_HEADER: "<|end_header_id|>", EOT: "<|eot_id|>"}
  for i in range(84, 340):
    names.setdefault(i, f"<|reserved_token_{i - 84}|>")
  if task_token_names:
    names.update({i: n for n, i in TASK.items()})
  return dict(sorted(names.items()))


def tokenizer_json(task_token_names: bool = False) -> str:
  """A word-level ``tokenizers`` model with exactly ids 0..348 (so ``len(tokenizer) == 349``): [UNK] 0, WORDS from 1,
  fillers ``[unusedN]`` (never produced), "\\n\\n" 78 and "\\n" 79 as added tokens (matched longest first, so a
  blank line is one token), and LLaDA-8B-Instruct's special tokens at 80..348 as special added tokens. Whitespace
  pre-tokenizer; no post-processor, so ``encode`` adds no BOS (LLaDA's ``add_bos_token: false``)."""
  from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  specials = _special_names(task_token_names)
  vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}, **NEWLINES}
  vocab.update({f"[unused{i}]": i for i in range(len(WORDS) + 1, 78)})
  vocab.update({name: i for i, name in specials.items()})
  assert sorted(vocab.values()) == list(range(TEXT_VOCAB_SIZE))
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_tokens([AddedToken(s, normalized=False) for s in NEWLINES])
  tok.add_special_tokens(list(specials.values()))
  return tok.to_str()


def write_checkpoint(directory, cfg: dict, tensors: dict[str, np.ndarray], shards: int = 2,
                     task_token_names: bool = False) -> None:
  """The upstream HF directory: config.json, model.safetensors.index.json and ``shards`` files (written by
  llada_upstream.write_checkpoint: same names ``model.transformer.*``, bf16 as given), then this module's
  tokenizer.json, tokenizer_config.json (LLaDA-8B-Instruct's fields and chat template) and special_tokens_map.json."""
  directory = pathlib.Path(directory)
  assert tensors["model.transformer.wte.weight"].shape[0] == cfg["new_vocab_size"]
  lu.write_checkpoint(directory, cfg, tensors, shards)
  (directory / "tokenizer.json").write_text(tokenizer_json(task_token_names))
  specials = _special_names(task_token_names)
  decoder = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, s in specials.items()}
  decoder.update({str(i): {**decoder[str(BOS)], "content": s, "special": False} for s, i in NEWLINES.items()})
  extra = ["<role>", "</role>", "<|arithmetic_start|>", "<|arithmetic_end|>", "<|number_start|>", "<|number_end|>"]
  common = {"additional_special_tokens": extra, "bos_token": "<|startoftext|>", "cls_token": "[CLS]",
            "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": dict(sorted(decoder.items(),
       key=lambda kv: int(kv[0]))), **common, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
       "model_max_length": cfg["max_sequence_length"], "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
  (directory / "special_tokens_map.json").write_text(json.dumps(common, indent=2))


# ---- Forward pass with the upstream's attention bias ----
def attention_bias(attention_mask: np.ndarray) -> np.ndarray:
  """float32 [B, 1, L, L] from int/bool [B, L]: modeling_mmada.py builds the bool ``mask[:, :, None] &
  mask[:, None, :]``; modeling_llada.py ``LLaDAModel.forward`` turns a bool bias into float (True -> 1.0) and fills
  the zeros with ``finfo(float32).min``; sdpa adds it to the scaled scores. The +1.0 on allowed keys is a constant
  per row (no effect). A pad query (all keys masked) has every score equal to finfo.min, so it attends uniformly to
  ALL L positions, pads included: finite but meaningless outputs there."""
  m = np.asarray(attention_mask).astype(bool)
  allowed = m[:, :, None] & m[:, None, :]
  return np.where(allowed, np.float32(1.0), np.finfo(np.float32).min).astype(np.float32)[:, None]


def reference_logits(cfg: dict, tensors: dict[str, np.ndarray], ids: np.ndarray,
                     attention_mask: np.ndarray | None = None) -> np.ndarray:
  """float32 [B, L, new_vocab_size]: MMadaModelLM's logits (= LLaDAModelLM's forward, llada_upstream.reference_logits,
  float32 throughout) for int ids [B, L], with ``attention_bias(attention_mask)`` when a mask is given. Positions
  are absolute (pads included), RoPE is relative, so left padding leaves the non-pad rows equal to the unpadded
  sequence's."""
  bias = None if attention_mask is None else attention_bias(attention_mask)
  return lu.reference_logits(cfg, tensors, np.asarray(ids), bias)


# ---- Prompts: text is tokenized alone (no BOS); the builders add BOS, task and template tokens ----
def t2i_gen_prompt(text_ids_list: list[list[int]], num_vq_tokens: int, cfg: dict,
                   max_text_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids int [B, L], attention_mask int [B, L]), L = max_text_len + 3 + num_vq_tokens:
  ``UniversalPrompting.t2i_gen_prompt`` (training/prompting_utils.py, use_reserved_token=True) for image tokens all
  MASK, as inference_t2i.py calls it (``max_text_len`` = dataset.preprocessing.max_seq_length; the class keeps
  M = max_text_len + 1). Per row: ids = [BOS] if empty, else BOS prepended unless already first; then
  t = [<|t2i|>] + ids + [EOS]; if len(t) <= M: left-pad with [iPAD] to M, mask 0 on pads and 1 elsewhere; else
  t = t[:M-1] + [EOS] (no pad, mask all 1). Then t + [<|soi|>] + [MASK]*num_vq_tokens + [<|eoi|>]. The
  unconditional prompt for guidance is this with text '' (``t2i_uncond_prompt``)."""
  m = max_text_len + 1
  rows, masks = [], []
  for ids in text_ids_list:
    ids = [BOS] if not ids else (list(ids) if ids[0] == BOS else [BOS] + list(ids))
    t = [TASK["<|t2i|>"]] + ids + [EOS]
    if len(t) <= m:
      pads = m - len(t)
      t, mask = [TASK["[iPAD]"]] * pads + t, [0] * pads + [1] * (len(t) + num_vq_tokens + 2)
    else:
      t = t[:m - 1] + [EOS]
      mask = [1] * (m + num_vq_tokens + 2)
    rows.append(t + [TASK["<|soi|>"]] + [cfg["mask_token_id"]] * num_vq_tokens + [TASK["<|eoi|>"]])
    masks.append(mask)
  return np.array(rows, np.int64), np.array(masks, np.int64)


def t2i_uncond_prompt(batch: int, num_vq_tokens: int, cfg: dict, max_text_len: int):
  """inference_t2i.py's guidance prompt: ``uni_prompting(([''] * B, image_tokens), 't2i_gen')``: [iPAD]*(M-3)
  <|t2i|> BOS EOS <|soi|> MASK.. <|eoi|>, mask 0 on the pads."""
  return t2i_gen_prompt([[] for _ in range(batch)], num_vq_tokens, cfg, max_text_len)


def chat_ids(question_ids: list[int]) -> list[int]:
  """``apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)`` with CHAT_TEMPLATE, as
  inference_mmu.py calls it: BOS <|start_header_id|> user <|end_header_id|> "\\n\\n" q.. <|eot_id|>
  <|start_header_id|> assistant <|end_header_id|> "\\n\\n". ``question_ids``: the trimmed content tokenized alone."""
  nl = NEWLINES["\n\n"]
  return [BOS, START_HEADER, USER, END_HEADER, nl, *question_ids, EOT, START_HEADER, ASSISTANT, END_HEADER, nl]


def chat_text(question: str) -> str:
  """The string CHAT_TEMPLATE renders for one user message (tokenizing it gives ``chat_ids``)."""
  return (f"<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n{question.strip()}<|eot_id|>"
          "<|start_header_id|>assistant<|end_header_id|>\n\n")


def mmu_prompt(image_codes, question_ids: list[list[int]], cfg: dict, max_new_tokens: int = 0) -> np.ndarray:
  """int [B, P + max_new_tokens]: inference_mmu.py's ``[<|mmu|>] [<|soi|>] codes + len(tokenizer) [<|eoi|>]``
  + ``chat_ids(question)``, then ``max_new_tokens`` MASKs as ``MMadaModelLM.mmu_generate`` appends them.
  ``image_codes`` int [B, N] in [0, codebook_size); rows must tokenize to equal lengths (torch.cat)."""
  rows = [[TASK["<|mmu|>"], TASK["<|soi|>"], *(int(c) + TEXT_VOCAB_SIZE for c in codes), TASK["<|eoi|>"],
           *chat_ids(list(q)), *[cfg["mask_token_id"]] * max_new_tokens]
          for codes, q in zip(np.asarray(image_codes), question_ids)]
  return np.array(rows, np.int64)


# ---- Samplers ----
def upstream_gumbel(u: np.ndarray) -> np.ndarray:
  """models/sampling.py ``gumbel_noise`` from uniforms u: -log(-log(u)), each log clamped at 1e-20."""
  return -np.log(np.maximum(-np.log(np.maximum(u, 1e-20)), 1e-20))


def mask_len(step: int, timesteps: int, num_vq_tokens: int, unknown: np.ndarray) -> np.ndarray:
  """int [B]: how many image tokens t2i_generate leaves MASK after ``step`` (0-based), from ``unknown`` int [B] MASK
  before it: max(1, min(unknown - 1, floor(N * cos(pi/2 * (step + 1) / T)))), the cosine in float32 as torch does
  (``cosine_schedule(torch.tensor(ratio))``). The last step gives cos = -4.4e-8 < 0, hence 1: one token stays MASK
  in input_ids; the returned codes fill it. float32 matters: cos(pi/3) is 0.49999997, so when T is a multiple of 3
  step 2T/3 - 1 leaves N/2 - 1, not N/2 (the demo's 12 steps at N = 1024: 511 after step 7)."""
  r = np.float32(np.float32((step + 1) / timesteps) * np.float32(np.pi)) * np.float32(0.5)
  wanted = np.floor(np.float32(num_vq_tokens) * np.cos(r, dtype=np.float32))
  return np.maximum(1, np.minimum(np.asarray(unknown) - 1, wanted)).astype(np.int64)


def reference_t2i_generate(cfg: dict, tensors, input_ids, attention_mask, uncond_input_ids=None,
                           uncond_attention_mask=None, *, timesteps: int, guidance_scale: float = 0.0,
                           temperature: float = 1.0, sample_noise=None, remask_noise=None, prefix_len=None):
  """(codes int [B, N], input_ids int [B, L]): ``MMadaModelLM.t2i_generate`` (models/modeling_mmada.py, MaskGIT).

  Image slots are input_ids[:, -(N+1):-1] (N = num_vq_tokens), codes = id - len(tokenizer) (MASK stays MASK). Each
  step: logits = forward(input_ids, attention_mask) (bias as ``attention_bias``); with guidance_scale w > 0 and an
  uncond prompt, uncond = uncond_input_ids[:, :prefix_len] ++ input_ids[:, prefix_len:] (the current image), logits
  = (1 + w) * cond - w * uncond (full vocab); then logits[:, -(N+1):-1, off:off+K] (off = 349, K = codebook_size),
  probs = softmax. Draw: sampled = argmax(logits + sample_noise[step]) (Gumbel-max; the upstream's
  ``torch.multinomial(probs)`` is the same law, not the same draw), or argmax(probs) if sample_noise is None;
  known slots keep their code. Confidence = probs at the sample, finfo(float32).max on known slots. Temperature is
  annealed cumulatively BEFORE use: temp_i = temperature * prod_{j<=i}(1 - (j+1)/T). ``mask_by_random_topk``
  (models/sampling.py): conf = log(clamp(confidence, 1e-20)) + temp_i * g, g = remask_noise[step] (Gumbel
  [B, N]; ``upstream_gumbel(u)`` is the upstream's formula; None: 0); cut = sort(conf)[mask_len(...)]; slots with
  conf < cut become MASK, the others id sampled + off. Returns the last ``sampled`` (all slots filled, as upstream)
  and the final input_ids. ``prefix_len`` defaults to L - N - 2 (everything before <|soi|>): the upstream takes
  ``resolution + 1`` with resolution's default 512 = max_text_len + 1 of the demo config (max_seq_length 512)."""
  n, k, off, mask = cfg["num_vq_tokens"], cfg["codebook_size"], TEXT_VOCAB_SIZE, cfg["mask_token_id"]
  ids = np.array(input_ids, np.int64)                                  # int [B, L]
  b, length = ids.shape
  img = slice(length - n - 1, length - 1)
  prefix = length - n - 2 if prefix_len is None else prefix_len
  cur = np.where(ids[:, img] == mask, mask, ids[:, img] - off)          # int [B, N]
  for step in range(timesteps):
    logits = reference_logits(cfg, tensors, ids, attention_mask).astype(np.float64)
    if uncond_input_ids is not None and guidance_scale > 0:
      un = np.concatenate([np.asarray(uncond_input_ids)[:, :prefix], ids[:, prefix:]], axis=1)
      un_logits = reference_logits(cfg, tensors, un, uncond_attention_mask).astype(np.float64)
      logits = (1 + guidance_scale) * logits - guidance_scale * un_logits
    logits = logits[:, img, off:off + k]                                 # float [B, N, K]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    sampled = (logits if sample_noise is None else logits + sample_noise[step]).argmax(-1)
    unknown = cur == mask
    sampled = np.where(unknown, sampled, cur)                            # int [B, N]
    ratio = (step + 1) / timesteps
    n_mask = mask_len(step, timesteps, n, unknown.sum(-1))               # int [B]
    chosen = np.take_along_axis(probs, sampled[..., None], -1)[..., 0]
    chosen = np.where(unknown, chosen, np.finfo(np.float32).max)
    temperature = temperature * (1.0 - ratio)
    noise = 0.0 if remask_noise is None else temperature * np.asarray(remask_noise[step], np.float64)
    conf = np.log(np.maximum(chosen, 1e-20)) + noise
    cut = np.sort(conf, axis=-1)[np.arange(b), n_mask]
    masking = conf < cut[:, None]
    ids[:, img] = np.where(masking, mask, sampled + off)
    cur = np.where(masking, mask, sampled)
  return sampled, ids


# MMaDA's understanding sampler (``MMadaModelLM.mmu_generate``, as inference_mmu.py calls it: no attention mask,
# temperature 0, low-confidence remasking, cfg 0) is LLaDA's ``generate``: llada_upstream.reference_generate.
reference_mmu_generate = lu.reference_generate


if __name__ == "__main__":
  import tempfile
  import time
  from tokenizers import Tokenizer
  start = time.time()
  cfg = tiny_config()
  tensors = random_tensors(cfg)
  with tempfile.TemporaryDirectory() as tmp:
    write_checkpoint(pathlib.Path(tmp) / "hf", cfg, tensors)
    files = sorted(f.name for f in (pathlib.Path(tmp) / "hf").iterdir())
    tok = Tokenizer.from_str((pathlib.Path(tmp) / "hf" / "tokenizer.json").read_text())
  print("files:", files)
  assert tok.get_vocab_size(with_added_tokens=True) == TEXT_VOCAB_SIZE
  assert [tok.token_to_id(s) for s in ("<|startoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|eot_id|>",
                                       "<|reserved_token_0|>")] == [BOS, MASK, START_HEADER, EOT, TASK["<|soi|>"]]
  question = "what colour is the circle ?"
  q_ids = tok.encode(question).ids
  assert tok.encode(chat_text(" " + question + " ")).ids == chat_ids(q_ids), tok.encode(chat_text(question)).ids
  texts = ["a red circle", "the small blue square on the left of a large green triangle"]
  ids, am = t2i_gen_prompt([tok.encode(t).ids for t in texts], 16, cfg, max_text_len=8)
  un_ids, un_am = t2i_uncond_prompt(2, 16, cfg, max_text_len=8)
  print("t2i row 0:", ids[0].tolist(), "\nmask 0:", am[0].tolist(), "\ntruncated row 1:", ids[1, :9].tolist())
  assert ids.shape == (2, 27) and ids[1, 8] == EOS and am[1].all() and un_ids[0, 6:10].tolist() == [88, 80, 81, 84]
  # Logits: no mask = llada_upstream's forward; a left-padded row's real positions = the unpadded sequence's.
  np.testing.assert_array_equal(reference_logits(cfg, tensors, ids), lu.reference_logits(cfg, tensors, ids))
  masked = reference_logits(cfg, tensors, ids, am)
  pads = int((am[0] == 0).sum())
  np.testing.assert_allclose(masked[0, pads:], reference_logits(cfg, tensors, ids[:1, pads:])[0], atol=1e-4)
  assert np.isfinite(masked).all() and np.abs(masked[0] - lu.reference_logits(cfg, tensors, ids)[0]).max() > 1e-2
  rng = np.random.default_rng(0)
  g_sample, u_remask = rng.gumbel(size=(2, 2, 16, cfg["codebook_size"])), rng.random((2, 2, 16))
  codes, final = reference_t2i_generate(cfg, tensors, ids, am, un_ids, un_am, timesteps=2, guidance_scale=1.5,
                                        sample_noise=g_sample, remask_noise=upstream_gumbel(u_remask))
  print("t2i codes:", codes.tolist())
  assert codes.shape == (2, 16) and codes.min() >= 0 and codes.max() < cfg["codebook_size"]
  assert ((final == MASK).sum(1) == 1).all() and mask_len(0, 2, 16, np.array([16])).tolist() == [11]
  assert [int(mask_len(i, 3, 16, np.array([16]))[0]) for i in range(3)] == [13, 7, 1]   # 7: float32 cos(pi/3)
  prompt = mmu_prompt(rng.integers(0, cfg["codebook_size"], (1, 16)), [q_ids], cfg)
  out = reference_mmu_generate(cfg, tensors, prompt, steps=2, gen_length=4, block_length=2)
  print("mmu prompt:", prompt[0].tolist(), "\nmmu answer:", out[0, prompt.shape[1]:].tolist())
  assert (out[:, :prompt.shape[1]] == prompt).all() and not (out == MASK).any()
  print(f"ok in {time.time() - start:.1f}s")
