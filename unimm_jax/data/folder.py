"""User data: a folder of images with captions in JSON lines.

Layout::

  DIR/train.jsonl   one {"image": "relative/path.png", "text": "caption"} a line
  DIR/val.jsonl
  DIR/...           the images, any format and mode PIL reads

Layouts with more segments read more fields of each line (``data.fields`` maps segments to them), e.g. an edit
dataset's {"instruction": "...", "source": "a.png", "target": "b.png"}: every field of an image segment is a path,
every field of a text segment a string.

`FolderSource` is a grain random-access source of {field: value}, by default
{'image': uint8 [S, S, C], 'text': str}. Every image is decoded, converted and
resized once, at construction: datasets in this format are small, and a bad
file found at construction is reported with the others in one log line,
whereas one found mid-training would stop a run hours in (or be silently
skipped). The decoded images are kept in memory, so `__getitem__` is a copy;
S*S*C bytes per example (12 KiB at 64x64 RGB). For data that does not fit,
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

SKIP_REASONS = ('bad_line', 'empty_caption', 'missing_image', 'unreadable_image')
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


def _parse_line(line: str, image_keys=('image',), text_keys=('text',)) -> tuple[dict, dict] | str:
  """({image field: path}, {text field: stripped text}) of a jsonl line, or the skip reason."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return 'bad_line'
  if not isinstance(record, dict):
    return 'bad_line'
  images = {k: record.get(k) for k in image_keys}
  texts = {k: record.get(k) for k in text_keys}
  if (any(not isinstance(v, str) or not v for v in images.values())
      or any(not isinstance(v, str) for v in texts.values())):
    return 'bad_line'
  texts = {k: v.strip() for k, v in texts.items()}
  if any(not v for v in texts.values()):
    return 'empty_caption'
  return images, texts


class FolderSource:
  """Grain random-access source over `{path}/{split}.jsonl`.

  Items: {'image': uint8 [S, S, C], 'text': str (whitespace-stripped)}, in
  file order. `skipped` counts the lines left out, by reason: 'bad_line' (not
  JSON, or no string 'image' / 'text'), 'empty_caption', 'missing_image',
  'unreadable_image' (PIL cannot open and decode it). Blank lines are ignored.
  Picklable (plain arrays and strings), as grain's worker processes need.
  """

  def __init__(self, path: epath.PathLike, split: str, image_size: int, channels: int,
               image_keys: tuple[str, ...] = ('image',), text_keys: tuple[str, ...] = ('text',)):
    self.path = epath.Path(path)
    self.image_keys, self.text_keys = tuple(image_keys), tuple(text_keys)
    self.split = split
    self.image_size, self.channels = image_size, channels
    self.jsonl = self.path / f'{split}.jsonl'
    if not self.jsonl.exists():
      raise ValueError(
          f'folder source: {self.jsonl} does not exist; a folder dataset needs '
          f'{split}.jsonl with lines {{"image": "relative/path.png", "text": "caption"}}'
      )
    self.skipped: dict[str, int] = {reason: 0 for reason in SKIP_REASONS}
    examples: dict[str, list[str]] = {reason: [] for reason in SKIP_REASONS}

    def skip(reason: str, where: str) -> None:
      self.skipped[reason] += 1
      if len(examples[reason]) < _LOG_EXAMPLES:
        examples[reason].append(where)

    candidates = []  # (line number, {image field: path}, {text field: text})
    for lineno, line in enumerate(self.jsonl.read_text().splitlines(), 1):
      if not line.strip():
        continue
      parsed = _parse_line(line, self.image_keys, self.text_keys)
      if isinstance(parsed, str):
        skip(parsed, f'line {lineno}')
      else:
        candidates.append((lineno, {k: self.path / v for k, v in parsed[0].items()}, parsed[1]))

    def read(candidate) -> dict[str, np.ndarray] | tuple[str, str]:
      lineno, image_paths, _ = candidate
      out = {}
      for key, image_path in image_paths.items():
        if not image_path.exists():
          return 'missing_image', f'line {lineno}: {image_path}'
        try:
          out[key] = load_image(image_path, image_size, channels)
        except Exception as e:  # pylint: disable=broad-except
          # PIL raises many types for bad files (OSError, SyntaxError,
          # ValueError, DecompressionBombError, ...); any of them means this
          # file cannot be used, and the count + examples say which one.
          return 'unreadable_image', f'line {lineno}: {image_path} ({type(e).__name__}: {e})'
      return out

    images, texts = [], []
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
      for candidate, result in zip(candidates, pool.map(read, candidates)):
        if isinstance(result, tuple):
          skip(*result)
        else:
          images.append(result)
          texts.append(candidate[2])

    summary = f'folder source {self.jsonl}: {len(texts)} usable, skipped ' + (
        ', '.join(f'{n} {r}' for r, n in self.skipped.items() if n) or 'none')
    logging.info('%s', summary)
    for reason, where in examples.items():
      if where:
        logging.warning('folder source %s: %s, e.g. %s', self.jsonl, reason, '; '.join(where))
    if not texts:
      raise ValueError(f'{summary}: no usable examples in {self.jsonl}')

    self._images = {k: np.stack([im[k] for im in images]) for k in self.image_keys}  # uint8 [N, S, S, C] each
    self._texts = texts   # [{text field: str}]

  def __len__(self) -> int:
    return len(self._texts)

  def __getitem__(self, index: int) -> dict[str, Any]:
    i = operator.index(index)
    if not 0 <= i < len(self._texts):
      raise IndexError(f'index {index} out of range for {len(self._texts)} examples')
    # A copy, so a transform that edits the image in place cannot change the cache.
    return {**{k: v[i].copy() for k, v in self._images.items()}, **self._texts[i]}

  def __repr__(self) -> str:
    # grain checkpoints record the source's repr.
    fields = ('' if (self.image_keys, self.text_keys) == (('image',), ('text',))
              else f', image_keys={self.image_keys}, text_keys={self.text_keys}')
    return (f'FolderSource(path={str(self.path)!r}, split={self.split!r}, '
            f'image_size={self.image_size}, channels={self.channels}{fields}, n={len(self)})')
