"""The convolutional encoder and decoder of the learned image tokenizer (network only; quantizers.py quantizes).

A VQGAN/MaskGIT-style pair without attention or adversarial parts (no pretrained perceptual network exists
offline): residual blocks of GroupNorm -> swish -> 3x3 conv at each resolution, a stride-2 conv between
resolutions in the encoder and nearest-neighbour upsampling + 3x3 conv in the decoder. ``widths[i]`` is the
channel count of stage i; there are ``len(widths) - 1`` halvings, so a 24x24 image with three widths becomes a
6x6 grid of ``latent_dim`` channels (one token each), and a 256x256 one with five widths a 16x16 grid.

Two encoders (``AutoencoderConfig.encoder``):

* ``conv``: the convolutional stack above. Its receptive field spans neighbouring tokens and its GroupNorm
  statistics span the whole image, so the code of a patch depends on what surrounds it: the same 4x4 patch gets
  different codes in different images.
* ``patch``: each token's latent is computed from its own ``f x f`` pixels only (space-to-depth, then residual
  MLP blocks with a per-position LayerNorm; MLP-Mixer's token-wise half, ViT's patch embedding made deep). A code
  is then a function of its patch alone, as the patch codebook's are, which keeps the image tokens a generative
  model has to predict as deterministic as the pixels allow. On ``shapes`` that is what the unified model needs:
  with the ``conv`` encoder its image-given-caption bits stayed above 1.2 per token (BENCHMARKS.md, "Learned
  image tokenizer") for data in which a caption fixes every pixel. The decoder is convolutional either way: it
  may look at neighbours, since it is a deterministic function of the whole code grid.

Images enter as float32 in [-1, 1] and the decoder returns the same range (``to_unit`` / ``to_uint8`` convert).
Parameters are not given logical axis names: they are replicated on every device (a tokenizer is a few million
parameters) and only the batch is split, which is the data parallelism the tokenizer trainer needs.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
from flax import linen as nn

from unimm_jax.tokenizers.base import TOKENIZER_ENCODERS as ENCODERS


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Sizes of the network; hashable, so it can be a static field of jitted code."""

  channels: int = 3               # image channels
  widths: tuple[int, ...] = (32, 64, 128)
  res_blocks: int = 1             # residual blocks per stage
  latent_dim: int = 4             # channels of one token's vector (FSQ: len(levels); VQ: the code dimension)
  encoder: str = "conv"           # conv | patch (a token's latent from its own pixels only; module docstring)

  def __post_init__(self):
    if self.encoder not in ENCODERS:
      raise ValueError(f"autoencoder encoder {self.encoder!r} is not one of {ENCODERS}")
    object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
    if not self.widths or any(w < 1 for w in self.widths):
      raise ValueError(f"autoencoder widths {self.widths} must be a non-empty tuple of positive channel counts")
    if self.res_blocks < 0 or self.latent_dim < 1:
      raise ValueError(f"res_blocks={self.res_blocks} must be >= 0 and latent_dim={self.latent_dim} >= 1")

  @property
  def downsample(self) -> int:
    """Pixels per token side: 2 ** (number of stages - 1)."""
    return 2 ** (len(self.widths) - 1)

  def grid(self, size: int) -> tuple[int, int]:
    if size % self.downsample:
      raise ValueError(f"image size {size} is not a multiple of the tokenizer's downsampling {self.downsample} "
                       f"(2 ** (len(widths) - 1) with widths {self.widths})")
    return size // self.downsample, size // self.downsample


def _groups(width: int) -> int:
  """Largest of 32, 16, ..., 1 dividing ``width`` (GroupNorm needs groups | channels)."""
  g = 32
  while width % g:
    g //= 2
  return g


class ResBlock(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B, H, W, width]
    h = nn.swish(nn.GroupNorm(_groups(x.shape[-1]))(x))
    h = nn.Conv(self.width, (3, 3))(h)
    h = nn.swish(nn.GroupNorm(_groups(self.width))(h))
    h = nn.Conv(self.width, (3, 3))(h)
    if x.shape[-1] != self.width:
      x = nn.Conv(self.width, (1, 1))(x)
    return x + h


class Encoder(nn.Module):
  config: AutoencoderConfig

  @nn.compact
  def __call__(self, x):  # float32 [B, H, W, C] in [-1, 1] -> [B, H/f, W/f, latent_dim]
    c = self.config
    x = nn.Conv(c.widths[0], (3, 3))(x)
    for i, width in enumerate(c.widths):
      for _ in range(c.res_blocks):
        x = ResBlock(width)(x)
      if i < len(c.widths) - 1:
        x = nn.Conv(c.widths[i + 1], (4, 4), strides=(2, 2))(x)
    x = nn.swish(nn.GroupNorm(_groups(x.shape[-1]))(x))
    return nn.Conv(c.latent_dim, (1, 1))(x)


class PatchEncoder(nn.Module):
  """Each token's latent from its own ``f x f`` pixels: space-to-depth, then per-position residual MLP blocks.

  As deep as the ``conv`` encoder (``res_blocks`` blocks per entry of ``widths``), at width ``widths[-1]``.
  Nothing mixes positions, so a patch's code does not depend on the rest of the image (a test checks it).
  """

  config: AutoencoderConfig

  @nn.compact
  def __call__(self, x):  # float32 [B, H, W, C] in [-1, 1] -> [B, H/f, W/f, latent_dim]
    c = self.config
    f = c.downsample
    b, height, width, ch = x.shape
    x = x.reshape(b, height // f, f, width // f, f, ch).transpose(0, 1, 3, 2, 4, 5)
    x = nn.Dense(c.widths[-1])(x.reshape(b, height // f, width // f, f * f * ch))
    for _ in range(len(c.widths) * c.res_blocks):
      h = nn.Dense(c.widths[-1])(nn.swish(nn.LayerNorm()(x)))
      x = x + nn.Dense(c.widths[-1])(nn.swish(nn.LayerNorm()(h)))
    return nn.Dense(c.latent_dim)(nn.swish(nn.LayerNorm()(x)))


class Decoder(nn.Module):
  config: AutoencoderConfig

  @nn.compact
  def __call__(self, z):  # [B, h, w, latent_dim] -> float32 [B, h*f, w*f, C], about [-1, 1]
    c = self.config
    widths = c.widths[::-1]
    x = nn.Conv(widths[0], (3, 3))(z)
    for i, width in enumerate(widths):
      for _ in range(c.res_blocks):
        x = ResBlock(width)(x)
      if i < len(widths) - 1:
        b, h, w, ch = x.shape
        x = jax.image.resize(x, (b, 2 * h, 2 * w, ch), "nearest")
        x = nn.Conv(widths[i + 1], (3, 3))(x)
    x = nn.swish(nn.GroupNorm(_groups(x.shape[-1]))(x))
    return nn.Conv(c.channels, (3, 3))(x)


class Autoencoder(nn.Module):
  """Encoder and decoder under one parameter tree ({'encoder': ..., 'decoder': ...}); quantization is outside."""

  config: AutoencoderConfig

  def setup(self):
    self.encoder = (PatchEncoder if self.config.encoder == "patch" else Encoder)(self.config)
    self.decoder = Decoder(self.config)

  def encode(self, x):
    return self.encoder(x)

  def decode(self, z):
    return self.decoder(z)

  def __call__(self, x):  # init only: touches both halves
    return self.decode(self.encode(x))


def to_unit(images) -> jax.Array:
  """uint8 [..., C] -> float32 in [-1, 1]."""
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def to_uint8(x) -> jax.Array:
  """float [-1, 1] -> uint8, rounded and clipped (what a decoded token grid finally is)."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

