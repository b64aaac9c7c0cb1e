"""Pre-tokenized data: ArrayRecord shards of image token ids plus captions (written by ``unimm_jax.pretokenize``).

Layout of a pretokenized directory::

  DIR/plan.json                          what is being written: source, image tokenizer, shards (checked on resume)
  DIR/tokenizers/image_tokenizer.json    the image tokenizer that made the ids (+ its arrays)
  DIR/{split}-{i:05d}-of-{n:05d}.array_record   shard i of a split: examples [i * shard_size, (i + 1) * shard_size)
  DIR/pretokenized.json                  the index, written last: a directory without it is unfinished

One record is a msgpack map {'image_tokens': uint16 | int32 [h*w], 'text': str} (flax.serialization), so the shards
are readable without this package. Text is kept as the caption, not ids: tokenizing a caption is cheap, and it
lets a run fit its own text tokenizer (word, sentencepiece) on the captions at the first run.
"""

from __future__ import annotations

import json
import operator
from typing import Any

import grain
import numpy as np
from etils import epath
from flax import serialization

from unimm_jax import tokenizers

PLAN_FILE = "plan.json"
INDEX_FILE = "pretokenized.json"
TOKENIZER_DIR = "tokenizers"


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def encode_record(image_tokens: np.ndarray, text: str, vocab_size: int) -> bytes:
  dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
  return serialization.msgpack_serialize({"image_tokens": np.asarray(image_tokens, dtype), "text": str(text)})


def decode_record(record: bytes) -> dict[str, Any]:
  """{'image_tokens': int32 [h*w], 'text': str}."""
  item = serialization.msgpack_restore(record)
  return {"image_tokens": np.asarray(item["image_tokens"], np.int32), "text": item["text"]}


def read_index(path) -> dict[str, Any]:
  index = epath.Path(path) / INDEX_FILE
  if not index.exists():
    raise FileNotFoundError(
        f"{index} does not exist: {epath.Path(path)} is not a finished pretokenized directory (run python -m "
        f"unimm_jax.pretokenize --config=... --out={path} again to finish it)")
  return json.loads(index.read_text())


class PretokenizedSource:
  """Grain random-access source of {'image_tokens': int32 [h*w], 'text': str} over one split's shards."""

  def __init__(self, path, split: str):
    self.path, self.split = epath.Path(path), split
    index = read_index(path)
    if split not in index["splits"]:
      raise ValueError(f"{self.path / INDEX_FILE} has splits {sorted(index['splits'])}, not {split!r}")
    info = index["splits"][split]
    self.num_tokens = int(np.prod(index["grid"]))
    self.skipped = info.get("skipped", {})
    self._source = grain.sources.ArrayRecordDataSource([str(self.path / name) for name in info["shards"]])
    if len(self._source) != info["num_examples"]:
      raise ValueError(f"{self.path}: the {split} shards hold {len(self._source)} records, the index says "
                       f"{info['num_examples']}")

  def image_tokenizer(self):
    return tokenizers.load_image_tokenizer(self.path / TOKENIZER_DIR)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    i = operator.index(index)
    if not 0 <= i < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    return decode_record(self._source[i])

  def __repr__(self) -> str:  # grain checkpoints record the source's repr
    return f"PretokenizedSource(path={str(self.path)!r}, split={self.split!r}, n={len(self)})"
