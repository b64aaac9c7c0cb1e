"""Samplers: fill every MASK of a ``[text | image]`` sequence in K parallel steps, as one jitted loop.

Two methods (``SamplerConfig.method``):

* ``confidence`` (MaskGIT): a reveal schedule fixes how many tokens are still masked after step k,
  ``remaining_k = floor(N * gamma((k + 1) / K))`` with gamma(r) = cos(pi/2 r) (``cosine``) or 1 - r (``linear``),
  N the example's masked count at the start. Each step draws a candidate for every masked position, scores it by
  its log-probability plus Gumbel noise scaled by ``confidence_noise * (1 - (k + 1) / K)`` (annealed to 0), and
  reveals the most confident ones so that exactly ``remaining_k`` stay masked.
* ``ancestral`` (MDLM / MD4): on the time grid t_k = 1 - k/K, going from t to s < t reveals each still-masked
  token with probability (alpha(s) - alpha(t)) / (1 - alpha(t)), its value drawn from p(x0 | x_t). At s = 0 that
  probability is 1, so no MASK is left.

Classifier-free guidance: log-probabilities ``(1 + w) * cond - w * uncond``, renormalised, where ``uncond`` for
the positions of one modality is the model's output with the *other* modality entirely MASK (the null condition
of training). Only the modalities named in ``guide`` are guided; their uncond passes are batched with the cond
pass into one forward.

Invariants (tested): tokens that are not MASK at the start never change; no MASK is left after the last step;
``confidence`` reveals exactly the scheduled count each step. Randomness is per example (one key per row, folded
with the step), so an example's output does not depend on the batch it was padded into.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from unimm_jax.data.vocab import VocabLayout
from unimm_jax.diffusion.schedules import Schedule

METHODS = ("confidence", "ancestral")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  method: str = "confidence"     # confidence | ancestral
  steps: int = 32
  temperature: float = 1.0       # token sampling temperature; 0 = argmax
  confidence_noise: float = 1.0  # confidence: scale of the Gumbel noise on confidences at the first step
  reveal_schedule: str = "cosine"  # confidence: cosine | linear
  guidance_scale: float = 0.0    # w; 0 = plain conditional sampling

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"sampler method {self.method!r} is not one of {METHODS}")
    if self.reveal_schedule not in ("cosine", "linear"):
      raise ValueError(f"reveal_schedule {self.reveal_schedule!r} is not 'cosine' or 'linear'")
    if self.steps < 1:
      raise ValueError(f"steps={self.steps} must be >= 1")
    if self.temperature < 0 or self.guidance_scale < 0:
      raise ValueError("temperature and guidance_scale must be >= 0")


def remaining_masked(num_masked, steps: int, reveal_schedule: str = "cosine"):
  """int32 [steps, B]: how many tokens are still masked after each step (the last row is 0).

  Args:
    num_masked: int [B] masked tokens per example at the start.
  """
  num_masked = jnp.asarray(num_masked, jnp.int32)
  k = jnp.arange(1, steps + 1, dtype=jnp.int32)
  if reveal_schedule == "linear":
    # Integer arithmetic, floor(N (K - k) / K): in float32, 24 * (1 - 7/24) is 16.99999 and floors to 16, so
    # K = N steps revealed two tokens at some steps and none at others instead of exactly one each (the image->text
    # report lost 0.05 accuracy to it: BENCHMARKS.md, sixth round).
    return (num_masked[None, :] * (steps - k)[:, None]) // steps
  gamma = jnp.cos(0.5 * math.pi * k.astype(jnp.float32) / steps)
  gamma = gamma.at[-1].set(0.0)   # cos(pi/2) is 6e-17 in float32, not 0
  # The 1e-4 absorbs float32 rounding of products that are whole numbers in exact arithmetic.
  return jnp.floor(gamma[:, None] * num_masked[None, :].astype(jnp.float32) + 1e-4).astype(jnp.int32)


def _draw(keys, log_probs, temperature: float):
  """Per-example categorical draw: keys [B, 2], log_probs [B, S, V] -> int32 [B, S]."""
  if temperature == 0.0:
    return jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
  return jax.vmap(lambda k, lp: jax.random.categorical(k, lp / temperature, axis=-1))(keys, log_probs).astype(
      jnp.int32)


def guided_log_probs(logits_fn: Callable, tokens, layout: VocabLayout, guidance_scale: float,
                     guide: tuple[bool, bool]):
  """log p(x0 | x_t) with classifier-free guidance: float32 [B, S, V].

  Args:
    logits_fn: int32 [B', S] -> float32 [B', S, V].
    tokens: int32 [B, S] current (partly masked) sequences.
    guide: (guide text positions, guide image positions).
  """
  if guidance_scale == 0.0 or not any(guide):
    return jax.nn.log_softmax(logits_fn(tokens), axis=-1)
  text_pos = jnp.asarray(layout.modality_ids() == 0)                                  # [S]
  batches = [tokens]
  if guide[0]:   # text positions: uncond has the image fully masked
    batches.append(jnp.where(text_pos[None], tokens, layout.mask_id))
  if guide[1]:   # image positions: uncond has the text fully masked
    batches.append(jnp.where(text_pos[None], layout.mask_id, tokens))
  out = jax.nn.log_softmax(logits_fn(jnp.concatenate(batches)), axis=-1)
  out = out.reshape(len(batches), tokens.shape[0], *out.shape[1:])
  cond, uncond, i = out[0], out[0], 1
  if guide[0]:
    uncond = jnp.where(text_pos[None, :, None], out[i], uncond)
    i += 1
  if guide[1]:
    uncond = jnp.where(text_pos[None, :, None], uncond, out[i])
  w = guidance_scale
  return jax.nn.log_softmax((1.0 + w) * cond - w * uncond, axis=-1)


def sample(logits_fn: Callable, tokens, keys, *, layout: VocabLayout, config: SamplerConfig,
           schedule: Schedule | None = None, guide: tuple[bool, bool] = (True, True), only=None):
  """Fills every MASK in ``tokens``: int32 [B, S] with no MASK left (see :func:`sample_with_trace`)."""
  return sample_with_trace(logits_fn, tokens, keys, layout=layout, config=config, schedule=schedule,
                           guide=guide, only=only)[0]


def sample_with_trace(logits_fn: Callable, tokens, keys, *, layout: VocabLayout, config: SamplerConfig,
                      schedule: Schedule | None = None, guide: tuple[bool, bool] = (True, True), only=None):
  """Fills every MASK in ``tokens`` and reports how many stayed masked after each step.

  Args:
    logits_fn: the network, int32 [B, S] -> float32 [B, S, V] (already bound to its parameters).
    tokens: int32 [B, S] global ids; MASK where to generate.
    keys: uint32 [B, 2] one PRNG key per example.
    config: the sampler's settings (static).
    schedule: the masking schedule (``ancestral`` only).
    guide: which modalities' positions get guidance (static).
    only: optional bool [S] (static): generate only these positions; a MASK elsewhere stays MASK and reads as
      the null condition of training (e.g. a caption drawn with the image all MASK is drawn from p(text)).
  Returns:
    (int32 [B, S] with no MASK left where generated, int32 [K, B] masked count after each step).
  """
  steps = config.steps
  given = tokens != layout.mask_id
  if only is not None:
    given = given | ~jnp.asarray(only, bool)[None]
  remaining = remaining_masked((~given).sum(axis=1), steps, config.reveal_schedule)  # [K, B]
  if config.method == "ancestral" and schedule is None:
    raise ValueError("ancestral sampling needs the masking schedule")

  def body(tokens, k):
    step_keys = jax.vmap(lambda key: jax.random.split(jax.random.fold_in(key, k), 3))(keys)   # [B, 3, 2]
    log_probs = guided_log_probs(logits_fn, tokens, layout, config.guidance_scale, guide)
    candidates = _draw(step_keys[:, 0], log_probs, config.temperature)                      # [B, S]
    masked = (tokens == layout.mask_id) & ~given
    if config.method == "confidence":
      conf = jnp.take_along_axis(log_probs, candidates[..., None], axis=-1)[..., 0]
      noise_scale = config.confidence_noise * (1.0 - (k + 1.0) / steps)
      gumbel = jax.vmap(lambda key: jax.random.gumbel(key, tokens.shape[1:]))(step_keys[:, 1])
      conf = jnp.where(masked, conf + noise_scale * gumbel, jnp.inf)   # given / revealed tokens rank last
      rank = jnp.argsort(jnp.argsort(conf, axis=1), axis=1)             # 0 = least confident
      reveal = masked & (rank >= remaining[k][:, None])
    else:
      t = 1.0 - k / steps
      s = 1.0 - (k + 1.0) / steps
      p_reveal = (schedule.alpha(s) - schedule.alpha(t)) / (1.0 - schedule.alpha(t))
      p_reveal = jnp.where(k == steps - 1, 1.0, p_reveal)
      u = jax.vmap(lambda key: jax.random.uniform(key, tokens.shape[1:]))(step_keys[:, 2])
      reveal = masked & (u < p_reveal)
    tokens = jnp.where(reveal, candidates, tokens)
    return tokens, ((tokens == layout.mask_id) & ~given).sum(axis=1).astype(jnp.int32)

  # One scan over the steps: a single jitted loop, with the tiny per-step counts as its only stacked output.
  return jax.lax.scan(body, tokens, jnp.arange(steps))
