"""FolderSource and load_image: skips by reason, modes, sizes, centre crop."""

import json
import logging
import pickle

import grain
import numpy as np
from PIL import Image
import pytest

from unimm_jax.data import folder

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _stripes(w, h, axis):
  """RGB image with red | green | blue bands: 1/4, 1/2, 1/4 along `axis`."""
  a = np.zeros((h, w, 3), np.uint8)
  n = w if axis == 1 else h
  idx = [slice(None)] * 2
  for color, (lo, hi) in zip((RED, GREEN, BLUE), ((0, n // 4), (n // 4, 3 * n // 4), (3 * n // 4, n))):
    idx[axis] = slice(lo, hi)
    a[tuple(idx)] = color
  return a


def _write(path, lines):
  path.write_text(''.join((l if isinstance(l, str) else json.dumps(l)) + '\n' for l in lines))


@pytest.fixture
def data_dir(tmp_path):
  img = tmp_path / 'img'
  img.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(_stripes(48, 24, axis=1)).save(img / 'wide.png')  # non-square, no resize at 24
  Image.fromarray(_stripes(24, 48, axis=0)).save(img / 'tall.png')
  Image.fromarray(_stripes(96, 48, axis=1)).save(img / 'wide_big.png')  # resized 2x down
  rgba = np.zeros((32, 32, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, 16:, 3] = 255  # left half fully transparent -> white
  Image.fromarray(rgba).save(img / 'rgba.png')
  Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(img / 'gray.png')
  Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)).convert(
      'P', palette=Image.Palette.ADAPTIVE, colors=16).save(img / 'palette.png')
  Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(img / 'photo.jpg', quality=90)
  Image.fromarray(np.full((30, 30, 3), 77, np.uint8)).convert('CMYK').save(img / 'cmyk.jpg')
  Image.fromarray(np.full((24, 24), 32896, np.uint16)).save(img / 'deep.png')  # 32896 / 257 = 128
  (img / 'broken.png').write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
  good = [
      {'image': 'img/wide.png', 'text': '  a wide image  '},
      {'image': 'img/tall.png', 'text': 'a tall image'},
      {'image': 'img/wide_big.png', 'text': 'a big wide image'},
      {'image': 'img/rgba.png', 'text': 'rgba'},
      {'image': 'img/gray.png', 'text': 'gray'},
      {'image': 'img/palette.png', 'text': 'palette'},
      {'image': 'img/photo.jpg', 'text': 'photo'},
      {'image': 'img/cmyk.jpg', 'text': 'cmyk'},
      {'image': 'img/deep.png', 'text': 'sixteen bit'},
  ]
  bad = [
      {'image': 'img/nowhere.png', 'text': 'missing'},
      {'image': 'img/broken.png', 'text': 'broken'},
      {'image': 'img/gray.png', 'text': '   '},
      '{"image": "img/gray.png", "text": ',  # not JSON
      {'image': 'img/gray.png'},  # no text
      '',  # blank lines are ignored, not counted
  ]
  _write(tmp_path / 'train.jsonl', good[:3] + bad[:3] + good[3:] + bad[3:])
  return tmp_path


def test_skip_counts_and_items(data_dir, caplog):
  with caplog.at_level(logging.INFO):
    src = folder.FolderSource(data_dir, 'train', 24, 3)
  assert src.skipped == {'bad_line': 2, 'empty_caption': 1, 'missing_image': 1, 'unreadable_image': 1}
  assert len(src) == 9
  assert isinstance(src, grain.sources.RandomAccessDataSource)
  texts = [src[i]['text'] for i in range(len(src))]
  assert texts[:3] == ['a wide image', 'a tall image', 'a big wide image']  # file order, stripped
  for i in range(len(src)):
    item = src[i]
    assert item['image'].dtype == np.uint8 and item['image'].shape == (24, 24, 3)
  assert (f'folder source {data_dir / "train.jsonl"}: 9 usable, skipped 2 bad_line, 1 empty_caption, '
          '1 missing_image, 1 unreadable_image') in caplog.text
  with pytest.raises(IndexError):
    src[len(src)]


def test_centre_crop_and_conversions(data_dir):
  src = folder.FolderSource(data_dir, 'train', 24, 3)
  by_text = {src[i]['text']: src[i]['image'] for i in range(len(src))}
  # 48x24 -> the middle 24 columns, which are exactly the green band.
  np.testing.assert_array_equal(by_text['a wide image'], np.broadcast_to(GREEN, (24, 24, 3)))
  np.testing.assert_array_equal(by_text['a tall image'], np.broadcast_to(GREEN, (24, 24, 3)))
  # 96x48 -> 48x24 (bicubic) -> middle: green away from the band edges.
  np.testing.assert_allclose(by_text['a big wide image'][:, 3:-3], np.broadcast_to(GREEN, (24, 18, 3)), atol=2)
  rgba = by_text['rgba']
  np.testing.assert_allclose(rgba[:, :10], 255, atol=1)  # transparent -> white
  np.testing.assert_allclose(rgba[:, 14:], np.broadcast_to((200, 0, 0), (24, 10, 3)), atol=1)
  np.testing.assert_array_equal(by_text['sixteen bit'], 128)  # scaled, not clipped to 255
  np.testing.assert_allclose(by_text['cmyk'].astype(int), 77, atol=4)
  gray = by_text['gray']
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])  # L -> RGB copies the channel


def test_one_channel(data_dir):
  src = folder.FolderSource(data_dir, 'train', 16, 1)
  assert len(src) == 9
  for i in range(len(src)):
    assert src[i]['image'].shape == (16, 16, 1) and src[i]['image'].dtype == np.uint8
  deep = next(src[i]['image'] for i in range(len(src)) if src[i]['text'] == 'sixteen bit')
  np.testing.assert_allclose(deep.astype(int), 128, atol=1)


def test_load_image_direct(tmp_path):
  Image.fromarray(_stripes(40, 20, axis=1)).save(tmp_path / 'x.png')
  out = folder.load_image(tmp_path / 'x.png', 10, 3)  # 40x20 -> 20x10 -> middle 10 columns
  assert out.shape == (10, 10, 3) and out.dtype == np.uint8
  np.testing.assert_allclose(out[:, 2:-2], np.broadcast_to(GREEN, (10, 6, 3)), atol=2)
  small = folder.load_image(tmp_path / 'x.png', 30, 1)  # upscaled: shorter side 20 -> 30
  assert small.shape == (30, 30, 1)


def test_pickle_round_trip(data_dir):
  src = folder.FolderSource(data_dir, 'train', 24, 3)
  back = pickle.loads(pickle.dumps(src))
  assert len(back) == len(src) and back.skipped == src.skipped
  for i in range(len(src)):
    np.testing.assert_array_equal(back[i]['image'], src[i]['image'])
    assert back[i]['text'] == src[i]['text']
  # Items are copies: editing one does not change the source.
  src[0]['image'][:] = 0
  assert src[0]['image'].any()


def test_nothing_usable_names_file_and_counts(tmp_path):
  (tmp_path / 'b.png').write_bytes(b'not a png at all')
  _write(tmp_path / 'val.jsonl', [
      {'image': 'b.png', 'text': 'broken'},
      {'image': 'gone.png', 'text': 'missing'},
      'nonsense',
  ])
  with pytest.raises(ValueError, match=r'val\.jsonl: 0 usable, skipped 1 bad_line, 1 missing_image, '
                                       r'1 unreadable_image'):
    folder.FolderSource(tmp_path, 'val', 24, 3)


def test_missing_jsonl(tmp_path):
  with pytest.raises(ValueError, match=r'train\.jsonl does not exist'):
    folder.FolderSource(tmp_path, 'train', 24, 3)
