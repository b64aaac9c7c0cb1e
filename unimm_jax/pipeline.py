"""The user-facing Pipeline: one trained model, every direction.

::

    from unimm_jax import Pipeline
    pipe = Pipeline.load("runs/shapes")          # a training workdir: newest checkpoint, EMA weights
    images = pipe.text_to_image(["a small red circle at the top left"], steps=16, seed=0)  # uint8 [N, H, W, C]
    captions = pipe.image_to_text(images, steps=24)                                          # list[str]
    texts, images = pipe.generate(4, steps=32)                                               # joint
    images = pipe.inpaint(images, mask, prompts=None)          # mask: bool [N, H, W], True = redraw
    texts = pipe.infill(["a <mask> red circle at the top left"])   # each "<mask>" is one token to fill
    bits = pipe.score(prompts, images)                         # {'text': [N], 'image': [N]} bits per token
    bits = pipe.score(prompts, images, given="text")           # {'image': [N]}: the image given the caption

Every call builds the starting sequences (MASK where something is to be generated, the given tokens elsewhere)
and runs the one jitted sampling loop of :mod:`unimm_jax.diffusion.sampling` over batches padded to a fixed
compiled size, so a call of any size compiles nothing new. Each example's randomness comes from
``fold_in(PRNGKey(seed), i)`` with i its index in the call: the same seed gives the same output, whatever the
batch size.
"""

from __future__ import annotations

import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from unimm_jax import checkpointing, configuration, sharding, storage
from unimm_jax.data import pipeline as data_pipeline
from unimm_jax.diffusion import loss as loss_lib
from unimm_jax.diffusion import sampling
from unimm_jax.diffusion.schedules import get_schedule

JOINT_ORDERS = ("together", "text_first", "image_first")
HOLE = "<mask>"   # infill: one masked text token
_STEPS_KEY = {"t2i": "t2i_steps", "inpaint": "t2i_steps", "i2t": "i2t_steps", "infill": "i2t_steps",
              "joint": "joint_steps"}


def sampler_kwargs(config, task: str) -> dict:
  """The run's ``config.sample`` settings for ``task`` (t2i | i2t | joint | inpaint | infill) as call arguments."""
  s = config.sample
  kw = dict(steps=s[_STEPS_KEY[task]], temperature=s.temperature, method=s.method,
            confidence_noise=s.confidence_noise, reveal_schedule=s.reveal_schedule)
  if task == "joint":
    kw["order"] = s.joint_order
  if task == "i2t":
    kw["candidates"] = s.i2t_candidates
  return kw


class Pipeline:
  """A trained model with its tokenizers; see the module docstring."""

  def __init__(self, config, params, toks: data_pipeline.Tokenizers, *, batch_size: int = 64,
               step: int | None = None):
    from unimm_jax import train  # pylint: disable=g-import-not-at-top  (train imports this package's modules)
    self.config = config
    self.step = step          # the training step of the weights, when known
    self.params = params
    self.tokenizers = toks
    self.layout = toks.layout
    self.model = train.make_model(config, self.layout)
    self.schedule = get_schedule(config.diffusion.schedule, config.diffusion.poly_power)
    self.batch_size = batch_size
    self._samplers = {}
    self._score_fns = {}

  # ---- loading -------------------------------------------------------------------------------------------------
  @classmethod
  def load(cls, path, *, weights: str = "ema", step: int | None = None, batch_size: int = 64) -> "Pipeline":
    """From a training workdir (newest checkpoint, or ``step``; EMA weights unless ``weights='raw'``), or from
    a bundle written by ``python -m unimm_jax.export`` (its one set of weights; ``weights``/``step`` unused)."""
    from unimm_jax import export, train  # pylint: disable=g-import-not-at-top
    path = storage.absolute_path(path)
    if (path / export.MODEL_FILE).exists():
      meta = json.loads((path / export.MODEL_FILE).read_text())
      config = configuration.from_dict(meta["config"])
      toks = data_pipeline.load_tokenizers(path, config.text.max_len)
      logging.info("loaded exported %s weights (%s) of step %s from %s", meta["weights"], meta["dtype"],
                   meta["step"], path)
      return cls(config, export.load_params(path, meta), toks, batch_size=batch_size, step=meta["step"])
    config_file = path / "config.json"
    if not config_file.exists():
      raise FileNotFoundError(f"{path} is neither a training workdir (no config.json) nor an exported model "
                              f"(no {export.MODEL_FILE})")
    config = configuration.from_dict(json.loads(config_file.read_text()))
    toks = data_pipeline.load_tokenizers(path, config.text.max_len)
    method = train.make_method(config, toks.layout)
    # Restored onto this process's first device, whatever mesh (and device count) the run trained on.
    abstract, _ = train.state_shardings(method, sharding.single_device_mesh(), sharding.rules_of(config))
    ckpt = checkpointing.Checkpointer(path, every_steps=1, max_to_keep=config.ckpt.max_to_keep, async_save=False)
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    state = ckpt.restore(abstract, step=step)
    ckpt.close()
    if weights not in ("ema", "raw"):
      raise ValueError(f"weights={weights!r} must be 'ema' or 'raw'")
    params = state.ema_params if weights == "ema" else state.params
    logging.info("loaded %s weights of step %d from %s", weights, int(state.step), path)
    return cls(config, params, toks, batch_size=batch_size, step=int(state.step))

  # ---- the one sampling loop, batched ---------------------------------------------------------------------------
  def _sampler(self, cfg: sampling.SamplerConfig, guide: tuple[bool, bool], order: str = "together"):
    """The jitted sampling loop(s): one loop over every MASK (``together``), or, for joint generation, the caption
    first with the image all MASK (the null condition: a draw from p(text)) and then the image for it
    (``text_first``), or the reverse (``image_first``); each stage ``cfg.steps`` steps, all in one program."""
    key = (cfg, guide, order)
    if key not in self._samplers:
      text_pos = self.layout.modality_ids() == 0
      def run(params, tokens, keys):
        logits_fn = lambda t: self.model.apply({"params": params}, t)
        kw = dict(layout=self.layout, config=cfg, schedule=self.schedule, guide=guide)
        if order == "together":
          return sampling.sample(logits_fn, tokens, keys, **kw)
        first = text_pos if order == "text_first" else ~text_pos
        tokens = sampling.sample(logits_fn, tokens, keys, only=first, **kw)
        second_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        return sampling.sample(logits_fn, tokens, second_keys, **kw)
      self._samplers[key] = jax.jit(run)
    return self._samplers[key]

  def _sampler_config(self, steps, temperature, guidance_scale, method, **kw) -> sampling.SamplerConfig:
    return sampling.SamplerConfig(method=method, steps=int(steps), temperature=float(temperature),
                                  guidance_scale=float(guidance_scale), **kw)

  def _batched(self, fn, tokens: np.ndarray, keys) -> np.ndarray:
    """Applies ``fn(params, tokens [b, S], keys [b, 2])`` over padded batches of ``batch_size``, so a call of any
    size reuses the one compiled program; padding rows repeat the last example and are dropped."""
    out = []
    for start in range(0, tokens.shape[0], self.batch_size):
      chunk, chunk_keys = tokens[start:start + self.batch_size], keys[start:start + self.batch_size]
      n = chunk.shape[0]
      if n < self.batch_size:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, axis=0)])
        chunk_keys = jnp.concatenate([chunk_keys, jnp.repeat(chunk_keys[-1:], self.batch_size - n, axis=0)])
      out.append(np.asarray(fn(self.params, jnp.asarray(chunk), chunk_keys))[:n])
    return np.concatenate(out)

  @staticmethod
  def _example_keys(seed: int, n: int):
    """uint32 [n, 2]: example i's key is fold_in(PRNGKey(seed), i), whatever batch it lands in."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n))

  def _run(self, tokens: np.ndarray, cfg: sampling.SamplerConfig, guide, seed: int,
           order: str = "together", keys=None) -> np.ndarray:
    """int32 [N, S] with MASKs -> int32 [N, S] without."""
    keys = self._example_keys(seed, tokens.shape[0]) if keys is None else keys
    return self._batched(self._sampler(cfg, guide, order), tokens, keys)

  # ---- inputs --------------------------------------------------------------------------------------------------
  def _text_ids(self, prompts: Sequence[str]) -> np.ndarray:
    if isinstance(prompts, str):
      raise TypeError("prompts must be a list of strings, not one string")
    if len(prompts) == 0:
      raise ValueError("the prompt list is empty")
    tok, n = self.tokenizers.text, self.layout.text_len
    ids = []
    for p in prompts:
      longer = tok.encode(p, n + 1)
      if longer[-1] != tok.pad_id:
        logging.warning("prompt truncated to %d text tokens: %r", n, p)
      ids.append(longer[:n])
    return np.stack(ids)

  def _image_ids(self, images) -> np.ndarray:
    images = np.asarray(images)
    want = self.tokenizers.image.image_shape
    if images.ndim == 3 and want[2] == 1:
      images = images[..., None]
    if images.ndim != 4 or images.shape[1:] != tuple(want):
      raise ValueError(f"images must be uint8 [N, {want[0]}, {want[1]}, {want[2]}] for this model, "
                       f"got shape {images.shape}")
    if images.shape[0] == 0:
      raise ValueError("the image batch is empty")
    return self.tokenizers.image.encode(images.astype(np.uint8))

  @staticmethod
  def _unknown(n: int, length: int) -> np.ndarray:
    """int32 [n, length] of -1: local ids still to be generated (MASK once packed)."""
    return np.full((n, length), -1, np.int32)

  @staticmethod
  def _check_pairs(n_text: int, n_image: int, what: str = "prompts") -> None:
    if n_text != n_image:
      raise ValueError(f"{n_text} {what} for {n_image} images")

  def _pack(self, text_ids, image_ids) -> np.ndarray:
    """Local ids (or -1 for MASK) -> global ids with MASK."""
    lay = self.layout
    text = np.where(text_ids < 0, lay.mask_id, text_ids + lay.text_offset)
    image = np.where(image_ids < 0, lay.mask_id, image_ids + lay.image_offset)
    return np.concatenate([text, image], axis=1).astype(np.int32)

  # ---- tasks ---------------------------------------------------------------------------------------------------
  def text_to_image(self, prompts: Sequence[str], steps: int = 16, guidance_scale: float = 0.0,
                    temperature: float = 1.0, seed: int = 0, method: str = "confidence", **options) -> np.ndarray:
    """Images drawn for the prompts: uint8 [N, H, W, C].

    ``options`` (every generation method): ``confidence_noise`` and ``reveal_schedule`` of the confidence
    sampler (:class:`~unimm_jax.diffusion.sampling.SamplerConfig`).
    """
    text = self._text_ids(prompts)
    tokens = self._pack(text, self._unknown(len(text), self.layout.image_len))
    cfg = self._sampler_config(steps, temperature, guidance_scale, method, **options)
    return self.tokenizers.decode(self._run(tokens, cfg, (False, True), seed))[1]

  def image_to_text(self, images, steps: int = 24, guidance_scale: float = 0.0, temperature: float = 1.0,
                    seed: int = 0, method: str = "confidence", candidates: int = 1, **options) -> list[str]:
    """Captions written for the images (uint8 [N, H, W, C]).

    ``candidates=K > 1``: K captions are drawn for each image (the first with the key ``candidates=1`` would use,
    the others from keys folded from it) and the one kept is the caption under which the model finds the image
    most likely: the lowest ELBO bits of the image given the caption (:meth:`score` with ``given='text'``, every
    candidate scored with the same times and masks). By Bayes, p(caption | image) is proportional to
    p(image | caption) p(caption), and a unified model has both directions: on ``shapes`` its drawing direction
    learns to bind each phrase to its grid cell well before its captioning direction does (BENCHMARKS.md,
    seventh round), so the captions whose objects sit in the wrong cells, equally likely to the captioning
    direction, are told apart by the drawing one. Costs K sampling loops and K scoring passes.
    """
    drawn, bits = self._caption_candidates(images, candidates, seed, steps=steps, temperature=temperature,
                                           guidance_scale=guidance_scale, method=method, **options)
    best = drawn[bits.argmin(axis=0), np.arange(drawn.shape[1])]
    return self.tokenizers.decode(best)[0]

  def _caption_candidates(self, images, candidates: int, seed: int, *, steps, temperature, guidance_scale, method,
                          **options) -> tuple[np.ndarray, np.ndarray]:
    """(int32 [K, N, S] sequences with the K captions drawn for each image, float [K, N] bits per token of the
    image given each; zeros when K = 1, which is not scored). Candidate 0 uses the key of a plain call."""
    if candidates < 1:
      raise ValueError(f"candidates={candidates} must be >= 1")
    image = self._image_ids(images)
    tokens = self._pack(self._unknown(len(image), self.layout.text_len), image)
    cfg = self._sampler_config(steps, temperature, guidance_scale, method, **options)
    keys = self._example_keys(seed, len(image))
    fold = lambda k: keys if k == 0 else jax.vmap(lambda key: jax.random.fold_in(key, k))(keys)
    drawn = np.stack([self._run(tokens, cfg, (True, False), seed, keys=fold(k)) for k in range(candidates)])
    if candidates == 1:
      return drawn, np.zeros((1, len(image)), np.float32)
    # One set of times and masks for every candidate of an example: the comparison is of the captions alone.
    # 8 times, not score()'s 16: a caption with the objects in the wrong cells costs the image about 1 bit a
    # token against 0.001 (BENCHMARKS.md, seventh round), far beyond the noise of 8; the scoring is then about
    # a third of each candidate's cost.
    score = self._score_fn((False, True), num_samples=8)
    bits = np.stack([self._batched(score, d, fold(candidates))[:, 1] for d in drawn])
    return drawn, bits

  def generate(self, n: int, steps: int = 32, temperature: float = 1.0, seed: int = 0,
               method: str = "confidence", order: str = "together", **options) -> tuple[list[str], np.ndarray]:
    """n caption-image pairs drawn unconditionally.

    ``order``: ``together`` unmasks both modalities in one loop of ``steps`` steps; ``text_first`` draws the
    caption from p(text) (image all MASK, the null condition) and then the image for it, ``image_first`` the
    reverse, each stage ``steps`` steps. Both orders draw from the same model's joint distribution (a chain-rule
    factorisation of it); the ordered ones let every token of the second modality see a finished first one.
    """
    if n < 1:
      raise ValueError(f"n={n} must be >= 1")
    if order not in JOINT_ORDERS:
      raise ValueError(f"order={order!r} must be one of {JOINT_ORDERS}")
    tokens = self._pack(self._unknown(n, self.layout.text_len), self._unknown(n, self.layout.image_len))
    cfg = self._sampler_config(steps, temperature, 0.0, method, **options)
    return self.tokenizers.decode(self._run(tokens, cfg, (False, False), seed, order))

  def inpaint(self, images, mask, prompts: Sequence[str] | None = None, steps: int = 16,
              guidance_scale: float = 0.0, temperature: float = 1.0, seed: int = 0,
              method: str = "confidence", **options) -> np.ndarray:
    """Redraws the masked part of each image (mask: bool [N, H, W], True = redraw), optionally for a prompt.

    A token is redrawn when any pixel it covers is in the mask; the caption is all MASK when ``prompts`` is None
    (and is then generated along, but not returned).
    """
    image = self._image_ids(images)
    mask = np.asarray(mask, bool)
    h, w = self.layout.image_grid
    size = self.tokenizers.image.image_shape
    if mask.shape != (len(image), size[0], size[1]):
      raise ValueError(f"mask must be bool [N, {size[0]}, {size[1]}] with N = {len(image)}, got {mask.shape}")
    cell = mask.reshape(len(image), h, size[0] // h, w, size[1] // w).any(axis=(2, 4)).reshape(len(image), -1)
    image = np.where(cell, -1, image)
    if prompts is None:
      text = self._unknown(len(image), self.layout.text_len)
    else:
      text = self._text_ids(prompts)
      self._check_pairs(len(text), len(image))
    cfg = self._sampler_config(steps, temperature, guidance_scale, method, **options)
    return self.tokenizers.decode(self._run(self._pack(text, image), cfg, (False, prompts is not None), seed))[1]

  def infill(self, texts_with_holes: Sequence[str], images=None, steps: int = 16, temperature: float = 1.0,
             seed: int = 0, method: str = "confidence", **options) -> list[str]:
    """Fills each ``<mask>`` in the texts (one token per ``<mask>``); text after the last piece stays PAD.

    With ``images`` (uint8 [N, H, W, C]) the fill is conditioned on them; without, the image is generated along.
    """
    if isinstance(texts_with_holes, str) or len(texts_with_holes) == 0:
      raise ValueError("texts_with_holes must be a non-empty list of strings")
    tok, n = self.tokenizers.text, self.layout.text_len
    rows = []
    for text in texts_with_holes:
      ids: list[int] = []
      for i, piece in enumerate(text.split(HOLE)):
        if i:
          ids.append(-1)
        if piece.strip():
          encoded = tok.encode(piece, n)
          ids.extend(int(x) for x in encoded[encoded != tok.pad_id])
      if len(ids) > n:
        raise ValueError(f"text with holes is {len(ids)} tokens, more than the model's {n}: {text!r}")
      rows.append(ids + [tok.pad_id] * (n - len(ids)))
    text = np.asarray(rows, np.int32)
    if images is None:
      image = self._unknown(len(text), self.layout.image_len)
    else:
      image = self._image_ids(images)
      self._check_pairs(len(text), len(image), "texts")
    cfg = self._sampler_config(steps, temperature, 0.0, method, **options)
    return self.tokenizers.decode(self._run(self._pack(text, image), cfg, (False, False), seed))[0]

  # ---- likelihood ----------------------------------------------------------------------------------------------
  def _score_fn(self, noised: tuple[bool, bool], num_samples: int = 16):
    """The jitted :meth:`_score_batch` for one pattern of noised modalities (text, image)."""
    key = (noised, num_samples)
    if key not in self._score_fns:
      self._score_fns[key] = jax.jit(
          lambda params, tokens, keys: self._score_batch(params, tokens, keys, noised, num_samples))
    return self._score_fns[key]

  def _score_batch(self, params, tokens, keys, noised: tuple[bool, bool], num_samples: int):
    """Mean over ``num_samples`` low-discrepancy times of each example's ELBO bits: float32 [B, 2].

    Only the ``noised`` modalities are masked (the others stay clean: a conditional bound); the columns of the
    clean ones are 0. Each example's times and masks come from its own key, so its score does not depend on its
    batch.
    """
    noised_row = jnp.asarray(noised)
    def one(tok, key):
      k_u, k_mask = jax.random.split(key)
      u = jax.random.uniform(k_u, (2,))
      j = jnp.arange(num_samples, dtype=jnp.float32)[:, None] / num_samples
      t = jnp.clip(jnp.mod(u[None, :] + j, 1.0), self.config.diffusion.t_min, 1.0)             # [n, 2]
      is_noised = jnp.broadcast_to(noised_row, t.shape)
      c = loss_lib.Corruption(t=t, mask_prob=jnp.where(is_noised, self.schedule.mask_prob(t), 0.0),
                              noised=is_noised, task=jnp.zeros(num_samples, jnp.int32))
      rep = jnp.broadcast_to(tok, (num_samples,) + tok.shape)
      noisy, masked = loss_lib.corrupt(k_mask, rep, c, self.layout)
      return rep, noisy, masked, t
    rep, noisy, masked, t = jax.vmap(one)(tokens, keys)                                   # [B, n, ...]
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    logits = self.model.apply({"params": params}, flat(noisy))
    bits = loss_lib.elbo_bits(logits, flat(rep), flat(masked), flat(t), self.layout, self.schedule)
    return jnp.where(noised_row, bits.reshape(tokens.shape[0], num_samples, 2).mean(axis=1), 0.0)

  def score(self, prompts: Sequence[str], images, seed: int = 0, given: str | None = None) -> dict[str, np.ndarray]:
    """Per-example negative ELBO (an upper bound on -log p), bits per token.

    ``given=None``: both modalities noised, {'text': [N], 'image': [N]} (each modality's bits with the other
    noised too); ``given='text'``: the caption clean, {'image': [N]} the bits of the image given the caption;
    ``given='image'``: {'text': [N]} the bits of the caption given the image.
    """
    if given not in (None, "text", "image"):
      raise ValueError(f"given={given!r} must be None, 'text' or 'image'")
    text, image = self._text_ids(prompts), self._image_ids(images)
    self._check_pairs(len(text), len(image))
    tokens = self._pack(text, image)
    noised = (given != "text", given != "image")
    bits = self._batched(self._score_fn(noised), tokens, self._example_keys(seed, len(tokens)))
    return {name: bits[:, m] for m, name in enumerate(("text", "image")) if noised[m]}
