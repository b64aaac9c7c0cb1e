"""User data: a folder of images and texts in JSON lines: caption pairs, edits, questions, or a mix.

Layout::

  DIR/train.jsonl   one JSON object a line (formats below)
  DIR/val.jsonl
  DIR/...           the images, any format and mode PIL reads; paths in the lines are relative to DIR

With today's two-segment layout every line is a caption pair::

  {"image": "relative/path.png", "text": "a caption"}

Layouts with more segments read more fields of each line (``data.fields`` maps segments to them; every field of an
image segment is a path, every field of a text segment a string). When the fields a layout reads hold more than
one of the kinds of example below (``configs/shapes_unified.py`` reads all three), the file may mix them, one kind
a line::

  caption  {"image": "a.png", "text": "a red circle"}
  edit     {"source": "a.png", "instruction": "make the circle blue", "target": "b.png"}
  vqa      {"image": "a.png", "question": "what colour is the circle?", "answer": "red"}

A line's kind is the one whose fields it has, exactly (a field that is null counts as not there): a line with only
some of a kind's fields (an edit without its target), or with the fields of two kinds, is skipped. Every item still
has every field the layout reads (grain batches them): those its kind lacks hold placeholders ("" for a text, a
black image) and are named, comma-separated, in the item's ``missing`` string (the input pipeline's convention: the
segments that read them are absent for that example). A layout whose fields form one kind only (e.g. the caption
pair) needs every field on every line, and its items have no ``missing``.

`FolderSource` is a grain random-access source of {field: value}, by default
{'image': uint8 [S, S, C], 'text': str}. Every image is decoded, converted and
resized once, at construction: datasets in this format are small, and a bad
file found at construction is reported with the others in one log line,
whereas one found mid-training would stop a run hours in (or be silently
skipped). The decoded images are kept in memory, once per distinct file
(lines that share an image share its copy), so `__getitem__` is a copy;
S*S*C bytes per image (12 KiB at 64x64 RGB). For data that does not fit,
convert it to ArrayRecord or TFDS instead.

All file access goes through `etils.epath`, so `gs://` directories work.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import operator
from typing import Any

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
from PIL import ImageOps
from PIL import UnidentifiedImageError

# The kinds of example a line may be, by their fields. A source whose fields hold two or more of them reads them
# mixed (each line is the kind whose fields it has; see the module docstring); any other source reads one kind, of
# all its fields.
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ('caption', ('image', 'text')),
    ('edit', ('source', 'instruction', 'target')),
    ('vqa', ('image', 'question', 'answer')),
)
# Every reason a line of these kinds may be skipped for, in the order counts are listed (`FolderSource.skipped`
# holds those of its fields: an empty text field other than these is 'empty_<field>').
SKIP_REASONS = ('bad_line', 'incomplete_example', 'mixed_kinds', 'empty_caption', 'empty_instruction',
                'empty_question', 'empty_answer', 'missing_image', 'unreadable_image')
MISSING_KEY = 'missing'   # = input_pipeline.MISSING_KEY: an item's fields its example lacks, comma-separated
# How many examples of each skip reason to log with their error.
_LOG_EXAMPLES = 3
# Reading and decoding overlap well in threads (PIL and file reads release
# the GIL), which matters most for gs:// paths.
_READ_THREADS = 16


def _to_8bit(img: Image.Image) -> Image.Image:
  """High-bit-depth modes -> 'L', scaling rather than clipping.

  PIL's own convert('L') clips 16-bit values at 255, which would turn most
  16-bit images white.
  """
  if img.mode.startswith('I;16') or img.mode == 'I':
    a = np.asarray(img, dtype=np.float64)
    # 'I' holds 16-bit PNGs in older PIL versions; values above 255 say so.
    scale = 255.0 / 65535.0 if (img.mode != 'I' or a.max() > 255) else 1.0
    return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8))
  if img.mode == 'F':
    a = np.asarray(img, dtype=np.float64)
    if a.size and np.nanmax(a) <= 1.0:  # float images are usually in [0, 1]
      a = a * 255.0
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8))
  return img


def _flatten_alpha(img: Image.Image) -> Image.Image:
  """Composites transparency onto white (how transparent images are shown)."""
  if img.mode == 'P' and 'transparency' in img.info:
    img = img.convert('RGBA')
  if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
    rgba = img.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert('RGB')
  return img


def load_image(path: epath.PathLike, size: int, channels: int) -> np.ndarray:
  """Reads, converts and centre-crops one image.  # uint8 [size, size, channels]

  Any PIL-readable image (palette, RGBA, L, CMYK, 16-bit, ...) is turned
  upright by its EXIF orientation, transparency is composited onto white,
  converted to RGB (channels=3) or L (channels=1), resized so that its shorter
  side is `size` (bicubic; PIL's resize filters over the whole source area, so
  downscaling is antialiased), then centre-cropped to size x size.
  Raises FileNotFoundError for a missing file and ValueError naming the file
  for one PIL cannot decode.
  """
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels}')
  data = epath.Path(path).read_bytes()
  try:
    return decode_image(data, size, channels)
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types: see FolderSource)
    why = 'not a format it knows' if isinstance(e, UnidentifiedImageError) else f'{type(e).__name__}: {e}'
    raise ValueError(f'{path} is not an image PIL can read ({why})') from e


def decode_image(data: bytes, size: int, channels: int) -> np.ndarray:
  """`load_image` of encoded bytes (PNG, JPEG, ...).  # uint8 [size, size, channels]"""
  with Image.open(io.BytesIO(data)) as img:
    img.load()  # decode fully now: a truncated file fails here, not later
    img = ImageOps.exif_transpose(img)
    img = _flatten_alpha(_to_8bit(img))
    img = img.convert('RGB' if channels == 3 else 'L')
  return fit_image(img, size, channels)


def fit_image(img: Image.Image, size: int, channels: int) -> np.ndarray:
  """Resizes the shorter side to `size` (bicubic) and centre-crops.  # uint8 [size, size, channels]"""
  img = img.convert('RGB' if channels == 3 else 'L')
  w, h = img.size
  if min(w, h) != size:
    scale = size / min(w, h)
    # max(size, .) guards against rounding the shorter side below `size`.
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    img = img.resize(new, Image.Resampling.BICUBIC)
    w, h = img.size
  left, top = (w - size) // 2, (h - size) // 2
  img = img.crop((left, top, left + size, top + size))
  return np.asarray(img, dtype=np.uint8).reshape(size, size, channels)


def empty_reason(text_key: str) -> str:
  """The skip reason of a line whose text field ``text_key`` is empty: 'empty_caption' for 'text'."""
  return 'empty_caption' if text_key == 'text' else f'empty_{text_key}'


def source_kinds(image_keys=('image',), text_keys=('text',)) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """The kinds of example a source of these fields reads: the :data:`KINDS` whose fields are all among them, when
  two or more are (a mixed source; every field must then belong to one of them), else one kind of every field."""
  keys = (*image_keys, *text_keys)
  kinds = tuple((name, fields) for name, fields in KINDS if set(fields) <= set(keys))
  if len(kinds) < 2:
    return (('caption' if set(keys) == {'image', 'text'} else 'example', keys),)
  stray = [k for k in keys if not any(k in fields for _, fields in kinds)]
  if stray:
    raise ValueError(
        f'folder source: the fields {stray} belong to none of the kinds of example '
        f'{", ".join(name for name, _ in kinds)} that the fields {keys} read mixed; a folder with several kinds '
        f'of example reads only the fields of {", ".join(f"{n} {list(f)}" for n, f in KINDS)}')
  return kinds


def skip_reasons(image_keys=('image',), text_keys=('text',)) -> tuple[str, ...]:
  """The skip reasons of a source of these fields, in order (a caption source: today's four)."""
  mixed = len(source_kinds(image_keys, text_keys)) > 1
  return (('bad_line',) + (('incomplete_example', 'mixed_kinds') if mixed else ())
          + tuple(dict.fromkeys(empty_reason(k) for k in text_keys)) + ('missing_image', 'unreadable_image'))


def line_formats(image_keys=('image',), text_keys=('text',)) -> str:
  """What a line of a source of these fields looks like, e.g. 'caption {"image": "a.png", "text": "..."}'."""
  def fmt(fields):
    return '{' + ', '.join(f'"{k}": "{"a.png" if k in image_keys else "..."}"' for k in fields) + '}'
  return '; '.join(f'{name} {fmt(fields)}' for name, fields in source_kinds(image_keys, text_keys))


def _parse_line(line: str, image_keys=('image',), text_keys=('text',),
                kinds=None) -> tuple[str, dict, dict] | str:
  """(kind, {image field: path}, {text field: stripped text}) of a jsonl line, or the skip reason.

  With one kind every field is needed (a field that is not there, or not a string: 'bad_line'). With several, a
  field that is not there (or null) is one the line lacks, and the fields it has must be exactly one kind's.
  """
  kinds = kinds or source_kinds(image_keys, text_keys)
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return 'bad_line'
  if not isinstance(record, dict):
    return 'bad_line'
  keys = (*image_keys, *text_keys)
  present = [k for k in keys if record.get(k) is not None] if len(kinds) > 1 else keys
  for k in present:
    value = record.get(k)
    if not isinstance(value, str) or (k in image_keys and not value):
      return 'bad_line'
  kind = next((name for name, fields in kinds if set(fields) == set(present)), None)
  if kind is None:
    complete = [set(fields) for _, fields in kinds if set(fields) <= set(present)]
    return 'mixed_kinds' if len(complete) > 1 and set().union(*complete) == set(present) else 'incomplete_example'
  images = {k: record[k] for k in image_keys if k in present}
  texts = {k: record[k].strip() for k in text_keys if k in present}
  for k, text in texts.items():
    if not text:
      return empty_reason(k)
  return kind, images, texts


class FolderSource:
  """Grain random-access source over `{path}/{split}.jsonl`.

  Items: {'image': uint8 [S, S, C], 'text': str (whitespace-stripped)}, in
  file order; with other fields (``image_keys``, ``text_keys``) one entry for
  each. When the fields hold several kinds of example (:func:`source_kinds`),
  a line is one of them, the others' fields are placeholders ("", a black
  image) and the item's 'missing' names them, comma-separated; `kind_counts`
  counts the usable lines of each kind.

  `skipped` counts the lines left out, by reason (:func:`skip_reasons`):
  'bad_line' (not a JSON object, or a field that is not a string; with one
  kind, a field that is not there), 'incomplete_example' (some of a kind's
  fields but not all, or fields of no kind), 'mixed_kinds' (the fields of two
  kinds), 'empty_caption' (an empty 'text'; 'empty_instruction' etc. for
  another text field), 'missing_image', 'unreadable_image' (PIL cannot open
  and decode it). Blank lines are ignored.
  Picklable (plain arrays and strings), as grain's worker processes need.
  """

  def __init__(self, path: epath.PathLike, split: str, image_size: int, channels: int,
               image_keys: tuple[str, ...] = ('image',), text_keys: tuple[str, ...] = ('text',)):
    self.path = epath.Path(path)
    self.image_keys, self.text_keys = tuple(image_keys), tuple(text_keys)
    self.split = split
    self.image_size, self.channels = image_size, channels
    self.kinds = source_kinds(self.image_keys, self.text_keys)
    self.mixed = len(self.kinds) > 1
    self.jsonl = self.path / f'{split}.jsonl'
    formats = line_formats(self.image_keys, self.text_keys)
    if not self.jsonl.exists():
      raise ValueError(
          f'folder source: {self.jsonl} does not exist; a folder dataset needs '
          f'{split}.jsonl with lines {formats}'
      )
    reasons = skip_reasons(self.image_keys, self.text_keys)
    self.skipped: dict[str, int] = {reason: 0 for reason in reasons}
    examples: dict[str, list[str]] = {reason: [] for reason in reasons}

    def skip(reason: str, where: str) -> None:
      self.skipped[reason] += 1
      if len(examples[reason]) < _LOG_EXAMPLES:
        examples[reason].append(where)

    candidates = []  # (line number, kind, {image field: path}, {text field: text})
    for lineno, line in enumerate(self.jsonl.read_text().splitlines(), 1):
      if not line.strip():
        continue
      parsed = _parse_line(line, self.image_keys, self.text_keys, self.kinds)
      if isinstance(parsed, str):
        skip(parsed, f'line {lineno}')
      else:
        kind, image_paths, texts = parsed
        candidates.append((lineno, kind, {k: self.path / v for k, v in image_paths.items()}, texts))

    def read(image_path: epath.Path) -> np.ndarray | tuple[str, str]:
      if not image_path.exists():
        return 'missing_image', str(image_path)
      try:
        return load_image(image_path, image_size, channels)
      except Exception as e:  # pylint: disable=broad-except
        # PIL raises many types for bad files (OSError, SyntaxError,
        # ValueError, DecompressionBombError, ...); any of them means this
        # file cannot be used, and the count + examples say which one.
        return 'unreadable_image', f'{image_path} ({type(e).__name__}: {e})'

    # Each distinct file is read and decoded once, however many lines name it.
    paths = list(dict.fromkeys(p for c in candidates for p in c[2].values()))
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
      decoded = dict(zip(paths, pool.map(read, paths)))

    rows: dict[epath.Path, int] = {}   # file -> its row of self._pixels
    index = {k: [] for k in self.image_keys}
    texts, missing = [], []
    self.kind_counts: dict[str, int] = {name: 0 for name, _ in self.kinds}
    for lineno, kind, image_paths, line_texts in candidates:
      bad = next((decoded[p] for p in image_paths.values() if isinstance(decoded[p], tuple)), None)
      if bad is not None:
        skip(bad[0], f'line {lineno}: {bad[1]}')
        continue
      for k in self.image_keys:
        p = image_paths.get(k)
        index[k].append(-1 if p is None else rows.setdefault(p, len(rows)))
      texts.append({k: line_texts.get(k, '') for k in self.text_keys})
      missing.append(','.join(k for k in (*self.text_keys, *self.image_keys)
                              if k not in image_paths and k not in line_texts))
      self.kind_counts[kind] += 1

    kinds = f' ({", ".join(f"{n} {k}" for k, n in self.kind_counts.items())})' if self.mixed else ''
    summary = f'folder source {self.jsonl}: {len(texts)} usable{kinds}, skipped ' + (
        ', '.join(f'{n} {r}' for r, n in self.skipped.items() if n) or 'none')
    logging.info('%s', summary)
    for reason, where in examples.items():
      if where:
        logging.warning('folder source %s: %s, e.g. %s', self.jsonl, reason, '; '.join(where))
    if not texts:
      raise ValueError(f'{summary}: no usable examples in {self.jsonl} (a line is {formats})')

    shape = (image_size, image_size, channels)
    self._pixels = np.stack([decoded[p] for p in rows]) if rows else np.zeros((0, *shape), np.uint8)  # uint8 [U, S, S, C]
    self._index = {k: np.asarray(v, np.int32) for k, v in index.items()}  # [N] row of each example's image; -1: none
    self._texts = texts   # [{text field: str}]
    self._missing = missing if self.mixed else None   # [str]

  def __len__(self) -> int:
    return len(self._texts)

  def __getitem__(self, index: int) -> dict[str, Any]:
    i = operator.index(index)
    if not 0 <= i < len(self._texts):
      raise IndexError(f'index {index} out of range for {len(self._texts)} examples')
    item = {}
    for k, rows in self._index.items():
      # A copy, so a transform that edits the image in place cannot change the cache.
      item[k] = self._pixels[rows[i]].copy() if rows[i] >= 0 else np.zeros(self._pixels.shape[1:], np.uint8)
    item.update(self._texts[i])
    if self._missing is not None:
      item[MISSING_KEY] = self._missing[i]
    return item

  def __repr__(self) -> str:
    # grain checkpoints record the source's repr.
    fields = ('' if (self.image_keys, self.text_keys) == (('image',), ('text',))
              else f', image_keys={self.image_keys}, text_keys={self.text_keys}')
    return (f'FolderSource(path={str(self.path)!r}, split={self.split!r}, '
            f'image_size={self.image_size}, channels={self.channels}{fields}, n={len(self)})')
