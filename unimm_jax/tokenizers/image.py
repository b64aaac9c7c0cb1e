"""The image tokenizers that need no network: pixel and patch; the quantization they share; the image kinds.

  PixelTokenizer  one token per pixel: its C quantized values combined
                  into one id; vocab levels**C.
  PatchTokenizer  one token per patch x patch block of quantized pixels,
                  looked up in a codebook of the most frequent training patches
                  (nearest code by L2 for unseen patches); fitted.

The learned kinds (fsq, vq) are registered here too: their geometry is a function of the config, which must be
known before JAX starts; their network lives in ``learned.py``, imported when one is made or loaded.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from etils import epath
import numpy as np

from unimm_jax.tokenizers import base

CODEBOOK_FILE = 'image_tokenizer_codebook.npy'


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


# ---------------------------------------------------------------------------
# Pixel and patch tokenizers
# ---------------------------------------------------------------------------


def patchify(q: np.ndarray, patch: int) -> np.ndarray:
  """[N, S, S, C] -> [N * (S/p)^2, p*p*C]; patches row-major, pixels too."""
  n, s, _, c = q.shape
  g = s // patch
  x = q.reshape(n, g, patch, g, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return np.ascontiguousarray(x).reshape(n * g * g, patch * patch * c)


def unpatchify(rows: np.ndarray, n: int, size: int, patch: int, c: int):
  """Inverse of patchify: [N * g*g, p*p*C] -> [N, S, S, C]."""
  g = size // patch
  x = rows.reshape(n, g, g, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, size, size, c)


class PixelTokenizer(base.ImageTokenizer):
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


class PatchTokenizer(base.ImageTokenizer):
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
    rows = patchify(quantize(images, levels), patch)
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
    rows = patchify(quantize(images, self.levels), self.patch)  # [M, D]
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
    q = unpatchify(rows, len(tokens), self.size, self.patch, self.channels)
    return dequantize(q, self.levels)

  def config_dict(self):
    return {**super().config_dict(), 'levels': self.levels, 'patch': self.patch,
            'codebook_size': self.codebook_size}

  def _save_arrays(self, directory):
    buf = io.BytesIO()
    np.save(buf, self.codebook)
    (directory / CODEBOOK_FILE).write_bytes(buf.getvalue())
    return {'codebook_file': CODEBOOK_FILE}


# ---------------------------------------------------------------------------
# Kinds
# ---------------------------------------------------------------------------


def _load_patch(directory: epath.Path, payload: dict[str, Any]) -> PatchTokenizer:
  cfg = payload['config']
  path = directory / payload['codebook_file']
  if not path.exists():
    raise FileNotFoundError(f'patch tokenizer codebook missing: {path}')
  codebook = np.load(io.BytesIO(path.read_bytes()))
  tok = PatchTokenizer(cfg['size'], cfg['channels'], cfg['levels'],
                       cfg['patch'], codebook, cfg['codebook_size'])
  if tok.vocab_size != cfg['vocab_size']:
    raise ValueError(
        f'{path} holds {tok.vocab_size} codes, {directory / base.IMAGE_TOKENIZER_FILE}'
        f' says vocab_size {cfg["vocab_size"]}'
    )
  return tok


def _fit_patch(config, items: Sequence[dict[str, Any]]) -> PatchTokenizer:
  images = np.stack([item['image'] for item in items])
  return PatchTokenizer.fit(images, config.image.size, config.image.channels, config.image.levels,
                            config.image.patch, config.image.codebook_size)


def _patch_codebook_problems(config, tokenizer: base.ImageTokenizer) -> list[str]:
  if tokenizer.vocab_size > config.image.codebook_size:
    return [f"config.image.codebook_size={config.image.codebook_size} is smaller than the saved "
            f"tokenizer's {tokenizer.vocab_size} codes"]
  return []


base.register_image_kind(base.ImageKind(
    name='pixel',
    make=lambda config, items: PixelTokenizer(config.image.size, config.image.channels, config.image.levels),
    load=lambda directory, payload: PixelTokenizer(
        payload['config']['size'], payload['config']['channels'], payload['config']['levels']),
    downsample=lambda config: 1,
    vocab_bound=lambda config: config.image.levels ** config.image.channels,
    config_fields=('size', 'channels', 'levels'),
    code_feature_dim=lambda config: config.image.channels,   # a pixel's C values
))
base.register_image_kind(base.ImageKind(
    name='patch',
    make=_fit_patch,
    load=_load_patch,
    downsample=lambda config: config.image.patch,
    vocab_bound=lambda config: config.image.codebook_size,
    config_fields=('size', 'channels', 'levels', 'patch'),
    code_feature_dim=lambda config: config.image.patch ** 2 * config.image.channels,   # a patch's pixels
    check_saved=_patch_codebook_problems,
    fitted=True,
))


# The learned kinds. Everything about their sizes comes from config.tokenizer; the trained tokenizer itself is
# read from config.image.tokenizer_path (JAX, so imported only then).
def _learned_downsample(config) -> int:
  """2 ** (halvings): one per entry of tokenizer.widths after the first (models/autoencoder.py)."""
  return 2 ** max(len(config.tokenizer.widths) - 1, 0)


def _make_learned(config, items) -> base.ImageTokenizer:
  del items
  from unimm_jax.tokenizers import learned  # pylint: disable=g-import-not-at-top  (needs JAX)
  return learned.from_workdir(config.image.tokenizer_path)


def _load_learned(directory: epath.Path, payload: dict[str, Any]) -> base.ImageTokenizer:
  from unimm_jax.tokenizers import learned  # pylint: disable=g-import-not-at-top  (needs JAX)
  return learned.load(directory, payload)


def _learned_look_dim(config) -> int:
  """Numbers in a code's decoded patch of pixels, which LearnedImageTokenizer.code_features gives before its latent."""
  return _learned_downsample(config) ** 2 * config.image.channels


# A learned tokenizer's own settings (widths, levels, codebook) travel with it: of a saved one, only the image
# fields are checked against the config.
base.register_image_kind(base.ImageKind(
    name='fsq',
    make=_make_learned,
    load=_load_learned,
    downsample=_learned_downsample,
    vocab_bound=lambda config: math.prod(config.tokenizer.fsq_levels),
    config_fields=('size', 'channels'),
    code_feature_dim=lambda config: _learned_look_dim(config) + len(config.tokenizer.fsq_levels),
    learned=True,
))
base.register_image_kind(base.ImageKind(
    name='vq',
    make=_make_learned,
    load=_load_learned,
    downsample=_learned_downsample,
    vocab_bound=lambda config: config.tokenizer.vq_codebook_size,
    config_fields=('size', 'channels'),
    code_feature_dim=lambda config: _learned_look_dim(config) + config.tokenizer.vq_dim,
    learned=True,
))


class NoImageTokenizer(base.ImageTokenizer):
  """``image.tokenizer=none``: a text-only model (an imported LLaDA-class backbone) has no image ids and no image
  segment; encoding or decoding an image is an error that says so."""

  kind = 'none'

  def __init__(self, size: int = 0, channels: int = 3):
    self.image_shape = (size, size, channels)
    self.grid_shape = (0, 0)

  @property
  def vocab_size(self) -> int:
    return 0

  def _encode(self, images: np.ndarray) -> np.ndarray:
    raise ValueError('this model has no image tokenizer (config.image.tokenizer=none): it reads and writes text only')

  _decode = _encode


base.register_image_kind(base.ImageKind(
    name='none',
    make=lambda config, items: NoImageTokenizer(config.image.size, config.image.channels),
    load=lambda directory, payload: NoImageTokenizer(payload['config']['size'], payload['config']['channels']),
    downsample=lambda config: 1,
    vocab_bound=lambda config: 0,
    config_fields=('size', 'channels'),
    has_tokens=False,
))
