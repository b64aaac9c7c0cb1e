"""Invariants of the embedded shapes dataset: determinism, split disjointness, exact checkers, tolerance."""

import collections
import itertools
import pickle

import numpy as np
import pytest

from unimm_jax import configuration
from unimm_jax.data import shapes as S

ALL_SINGLES = [frozenset([S.Shape(c, k, z, cell)])
               for c in S.COLOURS for k in S.KINDS for z in S.SIZES for cell in range(9)]


@pytest.fixture(scope="module")
def train_examples():
  return [S.sample_example("train", 0, i) for i in range(2000)]


@pytest.fixture(scope="module")
def val_examples():
  # Every example of the val split that training validates on (config.data.val_size).
  return [S.sample_example("val", 0, i) for i in range(configuration.base_config().data.val_size)]


def test_constants():
  assert len(S.CELLS) == 9 and len(set(S.CELLS)) == 9
  assert len(S.COLOURS) == 6 and len(S.KINDS) == 3 and len(S.SIZES) == 2
  assert all(set(rgb) <= {0, 255} for rgb in S.PALETTE.values())
  assert len(set(S.PALETTE.values())) == 6
  assert len(S.PHRASES) >= 4
  for phrase in S.PHRASES:
    assert phrase == phrase.lower() and "and" not in S._normalise(phrase).split(" ")
  for words in (S.COLOURS, S.KINDS, S.SIZES, S.CELLS):
    assert all("and" not in w.split() for w in words)


def test_templates_separated_and_sized():
  masks = S.TEMPLATES
  assert set(masks) == {(k, z) for k in S.KINDS for z in S.SIZES}
  # Hamming >= 7 between any two masks: 3 wrong pixels cannot change the reading.
  assert min(int((masks[a] ^ masks[b]).sum()) for a, b in itertools.combinations(masks, 2)) >= 7

  def extent(mask):
    rows, cols = np.nonzero(mask)
    return max(rows.max() - rows.min(), cols.max() - cols.min()) + 1

  for kind in S.KINDS:
    assert extent(masks[(kind, "large")]) == 7
    assert extent(masks[(kind, "small")]) <= 5
    assert masks[(kind, "small")].sum() * 1.7 < masks[(kind, "large")].sum()
  # Row and column 7 stay black, so shapes in neighbouring cells never touch.
  for mask in masks.values():
    assert not mask[7].any() and not mask[:, 7].any()


def test_deterministic():
  for split in S.SPLITS:
    for i in (0, 1, 17):
      s1, im1, t1 = S.sample_example(split, 3, i)
      s2, im2, t2 = S.sample_example(split, 3, i)
      assert s1 == s2 and t1 == t2
      np.testing.assert_array_equal(im1, im2)
  # Different indices and seeds give different examples (not one example repeated).
  assert len({S.sample_example("train", 0, i)[2] for i in range(50)}) > 40
  assert [S.sample_example("train", 0, i)[2] for i in range(10)] != [
      S.sample_example("train", 1, i)[2] for i in range(10)]


def test_splits_share_no_shape_set(train_examples, val_examples):
  train_sets = {s for s, _, _ in train_examples}
  val_sets = {s for s, _, _ in val_examples}
  assert not train_sets & val_sets
  assert all(S.split_of(s) == "train" for s in train_sets)
  assert all(S.split_of(s) == "val" for s in val_sets)
  # split_of is a function of the set, not of the order it is given in.
  pair = sorted(next(s for s in val_sets if len(s) == 2))
  assert S.split_of(pair) == S.split_of(pair[::-1]) == "val"


def test_single_shape_sets_are_partitioned():
  splits = collections.Counter(S.split_of(s) for s in ALL_SINGLES)
  assert len(ALL_SINGLES) == 324
  assert set(splits) == {"train", "val"}
  assert 0.05 < splits["val"] / 324 < 0.25
  # And the val singles are actually sampled in val, never in train.
  val_singles = {s for s in ALL_SINGLES if S.split_of(s) == "val"}
  train_sets = {S.sample_example("train", 0, i)[0] for i in range(3000)}
  assert not train_sets & val_singles


def test_val_fraction_of_pairs():
  rng = np.random.default_rng(0)
  sets = [S._draw_shapes(rng) for _ in range(4000)]
  pairs = [s for s in sets if len(s) == 2]
  frac = np.mean([S.split_of(s) == "val" for s in pairs])
  assert 0.10 < frac < 0.15


@pytest.mark.parametrize("split", S.SPLITS)
def test_checkers_recover_every_example(split, train_examples, val_examples):
  examples = train_examples if split == "train" else val_examples
  used = collections.Counter()
  for shapes, image, text in examples:
    assert image.dtype == np.uint8 and image.shape == (24, 24, 3)
    assert S.read_image(image) == shapes
    assert S.read_caption(text) == shapes
    phrases = S._normalise(text).split(" and ")
    assert len(phrases) == len(shapes)  # "and" is only the joiner
    for phrase in phrases:
      used[S._read_phrase(phrase)[0]] += 1
  assert set(used) == set(range(len(S.PHRASES)))  # every word order is exercised


def test_every_single_shape_reads_back():
  for shapes in ALL_SINGLES:
    image = S.render(shapes)
    assert S.read_image(image) == shapes
    (shape,) = shapes
    r, c = divmod(shape.cell, 3)
    outside = image.copy()
    outside[8 * r:8 * r + 8, 8 * c:8 * c + 8] = 0
    assert not outside.any()  # drawn inside its own cell only
    for t in range(len(S.PHRASES)):
      text = S.PHRASES[t].format(size=shape.size, colour=shape.colour, kind=shape.kind,
                                 cell=S.CELLS[shape.cell])
      assert S.read_caption(text) == shapes


def test_one_or_two_shapes_in_distinct_cells(train_examples, val_examples):
  for examples in (train_examples, val_examples):
    counts = collections.Counter(len(s) for s, _, _ in examples)
    assert set(counts) == {1, 2}
    assert 0.42 < counts[2] / len(examples) < 0.58
    for shapes, _, _ in examples:
      assert len({s.cell for s in shapes}) == len(shapes)
  # Every colour, kind, size and cell occurs.
  flat = [s for shapes, _, _ in train_examples for s in shapes]
  assert {s.colour for s in flat} == set(S.COLOURS)
  assert {s.kind for s in flat} == set(S.KINDS)
  assert {s.size for s in flat} == set(S.SIZES)
  assert {s.cell for s in flat} == set(range(9))


def test_read_image_tolerates_a_few_wrong_pixels(train_examples):
  rng = np.random.default_rng(0)
  for shapes, image, _ in train_examples[:300]:
    noisy = image.copy()
    for shape in shapes:
      r, c = divmod(shape.cell, 3)
      for _ in range(rng.integers(1, 4)):  # 1-3 pixels of the cell flipped on/off
        y, x = 8 * r + rng.integers(8), 8 * c + rng.integers(8)
        noisy[y, x] = 0 if noisy[y, x].any() else S.PALETTE[shape.colour]
    # A couple of stray pixels in an empty cell are noise, not a shape.
    empty = sorted(set(range(9)) - {s.cell for s in shapes})[0]
    r, c = divmod(empty, 3)
    noisy[8 * r + 2, 8 * c + 2] = noisy[8 * r + 5, 8 * c + 3] = (255, 255, 255)
    # Colours a little off (as after lossy decoding) still snap to the palette.
    noisy = np.clip(noisy.astype(int) + rng.integers(-40, 41, noisy.shape) * (noisy > 0), 0, 255)
    assert S.read_image(noisy) == shapes


def test_read_image_black_and_bad_shape():
  assert S.read_image(np.zeros((24, 24, 3), np.uint8)) == frozenset()
  with pytest.raises(ValueError, match="24, 24, 3"):
    S.read_image(np.zeros((32, 32, 3), np.uint8))


def test_read_caption_never_raises_on_garbage():
  garbage = ["", " ", "and", "a and", "red", "a small red circle", "a small red circle at the",
             "a small red circle at the top left and", "and a small red circle at the top left",
             "a small red circle at the left top", "a small purple circle at the top left",
             "top left a small red circle", ":,:,", "a small red circle at the top left,",
             "\x00\xff", "a small red circle at the top left and and a large blue square at the center"]
  for text in garbage:
    assert S.read_caption(text) is None, text
  for bad in (None, 3, b"bytes", ["a"]):
    assert S.read_caption(bad) is None
  # Random soups of caption words: never raise; whatever parses is a valid shape set.
  vocab = "a small large red blue circle square at the top left center and : , there is".split()
  rng = np.random.default_rng(0)
  for _ in range(300):
    out = S.read_caption(" ".join(rng.choice(vocab, rng.integers(0, 20))))
    assert out is None or all(isinstance(s, S.Shape) for s in out)
  # Tolerant of spacing and case, as a detokenizer may produce.
  assert S.read_caption("Top Left :  a small red circle AND a blue square , large , at the center") == {
      S.Shape("red", "circle", "small", 0), S.Shape("blue", "square", "large", 4)}


def test_shape_and_render_validation():
  with pytest.raises(ValueError, match="colour"):
    S.Shape("purple", "circle", "small", 0)
  with pytest.raises(ValueError, match="cell"):
    S.Shape("red", "circle", "small", 9)
  with pytest.raises(ValueError, match="distinct cells"):
    S.render([S.Shape("red", "circle", "small", 1), S.Shape("blue", "square", "large", 1)])
  with pytest.raises(ValueError, match="split"):
    S.sample_example("test", 0, 0)
  assert S.Shape("red", "circle", "small", np.int64(3)) == S.Shape("red", "circle", "small", 3)


def test_shapes_source():
  grain = pytest.importorskip("grain.python")
  source = S.ShapesSource("val", 10, seed=2)
  assert len(source) == 10
  assert isinstance(source, grain.RandomAccessDataSource)
  item = source[np.int64(4)]
  shapes, image, text = S.sample_example("val", 2, 4)
  assert set(item) == {"image", "text"} and item["text"] == text
  np.testing.assert_array_equal(item["image"], image)
  with pytest.raises(IndexError):
    source[10]
  clone = pickle.loads(pickle.dumps(source))
  assert len(clone) == 10 and repr(clone) == repr(source)
  for i in range(10):
    assert clone[i]["text"] == source[i]["text"]
    np.testing.assert_array_equal(clone[i]["image"], source[i]["image"])
