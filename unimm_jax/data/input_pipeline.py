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
import functools
import operator
import sys
from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np
from absl import logging
from etils import epath

from unimm_jax import configuration, sequence
from unimm_jax import tokenizers
from unimm_jax.data import folder, frames, pretokenized, shapes, shapes_tasks, tfds_source
from unimm_jax.sequence import SequenceLayout

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
    kinds = tuple(map(tuple, config.data.get("shapes_kinds", (("caption", 1.0),))))
    rows = tuple((str(k), int(n)) for k, n in config.data.get("kind_rows", ()))
    if rows and split == "train":
      return KindRows({k: shapes_tasks.MixedShapesSource.from_kinds(split, size, config.data.seed, ((k, 1.0),))
                       for k, _ in rows}, rows)
    if kinds != (("caption", 1.0),):
      return shapes_tasks.MixedShapesSource.from_kinds(split, size, config.data.seed, kinds)
    return shapes.ShapesSource(split, size, seed=config.data.seed)
  if config.data.source == "folder":
    image_keys, text_keys = source_keys(config)
    return folder.FolderSource(config.data.path, split, config.image.size, config.image.channels,
                               image_keys=image_keys, text_keys=text_keys)
  if config.data.source == "tfds":
    return tfds_source.TfdsSource.from_config(config, split)
  if config.data.source == "pretokenized":
    return pretokenized.PretokenizedSource(config.data.path, split)
  raise configuration.ConfigError(f"config.data.source={config.data.source!r} is not one of "
                                  "shapes, folder, tfds, pretokenized")


class KindRows:
  """A random-access source whose rows follow a fixed pattern of kinds (``data.kind_rows``): item j is, with
  P = sum of the rows, the p-th block's slot s (p, s = divmod(j, P)), which holds the next example of that slot's
  kind. A training batch of a multiple of P rows then has each kind at the same rows every step, which is what
  lets the train step compute each kind on its own segments (``StepInputs.row_groups``); the training dataset
  shuffles each kind's examples on its own (:func:`train_dataset`)."""

  def __init__(self, sources: Mapping[str, Any], rows: Sequence[tuple[str, int]]):
    rows = tuple((str(k), int(n)) for k, n in rows)
    if not rows or any(n < 1 for _, n in rows) or len({k for k, _ in rows}) != len(rows):
      raise ValueError(f"kind rows {rows} must be (kind, rows >= 1) pairs of distinct kinds")
    missing = [k for k, _ in rows if k not in sources]
    if missing:
      raise ValueError(f"kind rows name {missing}, which have no source (sources: {sorted(sources)})")
    self.sources, self.rows = dict(sources), rows
    self.period = sum(n for _, n in rows)
    self.slots = tuple((k, i) for k, n in rows for i in range(n))   # slot -> (kind, rank within its kind)
    self._blocks = min(len(self.sources[k]) // n for k, n in rows)

  def __len__(self) -> int:
    return self._blocks * self.period

  def __getitem__(self, index: int):
    block, slot = divmod(operator.index(index), self.period)
    if not 0 <= block < self._blocks:
      raise IndexError(f"KindRows index {index} out of range [0, {len(self)})")
    kind, rank = self.slots[slot]
    return self.sources[kind][block * dict(self.rows)[kind] + rank]

  def __repr__(self) -> str:  # grain checkpoints the data iterator by the source's repr
    return f"KindRows({self.rows}, {', '.join(f'{k}={self.sources[k]!r}' for k, _ in self.rows)})"


class _KindRowsDataset(grain.MapDataset):
  """:class:`KindRows` over one (shuffled, repeated) dataset per kind: element j is the next element of the kind of
  slot j mod P."""

  def __init__(self, parents: Sequence[grain.MapDataset], source: KindRows):
    super().__init__(parents)
    self._source = source
    blocks = min(len(p) // n for p, (_, n) in zip(parents, source.rows))
    self._length = min(blocks, sys.maxsize // source.period) * source.period   # (repeated parents: "infinite")
    self._which = {k: i for i, (k, _) in enumerate(source.rows)}

  def __len__(self) -> int:
    return self._length

  def _locate(self, j: int) -> tuple[int, int]:
    block, slot = divmod(j, self._source.period)
    kind, rank = self._source.slots[slot]
    return self._which[kind], block * dict(self._source.rows)[kind] + rank

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    parent, j = self._locate(index)
    return self._parents[parent][j]

  def __str__(self) -> str:
    return f"_KindRowsDataset({self._source.rows})"


MISSING_KEY = "missing"   # an item's fields that this example does not have, comma-separated (values: placeholders)


def source_keys(config) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(image keys, text keys): the fields of a source's items that the config's segments read. ``data.fields``
  maps a segment to one field or to several, ``(segment, field, field, ...)``: an example's segment then reads
  the first of them the example has (an edit's ``source`` or a caption pair's ``image``), and is absent when it
  has none; by default a segment reads the field of its own name. Today's layout reads ``image`` and ``text``."""
  fields = {f[0]: tuple(f[1:]) for f in map(tuple, config.data.fields)}
  specs = tuple(config.sequence.segments) or (("text", "text"), ("image", "image"))
  keys = {"image": [], "text": []}
  for spec in specs:
    name, modality = spec[0], spec[1]
    for key in fields.get(name, (name,)):
      if modality in keys and key not in keys[modality]:
        keys[modality].append(key)
  return tuple(keys["image"]), tuple(keys["text"])


def kind_segments(config, kind: str) -> tuple[str, ...]:
  """The segments an example of a ``shapes`` kind (caption | edit | vqa) has: those that read one of its fields
  (``data.fields``, :data:`shapes_tasks.FIELDS`); the others are absent."""
  if kind not in shapes_tasks.FIELDS:
    raise configuration.ConfigError(f"example kind {kind!r} is not one of {tuple(shapes_tasks.FIELDS)}")
  fields = {f[0]: tuple(f[1:]) for f in map(tuple, config.data.fields)}
  specs = tuple(config.sequence.segments) or (("text", "text"), ("image", "image"))
  return tuple(spec[0] for spec in specs
               if spec[1] == sequence.SPECIAL or any(key in shapes_tasks.FIELDS[kind] for key in fields.get(spec[0], (spec[0],))))


def missing_fields(item: dict) -> set[str]:
  """The fields an item (or one row of a batch) does not have: the names in its ``missing`` entry."""
  return set(str(item.get(MISSING_KEY, "")).split(",")) - {""}


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tokenizers:
  """The run's text and image tokenizers and the sequence layout they imply.

  ``segments`` and ``specials`` are the config's ``sequence.segments`` / ``sequence.specials`` (``()``: today's
  ``[text | image]``); ``fields`` maps segments to the keys of a source's items (``data.fields``; a segment not
  named there reads the key of its own name). A source item holds raw values (a caption, a uint8 image) or, for
  an image segment whose key is ``K``, already tokenized ids under ``K_tokens`` (pretokenized data).
  """

  text: Any           # tokenizers.TextTokenizer
  image: Any          # tokenizers.ImageTokenizer
  text_len: int
  segments: tuple = ()
  specials: tuple = ()
  fields: tuple = ()  # ((segment, source key), ...)
  id_align: int = 1   # sequence.id_align
  mask_id: int = -1   # sequence.mask_id
  special_ids: tuple = ()   # sequence.special_ids as ((name, id), ...)
  vocab_rows: int = 0       # sequence.vocab_rows
  frames: tuple = ()        # ((segment, frames.TextFrame), ...): sequence.text_frames
  views: tuple = ()         # ((name, segment specs), ...): sequence.views

  @functools.cached_property
  def layout(self) -> SequenceLayout:
    return self._layout_of(self.segments)

  def _layout_of(self, specs) -> SequenceLayout:
    if not specs:
      segments = (sequence.text(sequence.TEXT, self.text_len), sequence.image(sequence.IMAGE, self.image.grid_shape))
    else:
      segments = sequence.parse_segments(specs, self.text_len, self.image.grid_shape)
    return SequenceLayout(segments, self.text.vocab_size, self.image.vocab_size, tuple(self.specials),
                          id_align=self.id_align, explicit_mask_id=self.mask_id, special_ids=self.special_ids,
                          vocab_rows=self.vocab_rows)

  def view(self, name: str) -> "Tokenizers":
    """The same tokenizers over the layout ``sequence.views[name]`` (the network must not depend on the layout:
    ``Pipeline.view``)."""
    views = dict(self.views)
    if name not in views:
      raise KeyError(f"no sequence view {name!r}; config.sequence.views has {sorted(views) or 'none'}")
    return dataclasses.replace(self, segments=tuple(map(tuple, views[name])))

  def encode_text(self, segment: str, texts: Sequence[str], length: int) -> np.ndarray:
    """int32 [B, length] local ids of a text segment: its frame's (``sequence.text_frames``), or the tokenizer's
    own encoding padded on the right."""
    frame = dict(self.frames).get(segment)
    if frame is None:
      return self.text.encode_batch(texts, length)
    return frame.encode(self.text, texts, length, dict(self.special_ids))

  def field(self, segment: str) -> str:
    """The (first) source key a segment reads."""
    return self.fields_of(segment)[0]

  def fields_of(self, segment: str) -> tuple[str, ...]:
    """The source keys a segment reads, in order of preference (``data.fields``; default its own name)."""
    for entry in self.fields:
      if entry[0] == segment:
        return tuple(entry[1:])
    return (segment,)

  def _rows_of(self, batch: dict[str, Any], segment: str) -> list[str | None]:
    """Per row of a batch, the key that ``segment`` reads (the first of its fields the row has), or None when
    the row has none of them (the segment is absent there)."""
    keys = self.fields_of(segment)
    n = len(next(iter(v for k, v in batch.items() if k != MISSING_KEY)))
    missing = ([missing_fields({MISSING_KEY: m}) for m in batch[MISSING_KEY]] if MISSING_KEY in batch
               else [set()] * n)
    have = [k for k in keys if k in batch or f"{k}_tokens" in batch]
    if not have:
      _column(batch, keys[0], segment)   # raises: names the key and the item's keys
    return [next((k for k in have if k not in m), None) for m in missing]

  def encode(self, text: str, image: np.ndarray) -> np.ndarray:
    """One pair of the two-segment layout -> int32 [S] packed global ids."""
    return self.encode_batch({"text": [text], "image": np.asarray(image)[None]})[0]

  def encode_segments(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """{source key: B raw values} -> {segment: int32 [B, n] local ids} for every generative segment; a segment
    that a row does not have (none of its fields, per the ``missing`` entry) is -2 there (absent), which the
    layout must allow (``<absent>`` in ``sequence.specials``)."""
    out = {}
    for seg in self.layout.segments:
      if seg.modality == sequence.SPECIAL:
        continue
      rows = self._rows_of(batch, seg.name)
      absent = np.asarray([k is None for k in rows])
      if absent.any() and not self.layout.has_absent:
        raise ValueError(f"{int(absent.sum())} example(s) have none of the fields {self.fields_of(seg.name)} of "
                         f"segment {seg.name!r}; a layout whose examples may lack segments needs "
                         f"'{sequence.ABSENT}' in config.sequence.specials")
      if seg.modality == sequence.TEXT:
        texts = ["" if k is None else str(batch[k][i]) for i, k in enumerate(rows)]
        ids = self.encode_text(seg.name, texts, seg.length)
      else:
        ids = np.zeros((len(rows), seg.size), np.int32)
        for key in dict.fromkeys(k for k in rows if k is not None):
          where = np.asarray([k == key for k in rows])
          ids[where] = self._image_ids(batch, key, seg)[where]
      out[seg.name] = np.where(absent[:, None], sequence.LOCAL_ABSENT, ids).astype(np.int32)
    return out

  def _image_ids(self, batch: dict[str, Any], key: str, seg) -> np.ndarray:
    """int32 [B, n]: the image key's ids for every row (pretokenized under ``{key}_tokens``, else encoded)."""
    if f"{key}_tokens" in batch:
      ids = np.asarray(batch[f"{key}_tokens"])
      if ids.shape[1:] != (seg.size,) or (ids.size and (ids.min() < 0 or ids.max() >= self.image.vocab_size)):
        raise ValueError(f"pretokenized image ids of shape {ids.shape} do not fit the image tokenizer "
                         f"({seg.size} tokens of {self.image.vocab_size} ids)")
      return ids
    return self.image.encode(np.asarray(batch[key]))

  def encode_batch(self, batch: dict[str, Any]) -> np.ndarray:
    """{source key: B raw values} -> int32 [B, S] global ids."""
    return self.layout.pack(self.encode_segments(batch))

  def decode_segments(self, tokens: np.ndarray, names=None) -> dict[str, Any]:
    """int [N, S] global ids -> {segment: list of N strings (text) | uint8 [N, H, W, C] (image)} of the named
    segments (default: every generative one not absent), which must hold no MASK."""
    out = {}
    for name, ids in self.layout.unpack(np.asarray(tokens)).items():
      if names is not None and name not in names:
        continue
      if names is None and (ids == sequence.LOCAL_ABSENT).any():
        continue
      if self.layout.segment(name).modality == sequence.TEXT:
        out[name] = [self.text.decode(row) for row in ids]
      else:
        out[name] = self.image.decode(ids)
    return out

  def decode(self, tokens: np.ndarray) -> tuple[list[str], np.ndarray]:
    """int [N, S] global ids (no MASK) -> (captions, uint8 [N, H, W, C] images): the first text and the first
    image segment's values."""
    values = self.decode_segments(tokens)
    lay = self.layout
    text = values[lay.of_modality(sequence.TEXT)[0]] if lay.of_modality(sequence.TEXT) else None
    image = values[lay.of_modality(sequence.IMAGE)[0]] if lay.of_modality(sequence.IMAGE) else None
    return text, image

  def unknown_count(self, tokens: np.ndarray) -> np.ndarray:
    """int32 [B]: text tokens that are UNK, over every text segment."""
    unk_id = self.text.unk_id
    if unk_id is None:
      return np.zeros(len(tokens), np.int32)
    text = self.layout.positions_of(self.layout.of_modality(sequence.TEXT))
    return np.sum((tokens == unk_id) & text[None], axis=1).astype(np.int32)


def tokenizers_for(config, text, image) -> Tokenizers:
  """The :class:`Tokenizers` of a config's sequence layout over fitted or loaded tokenizers."""
  seq = config.sequence
  return Tokenizers(text, image, config.text.max_len, tuple(map(tuple, seq.segments)),
                    tuple(seq.specials), tuple(map(tuple, config.data.fields)),
                    int(seq.id_align), int(seq.get("mask_id", -1)),
                    special_ids=tuple(sorted(dict(seq.get("special_ids", {})).items())),
                    vocab_rows=int(seq.get("vocab_rows", 0)), frames=frames.from_config(config),
                    views=tuple((k, tuple(map(tuple, v))) for k, v in sorted(dict(seq.get("views", {})).items())))


def _column(batch: dict[str, Any], key: str, segment: str):
  if key not in batch:
    raise KeyError(f"segment {segment!r} reads the source key {key!r}, which its items do not have (they have "
                   f"{', '.join(sorted(batch))}); map it with config.data.fields")
  return batch[key]


def _fit_tokenizers(config, source) -> tuple[tokenizers.TextTokenizer, tokenizers.ImageTokenizer]:
  n = min(len(source), config.data.fit_examples)
  items = [source[i] for i in range(n)]
  image_keys, text_keys = source_keys(config)
  # Every text field fits the one text tokenizer, every image field the one image tokenizer (in that order, so
  # today's layout, which reads 'text' and 'image', fits exactly as before).
  have = lambda item, k: k in item and k not in missing_fields(item)
  text_tok = tokenizers.make_text_tokenizer(config, [item[k] for item in items for k in text_keys if have(item, k)])
  if not isinstance(source, pretokenized.PretokenizedSource) and image_keys != ("image",):
    items = [{"image": item[k]} for item in items for k in image_keys if have(item, k)]
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
  return tokenizers_for(config, text_tok, image_tok)


def load_tokenizers(workdir, config) -> Tokenizers:
  """The tokenizers a training run saved (for readers: sampler, export); FileNotFoundError if there are none."""
  directory = epath.Path(workdir) / TOKENIZER_DIR
  return tokenizers_for(config, tokenizers.load_text_tokenizer(directory), tokenizers.load_image_tokenizer(directory))


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
    return {"tokens": tokens, "text_unk": self._toks.unknown_count(tokens)}


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
  if len(source) < batch_size:
    raise ValueError(f"the training split has {len(source)} examples, fewer than the batch of {batch_size}")
  if isinstance(source, KindRows):
    if batch_size % source.period:
      raise ValueError(f"the global batch {batch_size} is not a multiple of the {source.period} rows of "
                       f"config.data.kind_rows {source.rows}")
    ds = _KindRowsDataset([grain.MapDataset.source(source.sources[k]).shuffle(seed=seed + i).repeat(None)
                           for i, (k, _) in enumerate(source.rows)], source)
  else:
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
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
