"""Confidence-threshold parallel decoding (Fast-dLLM's).

Each step draws a candidate at every masked position and scores it by its probability under the guided
model, c = p(x0 = candidate | x_t) (no noise). It reveals the n most confident masked positions, with

    n = clip(#{masked positions with c >= threshold}, 1, cap),   cap = max_per_step (0: no limit),

so every position that passes is revealed together, at least one a step (the most confident), and never more
than ``max_per_step``. Which n are revealed is decided, as in the confidence sampler, by the confidence plus
Gumbel noise scaled by ``confidence_noise * (1 - (k + 1) / K)``; the count n by the confidence alone. So the
noise only matters where fewer positions pass than the step reveals (the forced pick of a step where none
passes, or a cap): exactly the choices the model is unsure of, which is where several samples of one input
(image-to-text candidates) should differ. ``confidence_noise=0`` is Fast-dLLM's deterministic rule. At the
last step K - 1 every position still masked is revealed whatever its confidence, so no MASK is left: K (``steps``) is the static bound, reached only by examples that have not finished before.
An example with m masked positions takes at most min(m, K) steps; the loop stops when all are filled
(``loop.py``), and :func:`~unimm_jax.method.samplers.loop.sample_with_steps` reports each example's steps.

The cap is a fixed count, not the confidence sampler's per-step schedule: that schedule reveals its last token
only at step K - 1, so capped by it the threshold sampler could never finish early, which is its point. With
``max_per_step=1`` (or threshold 1.0 and no probability reaching 1) it reveals the single most confident
position a step, exactly as the confidence sampler with a schedule of one a step (``uniform`` with K >= m),
both with ``confidence_noise=0``: the two give the same tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unimm_jax.method.samplers.loop import Step, register_sampler, reveal_all_but


def threshold(step: Step) -> jax.Array:
  """bool [B, S]: the masked positions whose candidate's probability passes ``config.threshold`` (module
  docstring for the count)."""
  config = step.config
  log_conf = jnp.take_along_axis(step.log_probs, step.candidates[..., None], axis=-1)[..., 0]   # [B, S]
  num_masked = step.masked.sum(axis=1)                                                           # [B]
  passes = step.masked & (jnp.exp(log_conf) >= config.threshold)                                # [B, S]
  passing = passes.sum(axis=1)
  cap = config.max_per_step if config.max_per_step > 0 else step.masked.shape[1]
  count = jnp.clip(passing, 1, cap)
  count = jnp.where(step.k == config.steps - 1, num_masked, count)   # the bound: reveal all that is left
  # Rank by the noisy confidence, then put every passing position above every other whatever the noise (ranks are
  # whole numbers < S, so the key is exact; ties keep reveal_all_but's order, the later position first).
  rank = jnp.argsort(jnp.argsort(log_conf + step.confidence_noise(), axis=1), axis=1)
  key = (rank + jnp.where(passes, step.masked.shape[1], 0)).astype(jnp.float32)
  return reveal_all_but(key, step.masked, num_masked - count)


register_sampler("threshold", threshold)
