"""The embedded ``shapes`` dataset: procedurally generated image–caption pairs, no files.

Distribution (fixed: accuracy is measured over it, so do not make it easier)
-----------------------------------------------------------------------------
* A 24×24 RGB uint8 image, black background, seen as a 3×3 grid of 8×8 cells numbered 0..8 row-major.
* One or two shapes (probability 1/2 each), in distinct cells, drawn uniformly among the 9 cells.
* Each shape has one of 6 pure colours (``COLOURS``: components 0 or 255), one of 3 kinds (``KINDS``)
  and one of 2 sizes (``SIZES``), all uniform. A shape is stamped from one of 6 fixed 8×8 masks
  (``TEMPLATES``): large shapes span 7 px, small ones 4-5 px; any two masks differ in at least 7 pixels,
  so up to 3 wrong pixels in a cell still read back as the right kind and size.

Captions
--------
One phrase per shape, in random order, joined with ``" and "``; "and" appears nowhere else. Each phrase
uses one of four word orders, chosen at random per phrase (``PHRASES``)::

    a small red circle at the top left
    top left: a small red circle
    a red circle, small, at the top left
    at the top left there is a small red circle

Cell names (``CELLS``): top left, top center, top right, middle left, center, middle right, bottom left,
bottom center, bottom right. Everything is lowercase; the only punctuation is "," and ":".

Splits
------
A *shape set* is the frozenset of ``Shape(colour, kind, size, cell)``. ``split_of`` sends it to "val" when
the SHA-256 of its canonical (sorted) text form, read as a fraction in [0, 1), is below ``VAL_FRACTION``
(1/8), else to "train"; one-shape sets are partitioned like the rest. Example ``i`` of a split is drawn
from ``np.random.default_rng([seed, split_code, i])`` by rejection until its set belongs to that split, so
the splits use disjoint seed streams AND never share a shape set, and (split, seed, i) fixes the example.
Because rejection conditions on the split, the one/two-shape ratio of a split can drift slightly from 1/2.

Checkers
--------
``read_image`` recovers the set from pixels and is tolerant, since it also scores generated images: per
cell, pixels with any channel >= 128 are lit; cells with fewer than ``MIN_LIT_PIXELS`` are empty; the
colour is the palette colour nearest the mean lit RGB; kind and size are those of the template mask at
the least Hamming distance. ``read_caption`` parses every phrase form exactly and returns None when any
phrase does not parse; it never raises, whatever the string.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import re
from collections.abc import Iterable

import numpy as np

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "cyan", "magenta")
KINDS: tuple[str, ...] = ("square", "circle", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
CELLS: tuple[str, ...] = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)  # row-major over the 3×3 grid
IMAGE_SIZE = 24
CELL_SIZE = 8
GRID = 3

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}

SPLITS: tuple[str, ...] = ("train", "val")
VAL_FRACTION = 0.125
MIN_LIT_PIXELS = 4  # the smallest mask has 13 px; a few stray pixels of a generated image are noise
_LIT_THRESHOLD = 128

# The 6 masks, drawn in the top-left 7×7 of a cell so that shapes in neighbouring cells never touch.
# Small square is 4 px and small circle/triangle 5 px: a 5 px square would differ from the 5 px
# circle by its 4 corners only, which two wrong pixels could confuse.
_ART = {
    ("square", "large"): """
        #######.
        #######.
        #######.
        #######.
        #######.
        #######.
        #######.
        ........""",
    ("circle", "large"): """
        ..###...
        .#####..
        #######.
        #######.
        #######.
        .#####..
        ..###...
        ........""",
    ("triangle", "large"): """
        ...#....
        ...#....
        ..###...
        ..###...
        .#####..
        .#####..
        #######.
        ........""",
    ("square", "small"): """
        ........
        ........
        ..####..
        ..####..
        ..####..
        ..####..
        ........
        ........""",
    ("circle", "small"): """
        ........
        ..###...
        .#####..
        .#####..
        .#####..
        ..###...
        ........
        ........""",
    ("triangle", "small"): """
        ........
        ...#....
        ...#....
        ..###...
        ..###...
        .#####..
        ........
        ........""",
}


def _parse_art(art: str) -> np.ndarray:
  rows = [line.strip() for line in art.strip().splitlines()]
  return np.array([[c == "#" for c in row] for row in rows], dtype=bool)  # bool [8, 8]


TEMPLATES: dict[tuple[str, str], np.ndarray] = {key: _parse_art(art) for key, art in _ART.items()}
_TEMPLATE_KEYS = tuple(TEMPLATES)  # (kind, size) in a fixed order
_TEMPLATE_STACK = np.stack([TEMPLATES[k] for k in _TEMPLATE_KEYS])  # bool [6, 8, 8]
_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLOURS], dtype=np.float64)  # float64 [6, 3]


@dataclasses.dataclass(frozen=True, order=True)
class Shape:
  """One shape of an image; ``cell`` is 0..8, row-major over the 3×3 grid (see ``CELLS``)."""

  colour: str
  kind: str
  size: str
  cell: int

  def __post_init__(self):
    for name, allowed in (("colour", COLOURS), ("kind", KINDS), ("size", SIZES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"Shape.{name}={getattr(self, name)!r} is not one of {allowed}")
    cell = operator.index(self.cell)  # accept numpy ints, store a plain int so hashing/pickling agree
    if not 0 <= cell < GRID * GRID:
      raise ValueError(f"Shape.cell={self.cell} must be in 0..{GRID * GRID - 1}")
    object.__setattr__(self, "cell", int(cell))


def _check_cells(shapes: Iterable[Shape]) -> list[Shape]:
  shapes = sorted(shapes)
  cells = [s.cell for s in shapes]
  if len(set(cells)) != len(cells):
    raise ValueError(f"shapes must be in distinct cells, got cells {cells}")
  return shapes


# ---- pixels ------------------------------------------------------------------------------------------------
def render(shapes: Iterable[Shape]) -> np.ndarray:
  """Draws the shapes on black.

  Returns:
    uint8 [24, 24, 3], only black and palette colours.
  """
  image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  for s in _check_cells(shapes):
    r, c = divmod(s.cell, GRID)
    patch = image[r * CELL_SIZE:(r + 1) * CELL_SIZE, c * CELL_SIZE:(c + 1) * CELL_SIZE]  # a view
    patch[TEMPLATES[(s.kind, s.size)]] = PALETTE[s.colour]
  return image


def read_image(image: np.ndarray) -> frozenset[Shape]:
  """Reads the shape set back from pixels, tolerantly (it scores generated images too).

  Args:
    image: [24, 24, 3] RGB in 0..255 (any numeric dtype).

  Returns:
    one Shape per cell with at least ``MIN_LIT_PIXELS`` lit pixels; colour is the palette colour nearest
    the mean lit RGB, kind and size those of the nearest template mask in Hamming distance.
  """
  image = np.asarray(image)
  if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
    raise ValueError(f"read_image expects an RGB image [{IMAGE_SIZE}, {IMAGE_SIZE}, 3], got {image.shape}")
  image = image.astype(np.float64)
  lit = image.max(axis=-1) >= _LIT_THRESHOLD  # bool [24, 24]
  found = []
  for cell in range(GRID * GRID):
    r, c = divmod(cell, GRID)
    rows, cols = slice(r * CELL_SIZE, (r + 1) * CELL_SIZE), slice(c * CELL_SIZE, (c + 1) * CELL_SIZE)
    mask = lit[rows, cols]  # bool [8, 8]
    if mask.sum() < MIN_LIT_PIXELS:
      continue
    mean_rgb = image[rows, cols][mask].mean(axis=0)  # float64 [3]
    colour = COLOURS[int(np.argmin(((_PALETTE_ARRAY - mean_rgb) ** 2).sum(axis=-1)))]
    hamming = (_TEMPLATE_STACK != mask).sum(axis=(1, 2))  # int [6]
    kind, size = _TEMPLATE_KEYS[int(np.argmin(hamming))]
    found.append(Shape(colour, kind, size, cell))
  return frozenset(found)


# ---- words -------------------------------------------------------------------------------------------------
# One entry per word order. "and" must never appear inside a phrase: it is the joiner.
PHRASES: tuple[str, ...] = (
    "a {size} {colour} {kind} at the {cell}",
    "{cell}: a {size} {colour} {kind}",
    "a {colour} {kind}, {size}, at the {cell}",
    "at the {cell} there is a {size} {colour} {kind}",
)
JOINER = " and "


def _normalise(text: str) -> str:
  """Lowercase, one space between words, punctuation as its own word (how the word tokenizer sees it)."""
  return " ".join(re.sub(r"([,:])", r" \1 ", text.lower()).split())


def _alternation(words: Iterable[str]) -> str:
  return "|".join(re.escape(w) for w in words)


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
  slots = {"size": SIZES, "colour": COLOURS, "kind": KINDS, "cell": CELLS}
  pattern = re.escape(_normalise(phrase.replace("{", "<").replace("}", ">")))
  for name, words in slots.items():
    pattern = pattern.replace(re.escape(f"<{name}>"), f"(?P<{name}>{_alternation(words)})")
  return re.compile(pattern)


_PHRASE_PATTERNS: tuple[re.Pattern[str], ...] = tuple(_phrase_pattern(p) for p in PHRASES)


def describe(shapes: Iterable[Shape], rng: np.random.Generator) -> str:
  """The caption: one phrase per shape, random order and random word order, joined with " and "."""
  shapes = _check_cells(shapes)
  if not shapes:
    raise ValueError("describe needs at least one shape")
  phrases = []
  for i in rng.permutation(len(shapes)):
    s = shapes[i]
    template = PHRASES[int(rng.integers(len(PHRASES)))]
    phrases.append(template.format(size=s.size, colour=s.colour, kind=s.kind, cell=CELLS[s.cell]))
  return JOINER.join(phrases)


def _read_phrase(phrase: str) -> tuple[int, Shape] | None:
  """(index into PHRASES, Shape) for a normalised phrase, or None."""
  for t, pattern in enumerate(_PHRASE_PATTERNS):
    m = pattern.fullmatch(phrase)
    if m:
      return t, Shape(m["colour"], m["kind"], m["size"], CELLS.index(m["cell"]))
  return None


def read_caption(text: str) -> frozenset[Shape] | None:
  """Parses a caption back to its shape set; None if any phrase does not parse. Never raises."""
  try:
    words = _normalise(text).split(" ")
    phrases, current = [], []
    for w in words + ["and"]:  # a trailing joiner flushes the last phrase
      if w == "and":
        phrases.append(" ".join(current))
        current = []
      else:
        current.append(w)
    shapes = []
    for phrase in phrases:
      read = _read_phrase(phrase)
      if read is None:
        return None
      shapes.append(read[1])
    return frozenset(shapes)
  except Exception:  # pylint: disable=broad-except  # generated text is arbitrary; a score, not a crash
    return None


# ---- splits and sampling -----------------------------------------------------------------------------------
def split_of(shapes: Iterable[Shape]) -> str:
  """'train' or 'val': a stable SHA-256 partition of canonical shape sets (not Python's salted hash)."""
  canonical = ";".join(f"{s.colour},{s.kind},{s.size},{s.cell}" for s in sorted(set(shapes)))
  digest = hashlib.sha256(canonical.encode("utf-8")).digest()
  fraction = int.from_bytes(digest[:8], "big") / 2.0**64
  return "val" if fraction < VAL_FRACTION else "train"


def _split_code(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}")
  return SPLITS.index(split)


def _draw_shapes(rng: np.random.Generator) -> frozenset[Shape]:
  n = 1 + int(rng.integers(2))  # one or two shapes, 1/2 each
  cells = rng.choice(GRID * GRID, size=n, replace=False)
  return frozenset(
      Shape(COLOURS[int(rng.integers(len(COLOURS)))], KINDS[int(rng.integers(len(KINDS)))],
            SIZES[int(rng.integers(len(SIZES)))], int(cell))
      for cell in cells)


def sample_example(split: str, seed: int, index: int) -> tuple[frozenset[Shape], np.ndarray, str]:
  """Example ``index`` of ``split``: (shape set, uint8 [24, 24, 3] image, caption), fixed by the arguments."""
  code = _split_code(split)
  if index < 0:
    raise ValueError(f"index={index} must be >= 0")
  rng = np.random.default_rng([int(seed), code, int(index)])
  while True:  # rejection: ~1.1 draws for train, ~8 for val
    shapes = _draw_shapes(rng)
    if split_of(shapes) == split:
      break
  return shapes, render(shapes), describe(shapes, rng)


class ShapesSource:
  """A grain ``RandomAccessDataSource`` of ``num_examples`` shapes examples; picklable, generated on access."""

  def __init__(self, split: str, num_examples: int, seed: int = 0):
    _split_code(split)
    if num_examples <= 0:
      raise ValueError(f"ShapesSource num_examples={num_examples} must be positive")
    self.split, self.num_examples, self.seed = split, int(num_examples), int(seed)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    """Returns {'image': uint8 [24, 24, 3], 'text': str}."""
    index = operator.index(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"ShapesSource index {index} out of range [0, {self.num_examples})")
    _, image, text = sample_example(self.split, self.seed, index)
    return {"image": image, "text": text}

  def __repr__(self) -> str:  # grain checkpoints the data iterator by the source's repr
    return f"ShapesSource(split={self.split!r}, num_examples={self.num_examples}, seed={self.seed})"
