"""Tokenizers: round trips, codebook and nearest-code rules, save/load, errors."""


import numpy as np
import pytest

from unimm_jax import tokenizers as tk


def _quantized_images(rng, n, size, channels, levels):
  """Random images whose values are all exact dequantized levels."""
  raw = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
  return tk.dequantize(tk.quantize(raw, levels), levels)


# ---------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('levels', range(2, 257))
def test_quantize_dequantize_are_consistent(levels):
  q = np.arange(levels)
  v = tk.dequantize(q, levels)
  assert v[0] == 0 and v[-1] == 255
  np.testing.assert_array_equal(tk.quantize(v, levels), q)
  # Every uint8 value maps to its nearest representable value.
  allv = np.arange(256, dtype=np.uint8)
  err = np.abs(tk.dequantize(tk.quantize(allv, levels), levels).astype(int) - allv)
  assert err.max() <= 255 / (levels - 1) / 2 + 0.5


def test_quantize_known_values():
  v = np.array([0, 42, 43, 127, 128, 212, 213, 255], np.uint8)
  np.testing.assert_array_equal(tk.quantize(v, 4), [0, 0, 1, 1, 2, 2, 3, 3])
  np.testing.assert_array_equal(tk.dequantize(np.arange(4), 4), [0, 85, 170, 255])


# ---------------------------------------------------------------------------
# Pixel tokenizer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('channels,levels', [(3, 4), (1, 16), (3, 7)])
def test_pixel_round_trip_exact_on_quantized_images(channels, levels):
  tok = tk.PixelTokenizer(8, channels, levels)
  assert tok.vocab_size == levels**channels
  assert tok.grid_shape == (8, 8) and tok.num_tokens == 64
  images = _quantized_images(np.random.default_rng(0), 5, 8, channels, levels)
  ids = tok.encode(images)
  assert ids.dtype == np.int32 and ids.shape == (5, 64)
  assert ids.min() >= 0 and ids.max() < tok.vocab_size
  np.testing.assert_array_equal(tok.decode(ids), images)


def test_pixel_token_layout():
  tok = tk.PixelTokenizer(2, 3, 4)
  img = np.zeros((1, 2, 2, 3), np.uint8)
  img[0, 0, 1] = [255, 0, 85]  # levels (3, 0, 1) -> 3*16 + 0*4 + 1
  ids = tok.encode(img)
  np.testing.assert_array_equal(ids, [[0, 49, 0, 0]])  # row-major grid


# ---------------------------------------------------------------------------
# Patch tokenizer
# ---------------------------------------------------------------------------


def _image_from_patches(patches, grid, patch, channels):
  """[grid*grid, patch*patch*C] level rows -> one image [S, S, C] of levels."""
  x = patches.reshape(grid, grid, patch, patch, channels).transpose(0, 2, 1, 3, 4)
  return x.reshape(grid * patch, grid * patch, channels)


def test_patch_codebook_keeps_most_frequent():
  levels, patch = 4, 2
  # Four solid patches with frequencies 5, 3, 2, 1 (+ 5 of level 0 -> 10).
  counts = {3: 5, 1: 3, 2: 2}
  fill = [lvl for lvl, n in counts.items() for _ in range(n)]
  fill += [0] * (16 - len(fill))  # 16 patches in a 4x4 grid; level 0 x 6
  rows = np.repeat(np.array(fill, np.uint8)[:, None], patch * patch, axis=1)
  img = tk.dequantize(_image_from_patches(rows, 4, patch, 1), levels)[None]
  tok = tk.PatchTokenizer.fit(img, size=8, channels=1, levels=levels, patch=patch, codebook_size=3)
  assert tok.vocab_size == 3
  # Order by frequency: level 0 (6), level 3 (5), level 1 (3); level 2 left out.
  np.testing.assert_array_equal(tok.codebook[:, 0], [0, 3, 1])
  assert tok.config_dict()['codebook_size'] == 3


def test_patch_codebook_ties_are_deterministic():
  rng = np.random.default_rng(1)
  images = _quantized_images(rng, 4, 8, 3, 4)
  a = tk.PatchTokenizer.fit(images, 8, 3, 4, 4, 5)
  b = tk.PatchTokenizer.fit(images[::-1].copy(), 8, 3, 4, 4, 5)
  np.testing.assert_array_equal(a.codebook, b.codebook)
  # Every distinct patch appears once here: ties are ordered by the patch bytes.
  keys = [row.tobytes() for row in a.codebook]
  assert keys == sorted(keys)


def test_patch_round_trip_exact_on_codebook_images():
  rng = np.random.default_rng(2)
  images = _quantized_images(rng, 20, 12, 3, 4)
  tok = tk.PatchTokenizer.fit(images, 12, 3, 4, 4, codebook_size=10_000)
  assert tok.vocab_size == 20 * 9  # random patches: all distinct, all kept
  assert tok.grid_shape == (3, 3)
  ids = tok.encode(images)
  assert ids.dtype == np.int32 and ids.shape == (20, 9)
  np.testing.assert_array_equal(tok.decode(ids), images)


def test_patch_unknown_patch_maps_to_nearest_code_by_brute_force():
  rng = np.random.default_rng(3)
  levels, patch, size = 8, 2, 8
  train = _quantized_images(rng, 6, size, 3, levels)
  tok = tk.PatchTokenizer.fit(train, size, 3, levels, patch, codebook_size=40)
  assert tok.vocab_size == 40
  test = _quantized_images(rng, 10, size, 3, levels)
  ids = tok.encode(test)
  np.testing.assert_array_equal(tok.encode(test), ids)  # again, from the memo
  # Brute force: for every patch, the L2-nearest code over quantized values.
  q = tk.quantize(test, levels).astype(np.int64)
  g = size // patch
  rows = q.reshape(10, g, patch, g, patch, 3).transpose(0, 1, 3, 2, 4, 5).reshape(10 * g * g, -1)
  d = ((rows[:, None, :] - tok.codebook[None].astype(np.int64)) ** 2).sum(-1)
  best = d.min(1)
  chosen = d[np.arange(len(rows)), ids.reshape(-1)]
  np.testing.assert_array_equal(chosen, best)
  # Lowest id among equally near codes.
  np.testing.assert_array_equal(ids.reshape(-1), d.argmin(1))
  # The case is a real one: most test patches are not in the codebook.
  assert (best > 0).mean() > 0.5


def test_patch_nearest_code_hand_built():
  # 16 patches of 2x2 levels: 0000 x7, 3333 x5, 0303 x3, 1111 x1; 3 codes kept.
  levels = 4
  pats = np.array([[0, 0, 0, 0], [3, 3, 3, 3], [0, 3, 0, 3], [1, 1, 1, 1]], np.uint8)
  rows = np.repeat(pats, [7, 5, 3, 1], axis=0)
  img = tk.dequantize(_image_from_patches(rows, 4, 2, 1), levels)[None]
  tok = tk.PatchTokenizer.fit(img, 8, 1, levels, 2, codebook_size=3)
  np.testing.assert_array_equal(tok.codebook, pats[:3])
  # 1313: L2^2 20 to code 0, 8 to code 1, 2 to code 2 -> the least frequent code.
  # 1111 (left out of the codebook): 4 to code 0, 16 to code 1, 10 to code 2.
  probes = np.array([[1, 3, 1, 3], [1, 1, 1, 1], [3, 3, 3, 3], [0, 3, 0, 3]], np.uint8)
  probe_img = tk.dequantize(_image_from_patches(np.tile(probes, (4, 1)), 4, 2, 1), levels)[None]
  np.testing.assert_array_equal(tok.encode(probe_img), [[2, 0, 1, 2] * 4])


def _zipf_patch_images(rng, n, pool, grid, patch, levels):
  """Images tiled from a pool of random patches drawn with Zipf frequencies.

  Like real data (a few backgrounds and shapes), a few patches are common and
  many are rare, so a codebook smaller than the pool covers most but not all.
  """
  rows = rng.integers(0, levels, (pool, patch * patch * 3), dtype=np.uint8)
  p = 1.0 / np.arange(1, pool + 1)
  pick = rng.choice(pool, size=(n, grid * grid), p=p / p.sum())
  imgs = [_image_from_patches(rows[k], grid, patch, 3) for k in pick]
  return tk.dequantize(np.stack(imgs), levels)


def test_patch_remembered_nearest_codes_change_nothing():
  """Unseen patches go through the nearest-code search once, then a memo; both must give the same ids.

  (Speed is a benchmark, not a test: see BENCHMARKS.md.)
  """
  rng = np.random.default_rng(4)
  images = _zipf_patch_images(rng, 2000 + 4 * 64, pool=20_000, grid=6, patch=4, levels=4)
  train, fresh = images[:2000], images[2000:].reshape(4, 64, 24, 24, 3)
  tok = tk.PatchTokenizer.fit(train, 24, 3, 4, 4, codebook_size=1024)
  # Unseen images: a good share of their patches miss the codebook.
  codes = set(map(np.ndarray.tobytes, tok.codebook))
  hit = np.mean([r.tobytes() in codes for r in tk.patchify(tk.quantize(fresh[0], 4), 4)])
  assert 0.3 < hit < 0.95, hit
  for batch in fresh:
    cold = tk.PatchTokenizer(24, 3, 4, 4, tok.codebook).encode(batch)   # empty memo
    np.testing.assert_array_equal(tok.encode(batch), cold)
    np.testing.assert_array_equal(tok.encode(batch), cold)              # memo filled by the call before


# ---------------------------------------------------------------------------
# Text tokenizers
# ---------------------------------------------------------------------------

CAPTIONS = [
    'top left: a red circle, small',
    'a blue square at the bottom right.',
    'A red square, top-left',
    "the circle isn't big",
]


def test_split_words():
  assert tk.split_words('Top left: a red circle, small') == [
      'top', 'left', ':', 'a', 'red', 'circle', ',', 'small']


def test_word_fit_order_and_round_trip():
  tok = tk.WordTokenizer.fit(CAPTIONS)
  assert (tok.pad_id, tok.unk_id, tok.kind) == (0, 1, 'word')
  vocab = tok.vocab
  assert vocab[:2] == ['<pad>', '<unk>']
  # By count (desc), ties alphabetically.
  counts = {}
  for c in CAPTIONS:
    for w in tk.split_words(c):
      counts[w] = counts.get(w, 0) + 1
  assert vocab[2:] == sorted(counts, key=lambda w: (-counts[w], w))
  assert vocab[2] == 'a' and counts['a'] == 3
  for caption in CAPTIONS:
    ids = tok.encode(caption, 32)
    assert ids.dtype == np.int32 and ids.shape == (32,)
    assert tok.decode(ids) == caption.lower()
    assert tok.unk_id not in ids


def test_word_unknown_truncation_padding():
  tok = tk.WordTokenizer.fit(CAPTIONS)
  ids = tok.encode('a purple circle, enormous zebra', 8)
  assert (ids == tok.unk_id).sum() == 3
  assert list(ids[6:]) == [0, 0]  # 6 tokens: 'circle' ',' are words too
  assert tok.decode(ids) == 'a <unk> circle, <unk> <unk>'
  short = tok.encode('a red circle at the top', 3)
  assert short.shape == (3,) and tok.decode(short) == 'a red circle'
  assert tok.encode('', 4).tolist() == [0, 0, 0, 0]
  batch = tok.encode_batch(CAPTIONS, 5)
  assert batch.shape == (4, 5) and batch.dtype == np.int32
  # PADs are skipped wherever they stand.
  assert tok.decode([0, ids[0], 0, ids[2], 0]) == 'a circle'


def test_unknown_words_are_those_read_as_unk():
  word = tk.WordTokenizer.fit(CAPTIONS)
  assert word.unknown_words('A purple circle; an enormous purple zebra') == ['purple', ';', 'an', 'enormous', 'zebra']
  assert word.unknown_words(CAPTIONS[0]) == []
  assert tk.ByteTokenizer().unknown_words('猫 purple') == []
  sp = tk.SentencePieceTokenizer.fit(CAPTIONS * 10, 40)
  assert sp.unknown_words(CAPTIONS[0]) == []
  unknown = sp.unknown_words('a 猫 circle')
  assert unknown == ['猫'] and (sp.encode('a 猫 circle', 16) == sp.unk_id).any()


def test_word_max_vocab():
  tok = tk.WordTokenizer.fit(CAPTIONS, max_vocab=4)
  # 'a' (3 times), then ',' first of the words seen twice (alphabetical tie-break).
  assert tok.vocab == ['<pad>', '<unk>', 'a', ',']
  with pytest.raises(ValueError, match='max_vocab'):
    tk.WordTokenizer.fit(CAPTIONS, max_vocab=1)


def test_byte_round_trip_non_ascii():
  tok = tk.ByteTokenizer()
  assert tok.vocab_size == 257 and tok.unk_id is None
  text = 'Café — 猫 🐈 top-left: ok'
  ids = tok.encode(text, 64)
  assert ids.dtype == np.int32 and ids.max() < 257
  assert tok.decode(ids) == text
  assert list(tok.encode('A', 3)) == [ord('A') + 1, 0, 0]
  # Truncation never splits a character: 'é' is 2 bytes, cut after 'caf'.
  assert tok.decode(tok.encode('café', 4)) == 'caf'
  assert tok.decode(tok.encode('café', 5)) == 'café'
  # Any in-range ids decode (invalid UTF-8 is replaced, not raised).
  assert tok.decode([0xC3 + 1, 0x41 + 1]) == '\ufffdA'


def test_text_decode_out_of_range_names_the_id():
  tok = tk.WordTokenizer.fit(CAPTIONS)
  with pytest.raises(ValueError, match=f'id {tok.vocab_size} at position'):
    tok.decode([2, tok.vocab_size])
  with pytest.raises(ValueError, match='id -1'):
    tk.ByteTokenizer().decode([5, -1])
  with pytest.raises(ValueError, match='id 257'):
    tk.ByteTokenizer().decode([257])


# ---------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------


def test_text_save_load_round_trip(tmp_path):
  for tok in [tk.WordTokenizer.fit(CAPTIONS, max_vocab=20), tk.ByteTokenizer()]:
    d = tmp_path / tok.kind
    tok.save(d)
    assert (d / 'text_tokenizer.json').exists()
    back = tk.load_text_tokenizer(d)
    assert type(back) is type(tok)
    assert back.config_dict() == tok.config_dict()
    np.testing.assert_array_equal(back.encode_batch(CAPTIONS + ['zebra'], 12),
                                  tok.encode_batch(CAPTIONS + ['zebra'], 12))


def test_image_save_load_round_trip(tmp_path):
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
  for tok in [tk.PixelTokenizer(8, 3, 5), tk.PatchTokenizer.fit(images[:4], 8, 3, 5, 2, 30)]:
    d = tmp_path / tok.kind
    tok.save(d)
    back = tk.load_image_tokenizer(d)
    assert type(back) is type(tok)
    assert back.config_dict() == tok.config_dict()
    ids = tok.encode(images)
    np.testing.assert_array_equal(back.encode(images), ids)
    np.testing.assert_array_equal(back.decode(ids), tok.decode(ids))


def test_config_dict_contents():
  cfg = tk.PatchTokenizer.fit(np.zeros((1, 8, 8, 3), np.uint8), 8, 3, 4, 4, 16).config_dict()
  assert cfg == {'kind': 'patch', 'size': 8, 'channels': 3, 'levels': 4, 'patch': 4,
                 'codebook_size': 16, 'vocab_size': 1, 'grid_shape': [2, 2]}
  assert tk.PixelTokenizer(8, 1, 4).config_dict()['vocab_size'] == 4


def test_load_missing_names_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='text_tokenizer.json'):
    tk.load_text_tokenizer(tmp_path / 'nothing')
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'nothing')):
    tk.load_image_tokenizer(tmp_path / 'nothing')


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_image_bad_shapes_and_ids():
  pix = tk.PixelTokenizer(8, 3, 4)
  patch = tk.PatchTokenizer.fit(np.zeros((1, 8, 8, 3), np.uint8), 8, 3, 4, 4, 16)
  for tok in (pix, patch):
    with pytest.raises(ValueError, match=r'expects images \[N, 8, 8, 3\], got shape \(2, 8, 8, 1\)'):
      tok.encode(np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match=r'got shape \(8, 8, 3\)'):
      tok.encode(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match='uint8'):
      tok.encode(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=rf'tokens \[N, {tok.num_tokens}\]'):
      tok.decode(np.zeros((1, tok.num_tokens + 1), np.int32))
    bad = np.zeros((2, tok.num_tokens), np.int32)
    bad[1, 3] = tok.vocab_size
    with pytest.raises(ValueError, match=rf'id {tok.vocab_size} at position \(1, 3\)'):
      tok.decode(bad)
  with pytest.raises(ValueError, match='multiple of patch'):
    tk.PatchTokenizer.fit(np.zeros((1, 10, 10, 3), np.uint8), 10, 3, 4, 4, 16)
  with pytest.raises(ValueError, match='levels'):
    tk.PixelTokenizer(8, 3, 1)


# ---------------------------------------------------------------------------
# Kinds (the registry): geometry from the config, and a kind added from outside
# ---------------------------------------------------------------------------


def _image_config(**image):
  from unimm_jax import configuration  # pylint: disable=g-import-not-at-top
  c = configuration.base_config()
  c.model.image_code_features = True
  c.data.fit_examples = 16
  for key, value in image.items():
    c.image[key] = value
  return c


@pytest.mark.parametrize('image', [
    dict(tokenizer='pixel', size=8, channels=3, levels=4),
    dict(tokenizer='pixel', size=6, channels=1, levels=16),
    dict(tokenizer='patch', size=24, channels=3, levels=4, patch=4),
    dict(tokenizer='patch', size=12, channels=1, levels=8, patch=3, codebook_size=20),
], ids=lambda d: f"{d['tokenizer']}{d['size']}c{d['channels']}")
def test_image_kind_geometry_from_the_config_is_what_the_tokenizer_reports(image):
  """The grid, downsampling and code feature dimension the config implies (what the model is sized by before
  anything is fitted) are the built tokenizer's own."""
  from unimm_jax import configuration  # pylint: disable=g-import-not-at-top
  config = _image_config(**image)
  kind = tk.image_kind(config.image.tokenizer)
  size, channels = config.image.size, config.image.channels
  rng = np.random.default_rng(0)
  items = [{'image': rng.integers(0, 256, (size, size, channels), dtype=np.uint8), 'text': ''}
           for _ in range(16)]
  tok = kind.make(config, items if kind.fitted else [])
  assert tok.kind == kind.name and tok.image_shape == (size, size, channels)
  assert configuration.image_token_grid(config) == kind.grid(config) == tok.grid_shape
  assert configuration.tokenizer_downsample(config) * tok.grid_shape[0] == size
  features = tok.code_features()
  assert features.shape == (tok.vocab_size, configuration.image_code_feature_dim(config))
  assert tok.vocab_size <= kind.vocab_bound(config)
  text = tk.make_text_tokenizer(config, ['a red circle'])
  configuration.check_tokenizers(config, text, tok)   # the saved fields the kind names agree with the config


class _GreyBlockTokenizer(tk.ImageTokenizer):
  """A kind no library module knows: one token per 2x2 block, its mean grey value in `levels` steps."""

  kind = 'grey_block'

  def __init__(self, size, channels, levels):
    self.levels = levels
    self.image_shape = (size, size, channels)
    self.grid_shape = (size // 2, size // 2)

  @property
  def vocab_size(self):
    return self.levels

  def _encode(self, images):
    n, s, _, c = images.shape
    blocks = images.reshape(n, s // 2, 2, s // 2, 2, c).mean(axis=(2, 4, 5))
    return tk.quantize(np.round(blocks).astype(np.uint8), self.levels).reshape(n, -1).astype(np.int32)

  def _decode(self, tokens):
    grey = tk.dequantize(tokens, self.levels).reshape(-1, *self.grid_shape)
    s, c = self.image_shape[0], self.image_shape[2]
    return np.repeat(np.repeat(grey, 2, axis=1), 2, axis=2)[..., None].repeat(c, axis=3).reshape(-1, s, s, c)

  def code_features(self):
    return tk.dequantize(np.arange(self.levels), self.levels)[:, None].astype(np.float32) / 255.0 - 0.5

  def config_dict(self):
    return {**super().config_dict(), 'levels': self.levels}


@pytest.fixture
def grey_block_kind():
  kind = tk.register_image_kind(tk.ImageKind(
      name='grey_block',
      make=lambda config, items: _GreyBlockTokenizer(config.image.size, config.image.channels,
                                                     config.image.levels),
      load=lambda directory, payload: _GreyBlockTokenizer(
          payload['config']['size'], payload['config']['channels'], payload['config']['levels']),
      downsample=lambda config: 2,
      vocab_bound=lambda config: config.image.levels,
      config_fields=('size', 'channels', 'levels'),
      code_feature_dim=lambda config: 1,
  ))
  yield kind
  del tk.IMAGE_KINDS[kind.name]


def test_a_kind_registered_outside_the_library_is_made_sized_saved_and_loaded(grey_block_kind, tmp_path):
  from unimm_jax import configuration  # pylint: disable=g-import-not-at-top
  from unimm_jax.data import input_pipeline, shapes  # pylint: disable=g-import-not-at-top
  config = _image_config(tokenizer='grey_block', levels=8)
  assert configuration.image_token_grid(config) == (12, 12)
  assert configuration.tokenizer_downsample(config) == 2 and configuration.image_code_feature_dim(config) == 1
  source = shapes.ShapesSource('train', 8)
  tok = input_pipeline.make_image_tokenizer(config, source)
  assert isinstance(tok, _GreyBlockTokenizer) and tok.grid_shape == (12, 12)
  assert tok.code_features().shape == (8, configuration.image_code_feature_dim(config))
  configuration.check_tokenizers(config, tk.make_text_tokenizer(config, ['a red circle']), tok)
  images = np.stack([source[i]['image'] for i in range(8)])
  tok.save(tmp_path)
  back = tk.load_image_tokenizer(tmp_path)
  assert isinstance(back, _GreyBlockTokenizer)
  np.testing.assert_array_equal(back.encode(images), tok.encode(images))
  config.image.levels = 4
  with pytest.raises(configuration.ConfigError, match='levels=4 but the .* has levels=8'):
    configuration.check_tokenizers(config, tk.make_text_tokenizer(config, ['a red circle']), tok)
  with pytest.raises(ValueError, match='already registered'):
    tk.register_image_kind(grey_block_kind)


def test_unknown_kinds_name_the_known_ones(tmp_path):
  with pytest.raises(ValueError, match="unknown image tokenizer kind 'nope'; known: 'pixel', 'patch', 'fsq', 'vq'"):
    tk.image_kind('nope')
  tk.PixelTokenizer(4, 1, 2).save(tmp_path)
  payload = (tmp_path / 'image_tokenizer.json').read_text().replace('"pixel"', '"nope"')
  (tmp_path / 'image_tokenizer.json').write_text(payload)
  with pytest.raises(ValueError, match="image_tokenizer.json: unknown image tokenizer kind 'nope'"):
    tk.load_image_tokenizer(tmp_path)
  with pytest.raises(ValueError, match="unknown text tokenizer kind 'nope'; known: 'word', 'byte', 'sentencepiece'"):
    tk.text_kind('nope')
