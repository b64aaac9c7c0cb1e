"""Confidence-ordered decoding (MaskGIT).

A reveal schedule fixes how many tokens are still masked after step k of K,
``remaining_k = floor(N * gamma((k + 1) / K))`` with gamma(r) = cos(pi/2 r) (``cosine``) or 1 - r (``linear``), N the
example's masked count at the start; or (``uniform``, LLaDA's) N // K a step, the first N % K steps one more. Each step scores every masked position's candidate by its log-probability
plus Gumbel noise scaled by ``confidence_noise * (1 - (k + 1) / K)`` (annealed to 0), and reveals the most
confident ones so that exactly ``remaining_k`` stay masked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unimm_jax.method.samplers.loop import Step, register_sampler, reveal_all_but


def confidence(step: Step) -> jax.Array:
  """bool [B, S]: the most confident masked positions, all but ``step.remaining`` of them."""
  conf = jnp.take_along_axis(step.log_probs, step.candidates[..., None], axis=-1)[..., 0]
  return reveal_all_but(conf + step.confidence_noise(), step.masked, step.remaining)


register_sampler("confidence", confidence)
