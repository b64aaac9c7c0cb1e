"""The sequence layout: segments, id ranges, positions, allowed ids, pack/unpack, and the config's segments."""

import dataclasses
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax import configuration, sequence
from unimm_jax.sequence import SequenceLayout

TWO = SequenceLayout.two_segment(text_vocab=13, image_vocab=9, text_len=5, image_grid=(3, 4))
# An editing-like layout with special tokens: [<edit> | instruction | <boi> | source | target]
EDIT = SequenceLayout((sequence.special("task", "<edit>"), sequence.text("instruction", 4),
                       sequence.special("boi", "<boi>"), sequence.image("source", (2, 2)),
                       sequence.image("target", (2, 2))), text_vocab=10, image_vocab=6)


def test_two_segment_layout_keeps_the_ids_and_offsets_of_before():
  assert TWO.mask_id == 13 + 9 and TWO.size == 13 + 9 + 1 and TWO.seq_len == 5 + 12
  assert TWO.id_range("text") == (0, 13) and TWO.id_range("image") == (13, 22)
  assert TWO.span("text") == (0, 5) and TWO.span("image") == (5, 17) and TWO.is_two_segment()
  np.testing.assert_array_equal(TWO.modality_ids(), [0] * 5 + [1] * 12)
  np.testing.assert_array_equal(TWO.segment_ids(), [0] * 5 + [1] * 12)
  pos = TWO.positions()
  np.testing.assert_array_equal(pos[:5], [[i, i] for i in range(5)])
  np.testing.assert_array_equal(pos[5:9], [[0, 0], [0, 1], [0, 2], [0, 3]])
  np.testing.assert_array_equal(pos[-1], [2, 3])


def test_special_tokens_sit_between_the_image_ids_and_mask():
  assert EDIT.specials == ("<edit>", "<boi>")
  assert EDIT.special_id("<edit>") == 16 and EDIT.special_id("<boi>") == 17 and EDIT.mask_id == 18
  fixed = EDIT.fixed_tokens()
  assert fixed[0] == 16 and fixed[5] == 17 and (fixed[[1, 2, 3, 4]] == -1).all() and (fixed[6:] == -1).all()
  assert EDIT.of_modality("image") == ("source", "target") and EDIT.modalities == ("text", "image", "special")
  # Each image segment has its own 2-D grid positions; each text or special segment starts at 0.
  np.testing.assert_array_equal(EDIT.positions()[6:10], EDIT.positions()[10:14])
  np.testing.assert_array_equal(EDIT.positions()[1:5, 0], [0, 1, 2, 3])


@pytest.mark.parametrize("layout", [TWO, EDIT])
def test_allowed_ids_from_iota_comparisons_match_the_modality_ranges(layout):
  got_np = layout.allowed_ids()
  got_jnp = np.asarray(layout.allowed_ids(jnp))
  np.testing.assert_array_equal(got_np, got_jnp)
  want = np.zeros((layout.seq_len, layout.size), bool)
  for seg in layout.segments:
    if seg.modality != "special":
      lo, hi = layout.span(seg.name)
      want[lo:hi, slice(*layout.id_range(seg.modality))] = True
  np.testing.assert_array_equal(got_np, want)
  assert not got_np[:, layout.mask_id].any()
  masks = layout.modality_masks(jnp)
  for m in layout.modalities:
    np.testing.assert_array_equal(np.asarray(masks[m]), layout.modality_ids() == sequence.MODALITY_ID[m])


def test_pack_unpack_round_trip_with_masks_and_specials():
  rng = np.random.default_rng(0)
  values = {"instruction": rng.integers(0, 10, (3, 4)), "source": rng.integers(0, 6, (3, 4)),
            "target": rng.integers(-1, 6, (3, 4))}
  seq = EDIT.pack(values)
  assert seq.shape == (3, EDIT.seq_len) and (seq[:, 0] == 16).all() and (seq[:, 5] == 17).all()
  back = EDIT.unpack(seq)
  assert set(back) == {"instruction", "source", "target"}
  for name, ids in values.items():
    np.testing.assert_array_equal(back[name], ids)
  assert (EDIT.pack({"source": values["source"]})[:, EDIT.positions_of(["target"])] == EDIT.mask_id).all()
  split = EDIT.split(seq)
  np.testing.assert_array_equal(split["source"], values["source"] + 10)
  with pytest.raises(ValueError, match="special segment 'task'"):
    EDIT.pack({"task": np.zeros((3, 1), int)})
  with pytest.raises(KeyError, match="no segment"):
    EDIT.pack({"caption": np.zeros((3, 4), int)})
  with pytest.raises(ValueError, match=r"segment 'source' holds 4 tokens"):
    EDIT.pack({"source": np.zeros((3, 5), int)})
  with pytest.raises(ValueError, match=r"local ids must be in \[0, 6\)"):
    EDIT.pack({"source": np.full((3, 4), 6)})


def test_bad_layouts_are_clear_errors():
  with pytest.raises(ValueError, match="unique"):
    SequenceLayout((sequence.text("a", 2), sequence.text("a", 3)), 5, 5)
  with pytest.raises(ValueError, match="one grid"):
    SequenceLayout((sequence.image("a", (2, 2)), sequence.image("b", (3, 3))), 5, 5)
  with pytest.raises(ValueError, match="modality 'audio'"):
    sequence.Segment("a", "audio", 3)


def test_config_segments_default_to_text_image_and_parse():
  config = configuration.base_config()
  assert sequence.from_config(config, 20, 30, (6, 6)) == SequenceLayout.two_segment(20, 30, config.text.max_len,
                                                                                     (6, 6), id_align=128)
  config.sequence.segments = (("question", "text", 8), ("image", "image"), ("answer", "text"), ("eoa", "special", "<eoa>"))
  lay = sequence.from_config(config, 20, 30, (6, 6))
  assert lay.names == ("question", "image", "answer", "eoa") and lay.segment("answer").length == config.text.max_len
  assert lay.seq_len == 8 + 36 + config.text.max_len + 1
  assert lay.id_range("image") == (128, 158) and lay.special_id("<eoa>") == 256 and lay.mask_id == 257
  config.sequence.id_align = 1   # packed ranges, as before the option
  assert sequence.from_config(config, 20, 30, (6, 6)).mask_id == 51
  with pytest.raises(ValueError, match="an image segment is"):
    sequence.parse_segments((("image", "image", 3),), 8, (6, 6))


def test_aligned_id_ranges_start_on_lane_boundaries_and_the_gaps_are_never_used():
  layout = SequenceLayout((sequence.text("caption", 5), sequence.image("image", (2, 3)),
                           sequence.special("eoi", "<eoi>")), text_vocab=257, image_vocab=1000, id_align=128)
  assert layout.id_range("text") == (0, 257)
  assert layout.id_range("image") == (384, 1384) and layout.id_range("special") == (1408, 1409)
  assert layout.mask_id == 1409 and layout.size == 1410
  allowed = layout.allowed_ids(np)                              # bool [S, V]
  gaps = np.r_[257:384, 1384:1408]
  assert not allowed[:, gaps].any()
  tokens = layout.random_tokens(np.random.default_rng(0), 64)
  assert not np.isin(tokens, gaps).any() and not (tokens == layout.mask_id).any()
  packed = dataclasses.replace(layout, id_align=1)
  assert packed.id_range("image") == (257, 1257) and packed.mask_id == 1258
