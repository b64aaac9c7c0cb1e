"""MMaDA (``Gen-Verse/MMaDA-8B-Base`` / ``-MixCoT``): a LLaDA-8B backbone whose vocabulary was extended with the
8,192 codes of the MAGVIT-v2 image tokenizer, and its per-task sequence formats, as a configuration of unimm_jax.

The network is LLaDA's (``llada.py``: the same tensors, names and forward) with ``new_vocab_size`` (134,656)
embedding and output rows. The vocabulary, as the upstream's code uses it (read from Gen-Verse/MMaDA:
``training/prompting_utils.py``, ``models/modeling_mmada.py``, ``inference_t2i.py``, ``inference_mmu.py``)::

    0 .. T-1            text ids: T = len(text tokenizer) = 126,349 (LLaDA's tokenizer), its MASK 126,336
      126,084..126,094  task tokens by id (``reserved_token_mapping``), in the tokenizer <|reserved_token_0..10|>:
                        <|soi|> <|eoi|> <|sov|> <|eov|> <|t2i|> <|mmu|> <|t2v|> <|v2v|> <|lvg|> [iPAD] <|r2i|>
    T .. T+8191         image code c is id T + c  (``image_tokens + len(uni_prompting.text_tokenizer)``)
    T+8192 .. V-1       never used (V = new_vocab_size = llm_vocab_size + codebook_size = 134,656)

which is the layout ``[text 0..T | image T..T+8192]`` with ``sequence.vocab_rows = V``, the task tokens as
``sequence.special_ids`` (names mapped to the tokenizer's reserved ids) and ``sequence.mask_id`` the upstream's.

Sequence formats, one view of the same network each (``sequence.views``; the network depends on no layout:
rotary over the flat sequence, no modality embedding)::

    t2i:  prompt (M + 1 tokens, padded on the LEFT with [iPAD]: <|t2i|> <|startoftext|> caption <|endoftext|>)
          <|soi|>  image (h x w codes)  <|eoi|>                                    (``t2i_gen_prompt``)
    mmu:  <|mmu|> <|soi|>  image  <|eoi|>
          question (Q tokens, left-padded with [iPAD]: LLaDA's chat template around the question)
          answer (A tokens, generated; padded with <|endoftext|>)                   (``inference_mmu.py``)

The upstream masks its t2i pads out of attention (``attention_bias = m[:, :, None] & m[:, None, :]``); here
``model.pad_key_id`` = [iPAD] does the same and gives pads no rotary position, so a padded question equals the
upstream's unpadded one. Guidance for images (MMaDA's ``t2i_generate``): the unconditional input is the prompt
of the empty caption (the frame's ``null=``), ``(1 + w) * cond - w * uncond`` on the logits, w = 3.5 by default in its demo; the image
is drawn MaskGIT-style (cosine schedule, Gumbel-perturbed confidence with a temperature falling to 0).
"""

from __future__ import annotations

import copy

from unimm_jax.convert import llada
from unimm_jax.convert.llada import ConvertError

# The tensors are LLaDA's (MMadaModelLM adds no module), over new_vocab_size rows.
tensor_map, param_path, check_tensors = llada.tensor_map, llada.param_path, llada.check_tensors

FORMAT = "mmada"
TASK_TOKENS = ("<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>", "<|mmu|>", "<|t2v|>", "<|v2v|>", "<|lvg|>",
               "[iPAD]", "<|r2i|>")
RESERVED_IDS = {name: 126_084 + i for i, name in enumerate(TASK_TOKENS)}   # prompting_utils.reserved_token_mapping
PAD = "[iPAD]"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# LLaDA-8B-Instruct's chat template for one user turn with the generation prompt (inference_mmu.py renders it
# with apply_chat_template and tokenizes the string), the question stripped of surrounding whitespace.
CHAT = (BOS + "<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
T2I = "<|t2i|>" + BOS + "{text}" + EOS

# MMaDA-8B's config.json, the fields beyond LLaDA-8B's (models/modeling_mmada.py MMadaConfig; configs/*.yaml).
MMADA_8B = {**llada.LLADA_8B, "architectures": ["MMadaModelLM"], "model_type": "mmada", "llm_vocab_size": 126_464,
            "new_vocab_size": 134_656, "vocab_size": 134_656, "embedding_size": 134_656, "codebook_size": 8192,
            "num_vq_tokens": 1024, "num_new_special_tokens": 0, "w_clip_vit": False, "tie_word_embeddings": False}


def special_ids(tokenizer) -> dict[str, int]:
  """The task tokens' ids: by name when the tokenizer has them (``<|soi|>``), else its reserved tokens in order
  (``<|reserved_token_0|>`` = ``<|soi|>`` = 126,084 in LLaDA's), else MMaDA's fixed ids."""
  out = {}
  for i, name in enumerate(TASK_TOKENS):
    for candidate in (name, f"<|reserved_token_{i}|>"):
      try:
        out[name] = tokenizer.token_id(candidate)
        break
      except KeyError:
        continue
    else:
      out[name] = RESERVED_IDS[name]
  return out


def grid_of(upstream: dict) -> tuple[int, int]:
  n = int(upstream.get("num_vq_tokens", 1024))
  side = int(round(n ** 0.5))
  if side * side != n:
    raise ConvertError(f"config.json num_vq_tokens={n} is not a square grid")
  return side, side


def apply_unified(config, upstream: dict, *, text_vocab: int, task_ids: dict[str, int], downsample: int,
                  max_text_len: int = 128, question_len: int = 64, answer_len: int = 128):
  """``config`` (changed in place and returned) set to the MMaDA checkpoint of ``upstream`` (its config.json):
  the backbone (:func:`llada.apply_backbone`), the vocabulary and both views (module docstring). ``text_vocab``:
  the text tokenizer's ids (where image codes start); ``task_ids``: :func:`special_ids`; ``downsample``: the image
  tokenizer's; ``max_text_len``: the upstream's ``max_text_len`` (the t2i prompt holds one more token, its task
  token); ``question_len`` / ``answer_len``: the understanding view's question and answer tokens."""
  h, w = grid_of(upstream)
  prompt, question = max_text_len + 1, question_len
  views = {
      "t2i": (("prompt", "text", prompt), ("soi", "special", "<|soi|>"), ("image", "image"),
              ("eoi", "special", "<|eoi|>")),
      "mmu": (("task", "special", "<|mmu|>", "<|soi|>"), ("image", "image"), ("eoi", "special", "<|eoi|>"),
              ("question", "text", question), ("answer", "text", answer_len)),
  }
  lengths = {"t2i": prompt + 2 + h * w, "mmu": 3 + h * w + question + answer_len}
  llada.apply_backbone(config, upstream, max(lengths.values()))
  config.text.vocab_size = int(text_vocab)
  config.text.max_len = answer_len
  config.image.tokenizer = "magvitv2"
  config.image.codebook_size = int(upstream.get("codebook_size", 8192))
  config.image.size = h * downsample
  config.sequence.segments = views["t2i"]
  config.sequence.views = views
  config.sequence.special_ids = dict(task_ids)
  config.sequence.vocab_rows = llada.upstream_sizes(upstream)["vocab"]
  config.sequence.text_frames = {"prompt": (T2I, "left", PAD, "null="), "question": (CHAT, "left", PAD, "trim")}
  config.model.pad_key_id = int(task_ids[PAD])
  config.model.max_len = max(lengths.values())
  config.diffusion.tasks = {"t2i": 1.0}
  config.diffusion.task_roles = {"t2i": "prompt:clean image:noised",
                                 "mmu": "image:clean question:clean answer:noised"}   # the mmu view's
  config.diffusion.schedule = "cosine"
  apply_sampler_preset(config, "mmada")
  return config


def apply_sampler_preset(config, name: str = "mmada"):
  """``config.sample.preset``: the upstream's decoding per task (``samplers/presets.py``)."""
  config.sample.preset = name
  return config


def check_config(upstream: dict, config, layout) -> None:
  """ConvertError naming every field where ``config`` is not the upstream's (the backbone's fields, then the
  vocabulary's and the image grid's)."""
  problems = []
  try:
    llada.check_config(upstream, config, layout)
  except ConvertError as e:
    problems.append(str(e).split(": ", 1)[1])
  codebook = int(upstream.get("codebook_size", 8192))
  if layout.image_vocab != codebook:
    problems.append(f"config.json codebook_size={codebook} but the image tokenizer has {layout.image_vocab} codes "
                    f"(config.image.codebook_size={config.image.codebook_size})")
  rows = llada.upstream_sizes(upstream)["vocab"]
  if layout.image_offset + layout.image_vocab > rows:
    problems.append(f"image codes at {layout.image_offset}..{layout.image_offset + layout.image_vocab} do not fit "
                    f"the upstream's {rows} embedding rows")
  grid = grid_of(upstream)
  if layout.image_grid != grid:
    problems.append(f"config.json num_vq_tokens={grid[0] * grid[1]} ({grid[0]}x{grid[1]}) but the image tokenizer "
                    f"makes a {layout.image_grid} grid at config.image.size={config.image.size}")
  if problems:
    raise ConvertError("the upstream config does not match the target config: " + "; ".join(problems))


def upstream_config(config, layout, base: dict | None = None) -> dict:
  """config.json of a unimm_jax MMaDA model (``base``: the imported model's own; else MMaDA-8B's)."""
  out = llada.upstream_config(config, layout, copy.deepcopy(base if base is not None else MMADA_8B))
  rows = int(layout.size)
  out.update(new_vocab_size=rows, vocab_size=rows, embedding_size=rows,
             codebook_size=int(layout.image_vocab), num_vq_tokens=int(layout.image_grid[0] * layout.image_grid[1]))
  return out
