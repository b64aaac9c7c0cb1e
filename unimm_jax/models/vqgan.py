"""The diffusers ``VQModel`` network in Flax, NHWC: the VQ-GAN of aMUSEd, Muddit / Meissonic and Lumina-DiMOO.

Written from the upstream architecture (diffusers ``autoencoders/vq_model.py``; ``autoencoders/vae.py``
``Encoder`` / ``Decoder``; ``unets/unet_2d_blocks.py`` ``DownEncoderBlock2D``, ``UpDecoderBlock2D``,
``UNetMidBlock2D``; ``resnet.py`` ``ResnetBlock2D``; ``downsampling.py`` / ``upsampling.py``; the mid-block
``Attention``), for ``norm_type='group'``. With ``block_out_channels`` c_0 .. c_{L-1}, ``layers_per_block`` n and
GN = GroupNorm(``norm_num_groups``, eps 1e-6)::

  encoder   conv_in 3x3 (C_in -> c_0)
            down_blocks[i]: n resnets (-> c_i), then for i < L-1: pad right and bottom by 1, conv 3x3 stride 2
            mid_block: resnet, [attention if mid_block_add_attention], resnet           (c_{L-1})
            conv_norm_out GN, SiLU, conv_out 3x3 (-> latent_channels)
  quant_conv 1x1 (latent_channels -> D = vq_embed_dim)
  quantize  index(z) = argmin_k ||z - e_k||_2, the first k on ties (torch.cdist + argmin); e = the codebook [K, D]
  post_quant_conv 1x1 (D -> latent_channels)
  decoder   conv_in 3x3 (latent_channels -> c_{L-1}), mid_block,
            up_blocks[i] over reversed channels: n + 1 resnets (-> c_{L-1-i}), then for i < L-1: nearest x2, conv 3x3
            conv_norm_out GN, SiLU, conv_out 3x3 (-> C_out)

  resnet(x)    = shortcut(x) + conv2(SiLU(GN2(conv1(SiLU(GN1(x))))))    shortcut: conv_shortcut 1x1 when channels change
  attention(x) = x + to_out(softmax(q k^T / sqrt(C)) v),  q, k, v = to_q, to_k, to_v of GN(x) over the h*w positions
                 (one head: diffusers sets attention_head_dim = channels)

The downsampling is 2 ** (L - 1) (aMUSEd: L = 5, 16x). The parameter tree mirrors the diffusers state-dict names
(``encoder.down_blocks.0.resnets.1.norm1.weight`` -> ``encoder/down_blocks_0/resnets_1/norm1/scale``), so
:func:`params_from_state_dict` is a renaming plus torch's OIHW -> HWIO (convolutions) and [out, in] -> [in, out]
(linear) transposes. This network knows nothing about tokens: ``tokenizers/vqgan.py`` wraps it as an image
tokenizer. ``precision`` is that of every convolution, matmul and codebook distance; the tokenizer asks for
``highest`` by default, because on TPU the default (bfloat16 passes) moves near-tied codes.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Precision = Any   # a jax.lax.Precision, or a string jax accepts ('highest', 'default')


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm over NHWC: per sample and group of C/G channels, (x - mean) / sqrt(var + eps) * scale + bias,
  mean and (biased) var over H, W and the group's channels."""

  groups: int
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):   # float [N, H, W, C] -> same
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, self.groups, c // self.groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    g = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(n, h, w, c)
    return g * self.param("scale", nn.initializers.ones, (c,)) + self.param("bias", nn.initializers.zeros, (c,))


def _conv(features: int, kernel: int, precision: Precision, name: str | None = None, stride: int = 1,
          padding=None) -> nn.Conv:
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=pad if isinstance(pad, tuple) else ((pad, pad), (pad, pad)), precision=precision, name=name)


class Resnet(nn.Module):
  """ResnetBlock2D without a time embedding (module docstring)."""

  features: int
  groups: int
  precision: Precision

  @nn.compact
  def __call__(self, x):   # float [N, H, W, C_in] -> [N, H, W, features]
    h = _conv(self.features, 3, self.precision, "conv1")(nn.silu(GroupNorm(self.groups, name="norm1")(x)))
    h = _conv(self.features, 3, self.precision, "conv2")(nn.silu(GroupNorm(self.groups, name="norm2")(h)))
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.precision, "conv_shortcut")(x)
    return x + h


class Attention(nn.Module):
  """The mid-block's single-head self-attention over the h*w positions, with its residual."""

  groups: int
  precision: Precision

  @nn.compact
  def __call__(self, x):   # float [N, H, W, C] -> same
    n, h, w, c = x.shape
    y = GroupNorm(self.groups, name="group_norm")(x).reshape(n, h * w, c)
    dense = lambda name: nn.Dense(c, precision=self.precision, name=name)  # pylint: disable=unnecessary-lambda-assignment
    q, k, v = dense("to_q")(y), dense("to_k")(y), dense("to_v")(y)
    scores = jnp.einsum("nqc,nkc->nqk", q, k, precision=self.precision) / np.sqrt(c)
    out = jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(scores, axis=-1), v, precision=self.precision)
    return x + dense("to_out_0")(out).reshape(n, h, w, c)


class MidBlock(nn.Module):
  groups: int
  attention: bool
  precision: Precision

  @nn.compact
  def __call__(self, x):   # float [N, H, W, C] -> same
    c = x.shape[-1]
    x = Resnet(c, self.groups, self.precision, name="resnets_0")(x)
    if self.attention:
      x = Attention(self.groups, self.precision, name="attentions_0")(x)
    return Resnet(c, self.groups, self.precision, name="resnets_1")(x)


class Downsample(nn.Module):
  precision: Precision

  @nn.compact
  def __call__(self, x):   # float [N, H, W, C] -> [N, H/2, W/2, C]
    # diffusers pads (0, 1, 0, 1) (right and bottom) and convolves with padding 0 (downsample_padding=0).
    return _conv(x.shape[-1], 3, self.precision, "conv", stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
  precision: Precision

  @nn.compact
  def __call__(self, x):   # float [N, H, W, C] -> [N, 2H, 2W, C]
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)   # F.interpolate(scale_factor=2, mode='nearest')
    return _conv(x.shape[-1], 3, self.precision, "conv")(x)


class Block(nn.Module):
  """DownEncoderBlock2D (``down``) or UpDecoderBlock2D: ``layers`` resnets, then the resampler if ``resample``."""

  features: int
  layers: int
  groups: int
  down: bool
  resample: bool
  precision: Precision

  @nn.compact
  def __call__(self, x):
    for j in range(self.layers):
      x = Resnet(self.features, self.groups, self.precision, name=f"resnets_{j}")(x)
    if self.resample and self.down:
      x = Downsample(self.precision, name="downsamplers_0")(x)
    elif self.resample:
      x = Upsample(self.precision, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  cfg: Any          # tokenizers.vqgan.VQGANConfig (any object with its fields)
  precision: Precision

  @nn.compact
  def __call__(self, x):   # float [N, H, W, C_in] -> [N, H/d, W/d, latent_channels]
    c, p = self.cfg, self.precision
    chans = tuple(c.block_out_channels)
    x = _conv(chans[0], 3, p, "conv_in")(x)
    for i, ch in enumerate(chans):
      x = Block(ch, c.layers_per_block, c.norm_num_groups, True, i < len(chans) - 1, p, name=f"down_blocks_{i}")(x)
    x = MidBlock(c.norm_num_groups, c.mid_block_add_attention, p, name="mid_block")(x)
    x = nn.silu(GroupNorm(c.norm_num_groups, name="conv_norm_out")(x))
    return _conv(c.latent_channels, 3, p, "conv_out")(x)


class Decoder(nn.Module):
  cfg: Any
  precision: Precision

  @nn.compact
  def __call__(self, x):   # float [N, h, w, latent_channels] -> [N, h*d, w*d, C_out]
    c, p = self.cfg, self.precision
    chans = tuple(reversed(c.block_out_channels))
    x = _conv(chans[0], 3, p, "conv_in")(x)
    x = MidBlock(c.norm_num_groups, c.mid_block_add_attention, p, name="mid_block")(x)
    for i, ch in enumerate(chans):
      x = Block(ch, c.layers_per_block + 1, c.norm_num_groups, False, i < len(chans) - 1, p, name=f"up_blocks_{i}")(x)
    x = nn.silu(GroupNorm(c.norm_num_groups, name="conv_norm_out")(x))
    return _conv(c.out_channels, 3, p, "conv_out")(x)


class VQModel(nn.Module):
  """Encoder + quant_conv, the codebook, post_quant_conv + decoder (module docstring)."""

  cfg: Any
  precision: Precision = "highest"

  def setup(self):
    c, p = self.cfg, self.precision
    self.encoder = Encoder(c, p)
    self.quant_conv = _conv(c.vq_embed_dim, 1, p)
    self.quantize = nn.Embed(c.num_vq_embeddings, c.vq_embed_dim)
    self.post_quant_conv = _conv(c.latent_channels, 1, p)
    self.decoder = Decoder(c, p)

  def __call__(self, x):   # for init: float [N, H, W, C_in] -> [N, H, W, C_out]
    return self.decode(self.codebook_entries(self.codes(x)))

  def encode(self, x):
    """Pixels in [0, 1] -> the latents the quantizer reads.  float [N, H, W, C_in] -> [N, h, w, D]"""
    return self.quant_conv(self.encoder(x))

  def codes(self, x):
    """Pixels in [0, 1] -> code indexes.  float [N, H, W, C_in] -> int32 [N, h, w]"""
    return nearest_code(self.encode(x), self.quantize.embedding, self.precision)

  def codebook_entries(self, idx):
    """int [N, h, w] -> float [N, h, w, D] (the quantizer's get_codebook_entry)."""
    return self.quantize(idx)

  def decode(self, z_q):
    """Quantized latents -> pixels (the raw decoder output; ~[0, 1]).  float [N, h, w, D] -> [N, H, W, C_out]"""
    return self.decoder(self.post_quant_conv(z_q))


def nearest_code(z, codebook, precision: Precision = "highest") -> jax.Array:
  """The quantizer's rule: argmin_k ||z - e_k||, first k on ties.  float [..., D], [K, D] -> int32 [...]

  ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2 as one matmul (the differences [.., K, D] would not fit at 64x64 codes x
  8,192 entries); the square root torch.cdist takes does not change the argmin.
  """
  flat = z.reshape(-1, z.shape[-1])
  d2 = (jnp.sum(flat * flat, axis=-1, keepdims=True)
        - 2.0 * jnp.dot(flat, codebook.T, precision=precision)
        + jnp.sum(codebook * codebook, axis=-1)[None, :])
  return jnp.argmin(d2, axis=-1).astype(jnp.int32).reshape(z.shape[:-1])


# ---------------------------------------------------------------------------------------------------------------
# diffusers state dict -> Flax parameters
# ---------------------------------------------------------------------------------------------------------------
# Attention names of checkpoints saved before diffusers 0.14 (diffusers renames them at load, as we do).
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def flax_path(name: str, ndim: int) -> tuple[str, ...]:
  """The Flax path of the diffusers tensor ``name`` (``ndim`` dimensions).

  ``a.down_blocks.0.resnets.1.norm1.weight`` -> ``(a, down_blocks_0, resnets_1, norm1, scale)``: an index joins the
  name before it; a 1-D ``weight`` is a norm's ``scale``, a 2-D or 4-D one a ``kernel``; the codebook
  ``quantize.embedding.weight`` is the Embed's ``embedding``.
  """
  for old, new in _DEPRECATED_ATTENTION.items():
    name = re.sub(rf"(attentions\.\d+)\.{old}\.", rf"\1.{new}.", name)
  if name == "quantize.embedding.weight":
    return ("quantize", "embedding")
  parts: list[str] = []
  for part in name.split("."):
    if part.isdigit() and parts:
      parts[-1] += f"_{part}"
    else:
      parts.append(part)
  if parts[-1] == "weight":
    parts[-1] = "scale" if ndim == 1 else "kernel"
  return tuple(parts)


def to_flax(name: str, array: np.ndarray) -> np.ndarray:
  """A torch tensor in Flax's layout: conv OIHW -> HWIO, linear [out, in] -> [in, out]; float32."""
  array = np.asarray(array, np.float32)
  if name == "quantize.embedding.weight":
    return array
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 2:   # the attention's linear layers (older checkpoints store them as 1x1 convs: 4-D, above)
    return array.T
  return array


def abstract_params(cfg, precision: Precision = "highest") -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """{flax path: shape} of the parameters ``cfg`` implies (no arrays are made)."""
  size = 2 ** (len(cfg.block_out_channels) - 1)
  x = jax.ShapeDtypeStruct((1, size, size, cfg.in_channels), jnp.float32)
  shapes = jax.eval_shape(lambda x: VQModel(cfg, precision).init(jax.random.key(0), x), x)
  return traverse_util.flatten_dict(shapes["params"])


def params_from_state_dict(cfg, tensors: Mapping[str, np.ndarray], where: str = "the checkpoint"):
  """The Flax parameters of the diffusers state dict ``tensors`` (float32), every name and shape checked.

  ValueError, one line naming ``where`` and the first tensors, when a tensor is missing, unexpected, or of
  another shape than ``cfg`` implies.
  """
  want = abstract_params(cfg)
  flat, by_path = {}, {}
  for name, array in tensors.items():
    path = flax_path(name, np.ndim(array))
    by_path[path] = name
    flat[path] = to_flax(name, array)
    if array.ndim == 4 and path[-1] == "kernel" and path[-2] in ("to_q", "to_k", "to_v", "to_out_0"):
      flat[path] = np.asarray(array, np.float32)[:, :, 0, 0].T
  missing = ["/".join(p) for p in want if p not in flat]
  extra = [by_path[p] for p in flat if p not in want]
  if missing or extra:
    raise ValueError(f"{where} does not hold the tensors its config.json implies: missing {missing[:4]} "
                     f"({len(missing)} in all), unexpected {extra[:4]} ({len(extra)} in all); is config.json "
                     "the one that was saved with these weights?")
  for path, spec in want.items():
    if flat[path].shape != spec.shape:
      raise ValueError(f"{where}: tensor {by_path[path]} has shape {list(tensors[by_path[path]].shape)}, its "
                       f"config.json implies {_torch_shape(path, spec.shape)}")
  return traverse_util.unflatten_dict(flat)


def _torch_shape(path, shape) -> list[int]:
  if path == ("quantize", "embedding"):
    return list(shape)
  if len(shape) == 4:
    return [shape[3], shape[2], shape[0], shape[1]]
  return list(shape[::-1])
