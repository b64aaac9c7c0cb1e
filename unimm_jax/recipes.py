"""The Pipeline's recipes: each task a call of :meth:`Pipeline.complete <unimm_jax.pipeline.Pipeline.complete>`
with its segments given and generated.

Drawing, captioning (with candidates told apart by the drawing direction), joint pairs, inpainting and infilling
for ``[text | image]`` layouts; editing and question answering for layouts whose segments carry those fields
(found by data field, :meth:`Pipeline.segment_for`). A mixin of :class:`~unimm_jax.pipeline.Pipeline`: the
methods use its inputs, plan, sampling and scoring helpers, and nothing here compiles a program of its own.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from unimm_jax import sequence

JOINT_ORDERS = ("together", "text_first", "image_first")
HOLE = "<mask>"   # infill: one masked text token
CAPTION_QUESTION = "Please describe this image in detail."   # image_to_text on a model that answers questions


class Recipes:
  """Task recipes over ``complete`` (mixed into :class:`~unimm_jax.pipeline.Pipeline`)."""

  # ---- recipes over complete (two-segment [text | image] layouts) -------------------------------------------
  def text_to_image(self, prompts: Sequence[str], steps: int = 16, guidance_scale: float = 0.0,
                    temperature: float = 1.0, seed: int = 0, method: str = "confidence", **options) -> np.ndarray:
    """Images drawn for the prompts: uint8 [N, H, W, C].

    ``options`` (every generation method): ``confidence_noise`` and ``reveal_schedule`` of the confidence
    sampler (:class:`~unimm_jax.method.samplers.SamplerConfig`).
    """
    pipe = self._for_task("t2i")
    if pipe is not self:
      return pipe.text_to_image(prompts, steps, guidance_scale, temperature, seed, method, **options)
    text, image = self._segment_of(sequence.TEXT).name, self._segment_of(sequence.IMAGE).name
    return self.complete({text: prompts}, [image], steps=steps, guidance_scale=guidance_scale,
                         temperature=temperature, seed=seed, method=method, **options)[image]

  def image_to_text(self, images, steps: int = 24, guidance_scale: float = 0.0, temperature: float = 1.0,
                    seed: int = 0, method: str = "confidence", candidates: int = 1, score_passes: int = 8,
                    **options) -> list[str]:
    """Captions written for the images (uint8 [N, H, W, C]).

    ``candidates=K > 1``: K captions are drawn for each image (the first with the key ``candidates=1`` would use,
    the others from keys folded from it) and the one kept is the caption under which the model finds the image
    most likely: the lowest ELBO bits of the image given the caption (:meth:`score` with ``given='text'``, every
    candidate scored with the same times and masks). By Bayes, p(caption | image) is proportional to
    p(image | caption) p(caption), and a unified model has both directions: on ``shapes`` its drawing direction
    learns to bind each phrase to its grid cell well before its captioning direction does (BENCHMARKS.md), so
    the captions whose objects sit in the wrong cells, equally likely to the captioning direction, are told
    apart by the drawing one. ``score_passes``: forward passes scoring each candidate, at the times
    ``t_j = (j + 1) / n`` (``score_passes=1``: one pass with the image all MASK, the image's tokens each
    predicted from the caption alone). Costs K sampling loops and K x ``score_passes`` scoring passes, all
    counted in :attr:`last_forward_passes`.
    """
    if "mmu" in dict(self.config.sequence.get("views", {})):   # an upstream's understanding format: a question
      if candidates != 1:
        raise ValueError("candidates > 1 needs a [text | image] model's captioning direction; this model captions "
                         "by answering a question (Pipeline.answer)")
      return self.answer(images, [CAPTION_QUESTION] * len(np.asarray(images)), steps=steps,
                         guidance_scale=guidance_scale, temperature=temperature, seed=seed, method=method, **options)
    drawn, bits = self._caption_candidates(images, candidates, seed, steps=steps, temperature=temperature,
                                           guidance_scale=guidance_scale, method=method, score_passes=score_passes,
                                           **options)
    best = drawn[bits.argmin(axis=0), np.arange(drawn.shape[1])]
    text = self._segment_of(sequence.TEXT).name
    return self.tokenizers.decode_segments(best, [text])[text]

  def _caption_candidates(self, images, candidates: int, seed: int, *, steps, temperature, guidance_scale, method,
                          score_passes: int = 8, **options) -> tuple[np.ndarray, np.ndarray]:
    """(int32 [K, N, S] sequences with the K captions drawn for each image, float [K, N] bits per token of the
    image given each; zeros when K = 1, which is not scored). Candidate 0 uses the key of a plain call."""
    if candidates < 1:
      raise ValueError(f"candidates={candidates} must be >= 1")
    if score_passes < 1:
      raise ValueError(f"score_passes={score_passes} must be >= 1")
    text, image = self._segment_of(sequence.TEXT).name, self._segment_of(sequence.IMAGE).name
    tokens, stages, _ = self._plan({image: images}, [text], None)
    block_length = options.pop("block_length", 0)
    cfg = self._sampler_config(steps, temperature, guidance_scale, method, **options)
    keys = self._example_keys(seed, len(tokens))
    fold = lambda k: keys if k == 0 else jax.vmap(lambda key: jax.random.fold_in(key, k))(keys)
    guide = self._guide([text], [image])
    drawn, passes = [], 0
    for k in range(candidates):
      drawn.append(self._generate(tokens, stages, cfg, guide, seed, keys=fold(k), block_length=block_length))
      passes = passes + self.last_forward_passes
    drawn = np.stack(drawn)
    if candidates == 1:
      return drawn, np.zeros((1, len(tokens)), np.float32)
    # One set of times and masks for every candidate of an example: the comparison is of the captions alone.
    # A caption with the objects in the wrong cells costs the image about 1 bit a token against 0.001
    # (BENCHMARKS.md), far beyond the noise of a few times.
    col = self.layout.index(image)
    bits = np.stack([self._score_bits({text: "clean", image: "noised"}, d, fold(candidates), score_passes,
                                      grid=True)[:, col] for d in drawn])
    self.last_forward_passes = passes + candidates * score_passes
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
    text, image = self._segment_of(sequence.TEXT).name, self._segment_of(sequence.IMAGE).name
    stages = {"together": [[text, image]], "text_first": [[text], [image]], "image_first": [[image], [text]]}[order]
    out = self.complete({}, stages, n=n, steps=steps, temperature=temperature, seed=seed, method=method, **options)
    return out[text], out[image]

  def inpaint(self, images, mask, prompts: Sequence[str] | None = None, steps: int = 16,
              guidance_scale: float = 0.0, temperature: float = 1.0, seed: int = 0,
              method: str = "confidence", **options) -> np.ndarray:
    """Redraws the masked part of each image (mask: bool [N, H, W], True = redraw), optionally for a prompt.

    A token is redrawn when any pixel it covers is in the mask; the caption is all MASK when ``prompts`` is None
    (and is then generated along, but not returned).
    """
    text, image = self._segment_of(sequence.TEXT).name, self._segment_of(sequence.IMAGE)
    ids = self._image_ids(images)
    mask = np.asarray(mask, bool)
    h, w = image.grid
    size = self.tokenizers.image.image_shape
    if mask.shape != (len(ids), size[0], size[1]):
      raise ValueError(f"mask must be bool [N, {size[0]}, {size[1]}] with N = {len(ids)}, got {mask.shape}")
    cell = mask.reshape(len(ids), h, size[0] // h, w, size[1] // w).any(axis=(2, 4)).reshape(len(ids), -1)
    given = {image.name: np.where(cell, -1, ids)}
    if prompts is not None:
      given[text] = self._text_ids(prompts)
      if len(given[text]) != len(ids):
        raise ValueError(f"{len(given[text])} prompts for {len(ids)} images")
    return self.complete(given, [] if prompts is not None else [text], steps=steps, guidance_scale=guidance_scale,
                         guidance_null=[text] if prompts is not None else [], temperature=temperature, seed=seed,
                         method=method, **options)[image.name]

  def infill(self, texts_with_holes: Sequence[str], images=None, steps: int = 16, temperature: float = 1.0,
             seed: int = 0, method: str = "confidence", **options) -> list[str]:
    """Fills each ``<mask>`` in the texts (one token per ``<mask>``); text after the last piece stays PAD.

    With ``images`` (uint8 [N, H, W, C]) the fill is conditioned on them; without, the image is generated along.
    """
    if isinstance(texts_with_holes, str) or len(texts_with_holes) == 0:
      raise ValueError("texts_with_holes must be a non-empty list of strings")
    text = self._segment_of(sequence.TEXT)
    image = self._segment_of(sequence.IMAGE).name if sequence.IMAGE in self.layout.modalities else None
    if images is not None and image is None:
      raise ValueError(f"images given, but the layout {self.layout.describe()} has no image segment")
    tok, n = self.tokenizers.text, text.length
    rows = []
    for piece_text in texts_with_holes:
      ids: list[int] = []
      for i, piece in enumerate(piece_text.split(HOLE)):
        if i:
          ids.append(-1)
        if piece.strip():
          encoded = tok.encode(piece, n)
          ids.extend(int(x) for x in encoded[encoded != tok.pad_id])
      if len(ids) > n:
        raise ValueError(f"text with holes is {len(ids)} tokens, more than the model's {n}: {piece_text!r}")
      rows.append(ids + [tok.pad_id] * (n - len(ids)))
    self._warn_unknown_words(texts_with_holes, hole=HOLE)
    given = {text.name: np.asarray(rows, np.int32)}
    if images is not None:
      given[image] = self._image_ids(images)
      if len(given[image]) != len(rows):
        raise ValueError(f"{len(rows)} texts for {len(given[image])} images")
    return self.complete(given, [image] if images is None and image else [], steps=steps, guidance_null=[],
                         temperature=temperature, seed=seed, method=method, **options)[text.name]

  # ---- recipes over complete: editing and visual question answering ----------------------------------------------
  def _image_and_text(self, fields: tuple[str, str, str], images, texts, what: str, **kw):
    """The generated field's value, given an image field and a text field (``fields``: image, text, generated;
    segments by :meth:`segment_for`), ``texts`` checked to be one non-empty string per image; guidance nulls
    the text."""
    image, text, generated = (self.segment_for(f).name for f in fields)
    ids = self._image_ids(images)
    if isinstance(texts, str):
      raise TypeError(f"{what}s must be a list of strings, not one string")
    texts = [str(t) for t in texts]
    if len(texts) != len(ids):
      raise ValueError(f"{len(texts)} {what}s for {len(ids)} images")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
      raise ValueError(f"{what} {empty[0]} is empty ({len(empty)} empty of {len(ids)}): every image needs its {what}")
    return self.complete({text: texts, image: ids}, [generated], guidance_null=[text], **kw)[generated]

  def edit(self, images, instructions: Sequence[str], steps: int = 16, guidance_scale: float = 0.0,
           temperature: float = 1.0, seed: int = 0, method: str = "confidence", **options) -> np.ndarray:
    """Each image edited by its instruction ("make the red circle blue"): uint8 [N, H, W, C].

    The segments holding ``source``, ``instruction`` and ``target`` (:meth:`segment_for`) are given, given and
    generated; guidance nulls the instruction. A model not trained on edits has no such segments (ValueError).
    """
    return self._image_and_text(("source", "instruction", "target"), images, instructions, "instruction",
                                steps=steps, guidance_scale=guidance_scale, temperature=temperature, seed=seed,
                                method=method, **options)

  def answer(self, images, questions: Sequence[str], steps: int = 3, guidance_scale: float = 0.0,
             temperature: float = 1.0, seed: int = 0, method: str = "confidence", **options) -> list[str]:
    """The answer to each question about its image ("what colour is the circle?" -> "red"): list[str].

    The segments holding ``image``, ``question`` and ``answer`` (:meth:`segment_for`) are given, given and
    generated; guidance nulls the question.
    """
    pipe = self._for_task("mmu")
    if pipe is not self:
      return pipe.answer(images, questions, steps, guidance_scale, temperature, seed, method, **options)
    return self._image_and_text(("image", "question", "answer"), images, questions, "question", steps=steps,
                                guidance_scale=guidance_scale, temperature=temperature, seed=seed, method=method,
                                **options)
