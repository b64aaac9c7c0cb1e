"""The one sampling loop: fill the MASKs of chosen positions in at most K parallel steps, as one jitted
``lax.while_loop``.

Like MaskGIT's ``decode(inputs, rng, tokens_to_logits, mask_token_id)``, the loop knows nothing of what the
tokens mean: it gets the network as ``tokens_to_logits``, the starting tokens (MASK where to generate), which
positions it may generate, and which to guide. What to reveal at each step is the sampling method's, a small
function registered by name (``confidence.py``, ``ancestral.py``, ``threshold.py``); adding one is a new file
and a :func:`register_sampler` call.

The loop runs step k = 0, 1, ... while k < K and some generated position is still MASK, so a batch whose
examples are all filled stops computing (K is the static bound; every method reveals every masked position at
step K - 1). An example with nothing left to fill is not changed by later steps. The steps an example took
(:func:`sample_with_steps`) are the steps that began with at least one of its generated positions MASK: its
forward passes, at most K.

Classifier-free guidance: log-probabilities ``(1 + w) * cond - w * uncond``, renormalised. ``guide`` is a tuple
of (target positions, null positions) pairs: at the target positions, ``uncond`` is the model's output with the
null positions all MASK (the null condition of training). The uncond passes are batched with the cond pass
into one forward.

Cached conditioning (``CachedNetwork``): the network computes only the positions it may change (``at``, static),
each step's queries attending every position, the keys and values of the others read from a cache that a full
forward fills at the first step (and every ``refresh_every`` steps). The method then sees those positions only
([B, A] instead of [B, S]). The cache is exact for a network whose given positions never attend the generated
ones (``model.isolate_given``), and Fast-dLLM's approximation otherwise.

Invariants (tested): tokens that are not MASK at the start never change; no MASK is left after the last step
at the generated positions; the confidence method reveals exactly the scheduled count each step. Randomness is
per example (one key per row, folded with the step, then split in three: the token draw, the method's noise,
the method's uniforms), so an example's output does not depend on the batch it was padded into; each is drawn for
the whole sequence and read at the positions computed, so the exact cache gives the uncached sampler's tokens
at any temperature and noise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.method.schedules import Schedule


REVEAL_SCHEDULES = ("cosine", "linear", "uniform")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  method: str = "confidence"     # a registered sampler: confidence | ancestral | threshold | ...
  steps: int = 32
  temperature: float = 1.0       # token sampling temperature; 0 = argmax
  confidence_noise: float = 1.0  # confidence: scale of the Gumbel noise on confidences at the first step
  reveal_schedule: str = "cosine"  # confidence: cosine | linear | uniform (REVEAL_SCHEDULES)
  guidance_scale: float = 0.0    # w; 0 = plain conditional sampling
  threshold: float = 0.9         # threshold: reveal every masked position whose candidate has p >= this
  max_per_step: int = 0          # threshold: the most positions one step reveals (but the last); 0 = no limit
  cache: str = "none"            # none | exact | dual: the network the caller builds (CachedNetwork, CACHES)
  refresh_every: int = 0         # dual: recompute the cache every N steps (0: at the first step only)

  def __post_init__(self):
    if self.method not in _REGISTRY:
      raise ValueError(f"sampler method {self.method!r} is not one of {tuple(_REGISTRY)}")
    if self.reveal_schedule not in REVEAL_SCHEDULES:
      raise ValueError(f"reveal_schedule {self.reveal_schedule!r} is not one of {REVEAL_SCHEDULES}")
    if self.steps < 1:
      raise ValueError(f"steps={self.steps} must be >= 1")
    if self.temperature < 0 or self.guidance_scale < 0:
      raise ValueError("temperature and guidance_scale must be >= 0")
    if not 0.0 < self.threshold <= 1.0:
      raise ValueError(f"threshold={self.threshold} must be in (0, 1]")
    if self.max_per_step < 0:
      raise ValueError(f"max_per_step={self.max_per_step} must be >= 0 (0 = no limit)")
    if self.cache not in CACHES:
      raise ValueError(f"cache {self.cache!r} is not one of {CACHES}")
    if self.refresh_every < 0:
      raise ValueError(f"refresh_every={self.refresh_every} must be >= 0 (0 = at the first step only)")


CACHES = ("none", "exact", "dual")


@dataclasses.dataclass(frozen=True)
class CachedNetwork:
  """A network that computes chosen positions only, reading the keys and values of the others from a cache.

  full: int32 [B, S] -> (float32 logits [B, S, V], cache): every position, filling the cache.
  rows: (int32 [B, S], cache) -> float32 logits [B, A, V] at ``at`` only (the tokens elsewhere are read through
    the cache, i.e. as they were when it was filled).
  at: int [A] sorted positions the sampler may change (static): the generated ones must be among them.
  refresh_every: the cache is filled at step 0 and every ``refresh_every`` steps (0: at step 0 only).
  """

  full: Callable
  rows: Callable
  at: Any
  refresh_every: int = 0


@flax.struct.dataclass
class Step:
  """What a sampling method sees at step k of K (B examples, S positions, V ids)."""

  k: jax.Array               # int32 []: the step, 0 .. K-1
  log_probs: jax.Array       # float32 [B, S, V]: guided log p(x0 | x_t)
  candidates: jax.Array      # int32 [B, S]: a token drawn at every position (with the temperature)
  masked: jax.Array          # bool [B, S]: still MASK and to be generated
  remaining: jax.Array       # int32 [B]: how many of them the reveal schedule leaves masked after this step
  gumbel: jax.Array          # float32 [B, S]: per-example Gumbel noise for the method (e.g. on confidences)
  uniform: jax.Array         # float32 [B, S]: per-example uniforms in [0, 1) for the method
  # (with a cached network every [B, S] field above is [B, A]: the computed positions only)
  config: SamplerConfig = flax.struct.field(pytree_node=False)
  schedule: Schedule | None = flax.struct.field(pytree_node=False, default=None)

  def confidence_noise(self) -> jax.Array:
    """float32 [B, S]: the Gumbel noise on confidences, scaled by ``confidence_noise * (1 - (k + 1) / K)``
    (annealed to 0 at the last step)."""
    return self.config.confidence_noise * (1.0 - (self.k + 1.0) / self.config.steps) * self.gumbel


Method = Callable[[Step], jax.Array]   # -> bool [B, S]: the positions to reveal now (a subset of masked)
_REGISTRY: dict[str, Method] = {}


def register_sampler(name: str, method: Method) -> None:
  """Makes ``SamplerConfig(method=name)`` use ``method``: a function of a :class:`Step` returning the positions
  to reveal (bool [B, S], within ``step.masked``; every masked position at the last step)."""
  _REGISTRY[name] = method


def registered() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def remaining_masked(num_masked, steps: int, reveal_schedule: str = "cosine"):
  """int32 [steps, B]: how many tokens are still masked after each step (the last row is 0).

  Args:
    num_masked: int [B] masked tokens per example at the start.
  """
  num_masked = jnp.asarray(num_masked, jnp.int32)
  k = jnp.arange(1, steps + 1, dtype=jnp.int32)
  if reveal_schedule == "uniform":
    # LLaDA's get_num_transfer_tokens: N // K a step, the first N % K steps one more.
    base, extra = num_masked // steps, num_masked % steps
    return num_masked[None, :] - (k[:, None] * base[None, :] + jnp.minimum(k[:, None], extra[None, :]))
  if reveal_schedule == "linear":
    # Integer arithmetic, floor(N (K - k) / K): in float32, 24 * (1 - 7/24) is 16.99999 and floors to 16, so
    # K = N steps would reveal two tokens at some steps and none at others instead of exactly one each.
    return (num_masked[None, :] * (steps - k)[:, None]) // steps
  gamma = jnp.cos(0.5 * math.pi * k.astype(jnp.float32) / steps)
  gamma = gamma.at[-1].set(0.0)   # cos(pi/2) is 6e-17 in float32, not 0
  # The 1e-4 absorbs float32 rounding of products that are whole numbers in exact arithmetic.
  return jnp.floor(gamma[:, None] * num_masked[None, :].astype(jnp.float32) + 1e-4).astype(jnp.int32)


def draw(keys, log_probs, temperature: float, at=None, length: int | None = None):
  """Per-example categorical draw: keys [B, 2], log_probs [B, S, V] -> int32 [B, S] (or [B, A, V] -> [B, A] at
  the positions ``at`` of a sequence of ``length``).

  Gumbel-max over the noise of the whole sequence, read at ``at``: the same draw as ``jax.random.categorical``
  with that key over all S positions, so a position's token does not depend on which positions a cached
  network computes.
  """
  if temperature == 0.0:
    return jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
  def one(key, lp):
    g = jax.random.gumbel(key, (lp.shape[0] if at is None else length, lp.shape[-1]), lp.dtype)
    return jnp.argmax((g if at is None else g[at]) + lp / temperature, axis=-1)
  return jax.vmap(one)(keys, log_probs).astype(jnp.int32)


def reveal_all_but(scores, masked, keep):
  """bool [B, S]: every masked position except the ``keep[b]`` lowest-scoring ones of each example.

  Args:
    scores: float [B, S] confidences (only the masked positions' are read).
    masked: bool [B, S] the positions that may be revealed.
    keep: int [B] how many masked positions stay masked (<= 0: reveal all of them).
  Ties rank by position, the later position first revealed (a stable sort), so two methods that score alike
  reveal alike.
  """
  scores = jnp.where(masked, scores, jnp.inf)                       # given / revealed positions rank last
  rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)           # 0 = least confident
  return masked & (rank >= jnp.asarray(keep)[:, None])


# ((target [S], null [S][, null tokens [S]]), ...): bool positions, and optionally the ids the null positions take
# instead of MASK (-1: MASK), e.g. an upstream's empty prompt.
Guide = tuple[tuple, ...]


def guided_log_probs(tokens_to_logits: Callable, tokens, mask_id: int, guidance_scale: float, guide: Guide = (),
                     at=None):
  """log p(x0 | x_t) with classifier-free guidance: float32 [B, S, V] (or [B, A, V] at ``at``).

  Args:
    tokens_to_logits: int32 [B', S] -> float32 [B', S, V] (or [B', A, V]: the positions ``at`` only).
    tokens: int32 [B, S] current (partly masked) sequences.
    guide: ((target positions, null positions[, null tokens]), ...): bool [S] each, and int [S] ids the null
      positions take in the uncond pass (-1: MASK, the default null condition of training).
    at: int [A] (static) or None: the positions ``tokens_to_logits`` returns.
  """
  batch = guidance_batch(tokens, mask_id, guidance_scale, guide)
  return combine_guidance(tokens_to_logits(batch), tokens.shape[0], guidance_scale, guide, at)


def guidance_batch(tokens, mask_id: int, guidance_scale: float, guide: Guide = ()):
  """int32 [B (1 + G), S]: the sequences of one guided forward, the cond rows then each guide entry's uncond
  rows (its null positions replaced); ``tokens`` itself without guidance."""
  if guidance_scale == 0.0 or not guide:
    return tokens
  batches = [tokens]
  for entry in guide:
    null = jnp.asarray(entry[1])[None]
    if len(entry) > 2:
      null_tokens = jnp.asarray(entry[2])
      replacement = jnp.where(null_tokens >= 0, null_tokens, mask_id)[None].astype(tokens.dtype)
    else:
      replacement = mask_id
    batches.append(jnp.where(null, replacement, tokens))
  return jnp.concatenate(batches)


def combine_guidance(logits, batch: int, guidance_scale: float, guide: Guide = (), at=None):
  """float32 [B, S or A, V] guided log-probabilities from the logits of :func:`guidance_batch`'s rows."""
  if guidance_scale == 0.0 or not guide:
    return jax.nn.log_softmax(logits, axis=-1)
  out = jax.nn.log_softmax(logits, axis=-1)
  out = out.reshape(len(guide) + 1, batch, *out.shape[1:])
  cond, uncond = out[0], out[0]
  for i, entry in enumerate(guide, start=1):
    target = jnp.asarray(entry[0]) if at is None else jnp.asarray(entry[0])[at]
    uncond = jnp.where(target[None, :, None], out[i], uncond)
  w = guidance_scale
  return jax.nn.log_softmax((1.0 + w) * cond - w * uncond, axis=-1)


def sample(tokens_to_logits: Callable, tokens, keys, *, mask_id: int, config: SamplerConfig,
           schedule: Schedule | None = None, guide: Guide = (), generate=None):
  """Fills the MASKs in ``tokens``: int32 [B, S] (arguments as :func:`sample_with_trace`)."""
  return _decode(tokens_to_logits, tokens, keys, mask_id, config, schedule, guide, generate)[0]


def sample_with_trace(tokens_to_logits: Callable, tokens, keys, *, mask_id: int, config: SamplerConfig,
                      schedule: Schedule | None = None, guide: Guide = (), generate=None):
  """Fills the MASKs in ``tokens`` and reports how many stayed masked after each step.

  Args:
    tokens_to_logits: the network, int32 [B, S] -> float32 [B, S, V] (already bound to its parameters); or a
      :class:`CachedNetwork` (then ``generate`` must be static and within its ``at``).
    tokens: int32 [B, S] global ids; MASK where to generate.
    keys: uint32 [B, 2] one PRNG key per example.
    mask_id: the MASK id.
    config: the sampler's settings (static).
    schedule: the masking schedule (methods that need it, e.g. ``ancestral``).
    guide: which positions get guidance against which null condition (static; module docstring).
    generate: optional bool [S] (static): generate only these positions; a MASK elsewhere stays MASK and reads
      as the null condition of training (e.g. a caption drawn with the image all MASK is drawn from p(text)).
  Returns:
    (int32 [B, S] with no MASK left where generated, int32 [K, B] masked count after each step; the rows of
    steps not run, everything being filled, are 0).
  """
  return _decode(tokens_to_logits, tokens, keys, mask_id, config, schedule, guide, generate)[:2]


def sample_with_steps(tokens_to_logits: Callable, tokens, keys, *, mask_id: int, config: SamplerConfig,
                      schedule: Schedule | None = None, guide: Guide = (), generate=None):
  """Fills the MASKs in ``tokens`` and reports the steps each example took (arguments as
  :func:`sample_with_trace`).

  Returns:
    (int32 [B, S] with no MASK left where generated, int32 [B] steps that began with one of the example's
    generated positions MASK: its forward passes, 0 when it had none, at most ``config.steps``).
  """
  tokens, _, steps_taken = _decode(tokens_to_logits, tokens, keys, mask_id, config, schedule, guide, generate)
  return tokens, steps_taken


def _decode(network, tokens, keys, mask_id, config, schedule, guide, generate):
  """The loop of :func:`sample_with_trace`: (int32 [B, S] tokens, int32 [K, B] masked after each step,
  int32 [B] steps taken). ``network``: ``tokens_to_logits`` or a :class:`CachedNetwork`."""
  steps, length = config.steps, tokens.shape[1]
  given = tokens != mask_id
  if generate is not None:
    given = given | ~jnp.asarray(generate, bool)[None]
  to_fill = lambda tokens: (tokens == mask_id) & ~given                                     # bool [B, S]
  remaining = remaining_masked((~given).sum(axis=1), steps, config.reveal_schedule)         # [K, B]
  method = _REGISTRY[config.method]
  cached = isinstance(network, CachedNetwork)
  at = np.asarray(network.at) if cached else None
  # What the method sees: the positions the network computes ([B, A]), or all of them.
  view = (lambda x: x) if at is None else (lambda x: x[:, at])
  if cached:
    try:
      static = np.asarray(generate, bool) if generate is not None else None
    except jax.errors.TracerArrayConversionError:
      static = None
    if static is None:
      raise ValueError("a cached network needs the generated positions as a static bool [S] (generate=)")
    outside = static & ~np.isin(np.arange(tokens.shape[1]), at)
    if outside.any():
      raise ValueError(f"positions {np.flatnonzero(outside).tolist()} are generated but not computed by the "
                       "cached network (its at)")

  def log_probs_of(k, tokens, cache):
    """(float32 [B, S or A, V] guided log-probabilities, the cache after this step)."""
    if not cached:
      return guided_log_probs(network, tokens, mask_id, config.guidance_scale, guide), cache
    refresh = (k == 0) if network.refresh_every == 0 else (k % network.refresh_every == 0)
    def fill(batch, cache):
      logits, new_cache = network.full(batch)
      return logits[:, at], new_cache
    def reuse(batch, cache):
      return network.rows(batch, cache), cache
    batch = guidance_batch(tokens, mask_id, config.guidance_scale, guide)
    logits, cache = jax.lax.cond(refresh, fill, reuse, batch, cache)
    return combine_guidance(logits, tokens.shape[0], config.guidance_scale, guide, at), cache

  def running(carry):
    k, tokens = carry[:2]
    return (k < steps) & to_fill(tokens).any()

  def body(carry):
    k, tokens, counts, steps_taken, cache = carry
    step_keys = jax.vmap(lambda key: jax.random.split(jax.random.fold_in(key, k), 3))(keys)   # [B, 3, 2]
    log_probs, cache = log_probs_of(k, tokens, cache)
    candidates = draw(step_keys[:, 0], log_probs, config.temperature, at, length)           # [B, S or A]
    masked = view(to_fill(tokens))
    # The method's noise is drawn for the whole sequence and read at the computed positions, so a cached network
    # gives the uncached sampler's draws.
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (length,)))(step_keys[:, 1])       # [B, S]
    uniform = jax.vmap(lambda key: jax.random.uniform(key, (length,)))(step_keys[:, 2])     # [B, S]
    reveal = method(Step(k=k, log_probs=log_probs, candidates=candidates, masked=masked, remaining=remaining[k],
                         gumbel=view(gumbel), uniform=view(uniform), config=config, schedule=schedule))
    new = jnp.where(reveal & masked, candidates, view(tokens))
    tokens = new if at is None else tokens.at[:, at].set(new)
    counts = counts.at[k].set(to_fill(tokens).sum(axis=1).astype(jnp.int32))
    steps_taken = steps_taken + masked.any(axis=1).astype(jnp.int32)
    return k + 1, tokens, counts, steps_taken, cache

  batch = tokens.shape[0]
  cache = None
  if cached:   # an empty cache of the right shapes (the guided batch's rows included) for the loop's carry
    shapes = jax.eval_shape(network.full, guidance_batch(tokens, mask_id, config.guidance_scale, guide))[1]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  init = (jnp.int32(0), tokens, jnp.zeros((steps, batch), jnp.int32), jnp.zeros((batch,), jnp.int32), cache)
  # A while_loop, not a scan: a batch whose examples are all filled before step K stops computing.
  _, tokens, counts, steps_taken, _ = jax.lax.while_loop(running, body, init)
  return tokens, counts, steps_taken
