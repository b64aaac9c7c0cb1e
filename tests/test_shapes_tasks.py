"""Edit and VQA examples on the shapes scenes (unimm_jax/data/shapes_tasks.py): what they say is exactly what
they do, every reference names one shape, and the checkers read every val example back."""

import collections
import re

import numpy as np
import pytest

from unimm_jax.data import shapes
from unimm_jax.data import shapes_tasks as tasks
from unimm_jax.data.shapes import CELLS, COLOURS, KINDS, SIZES

N = 600
_REF = re.compile(r"the (?:(small|large) )?(?:(" + "|".join(COLOURS) + r") )?(" + "|".join(KINDS) + r"|shape)"
                  r"(?: at the (" + "|".join(CELLS) + r"))?")


def _named(text: str, scene):
  """The shapes of ``scene`` that the first reference in ``text`` fits, read from the words alone."""
  m = _REF.search(text)
  assert m, text
  size, colour, kind, cell = m.groups()
  ref = tasks.Reference(colour, None if kind == "shape" else kind, size, CELLS.index(cell) if cell else None)
  return tasks.resolve(ref, scene)


@pytest.fixture(scope="module")
def val_edits():
  return [tasks.sample_edit("val", 0, i) for i in range(N)]


@pytest.fixture(scope="module")
def val_questions():
  return [tasks.sample_question("val", 0, i) for i in range(N)]


def test_edits_do_exactly_what_their_instruction_says(val_edits):
  for e in val_edits:
    assert shapes.split_of(e.source) == "val"                      # a scene never trained on
    removed, added = e.source - e.target, e.target - e.source
    if e.kind == "add":
      assert not removed and len(added) == 1 and len(e.source) == 1
      (new,) = added
      assert f"a {new.size} {new.colour} {new.kind} at the {CELLS[new.cell]}" in e.instruction
      continue
    (old,) = _named(e.instruction, e.source)                        # one shape, named unambiguously
    assert removed == {old}
    if e.kind == "remove":
      assert not added and len(e.source) == 2
      continue
    (new,) = added
    changed = {a for a in ("colour", "kind", "size", "cell") if getattr(new, a) != getattr(old, a)}
    assert changed == {"recolour": {"colour"}, "move": {"cell"}, "resize": {"size"}}[e.kind]
    said = {"recolour": new.colour, "move": CELLS[new.cell], "resize": new.size}[e.kind]
    assert e.instruction.endswith(said)


def test_edit_kinds_and_templates_all_occur_and_the_checker_reads_every_target_back(val_edits):
  counts = collections.Counter(e.kind for e in val_edits)
  assert set(counts) == set(tasks.EDIT_KINDS) and min(counts.values()) > N // 10
  for kind, templates in tasks.EDIT_TEMPLATES.items():
    assert len(templates) >= 3
    heads = {t.split("{")[0] for t in templates}
    assert all(any(e.instruction.startswith(h) for e in val_edits if e.kind == kind) for h in heads), kind
  for e in val_edits:
    assert tasks.check_edit(e.target, shapes.render(e.target))
    assert not tasks.check_edit(e.target, shapes.render(e.source))  # the edit always changes the picture


def test_questions_are_answered_by_the_scene_and_never_give_the_answer_away(val_questions):
  for q in val_questions:
    assert shapes.split_of(q.scene) == "val"
    assert 1 <= len(q.answer.split()) <= 2
    if q.kind == "count":
      assert q.answer == tasks.COUNT_WORDS[len(q.scene)]
    elif q.kind == "exists":
      colour, kind = re.search(r"a (\w+) (\w+)\?$", q.question).groups()
      assert q.answer == ("yes" if any(s.colour == colour and s.kind == kind for s in q.scene) else "no")
    else:
      (shape,) = _named(q.question, q.scene)
      m = _REF.search(q.question)
      asked = {"colour": 2, "kind": 3, "size": 1, "position": 4}[q.kind]
      assert m.group(asked) in (None, "shape")                      # the reference leaves out what is asked
      want = {"colour": shape.colour, "kind": shape.kind, "size": shape.size, "position": CELLS[shape.cell]}
      assert q.answer == want[q.kind]
    assert tasks.check_answer(q.answer, f"  {q.answer.upper()} ")


def test_question_kinds_templates_and_yes_no_balance(val_questions):
  counts = collections.Counter(q.kind for q in val_questions)
  assert set(counts) == set(tasks.QUESTION_KINDS) and min(counts.values()) > N // 12
  assert all(len(t) >= 3 for t in tasks.QUESTION_TEMPLATES.values())
  yes = sum(q.answer == "yes" for q in val_questions if q.kind == "exists")
  assert abs(yes / counts["exists"] - 0.5) < 0.15


def test_examples_are_fixed_by_split_seed_and_index_and_captions_are_untouched():
  assert tasks.sample_edit("train", 3, 7) == tasks.sample_edit("train", 3, 7)
  assert tasks.sample_question("val", 1, 2) == tasks.sample_question("val", 1, 2)
  assert shapes.sample_example("train", 0, 5)[2] == shapes.sample_example("train", 0, 5)[2]
  scene = frozenset({shapes.Shape("red", "circle", "small", 0), shapes.Shape("red", "circle", "small", 4)})
  for shape in scene:                     # identical but for the cell: only the cell tells them apart
    assert [r.cell for r in tasks.references(shape, scene)] == [shape.cell]
    assert tasks.references(shape, scene, without="cell") == []
  with pytest.raises(ValueError, match="remove"):
    tasks.make_edit(frozenset({shapes.Shape("red", "circle", "small", 0)}), np.random.default_rng(0), "remove")
