"""Lumina-DiMOO (``Alpha-VLLM/Lumina-DiMOO``): a LLaDA-8B backbone whose vocabulary was extended with special
tokens and the 8,192 codes of the aMUSEd VQ-GAN (the diffusers ``VQModel`` in its ``vqvae/``), and its per-task
sequence formats, as a configuration of unimm_jax.

The network is LLaDA's (``llada.py``; ``LLaDAForMultiModalGeneration`` only adds a ``forward``), with no attention
mask at all (its wrapper builds one that never reaches the attention). The vocabulary, as its code uses it
(read from Alpha-VLLM/Lumina-DiMOO: ``config.py``, ``utils/prompt_utils.py``, ``utils/image_utils.py``,
``inference/inference_t2i.py``, ``inference/inference_mmu.py``, ``generators/``)::

    0 .. V-K-1     text ids: LLaDA's (MASK 126,336) and the added specials <end-of-line> 126,084, <IMAGE> 126,349,
                   </IMAGE> 126,350, <uncondition> 126,351, <answer> 126,354, </answer> 126,355, <system>, <user>
    V-K .. V-1     image code k is id V - K + k (``generate_image`` slices ``logits[..., V-K:]``; 126,356 + k)

Formats, one view of the network each (``sequence.views``)::

    t2i:  prompt (left-padded: <system>Generate an image according to the text prompt.</system><user> caption
          </user>) <answer> <IMAGE>  image grid  </IMAGE> </answer>                        (inference_t2i.py)
    mmu:  question (left-padded: <system>...</system><user> question) <IMAGE> image grid </IMAGE> </user>
          <answer> answer </answer>                         (train/train.py's layout: the grid broken once)

Every row of the image grid ends with <end-of-line> in the upstream's sequences: ``model.image_row_end_id``
inserts it inside the network, so the layout, the data and the sampler keep plain grids. The upstream runs one
example at a time, unpadded; here prompts are padded on the left with a token that is not there for the network
(``model.pad_key_id``: no attention, no position), so each row equals the upstream's unpadded sequence.
``inference_mmu.py`` as written breaks the image grid a second time (a bug that shifts the row ends and drops the
last row); unimm_jax uses the layout the model was trained with.
"""

from __future__ import annotations

import copy

from unimm_jax.convert import llada
from unimm_jax.convert.llada import ConvertError

FORMAT = "lumina_dimoo"
tensor_map, param_path, check_tensors = llada.tensor_map, llada.param_path, llada.check_tensors

# The special tokens by name, with the released ids as the fallback when the tokenizer does not name them.
SPECIAL_IDS = {"<end-of-line>": 126_084, "<IMAGE>": 126_349, "</IMAGE>": 126_350, "<answer>": 126_354,
               "</answer>": 126_355, "</user>": None, "<|pad|>": 126_339}
PAD = "<|pad|>"
T2I_SYSTEM = "Generate an image according to the text prompt."
MMU_SYSTEM = ("You are a multimodal model that can process both text and images. Answer the following question "
              "based on the provided images. Analyze each image and combine relevant details to answer.")
T2I = "<system>" + T2I_SYSTEM + "</system><user>{text}</user>"
MMU = "<system>" + MMU_SYSTEM + "</system><user>{text}"

LUMINA_DIMOO_8B = {**llada.LLADA_8B, "architectures": ["LLaDAForMultiModalGeneration"], "vocab_size": 134_548,
                   "embedding_size": 134_548}


def special_ids(tokenizer) -> dict[str, int]:
  """The special tokens' ids: the tokenizer's, by name; else the released model's."""
  out = {}
  for name, fallback in SPECIAL_IDS.items():
    try:
      out[name] = tokenizer.token_id(name)
    except KeyError:
      if fallback is None:
        raise ConvertError(f"the tokenizer has no {name!r} token (Lumina-DiMOO's prompts need it)") from None
      out[name] = fallback
  return out


def apply_unified(config, upstream: dict, *, codebook_size: int, task_ids: dict[str, int], downsample: int,
                  image_size: int = 512, max_text_len: int = 128, question_len: int = 96, answer_len: int = 128):
  """``config`` (changed in place and returned) set to the Lumina-DiMOO checkpoint of ``upstream``: the
  backbone, the vocabulary (codes at ``vocab_size - codebook_size``) and both views (module docstring).
  ``max_text_len`` / ``question_len``: the prompt segments' tokens, system prompt included."""
  vocab = llada.upstream_sizes(upstream)["vocab"]
  grid = image_size // downsample
  views = {
      "t2i": (("prompt", "text", max_text_len), ("open", "special", "<answer>", "<IMAGE>"), ("image", "image"),
              ("close", "special", "</IMAGE>", "</answer>")),
      "mmu": (("question", "text", question_len), ("boi", "special", "<IMAGE>"), ("image", "image"),
              ("eoi", "special", "</IMAGE>", "</user>", "<answer>"), ("answer", "text", answer_len),
              ("eoa", "special", "</answer>")),
  }
  cells = grid * (grid + 1)          # the network's grid: a row end after every row
  lengths = {"t2i": max_text_len + 4 + cells, "mmu": question_len + 5 + cells + answer_len}
  llada.apply_backbone(config, upstream, max(lengths.values()))
  config.text.vocab_size = vocab - int(codebook_size)
  config.text.max_len = answer_len
  config.image.tokenizer = "vqgan"
  config.image.codebook_size = int(codebook_size)
  config.image.size = int(image_size)
  config.sequence.segments = views["t2i"]
  config.sequence.views = views
  config.sequence.special_ids = dict(task_ids)
  config.sequence.vocab_rows = vocab
  config.sequence.text_frames = {"prompt": (T2I, "left", PAD, "null=<uncondition>"), "question": (MMU, "left", PAD)}
  config.model.pad_key_id = int(task_ids[PAD])
  config.model.image_row_end_id = int(task_ids["<end-of-line>"])
  config.model.max_len = max(lengths.values())
  config.diffusion.tasks = {"t2i": 1.0}
  config.diffusion.task_roles = {"t2i": "prompt:clean image:noised",
                                 "mmu": "question:clean image:clean answer:noised"}
  config.diffusion.schedule = "cosine"
  config.sample.preset = FORMAT
  return config


def check_config(upstream: dict, config, layout) -> None:
  """ConvertError naming every field where ``config`` is not the upstream's."""
  problems = []
  try:
    llada.check_config(upstream, config, layout)
  except ConvertError as e:
    problems.append(str(e).split(": ", 1)[1])
  rows = llada.upstream_sizes(upstream)["vocab"]
  if layout.image_offset + layout.image_vocab != rows:
    problems.append(f"image codes at {layout.image_offset}..{layout.image_offset + layout.image_vocab} must end at "
                    f"the upstream's {rows} rows (its sampler slices the last codebook_size logits)")
  if config.model.image_row_end_id < 0:
    problems.append("Lumina-DiMOO's grid ends every row with <end-of-line>: config.model.image_row_end_id is unset")
  if problems:
    raise ConvertError("the upstream config does not match the target config: " + "; ".join(problems))


def upstream_config(config, layout, base: dict | None = None) -> dict:
  """config.json of a unimm_jax Lumina-DiMOO model (``base``: the imported model's own; else the released one's)."""
  out = llada.upstream_config(config, layout, copy.deepcopy(base if base is not None else LUMINA_DIMOO_8B))
  out.update(vocab_size=int(layout.size), embedding_size=int(layout.size))
  return out
