"""image.tokenizer=vqgan against the upstream diffusers VQModel, rebuilt tiny in numpy (tests/vqgan_upstream.py).

Two architectures: the default (mid-block attention, vq_embed_dim 6 != latent_channels 4, 2 blocks: 2x) and an
aMUSEd-like one (no mid-block attention, vq_embed_dim = latent_channels, 3 blocks of 2 layers: 4x).
"""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import vqgan_upstream as up  # pylint: disable=g-import-not-at-top,wrong-import-position

from unimm_jax import configuration  # pylint: disable=g-import-not-at-top,wrong-import-position
from unimm_jax import tokenizers  # pylint: disable=g-import-not-at-top,wrong-import-position
from unimm_jax.tokenizers import vqgan  # pylint: disable=g-import-not-at-top,wrong-import-position

SIZE = 16
CONFIGS = {
    "attention": up.tiny_config(),
    "amused_like": up.tiny_config(block_out_channels=[8, 16, 16], layers_per_block=2, mid_block_add_attention=False,
                                  vq_embed_dim=None, latent_channels=5),
}


def _images(n, seed=0):
  """Smooth images with some structure (a gradient, a disc) plus noise, so codes vary over the grid."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
  out = []
  for _ in range(n):
    a, b, c = rng.uniform(0, 1, 3)
    base = np.stack([a * yy + (1 - a) * xx, (xx - b) ** 2 + (yy - c) ** 2 < 0.1, 1 - xx * yy], -1).astype(float)
    out.append(np.clip(255 * base + rng.normal(0, 30, base.shape), 0, 255))
  return np.stack(out).astype(np.uint8)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request, tmp_path_factory):
  cfg = CONFIGS[request.param]
  tensors = up.random_tensors(cfg, seed=1)
  directory = up.write_model(tmp_path_factory.mktemp(request.param) / "vqvae", cfg, tensors)
  tok = vqgan.VQGANTokenizer(directory, SIZE, encode_batch=2)
  return cfg, tensors, directory, tok, up.Reference(cfg, tensors)


def test_geometry_comes_from_config_json(model):
  cfg, _, _, tok, _ = model
  d = 2 ** (len(cfg["block_out_channels"]) - 1)
  assert tok.grid_shape == (SIZE // d, SIZE // d) and tok.vocab_size == cfg["num_vq_embeddings"]
  assert tok.code_features().shape == (cfg["num_vq_embeddings"], cfg["vq_embed_dim"] or cfg["latent_channels"])


def test_encode_matches_upstream(model):
  """Latents within 1e-4 of the upstream's encode(x).latents, and the code indices exactly its quantizer's."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from unimm_jax.models import vqgan as net  # pylint: disable=g-import-not-at-top
  cfg, _, _, tok, ref = model
  images = _images(3)
  want_idx, want_z = ref.encode_indices(images)
  got_z = net.VQModel(tok.cfg).apply({"params": tok._params}, jnp.asarray(images, jnp.float32) / 255.0,
                                     method=net.VQModel.encode)
  np.testing.assert_allclose(np.asarray(got_z), want_z.transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
  got_idx = tok.encode(images)
  assert got_idx.dtype == np.int32 and got_idx.shape == (3, tok.num_tokens)
  np.testing.assert_array_equal(got_idx, want_idx)
  assert len(np.unique(got_idx)) > 3, "the test images should use several codes"
  # One image at a time (a padded chunk) gives the same tokens as the batch.
  np.testing.assert_array_equal(np.concatenate([tok.encode(im[None]) for im in images]), got_idx)


def test_decode_matches_upstream(model):
  cfg, _, _, tok, ref = model
  rng = np.random.default_rng(2)
  idx = rng.integers(0, cfg["num_vq_embeddings"], (3, tok.num_tokens))
  want = ref.decode_indices(idx, tok.grid_shape)
  got = tok.decode_float(idx)
  assert got.shape == (3, SIZE, SIZE, 3)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  pixels = tok.decode(idx)
  want_u8 = np.round(np.clip(want, 0, 1) * 255)    # the pipelines' .clip(0, 1) then (x * 255).round()
  assert pixels.dtype == np.uint8
  near_half = np.abs(np.clip(want, 0, 1) * 255 % 1 - 0.5) < 1e-2    # float32 may round these either way
  np.testing.assert_array_equal(pixels[~near_half], want_u8[~near_half])
  assert np.abs(pixels.astype(int) - want_u8).max() <= 1


def test_nearest_code_rule(model):
  """An embedding equal to (or nearer than any other to) a codebook row encodes to that row's index: code ->
  index -> code is the identity, and random latents get the upstream's argmin of torch.cdist."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from unimm_jax.models import vqgan as net  # pylint: disable=g-import-not-at-top
  cfg, _, _, tok, ref = model
  book = tok.codebook
  k = len(book)
  perm = np.random.default_rng(3).permutation(k)
  np.testing.assert_array_equal(np.asarray(net.nearest_code(jnp.asarray(book[perm]), jnp.asarray(book))), perm)
  nudged = book[perm] + 1e-3 * np.random.default_rng(4).standard_normal(book.shape)
  np.testing.assert_array_equal(np.asarray(net.nearest_code(jnp.asarray(nudged, jnp.float32), jnp.asarray(book))),
                                perm)
  z = np.random.default_rng(5).standard_normal((2, 3, 3, book.shape[1]))
  want = ref.quantize_indices(z.transpose(0, 3, 1, 2))
  got = np.asarray(net.nearest_code(jnp.asarray(z, jnp.float32), jnp.asarray(book))).reshape(-1)
  np.testing.assert_array_equal(got, want)
  # Ties go to the first index, as torch.argmin's do.
  twin = np.concatenate([book[:1], book[:1], book[1:]])
  assert int(net.nearest_code(jnp.asarray(book[:1]), jnp.asarray(twin))[0]) == 0
  assert k == cfg["num_vq_embeddings"]


def test_save_and_load_round_trip(model, tmp_path):
  _, _, directory, tok, _ = model
  tok.save(tmp_path)
  for name in (vqgan.CONFIG_FILE, vqgan.WEIGHTS_FILE):
    assert (tmp_path / vqgan.SAVED_DIR / name).read_bytes() == open(os.path.join(directory, name), "rb").read()
  again = tokenizers.load_image_tokenizer(tmp_path)
  assert isinstance(again, vqgan.VQGANTokenizer) and again.config_dict() == tok.config_dict()
  images = _images(2, seed=7)
  np.testing.assert_array_equal(again.encode(images), tok.encode(images))


def _config(path, size=SIZE, codebook_size=64):
  c = configuration.base_config()
  c.image.tokenizer, c.image.tokenizer_path, c.image.size = "vqgan", str(path), size
  c.image.codebook_size = codebook_size
  return c


def test_registered_kind_reads_the_upstream_config(tmp_path):
  cfg = CONFIGS["attention"]
  up.write_model(tmp_path / "ckpt" / "vqvae", cfg, up.random_tensors(cfg))
  assert "vqgan" in configuration.CHOICES["image.tokenizer"]
  kind = tokenizers.image_kind("vqgan")
  config = _config(tmp_path / "ckpt")          # the checkpoint root: its vqvae/ subfolder is found
  assert kind.downsample(config) == 2 and kind.grid(config) == (8, 8)
  assert kind.vocab_bound(config) == 64 and kind.code_feature_dim(config) == 6
  tok = kind.make(config, [])
  assert tok.kind == "vqgan" and tok.grid_shape == (8, 8) and tok.encode_batch == config.tokenizer.encode_batch
  assert kind.check_saved(config, tok) == []
  # Without a path (a dry run), the geometry is the published aMUSEd VQ-GAN's: 16x, 8,192 codes of 64 numbers.
  published = _config("", size=256, codebook_size=8192)
  assert kind.grid(published) == (16, 16) and kind.code_feature_dim(published) == 64
  # The model's image vocabulary (config.image.codebook_size) must be the checkpoint's codebook.
  wrong = _config(tmp_path / "ckpt", codebook_size=8192)
  [problem] = kind.check_saved(wrong, tok)
  assert "config.image.codebook_size=8192 but the VQ-GAN at the workdir has 64 codes" in problem
  _one_line_error(lambda: kind.make(wrong, []), "config.image.codebook_size=8192 but the VQ-GAN at .* has 64 codes "
                  r"\(num_vq_embeddings\); set --config.image.codebook_size=64")


def _one_line_error(fn, match):
  with pytest.raises(ValueError, match=match) as e:
    fn()
  assert "\n" not in str(e.value), str(e.value)


def test_bad_inputs_fail_in_one_line(tmp_path):
  cfg = CONFIGS["attention"]
  tensors = up.random_tensors(cfg)
  # A tokenizer directory of another kind: a diffusers AutoencoderKL, a unimm_jax tokenizer, nothing at all.
  other = up.write_model(tmp_path / "kl", {**cfg, "_class_name": "AutoencoderKL"}, tensors)
  _one_line_error(lambda: vqgan.VQGANTokenizer(other, SIZE), "_class_name is 'AutoencoderKL', expected 'VQModel'")
  (tmp_path / "fsq").mkdir()
  (tmp_path / "fsq" / tokenizers.IMAGE_TOKENIZER_FILE).write_text(json.dumps({"kind": "fsq"}))
  _one_line_error(lambda: vqgan.VQGANTokenizer(tmp_path / "fsq", SIZE), "config.image.tokenizer='fsq'")
  _one_line_error(lambda: tokenizers.image_kind("vqgan").make(_config(""), []), "needs config.image.tokenizer_path")
  spatial = up.write_model(tmp_path / "movq", {**cfg, "norm_type": "spatial"}, tensors)
  _one_line_error(lambda: vqgan.VQGANTokenizer(spatial, SIZE), "norm_type 'spatial'")
  # A codebook size that disagrees with config.json (and, in test_registered_kind..., with the model's config).
  fewer = dict(tensors, **{"quantize.embedding.weight": tensors["quantize.embedding.weight"][:32]})
  small = up.write_model(tmp_path / "small_book", cfg, fewer)
  _one_line_error(lambda: vqgan.VQGANTokenizer(small, SIZE), "has 32 codes.*num_vq_embeddings 64")
  # Weights of another architecture than config.json says.
  wide = up.write_model(tmp_path / "wide", cfg, up.random_tensors(up.tiny_config(latent_channels=7)))
  _one_line_error(lambda: vqgan.VQGANTokenizer(wide, SIZE), "has shape .*, its config.json implies")
  # A PyTorch-only directory.
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "config.json").write_text(json.dumps(cfg))
  (tmp_path / "bin" / "diffusion_pytorch_model.bin").write_bytes(b"")
  _one_line_error(lambda: vqgan.VQGANTokenizer(tmp_path / "bin", SIZE), "turn it into")
  # An image size the tokenizer cannot take.
  good = up.write_model(tmp_path / "good", cfg, tensors)
  _one_line_error(lambda: vqgan.VQGANTokenizer(good, 17), "config.image.size=17 is not a positive multiple of the "
                  "VQ-GAN's downsampling 2")
  _one_line_error(lambda: vqgan.VQGANTokenizer(good, SIZE, channels=1), "config.image.channels=1")
  assert sorted(os.listdir(good)) == ["config.json", "diffusion_pytorch_model.safetensors"]   # nothing written


def test_checkpoints_with_the_deprecated_attention_names_load_the_same():
  """Checkpoints saved before diffusers 0.14 name the mid-block attention query/key/value/proj_attn."""
  import jax  # pylint: disable=g-import-not-at-top
  from unimm_jax.models import vqgan as net  # pylint: disable=g-import-not-at-top
  cfg = CONFIGS["attention"]
  tensors = up.random_tensors(cfg)
  old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
  renamed = {}
  for name, x in tensors.items():
    for new, old in old_names.items():
      name = name.replace(new, old) if ".attentions." in name else name
    renamed[name] = x
  assert any(".proj_attn." in n for n in renamed)
  spec = vqgan.VQGANConfig.from_json(cfg, "test")
  a, b = net.params_from_state_dict(spec, tensors), net.params_from_state_dict(spec, renamed)
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


def test_the_published_amused_layout_maps_one_to_one():
  """Every tensor of aMUSEd's VQ-GAN (8,192 codes, 16x, no mid-block attention) has its parameter, of its shape
  (shapes only: no weights are made)."""
  from unimm_jax.models import vqgan as net  # pylint: disable=g-import-not-at-top
  p = vqgan.PUBLISHED
  cfg = up.tiny_config(block_out_channels=list(p.block_out_channels), layers_per_block=p.layers_per_block,
                       latent_channels=p.latent_channels, num_vq_embeddings=p.num_vq_embeddings, vq_embed_dim=None,
                       norm_num_groups=p.norm_num_groups, mid_block_add_attention=False)
  assert vqgan.VQGANConfig.from_json(cfg, "aMUSEd") == p
  want = {path: spec.shape for path, spec in net.abstract_params(p).items()}
  got = {}
  for name, shape in up.tensor_shapes(cfg).items():
    got[net.flax_path(name, len(shape))] = net.to_flax(name, np.zeros(shape, np.float32)).shape
  assert got == want
  assert sum(np.prod(s) for s in want.values()) > 1e8 and p.downsample == 16
