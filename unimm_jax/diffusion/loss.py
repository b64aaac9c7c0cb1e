"""Corruption and loss of continuous-time absorbing-state masked diffusion over ``[text | image]`` sequences.

Training (DESIGN.md section 4):

1. Each example draws a task from the config's mixture, which fixes what happens to each modality:

   ==============  ==========  ==========
   task            text        image
   ==============  ==========  ==========
   joint           noised      noised
   text_to_image   clean       noised
   image_to_text   noised      clean
   image_only      all MASK    noised      (the null text condition that guidance needs)
   text_only       noised      all MASK
   ==============  ==========  ==========

2. A noised modality gets a time t in [t_min, 1], low-discrepancy across the batch, t_i = (u + i/B) mod 1,
   one independent stream per modality (or one shared t with ``diffusion.shared_time``).
3. Each token is replaced by MASK with probability 1 - alpha(t) of its modality's time (0 if clean, 1 if null).
4. Only noised modalities contribute loss. For an example and modality m with N_m positions:

   - ``elbo``: L_m = w(t_m) / N_m * sum_{masked i in m} -log p(x0_i | x_t), w = -alpha'/(1 - alpha), whose
     expectation over t is the negative ELBO per token (nats);
   - ``flat``: L_m = mean over the masked positions of m of -log p(x0_i | x_t).

   Each modality's loss is the mean of L_m over the examples where m is noised (and, for ``flat``, has at least
   one masked token); the total is text_loss_weight * L_text + image_loss_weight * L_image.

   - ``tokens``: each modality's loss is the mean of -log p(x0_i | x_t) over *all* masked positions of m in the
     batch (MaskGIT's loss). An example then weighs by its number of masked tokens, so heavily masked inputs,
     where generation starts and which are the hardest, get more of the gradient than under ``elbo``/``flat``
     (both of which weigh every example alike in expectation).
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.data.vocab import VocabLayout
from unimm_jax.diffusion.schedules import Schedule

WEIGHTINGS = ("elbo", "flat", "tokens")
TASKS = ("joint", "text_to_image", "image_to_text", "image_only", "text_only")
# Per task, per modality (text, image): 0 noised, 1 clean, 2 null (all MASK).
NOISED, CLEAN, NULL = 0, 1, 2
# numpy, not jnp: importing this module must not start a JAX backend (jax.distributed.initialize comes first).
_TASK_STATES = np.array([[NOISED, NOISED], [CLEAN, NOISED], [NOISED, CLEAN], [NULL, NOISED], [NOISED, NULL]],
                        np.int32)


@flax.struct.dataclass
class Corruption:
  """How one batch is corrupted."""

  t: jax.Array          # float32 [B, 2]: time per modality (text, image); meaningful where noised
  mask_prob: jax.Array  # float32 [B, 2]: 1 - alpha(t) where noised, 0 where clean, 1 where null
  noised: jax.Array     # bool [B, 2]: the modality is noised, so it carries loss
  task: jax.Array       # int32 [B]: index into TASKS


def low_discrepancy_times(key, batch: int, t_min: float) -> jax.Array:
  """float32 [B]: t_i = (u + i/B) mod 1 with one uniform u, clipped to [t_min, 1] (MD4, VDM)."""
  u = jax.random.uniform(key, ())
  t = jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
  return jnp.clip(t, t_min, 1.0)


def sample_corruption(key, batch: int, schedule: Schedule, task_weights, *, t_min: float = 1e-3,
                      shared_time: bool = False) -> Corruption:
  """Draws a task and the per-modality times for each example.

  Args:
    key: PRNG key.
    batch: B.
    schedule: the masking schedule.
    task_weights: float [len(TASKS)] unnormalised task probabilities.
    t_min: smallest time of a noised modality.
    shared_time: one t for both modalities.
  """
  k_task, k_text, k_image, k_perm = jax.random.split(key, 4)
  logits = jnp.log(jnp.asarray(task_weights, jnp.float32))
  task = jax.random.categorical(k_task, logits, shape=(batch,))
  t_text = low_discrepancy_times(k_text, batch, t_min)
  # The image stream is permuted so the two modalities' times are not tied by the batch index.
  t_image = t_text if shared_time else jax.random.permutation(k_perm, low_discrepancy_times(k_image, batch, t_min))
  t = jnp.stack([t_text, t_image], axis=1)
  states = jnp.asarray(_TASK_STATES)[task]                                          # [B, 2]
  mask_prob = jnp.where(states == NOISED, schedule.mask_prob(t), jnp.where(states == NULL, 1.0, 0.0))
  return Corruption(t=t, mask_prob=mask_prob.astype(jnp.float32), noised=states == NOISED, task=task)


def corrupt(key, tokens, corruption: Corruption, layout: VocabLayout):
  """Masks each token with its modality's probability.

  Args:
    tokens: int32 [B, S] clean global ids.
  Returns:
    (noisy int32 [B, S] with MASK where masked, masked bool [B, S]).
  """
  modality = jnp.asarray(layout.modality_ids())                                    # [S]
  prob = jnp.take_along_axis(corruption.mask_prob, jnp.broadcast_to(modality, tokens.shape), axis=1)
  masked = jax.random.uniform(key, tokens.shape) < prob
  return jnp.where(masked, layout.mask_id, tokens), masked


def token_nll(logits, targets):
  """-log softmax(logits)[target]: float32 [B, S] from logits [B, S, V] and int targets [B, S]."""
  logits = logits.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - target_logit


def per_example_losses(nll, masked, t, noised, layout: VocabLayout, schedule: Schedule, weighting: str):
  """Per-example, per-modality losses (nats per token) and where they count.

  Args:
    nll: float32 [B, S] -log p(x0 | x_t) at every position.
    masked: bool [B, S].
    t: float32 [B, 2].
    noised: bool [B, 2].
    weighting: 'elbo', 'flat' or 'tokens' (module docstring); 'tokens' gives the per-example sums of masked
      nll here, which ``diffusion_loss`` divides by the batch's masked count.
  Returns:
    (losses float32 [B, 2], valid bool [B, 2]).
  """
  split = layout.text_len
  losses, valid = [], []
  for m, seg in enumerate((slice(0, split), slice(split, None))):
    m_nll = jnp.where(masked[:, seg], nll[:, seg], 0.0).sum(axis=1)               # [B]
    count = masked[:, seg].sum(axis=1)
    if weighting == "elbo":
      t_safe = jnp.where(noised[:, m], t[:, m], 1.0)  # w(0) is infinite; clean rows are zeroed below
      loss = schedule.weight(t_safe) * m_nll / nll[:, seg].shape[1]
      ok = noised[:, m]
    elif weighting == "flat":
      loss = m_nll / jnp.maximum(count, 1)
      ok = noised[:, m] & (count > 0)
    elif weighting == "tokens":
      loss = m_nll
      ok = noised[:, m] & (count > 0)
    else:
      raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
    losses.append(jnp.where(ok, loss, 0.0))
    valid.append(ok)
  return jnp.stack(losses, axis=1), jnp.stack(valid, axis=1)


def diffusion_loss(logits, tokens, masked, corruption: Corruption, layout: VocabLayout, schedule: Schedule,
                   weighting: str, modality_weights=(1.0, 1.0)):
  """The training loss and its per-modality parts.

  Args:
    logits: float32 [B, S, V] from the network on the corrupted tokens.
    tokens: int32 [B, S] clean global ids.
    masked: bool [B, S].
  Returns:
    (scalar loss, {'loss_text', 'loss_image'}: mean per-modality losses in nats per token).
  """
  return loss_from_nll(token_nll(logits, tokens), masked, corruption, layout, schedule, weighting, modality_weights)


def loss_from_nll(nll, masked, corruption: Corruption, layout: VocabLayout, schedule: Schedule, weighting: str,
                  modality_weights=(1.0, 1.0)):
  """:func:`diffusion_loss` from the per-position -log p(x0 | x_t), float32 [B, S] (however it was computed)."""
  losses, valid = per_example_losses(nll, masked, corruption.t, corruption.noised, layout, schedule, weighting)
  if weighting == "tokens":
    split = layout.text_len
    counts = jnp.stack([masked[:, :split].sum(axis=1), masked[:, split:].sum(axis=1)], axis=1)  # [B, 2]
    per_modality = losses.sum(axis=0) / jnp.maximum((counts * valid).sum(axis=0), 1)
  else:
    per_modality = losses.sum(axis=0) / jnp.maximum(valid.sum(axis=0), 1)            # [2]
  total = modality_weights[0] * per_modality[0] + modality_weights[1] * per_modality[1]
  return total, {"loss_text": per_modality[0], "loss_image": per_modality[1]}


def elbo_bits(logits, tokens, masked, t, layout: VocabLayout, schedule: Schedule):
  """Per-example negative ELBO estimate in bits per token, both modalities noised: float32 [B, 2]."""
  noised = jnp.ones(t.shape, bool)
  losses, _ = per_example_losses(token_nll(logits, tokens), masked, t, noised, layout, schedule, "elbo")
  return losses / math.log(2.0)
