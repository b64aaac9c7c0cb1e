"""Noise schedule x shared or independent per-modality time, on ``shapes``: 3 x 2 = 6 variants.

Which masking schedule trains the best model at a fixed budget, and does drawing one time per modality
(independent, the default: every conditional is seen at every noise level pairing) beat one time for both
(shared, UniDisc's choice)? Validation always reports the ELBO, so the bits/token columns compare like with like.

    python -m launch.sweep --sweep=configs/sweeps/schedule_time.py --root=runs/sweeps/schedule_time

Results at a small size (300 steps, 2 layers): BENCHMARKS.md, "Ablation sweeps (issue 10)".
"""

from launch.sweep import grid


def get_sweep():
  return {
      "base": "configs/shapes.py",
      "variants": grid({
          "diffusion.schedule": ["linear", "cosine", "polynomial"],
          "diffusion.shared_time": {"indep": False, "shared": True},
      }),
  }
