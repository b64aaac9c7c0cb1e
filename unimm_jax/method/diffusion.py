"""Continuous-time absorbing-state masked diffusion over segmented sequences: corruption, loss and ELBO, on one
object (MD4's habit), used alike by the train step, validation and ``Pipeline.score``.

For a schedule alpha(t) (:mod:`unimm_jax.method.schedules`) and a task (a role per segment,
:mod:`unimm_jax.method.tasks`):

1. Each example draws a task from the mixture (``diffusion.tasks``; from step ``diffusion.tasks_later_from`` on,
   with the weights ``diffusion.tasks_later`` gives, :meth:`MaskedDiffusion.task_weights_at`). Each segment draws
   its own time t in [t_min, 1], low-discrepancy across the batch, t_i = (u + i/B) mod 1, one stream per segment
   (the streams after the first permuted, so they are not tied by the batch index), or one shared t
   (``diffusion.shared_time``, UniDisc's choice).
2. Each token is replaced by MASK with probability 1 - alpha(t) of its segment (0 if clean, 1 if null).
3. Only noised segments carry loss. For an example and segment g with N_g positions:

   - ``elbo``: L_g = w(t_g) / N_g * sum_{masked i in g} -log p(x0_i | x_t), w = -alpha'/(1 - alpha), whose
     expectation over t is the negative ELBO per token of g (nats);
   - ``flat``: L_g = mean over the masked positions of g of -log p(x0_i | x_t);
   - ``tokens``: L_g = sum over the masked positions of g; each modality's loss is then divided by the batch's
     masked count of that modality (MaskGIT's loss: heavily masked examples weigh more).

   Each modality's loss is the mean of c_g L_g over the (example, segment) pairs of that modality where g is
   noised (and, for ``flat`` / ``tokens``, has a masked token), with c_g = 1 unless
   ``diffusion.segment_loss_weights`` gives segment g another (the count in the denominator is not weighted, so
   c_g = 2 counts each of g's pairs as two of weight 1 would); the total is text_loss_weight * L_text +
   image_loss_weight * L_image. Per-token ELBO bits are L_g (``elbo``) / ln 2, never weighted.
"""

from __future__ import annotations

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.method import tasks as tasks_lib
from unimm_jax.method.schedules import Schedule, get_schedule
from unimm_jax.sequence import IMAGE, TEXT, SequenceLayout

WEIGHTINGS = ("elbo", "flat", "tokens")


@flax.struct.dataclass
class Corruption:
  """How one batch is corrupted; G = number of segments."""

  t: jax.Array          # float32 [B, G]: time per segment; meaningful where noised
  mask_prob: jax.Array  # float32 [B, G]: 1 - alpha(t) where noised, 0 where clean, 1 where null
  noised: jax.Array     # bool [B, G]: the segment is noised, so it carries loss
  task: jax.Array       # int32 [B]: index into the mixture's task names


def low_discrepancy_times(key, batch: int, t_min: float) -> jax.Array:
  """float32 [B]: t_i = (u + i/B) mod 1 with one uniform u, clipped to [t_min, 1] (MD4, VDM)."""
  u = jax.random.uniform(key, ())
  t = jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
  return jnp.clip(t, t_min, 1.0)


def token_nll(logits, targets):
  """-log softmax(logits)[target]: float32 [B, S] from logits [B, S, V] and int targets [B, S]."""
  logits = logits.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - target_logit


@dataclasses.dataclass(frozen=True)
class MaskedDiffusion:
  """The method: schedule, task mixture, corruption, loss and ELBO for one sequence layout (static, hashable)."""

  layout: SequenceLayout
  schedule: Schedule
  task_names: tuple[str, ...]
  task_weights: tuple[float, ...]
  task_roles: tuple[tuple[int, ...], ...]     # [T][G] role codes (tasks.NOISED / CLEAN / NULL)
  weighting: str = "elbo"
  t_min: float = 1e-3
  shared_time: bool = False
  modality_weights: tuple[tuple[str, float], ...] = ((TEXT, 1.0), (IMAGE, 1.0))
  segment_weights: tuple[tuple[str, float], ...] = ()   # c_g of the segments whose loss weight is not 1
  # diffusion.tasks_later: from step later_from on, the mixture's weights are later_weights (same names and order)
  later_weights: tuple[float, ...] = ()
  later_from: int = 0

  def __post_init__(self):
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"unknown loss weighting {self.weighting!r}; expected one of {WEIGHTINGS}")
    unknown = [name for name, _ in self.segment_weights if name not in self.layout.names]
    if unknown:
      raise ValueError(f"config.diffusion.segment_loss_weights names {unknown}, not segments of the layout "
                       f"{list(self.layout.names)}")

  @classmethod
  def from_config(cls, diffusion_config, layout: SequenceLayout) -> "MaskedDiffusion":
    """From the ``diffusion`` config group."""
    d = diffusion_config
    declared = dict(d.get("task_roles", {}) or {})
    names, weights, roles = tasks_lib.mixture(dict(d.tasks), layout, declared)
    later = dict(d.get("tasks_later", {}) or {})
    later_weights = ()
    if later:
      unknown = sorted(set(later) - set(names))
      if unknown:
        raise ValueError(f"config.diffusion.tasks_later names {unknown}, not tasks of the mixture {list(names)}")
      later_weights = tuple(float(later.get(n, w)) for n, w in zip(names, weights))
      if sum(later_weights) <= 0:
        raise ValueError(f"config.diffusion.tasks_later={later} leaves no task with a positive weight")
    return cls(layout=layout, schedule=get_schedule(d.schedule, d.poly_power), task_names=names,
               task_weights=tuple(float(w) for w in weights), task_roles=tuple(map(tuple, roles.tolist())),
               weighting=d.loss_weighting, t_min=d.t_min, shared_time=d.shared_time,
               modality_weights=((TEXT, d.text_loss_weight), (IMAGE, d.image_loss_weight)),
               segment_weights=tuple(sorted((str(k), float(v))
                                            for k, v in dict(d.get("segment_loss_weights", {}) or {}).items())),
               later_weights=later_weights, later_from=int(d.get("tasks_later_from", 0)) if later_weights else 0)

  def roles(self, task: str) -> np.ndarray:
    """int32 [G] role codes of a task of the mixture, or of any registered task."""
    if task in self.task_names:
      return np.asarray(self.task_roles[self.task_names.index(task)], np.int32)
    return tasks_lib.roles_of(task, self.layout)

  def task_weights_at(self, step):
    """float32 [T]: the mixture's weights at training step ``step`` (an int or a traced scalar): ``task_weights``,
    or ``later_weights`` from step ``later_from`` on (``diffusion.tasks_later``)."""
    early = jnp.asarray(self.task_weights, jnp.float32)
    if not self.later_weights:
      return early
    return jnp.where(jnp.asarray(step) >= self.later_from, jnp.asarray(self.later_weights, jnp.float32), early)

  def describe_mixture(self) -> str:
    """The mixture's normalised weights, 'name share, ...', and those from ``later_from`` on where they change."""
    mix = lambda w: ", ".join(f"{n} {v / sum(w):.3f}" for n, v in zip(self.task_names, w))
    later = f"; from step {self.later_from}: {mix(self.later_weights)}" if self.later_weights else ""
    return mix(self.task_weights) + later

  # ---- corruption ------------------------------------------------------------------------------------------
  def sample_times(self, key, batch: int) -> jax.Array:
    """float32 [B, G]: one low-discrepancy stream per segment (the same stream for all with ``shared_time``).

    The key is split in 2G: key 0 is the task draw's, 1 + g segment g's stream, G + g its permutation.
    """
    n = len(self.layout.segments)
    keys = jax.random.split(key, 2 * n)
    first = low_discrepancy_times(keys[1], batch, self.t_min)
    cols = [first]
    for g in range(1, n):
      cols.append(first if self.shared_time else
                  jax.random.permutation(keys[n + g], low_discrepancy_times(keys[1 + g], batch, self.t_min)))
    return jnp.stack(cols, axis=1)

  def corruption_at(self, t, roles, task=None) -> Corruption:
    """The corruption of times t (float [..., G]) under roles (int [..., G] or [G])."""
    roles = jnp.broadcast_to(jnp.asarray(roles, jnp.int32), t.shape)
    mask_prob = jnp.where(roles == tasks_lib.NOISED, self.schedule.mask_prob(t),
                          jnp.where(roles == tasks_lib.NULL, 1.0, 0.0))
    task = jnp.zeros(t.shape[:-1], jnp.int32) if task is None else task
    return Corruption(t=t, mask_prob=mask_prob.astype(jnp.float32), noised=roles == tasks_lib.NOISED, task=task)

  def sample_corruption(self, key, batch: int, task_weights=None, present=None) -> Corruption:
    """Draws a task of the mixture (or of ``task_weights`` over the same names) and the times of each example.

    ``present`` (bool [B, G], ``SequenceLayout.present``; layouts with absent segments): each example draws among
    the tasks whose absent segments are exactly the ones it lacks, their weights renormalised. An example that no
    task fits carries no loss (its segments are all left as they are).
    """
    weights = self.task_weights if task_weights is None else task_weights
    k_task = jax.random.split(key, 2 * len(self.layout.segments))[0]
    log_w = jnp.log(jnp.asarray(weights, jnp.float32))
    all_roles = jnp.asarray(np.asarray(self.task_roles, np.int32))                     # [T, G]
    if present is None:
      task = jax.random.categorical(k_task, log_w, shape=(batch,))
      return self.corruption_at(self.sample_times(key, batch), all_roles[task], task)
    fits = tasks_lib.fits(all_roles[None], present[:, None, :]) & (log_w > -jnp.inf)[None]   # [B, T]
    any_fit = fits.any(axis=1)
    task = jax.random.categorical(k_task, jnp.where(fits | ~any_fit[:, None], log_w[None], -jnp.inf))
    roles = jnp.where(any_fit[:, None], all_roles[task], tasks_lib.CLEAN)               # [B, G]
    return self.corruption_at(self.sample_times(key, batch), roles, task)

  def given_positions(self, corruption: Corruption) -> jax.Array:
    """bool [..., S]: the positions of the segments that are not noised (clean, null or absent): what a network
    with ``model.isolate_given`` keeps from attending the noised ones."""
    return ~jnp.take(corruption.noised, self.layout.segment_index(np), axis=-1)

  def corrupt(self, key, tokens, corruption: Corruption):
    """Masks each token with its segment's probability.

    Args:
      tokens: int32 [B, S] clean global ids.
    Returns:
      (noisy int32 [B, S] with MASK where masked, masked bool [B, S]).
    """
    segment = jnp.asarray(self.layout.segment_ids())                                # [S]
    prob = jnp.take_along_axis(corruption.mask_prob, jnp.broadcast_to(segment, tokens.shape), axis=1)
    masked = jax.random.uniform(key, tokens.shape) < prob
    return jnp.where(masked, self.layout.mask_id, tokens), masked

  # ---- loss and ELBO ---------------------------------------------------------------------------------------
  def segment_losses(self, nll, masked, corruption: Corruption, weighting: str | None = None):
    """Per-example, per-segment losses (nats per token) and where they count.

    Args:
      nll: float32 [B, S] -log p(x0 | x_t) at every position.
      masked: bool [B, S].
      weighting: 'elbo', 'flat' or 'tokens' (module docstring; default the method's).
    Returns:
      (losses float32 [B, G], valid bool [B, G], masked counts int32 [B, G]).
    """
    weighting = weighting or self.weighting
    nll_parts, masked_parts = self.layout.split(nll), self.layout.split(masked)
    losses, valid, counts = [], [], []
    for g, name in enumerate(self.layout.names):
      seg_nll, seg_masked = nll_parts[name], masked_parts[name]
      m_nll = jnp.where(seg_masked, seg_nll, 0.0).sum(axis=1)                        # [B]
      count = seg_masked.sum(axis=1)
      noised = corruption.noised[:, g]
      if weighting == "elbo":
        t_safe = jnp.where(noised, corruption.t[:, g], 1.0)  # w(0) is infinite; clean rows are zeroed below
        loss = self.schedule.weight(t_safe) * m_nll / seg_nll.shape[1]
        ok = noised
      elif weighting == "flat":
        loss = m_nll / jnp.maximum(count, 1)
        ok = noised & (count > 0)
      elif weighting == "tokens":
        loss = m_nll
        ok = noised & (count > 0)
      else:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
      losses.append(jnp.where(ok, loss, 0.0))
      valid.append(ok)
      counts.append(count)
    return jnp.stack(losses, axis=1), jnp.stack(valid, axis=1), jnp.stack(counts, axis=1)

  def loss(self, nll, masked, corruption: Corruption):
    """(scalar training loss, {'loss_text', 'loss_image'}: mean per-modality losses, nats per token)."""
    losses, valid, counts = self.segment_losses(nll, masked, corruption)
    sums = losses.sum(axis=0)                                                        # [G]
    if self.segment_weights:
      weights = dict(self.segment_weights)
      sums = sums * jnp.asarray([weights.get(name, 1.0) for name in self.layout.names], jnp.float32)
    denominators = ((counts * valid).sum(axis=0) if self.weighting == "tokens" else valid.sum(axis=0))
    total, parts = 0.0, {}
    for modality, weight in self.modality_weights:
      idx = [self.layout.index(n) for n in self.layout.of_modality(modality)]
      if not idx:
        continue
      num, den = sums[idx[0]], denominators[idx[0]]
      for i in idx[1:]:
        num, den = num + sums[i], den + denominators[i]
      parts[f"loss_{modality}"] = num / jnp.maximum(den, 1)
      total = total + weight * parts[f"loss_{modality}"]
    return total, parts

  def elbo_bits(self, nll, masked, corruption: Corruption):
    """float32 [B, G]: each example's negative ELBO estimate of each segment in bits per token (0 where the
    segment is not noised)."""
    losses, _, _ = self.segment_losses(nll, masked, corruption, "elbo")
    return losses / math.log(2.0)

  def modality_bits(self, bits, roles, present=None) -> dict[str, jax.Array]:
    """{modality: float [B]} from per-segment bits [B, G]: the token-weighted mean over the noised segments of
    each modality (a modality with no noised segment under ``roles`` is left out). With ``present`` (bool [B, G],
    layouts with absent segments) each example's mean is over its present segments only, NaN where it has none."""
    out = {}
    for modality in self.layout.modalities:
      idx = [self.layout.index(n) for n in self.layout.of_modality(modality)
             if roles[self.layout.index(n)] == tasks_lib.NOISED]
      if not idx:
        continue
      sizes = [self.layout.segments[i].size for i in idx]
      if present is not None:
        w = jnp.asarray(sizes, jnp.float32)[None] * present[:, np.asarray(idx)]
        total = w.sum(axis=1)
        out[modality] = jnp.where(total > 0, (bits[:, np.asarray(idx)] * w).sum(axis=1) / jnp.maximum(total, 1.0),
                                  jnp.nan)
      elif len(idx) == 1:
        out[modality] = bits[:, idx[0]]
      else:
        out[modality] = sum(bits[:, i] * n for i, n in zip(idx, sizes)) / sum(sizes)
    return out
