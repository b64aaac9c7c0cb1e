"""Edits and questions on the ``shapes`` scenes: two more tasks of the same model, each with an exact checker.

The scenes are those of :mod:`unimm_jax.data.shapes` (same distribution, same splits: an example of a split has a
source scene whose shape set belongs to that split, so every val edit and question is about a scene never trained
on). Each task draws from its own seed stream, so the caption examples stay exactly as they were.

Edit: ``(instruction, source image, target image)``; the target is the source with exactly the named edit applied.

* ``recolour``: "make the red circle blue"; ``move``: "move the small square to the bottom right";
  ``resize``: "make the blue triangle large"; ``remove`` (two-shape scenes): "remove the green triangle";
  ``add`` (one-shape scenes, into an empty cell): "add a large cyan circle at the center".
* A shape is named by a *reference*: its kind plus the fewest other attributes (colour, size, cell) that make it
  the only match in the scene, picked at random among the minimal ones; :func:`resolve` finds what a reference
  names. Three or more templates per edit kind (:data:`EDIT_TEMPLATES`).
* Checker: :func:`read_image` of the generated target against the expected shape set, exactly.

VQA: ``(image, question, answer)``, answers of one or two words compared exactly.

* ``colour`` ("what colour is the square?"), ``kind`` ("what shape is the red one at the top left?"), ``size``,
  ``position`` (a cell name), ``count`` ("one" | "two"), ``exists`` ("is there a red circle?": "yes" | "no", half
  each). A question's reference never holds the attribute asked about.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections.abc import Iterable, Sequence

import numpy as np

from unimm_jax.data import shapes as shapes_lib
from unimm_jax.data.shapes import CELLS, COLOURS, GRID, KINDS, SIZES, Shape

EDIT_KINDS: tuple[str, ...] = ("recolour", "move", "resize", "remove", "add")
QUESTION_KINDS: tuple[str, ...] = ("colour", "kind", "size", "position", "count", "exists")
COUNT_WORDS = {1: "one", 2: "two"}

# {ref}: a reference to a shape of the scene; {colour}, {size}, {cell}, {new}: the edit's arguments.
EDIT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour": ("make the {ref} {colour}", "paint the {ref} {colour}", "change the colour of the {ref} to {colour}"),
    # "to the {cell}", never "at the {cell}" after a reference, which may itself end in "at the {cell}"
    "move": ("move the {ref} to the {cell}", "shift the {ref} to the {cell}", "take the {ref} over to the {cell}"),
    "resize": ("make the {ref} {size}", "resize the {ref} to {size}", "change the size of the {ref} to {size}"),
    "remove": ("remove the {ref}", "delete the {ref}", "take away the {ref}"),
    "add": ("add {new} at the {cell}", "draw {new} at the {cell}", "place {new} at the {cell}"),
}
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("what colour is the {ref}?", "which colour is the {ref}?", "the {ref} is what colour?"),
    "kind": ("what shape is the {ref}?", "what kind of shape is the {ref}?", "the {ref} is which shape?"),
    "size": ("what size is the {ref}?", "is the {ref} small or large?", "how big is the {ref}?"),
    "position": ("where is the {ref}?", "in which cell is the {ref}?", "where does the {ref} sit?"),
    "count": ("how many shapes are there?", "how many shapes does the image have?", "count the shapes."),
    "exists": ("is there a {colour} {kind}?", "does the image have a {colour} {kind}?", "can you see a {colour} {kind}?"),
}
_ATTRIBUTES = ("colour", "kind", "size", "cell")
_TASK_STREAM = {"edit": 1, "vqa": 2, "kind": 3}   # the caption examples use the stream without a fourth key


@dataclasses.dataclass(frozen=True)
class Reference:
  """Some attributes of a shape (None: not said), enough to name it in its scene."""

  colour: str | None = None
  kind: str | None = None
  size: str | None = None
  cell: int | None = None

  def matches(self, shape: Shape) -> bool:
    return all(getattr(self, a) is None or getattr(self, a) == getattr(shape, a) for a in _ATTRIBUTES)

  def text(self) -> str:
    """'small red circle at the top left'; 'shape' stands for an unsaid kind."""
    words = [w for w in (self.size, self.colour) if w] + [self.kind or "shape"]
    return " ".join(words) + (f" at the {CELLS[self.cell]}" if self.cell is not None else "")


def resolve(reference: Reference, scene: Iterable[Shape]) -> list[Shape]:
  """The shapes of ``scene`` that ``reference`` fits (one, for every reference this module writes)."""
  return [s for s in sorted(scene) if reference.matches(s)]


def references(shape: Shape, scene: frozenset[Shape], without: str | None = None) -> list[Reference]:
  """The minimal unique references to ``shape`` in ``scene`` (kind always said unless ``without='kind'``; never
  the attribute ``without``): the ones with the fewest attributes that name ``shape`` alone."""
  required = () if without == "kind" else ("kind",)
  optional = [a for a in _ATTRIBUTES if a not in required and a != without]
  for n in range(len(optional) + 1):
    found = []
    for extra in itertools.combinations(optional, n):
      ref = Reference(**{a: getattr(shape, a) for a in required + extra})
      if (required or extra) and resolve(ref, scene) == [shape]:
        found.append(ref)
    if found:
      return found
  return []


def _choice(rng: np.random.Generator, seq):
  return seq[int(rng.integers(len(seq)))]


def _scene(split: str, seed: int, index: int, task: str) -> tuple[np.random.Generator, frozenset[Shape]]:
  code = shapes_lib._split_code(split)  # pylint: disable=protected-access
  if index < 0:
    raise ValueError(f"index={index} must be >= 0")
  rng = np.random.default_rng([int(seed), code, int(index), _TASK_STREAM[task]])
  while True:   # rejection, as shapes.sample_example: the source scene belongs to the split
    scene = shapes_lib._draw_shapes(rng)  # pylint: disable=protected-access
    if shapes_lib.split_of(scene) == split:
      return rng, scene


# ---- edits -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Edit:
  kind: str                     # one of EDIT_KINDS
  instruction: str
  source: frozenset[Shape]
  target: frozenset[Shape]


def _empty_cells(scene: frozenset[Shape]) -> list[int]:
  used = {s.cell for s in scene}
  return [c for c in range(GRID * GRID) if c not in used]


def make_edit(scene: frozenset[Shape], rng: np.random.Generator, kind: str | None = None) -> Edit:
  """A random edit of ``scene`` (of ``kind``, else uniform over the kinds the scene allows)."""
  allowed = [k for k in EDIT_KINDS if not (k == "remove" and len(scene) < 2) and not (k == "add" and len(scene) > 1)]
  kind = kind or _choice(rng, allowed)
  if kind not in allowed:
    raise ValueError(f"edit kind {kind!r} does not apply to a scene of {len(scene)} shape(s)")
  template = _choice(rng, EDIT_TEMPLATES[kind])
  if kind == "add":
    new = Shape(_choice(rng, COLOURS), _choice(rng, KINDS), _choice(rng, SIZES), _choice(rng, _empty_cells(scene)))
    text = template.format(new=f"a {new.size} {new.colour} {new.kind}", cell=CELLS[new.cell])
    return Edit(kind, text, scene, scene | {new})
  shape = _choice(rng, sorted(scene))
  ref = _choice(rng, references(shape, scene)).text()
  rest = scene - {shape}
  if kind == "remove":
    return Edit(kind, template.format(ref=ref), scene, rest)
  if kind == "recolour":
    colour = _choice(rng, [c for c in COLOURS if c != shape.colour])
    return Edit(kind, template.format(ref=ref, colour=colour), scene, rest | {dataclasses.replace(shape, colour=colour)})
  if kind == "resize":
    size = _choice(rng, [s for s in SIZES if s != shape.size])
    return Edit(kind, template.format(ref=ref, size=size), scene, rest | {dataclasses.replace(shape, size=size)})
  cell = _choice(rng, _empty_cells(scene))    # move
  return Edit(kind, template.format(ref=ref, cell=CELLS[cell]), scene, rest | {dataclasses.replace(shape, cell=cell)})


def sample_edit(split: str, seed: int, index: int) -> Edit:
  """Edit example ``index`` of ``split``, fixed by the arguments."""
  rng, scene = _scene(split, seed, index, "edit")
  return make_edit(scene, rng)


def check_edit(expected_target: frozenset[Shape], image: np.ndarray) -> bool:
  """Whether a generated target image holds exactly the expected shapes."""
  return shapes_lib.read_image(image) == expected_target


# ---- questions ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Question:
  kind: str                     # one of QUESTION_KINDS
  question: str
  answer: str
  scene: frozenset[Shape]


def make_question(scene: frozenset[Shape], rng: np.random.Generator, kind: str | None = None) -> Question:
  """A random question about ``scene`` (of ``kind``, else uniform over the kinds the scene can be asked)."""
  kinds = [kind] if kind else list(QUESTION_KINDS)
  rng.shuffle(kinds)
  for k in kinds:
    template = _choice(rng, QUESTION_TEMPLATES[k])
    if k == "count":
      return Question(k, template, COUNT_WORDS[len(scene)], scene)
    if k == "exists":
      present = {(s.colour, s.kind) for s in scene}
      if rng.random() < 0.5:
        colour, kind_ = _choice(rng, sorted(present))
        return Question(k, template.format(colour=colour, kind=kind_), "yes", scene)
      colour, kind_ = _choice(rng, [(c, t) for c in COLOURS for t in KINDS if (c, t) not in present])
      return Question(k, template.format(colour=colour, kind=kind_), "no", scene)
    asked = {"colour": "colour", "kind": "kind", "size": "size", "position": "cell"}[k]
    order = sorted(scene)
    rng.shuffle(order)
    for shape in order:
      refs = references(shape, scene, without=asked)
      if refs:
        answer = CELLS[shape.cell] if asked == "cell" else getattr(shape, asked)
        return Question(k, template.format(ref=_choice(rng, refs).text()), answer, scene)
  raise ValueError(f"no question of kind {kind!r} names a shape of {sorted(scene)} unambiguously")


def sample_question(split: str, seed: int, index: int) -> Question:
  """VQA example ``index`` of ``split``, fixed by the arguments."""
  rng, scene = _scene(split, seed, index, "vqa")
  return make_question(scene, rng)


def check_answer(expected: str, answer: str) -> bool:
  """Exact comparison after trimming spaces and case."""
  return " ".join(answer.lower().split()) == expected


# ---- one source of every kind ---------------------------------------------------------------------------------
EXAMPLE_KINDS: tuple[str, ...] = ("caption", "edit", "vqa")
# The fields of a mixed item, as a folder's JSON lines name them; an item lacks those of other kinds.
FIELDS: dict[str, tuple[str, ...]] = {
    "caption": ("text", "image"),
    "edit": ("instruction", "source", "target"),
    "vqa": ("image", "question", "answer"),
}
TEXT_FIELDS = ("text", "instruction", "question", "answer")
IMAGE_FIELDS = ("image", "source", "target")


def example_kind(split: str, seed: int, index: int, shares: Sequence[float]) -> str:
  """The kind of mixed example ``index`` (drawn with ``shares`` over :data:`EXAMPLE_KINDS`, its own stream)."""
  rng = np.random.default_rng([int(seed), shapes_lib._split_code(split), int(index), _TASK_STREAM["kind"]])  # pylint: disable=protected-access
  p = np.asarray(shares, np.float64)
  return EXAMPLE_KINDS[int(rng.choice(len(EXAMPLE_KINDS), p=p / p.sum()))]


def mixed_item(kind: str, split: str, seed: int, index: int) -> dict:
  """One item of every field of :data:`FIELDS` (placeholders: "" or a black image), the ones of other kinds
  named in ``missing`` (the input pipeline's convention): example ``index`` of its kind's stream."""
  blank = np.zeros((shapes_lib.IMAGE_SIZE, shapes_lib.IMAGE_SIZE, 3), np.uint8)
  item = {k: "" for k in TEXT_FIELDS} | {k: blank for k in IMAGE_FIELDS}
  if kind == "caption":
    _, image, text = shapes_lib.sample_example(split, seed, index)
    item.update(text=text, image=image)
  elif kind == "edit":
    edit = sample_edit(split, seed, index)
    item.update(instruction=edit.instruction, source=shapes_lib.render(edit.source),
                target=shapes_lib.render(edit.target))
  elif kind == "vqa":
    q = sample_question(split, seed, index)
    item.update(image=shapes_lib.render(q.scene), question=q.question, answer=q.answer)
  else:
    raise ValueError(f"example kind {kind!r} is not one of {EXAMPLE_KINDS}")
  item["missing"] = ",".join(k for k in TEXT_FIELDS + IMAGE_FIELDS if k not in FIELDS[kind])
  return item


class MixedShapesSource:
  """A grain random-access source of ``shapes`` caption pairs, edits and questions mixed by ``shares``
  (caption, edit, vqa); picklable, generated on access. Item i is example i of its kind's stream, so the caption
  items are exactly :class:`~unimm_jax.data.shapes.ShapesSource`'s at the same indices."""

  def __init__(self, split: str, num_examples: int, seed: int = 0, shares: Sequence[float] = (1.0, 0.0, 0.0)):
    shapes_lib._split_code(split)  # pylint: disable=protected-access
    if num_examples <= 0:
      raise ValueError(f"MixedShapesSource num_examples={num_examples} must be positive")
    shares = tuple(float(x) for x in shares)
    if len(shares) != len(EXAMPLE_KINDS) or min(shares) < 0 or sum(shares) <= 0:
      raise ValueError(f"shares {shares} must be {len(EXAMPLE_KINDS)} non-negative weights of {EXAMPLE_KINDS}")
    self.split, self.num_examples, self.seed, self.shares = split, int(num_examples), int(seed), shares

  @classmethod
  def from_kinds(cls, split: str, num_examples: int, seed: int, kinds) -> "MixedShapesSource":
    """From ``data.shapes_kinds``: (kind, weight) pairs."""
    weights = dict((str(k), float(w)) for k, w in kinds)
    unknown = set(weights) - set(EXAMPLE_KINDS)
    if unknown:
      raise ValueError(f"config.data.shapes_kinds names {sorted(unknown)}; kinds are {EXAMPLE_KINDS}")
    return cls(split, num_examples, seed, tuple(weights.get(k, 0.0) for k in EXAMPLE_KINDS))

  def __len__(self) -> int:
    return self.num_examples

  def kind(self, index: int) -> str:
    return example_kind(self.split, self.seed, index, self.shares)

  def __getitem__(self, index: int) -> dict:
    index = operator.index(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"MixedShapesSource index {index} out of range [0, {self.num_examples})")
    return mixed_item(self.kind(index), self.split, self.seed, index)

  def __repr__(self) -> str:  # grain checkpoints the data iterator by the source's repr
    return (f"MixedShapesSource(split={self.split!r}, num_examples={self.num_examples}, seed={self.seed}, "
            f"shares={self.shares})")
