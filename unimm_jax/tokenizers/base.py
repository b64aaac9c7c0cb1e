"""The tokenizer interfaces, the helpers they share, and the registry of tokenizer kinds.

Every tokenizer works in its own local id space ``0 .. vocab_size - 1``. Where those ids land in the model's
shared vocabulary ``[text ids | image ids | MASK]`` is decided by the vocabulary layout, not here, so a learned
image tokenizer (FSQ, VQ) replaces a pixel or patch one without touching the model.

A kind is one record (:class:`TextKind`, :class:`ImageKind`) that says how to make the tokenizer from a config
(and training captions or images), how to load a saved one, and what the config alone implies about it. For an
image kind that is its geometry::

    downsample(config) = image pixels per token side  d
    grid(config)       = (size / d, size / d)            the token grid (h, w)
    code_feature_dim   = F of ImageTokenizer.code_features()  (model.image_code_features)

so the config checks, the model and a dry run size everything before a tokenizer is fitted, from one place per
kind. A new kind is one ``register_*_kind`` call beside its class; this module imports no JAX (the
configuration imports it before JAX starts), and the learned kinds import theirs only when one is made.

Saving writes ``DIR/text_tokenizer.json`` or ``DIR/image_tokenizer.json`` (plus a kind's own files beside it),
through ``etils.epath`` so ``gs://`` directories work; :func:`load_text_tokenizer` and
:func:`load_image_tokenizer` read them back, dispatching on the saved ``kind``. ``config_dict()`` returns the
settings that define a tokenizer (saved in the JSON) so a caller can check a saved tokenizer against a config.

Out-of-range ids: every ``decode`` raises ValueError naming the first bad id and its position rather than
clipping, because an out-of-range id means a caller mixed up id spaces (e.g. passed global ids or MASK), and
clipping would hide it.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, TYPE_CHECKING

from etils import epath
import numpy as np

if TYPE_CHECKING:
  from ml_collections import ConfigDict

TEXT_TOKENIZER_FILE = 'text_tokenizer.json'
IMAGE_TOKENIZER_FILE = 'image_tokenizer.json'
FORMAT_VERSION = 1
# tokenizer.encoder of the learned kinds (models/autoencoder.py); here so that the configuration and the
# network read one tuple without either importing the other.
TOKENIZER_ENCODERS = ('conv', 'patch')

PathLike = str | epath.PathLike


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def check_ids(ids: np.ndarray, vocab_size: int, who: str) -> None:
  """Raises ValueError naming the first id outside [0, vocab_size)."""
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f'{who}.decode expects integer ids, got dtype {ids.dtype}')
  bad = (ids < 0) | (ids >= vocab_size)
  if bad.any():
    pos = tuple(int(p) for p in np.argwhere(bad)[0])
    raise ValueError(
        f'{who}.decode: id {int(ids[pos])} at position {pos} is outside the '
        f'local vocabulary [0, {vocab_size}); map global ids (and MASK) back '
        'to local ids before decoding'
    )


def in_chunks(fn: Callable[[np.ndarray], Any], x: np.ndarray, batch: int) -> np.ndarray:
  """``fn`` (a function compiled for ``batch`` rows) over ``x`` in chunks of ``batch`` rows, the last chunk padded
  by repeating its last row (every row's result is independent of its chunk), the results concatenated."""
  out = []
  for start in range(0, len(x), batch):
    chunk = x[start:start + batch]
    n = len(chunk)
    if n < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
    out.append(np.asarray(fn(chunk))[:n])
  return np.concatenate(out)


def write_json(path: epath.Path, payload: dict[str, Any]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + '\n')


def read_json(directory: PathLike, filename: str, what: str) -> dict[str, Any]:
  """The saved tokenizer JSON ``directory/filename``; ``what`` ('text' | 'image') names it in errors."""
  path = epath.Path(directory) / filename
  if not path.exists():
    raise FileNotFoundError(
        f'no {what} tokenizer at {path}: fit one and save() it to '
        f'{epath.Path(directory)} first'
    )
  payload = json.loads(path.read_text())
  if payload.get('format_version') != FORMAT_VERSION:
    raise ValueError(
        f'{path}: format_version {payload.get("format_version")!r}, this code '
        f'reads {FORMAT_VERSION}'
    )
  return payload


# ---------------------------------------------------------------------------
# Interfaces
# ---------------------------------------------------------------------------


class TextTokenizer(abc.ABC):
  """Maps captions to int32 ids in `[0, vocab_size)` and back."""

  kind: ClassVar[str]
  pad_id: ClassVar[int] = 0
  unk_id: ClassVar[int | None] = None

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Local ids are 0 .. vocab_size - 1."""

  @abc.abstractmethod
  def _encode_unpadded(self, text: str, max_len: int) -> list[int]:
    """Ids of `text`, at most `max_len` of them, without PAD."""

  @abc.abstractmethod
  def _decode_nonpad(self, ids: np.ndarray) -> str:
    """Text of ids that are all in range and none PAD."""

  def unknown_words(self, text: str) -> list[str]:
    """The words (or pieces) of `text` that encode to UNK, each once, in order; [] for a tokenizer without UNK."""
    del text
    return []

  def config_dict(self) -> dict[str, Any]:
    """Settings that define this tokenizer, as a plain JSON-able dict."""
    return {'kind': self.kind, 'vocab_size': self.vocab_size, 'pad_id': self.pad_id, 'unk_id': self.unk_id}

  def _payload(self) -> dict[str, Any]:
    """Extra state saved beside config_dict() (e.g. the vocabulary)."""
    return {}

  def encode(self, text: str, max_len: int) -> np.ndarray:
    """Truncates to `max_len` ids, then pads with PAD.  # int32 [max_len]"""
    if max_len < 0:
      raise ValueError(f'max_len must be >= 0, got {max_len}')
    out = np.full((max_len,), self.pad_id, np.int32)
    ids = self._encode_unpadded(text, max_len)
    out[: len(ids)] = ids
    return out

  def encode_batch(self, texts: Iterable[str], max_len: int) -> np.ndarray:
    """Encodes each text.  # int32 [N, max_len]"""
    rows = [self.encode(t, max_len) for t in texts]
    if not rows:
      return np.zeros((0, max_len), np.int32)
    return np.stack(rows)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids` (int [L]); every PAD is skipped, wherever it stands.

    Skipping (rather than stopping at the first PAD) keeps whatever words a
    sampler placed after a stray PAD visible. Raises ValueError for ids
    outside [0, vocab_size).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
      raise ValueError(
          f'{type(self).__name__}.decode expects ids of shape [L], got shape '
          f'{ids.shape}; use decode_batch for [N, L]'
      )
    check_ids(ids, self.vocab_size, type(self).__name__)
    return self._decode_nonpad(ids[ids != self.pad_id].astype(np.int64))

  def decode_batch(self, ids: np.ndarray) -> list[str]:
    """Decodes each row of `ids` (int [N, L])."""
    return [self.decode(row) for row in np.asarray(ids)]

  def save(self, directory: PathLike) -> None:
    """Writes `directory/text_tokenizer.json`."""
    payload = {
        'format_version': FORMAT_VERSION,
        'kind': self.kind,
        'config': self.config_dict(),
        **self._payload(),
    }
    write_json(epath.Path(directory) / TEXT_TOKENIZER_FILE, payload)


class ImageTokenizer(abc.ABC):
  """Maps uint8 images [N, H, W, C] to int32 tokens [N, h*w] (row-major)."""

  kind: ClassVar[str]
  image_shape: tuple[int, int, int]  # (H, W, C)
  grid_shape: tuple[int, int]  # (h, w)

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Local ids are 0 .. vocab_size - 1."""

  @property
  def num_tokens(self) -> int:
    return self.grid_shape[0] * self.grid_shape[1]

  @abc.abstractmethod
  def _encode(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] of the right shape -> int32 [N, h*w]."""

  @abc.abstractmethod
  def _decode(self, tokens: np.ndarray) -> np.ndarray:
    """In-range int [N, h*w] -> uint8 [N, H, W, C]."""

  def config_dict(self) -> dict[str, Any]:
    """Settings that define this tokenizer, as a plain JSON-able dict (subclasses add their own)."""
    return {
        'kind': self.kind,
        'size': self.image_shape[0],
        'channels': self.image_shape[2],
        'vocab_size': self.vocab_size,
        'grid_shape': list(self.grid_shape),
    }

  def _save_arrays(self, directory: epath.Path) -> dict[str, Any]:
    """Writes array files beside the JSON; returns entries for the JSON."""
    del directory
    return {}

  def code_features(self) -> np.ndarray:
    """float32 [vocab_size, F]: what each code looks like, as numbers (``model.image_code_features``).

    Tokenizers whose codes have a fixed appearance give it (pixels of a patch code, levels of a pixel code), so
    the network can share what it learns about colours and strokes across codes instead of learning every code's
    embedding from scratch. F is the kind's ``code_feature_dim`` of the config (:class:`ImageKind`).
    """
    raise NotImplementedError(f"the {self.kind!r} image tokenizer has no code features; "
                              "set config.model.image_code_features=False")

  def encode(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> int32 [N, h*w]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise ValueError(
          f'{type(self).__name__}.encode expects images [N, '
          f'{", ".join(map(str, self.image_shape))}], got shape {images.shape}'
      )
    if images.dtype != np.uint8:
      raise ValueError(
          f'{type(self).__name__}.encode expects uint8 images, got dtype '
          f'{images.dtype}'
      )
    return self._encode(images)

  def decode(self, tokens: np.ndarray) -> np.ndarray:
    """int [N, h*w] -> uint8 [N, H, W, C]; ValueError for ids out of range."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != self.num_tokens:
      raise ValueError(
          f'{type(self).__name__}.decode expects tokens [N, {self.num_tokens}],'
          f' got shape {tokens.shape}'
      )
    check_ids(tokens, self.vocab_size, type(self).__name__)
    return self._decode(tokens.astype(np.int64))

  def save(self, directory: PathLike) -> None:
    """Writes `directory/image_tokenizer.json` (+ array files if any)."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        'format_version': FORMAT_VERSION,
        'kind': self.kind,
        'config': self.config_dict(),
        **self._save_arrays(directory),
    }
    write_json(directory / IMAGE_TOKENIZER_FILE, payload)


class CompiledImageTokenizer(ImageTokenizer):
  """An image tokenizer whose encode and decode are compiled functions of ``(self._params, batch)``
  (``_encode_fn``: uint8 [B, H, W, C] -> int [B, h*w]; ``_decode_fn``: int32 [B, h*w] -> uint8 [B, H, W, C]), run
  over chunks of ``encode_batch`` rows (:func:`in_chunks`): the pretrained MAGVIT-v2 and VQ-GAN tokenizers."""

  encode_batch: int
  _params: Any
  _encode_fn: Callable
  _decode_fn: Callable

  def _chunked(self, fn, x: np.ndarray) -> np.ndarray:
    return in_chunks(lambda c: fn(self._params, c), x, self.encode_batch)

  def _encode(self, images: np.ndarray) -> np.ndarray:
    if not len(images):
      return np.zeros((0, self.num_tokens), np.int32)
    return self._chunked(self._encode_fn, images).astype(np.int32)

  def _decode(self, tokens: np.ndarray) -> np.ndarray:
    if not len(tokens):
      return np.zeros((0, *self.image_shape), np.uint8)
    return self._chunked(self._decode_fn, tokens.astype(np.int32))


# ---------------------------------------------------------------------------
# The registry of kinds
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextKind:
  """One text tokenizer kind (``config.text.tokenizer``)."""

  name: str
  # (config, training captions) -> the tokenizer: fitted on them, or built from the config alone.
  make: Callable[[ConfigDict, Sequence[str]], TextTokenizer]
  # (directory, its parsed text_tokenizer.json) -> the saved tokenizer.
  load: Callable[[epath.Path, dict[str, Any]], TextTokenizer]
  # The most ids it can have, from the config alone (a dry run sizes the vocabulary by it); ValueError, naming
  # the field that would bound it, when only fitting tells.
  vocab_bound: Callable[[ConfigDict], int]


def _no_problems(config: ConfigDict, tokenizer: ImageTokenizer) -> list[str]:
  del config, tokenizer
  return []


@dataclasses.dataclass(frozen=True)
class ImageKind:
  """One image tokenizer kind (``config.image.tokenizer``): how to make and load it, and its geometry."""

  name: str
  # (config, training items {'image': uint8 [H, W, C], 'text': str}) -> the tokenizer. Only a ``fitted`` kind
  # reads the items; the others get an empty list.
  make: Callable[[ConfigDict, Sequence[dict[str, Any]]], ImageTokenizer]
  # (directory, its parsed image_tokenizer.json) -> the saved tokenizer.
  load: Callable[[epath.Path, dict[str, Any]], ImageTokenizer]
  downsample: Callable[[ConfigDict], int]       # image pixels per token side
  vocab_bound: Callable[[ConfigDict], int]      # the most ids it can have (a dry run sizes the vocabulary by it)
  # config.image fields its config_dict() repeats; a saved tokenizer must agree with the config on each.
  config_fields: tuple[str, ...]
  # F of ImageTokenizer.code_features(); None: the kind has no code features.
  code_feature_dim: Callable[[ConfigDict], int] | None = None
  # Further disagreements between a config and a saved tokenizer of this kind, one message each.
  check_saved: Callable[[ConfigDict, ImageTokenizer], list[str]] = _no_problems
  fitted: bool = False    # make() fits it to the training items
  learned: bool = False   # trained by tokenizer_main; make() loads it from config.image.tokenizer_path

  has_tokens: bool = True  # False: the 'none' kind of text-only models (no image segment, no image ids)

  def grid(self, config: ConfigDict) -> tuple[int, int]:
    """(h, w) of the token grid: the image side over ``downsample``, both ways ((0, 0) without image tokens)."""
    if not self.has_tokens:
      return 0, 0
    side = config.image.size // self.downsample(config)
    return side, side


TEXT_KINDS: dict[str, TextKind] = {}
IMAGE_KINDS: dict[str, ImageKind] = {}


def register_text_kind(kind: TextKind) -> TextKind:
  if kind.name in TEXT_KINDS:
    raise ValueError(f'text tokenizer kind {kind.name!r} is already registered')
  TEXT_KINDS[kind.name] = kind
  return kind


def register_image_kind(kind: ImageKind) -> ImageKind:
  if kind.name in IMAGE_KINDS:
    raise ValueError(f'image tokenizer kind {kind.name!r} is already registered')
  IMAGE_KINDS[kind.name] = kind
  return kind


def _known(kinds: dict[str, Any]) -> str:
  return ', '.join(repr(name) for name in kinds)


def text_kind(name: str) -> TextKind:
  if name not in TEXT_KINDS:
    raise ValueError(f'unknown text tokenizer kind {name!r}; known: {_known(TEXT_KINDS)}')
  return TEXT_KINDS[name]


def image_kind(name: str) -> ImageKind:
  if name not in IMAGE_KINDS:
    raise ValueError(f'unknown image tokenizer kind {name!r}; known: {_known(IMAGE_KINDS)}')
  return IMAGE_KINDS[name]


def make_text_tokenizer(config: ConfigDict, texts: Sequence[str]) -> TextTokenizer:
  """The text tokenizer ``config.text.tokenizer`` names, fitted on the training captions ``texts`` if it fits."""
  return text_kind(config.text.tokenizer).make(config, texts)


def load_text_tokenizer(directory: PathLike) -> TextTokenizer:
  """Reads `directory/text_tokenizer.json`, dispatching on its 'kind'."""
  return _load(directory, TEXT_TOKENIZER_FILE, 'text', TEXT_KINDS)


def load_image_tokenizer(directory: PathLike) -> ImageTokenizer:
  """Reads `directory/image_tokenizer.json`, dispatching on its 'kind'."""
  return _load(directory, IMAGE_TOKENIZER_FILE, 'image', IMAGE_KINDS)


def _load(directory: PathLike, filename: str, what: str, kinds: dict[str, TextKind] | dict[str, ImageKind]):
  directory = epath.Path(directory)
  payload = read_json(directory, filename, what)
  kind = payload['kind']
  if kind not in kinds:
    raise ValueError(f'{directory / filename}: unknown {what} tokenizer kind {kind!r}; known: {_known(kinds)}')
  return kinds[kind].load(directory, payload)
