"""From a source to batches of packed token sequences: sources, fitted tokenizers, and the grain pipeline.

::

    source (shapes | folder | tfds | pretokenized)
      -> grain MapDataset: shuffle -> repeat -> [this process's rows] -> batch -> encode
    encode: text -> text tokenizer (truncate / PAD to text.max_len); image -> image tokenizer; pack [text | image]

Encoding a whole batch at once lets a learned image tokenizer (a conv net) run one compiled call per batch. A
``pretokenized`` source holds image token ids already (``python -m unimm_jax.pretokenize``), so training on it
never decodes or encodes an image; only the caption is tokenized, which is cheap and lets the text tokenizer be
fitted at the first run like any other.

The train pipeline is a grain ``MapDataset`` turned into an iterator whose position is a few integers, so the
checkpoint stores it and a resumed run continues with exactly the batch it would have seen next. Tokenizers that
are fitted to data (word vocabulary, patch codebook) are fitted once, at the first run, on the training split,
saved in ``WORKDIR/tokenizers/`` and loaded from there by every later run and reader; they are never refitted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
import numpy as np
from absl import logging
from etils import epath

from unimm_jax import configuration
from unimm_jax import tokenizers
from unimm_jax.data import folder, pretokenized, shapes, tfds_source
from unimm_jax.data.vocab import VocabLayout

TOKENIZER_DIR = "tokenizers"


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------
def make_source(config, split: str):
  """The random-access source for ``split`` ('train' | 'val').

  Items: {'image': uint8 [H, W, C], 'text': str}; a pretokenized source gives {'image_tokens': int32 [h*w],
  'text': str} instead.
  """
  if config.data.source == "shapes":
    if (config.image.size, config.image.channels) != (shapes.IMAGE_SIZE, 3):
      raise configuration.ConfigError(
          f"config.data.source='shapes' makes {shapes.IMAGE_SIZE}x{shapes.IMAGE_SIZE} RGB images, but "
          f"config.image.size={config.image.size}, config.image.channels={config.image.channels}")
    size = config.data.train_size if split == "train" else config.data.val_size
    return shapes.ShapesSource(split, size, seed=config.data.seed)
  if config.data.source == "folder":
    return folder.FolderSource(config.data.path, split, config.image.size, config.image.channels)
  if config.data.source == "tfds":
    return tfds_source.TfdsSource.from_config(config, split)
  if config.data.source == "pretokenized":
    return pretokenized.PretokenizedSource(config.data.path, split)
  raise configuration.ConfigError(f"config.data.source={config.data.source!r} is not one of "
                                  "shapes, folder, tfds, pretokenized")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tokenizers:
  """The run's text and image tokenizers and the vocabulary layout they imply."""

  text: tokenizers.TextTokenizer
  image: tokenizers.ImageTokenizer
  text_len: int

  @property
  def layout(self) -> VocabLayout:
    return VocabLayout(self.text.vocab_size, self.image.vocab_size, self.text_len, self.image.grid_shape)

  def encode(self, text: str, image: np.ndarray) -> np.ndarray:
    """One pair -> int32 [S] packed global ids."""
    return self.encode_batch({"text": [text], "image": np.asarray(image)[None]})[0]

  def encode_batch(self, batch: dict[str, Any]) -> np.ndarray:
    """{'text': str [B], 'image': uint8 [B, H, W, C] | 'image_tokens': int [B, h*w]} -> int32 [B, S] global ids."""
    text_ids = self.text.encode_batch([str(t) for t in batch["text"]], self.text_len)
    if "image_tokens" in batch:
      image_ids = np.asarray(batch["image_tokens"])
      if image_ids.shape[1:] != (self.layout.image_len,) or (
          image_ids.size and (image_ids.min() < 0 or image_ids.max() >= self.image.vocab_size)):
        raise ValueError(f"pretokenized image ids of shape {image_ids.shape} do not fit the image tokenizer "
                         f"({self.layout.image_len} tokens of {self.image.vocab_size} ids)")
    else:
      image_ids = self.image.encode(np.asarray(batch["image"]))
    return self.layout.pack(text_ids, image_ids)

  def decode(self, tokens: np.ndarray) -> tuple[list[str], np.ndarray]:
    """int [N, S] global ids (no MASK) -> (captions, uint8 [N, H, W, C] images)."""
    text_ids, image_ids = self.layout.unpack(np.asarray(tokens))
    texts = [self.text.decode(row) for row in text_ids]
    return texts, self.image.decode(image_ids)


def _fit_tokenizers(config, source) -> tuple[tokenizers.TextTokenizer, tokenizers.ImageTokenizer]:
  n = min(len(source), config.data.fit_examples)
  items = [source[i] for i in range(n)]
  text_tok = tokenizers.make_text_tokenizer(config, [item["text"] for item in items])
  image_tok = make_image_tokenizer(config, source, items)
  logging.info("fitted tokenizers on %d training examples: text %s (%d ids), image %s (%d ids)", n,
               text_tok.kind, text_tok.vocab_size, image_tok.kind, image_tok.vocab_size)
  return text_tok, image_tok


def make_image_tokenizer(config, source, items: list[dict] | None = None) -> tokenizers.ImageTokenizer:
  """The image tokenizer ``config.image`` asks for (its kind's ``make``): built (pixel), fitted on the first
  ``data.fit_examples`` training ``items`` (patch), loaded from ``image.tokenizer_path`` (fsq, vq), or, for a
  pretokenized source, the one that made its ids (never refitted)."""
  if isinstance(source, pretokenized.PretokenizedSource):
    return source.image_tokenizer()
  kind = tokenizers.image_kind(config.image.tokenizer)
  if kind.learned and not config.image.tokenizer_path:
    raise configuration.ConfigError(
        f"config.image.tokenizer={config.image.tokenizer!r} needs config.image.tokenizer_path: the workdir of "
        "python -m unimm_jax.tokenizer_main that trained it")
  if not kind.fitted:
    items = []
  elif items is None:
    items = [source[i] for i in range(min(len(source), config.data.fit_examples))]
  return kind.make(config, items)


def fit_or_load_tokenizers(config, workdir, train_source=None) -> Tokenizers:
  """Loads the tokenizers saved in ``WORKDIR/tokenizers``, or fits them on the training split and saves them.

  Every process fits the same tokenizers (the fit is deterministic); only process 0 writes them.
  """
  directory = epath.Path(workdir) / TOKENIZER_DIR
  if (directory / tokenizers.TEXT_TOKENIZER_FILE).exists() and (directory / tokenizers.IMAGE_TOKENIZER_FILE).exists():
    text_tok = tokenizers.load_text_tokenizer(directory)
    image_tok = tokenizers.load_image_tokenizer(directory)
    logging.info("loaded tokenizers from %s (not refitted)", directory)
  else:
    source = train_source if train_source is not None else make_source(config, "train")
    text_tok, image_tok = _fit_tokenizers(config, source)
    if jax.process_index() == 0:
      directory.mkdir(parents=True, exist_ok=True)
      text_tok.save(directory)
      image_tok.save(directory)
      logging.info("saved tokenizers to %s", directory)
  configuration.check_tokenizers(config, text_tok, image_tok)
  return Tokenizers(text_tok, image_tok, config.text.max_len)


def load_tokenizers(workdir, text_len: int) -> Tokenizers:
  """The tokenizers a training run saved (for readers: sampler, export); FileNotFoundError if there are none."""
  directory = epath.Path(workdir) / TOKENIZER_DIR
  return Tokenizers(tokenizers.load_text_tokenizer(directory), tokenizers.load_image_tokenizer(directory), text_len)


# ---------------------------------------------------------------------------------------------------------------
# Grain pipeline
# ---------------------------------------------------------------------------------------------------------------
class EncodeBatch(grain.transforms.Map):
  """A batch {'text' [B], 'image' [B, ...] | 'image_tokens' [B, n]} -> {'tokens': int32 [B, S],
  'text_unk': int32 [B] (text tokens that are UNK)}."""

  def __init__(self, toks: Tokenizers):
    self._toks = toks

  def map(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
    tokens = self._toks.encode_batch(batch)
    unk_id = self._toks.text.unk_id
    unk = (np.zeros(len(tokens), np.int32) if unk_id is None
           else np.sum(tokens[:, : self._toks.text_len] == unk_id, axis=1).astype(np.int32))
    return {"tokens": tokens, "text_unk": unk}


class Encode(grain.transforms.Map):
  """One example {'image' | 'image_tokens', 'text'} -> {'tokens': int32 [S], 'text_unk': int32}."""

  def __init__(self, toks: Tokenizers):
    self._batch = EncodeBatch(toks)

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    out = self._batch.map({k: [v] if k == "text" else np.asarray(v)[None] for k, v in element.items()})
    return {k: v[0] for k, v in out.items()}


class _ProcessRows(grain.MapDataset):
  """This process's rows of each global batch: element j is global element (j // b) * B + index * b + j % b.

  With B the global batch and b = B / count the per-process one, process ``index`` reads only its own b rows of
  every global batch (and encodes only those), and stacking the processes' batches in process order gives
  exactly the global batch a single process would read: the same run on 1 or N hosts sees the same data.
  (Grain's shard options would instead give each process a disjoint slice of the *dataset*, so the global
  batches, and the losses, would change with the number of processes.)
  """

  def __init__(self, parent: grain.MapDataset, global_batch: int, index: int, count: int):
    super().__init__(parent)
    self._global, self._local, self._index = global_batch, global_batch // count, index
    self._length = len(parent) // global_batch * self._local

  def __len__(self) -> int:
    return self._length

  def _parent_index(self, j: int) -> int:
    return (j // self._local) * self._global + self._index * self._local + j % self._local

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def _getitems(self, indices):
    return self._parent._getitems([self._parent_index(j) for j in indices])  # pylint: disable=protected-access

  def __str__(self) -> str:
    return f"_ProcessRows(global_batch={self._global}, rows {self._index * self._local}:+{self._local})"


def train_dataset(source, toks: Tokenizers, *, batch_size: int, seed: int, shard_index: int = 0,
                  shard_count: int = 1) -> grain.MapDataset:
  """Infinite, shuffled (reshuffled every epoch), batched MapDataset of this process's rows.

  Args:
    batch_size: the global batch; each process gets ``batch_size // shard_count`` rows of it.
    shard_index, shard_count: this process and the number of processes (``jax.process_index/count()``).
  Batches: {'tokens': int32 [batch_size // shard_count, S], 'text_unk': int32 [batch_size // shard_count]}.
  """
  ds = _shuffled_rows(source, batch_size=batch_size, seed=seed, shard_index=shard_index, shard_count=shard_count)
  return ds.batch(batch_size // shard_count, drop_remainder=True).map(EncodeBatch(toks))


def _shuffled_rows(source, *, batch_size: int, seed: int, shard_index: int, shard_count: int) -> grain.MapDataset:
  """Shuffled, endlessly repeated examples of ``source``: this process's rows of each global batch."""
  if batch_size % shard_count:
    raise ValueError(f"the global batch {batch_size} is not divisible by the {shard_count} processes")
  ds = grain.MapDataset.source(source)
  if len(ds) < batch_size:
    raise ValueError(f"the training split has {len(ds)} examples, fewer than the batch of {batch_size}")
  ds = ds.shuffle(seed=seed).repeat(None)
  if shard_count > 1:
    ds = _ProcessRows(ds, batch_size, shard_index, shard_count)
  return ds


class _Image(grain.transforms.Map):
  def map(self, element):
    return element["image"]


def image_dataset(source, *, batch_size: int, seed: int, shard_index: int = 0,
                  shard_count: int = 1) -> grain.MapDataset:
  """Images only (the tokenizer trainer's input): like :func:`train_dataset`, batches uint8 [B / count, H, W, C]."""
  ds = _shuffled_rows(source, batch_size=batch_size, seed=seed, shard_index=shard_index, shard_count=shard_count)
  return ds.map(_Image()).batch(batch_size // shard_count, drop_remainder=True)


def train_iterator(dataset: grain.MapDataset, num_threads: int):
  """A checkpointable iterator (``get_state`` / ``set_state``) with background prefetch."""
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * num_threads, 1))
  return iter(dataset.to_iter_dataset(options))


def eval_batches(source, toks: Tokenizers, batch_size: int) -> list[dict[str, np.ndarray]]:
  """Every example of ``source`` once, in order, in fixed-size batches; the last is padded.

  Batches: {'tokens': int32 [batch_size, S], 'weight': float32 [batch_size] (0 on padding)}.
  """
  if not len(source):
    raise ValueError("the validation split is empty")
  out = []
  for start in range(0, len(source), batch_size):
    items = [source[i] for i in range(start, min(start + batch_size, len(source)))]
    tokens = toks.encode_batch({k: np.stack([it[k] for it in items]) if k != "text" else [it[k] for it in items]
                                for k in items[0]})
    weight = np.zeros(batch_size, np.float32)
    weight[: len(items)] = 1.0
    tokens = np.concatenate([tokens, np.repeat(tokens[-1:], batch_size - len(tokens), axis=0)])
    out.append({"tokens": tokens, "weight": weight})
  return out
