"""Text and image tokenizers behind one small interface.

Every tokenizer works in its own local id space `0 .. vocab_size - 1`. Where
those ids land in the model's shared vocabulary `[text ids | image ids | MASK]`
is decided by the vocabulary layout module, not here, so a learned image
tokenizer (FSQ, VQ) can replace the ones below without touching the model.

Text:
  WordTokenizer   lowercase words and punctuation of the training captions,
                  plus PAD (0) and UNK (1); fitted.
  ByteTokenizer   UTF-8 bytes: PAD (0), byte b -> b + 1; vocab 257.
  SentencePieceTokenizer  a sentencepiece model (unigram or BPE) trained on the
                  training captions, or a given .model file: PAD (0), piece
                  p -> p + 1; fitted.

Image:
  PixelTokenizer  one token per pixel: its C quantized values combined
                  into one id; vocab levels**C.
  PatchTokenizer  one token per patch x patch block of quantized pixels,
                  looked up in a codebook of the most frequent training patches
                  (nearest code by L2 for unseen patches); fitted.

PAD is a real text token: captions are padded to `max_len` with it and the
model learns to produce it, so generated captions end on their own.

Saving writes `DIR/text_tokenizer.json` or `DIR/image_tokenizer.json` (plus
`DIR/image_tokenizer_codebook.npy` for the patch codebook); every file goes
through `etils.epath`, so `gs://` directories work. `config_dict()` returns the
settings that define a tokenizer (saved in the JSON) so a caller can check a
saved tokenizer against a run's config.

Out-of-range ids: every `decode` raises ValueError naming the first bad id and
its position rather than clipping, because an out-of-range id means a caller
mixed up id spaces (e.g. passed global ids or MASK), and clipping would hide it.
"""

from __future__ import annotations

import abc
import collections
import io
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from etils import epath
import numpy as np

TEXT_TOKENIZER_FILE = 'text_tokenizer.json'
SENTENCEPIECE_FILE = 'text_tokenizer.model'
IMAGE_TOKENIZER_FILE = 'image_tokenizer.json'
CODEBOOK_FILE = 'image_tokenizer_codebook.npy'
_FORMAT_VERSION = 1

PathLike = str | epath.PathLike


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def _check_ids(ids: np.ndarray, vocab_size: int, who: str) -> None:
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


def _write_json(path: epath.Path, payload: dict[str, Any]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + '\n')


def _read_json(directory: PathLike, filename: str, what: str) -> dict[str, Any]:
  path = epath.Path(directory) / filename
  if not path.exists():
    raise FileNotFoundError(
        f'no {what} tokenizer at {path}: fit one and save() it to '
        f'{epath.Path(directory)} first'
    )
  payload = json.loads(path.read_text())
  if payload.get('format_version') != _FORMAT_VERSION:
    raise ValueError(
        f'{path}: format_version {payload.get("format_version")!r}, this code '
        f'reads {_FORMAT_VERSION}'
    )
  return payload


# ---------------------------------------------------------------------------
# Text tokenizers
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
    _check_ids(ids, self.vocab_size, type(self).__name__)
    return self._decode_nonpad(ids[ids != self.pad_id].astype(np.int64))

  def decode_batch(self, ids: np.ndarray) -> list[str]:
    """Decodes each row of `ids` (int [N, L])."""
    return [self.decode(row) for row in np.asarray(ids)]

  def save(self, directory: PathLike) -> None:
    """Writes `directory/text_tokenizer.json`."""
    payload = {
        'format_version': _FORMAT_VERSION,
        'kind': self.kind,
        'config': self.config_dict(),
        **self._payload(),
    }
    _write_json(epath.Path(directory) / TEXT_TOKENIZER_FILE, payload)


# Words keep inner apostrophes and hyphens ("don't", "top-left") so that the
# decoder's spacing rule below reproduces them; every other non-space,
# non-word character is its own token.
_WORD_RE = re.compile(r"\w+(?:['\-]\w+)*|[^\w\s]")
# Opening brackets attach to the following token, all other punctuation to the
# previous one: "top left: a (red) circle, small" survives decode(encode(.)).
_OPENING = frozenset('([{')
_PAD_TOKEN = '<pad>'
_UNK_TOKEN = '<unk>'


def split_words(text: str) -> list[str]:
  """Lowercase words and single punctuation characters of `text`.

  "Top left: a red circle, small" ->
  ['top', 'left', ':', 'a', 'red', 'circle', ',', 'small']
  """
  return _WORD_RE.findall(text.lower())


def _is_punct(token: str) -> bool:
  return len(token) == 1 and not (token.isalnum() or token == '_')


def join_words(tokens: Sequence[str]) -> str:
  """Inverse of split_words on normalised text (lowercase, single spaces,

  punctuation attached to the previous word, opening brackets to the next).
  """
  out: list[str] = []
  glue_next = True  # no space before the first token
  for tok in tokens:
    if out and not glue_next and not (_is_punct(tok) and tok not in _OPENING):
      out.append(' ')
    out.append(tok)
    glue_next = tok in _OPENING
  return ''.join(out)


class WordTokenizer(TextTokenizer):
  """Lowercase words and punctuation of the training captions.

  Ids: PAD 0, UNK 1, then the fitted tokens by frequency (desc), ties broken
  alphabetically, so fitting the same captions always gives the same ids.
  `decode(encode(x)) == x` for normalised captions (see `join_words`); UNK
  decodes to '<unk>'.
  """

  kind = 'word'
  pad_id = 0
  unk_id = 1

  def __init__(self, vocab: Sequence[str], max_vocab: int | None = None):
    """`vocab`: tokens in id order, starting with '<pad>', '<unk>'."""
    vocab = list(vocab)
    if vocab[:2] != [_PAD_TOKEN, _UNK_TOKEN]:
      raise ValueError(
          f"vocab must start with {_PAD_TOKEN!r}, {_UNK_TOKEN!r}; got {vocab[:2]}"
      )
    if len(set(vocab)) != len(vocab):
      raise ValueError('vocab has duplicate tokens')
    self._vocab = vocab
    self._ids = {tok: i for i, tok in enumerate(vocab)}
    self._max_vocab = max_vocab

  @classmethod
  def fit(
      cls, texts: Iterable[str], max_vocab: int | None = None
  ) -> WordTokenizer:
    """Vocabulary of `texts`; `max_vocab` caps the total size incl. PAD, UNK."""
    if max_vocab is not None and max_vocab < 2:
      raise ValueError(f'max_vocab must be >= 2 (PAD and UNK), got {max_vocab}')
    counts = collections.Counter()
    for text in texts:
      counts.update(split_words(text))
    ranked = sorted(counts, key=lambda tok: (-counts[tok], tok))
    if max_vocab is not None:
      ranked = ranked[: max_vocab - 2]
    return cls([_PAD_TOKEN, _UNK_TOKEN, *ranked], max_vocab=max_vocab)

  @property
  def vocab_size(self) -> int:
    return len(self._vocab)

  @property
  def vocab(self) -> list[str]:
    return list(self._vocab)

  def _encode_unpadded(self, text: str, max_len: int) -> list[int]:
    return [self._ids.get(t, self.unk_id) for t in split_words(text)[:max_len]]

  def _decode_nonpad(self, ids: np.ndarray) -> str:
    return join_words([self._vocab[i] for i in ids])

  def config_dict(self) -> dict[str, Any]:
    return {**super().config_dict(), 'max_vocab': self._max_vocab}

  def _payload(self) -> dict[str, Any]:
    return {'vocab': self._vocab}


class ByteTokenizer(TextTokenizer):
  """UTF-8 bytes: PAD 0, byte b -> b + 1; vocab 257; no fitting, no UNK.

  Truncation backs off to a character boundary so a cut never leaves half of
  a multi-byte character; decode uses errors='replace' so any ids decode.
  """

  kind = 'byte'
  pad_id = 0
  unk_id = None

  @property
  def vocab_size(self) -> int:
    return 257

  def _encode_unpadded(self, text: str, max_len: int) -> list[int]:
    data = text.encode('utf-8')
    if len(data) > max_len:
      cut = max_len
      # 0b10xxxxxx marks a continuation byte: the cut is inside a character.
      while cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
      data = data[:cut]
    return [b + 1 for b in data]

  def _decode_nonpad(self, ids: np.ndarray) -> str:
    return bytes((ids - 1).astype(np.uint8).tolist()).decode(
        'utf-8', errors='replace'
    )


class SentencePieceTokenizer(TextTokenizer):
  """Subword pieces of a sentencepiece model: PAD 0, piece p -> p + 1.

  Shifting every piece by one keeps PAD = 0 whatever the model (one trained
  here has no pad piece; a given .model file may or may not), so the same rule
  serves both. Models trained here have UNK (piece 0, id 1) and no BOS/EOS:
  captions are padded, and the model learns where they end from PAD.
  `decode(encode(x)) == x` for text that is already in sentencepiece's
  normal form (NFKC, single spaces, no leading/trailing space).
  """

  kind = 'sentencepiece'
  pad_id = 0

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self.unk_id = self._sp.unk_id() + 1 if self._sp.unk_id() >= 0 else None

  @classmethod
  def fit(cls, texts: Iterable[str], vocab_size: int,
          model_type: str = 'unigram') -> SentencePieceTokenizer:
    """Trains a model of at most `vocab_size` pieces on `texts` (in memory).

    `vocab_size` is an upper bound (hard_vocab_limit off): a small corpus
    gets the pieces it can support instead of an error.
    """
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if model_type not in ('unigram', 'bpe'):
      raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    texts = [t for t in texts if t.strip()]
    if not texts:
      raise ValueError('SentencePieceTokenizer.fit needs at least one non-empty caption')
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=out, vocab_size=vocab_size,
        model_type=model_type, hard_vocab_limit=False, character_coverage=1.0,
        pad_id=-1, unk_id=0, bos_id=-1, eos_id=-1, num_threads=1,
        minloglevel=2,  # its progress log is a screenful per fit
    )
    return cls(out.getvalue())

  @classmethod
  def from_file(cls, path: PathLike) -> SentencePieceTokenizer:
    path = epath.Path(path)
    if not path.exists():
      raise FileNotFoundError(f'config.text.sentencepiece_model: no file {path}')
    return cls(path.read_bytes())

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size() + 1

  def _encode_unpadded(self, text: str, max_len: int) -> list[int]:
    return [i + 1 for i in self._sp.encode(text)[:max_len]]

  def _decode_nonpad(self, ids: np.ndarray) -> str:
    return self._sp.decode([int(i) - 1 for i in ids])

  def save(self, directory: PathLike) -> None:
    """Writes the model file beside `text_tokenizer.json`."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SENTENCEPIECE_FILE).write_bytes(self._proto)
    super().save(directory)

  def _payload(self) -> dict[str, Any]:
    return {'model_file': SENTENCEPIECE_FILE}


def load_text_tokenizer(directory: PathLike) -> TextTokenizer:
  """Reads `directory/text_tokenizer.json`, dispatching on its 'kind'."""
  payload = _read_json(directory, TEXT_TOKENIZER_FILE, 'text')
  kind = payload['kind']
  if kind == 'word':
    return WordTokenizer(payload['vocab'], payload['config'].get('max_vocab'))
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'sentencepiece':
    tok = SentencePieceTokenizer.from_file(epath.Path(directory) / payload['model_file'])
    if tok.vocab_size != payload['config']['vocab_size']:
      raise ValueError(f'{epath.Path(directory) / payload["model_file"]} has {tok.vocab_size} ids, '
                       f'{TEXT_TOKENIZER_FILE} says {payload["config"]["vocab_size"]}')
    return tok
  raise ValueError(
      f'{epath.Path(directory) / TEXT_TOKENIZER_FILE}: unknown text tokenizer '
      f"kind {kind!r}; known: 'word', 'byte', 'sentencepiece'"
  )


# ---------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------


def _check_levels(levels: int) -> None:
  if not 2 <= levels <= 256:
    raise ValueError(f'levels must be in [2, 256], got {levels}')


def quantize(images: np.ndarray, levels: int) -> np.ndarray:
  """uint8 values -> level indices: round(v * (levels - 1) / 255), half up.

  The nearest of the evenly spaced values that `dequantize` produces, so
  `quantize(dequantize(q)) == q` for every `levels` in [2, 256] (the floor rule
  floor(v * levels / 256) breaks this for e.g. levels = 28, 34, 36, ...) and
  the reconstruction error is the smallest possible for that decoder.
  # uint8 [...] -> uint8 [...] in [0, levels)
  """
  _check_levels(levels)
  v = np.asarray(images).astype(np.int32)
  return ((v * (2 * (levels - 1)) + 255) // 510).astype(np.uint8)


def dequantize(q: np.ndarray, levels: int) -> np.ndarray:
  """Level index -> uint8: round(q * 255 / (levels - 1)), half up.

  0 and 255 survive exactly.  # int [...] in [0, levels) -> uint8 [...]
  """
  _check_levels(levels)
  q = np.asarray(q).astype(np.int32)
  return ((q * 510 + (levels - 1)) // (2 * (levels - 1))).astype(np.uint8)


# ---------------------------------------------------------------------------
# Image tokenizers
# ---------------------------------------------------------------------------


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
    embedding from scratch.
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
    _check_ids(tokens, self.vocab_size, type(self).__name__)
    return self._decode(tokens.astype(np.int64))

  def save(self, directory: PathLike) -> None:
    """Writes `directory/image_tokenizer.json` (+ array files if any)."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        'format_version': _FORMAT_VERSION,
        'kind': self.kind,
        'config': self.config_dict(),
        **self._save_arrays(directory),
    }
    _write_json(directory / IMAGE_TOKENIZER_FILE, payload)


def _patchify(q: np.ndarray, patch: int) -> np.ndarray:
  """[N, S, S, C] -> [N * (S/p)^2, p*p*C]; patches row-major, pixels too."""
  n, s, _, c = q.shape
  g = s // patch
  x = q.reshape(n, g, patch, g, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return np.ascontiguousarray(x).reshape(n * g * g, patch * patch * c)


def _unpatchify(rows: np.ndarray, n: int, size: int, patch: int, c: int):
  """Inverse of _patchify: [N * g*g, p*p*C] -> [N, S, S, C]."""
  g = size // patch
  x = rows.reshape(n, g, g, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, size, size, c)


class PixelTokenizer(ImageTokenizer):
  """One token per pixel: id = sum_c q_c * levels**(C - 1 - c).

  vocab levels**channels, grid (size, size).
  """

  kind = 'pixel'

  def __init__(self, size: int, channels: int, levels: int):
    _check_levels(levels)
    if channels not in (1, 3):
      raise ValueError(f'channels must be 1 or 3, got {channels}')
    if size < 1:
      raise ValueError(f'size must be >= 1, got {size}')
    self.size, self.channels, self.levels = size, channels, levels
    self.image_shape = (size, size, channels)
    self.grid_shape = (size, size)
    # Channel 0 is the most significant digit.
    self._weights = levels ** np.arange(channels - 1, -1, -1, dtype=np.int64)

  @property
  def vocab_size(self) -> int:
    return self.levels**self.channels

  def _encode(self, images):
    q = quantize(images, self.levels).astype(np.int64)
    ids = q @ self._weights  # [N, S, S]
    return ids.reshape(len(images), -1).astype(np.int32)

  def code_features(self):
    """Each code's pixel value, centred: [levels**C, C] in [-0.5, 0.5]."""
    digits = (np.arange(self.vocab_size)[:, None] // self._weights) % self.levels
    return (dequantize(digits, self.levels).astype(np.float32) / 255.0 - 0.5)

  def _decode(self, tokens):
    digits = (tokens[..., None] // self._weights) % self.levels  # [N, S*S, C]
    return dequantize(digits, self.levels).reshape(-1, *self.image_shape)

  def config_dict(self):
    return {**super().config_dict(), 'levels': self.levels}


class PatchTokenizer(ImageTokenizer):
  """One token per patch x patch block of quantized pixels, via a codebook.

  The codebook holds the `codebook_size` most frequent distinct quantized
  patches of the training images (ties broken by the patch's bytes, so fitting
  is deterministic); code 0 is the most frequent. Encoding looks a patch up
  exactly (dict from bytes to id) and falls back to the nearest code by L2
  over quantized values (lowest id on ties), computed in exact arithmetic and
  memoised, because the same unseen patches recur every epoch.
  vocab_size is the actual number of codes (<= codebook_size).
  """

  kind = 'patch'
  # Rows x codes x dims per distance matmul. Small enough that BLAS runs it on
  # one thread (OpenBLAS threads above ~2**18-2**19): a multithreaded call
  # from a busy data pipeline stalls waiting on its own threads (64 unseen
  # images, loaded 2-CPU machine: median 2.9 ms, worst 9 ms at this budget;
  # median 4.6-24 ms, worst 60-500 ms with larger ones), and grain's threads
  # already give parallelism.
  _MATMUL_BUDGET = 1 << 18
  # Extra memo entries (unseen patch -> nearest code): ~200 B each, ~50 MiB.
  _MEMO_LIMIT = 1 << 18

  def __init__(
      self,
      size: int,
      channels: int,
      levels: int,
      patch: int,
      codebook: np.ndarray,
      codebook_size: int | None = None,
  ):
    """`codebook`: uint8 [K, patch*patch*channels] level indices, distinct."""
    _check_levels(levels)
    if channels not in (1, 3):
      raise ValueError(f'channels must be 1 or 3, got {channels}')
    if patch < 1 or size % patch:
      raise ValueError(
          f'image size {size} must be a multiple of patch {patch}'
      )
    codebook = np.asarray(codebook, np.uint8)
    dim = patch * patch * channels
    if codebook.ndim != 2 or codebook.shape[1] != dim or not len(codebook):
      raise ValueError(
          f'codebook must be uint8 [K >= 1, {dim}], got shape {codebook.shape}'
      )
    if codebook.max() >= levels:
      raise ValueError(
          f'codebook holds level {codebook.max()} >= levels {levels}'
      )
    self.size, self.channels, self.levels, self.patch = (
        size, channels, levels, patch)
    self.codebook_size = (
        len(codebook) if codebook_size is None else codebook_size)
    self.image_shape = (size, size, channels)
    self.grid_shape = (size // patch, size // patch)
    self.codebook = np.ascontiguousarray(codebook)  # uint8 [K, p*p*C]
    # Patch bytes -> id: the codebook's own patches, then (up to _MEMO_LIMIT
    # more) the nearest-code answers already computed, since the same unseen
    # patches come back every epoch.
    self._memo = {row.tobytes(): i for i, row in enumerate(self.codebook)}
    if len(self._memo) != len(codebook):
      raise ValueError('codebook rows must be distinct')
    # float32 distances are exact while every intermediate is an integer
    # below 2**24; otherwise use float64 (exact below 2**53).
    exact32 = 2 * dim * (levels - 1) ** 2 < 2**24
    dtype = np.float32 if exact32 else np.float64
    self._codes_t = np.ascontiguousarray(self.codebook.T, dtype=dtype)  # [D, K]
    self._code_sq = (self.codebook.astype(dtype) ** 2).sum(1)  # [K]

  @classmethod
  def fit(
      cls,
      images: np.ndarray,
      size: int,
      channels: int,
      levels: int,
      patch: int,
      codebook_size: int,
  ) -> PatchTokenizer:
    """Codebook of the most frequent patches of `images` (uint8 [N,S,S,C])."""
    images = np.asarray(images)
    if (images.ndim != 4 or images.shape[1:] != (size, size, channels)
        or images.dtype != np.uint8 or not len(images)):
      raise ValueError(
          f'PatchTokenizer.fit expects uint8 images [N >= 1, {size}, {size}, '
          f'{channels}], got {images.dtype} {images.shape}'
      )
    if size % patch:
      raise ValueError(f'image size {size} must be a multiple of patch {patch}')
    if codebook_size < 1:
      raise ValueError(f'codebook_size must be >= 1, got {codebook_size}')
    rows = _patchify(quantize(images, levels), patch)
    # A void view makes each row one hashable/sortable item: np.unique sorts
    # rows by their bytes, and the stable sort keeps that order among ties.
    keys = rows.view(np.dtype((np.void, rows.shape[1]))).ravel()
    uniq, counts = np.unique(keys, return_counts=True)
    order = np.argsort(-counts, kind='stable')[:codebook_size]
    codebook = uniq[order].view(np.uint8).reshape(len(order), rows.shape[1])
    return cls(size, channels, levels, patch, codebook, codebook_size)

  @property
  def vocab_size(self) -> int:
    return len(self.codebook)

  def nearest_codes(self, rows: np.ndarray) -> np.ndarray:
    """Nearest code by L2 of each row (uint8 [M, D] levels); lowest id on ties.

    # int32 [M]
    """
    out = np.empty(len(rows), np.int32)
    chunk = max(1, self._MATMUL_BUDGET // self._codes_t.size)
    for start in range(0, len(rows), chunk):
      x = rows[start:start + chunk].astype(self._codes_t.dtype)
      d = x @ self._codes_t  # [chunk, K]
      d *= -2.0
      d += self._code_sq  # |x - c|^2 - |x|^2: same argmin, one pass fewer
      out[start:start + chunk] = d.argmin(1)
    return out

  def _encode(self, images):
    rows = _patchify(quantize(images, self.levels), self.patch)  # [M, D]
    dim = rows.shape[1]
    flat = rows.tobytes()
    keys = [flat[i:i + dim] for i in range(0, len(flat), dim)]
    memo = self._memo
    ids = np.fromiter((memo.get(k, -1) for k in keys), np.int32, count=len(keys))
    miss = np.flatnonzero(ids < 0)
    if len(miss):
      # Each distinct unseen patch once.
      uniq, first, inverse = np.unique(
          rows[miss].view(np.dtype((np.void, dim))).ravel(),
          return_index=True, return_inverse=True)
      near = self.nearest_codes(rows[miss[first]])
      ids[miss] = near[inverse.ravel()]
      if len(memo) < len(self.codebook) + self._MEMO_LIMIT:
        memo.update(zip((keys[j] for j in miss[first]), near.tolist()))
    return ids.reshape(len(images), self.num_tokens)

  def code_features(self):
    """Each code's patch pixels, centred: [K, patch * patch * C] in [-0.5, 0.5]."""
    return dequantize(self.codebook, self.levels).astype(np.float32) / 255.0 - 0.5

  def _decode(self, tokens):
    rows = self.codebook[tokens.reshape(-1)]
    q = _unpatchify(rows, len(tokens), self.size, self.patch, self.channels)
    return dequantize(q, self.levels)

  def config_dict(self):
    return {**super().config_dict(), 'levels': self.levels, 'patch': self.patch,
            'codebook_size': self.codebook_size}

  def _save_arrays(self, directory):
    buf = io.BytesIO()
    np.save(buf, self.codebook)
    (directory / CODEBOOK_FILE).write_bytes(buf.getvalue())
    return {'codebook_file': CODEBOOK_FILE}


def load_image_tokenizer(directory: PathLike) -> ImageTokenizer:
  """Reads `directory/image_tokenizer.json`, dispatching on its 'kind'."""
  directory = epath.Path(directory)
  payload = _read_json(directory, IMAGE_TOKENIZER_FILE, 'image')
  kind, cfg = payload['kind'], payload['config']
  if kind == 'pixel':
    return PixelTokenizer(cfg['size'], cfg['channels'], cfg['levels'])
  if kind == 'patch':
    path = directory / payload['codebook_file']
    if not path.exists():
      raise FileNotFoundError(f'patch tokenizer codebook missing: {path}')
    codebook = np.load(io.BytesIO(path.read_bytes()))
    tok = PatchTokenizer(cfg['size'], cfg['channels'], cfg['levels'],
                         cfg['patch'], codebook, cfg['codebook_size'])
    if tok.vocab_size != cfg['vocab_size']:
      raise ValueError(
          f'{path} holds {tok.vocab_size} codes, {directory / IMAGE_TOKENIZER_FILE}'
          f' says vocab_size {cfg["vocab_size"]}'
      )
    return tok
  if kind in ('fsq', 'vq'):
    # Imported here: the learned tokenizer needs JAX, the others only numpy.
    from unimm_jax.data import learned_tokenizer  # pylint: disable=g-import-not-at-top
    return learned_tokenizer.load(directory, payload)
  raise ValueError(
      f'{directory / IMAGE_TOKENIZER_FILE}: unknown image tokenizer kind '
      f"{kind!r}; known: 'pixel', 'patch', 'fsq', 'vq'"
  )
