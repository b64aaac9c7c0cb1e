"""Sampler presets: an upstream's own decoding settings per task, by name (``config.sample.preset``, the sample
CLI's ``--preset``), so a converted checkpoint samples as its authors' scripts do.

``mmada`` (Gen-Verse/MMaDA: ``inference_t2i.py`` as its README runs it, ``inference_mmu.py``):

* images (t2i, inpaint): MaskGIT's decoding (``t2i_generate``): 15 steps of the cosine schedule (the count still
  masked after step i is ``floor(N cos(pi/2 (i+1)/T))``), tokens drawn at temperature 1, confidences perturbed
  by Gumbel noise whose scale falls to 0, classifier-free guidance ``(1 + w) cond - w uncond`` with w = 3.5;
* text (i2t, vqa): LLaDA's low-confidence remasking (``mmu_generate``): argmax, no noise, an equal number of
  reveals per step (``uniform``), in semi-autoregressive blocks of a quarter of the answer with half as many
  steps as tokens (``steps = max_new_tokens // 2``, ``block_length = max_new_tokens // 4``).

``lumina_dimoo`` (Alpha-VLLM/Lumina-DiMOO: ``inference/inference_t2i.py``, ``inference/inference_mmu.py`` as its
README runs them):

* images: ``generate_image``: 64 steps of the cosine schedule, guidance 4.0, temperature 1;
* text: ``generate_text_understanding``: LLaDA's block sampler, argmax, one token a step, in blocks of a quarter
  of the answer (its README: 128 tokens in blocks of 32, 128 steps).
"""

from __future__ import annotations

# text: "reveals" tokens a step, in blocks of a quarter of the answer.
PRESETS = {
    "mmada": {
        "t2i": dict(steps=15, guidance_scale=3.5, temperature=1.0, method="confidence", confidence_noise=1.0,
                    reveal_schedule="cosine"),
        "text": dict(temperature=0.0, method="confidence", confidence_noise=0.0, reveal_schedule="uniform",
                     guidance_scale=0.0, reveals=2),
    },
    "lumina_dimoo": {
        "t2i": dict(steps=64, guidance_scale=4.0, temperature=1.0, method="confidence", confidence_noise=1.0,
                    reveal_schedule="cosine"),
        "text": dict(temperature=0.0, method="confidence", confidence_noise=0.0, reveal_schedule="uniform",
                     guidance_scale=0.0, reveals=1),
    },
}
TASK_GROUP = {"t2i": "t2i", "inpaint": "t2i", "edit": "t2i", "joint": "t2i", "i2t": "text", "vqa": "text",
              "infill": "text"}


def preset_kwargs(name: str, task: str, text_tokens: int) -> dict:
  """Call arguments of preset ``name`` for ``task``; ``text_tokens``: the generated text segment's length (the
  text presets' steps and blocks are fractions of it)."""
  if name not in PRESETS:
    raise ValueError(f"no sampler preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
  group = TASK_GROUP[task]
  kw = dict(PRESETS[name][group])
  if group == "text":
    kw["block_length"] = max(1, text_tokens // 4)
    kw["steps"] = max(1, kw["block_length"] // kw.pop("reveals"))     # per block: the upstream's steps // blocks
  return kw
