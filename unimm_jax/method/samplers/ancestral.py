"""Ancestral sampling (MDLM / MD4).

On the time grid t_k = 1 - k/K, going from t to s < t reveals each still-masked token with probability
(alpha(s) - alpha(t)) / (1 - alpha(t)), its value drawn from p(x0 | x_t). At s = 0 that probability is 1, so no
MASK is left after the last step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unimm_jax.method.samplers.loop import Step, register_sampler


def ancestral(step: Step) -> jax.Array:
  """bool [B, S]: each masked position independently, with the schedule's reveal probability from t to s."""
  if step.schedule is None:
    raise ValueError("ancestral sampling needs the masking schedule")
  steps, schedule = step.config.steps, step.schedule
  t = 1.0 - step.k / steps
  s = 1.0 - (step.k + 1.0) / steps
  p_reveal = (schedule.alpha(s) - schedule.alpha(t)) / (1.0 - schedule.alpha(t))
  p_reveal = jnp.where(step.k == steps - 1, 1.0, p_reveal)
  return step.masked & (step.uniform < p_reveal)


register_sampler("ancestral", ancestral)
