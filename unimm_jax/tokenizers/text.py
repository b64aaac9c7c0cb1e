"""The text tokenizers: word, byte and sentencepiece (each registered as a kind in ``base``).

  WordTokenizer   lowercase words and punctuation of the training captions,
                  plus PAD (0) and UNK (1); fitted.
  ByteTokenizer   UTF-8 bytes: PAD (0), byte b -> b + 1; vocab 257.
  SentencePieceTokenizer  a sentencepiece model (unigram or BPE) trained on the
                  training captions, or a given .model file: PAD (0), piece
                  p -> p + 1; fitted.

PAD is a real text token: captions are padded to `max_len` with it and the
model learns to produce it, so generated captions end on their own.
"""

from __future__ import annotations

import collections
import io
import re
from collections.abc import Iterable, Sequence
from typing import Any

from etils import epath
import numpy as np

from unimm_jax.tokenizers import base

SENTENCEPIECE_FILE = 'text_tokenizer.model'


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


class WordTokenizer(base.TextTokenizer):
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

  def unknown_words(self, text: str) -> list[str]:
    return [t for t in dict.fromkeys(split_words(text)) if t not in self._ids]

  def _decode_nonpad(self, ids: np.ndarray) -> str:
    return join_words([self._vocab[i] for i in ids])

  def config_dict(self) -> dict[str, Any]:
    return {**super().config_dict(), 'max_vocab': self._max_vocab}

  def _payload(self) -> dict[str, Any]:
    return {'vocab': self._vocab}


class ByteTokenizer(base.TextTokenizer):
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


class SentencePieceTokenizer(base.TextTokenizer):
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
  def from_file(cls, path: base.PathLike) -> SentencePieceTokenizer:
    path = epath.Path(path)
    if not path.exists():
      raise FileNotFoundError(f'config.text.sentencepiece_model: no file {path}')
    return cls(path.read_bytes())

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size() + 1

  def _encode_unpadded(self, text: str, max_len: int) -> list[int]:
    return [i + 1 for i in self._sp.encode(text)[:max_len]]

  def unknown_words(self, text: str) -> list[str]:
    """The text of each piece that maps to UNK (an unknown piece keeps its surface text)."""
    if self.unk_id is None:
      return []
    pieces = zip(self._sp.encode(text), self._sp.encode(text, out_type=str))
    unknown = (p.lstrip('\u2581') for i, p in pieces if i + 1 == self.unk_id)  # U+2581 marks a word's start
    return [w for w in dict.fromkeys(unknown) if w]

  def _decode_nonpad(self, ids: np.ndarray) -> str:
    return self._sp.decode([int(i) - 1 for i in ids])

  def save(self, directory: base.PathLike) -> None:
    """Writes the model file beside `text_tokenizer.json`."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SENTENCEPIECE_FILE).write_bytes(self._proto)
    super().save(directory)

  def _payload(self) -> dict[str, Any]:
    return {'model_file': SENTENCEPIECE_FILE}


# ---------------------------------------------------------------------------
# Kinds
# ---------------------------------------------------------------------------


def _load_word(directory: epath.Path, payload: dict[str, Any]) -> WordTokenizer:
  del directory
  return WordTokenizer(payload['vocab'], payload['config'].get('max_vocab'))


def _word_vocab_bound(config) -> int:
  if config.text.max_vocab <= 0:
    raise ValueError('config.text.max_vocab=0: the word tokenizer has as many ids as the training captions have '
                     'words, known only once fitted; set config.text.max_vocab > 0 to bound it')
  return config.text.max_vocab + 2  # + PAD, UNK


def _make_sentencepiece(config, texts: Sequence[str]) -> SentencePieceTokenizer:
  if config.text.sentencepiece_model:
    return SentencePieceTokenizer.from_file(config.text.sentencepiece_model)
  return SentencePieceTokenizer.fit(texts, config.text.vocab_size, config.text.sentencepiece_type)


def _load_sentencepiece(directory: epath.Path, payload: dict[str, Any]) -> SentencePieceTokenizer:
  tok = SentencePieceTokenizer.from_file(directory / payload['model_file'])
  if tok.vocab_size != payload['config']['vocab_size']:
    raise ValueError(f'{directory / payload["model_file"]} has {tok.vocab_size} ids, '
                     f'{base.TEXT_TOKENIZER_FILE} says {payload["config"]["vocab_size"]}')
  return tok


base.register_text_kind(base.TextKind(
    name='word',
    make=lambda config, texts: WordTokenizer.fit(texts, max_vocab=config.text.max_vocab or None),
    load=_load_word,
    vocab_bound=_word_vocab_bound,
))
base.register_text_kind(base.TextKind(
    name='byte',
    make=lambda config, texts: ByteTokenizer(),
    load=lambda directory, payload: ByteTokenizer(),
    vocab_bound=lambda config: ByteTokenizer().vocab_size,
))
base.register_text_kind(base.TextKind(
    name='sentencepiece',
    make=_make_sentencepiece,
    load=_load_sentencepiece,
    vocab_bound=lambda config: config.text.vocab_size + 1,  # + PAD (pieces are shifted by one)
))
