"""The compiled programs behind a :class:`~unimm_jax.pipeline.Pipeline`: the sampling loops and the scoring ELBO.

Each is jitted once per static setting and run over batches padded to one size, so a call of any size compiles
nothing new. The Pipeline builds the inputs (tokens, which positions to generate, guidance pairs) and decodes the
outputs; this module knows the network, the method and the layout, not tokenizers or recipes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.method import samplers
from unimm_jax.method import tasks as tasks_lib
from unimm_jax.method.diffusion import MaskedDiffusion
from unimm_jax.models import transformer


class Programs:
  """The jitted sampling and scoring programs of one network over one layout (cached by static setting)."""

  def __init__(self, model: transformer.Transformer, diffusion: MaskedDiffusion):
    self.model = model
    self.diffusion = diffusion
    self.layout = diffusion.layout
    self.schedule = diffusion.schedule
    self.samplers = {}     # (sampler config, guide pairs, loops) -> jitted loop
    self.score_fns = {}    # (samples per example, grid) -> jitted ELBO
    self._alone = {}       # segment names -> Programs over those segments alone

  def alone(self, names) -> "Programs":
    """The programs of the same network and weights over the layout of the segments ``names`` alone (in this
    layout's order; ``layout.only``), for examples that lack the others. For a network that computes an example
    as its present segments alone (``TransformerConfig.segments_alone``) they give what the whole layout gives,
    at the cost of those positions only. The method's roles and loss weights are those segments' columns."""
    names = tuple(n for n in self.layout.names if n in set(names))
    if names == self.layout.names:
      return self
    if names not in self._alone:
      if not self.model.config.segments_alone:
        raise ValueError(f"Programs.alone{names}: this network's outputs depend on the other segments (it needs "
                         "model.mask_absent=True, rope_layout='segment', no image_row_end_id, no pad_key_id)")
      sub = self.layout.only(names)
      idx = [self.layout.index(n) for n in names]
      d = self.diffusion
      diffusion = dataclasses.replace(d, layout=sub, task_roles=tuple(tuple(r[i] for i in idx) for r in d.task_roles),
                                      segment_weights=tuple((n, w) for n, w in d.segment_weights if n in names))
      self._alone[names] = Programs(self.model.clone(config=dataclasses.replace(self.model.config, layout=sub)),
                                    diffusion)
    return self._alone[names]

  def sampler(self, cfg: samplers.SamplerConfig, guide, loops):
    """The jitted sampling loop(s) as ``fn(params, tokens, keys)``: one loop per entry of ``loops``, each a pair
    (generate, region) of bool [S]: the positions the loop fills, and those being generated in its stage (its
    block's whole stage; every other position is given: ``model.isolate_given``), with the later loops'
    positions still MASK (their null condition); loop i > 0 draws with keys folded with i. Every loop
    ``cfg.steps`` steps, all in one program.

    Uncached, the positions and the guidance pairs (bool [S] each) are inputs of the program, not constants in
    it, so one compiled program serves every choice of segments with the same number of loops and guidance
    pairs. With ``cfg.cache`` the positions a loop computes are static (a program per choice of segments): the
    region (``exact``: exact for a model trained with ``model.isolate_given``) or the block (``dual``:
    Fast-dLLM's dual cache, refreshed at each block's start and every ``cfg.refresh_every`` steps).
    """
    cached = cfg.cache != "none"
    if cfg.cache == "exact" and not self.model.config.isolate_given:
      raise ValueError("sample cache='exact' reuses the given positions' keys and values, which is exact only for a "
                       "model trained with config.model.isolate_given=True; this one was not: use cache='dual' "
                       "(approximate) or 'none'")
    key = (cfg, len(guide), loops if cached else len(loops))
    if key not in self.samplers:
      def run(params, tokens, keys, loop_masks, guide_masks, guide_tokens):
        # bool [n_loops, 2, S], bool [n_guide, 2, S], int32 [n_guide, S] (-1: MASK)
        pairs = tuple((guide_masks[j, 0], guide_masks[j, 1], guide_tokens[j]) for j in range(guide_masks.shape[0]))
        passes = jnp.zeros(tokens.shape[0], jnp.int32)
        for i in range(len(loops)):
          if cached:
            generate, region = (np.asarray(m, bool) for m in loops[i])
            network = self.network(params, region, generate if cfg.cache == "dual" else region,
                                    cfg.refresh_every if cfg.cache == "dual" else 0)
          else:
            generate, region = loop_masks[i, 0], loop_masks[i, 1]
            network = self.network(params, region)
          loop_keys = keys if i == 0 else jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys)
          tokens, steps = samplers.sample_with_steps(network, tokens, loop_keys, mask_id=self.layout.mask_id,
                                                     config=cfg, schedule=self.schedule, guide=pairs,
                                                     generate=generate)
          passes = passes + steps
        return tokens, passes
      self.samplers[key] = jax.jit(run)
    s = self.layout.seq_len
    loop_masks = jnp.asarray(np.asarray(loops, bool).reshape(len(loops), 2, s))
    guide_masks = jnp.asarray(np.asarray([g[:2] for g in guide], bool).reshape(len(guide), 2, s))
    guide_tokens = jnp.asarray(np.asarray([g[2] if len(g) > 2 else (-1,) * s for g in guide], np.int32)
                               .reshape(len(guide), s))
    fn = self.samplers[key]
    return lambda params, tokens, keys: fn(params, tokens, keys, loop_masks, guide_masks, guide_tokens)

  def network(self, params, region, rows=None, refresh_every: int = 0):
    """The network as the sampling loop calls it: ``tokens_to_logits`` (int32 [B, S] -> float32 [B, S, V]), or
    with ``rows`` (bool [S], static) a :class:`samplers.CachedNetwork` computing those positions. ``region``:
    bool [S], the positions being generated (the others are given to a ``model.isolate_given`` network)."""
    given = ~jnp.asarray(region, bool)
    apply = lambda t, **kw: self.model.apply({"params": params}, t, given=jnp.broadcast_to(given, t.shape), **kw)
    banned = None
    if not self.model.config.restrict_output:
      # Raw logits (an imported model): MASK is never a candidate all the same, and an image position draws
      # an image code (the upstreams slice their logits to the codebook there; text takes any id).
      banned = self.raw_logits_banned()
    restrict = lambda logits, at=None: logits if banned is None else jnp.where(
        (banned if at is None else banned[at])[None], transformer.NEG_INF, logits)
    if rows is None:
      return lambda t: restrict(apply(t))
    at = np.flatnonzero(rows)
    def full(t):
      logits, kv = apply(t, return_kv=True)
      return restrict(logits), kv
    return samplers.CachedNetwork(full=full, rows=lambda t, kv: restrict(apply(t, rows=at, kv=kv), at), at=at,
                                  refresh_every=refresh_every)

  def raw_logits_banned(self):
    """bool [S, V]: the ids a model with raw logits may not draw: at each position the ids outside its modality's
    range, and MASK (the layout's ``allowed_ids``). The upstreams slice their logits to the codebook at image
    positions; at text positions MMaDA takes the argmax over the whole vocabulary, which a trained model puts on
    text ids, and a text id is what a text segment can decode."""
    return ~self.layout.allowed_ids(jnp)

  def batched(self, fn, params, tokens: np.ndarray, keys, batch_size: int):
    """Applies ``fn(params, tokens [b, S], keys [b, 2])`` over padded batches of ``batch_size``, so a call of any
    size reuses the one compiled program; padding rows repeat the last example and are dropped.

    Returns:
      (the outputs of the call's examples, concatenated; for a sampling ``fn``, which returns (tokens, forward
      passes int [b]), int [N] the sampler steps each example took, its stages and blocks summed: forward passes
      over its sequence (a guided step's pass carries the uncond rows beside it in one batch); else None).
    """
    out, passes = [], []
    for start in range(0, tokens.shape[0], batch_size):
      chunk, chunk_keys = tokens[start:start + batch_size], keys[start:start + batch_size]
      n = chunk.shape[0]
      if n < batch_size:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        chunk_keys = jnp.concatenate([chunk_keys, jnp.repeat(chunk_keys[-1:], batch_size - n, axis=0)])
      result = fn(params, jnp.asarray(chunk), chunk_keys)
      if isinstance(result, tuple):
        result, steps = result
        passes.append(np.asarray(steps)[:n])
      out.append(np.asarray(result)[:n])
    return np.concatenate(out), (np.concatenate(passes) if passes else None)

  def score_fn(self, roles: tuple[int, ...], num_samples: int = 16, grid: bool = False):
    """:meth:`_score_batch` for one task (role codes per segment) as ``fn(params, tokens, keys)``; the roles are an
    input of the one compiled program, so scoring any segments given any others compiles once."""
    if (num_samples, grid) not in self.score_fns:
      self.score_fns[num_samples, grid] = jax.jit(
          lambda params, tokens, keys, roles: self._score_batch(params, tokens, keys, roles, num_samples, grid))
    fn, roles = self.score_fns[num_samples, grid], jnp.asarray(roles, jnp.int32)
    return lambda params, tokens, keys: fn(params, tokens, keys, roles)

  def _score_batch(self, params, tokens, keys, roles, num_samples: int, grid: bool = False):
    """Mean over ``num_samples`` times of each example's ELBO bits: float32 [B, G].

    The times are low-discrepancy, ``t_j = (u + j / n) mod 1`` with u uniform per example and segment (an unbiased
    estimate of the ELBO); or, with ``grid``, the fixed ``t_j = (j + 1) / n`` for every example and segment (not
    an unbiased estimate, a score with no randomness in its times: n = 1 is one forward pass with the noised
    segments all MASK, each token predicted from the clean segments alone). Only the noised segments are masked
    at their times (clean ones stay clean, null ones all MASK: a conditional bound); the columns of the others
    are 0. Each example's masks come from its own key, so its score does not depend on its batch. The corruption
    and the ELBO are the method's (:class:`MaskedDiffusion`), as in training and validation.
    """
    diffusion, g = self.diffusion, len(self.layout.segments)
    noised_row = roles == tasks_lib.NOISED                                                # bool [G]
    def one(tok, key):
      k_u, k_mask = jax.random.split(key)
      j = jnp.arange(num_samples, dtype=jnp.float32)[:, None] / num_samples
      if grid:
        t = jnp.broadcast_to(j + 1.0 / num_samples, (num_samples, g))
      else:
        u = jax.random.uniform(k_u, (g,))
        t = jnp.mod(u[None, :] + j, 1.0)
      t = jnp.clip(t, diffusion.t_min, 1.0)                                              # [n, G]
      c = diffusion.corruption_at(t, roles)
      rep = jnp.broadcast_to(tok, (num_samples,) + tok.shape)
      noisy, masked = diffusion.corrupt(k_mask, rep, c)
      return rep, noisy, masked, c
    rep, noisy, masked, c = jax.vmap(one)(tokens, keys)                                  # [B, n, ...]
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    c = jax.tree.map(flat, c)
    nll = transformer.sequence_nll(self.model, params, flat(noisy), flat(rep), diffusion.given_positions(c))
    bits = diffusion.elbo_bits(nll, flat(masked), c)
    return jnp.where(noised_row, bits.reshape(tokens.shape[0], num_samples, g).mean(axis=1), 0.0)
