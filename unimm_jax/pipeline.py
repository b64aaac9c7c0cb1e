"""The user-facing Pipeline: one trained model, every direction.

::

    from unimm_jax import Pipeline
    pipe = Pipeline.load("runs/shapes")          # a training workdir: newest checkpoint, EMA weights
    # The general call: given segments -> generated segments (names from the model's sequence layout).
    out = pipe.complete(given={"text": ["a small red circle at the top left"]}, generate=["image"], steps=16)
    images = out["image"]                                                                    # uint8 [N, H, W, C]
    # Recipes over it, for the two-segment [text | image] layout:
    images = pipe.text_to_image(["a small red circle at the top left"], steps=16, seed=0)  # uint8 [N, H, W, C]
    captions = pipe.image_to_text(images, steps=24)                                          # list[str]
    texts, images = pipe.generate(4, steps=32)                                               # joint
    images = pipe.inpaint(images, mask, prompts=None)          # mask: bool [N, H, W], True = redraw
    texts = pipe.infill(["a <mask> red circle at the top left"])   # each "<mask>" is one token to fill
    bits = pipe.score(prompts, images)                         # {'text': [N], 'image': [N]} bits per token
    bits = pipe.score(prompts, images, given="text")           # {'image': [N]}: the image given the caption
    bits = pipe.likelihood({"text": prompts, "image": images}, noised=["image"])   # any segments given any others
    # A model trained on edits and questions too (configs/shapes_unified.py):
    edited = pipe.edit(images, ["make the red circle blue"] * len(images))                  # uint8 [N, H, W, C]
    answers = pipe.answer(images, ["what colour is the circle?"] * len(images))             # list[str]

Every call builds the starting sequences (MASK where something is to be generated, the given tokens elsewhere;
a segment neither given nor generated is all MASK, the null condition of training, or, in a layout whose
examples may lack segments, absent) and runs the one jitted
sampling loop of :mod:`unimm_jax.method.samplers` over batches padded to a fixed compiled size, so a call of any
size compiles nothing new. Each example's randomness comes from ``fold_in(PRNGKey(seed), i)`` with i its index in
the call: the same seed gives the same output, whatever the batch size.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from unimm_jax import bundle, configuration, init_from, programs, recipes, sequence, storage
from unimm_jax.data import input_pipeline
from unimm_jax.method import samplers
from unimm_jax.method.samplers import presets
from unimm_jax.method import tasks as tasks_lib
from unimm_jax.method.diffusion import MaskedDiffusion
from unimm_jax.models import transformer

_STEPS_KEY = {"t2i": "t2i_steps", "inpaint": "t2i_steps", "i2t": "i2t_steps", "infill": "i2t_steps",
              "joint": "joint_steps", "edit": "edit_steps", "vqa": "vqa_steps"}


def sampler_kwargs(config, task: str) -> dict:
  """The run's ``config.sample`` settings for ``task`` (t2i | i2t | joint | inpaint | infill | edit | vqa) as call
  arguments: a preset's (``sample.preset``: an upstream's own decoding, ``samplers/presets.py``), or the fields'."""
  s = config.sample
  cache = dict(cache=s.cache, refresh_every=s.refresh_every) if s.get("cache", "none") != "none" else {}
  if s.get("preset", ""):
    return {**presets.preset_kwargs(s.preset, task, int(config.text.max_len)), **cache}
  kw = dict(**cache, steps=s[_STEPS_KEY[task]], temperature=s.temperature, method=s.method,
            confidence_noise=s.confidence_noise, reveal_schedule=s.reveal_schedule)
  if s.method == "threshold":
    kw.update(threshold=s.threshold, max_per_step=s.max_per_step)
  if task == "joint":
    kw["order"] = s.joint_order
  if task == "i2t":
    kw["candidates"] = s.i2t_candidates
    if s.i2t_candidates > 1:
      kw["score_passes"] = s.get("i2t_score_passes", 8)
  if task == "infill" and s.get("block_length", 0):
    kw["block_length"] = s.block_length
  return kw


class Pipeline(recipes.Recipes):
  """A trained model with its tokenizers; see the module docstring (the recipes over :meth:`complete` are
  :class:`~unimm_jax.recipes.Recipes`)."""

  def __init__(self, config, params, toks: input_pipeline.Tokenizers, *, batch_size: int = 64,
               step: int | None = None):
    self.config = config
    self.step = step          # the training step of the weights, when known
    self.params = params
    self.tokenizers = toks
    self.layout = toks.layout
    self.model = transformer.from_config(config, self.layout)
    self.diffusion = MaskedDiffusion.from_config(config.diffusion, self.layout)
    self.schedule = self.diffusion.schedule
    self.batch_size = batch_size
    self.programs = programs.Programs(self.model, self.diffusion)
    self.last_forward_passes = None   # int [N] of the last sampling call (_batched)

  # ---- loading -------------------------------------------------------------------------------------------------
  @classmethod
  def load(cls, path, *, weights: str = "ema", step: int | None = None, batch_size: int = 64) -> "Pipeline":
    """From a training workdir (newest checkpoint, or ``step``; EMA weights unless ``weights='raw'``), or from
    a bundle written by ``python -m unimm_jax.export`` (its one set of weights; ``weights``/``step`` unused).
    Only the weights are read: no optimizer is built."""
    path = storage.absolute_path(path)
    if (path / bundle.MODEL_FILE).exists():
      meta = json.loads((path / bundle.MODEL_FILE).read_text())
      config = configuration.from_dict(meta["config"])
      toks = input_pipeline.load_tokenizers(path, config)
      logging.info("loaded exported %s weights (%s) of step %s from %s", meta["weights"], meta["dtype"],
                   meta["step"], path)
      return cls(config, bundle.load_params(path, meta), toks, batch_size=batch_size, step=meta["step"])
    config_file = path / "config.json"
    if not config_file.exists():
      raise FileNotFoundError(f"{path} is neither a training workdir (no config.json) nor an exported model "
                              f"(no {bundle.MODEL_FILE})")
    if weights not in ("ema", "raw"):
      raise ValueError(f"weights={weights!r} must be 'ema' or 'raw'")
    config = configuration.from_dict(json.loads(config_file.read_text()))
    toks = input_pipeline.load_tokenizers(path, config)
    # Restored onto this process's first device, whatever mesh (and device count) the run trained on; a LoRA
    # run's adapters merged into its base (init_from.workdir_weights).
    params, restored = init_from.workdir_weights(path, "ema_params" if weights == "ema" else "params", step)
    logging.info("loaded %s weights of step %d from %s", weights, restored, path)
    return cls(config, params, toks, batch_size=batch_size, step=restored)

  # ---- views: other layouts of the same network ----------------------------------------------------------------
  def view(self, name: str) -> "Pipeline":
    """The same network and weights over the layout ``config.sequence.views[name]``: an imported checkpoint's
    format for one task (MMaDA's ``t2i`` and ``mmu``). Valid only for a network whose parameters and forward do
    not depend on the layout (rotary positions over the flat sequence, no modality embedding, no code
    features), which is checked."""
    views = getattr(self, "_views", None)
    if views is None:
      views = self._views = {}
    if name not in views:
      m = self.config.model
      if m.positions != "rope" or m.rope_layout != "sequence" or m.modality_embedding or m.image_code_features:
        raise ValueError(f"Pipeline.view({name!r}): this network depends on its layout (config.model.positions="
                         f"{m.positions!r}, rope_layout={m.rope_layout!r}, modality_embedding="
                         f"{m.modality_embedding}, image_code_features={m.image_code_features}); only an imported "
                         "backbone's network (rope over the flat sequence, no modality embedding) has views")
      toks = self.tokenizers.view(name)
      views[name] = Pipeline(self._view_config(toks), self.params, toks, batch_size=self.batch_size, step=self.step)
    return views[name]

  def _view_config(self, toks: input_pipeline.Tokenizers):
    """The config of a view: its segments, and the declared tasks whose roles name only its segments (the
    likelihood and the loss of the view; every generative segment noised when none fits)."""
    config = configuration.from_dict(self.config.to_dict())
    config.sequence.segments = toks.segments
    names = set(toks.layout.names)
    roles = dict(config.diffusion.task_roles)
    fitting = [t for t, spec in roles.items() if set(tasks_lib.parse_roles(spec)) <= names]
    if not fitting:
      roles["view"] = " ".join(f"{s.name}:noised" for s in toks.layout.segments if s.generative)
      fitting = ["view"]
    config.diffusion.task_roles = roles
    config.diffusion.tasks = {t: 1.0 for t in fitting}
    return config

  def _for_task(self, task: str) -> "Pipeline":
    """The view that holds ``task``'s format (``sequence.views``), or this pipeline when there is none or this
    is it."""
    views = dict(self.config.sequence.get("views", {}))
    if task not in views or tuple(map(tuple, views[task])) == tuple(map(tuple, self.tokenizers.segments)):
      return self
    return self.view(task)

  def _sampler_config(self, steps, temperature, guidance_scale, method, **kw) -> samplers.SamplerConfig:
    return samplers.SamplerConfig(method=method, steps=int(steps), temperature=float(temperature),
                                  guidance_scale=float(guidance_scale), **kw)

  def _batched(self, fn, tokens: np.ndarray, keys) -> np.ndarray:
    """``fn(params, tokens, keys)`` over padded batches (:meth:`programs.Programs.batched`); a sampling call's
    forward passes per example are kept in :attr:`last_forward_passes`."""
    out, passes = self.programs.batched(fn, self.params, tokens, keys, self.batch_size)
    if passes is not None:
      self.last_forward_passes = passes
    return out

  def _alone(self, tokens: np.ndarray):
    """(programs, cols): for calls whose examples all lack the same segments (as :meth:`_plan` builds them) on a
    network that computes an example as its present segments alone (``TransformerConfig.segments_alone``), the
    programs over the present segments (:meth:`programs.Programs.alone`) and their positions, int [S']: the
    same model at the cost of those positions only (a caption of configs/shapes_unified.py: 60 of 99). Else,
    or when that would cut less than a tenth of the positions (an edit's 96 of 99, which measured slower alone
    on a CPU, BENCHMARKS.md), (the whole layout's programs, None)."""
    if not (self.layout.has_absent and self.model.config.segments_alone):
      return self.programs, None
    present = self.layout.present(np.asarray(tokens))                                  # bool [N, G]
    if present.all() or not (present == present[:1]).all():
      return self.programs, None
    names = [n for n, p in zip(self.layout.names, present[0]) if p]
    cols = np.flatnonzero(self.layout.positions_of(names))
    if len(cols) > 0.9 * self.layout.seq_len:
      return self.programs, None
    return self.programs.alone(names), cols

  def _score_bits(self, roles: Mapping[str, str], tokens: np.ndarray, keys, num_samples: int,
                  grid: bool = False) -> np.ndarray:
    """float [N, G]: :meth:`programs.Programs.score_fn` of the task ``roles`` ({segment: role}; others absent or
    null) over ``tokens``, on the present segments alone where the network allows it (0 at the others)."""
    programs, cols = self._alone(tokens)
    codes = self._roles(roles)
    if cols is None:
      return self._batched(programs.score_fn(codes, num_samples, grid), tokens, keys)
    idx = [self.layout.index(n) for n in programs.layout.names]
    bits = np.zeros((len(tokens), len(self.layout.segments)), np.float32)
    bits[:, idx] = self._batched(programs.score_fn(tuple(codes[i] for i in idx), num_samples, grid),
                                 np.asarray(tokens)[:, cols], keys)
    return bits

  @staticmethod
  def _example_keys(seed: int, n: int):
    """uint32 [n, 2]: example i's key is fold_in(PRNGKey(seed), i), whatever batch it lands in."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n))

  # ---- inputs --------------------------------------------------------------------------------------------------
  def _text_ids(self, prompts: Sequence[str], length: int | None = None) -> np.ndarray:
    """Local ids int32 [N, length] of the prompts (PAD-padded), with a warning for each truncated prompt and for
    words the tokenizer reads as UNK."""
    if isinstance(prompts, str):
      raise TypeError("prompts must be a list of strings, not one string")
    if len(prompts) == 0:
      raise ValueError("the prompt list is empty")
    tok = self.tokenizers.text
    n = length or self._segment_of(sequence.TEXT).length
    ids = []
    for p in prompts:
      longer = tok.encode(p, n + 1)
      if longer[-1] != tok.pad_id:
        logging.warning("prompt truncated to %d text tokens: %r", n, p)
      ids.append(longer[:n])
    self._warn_unknown_words(prompts)
    return np.stack(ids)

  def _warn_unknown_words(self, prompts: Sequence[str], hole: str | None = None) -> None:
    """One warning for a call's prompts that hold words the text tokenizer reads as UNK, naming those words
    (the model sees UNK, not the word, so a drawing can ignore it); ``hole``, if given, is not a word."""
    tok = self.tokenizers.text
    unknown = {p: tok.unknown_words(p.replace(hole, " ") if hole else p) for p in dict.fromkeys(prompts)}
    unknown = {p: words for p, words in unknown.items() if words}
    if not unknown:
      return
    shown = [repr(p) for p in unknown][:3] + ([f"{len(unknown) - 3} more"] if len(unknown) > 3 else [])
    words = dict.fromkeys(w for ws in unknown.values() for w in ws)
    logging.warning("%s %s: words not in the vocabulary, read as UNK: %s", "prompt" if len(unknown) == 1 else "prompts",
                    ", ".join(shown), ", ".join(words))

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

  def _segment_of(self, modality: str) -> sequence.Segment:
    """The recipes' text or image segment: the layout's one segment of ``modality``, or, with several, the one
    that reads the data field of that name (:meth:`segment_for`); ValueError if there is none."""
    names = self.layout.of_modality(modality)
    if len(names) == 1:
      return self.layout.segment(names[0])
    try:
      return self.segment_for(modality)
    except ValueError:
      raise ValueError(f"this recipe needs one {modality} segment; the model's layout is "
                       f"{self.layout.describe()}: use Pipeline.complete with segment names") from None

  def segment_for(self, field: str) -> sequence.Segment:
    """The segment that holds a data field (``text``, ``image``, ``instruction``, ``source``, ``target``,
    ``question``, ``answer``): the one ``data.fields`` maps the field to, else the segment of that name."""
    for entry in self.config.data.fields:
      if field in tuple(entry[1:]) and entry[0] in self.layout.names:
        return self.layout.segment(entry[0])
    if field in self.layout.names:
      return self.layout.segment(field)
    raise ValueError(f"this model has no segment for {field!r}: its layout is {self.layout.describe()} and "
                     f"config.data.fields={tuple(map(tuple, self.config.data.fields))}")

  def _absent(self, tokens: np.ndarray, keep) -> np.ndarray:
    """In a layout with absent segments, every segment not in ``keep`` made absent (the ``<absent>`` token), as
    training had it for an example without that segment; unchanged otherwise."""
    if not self.layout.has_absent:
      return tokens
    tokens = np.array(tokens)
    tokens[:, self.layout.positions_of([g for g in self.layout.names if g not in keep])] = self.layout.absent_id
    return tokens

  def _local_ids(self, name: str, value) -> np.ndarray:
    """A segment's value -> local ids int32 [N, n] (-1 where to generate): a list of strings (text), uint8 images
    [N, H, W, C] (image), or local ids already."""
    seg = self.layout.segment(name)
    if seg.modality == sequence.SPECIAL:
      raise ValueError(f"segment {name!r} holds fixed special tokens; it cannot be given")
    if seg.modality == sequence.TEXT and not (isinstance(value, np.ndarray) and value.dtype.kind in "iu"):
      if name in dict(self.tokenizers.frames):   # an upstream's format (sequence.text_frames)
        return self.tokenizers.encode_text(name, [value] if isinstance(value, str) else list(value), seg.length)
      return self._text_ids(list(value) if not isinstance(value, str) else value, seg.length)
    arr = np.asarray(value)
    if seg.modality == sequence.IMAGE and arr.dtype == np.uint8 and arr.ndim in (3, 4):
      return self._image_ids(arr)
    if arr.ndim != 2 or arr.shape[1] != seg.size or arr.dtype.kind not in "iu":
      raise ValueError(f"segment {name!r} takes {'strings' if seg.modality == sequence.TEXT else 'uint8 images'} "
                       f"or int local ids [N, {seg.size}] (-1 = generate), got {arr.dtype} {arr.shape}")
    return arr.astype(np.int32)

  def _start(self, given: Mapping[str, Any], n: int | None) -> np.ndarray:
    """The starting sequences, int32 [N, S]: the given segments' tokens, MASK elsewhere."""
    ids = {name: self._local_ids(name, value) for name, value in given.items()}
    sizes = {len(v) for v in ids.values()} | ({n} if n is not None else set())
    if len(sizes) != 1:
      counts = ", ".join(f"{k}: {len(v)}" for k, v in ids.items())
      raise ValueError(f"the given segments hold different numbers of examples ({counts}"
                       f"{f', n: {n}' if n is not None else ''})")
    return self.layout.pack(ids, batch=sizes.pop())

  def _guide(self, targets: Sequence[str], null: Sequence[str]) -> samplers.loop.Guide:
    """Guidance at the ``targets`` segments' positions against the null condition of the ``null`` segments."""
    if not targets or not null:
      return ()
    return ((tuple(bool(x) for x in self.layout.positions_of(targets)),
             tuple(bool(x) for x in self.layout.positions_of(null)), self._null_tokens(null)),)

  def _null_tokens(self, null: Sequence[str]) -> tuple[int, ...]:
    """int [S]: the ids the ``null`` segments take in guidance's uncond pass: a framed text segment's null text
    (an upstream's unconditional prompt: MMaDA's empty caption, Lumina-DiMOO's <uncondition>), -1 (MASK)
    elsewhere."""
    out = np.full(self.layout.seq_len, -1, np.int32)
    frames = dict(self.tokenizers.frames)
    for name in null:
      frame = frames.get(name)
      if frame is not None and frame.null_text is not None:
        lo, hi = self.layout.span(name)
        out[lo:hi] = self.tokenizers.encode_text(name, [frame.null_text], hi - lo)[0]   # text ids are global
    return tuple(int(x) for x in out)

  # ---- the general call ------------------------------------------------------------------------------------------
  def complete(self, given: Mapping[str, Any] | None = None, generate: Sequence[str] | Sequence[Sequence[str]] = (),
               *, n: int | None = None, steps: int = 16, guidance_scale: float = 0.0,
               guidance_null: Sequence[str] | None = None, temperature: float = 1.0, seed: int = 0,
               method: str = "confidence", null: Sequence[str] = (), block_length: int = 0, as_ids: bool = False,
               **options) -> dict[str, Any]:
    """Generates segments given others: ``{segment: value}`` of every generated segment.

    Args:
      given: {segment: value}: a list of N strings (text), uint8 images [N, H, W, C] (image), or int32 local
        ids [N, n] where -1 marks tokens to generate (the rest are given). Segments neither given nor generated
        are all MASK while sampling: the null condition of training (e.g. a caption drawn with no image is
        drawn from p(text)); in a layout with absent segments they are absent instead, unless named in ``null``.
      generate: segment names to generate together; or a list of lists, generated in that order (stage by
        stage, each ``steps`` steps; later stages see the earlier ones finished). Holes (-1) of given segments
        are filled in the first stage.
      n: number of examples when nothing is given.
      guidance_scale: classifier-free guidance w; the uncond pass nulls ``guidance_null`` (default: every
        given segment) and guides the generated positions.
      block_length: L > 0: each stage's positions are generated in blocks of L in sequence order, left to right,
        each block ``steps`` steps with the later blocks still MASK (LLaDA's semi-autoregressive decoding; with
        ``reveal_schedule='uniform'``, ``temperature=0`` and ``confidence_noise=0``, its low-confidence
        remasking).
      as_ids: return each generated segment's token ids (int32 [N, n], the tokenizer's local ids) instead of
        decoding them (to compare with another implementation token for token).
      options: sampler settings (``confidence_noise``, ``reveal_schedule``; :class:`samplers.SamplerConfig`).
    Returns:
      {segment: list of N strings | uint8 images [N, H, W, C]} for the generated segments (and those given
      with holes).
    """
    tokens, stages, holed = self._plan(given or {}, generate, n, null)
    nulled = [g for g in (given or {}) if self.layout.segment(g).generative] if guidance_null is None \
        else list(guidance_null)
    cfg = self._sampler_config(steps, temperature, guidance_scale, method, **options)
    out = self._generate(tokens, stages, cfg, self._guide([s for st in stages for s in st] + holed, nulled), seed,
                         holed=holed, block_length=block_length)
    names = [s for st in stages for s in st] + holed
    if as_ids:
      return {k: v for k, v in self.layout.unpack(np.asarray(out)).items() if k in names}
    return self.tokenizers.decode_segments(out, names)

  def start_tokens(self, given: Mapping[str, Any] | None = None, generate: Sequence[str] = (), *,
                   n: int | None = None) -> np.ndarray:
    """int32 [N, S]: the sequences :meth:`complete` starts from for these arguments: the given segments' tokens
    (in an upstream's format where the config frames them, ``sequence.text_frames``), MASK where it generates.
    To compare a format with its upstream token for token."""
    return self._plan(given or {}, generate, n)[0]

  def _plan(self, given, generate, n, null=()):
    """(starting tokens [N, S], stages (tuple of tuples of segment names), given segments with holes); segments
    neither given, generated nor ``null`` are absent in a layout with absent segments."""
    if n is None and not given:
      raise ValueError("nothing is given: pass n, the number of examples to generate")
    if n is not None and n < 1:
      raise ValueError(f"n={n} must be >= 1")
    stages = [list(generate)] if generate and isinstance(list(generate)[0], str) else [list(g) for g in generate]
    names = [s for st in stages for s in st]
    for name in names:
      self.layout.index(name)                      # KeyError naming the layout's segments
      if not self.layout.segment(name).generative:
        raise ValueError(f"segment {name!r} holds fixed special tokens; it cannot be generated")
    both = set(names) & set(given)
    if both or len(set(names)) != len(names):
      raise ValueError(f"segments {sorted(both) or names} are both given and generated, or generated twice")
    tokens = self._start(given, n) if given else self.layout.pack({}, batch=n)
    for name in null:
      self.layout.index(name)
    tokens = self._absent(tokens, set(names) | set(given) | set(null))
    parts = self.layout.split(tokens)
    holed = [g for g in given if (parts[g] == self.layout.mask_id).any()]
    if not names and not holed:
      raise ValueError("nothing to generate: name segments in generate, or give a segment with -1 holes")
    return tokens, tuple(tuple(st) for st in (stages or [[]])), holed

  def _generate(self, tokens: np.ndarray, stages, cfg, guide, seed: int, keys=None, holed=(),
                block_length: int = 0) -> np.ndarray:
    """int32 [N, S] with MASKs -> int32 [N, S] with the MASKs of the stages' segments filled, stage by stage, and
    those of the ``holed`` segments (given with holes) in the first stage. Other MASKs stay (null segments).
    ``block_length`` > 0 splits each stage into blocks of that many positions, in sequence order."""
    if block_length < 0:
      raise ValueError(f"block_length={block_length} must be >= 0")
    loops = []   # (the positions a loop fills, the positions its stage generates)
    as_tuple = lambda mask: tuple(bool(x) for x in mask)
    for i, stage in enumerate(stages):
      where = self.layout.positions_of(list(stage) + (list(holed) if i == 0 else []))
      if block_length:
        at = np.flatnonzero(where)
        for start in range(0, len(at), block_length):
          block = np.zeros_like(where)
          block[at[start:start + block_length]] = True
          loops.append((as_tuple(block), as_tuple(where)))
      else:
        loops.append((as_tuple(where), as_tuple(where)))
    keys = self._example_keys(seed, tokens.shape[0]) if keys is None else keys
    programs, cols = self._alone(tokens)
    if cols is None:
      return self._batched(programs.sampler(cfg, guide, tuple(loops)), tokens, keys)
    take = lambda mask: tuple(np.asarray(mask)[cols].tolist())   # a per-position tuple on the present positions
    loops = tuple((take(a), take(b)) for a, b in loops)
    guide = tuple(tuple(take(m) for m in g) for g in guide)
    out = np.array(tokens)
    out[:, cols] = self._batched(programs.sampler(cfg, guide, loops), out[:, cols], keys)
    return out

  # ---- likelihood ----------------------------------------------------------------------------------------------
  def _roles(self, roles: Mapping[str, str]) -> tuple[int, ...]:
    """Role codes per segment (a task as data): the named ones as given, special segments clean, others null (or
    absent, in a layout with absent segments)."""
    out = []
    other = "absent" if self.layout.has_absent else "null"
    for seg in self.layout.segments:
      role = "clean" if seg.modality == sequence.SPECIAL else roles.get(seg.name, other)
      out.append(tasks_lib.ROLES[role])
    return tuple(out)

  def likelihood(self, values: Mapping[str, Any], noised: Sequence[str], seed: int = 0,
                 num_samples: int = 16) -> dict[str, np.ndarray]:
    """Per-example negative ELBO (an upper bound on -log p) of the ``noised`` segments given the other segments
    of ``values`` (clean), with the segments not in ``values`` all MASK (null; absent in a layout with absent
    segments): {segment: float [N]} bits per token. ``values`` as for :meth:`complete` (no holes)."""
    for name in noised:
      if name not in values:
        raise ValueError(f"segment {name!r} is to be scored but has no value; give it in values")
    tokens = self._absent(self._start(values, None), set(values))
    if (tokens[:, self.layout.positions_of(list(values))] == self.layout.mask_id).any():
      raise ValueError("likelihood needs whole segments: their values hold -1 (MASK) tokens")
    bits = self._score_bits({name: "noised" if name in noised else "clean" for name in values}, tokens,
                            self._example_keys(seed, len(tokens)), num_samples)
    return {name: bits[:, self.layout.index(name)] for name in noised}

  def score(self, prompts: Sequence[str], images, seed: int = 0, given: str | None = None) -> dict[str, np.ndarray]:
    """Per-example negative ELBO (an upper bound on -log p), bits per token.

    ``given=None``: both modalities noised, {'text': [N], 'image': [N]} (each modality's bits with the other
    noised too); ``given='text'``: the caption clean, {'image': [N]} the bits of the image given the caption;
    ``given='image'``: {'text': [N]} the bits of the caption given the image.
    """
    if given not in (None, "text", "image"):
      raise ValueError(f"given={given!r} must be None, 'text' or 'image'")
    text, image = self._segment_of(sequence.TEXT).name, self._segment_of(sequence.IMAGE).name
    if isinstance(prompts, str):
      raise TypeError("prompts must be a list of strings, not one string")
    values = {text: prompts, image: images}
    if len(prompts) != len(np.asarray(images)):
      raise ValueError(f"{len(prompts)} prompts for {len(np.asarray(images))} images")
    noised = [name for name, m in ((text, "text"), (image, "image")) if given != m]
    bits = self.likelihood(values, noised, seed)
    return {m: bits[name] for name, m in ((text, "text"), (image, "image")) if name in bits}
