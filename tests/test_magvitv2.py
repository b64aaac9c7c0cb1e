"""``image.tokenizer=magvitv2``: the MAGVIT-v2 tokenizer checked against a tiny checkpoint written in the upstream's
exact layout and the upstream's forward pass in numpy (magvitv2_upstream.py): encoder latents and decoder output
within 1e-4 (float32), codes exactly, the LFQ code <-> index rule, and one clear line for each bad input."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import magvitv2_upstream as up  # pylint: disable=g-import-not-at-top,wrong-import-position

from unimm_jax import tokenizers as tk  # pylint: disable=g-import-not-at-top,wrong-import-position
from unimm_jax.tokenizers import magvitv2  # pylint: disable=g-import-not-at-top,wrong-import-position

SIZE, BITS = 16, 6   # 16 px images, 4x downsampling -> a 4 x 4 grid of 2^6 codes


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
  args = up.tiny_args()
  tensors = up.random_tensors(args)
  src = tmp_path_factory.mktemp("magvitv2") / "showlab_magvitv2"
  up.write_checkpoint(src, tensors)
  return src, args, tensors, up.Reference(args, tensors)


def _config(src, **image):
  from unimm_jax import configuration  # pylint: disable=g-import-not-at-top
  c = configuration.base_config()
  c.image.tokenizer = "magvitv2"
  c.image.tokenizer_path = str(src)
  c.image.size, c.image.channels, c.image.codebook_size = SIZE, 3, 2 ** BITS
  c.model.image_code_features = True
  for key, value in image.items():
    c.image[key] = value
  return c


@pytest.fixture(scope="module")
def tok(upstream):
  return tk.image_kind("magvitv2").make(_config(upstream[0]), [])


def _images(n=3, size=SIZE, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_the_architecture_is_read_from_the_tensors(upstream, tok):
  _, args, _, _ = upstream
  a = tok.arch
  assert (a.enc_widths, a.enc_blocks, a.enc_attn) == ((32, 64, 64), (1, 2, 1), (False, False, True))
  assert (a.dec_widths, a.dec_blocks, a.dec_attn) == ((32, 32, 64), (2, 1, 1), (False, False, True))
  assert (a.codebook_dim, a.downsample, a.in_channels, a.out_channels) == (BITS, 4, 3, 3)
  assert a.tensor_shapes() == {**up.encoder_shapes(args["encoder"]), **up.decoder_shapes(args["decoder"])}
  assert (tok.vocab_size, tok.grid_shape, tok.image_shape) == (2 ** BITS, (4, 4), (SIZE, SIZE, 3))


def test_the_published_architecture_is_the_upstream_default():
  """MAGVITv2() with no arguments: VQGANEncoder() / VQGANDecoder() defaults -> 16x, 8,192 codes."""
  args = {"encoder": dict(ch=128, ch_mult=[1, 2, 2, 4, 4], num_res_blocks=[4, 3, 4, 3, 4], attn_resolutions=[5],
                          resolution=256, z_channels=13, in_ch=3),
          "decoder": dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=[4, 4, 3, 4, 3], attn_resolutions=[5],
                          resolution=256, z_channels=13, out_ch=3)}
  shapes = {**up.encoder_shapes(args["encoder"]), **up.decoder_shapes(args["decoder"])}
  assert magvitv2.arch_from_shapes(shapes, "published") == magvitv2.PUBLISHED
  assert magvitv2.PUBLISHED.tensor_shapes() == shapes
  assert (magvitv2.PUBLISHED.downsample, magvitv2.PUBLISHED.codebook_size) == (16, 8192)


def test_encoder_latents_and_codes_match_the_upstream(upstream, tok):
  *_, ref = upstream
  images = _images(5)
  want = ref.latents(images)
  got = tok.latents(images)
  assert got.shape == want.shape == (5, 4, 4, BITS)
  assert np.abs(want).max() > 0.5     # latents large enough that a wrong convention would show
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # Codes exactly; no latent sits so close to 0 that float32 rounding could flip its sign.
  assert np.abs(want).min() > 1e-4
  codes = tok.encode(images)
  np.testing.assert_array_equal(codes, ref.get_code(images))
  assert codes.dtype == np.int32 and len(np.unique(codes)) > 10   # many codes, so the bit order is exercised


def test_decoder_matches_the_upstream(upstream, tok):
  *_, ref = upstream
  rng = np.random.default_rng(1)
  codes = rng.integers(0, 2 ** BITS, (5, 16))
  codes[0] = np.arange(16)            # low codes (few bits set) and the extremes
  codes[1, :2] = [0, 2 ** BITS - 1]
  want = ref.decode_code(codes, (4, 4))
  got = tok.decode_float(codes)
  assert got.shape == want.shape == (5, SIZE, SIZE, 3)
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # uint8 as the upstream's scripts make it (truncation): equal except where float32 rounding crosses an integer.
  pixels = tok.decode(codes)
  assert pixels.dtype == np.uint8 and pixels.shape == (5, SIZE, SIZE, 3)
  diff = np.abs(pixels.astype(int) - ref.to_uint8(want).astype(int))
  assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_lfq_code_index_bijection_is_the_upstreams(upstream, tok):
  """Every index -> its code (the upstream's embedding row, channel 0 the most significant bit) -> the same index."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from unimm_jax.models import magvitv2 as net  # pylint: disable=g-import-not-at-top
  *_, ref = upstream
  idx = np.arange(2 ** BITS)
  codes = np.asarray(net.lfq_codes(jnp.asarray(idx), BITS))
  np.testing.assert_array_equal(codes, up.lfq_embedding(BITS))
  np.testing.assert_array_equal(magvitv2.code_table(BITS), up.lfq_embedding(BITS))
  np.testing.assert_array_equal(tok.code_features(), up.lfq_embedding(BITS))
  np.testing.assert_array_equal(np.asarray(net.lfq_indices(jnp.asarray(codes))), idx)
  # and the upstream's get_indices on those codes: [2^D, D] -> NCHW [2^D, D, 1, 1]
  np.testing.assert_array_equal(ref.get_indices(codes[:, :, None, None]).reshape(-1), idx)
  assert codes[1].tolist() == [-1] * (BITS - 1) + [1] and codes[2 ** (BITS - 1)].tolist() == [1] + [-1] * (BITS - 1)
  # z == 0 is a -1 (bit 0), as the upstream's ``z > 0``
  assert int(net.lfq_indices(jnp.zeros((BITS,)))) == 0


def test_save_load_and_batch_independence(upstream, tok, tmp_path):
  *_, ref = upstream
  images = _images(11, seed=2)         # more than one chunk of encode_batch=8, the last padded
  codes = tok.encode(images)
  np.testing.assert_array_equal(codes, ref.get_code(images))
  np.testing.assert_array_equal(codes[3:4], tok.encode(images[3:4]))
  tok.save(tmp_path)
  saved = json.loads((tmp_path / tk.IMAGE_TOKENIZER_FILE).read_text())
  assert saved["kind"] == "magvitv2" and saved["config"]["vocab_size"] == 2 ** BITS
  again = tk.load_image_tokenizer(tmp_path)
  np.testing.assert_array_equal(again.encode(images), codes)
  np.testing.assert_array_equal(again.decode(codes), tok.decode(codes))
  # the weights were written back in the upstream's names and layout, bit for bit
  upstream_back = again.upstream_tensors()
  for name, x in upstream[2].items():
    if name.startswith(("encoder.", "decoder.")):
      np.testing.assert_array_equal(upstream_back[name], x)
  # a run pointed at a saved tokenizer directory loads it too
  from_saved = tk.image_kind("magvitv2").make(_config(tmp_path), [])
  np.testing.assert_array_equal(from_saved.encode(images[:2]), codes[:2])


def test_geometry_from_the_config_is_the_tokenizers(upstream, tok):
  from unimm_jax import configuration  # pylint: disable=g-import-not-at-top
  config = configuration.validate(_config(upstream[0]))
  kind = tk.image_kind("magvitv2")
  assert configuration.tokenizer_downsample(config) == 4
  assert configuration.image_token_grid(config) == kind.grid(config) == tok.grid_shape
  assert kind.vocab_bound(config) == tok.vocab_size
  assert configuration.image_code_feature_dim(config) == tok.code_features().shape[1] == BITS
  text = tk.make_text_tokenizer(config, ["a red circle"])
  configuration.check_tokenizers(config, text, tok)
  # without a path (a dry run before the download): the published geometry
  assert configuration.tokenizer_downsample(_config("", size=256, codebook_size=8192)) == 16


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear line each
# ---------------------------------------------------------------------------------------------------------------
def _one_line_error(fn, *match):
  with pytest.raises((ValueError, FileNotFoundError)) as err:
    fn()
  message = str(err.value)
  assert "\n" not in message, message
  for m in match:
    assert m in message, message
  return message


def test_an_image_size_the_downsampling_does_not_divide(upstream, tok):
  make = tk.image_kind("magvitv2").make
  _one_line_error(lambda: make(_config(upstream[0], size=18), []), "config.image.size=18",
                  "downsampling 4", "16")
  _one_line_error(lambda: tok.encode(_images(1, size=20)), "[N, 16, 16, 3]")


def test_a_codebook_size_that_disagrees(upstream):
  make = tk.image_kind("magvitv2").make
  _one_line_error(lambda: make(_config(upstream[0], codebook_size=8192), []),
                  "config.image.codebook_size=8192", "2^6 = 64", "--config.image.codebook_size=64")
  _one_line_error(lambda: tk.image_kind("magvitv2").code_feature_dim(_config(upstream[0], codebook_size=100)),
                  "not a power of two")
  _one_line_error(lambda: make(_config(upstream[0], channels=1), []), "config.image.channels=1")


def test_a_directory_of_another_kind(upstream, tmp_path):
  src, _, tensors, _ = upstream
  make = tk.image_kind("magvitv2").make
  # a diffusers VQModel download (aMUSEd's tokenizer)
  vq = tmp_path / "vqmodel"
  vq.mkdir()
  (vq / "config.json").write_text(json.dumps({"_class_name": "VQModel", "num_vq_embeddings": 8192}))
  up.write_safetensors(vq / "diffusion_pytorch_model.safetensors", {"quantize.embedding.weight": np.zeros((4, 2),
                                                                                                         np.float32)})
  _one_line_error(lambda: make(_config(vq), []), "'VQModel'", "not a MAGVIT-v2 checkpoint", "vqgan")
  # safetensors without the MAGVIT-v2 tensors
  (vq / "config.json").unlink()
  _one_line_error(lambda: make(_config(vq), []), "not a MAGVIT-v2 checkpoint", "encoder.conv_in.weight")
  # a unimm_jax tokenizer of another kind saved there
  other = tmp_path / "patch_tokenizer"
  tk.PixelTokenizer(SIZE, 3, 4).save(other)
  _one_line_error(lambda: make(_config(other), []), "'pixel'", "not a MAGVIT-v2 checkpoint")
  # a PyTorch pickle only, and a missing directory
  pickle = tmp_path / "bin_only"
  pickle.mkdir()
  (pickle / "pytorch_model.bin").write_bytes(b"PK")
  _one_line_error(lambda: make(_config(pickle), []), "pytorch_model.bin", "convert")
  _one_line_error(lambda: make(_config(tmp_path / "nowhere"), []), "does not exist")
  _one_line_error(lambda: make(_config(""), []), "config.image.tokenizer_path")
  # a tensor missing, one of the wrong shape, the LFQ table in another bit order
  for name, change, match in [
      ("decoder.up.1.block.0.conv2.weight", None, "decoder.up.1.block.0.conv2.weight [32, 32, 3, 3] is missing"),
      ("encoder.mid.attn_1.q.weight", np.zeros((64, 32, 1, 1), np.float32), "encoder.mid.attn_1.q.weight is [64, 32"),
      ("quantize.embedding", up.lfq_embedding(BITS)[:, ::-1].copy(), "quantize.embedding"),
  ]:
    bad = tmp_path / name.replace(".", "_")
    shutil.copytree(src, bad)
    changed = dict(tensors)
    if change is None:
      del changed[name]
    else:
      changed[name] = change
    up.write_safetensors(bad / "pytorch_model.safetensors", changed)
    _one_line_error(lambda bad=bad: make(_config(bad), []), match)
