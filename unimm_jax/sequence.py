"""The sequence layout: named segments of text and image tokens, and the one vocabulary they share.

A sequence is a list of named segments, each of one modality::

    [text "text": 24 tokens | image "image": 6x6 grid]                          today's default
    [text "instruction" | image "source" | image "target"]                     instruction editing
    [special "task": <t2i> | text "prompt" | special "boi" | image "image"]     a published checkpoint's format

One embedding table holds every id, in disjoint ranges::

    [ text ids: 0 .. T-1 | image ids: T .. T+I-1 | special tokens: T+I .. T+I+P-1 | MASK: T+I+P ]

Segments of one modality share that modality's range (one vocabulary, one tokenizer); a ``special`` segment holds
fixed tokens (a task token, begin/end of image) that are always given and never generated. With no special
tokens the ranges are exactly those of the two-segment code before segments: ``[text | image | MASK]``.

Examples of different kinds can share one layout that covers them all (``[text | image | target | answer]``
serves caption pairs, edits and questions): a segment an example does not have is *absent*, every position of it
holding the special token :data:`ABSENT` (``sequence.specials`` must name it). The token is always given, never
predicted and never carries loss, so the network reads "not part of this example" from the input itself, the
same way on every attention kernel; :meth:`SequenceLayout.present` recovers which segments an example has. With
``model.mask_absent`` the network goes further: no query attends an absent position, so an example is computed
exactly as in the layout of its own segments alone (:meth:`SequenceLayout.only`).

This module is the only place that knows where a segment starts and ends in the flat sequence: positions
(1-D within a text or special segment, 2-D (row, column) within an image segment), segment and modality ids,
the ids each position may predict, slicing a per-position array into segments, and pack/unpack between
``{segment name: local ids}`` and global sequences all come from :class:`SequenceLayout`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

TEXT, IMAGE, SPECIAL = "text", "image", "special"
MODALITIES = (TEXT, IMAGE, SPECIAL)   # modality id = index here; the id ranges follow this order
MODALITY_ID = {m: i for i, m in enumerate(MODALITIES)}
ABSENT = "<absent>"        # the special token that fills a segment an example does not have
LOCAL_ABSENT = -2          # pack(): a local id of -2 means ABSENT (-1 means MASK)


@dataclasses.dataclass(frozen=True)
class Segment:
  """One named segment: text (``length`` tokens), image (a ``grid`` of h x w tokens, row-major) or special
  (fixed ``tokens``, names of the layout's special tokens)."""

  name: str
  modality: str
  length: int = 0                          # text
  grid: tuple[int, int] | None = None      # image
  tokens: tuple[str, ...] = ()             # special

  def __post_init__(self):
    if not self.name or not isinstance(self.name, str):
      raise ValueError(f"a segment needs a name, got {self.name!r}")
    if self.modality not in MODALITIES:
      raise ValueError(f"segment {self.name!r}: modality {self.modality!r} is not one of {MODALITIES}")
    if self.modality == IMAGE:
      if self.grid is None or len(self.grid) != 2 or min(self.grid) < 1:
        raise ValueError(f"image segment {self.name!r} needs a grid (h, w) of positive sizes, got {self.grid!r}")
      object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))
    elif self.modality == TEXT and self.length < 1:
      raise ValueError(f"text segment {self.name!r} needs a positive length, got {self.length}")
    elif self.modality == SPECIAL:
      if not self.tokens:
        raise ValueError(f"special segment {self.name!r} needs its tokens, e.g. ('<t2i>',)")
      object.__setattr__(self, "tokens", tuple(self.tokens))

  @property
  def size(self) -> int:
    """Positions the segment takes in the sequence."""
    if self.modality == IMAGE:
      return self.grid[0] * self.grid[1]
    if self.modality == SPECIAL:
      return len(self.tokens)
    return self.length

  @property
  def generative(self) -> bool:
    """Whether the segment can be noised and generated (special tokens are always given)."""
    return self.modality != SPECIAL


def text(name: str, length: int) -> Segment:
  return Segment(name, TEXT, length=length)


def image(name: str, grid: tuple[int, int]) -> Segment:
  return Segment(name, IMAGE, grid=tuple(grid))


def special(name: str, *tokens: str) -> Segment:
  return Segment(name, SPECIAL, tokens=tuple(tokens))


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
  """The segments of a sequence and the vocabulary they share (module docstring).

  Attributes:
    segments: the segments in sequence order (names unique).
    text_vocab: ids of the text tokenizer (PAD included); every text segment uses them.
    image_vocab: ids of the image tokenizer's codebook; every image segment uses them.
    specials: the special tokens' names, in id order; those named by special segments are added if missing.
    id_align: the image and special id ranges start at multiples of it (``sequence.id_align``); the ids between
      ranges are never used. With 128, each modality's columns of the output head (and rows of the embedding)
      start on a TPU lane boundary, so the per-segment head (``transformer.segment_nll``) slices its kernel
      without a relayout copy; 1 packs the ranges (checkpoints made before the option).
  """

  segments: tuple[Segment, ...]
  text_vocab: int
  image_vocab: int
  specials: tuple[str, ...] = ()
  id_align: int = 1
  explicit_mask_id: int = -1   # >= 0: MASK is this text id (an upstream vocabulary's own), no extra row
  # Special tokens that are an upstream vocabulary's own text ids (MMaDA's <|soi|> is 126,084), as ((name, id), ...);
  # they take no id of the special range.
  special_ids: tuple[tuple[str, int], ...] = ()
  vocab_rows: int = 0          # > 0: the embedding has this many ids, the ones past the ranges never used

  def __post_init__(self):
    segments = tuple(self.segments)
    if not segments:
      raise ValueError("a sequence layout needs at least one segment")
    names = [s.name for s in segments]
    if len(set(names)) != len(names):
      raise ValueError(f"segment names must be unique, got {names}")
    if self.id_align < 1:
      raise ValueError(f"SequenceLayout.id_align must be >= 1, got {self.id_align}")
    if self.text_vocab <= 0:
      raise ValueError(f"SequenceLayout.text_vocab must be positive, got {self.text_vocab}")
    has_image = any(s.modality == IMAGE for s in segments)
    if self.image_vocab < 0 or (has_image and self.image_vocab == 0):
      raise ValueError(f"SequenceLayout.image_vocab must be positive{' (the layout has image segments)' if has_image else ' or 0'}, "
                       f"got {self.image_vocab}")
    if self.explicit_mask_id >= self.text_vocab:
      raise ValueError(f"SequenceLayout.explicit_mask_id={self.explicit_mask_id} must be a text id (< text_vocab "
                       f"{self.text_vocab}), or -1 for a MASK row after the last range")
    grids = {s.grid for s in segments if s.modality == IMAGE}
    if len(grids) > 1:
      raise ValueError(f"image segments share one image tokenizer, so one grid; got {sorted(grids)}")
    specials = list(self.specials)
    for s in segments:
      specials += [t for t in s.tokens if t not in specials]
    explicit = dict(self.special_ids)
    for name, i in explicit.items():
      if not 0 <= i < self.text_vocab:
        raise ValueError(f"special token {name!r}: an upstream id must be a text id (< text_vocab {self.text_vocab}), "
                         f"got {i}")
    object.__setattr__(self, "special_ids", tuple(sorted(explicit.items())))
    object.__setattr__(self, "segments", segments)
    object.__setattr__(self, "specials", tuple(specials))
    starts = np.cumsum([0] + [s.size for s in segments])
    object.__setattr__(self, "_starts", tuple(int(x) for x in starts))
    natural = self.id_range(SPECIAL)[1] + (0 if self.explicit_mask_id >= 0 else 1)
    if self.vocab_rows and self.vocab_rows < natural:
      raise ValueError(f"SequenceLayout.vocab_rows={self.vocab_rows} is smaller than the {natural} ids of the ranges")

  @classmethod
  def two_segment(cls, text_vocab: int, image_vocab: int, text_len: int, image_grid,
                  id_align: int = 1) -> "SequenceLayout":
    """Today's default, ``[text "text" | image "image"]``."""
    return cls((text(TEXT, text_len), image(IMAGE, image_grid)), text_vocab, image_vocab, id_align=id_align)

  # ---- ids -------------------------------------------------------------------------------------------------
  def _aligned(self, n: int) -> int:
    return -(-n // self.id_align) * self.id_align

  def id_range(self, modality: str) -> tuple[int, int]:
    """[lo, hi) of a modality's global ids: text from 0, then image, then specials, each range starting at a
    multiple of ``id_align``."""
    image_lo = self._aligned(self.text_vocab)
    special_lo = self._aligned(image_lo + self.image_vocab)
    return {TEXT: (0, self.text_vocab), IMAGE: (image_lo, image_lo + self.image_vocab),
            SPECIAL: (special_lo, special_lo + len(self._ranged_specials))}[modality]

  @property
  def _ranged_specials(self) -> tuple[str, ...]:
    """The special tokens that take ids of the special range (those without an upstream id)."""
    explicit = dict(self.special_ids)
    return tuple(t for t in self.specials if t not in explicit)

  @property
  def text_offset(self) -> int:
    return 0

  @property
  def image_offset(self) -> int:
    return self.id_range(IMAGE)[0]

  def special_id(self, token: str) -> int:
    if token not in self.specials:
      raise KeyError(f"no special token {token!r} in the layout (has {self.specials})")
    explicit = dict(self.special_ids)
    if token in explicit:
      return explicit[token]
    return self.id_range(SPECIAL)[0] + self._ranged_specials.index(token)

  @property
  def has_absent(self) -> bool:
    """Whether examples may leave segments out (the layout has the :data:`ABSENT` token)."""
    return ABSENT in self.specials

  @property
  def absent_id(self) -> int:
    return self.special_id(ABSENT)

  @property
  def mask_id(self) -> int:
    """MASK, right after the last range (specials, or the image range's aligned end when there are none); or,
    with ``explicit_mask_id`` (``sequence.mask_id``), that text id: vocabularies of imported checkpoints
    (LLaDA's 126,464 ids, MASK 126,336) hold their MASK among their own ids."""
    return self.explicit_mask_id if self.explicit_mask_id >= 0 else self.id_range(SPECIAL)[1]

  @property
  def size(self) -> int:
    """Rows of the embedding table: text + image + specials + MASK (no extra row with ``explicit_mask_id``), or
    ``vocab_rows`` (an upstream's embedding with unused ids past its ranges)."""
    return self.vocab_rows or self.id_range(SPECIAL)[1] + (0 if self.explicit_mask_id >= 0 else 1)

  # ---- segments ----------------------------------------------------------------------------------------------
  @property
  def names(self) -> tuple[str, ...]:
    return tuple(s.name for s in self.segments)

  def index(self, name: str) -> int:
    try:
      return self.names.index(name)
    except ValueError:
      raise KeyError(f"no segment {name!r} in the layout; segments: {', '.join(self.names)}") from None

  def segment(self, name: str) -> Segment:
    return self.segments[self.index(name)]

  def span(self, name: str) -> tuple[int, int]:
    """[start, end) of a segment in the flat sequence."""
    i = self.index(name)
    return self._starts[i], self._starts[i + 1]

  def of_modality(self, modality: str) -> tuple[str, ...]:
    return tuple(s.name for s in self.segments if s.modality == modality)

  @property
  def modalities(self) -> tuple[str, ...]:
    """The modalities with at least one segment, in MODALITIES order."""
    return tuple(m for m in MODALITIES if self.of_modality(m))

  @property
  def seq_len(self) -> int:
    return self._starts[-1]

  @property
  def image_grid(self) -> tuple[int, int] | None:
    """The (h, w) every image segment has (one image tokenizer), or None without image segments."""
    grids = [s.grid for s in self.segments if s.modality == IMAGE]
    return grids[0] if grids else None

  def is_two_segment(self) -> bool:
    """Whether this is today's default ``[text "text" | image "image"]``."""
    return (self.names == (TEXT, IMAGE) and self.segments[0].modality == TEXT
            and self.segments[1].modality == IMAGE and not self.specials)

  # ---- per-position arrays (numpy constants of length S) ----------------------------------------------------
  def segment_ids(self) -> np.ndarray:
    """int32 [S]: the index of each position's segment."""
    return np.repeat(np.arange(len(self.segments), dtype=np.int32), [s.size for s in self.segments])

  def modality_ids(self) -> np.ndarray:
    """int32 [S]: MODALITY_ID of each position's segment (0 text, 1 image, 2 special)."""
    per_segment = np.array([MODALITY_ID[s.modality] for s in self.segments], np.int32)
    return per_segment[self.segment_ids()]

  def positions(self) -> np.ndarray:
    """int32 [S, 2]: (i, i) for index i within a text or special segment; (row, col) within an image segment."""
    out = []
    for s in self.segments:
      if s.modality == IMAGE:
        rows, cols = np.meshgrid(np.arange(s.grid[0]), np.arange(s.grid[1]), indexing="ij")
        out.append(np.stack([rows.ravel(), cols.ravel()], axis=1))
      else:
        out.append(np.repeat(np.arange(s.size)[:, None], 2, axis=1))
    return np.concatenate(out).astype(np.int32)

  def fixed_tokens(self) -> np.ndarray:
    """int32 [S]: the global id of each special position, -1 elsewhere."""
    out = np.full(self.seq_len, -1, np.int32)
    for s in self.segments:
      if s.modality == SPECIAL:
        lo, _ = self.span(s.name)
        out[lo:lo + s.size] = [self.special_id(t) for t in s.tokens]
    return out

  def positions_of(self, names: Sequence[str]) -> np.ndarray:
    """bool [S]: True at the positions of the named segments."""
    out = np.zeros(self.seq_len, bool)
    for name in names:
      lo, hi = self.span(name)
      out[lo:hi] = True
    return out

  def only(self, names: Sequence[str]) -> "SequenceLayout":
    """The layout of the named segments alone, in this layout's order, over the same vocabulary (ids, specials and
    MASK unchanged): what an example that lacks the others is, to a network with ``model.mask_absent``."""
    unknown = sorted(set(names) - set(self.names))
    if unknown:
      raise KeyError(f"no segments {unknown} in the layout {self.describe()}")
    return dataclasses.replace(self, segments=tuple(s for s in self.segments if s.name in set(names)))

  def segment_starts(self) -> np.ndarray:
    """int32 [G]: the first position of each segment."""
    return np.asarray(self._starts[:-1], np.int32)

  def present(self, tokens, xp=np):
    """bool [..., G]: whether each segment of each example is present (its first token is not :data:`ABSENT`);
    all True in a layout without the token. ``tokens``: int [..., S] global ids (numpy, or JAX with xp=jnp)."""
    first = tokens[..., self.segment_starts()]
    if not self.has_absent:
      return xp.ones(first.shape, bool)
    return first != self.absent_id

  # ---- traced per-position quantities (built in the program from iota comparisons) -------------------------
  def modality_masks(self, xp=np) -> dict[str, Any]:
    """{modality: bool [S]}, from comparisons of an iota with the segment boundaries (no [S]-sized constant)."""
    iota = xp.arange(self.seq_len)
    out = {}
    for m in self.modalities:
      where = xp.zeros(self.seq_len, bool)
      for name in self.of_modality(m):
        lo, hi = self.span(name)
        where = where | ((iota >= lo) & (iota < hi))
      out[m] = where
    return out

  def segment_index(self, xp=np):
    """int32 [S]: each position's segment index, from comparisons of an iota with the segment starts."""
    iota = xp.arange(self.seq_len)
    out = xp.zeros(self.seq_len, np.int32)
    for start in self._starts[1:-1]:
      out = out + (iota >= start).astype(np.int32)
    return out

  def allowed_ids(self, xp=np):
    """bool [S, V]: the ids position s may predict: its own modality's range, never MASK (nor another modality's,
    nor a special token, which is never generated). Built from iota comparisons, so a jitted program computes it
    instead of holding an [S, V] constant."""
    lo = xp.zeros(self.seq_len, np.int32)
    hi = xp.zeros(self.seq_len, np.int32)
    for m, where in self.modality_masks(xp).items():
      if m == SPECIAL:   # special positions keep [0, 0): no id allowed (never generated, never any loss)
        continue
      r = self.id_range(m)
      lo = xp.where(where, r[0], lo)
      hi = xp.where(where, r[1], hi)
    v = xp.arange(self.size)[None, :]
    allowed = (v >= lo[:, None]) & (v < hi[:, None])
    return allowed & (v != self.mask_id) if self.explicit_mask_id >= 0 else allowed

  # ---- slicing ---------------------------------------------------------------------------------------------
  def split(self, x, axis: int = 1) -> dict[str, Any]:
    """{segment name: the segment's part of x along ``axis``} (numpy or JAX arrays)."""
    out = {}
    for name in self.names:
      lo, hi = self.span(name)
      index = [slice(None)] * x.ndim
      index[axis] = slice(lo, hi)
      out[name] = x[tuple(index)]
    return out

  # ---- pack / unpack -----------------------------------------------------------------------------------------
  def pack(self, values: Mapping[str, Any], batch: int | None = None) -> np.ndarray:
    """{segment: local ids} -> int32 [B, S] global ids.

    Local ids are the tokenizer's (0 .. vocab - 1); -1 (or a segment left out) means MASK, -2
    (:data:`LOCAL_ABSENT`, only in a layout with the :data:`ABSENT` token) means the segment is absent, and must
    then fill the whole row of the segment. Special segments are filled with their tokens and must not be given.
    """
    unknown = set(values) - set(self.names)
    if unknown:
      raise KeyError(f"no segment {sorted(unknown)} in the layout; segments: {', '.join(self.names)}")
    sizes = {np.asarray(v).shape[0] for v in values.values()}
    if batch is None:
      if len(sizes) != 1:
        raise ValueError(f"pack needs the same number of rows in every segment, got {sorted(sizes)}")
      batch = sizes.pop()
    parts = []
    for s in self.segments:
      if s.modality == SPECIAL:
        if s.name in values:
          raise ValueError(f"special segment {s.name!r} holds fixed tokens; do not give it")
        lo, hi = self.span(s.name)
        parts.append(np.broadcast_to(self.fixed_tokens()[lo:hi], (batch, s.size)))
        continue
      ids = np.asarray(values[s.name]) if s.name in values else np.full((batch, s.size), -1)
      if ids.shape != (batch, s.size):
        raise ValueError(f"segment {s.name!r} holds {s.size} tokens per example: expected [{batch}, {s.size}], "
                         f"got {ids.shape}")
      lo, hi = self.id_range(s.modality)
      floor = LOCAL_ABSENT if self.has_absent else -1
      if ids.size and (ids.max() >= hi - lo or ids.min() < floor):
        raise ValueError(f"segment {s.name!r}: local ids must be in [0, {hi - lo}) or -1 (MASK)"
                         f"{' or -2 (absent)' if self.has_absent else ''}, got [{ids.min()}, {ids.max()}]")
      part = np.where(ids < 0, self.mask_id, ids + lo)
      absent = ids == LOCAL_ABSENT       # only possible with the ABSENT token (the bound above)
      if absent.any():
        if not (absent.all(axis=1) | ~absent.any(axis=1)).all():
          raise ValueError(f"segment {s.name!r}: an absent segment (-2) must be absent in every position of its row")
        part = np.where(absent, self.absent_id, part)
      parts.append(part)
    return np.concatenate(parts, axis=1).astype(np.int32)

  def random_tokens(self, rng: np.random.Generator, batch: int) -> np.ndarray:
    """int32 [B, S]: uniformly random ids of each segment's modality (special tokens fixed); for timing and
    tests, which do not depend on the values."""
    values = {}
    for s in self.segments:
      if s.generative:
        lo, hi = self.id_range(s.modality)
        values[s.name] = rng.integers(0, hi - lo, (batch, s.size))
    return self.pack(values, batch=batch)

  def unpack(self, tokens) -> dict[str, Any]:
    """int [..., S] global ids -> {segment: local ids}, MASK as -1 and ABSENT as -2 (numpy or JAX arrays).
    Special segments are left out."""
    if isinstance(tokens, np.ndarray):
      xp = np
    else:
      import jax.numpy as xp  # pylint: disable=import-outside-toplevel
    out = {}
    for s in self.segments:
      if s.modality == SPECIAL:
        continue
      lo, hi = self.span(s.name)
      part = tokens[..., lo:hi]
      local = xp.where(part == self.mask_id, -1, part - self.id_range(s.modality)[0])
      out[s.name] = xp.where(part == self.absent_id, LOCAL_ABSENT, local) if self.has_absent else local
    return out

  # ---- description ---------------------------------------------------------------------------------------------
  def describe(self) -> str:
    """'[text "text" 24 | image "image" 6x6]' for logs and errors."""
    def one(s):
      if s.modality == IMAGE:
        return f'image "{s.name}" {s.grid[0]}x{s.grid[1]}'
      if s.modality == SPECIAL:
        return f'special "{s.name}" {" ".join(s.tokens)}'
      return f'text "{s.name}" {s.length}'
    return "[" + " | ".join(one(s) for s in self.segments) + "]"

  def to_dict(self) -> dict:
    return {"segments": [dataclasses.asdict(s) for s in self.segments], "text_vocab": self.text_vocab,
            "image_vocab": self.image_vocab, "specials": list(self.specials), "id_align": self.id_align,
            "mask_id": self.mask_id, "special_ids": dict(self.special_ids), "vocab_size": self.size}


def from_config(config, text_vocab: int, image_vocab: int, image_grid) -> SequenceLayout:
  """The layout a config declares (``sequence.segments``; ``()`` = today's ``[text | image]``) for tokenizers of
  the given sizes. A text segment without a length takes ``text.max_len``; image segments take the image
  tokenizer's grid.

  Segment specs: ``(name, 'text'[, length])``, ``(name, 'image')``, ``(name, 'special', token, ...)``.
  """
  specs = tuple(config.sequence.segments)
  kw = dict(id_align=int(config.sequence.get("id_align", 1)), explicit_mask_id=int(config.sequence.get("mask_id", -1)),
            special_ids=tuple(dict(config.sequence.get("special_ids", {})).items()),
            vocab_rows=int(config.sequence.get("vocab_rows", 0)))
  if not specs:
    return SequenceLayout((text(TEXT, config.text.max_len), image(IMAGE, image_grid)), text_vocab, image_vocab, **kw)
  return SequenceLayout(parse_segments(specs, config.text.max_len, image_grid), text_vocab, image_vocab,
                        tuple(config.sequence.specials), **kw)


def parse_segments(specs, text_len: int, image_grid) -> tuple[Segment, ...]:
  """Segments from config specs (see :func:`from_config`); ValueError naming a bad spec."""
  out = []
  for spec in specs:
    spec = tuple(spec)
    if len(spec) < 2 or not all(isinstance(x, str) for x in spec[:2]):
      raise ValueError(f"config.sequence.segments entry {spec!r} must start with (name, modality)")
    name, modality, *rest = spec
    if modality == TEXT:
      if len(rest) > 1 or (rest and not isinstance(rest[0], int)):
        raise ValueError(f"config.sequence.segments entry {spec!r}: a text segment is (name, 'text'[, length])")
      out.append(text(name, rest[0] if rest else text_len))
    elif modality == IMAGE:
      if rest:
        raise ValueError(f"config.sequence.segments entry {spec!r}: an image segment is (name, 'image'); its grid "
                         "is the image tokenizer's")
      out.append(image(name, image_grid))
    elif modality == SPECIAL:
      out.append(special(name, *rest))
    else:
      raise ValueError(f"config.sequence.segments entry {spec!r}: modality {modality!r} is not one of {MODALITIES}")
  return tuple(out)
