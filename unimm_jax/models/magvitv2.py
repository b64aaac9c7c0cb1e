"""The MAGVIT-v2 (Show-o / MMaDA) tokenizer's network in Flax: encoder, lookup-free quantizer, decoder.

The architecture is the upstream's (Gen-Verse/MMaDA ``models/modeling_magvitv2.py``, built on taming-transformers'
blocks), NHWC here where the upstream is NCHW::

  encoder  x [B, H, W, 3] in [-1, 1] -> conv_in 3x3 -> per level i: num_res_blocks[i] x (ResnetBlock, AttnBlock if
           that level attends), then (not on the last level) Downsample: zero-pad right/bottom by 1, 3x3 stride-2 conv
           -> mid: ResnetBlock, AttnBlock, ResnetBlock -> GroupNorm(32, eps 1e-6), swish, conv_out 3x3 -> quant_conv 1x1
           -> z [B, H/d, W/d, D]                                           d = 2 ** (levels - 1)
  LFQ      z -> code q_c = +1 if z_c > 0 else -1;  index = sum_c [q_c > 0] * 2 ** (D - 1 - c)   (channel 0 is the
           most significant bit; code <-> index is a bijection of {-1, +1}^D and [0, 2^D))
  decoder  q -> post_quant_conv 1x1 -> conv_in 3x3 -> mid -> per level i from the last to 0: num_res_blocks[i] x
           (ResnetBlock, AttnBlock if it attends), then (not on level 0) Upsample: nearest x2, 3x3 conv
           -> GroupNorm, swish, conv_out 3x3 -> image [B, H, W, 3], about [-1, 1]

  ResnetBlock(x) = nin_shortcut(x) (1x1 conv, only when channels change) + conv2(swish(norm2(conv1(swish(norm1(x))))))
  AttnBlock(x)   = x + proj_out(softmax(q k^T / sqrt(C)) v),  q, k, v = 1x1 convs of GroupNorm(x), all h*w positions

Parameters live in a Flax tree whose paths mirror the upstream's torch names (``encoder.down.1.block.0.norm1.weight``
-> ``('encoder', 'down_1', 'block_0', 'norm1', 'scale')``); :func:`params_from_torch` converts a state dict (conv
weights OIHW -> HWIO). The module holds no diffusion and no tokenizer bookkeeping: ``magvitv2.py`` does that, and
imports this module (JAX) only when a tokenizer is built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from unimm_jax.tokenizers.magvitv2 import MagvitArch

GROUPS, EPS = 32, 1e-6   # the upstream's Normalize(): GroupNorm(32 groups, eps 1e-6, affine)


# ---------------------------------------------------------------------------------------------------------------
# Lookup-free quantization: the code <-> index rule
# ---------------------------------------------------------------------------------------------------------------
def _powers(bits: int) -> jax.Array:
  return 2 ** jnp.arange(bits - 1, -1, -1, dtype=jnp.int32)   # [2^(D-1), ..., 2, 1]: channel 0 is the MSB


def lfq_indices(z: jax.Array) -> jax.Array:
  """Encoder output (or a code) -> index: sum_c [z_c > 0] 2^(D-1-c).  float [..., D] -> int32 [...]

  z_c == 0 quantizes to -1 (bit 0), as the upstream's ``z > 0``."""
  return jnp.sum((z > 0).astype(jnp.int32) * _powers(z.shape[-1]), axis=-1)


def lfq_codes(indices: jax.Array, bits: int) -> jax.Array:
  """Index -> code: q_c = 2 * ((index >> (D-1-c)) & 1) - 1.  int [...] -> float32 [..., D] in {-1, +1}"""
  shifts = jnp.arange(bits - 1, -1, -1, dtype=jnp.int32)
  return (((indices.astype(jnp.int32)[..., None] >> shifts) & 1) * 2 - 1).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------
def _norm(name: str) -> nn.GroupNorm:
  # Two-pass variance, as torch computes it (the one-pass E[x^2] - E[x]^2 loses digits on large activations).
  return nn.GroupNorm(num_groups=GROUPS, epsilon=EPS, use_fast_variance=False, name=name)


def _conv(features: int, kernel: int, name: str, stride: int = 1, padding=None) -> nn.Conv:
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=pad if isinstance(pad, (tuple, list)) else ((pad, pad), (pad, pad)), name=name)


class ResnetBlock(nn.Module):
  """norm1, swish, conv1, norm2, swish, conv2, plus the input (through nin_shortcut when channels change)."""
  features: int

  @nn.compact
  def __call__(self, x):   # float [B, H, W, C_in] -> [B, H, W, features]
    h = _conv(self.features, 3, "conv1")(nn.swish(_norm("norm1")(x)))
    h = _conv(self.features, 3, "conv2")(nn.swish(_norm("norm2")(h)))
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, "nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions of the grid, residual."""

  @nn.compact
  def __call__(self, x):   # float [B, H, W, C] -> same
    b, hh, ww, c = x.shape
    h = _norm("norm")(x)
    q, k, v = (_conv(c, 1, n)(h).reshape(b, hh * ww, c) for n in ("q", "k", "v"))
    w = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) * c ** -0.5, axis=-1)   # [B, hw (query), hw (key)]
    out = jnp.einsum("bij,bjc->bic", w, v).reshape(b, hh, ww, c)
    return x + _conv(c, 1, "proj_out")(out)


class _Resample(nn.Module):
  """down: pad right and bottom by one, 3x3 stride-2 conv. up: nearest-neighbour x2, 3x3 conv."""
  up: bool

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if self.up:
      return _conv(c, 3, "conv")(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    return _conv(c, 3, "conv", stride=2, padding=((0, 1), (0, 1)))(x)


class _Level(nn.Module):
  """One resolution: ``blocks`` ResnetBlocks (each followed by an AttnBlock when ``attend``), then a resample."""
  features: int
  blocks: int
  attend: bool
  resample: str | None   # 'downsample' | 'upsample' | None

  @nn.compact
  def __call__(self, x):
    for j in range(self.blocks):
      x = ResnetBlock(self.features, name=f"block_{j}")(x)
      if self.attend:
        x = AttnBlock(name=f"attn_{j}")(x)
    if self.resample:
      x = _Resample(up=self.resample == "upsample", name=self.resample)(x)
    return x


class _Mid(nn.Module):
  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(c, name="block_1")(x)
    x = AttnBlock(name="attn_1")(x)
    return ResnetBlock(c, name="block_2")(x)


class Encoder(nn.Module):
  """Image in [-1, 1] -> pre-quantization latents.  float [B, H, W, C] -> float [B, H/d, W/d, D]"""
  arch: MagvitArch

  @nn.compact
  def __call__(self, x):
    a = self.arch
    x = _conv(a.enc_in, 3, "conv_in")(x)
    last = len(a.enc_widths) - 1
    for i, (width, blocks, attend) in enumerate(zip(a.enc_widths, a.enc_blocks, a.enc_attn)):
      x = _Level(width, blocks, attend, None if i == last else "downsample", name=f"down_{i}")(x)
    x = _Mid(name="mid")(x)
    x = _conv(a.codebook_dim, 3, "conv_out")(nn.swish(_norm("norm_out")(x)))
    return _conv(a.codebook_dim, 1, "quant_conv")(x)


class Decoder(nn.Module):
  """LFQ codes -> image, about [-1, 1] (not clipped).  float [B, h, w, D] -> float [B, h*d, w*d, out_channels]"""
  arch: MagvitArch

  @nn.compact
  def __call__(self, z):
    a = self.arch
    z = _conv(a.codebook_dim, 1, "post_quant_conv")(z)
    x = _conv(a.dec_in, 3, "conv_in")(z)
    x = _Mid(name="mid")(x)
    for i in reversed(range(len(a.dec_widths))):
      x = _Level(a.dec_widths[i], a.dec_blocks[i], a.dec_attn[i], "upsample" if i else None, name=f"up_{i}")(x)
    return _conv(a.out_channels, 3, "conv_out")(nn.swish(_norm("norm_out")(x)))


# ---------------------------------------------------------------------------------------------------------------
# Weights: torch state dict -> Flax tree
# ---------------------------------------------------------------------------------------------------------------
def flax_path(torch_name: str) -> tuple[str, ...]:
  """``encoder.down.1.block.0.conv1.weight`` -> ('encoder', 'down_1', 'block_0', 'conv1', 'weight'): each list
  index joins the name before it (the leaf is renamed by :func:`params_from_torch`)."""
  out: list[str] = []
  for part in torch_name.split("."):
    if part.isdigit():
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


def params_from_torch(tensors: dict[str, np.ndarray], arch: MagvitArch) -> dict:
  """The upstream's ``encoder.*`` / ``decoder.*`` tensors -> {'encoder': ..., 'decoder': ...} float32 Flax trees.

  Conv weights [out, in, kh, kw] -> kernels [kh, kw, in, out]; GroupNorm weight -> scale; biases as they are.
  The result is checked against the tree the modules build for ``arch`` (names and shapes), so a tensor that
  would be silently left out or misplaced raises instead.
  """
  flat = {}
  for name, value in tensors.items():
    if not name.startswith(("encoder.", "decoder.")):
      continue
    *path, leaf = flax_path(name)
    x = np.asarray(value, np.float32)
    if leaf == "weight":
      leaf, x = ("kernel", x.transpose(2, 3, 1, 0)) if x.ndim == 4 else ("scale", x)
    flat[(*path, leaf)] = x
  want = traverse_util.flatten_dict(jax.eval_shape(lambda: init_shapes(arch)))
  got = {k: v.shape for k, v in flat.items()}
  for key, spec in want.items():
    if got.get(key) != spec.shape:
      raise ValueError(f"MAGVIT-v2 weights: parameter {'/'.join(key)} is {got.get(key)}, the network needs "
                       f"{spec.shape}")
  extra = sorted(set(got) - set(want))
  if extra:
    raise ValueError(f"MAGVIT-v2 weights: {'/'.join(extra[0])} (and {len(extra) - 1} more) has no place in the "
                     "network")
  return traverse_util.unflatten_dict(flat)


def init_shapes(arch: MagvitArch) -> dict:
  """{'encoder': ..., 'decoder': ...} parameters of fresh modules (call under ``jax.eval_shape`` for shapes)."""
  d = arch.downsample
  img = jnp.zeros((1, d, d, arch.in_channels), jnp.float32)
  code = jnp.zeros((1, 1, 1, arch.codebook_dim), jnp.float32)
  key = jax.random.key(0)
  return {"encoder": Encoder(arch).init(key, img)["params"], "decoder": Decoder(arch).init(key, code)["params"]}


# ---------------------------------------------------------------------------------------------------------------
# The forward passes the tokenizer jits
# ---------------------------------------------------------------------------------------------------------------
def to_model_range(images: jax.Array) -> jax.Array:
  """uint8 -> the upstream's input: ToTensor then Normalize(0.5, 0.5), (v / 255 - 0.5) / 0.5.  -> float32 in [-1, 1]"""
  return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5


def to_uint8(x: jax.Array) -> jax.Array:
  """Decoder output -> uint8 as the upstream's scripts do: clamp((x + 1) / 2, 0, 1) * 255, truncated (astype)."""
  return jnp.floor(jnp.clip((x + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(jnp.uint8)


# ``precision`` ('highest' | 'high' | 'default') is the convolutions' and attention's matmul precision. 'highest'
# (the tokenizer's default) is float32 on every backend: TPUs otherwise multiply float32 in bfloat16 passes, and a
# code is the sign of each latent, so a latent near 0 would flip its bit.
def encode_latents(arch: MagvitArch, precision: str, params, images) -> jax.Array:
  """uint8 [B, H, W, C] -> pre-quantization latents float32 [B, h, w, D]."""
  with jax.default_matmul_precision(precision):
    return Encoder(arch).apply({"params": params["encoder"]}, to_model_range(images))


def encode(arch: MagvitArch, precision: str, params, images) -> jax.Array:
  """uint8 [B, H, W, C] -> int32 [B, h*w], row-major over the grid (the upstream's ``get_code``)."""
  return lfq_indices(encode_latents(arch, precision, params, images)).reshape(images.shape[0], -1)


def decode_float(arch: MagvitArch, precision: str, grid: tuple[int, int], params, indices) -> jax.Array:
  """int [B, h*w] -> decoder output float32 [B, H, W, C], unclipped (the upstream's ``decode_code``)."""
  codes = lfq_codes(indices.reshape(indices.shape[0], *grid), arch.codebook_dim)
  with jax.default_matmul_precision(precision):
    return Decoder(arch).apply({"params": params["decoder"]}, codes)


def decode(arch: MagvitArch, precision: str, grid: tuple[int, int], params, indices) -> jax.Array:
  """int [B, h*w] -> uint8 [B, H, W, C]."""
  return to_uint8(decode_float(arch, precision, grid, params, indices))


def torch_from_params(params, arch: MagvitArch) -> dict[str, np.ndarray]:
  """The inverse of :func:`params_from_torch`: {upstream name: float32 array in torch layout}, in the upstream's
  order (the names come from ``arch``, so the list index / attribute ambiguity of ``mid.block_1`` never arises)."""
  flat = traverse_util.flatten_dict(jax.device_get(params))
  out = {}
  for name, shape in arch.tensor_shapes().items():
    *path, leaf = flax_path(name)
    if leaf == "weight":
      leaf = "kernel" if len(shape) == 4 else "scale"
    x = np.asarray(flat[(*path, leaf)], np.float32)
    out[name] = x.transpose(3, 2, 0, 1) if leaf == "kernel" else x
  return out
