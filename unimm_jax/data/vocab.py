"""The one vocabulary layout shared by the model, the loss, the samplers and the pipeline.

All token ids of a sequence live in one embedding table with disjoint ranges::

    [ text ids: 0 .. T-1 | image ids: T .. T+I-1 | MASK: T+I ]      total = T + I + 1

and one sequence is ``[text_0 .. text_{L-1} | image_0 .. image_{N-1}]``. The tokenizers work in their own
local id spaces starting at 0; this module is the only place that adds or removes the offsets, so there is
one source of truth for them (STYLE.md, habit 3).
"""

from __future__ import annotations

import dataclasses

import numpy as np

TEXT, IMAGE = 0, 1  # modality ids, as used by the modality embedding and per-modality losses
MODALITIES = ("text", "image")


@dataclasses.dataclass(frozen=True)
class VocabLayout:
  """Id ranges and sequence layout of the joint model.

  Attributes:
    text_vocab: number of text ids (the text tokenizer's vocabulary, PAD included).
    image_vocab: number of image ids (the image tokenizer's codebook).
    text_len: text positions per sequence (``text.max_len``).
    image_grid: (h, w) of the image token grid.
  """

  text_vocab: int
  image_vocab: int
  text_len: int
  image_grid: tuple[int, int]

  def __post_init__(self):
    for name in ("text_vocab", "image_vocab", "text_len"):
      if getattr(self, name) <= 0:
        raise ValueError(f"VocabLayout.{name} must be positive, got {getattr(self, name)}")
    object.__setattr__(self, "image_grid", tuple(int(x) for x in self.image_grid))

  # ---- ids -------------------------------------------------------------------------------------
  @property
  def text_offset(self) -> int:
    return 0

  @property
  def image_offset(self) -> int:
    return self.text_vocab

  @property
  def mask_id(self) -> int:
    return self.text_vocab + self.image_vocab

  @property
  def size(self) -> int:
    """Rows of the embedding table: text + image + MASK."""
    return self.text_vocab + self.image_vocab + 1

  # ---- sequence --------------------------------------------------------------------------------
  @property
  def image_len(self) -> int:
    return self.image_grid[0] * self.image_grid[1]

  @property
  def seq_len(self) -> int:
    return self.text_len + self.image_len

  def modality_ids(self) -> np.ndarray:
    """int32 [S]: TEXT for text positions, IMAGE for image positions."""
    return np.concatenate([np.full(self.text_len, TEXT, np.int32), np.full(self.image_len, IMAGE, np.int32)])

  def allowed_ids(self) -> np.ndarray:
    """bool [S, V]: the ids position s may predict (its own modality's range; never MASK)."""
    allowed = np.zeros((self.seq_len, self.size), bool)
    allowed[: self.text_len, : self.text_vocab] = True
    allowed[self.text_len :, self.image_offset : self.mask_id] = True
    return allowed

  def pack(self, text_ids: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
    """Local ids -> one global sequence.

    Args:
      text_ids: int [..., text_len] in [0, text_vocab).
      image_ids: int [..., image_len] in [0, image_vocab).
    Returns:
      int32 [..., seq_len].
    """
    text_ids = np.asarray(text_ids)
    image_ids = np.asarray(image_ids)
    if text_ids.shape[-1] != self.text_len or image_ids.shape[-1] != self.image_len:
      raise ValueError(
          f"pack expects text [..., {self.text_len}] and image [..., {self.image_len}], "
          f"got {text_ids.shape} and {image_ids.shape}")
    return np.concatenate([text_ids, image_ids + self.image_offset], axis=-1).astype(np.int32)

  def unpack(self, tokens):
    """Global sequence -> (text ids, image ids) in local spaces; MASK stays ``-1`` in both.

    Works on numpy and jax arrays. tokens: int [..., seq_len].
    """
    xp = np if isinstance(tokens, np.ndarray) else _jnp()
    text = tokens[..., : self.text_len]
    image = tokens[..., self.text_len :]
    text = xp.where(text == self.mask_id, -1, text - self.text_offset)
    image = xp.where(image == self.mask_id, -1, image - self.image_offset)
    return text, image

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _jnp():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp
