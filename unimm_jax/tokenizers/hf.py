"""``text.tokenizer=hf``: a Hugging Face ``tokenizer.json`` read with the ``tokenizers`` package (no PyTorch, no
``transformers``), so an imported backbone (LLaDA-8B and the models built on it) reads and writes its own ids.

Ids are the upstream's own, unshifted: the model's text vocabulary is the upstream's embedding rows
(``text.vocab_size`` when larger than the tokenizer, as LLaDA's 126,464 rows against its 126,349 tokens), its
PAD the upstream's pad token (LLaDA pads answers with ``<|endoftext|>``, 126,081, and learns to write it), its
special tokens (BOS, EOS, MASK, chat markers) those of ``tokenizer.json`` and ``tokenizer_config.json``.
Encoding adds the special tokens the tokenizer's post-processor adds (as the upstream's ``tokenizer(text)``
does: LLaDA's BOS); decoding drops special tokens (as ``batch_decode(..., skip_special_tokens=True)``).

Saved in ``WORKDIR/tokenizers/`` beside ``text_tokenizer.json``: the upstream's ``tokenizer.json`` and, when
given, ``tokenizer_config.json`` and ``special_tokens_map.json`` unchanged, so an export hands them back as they
came.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from etils import epath

from unimm_jax.tokenizers import base

TOKENIZER_JSON = "tokenizer.json"
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")   # copied through when present


def _token_name(entry) -> str | None:
  """A special-token entry of tokenizer_config.json: a string or {'content': ...}."""
  if isinstance(entry, dict):
    return entry.get("content")
  return entry


class HfTokenizer(base.TextTokenizer):
  """A Hugging Face fast tokenizer (module docstring)."""

  kind = "hf"

  def __init__(self, tokenizer_json: str, *, side_files: dict[str, str] | None = None, vocab_size: int = 0,
               pad_id: int | None = None, text_ids: int = 0):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    self._json = tokenizer_json
    self._tok = Tokenizer.from_str(tokenizer_json)
    self.side_files = dict(side_files or {})
    own = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1   # ids need not be contiguous
    # text_ids > 0: exactly the ids below it are text; the tokenizer's names for ids past it (Lumina-DiMOO's image
    # codes) belong to another modality's range.
    self.text_ids = int(text_ids)
    self._vocab_size = self.text_ids or max(own, int(vocab_size))
    self.pad_id = self._find_pad() if pad_id is None else int(pad_id)
    if not 0 <= self.pad_id < self._vocab_size:
      raise ValueError(f"hf tokenizer: pad id {self.pad_id} is outside its {self._vocab_size} ids")
    self.unk_id = None
    self._special_ids = {int(i) for i, tok in self._tok.get_added_tokens_decoder().items() if tok.special}

  def _find_pad(self) -> int:
    """The pad token of tokenizer_config.json / special_tokens_map.json, else its EOS (LLaDA's convention)."""
    for name in SIDE_FILES:
      if name not in self.side_files:
        continue
      meta = json.loads(self.side_files[name])
      for key in ("pad_token", "eos_token"):
        token = _token_name(meta.get(key))
        if token is not None and self._tok.token_to_id(token) is not None:
          return int(self._tok.token_to_id(token))
    raise ValueError("hf tokenizer: no pad_token or eos_token in tokenizer_config.json / special_tokens_map.json; "
                     "pass the upstream's pad_token_id")

  @classmethod
  def from_path(cls, path, *, vocab_size: int = 0, pad_id: int | None = None, text_ids: int = 0) -> "HfTokenizer":
    """From a model directory (``tokenizer.json`` and its side files) or a ``tokenizer.json`` file."""
    path = epath.Path(path)
    directory, file = (path, path / TOKENIZER_JSON) if path.is_dir() else (path.parent, path)
    if not file.exists():
      raise FileNotFoundError(f"text.tokenizer=hf: no {TOKENIZER_JSON} at {file} (config.text.hf_path)")
    side = {name: (directory / name).read_text() for name in SIDE_FILES if (directory / name).exists()}
    return cls(file.read_text(), side_files=side, vocab_size=vocab_size, pad_id=pad_id, text_ids=text_ids)

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  def token_id(self, token: str) -> int:
    """The id of a token (a special token such as ``<|mdm_mask|>``); KeyError naming it if there is none."""
    i = self._tok.token_to_id(token)
    if i is None:
      raise KeyError(f"hf tokenizer has no token {token!r}")
    return int(i)

  def encode_ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """The upstream's ids of ``text``, unpadded and untruncated (ids past the text range, a code's name written in
    the text, dropped)."""
    ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
    return [i for i in ids if i < self._vocab_size] if self.text_ids else list(ids)

  def _encode_unpadded(self, text: str, max_len: int) -> list[int]:
    return self.encode_ids(text)[:max_len]

  def _decode_nonpad(self, ids: np.ndarray) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def config_dict(self) -> dict[str, Any]:
    return {**super().config_dict(), "special_ids": sorted(self._special_ids), "text_ids": self.text_ids}

  def save(self, directory: base.PathLike) -> None:
    """Writes the upstream files unchanged beside ``text_tokenizer.json``."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TOKENIZER_JSON).write_text(self._json)
    for name, text in self.side_files.items():
      (directory / name).write_text(text)
    super().save(directory)

  def _payload(self) -> dict[str, Any]:
    return {"files": [TOKENIZER_JSON, *sorted(self.side_files)]}


def _load(directory: epath.Path, payload: dict[str, Any]) -> HfTokenizer:
  cfg = payload["config"]
  return HfTokenizer.from_path(directory, vocab_size=cfg["vocab_size"], pad_id=cfg["pad_id"],
                               text_ids=cfg.get("text_ids", 0))


def _make(config, texts) -> HfTokenizer:
  del texts   # nothing is fitted: the upstream's tokenizer is used as it is
  if not config.text.hf_path:
    raise ValueError("config.text.tokenizer='hf' needs config.text.hf_path: a Hugging Face model directory or its "
                     "tokenizer.json")
  return HfTokenizer.from_path(config.text.hf_path, vocab_size=config.text.vocab_size)


base.register_text_kind(base.TextKind(
    name="hf",
    make=_make,
    load=_load,
    vocab_bound=lambda config: config.text.vocab_size,
))
