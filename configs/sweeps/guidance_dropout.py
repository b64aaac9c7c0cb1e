"""Guidance (condition) dropout rate, on ``shapes``: how often training drops the condition, 3 variants.

Classifier-free guidance needs an unconditional model: the task mixture's ``image_only`` and ``text_only`` tasks
mask the other modality entirely (the "null" condition, unimm_jax/diffusion/loss.py), and their combined weight
is the condition-dropout rate (``configs/shapes.py``: 0.05; UniDisc used 0.1-0.2). Each variant splits the rate
evenly between the two and takes it from the two conditional tasks, keeping joint noising at 0.05. The report
samples with guidance scale 1.0 (``(1 + w) cond - w uncond``), so the rate shows both as the conditional
tasks it takes training from and as the quality of the unconditional half of guidance.

    python -m launch.sweep --sweep=configs/sweeps/guidance_dropout.py --root=runs/sweeps/guidance_dropout

Results at a small size (300 steps, 2 layers): BENCHMARKS.md, "Ablation sweeps (issue 10)".
"""

from launch.sweep import grid

JOINT = 0.05
RATES = (0.0, 0.1, 0.3)


def tasks(rate: float) -> dict:
  conditional = round((1.0 - JOINT - rate) / 2, 6)
  return {"diffusion.tasks.joint": JOINT, "diffusion.tasks.text_to_image": conditional,
          "diffusion.tasks.image_to_text": conditional, "diffusion.tasks.image_only": rate / 2,
          "diffusion.tasks.text_only": rate / 2}


def get_sweep():
  return {
      "base": "configs/shapes.py",
      "common": {"sample.guidance_scale": 1.0},
      "variants": grid({"dropout": {f"drop{rate:g}": tasks(rate) for rate in RATES}}),
  }
