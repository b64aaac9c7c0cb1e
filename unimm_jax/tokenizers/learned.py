"""The learned image tokenizer (FSQ or VQ autoencoder) behind the same interface as the pixel and patch ones.

``python -m unimm_jax.tokenizer_main`` trains it and, at the end, saves it into its workdir as
``image_tokenizer.json`` (the spec: kind, sizes, levels) plus ``image_tokenizer_params.safetensors`` (encoder,
decoder and, for VQ, the codebook). A unified run with ``image.tokenizer=fsq|vq`` and
``image.tokenizer_path=<that workdir>`` loads it and copies both files into ``WORKDIR/tokenizers/``, from where
every reader (Pipeline, export bundles, pretokenize) loads it like any other fitted tokenizer.

``encode``: uint8 images -> encoder -> quantize -> code indexes (int32 [N, h*w], row-major over the grid);
``decode``: indexes -> code vectors -> decoder -> uint8 images. Both run as jitted calls over chunks of a fixed
``encode_batch`` images (the last chunk padded), so any number of images reuses one compiled program and an
image's tokens do not depend on how many others were encoded with it: the pretokenized and the on-the-fly
pipelines give the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from unimm_jax.models import quantizers
from unimm_jax.models.autoencoder import Autoencoder, AutoencoderConfig, to_uint8, to_unit
from unimm_jax.tokenizers import base

PARAMS_FILE = "image_tokenizer_params.safetensors"
_CODEBOOK_KEY = "vq_codebook"


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
  """Everything static about a learned tokenizer: network sizes and quantizer (hashable, jit-static)."""

  kind: str                        # fsq | vq
  size: int                        # image side in pixels
  net: AutoencoderConfig
  fsq_levels: tuple[int, ...] = ()
  vq_codebook_size: int = 0

  def __post_init__(self):
    if self.kind not in ("fsq", "vq"):
      raise ValueError(f"learned image tokenizer kind {self.kind!r} is not 'fsq' or 'vq'")
    if self.kind == "fsq":
      object.__setattr__(self, "fsq_levels", quantizers.check_fsq_levels(self.fsq_levels))
      if self.net.latent_dim != len(self.fsq_levels):
        raise ValueError(f"fsq: latent_dim {self.net.latent_dim} != number of levels {len(self.fsq_levels)}")
    elif self.vq_codebook_size < 1:
      raise ValueError(f"vq: codebook size {self.vq_codebook_size} must be >= 1")
    self.net.grid(self.size)   # raises for sizes the downsampling does not divide

  @property
  def vocab_size(self) -> int:
    return math.prod(self.fsq_levels) if self.kind == "fsq" else self.vq_codebook_size

  @property
  def grid(self) -> tuple[int, int]:
    return self.net.grid(self.size)

  def to_dict(self) -> dict[str, Any]:
    return {"kind": self.kind, "size": self.size, "channels": self.net.channels, "widths": list(self.net.widths),
            "res_blocks": self.net.res_blocks, "latent_dim": self.net.latent_dim, "encoder": self.net.encoder,
            "fsq_levels": list(self.fsq_levels), "vq_codebook_size": self.vq_codebook_size}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TokenizerSpec":
    net = AutoencoderConfig(channels=d["channels"], widths=tuple(d["widths"]), res_blocks=d["res_blocks"],
                            latent_dim=d["latent_dim"], encoder=d.get("encoder", "conv"))  # saved before it existed
    return cls(d["kind"], d["size"], net, tuple(d["fsq_levels"]), d["vq_codebook_size"])


def spec_from_config(config) -> TokenizerSpec:
  """The spec that ``config.image`` and ``config.tokenizer`` describe (image.tokenizer must be fsq or vq)."""
  t = config.tokenizer
  kind = config.image.tokenizer
  if kind not in ("fsq", "vq"):
    raise ValueError(f"config.image.tokenizer={kind!r}: the learned tokenizer trainer needs 'fsq' or 'vq'")
  latent = len(t.fsq_levels) if kind == "fsq" else t.vq_dim
  net = AutoencoderConfig(channels=config.image.channels, widths=tuple(t.widths), res_blocks=t.res_blocks,
                          latent_dim=latent, encoder=t.encoder)
  return TokenizerSpec(kind, config.image.size, net, tuple(t.fsq_levels) if kind == "fsq" else (),
                       t.vq_codebook_size if kind == "vq" else 0)


# ---------------------------------------------------------------------------------------------------------------
# The forward pieces shared by the trainer and the tokenizer
# ---------------------------------------------------------------------------------------------------------------
def latents_to_indexes(spec: TokenizerSpec, z, codebook=None) -> jax.Array:
  """Encoder output -> code indexes.  float [..., latent_dim] -> int32 [...]"""
  if spec.kind == "fsq":
    return quantizers.fsq_codes_to_indexes(quantizers.fsq_quantize(z, spec.fsq_levels), spec.fsq_levels)
  return quantizers.vq_nearest(z, codebook)


def indexes_to_latents(spec: TokenizerSpec, idx, codebook=None) -> jax.Array:
  """Code indexes -> the quantized vectors the decoder reads.  int [...] -> float32 [..., latent_dim]"""
  if spec.kind == "fsq":
    return quantizers.fsq_indexes_to_codes(idx, spec.fsq_levels)
  return jnp.asarray(codebook)[idx]


def init_params(spec: TokenizerSpec, key: jax.Array):
  """Fresh encoder and decoder parameters (traceable; call under jit).

  ``key`` is a raw uint32 [2] key; the parameters are drawn with the 'rbg' generator seeded from it, because the
  threefry draws of the conv initialisers compile about 5x slower on CPU (17 s against 3.4 s for a tiny net).
  """
  seed = jax.random.key_data(key).reshape(-1)[0] if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key[0]
  rbg = jax.random.key(seed, impl="rbg")
  images = jnp.zeros((1, spec.size, spec.size, spec.net.channels), jnp.float32)
  return Autoencoder(spec.net).init(rbg, images)["params"]


def encode_images(spec: TokenizerSpec, params, codebook, images) -> jax.Array:
  """uint8 [B, H, W, C] -> int32 [B, h*w]."""
  z = Autoencoder(spec.net).apply({"params": params}, to_unit(images), method=Autoencoder.encode)
  return latents_to_indexes(spec, z, codebook).reshape(images.shape[0], -1)


def decode_indexes(spec: TokenizerSpec, params, codebook, idx) -> jax.Array:
  """int [B, h*w] -> uint8 [B, H, W, C]."""
  h, w = spec.grid
  z = indexes_to_latents(spec, idx.reshape(idx.shape[0], h, w), codebook)
  return to_uint8(Autoencoder(spec.net).apply({"params": params}, z, method=Autoencoder.decode))


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------------------
class LearnedImageTokenizer(base.ImageTokenizer):
  """A trained FSQ / VQ autoencoder as an ImageTokenizer (module docstring)."""

  def __init__(self, spec: TokenizerSpec, params, codebook=None, *, encode_batch: int = 64):
    """``params``: {'encoder': ..., 'decoder': ...} arrays; ``codebook``: float32 [K, D] (VQ only)."""
    if (spec.kind == "vq") != (codebook is not None):
      raise ValueError(f"a {spec.kind} tokenizer {'needs' if spec.kind == 'vq' else 'takes no'} codebook")
    if encode_batch < 1:
      raise ValueError(f"encode_batch={encode_batch} must be >= 1")
    self.spec = spec
    self.kind = spec.kind
    self.image_shape = (spec.size, spec.size, spec.net.channels)
    self.grid_shape = spec.grid
    self.encode_batch = int(encode_batch)
    device = jax.local_devices()[0]
    self._params = jax.device_put(jax.tree.map(jnp.asarray, params), device)
    self._codebook = None if codebook is None else jax.device_put(jnp.asarray(codebook, jnp.float32), device)
    self._encode_fn = jax.jit(functools.partial(encode_images, spec))
    self._decode_fn = jax.jit(functools.partial(decode_indexes, spec))

  @property
  def vocab_size(self) -> int:
    return self.spec.vocab_size

  def code_features(self) -> np.ndarray:
    """What each code looks like, then the vector the decoder reads: float32 [vocab, f*f*C + latent_dim].

    The look is the centre patch of the image the decoder draws from a grid holding that code alone, in pixels
    centred to [-0.5, 0.5] as the patch tokenizer's features are; the latent follows (FSQ: in [-1, 1]). A linear
    map of the latent alone (a handful of quantized numbers) says little about a code's colour and shape, which
    is what the model needs to read a code by (``model.image_code_features``); its pixels say it linearly.
    """
    h, w = self.spec.grid
    f = self.spec.net.downsample
    idx = np.arange(self.vocab_size, dtype=np.int32)
    drawn = self._decode(np.repeat(idx[:, None], h * w, axis=1))                       # uint8 [V, H, W, C]
    r, c = h // 2 * f, w // 2 * f
    look = drawn[:, r:r + f, c:c + f].reshape(self.vocab_size, -1).astype(np.float32) / 255.0 - 0.5
    latent = np.asarray(indexes_to_latents(self.spec, jnp.asarray(idx), self._codebook), np.float32)
    return np.concatenate([look, latent], axis=1)

  def _chunked(self, fn, x: np.ndarray) -> np.ndarray:
    return base.in_chunks(lambda c: fn(self._params, self._codebook, c), x, self.encode_batch)

  def _encode(self, images):
    if not len(images):
      return np.zeros((0, self.num_tokens), np.int32)
    return self._chunked(self._encode_fn, images).astype(np.int32)

  def _decode(self, tokens):
    if not len(tokens):
      return np.zeros((0, *self.image_shape), np.uint8)
    return self._chunked(self._decode_fn, tokens.astype(np.int32))

  def config_dict(self) -> dict[str, Any]:
    return {**super().config_dict(), **self.spec.to_dict(), "encode_batch": self.encode_batch}

  def _save_arrays(self, directory) -> dict[str, Any]:
    from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
    flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(
        jax.device_get(self._params), sep="/").items()}
    if self._codebook is not None:
      flat[_CODEBOOK_KEY] = np.asarray(self._codebook)
    (epath.Path(directory) / PARAMS_FILE).write_bytes(save(flat))
    return {"params_file": PARAMS_FILE}


def load(directory, payload: dict[str, Any]) -> LearnedImageTokenizer:
  """The tokenizer saved in ``directory`` (``payload``: its parsed image_tokenizer.json)."""
  from safetensors.numpy import load as load_bytes  # pylint: disable=g-import-not-at-top
  cfg = payload["config"]
  spec = TokenizerSpec.from_dict(cfg)
  path = epath.Path(directory) / payload["params_file"]
  if not path.exists():
    raise FileNotFoundError(f"learned image tokenizer parameters missing: {path}")
  flat = load_bytes(path.read_bytes())
  codebook = flat.pop(_CODEBOOK_KEY, None)
  params = traverse_util.unflatten_dict(flat, sep="/")
  tok = LearnedImageTokenizer(spec, params, codebook, encode_batch=cfg.get("encode_batch", 64))
  if tok.vocab_size != cfg["vocab_size"]:
    raise ValueError(f"{path}: the tokenizer has {tok.vocab_size} codes, its json says {cfg['vocab_size']}")
  return tok


def from_workdir(path) -> LearnedImageTokenizer:
  """The tokenizer a ``tokenizer_main`` run saved in ``path`` (clear error if it has not finished)."""
  path = epath.Path(path)
  if not (path / base.IMAGE_TOKENIZER_FILE).exists():
    raise FileNotFoundError(
        f"no {base.IMAGE_TOKENIZER_FILE} in config.image.tokenizer_path={str(path)!r}: train the tokenizer "
        "there first (python -m unimm_jax.tokenizer_main --config=configs/tokenizer_shapes.py "
        f"--workdir={path}); it is saved when the run finishes")
  tok = base.load_image_tokenizer(path)
  if not isinstance(tok, LearnedImageTokenizer):
    raise ValueError(f"{path / base.IMAGE_TOKENIZER_FILE} holds a {tok.kind!r} tokenizer, not fsq or vq")
  return tok
