"""A tiny MAGVIT-v2 checkpoint in exactly the upstream's layout, and the upstream's forward pass in numpy.

Written from Gen-Verse/MMaDA ``models/modeling_magvitv2.py`` (``VQGANEncoder``, ``LFQuantizer``, ``VQGANDecoder``,
``MAGVITv2.get_code`` / ``decode_code``) and ``models/common_modules.py`` (taming's ``ResnetBlock``, ``AttnBlock``,
``Downsample``, ``Upsample``, ``Normalize`` = GroupNorm(32, eps 1e-6)), in the upstream's NCHW layout, independent of
unimm_jax's modules:

* the state dict is built the way the torch constructors build it, from the same arguments (``ch``, ``ch_mult``,
  ``num_res_blocks``, ``attn_resolutions``, ``resolution``, ``z_channels``), with the quantizer's buffers
  ``quantize.embedding`` [2^D, D] and ``quantize.power_vals`` [D] (int64), as ``state_dict()`` saves them;
* files: ``config.json`` as ``save_pretrained`` writes it for the argument-less ``MAGVITv2`` (``_class_name``, no
  sizes) and ``pytorch_model.safetensors`` (the upstream's ``SAFETENSORS_WEIGHTS_NAME``), written byte by byte;
* images go in as MMaDA's scripts feed them, ``Normalize(0.5, 0.5)(ToTensor(img))``, and come out as
  ``clamp((x + 1) / 2, 0, 1) * 255`` then ``astype(uint8)``.

The reference computes in float64, so its error against the float32 unimm_jax path is that path's own.
"""

from __future__ import annotations

import json

import numpy as np

from llada_upstream import write_safetensors  # the safetensors byte layout, written by hand


def tiny_args(**overrides) -> dict:
  """Constructor arguments of a tiny encoder / decoder pair: 3 levels (4x), attention on the 8 px level, 6 bits."""
  args = {
      "encoder": dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=[1, 2, 1], attn_resolutions=[8], resolution=32,
                      z_channels=6, in_ch=3),
      "decoder": dict(ch=32, ch_mult=[1, 1, 2], num_res_blocks=[2, 1, 1], attn_resolutions=[8], resolution=32,
                      z_channels=6, out_ch=3),
  }
  for key, value in overrides.items():
    part, name = key.split("__")
    args[part][name] = value
  return args


# ---------------------------------------------------------------------------------------------------------------
# The state dict, as the torch constructors lay it out
# ---------------------------------------------------------------------------------------------------------------
def _conv(out, name, cin, cout, k):
  out[name + ".weight"], out[name + ".bias"] = (cout, cin, k, k), (cout,)


def _norm(out, name, c):
  out[name + ".weight"], out[name + ".bias"] = (c,), (c,)


def _resnet(out, name, cin, cout):
  _norm(out, name + ".norm1", cin)
  _conv(out, name + ".conv1", cin, cout, 3)
  _norm(out, name + ".norm2", cout)
  _conv(out, name + ".conv2", cout, cout, 3)
  if cin != cout:
    _conv(out, name + ".nin_shortcut", cin, cout, 1)


def _attn(out, name, c):
  _norm(out, name + ".norm", c)
  for p in ("q", "k", "v", "proj_out"):
    _conv(out, f"{name}.{p}", c, c, 1)


def encoder_shapes(a: dict) -> dict:
  out = {}
  _conv(out, "encoder.conv_in", a["in_ch"], a["ch"], 3)
  curr, in_mult = a["resolution"], (1,) + tuple(a["ch_mult"])
  for i, mult in enumerate(a["ch_mult"]):
    block_in, block_out = a["ch"] * in_mult[i], a["ch"] * mult
    for j in range(a["num_res_blocks"][i]):
      _resnet(out, f"encoder.down.{i}.block.{j}", block_in, block_out)
      block_in = block_out
      if curr in a["attn_resolutions"]:
        _attn(out, f"encoder.down.{i}.attn.{j}", block_in)
    if i != len(a["ch_mult"]) - 1:
      _conv(out, f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
      curr //= 2
  _resnet(out, "encoder.mid.block_1", block_in, block_in)
  _attn(out, "encoder.mid.attn_1", block_in)
  _resnet(out, "encoder.mid.block_2", block_in, block_in)
  _norm(out, "encoder.norm_out", block_in)
  _conv(out, "encoder.conv_out", block_in, a["z_channels"], 3)
  _conv(out, "encoder.quant_conv", a["z_channels"], a["z_channels"], 1)
  return out


def decoder_shapes(a: dict) -> dict:
  out, n = {}, len(a["ch_mult"])
  block_in = a["ch"] * a["ch_mult"][-1]
  curr = a["resolution"] // 2 ** (n - 1)
  _conv(out, "decoder.conv_in", a["z_channels"], block_in, 3)
  _resnet(out, "decoder.mid.block_1", block_in, block_in)
  _attn(out, "decoder.mid.attn_1", block_in)
  _resnet(out, "decoder.mid.block_2", block_in, block_in)
  for i in reversed(range(n)):
    block_out = a["ch"] * a["ch_mult"][i]
    for j in range(a["num_res_blocks"][i]):
      _resnet(out, f"decoder.up.{i}.block.{j}", block_in, block_out)
      block_in = block_out
      if curr in a["attn_resolutions"]:
        _attn(out, f"decoder.up.{i}.attn.{j}", block_in)
    if i != 0:
      _conv(out, f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
      curr *= 2
  _norm(out, "decoder.norm_out", block_in)
  _conv(out, "decoder.conv_out", block_in, a["out_ch"], 3)
  _conv(out, "decoder.post_quant_conv", a["z_channels"], a["z_channels"], 1)
  return out


def lfq_embedding(bits: int) -> np.ndarray:
  """``LFQuantizer.embedding``: ((arange(2^D)[:, None] >> arange(D - 1, -1, -1)) & 1) * 2 - 1."""
  idx = np.arange(2 ** bits)[:, None]
  return (((idx >> np.arange(bits - 1, -1, -1)) & 1) * 2 - 1).astype(np.float32)


def random_tensors(args: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """float32 weights: convs std 1/sqrt(fan_in), norms scale ~1, biases ~0.1 (activations stay O(1))."""
  rng = np.random.default_rng(seed)
  out = {}
  shapes = {**encoder_shapes(args["encoder"]), **decoder_shapes(args["decoder"])}
  for name, shape in shapes.items():
    if len(shape) == 4:
      x = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    elif name.endswith(".weight"):
      x = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      x = 0.1 * rng.standard_normal(shape)
    out[name] = x.astype(np.float32)
  bits = args["encoder"]["z_channels"]
  out["quantize.embedding"] = lfq_embedding(bits)
  out["quantize.power_vals"] = (2 ** np.arange(bits - 1, -1, -1)).astype(np.int64)
  return out


def write_checkpoint(directory, tensors: dict[str, np.ndarray]) -> None:
  """``config.json`` + ``pytorch_model.safetensors``, as ``MAGVITv2.save_pretrained(safe_serialization=True)``."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(
      {"_class_name": "MAGVITv2", "_diffusers_version": "0.30.1"}, indent=2))
  write_safetensors(directory / "pytorch_model.safetensors", tensors)


# ---------------------------------------------------------------------------------------------------------------
# The forward pass (NCHW, float64)
# ---------------------------------------------------------------------------------------------------------------
def conv2d(x, w, b, stride=1, pad=(0, 0, 0, 0)):
  """torch Conv2d after F.pad(x, (left, right, top, bottom)).  x [B, I, H, W], w [O, I, kh, kw]"""
  left, right, top, bottom = pad
  x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
  kh, kw = w.shape[2:]
  ho, wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], ho, wo))
  for dy in range(kh):
    for dx in range(kw):
      patch = x[:, :, dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride]
      out += np.einsum("bihw,oi->bohw", patch, w[:, :, dy, dx])
  return out + b[None, :, None, None]


def group_norm(x, w, b, groups=32, eps=1e-6):
  bsz, c, h, wd = x.shape
  g = x.reshape(bsz, groups, c // groups, h, wd)
  mean = g.mean(axis=(2, 3, 4), keepdims=True)
  var = g.var(axis=(2, 3, 4), keepdims=True)
  g = (g - mean) / np.sqrt(var + eps)
  return g.reshape(x.shape) * w[None, :, None, None] + b[None, :, None, None]


def swish(x):
  return x / (1.0 + np.exp(-x))


class Reference:
  """The upstream MAGVITv2 forward over a state dict ``t`` (arrays cast to float64)."""

  def __init__(self, args: dict, tensors: dict[str, np.ndarray]):
    self.args = args
    self.t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}

  def _c(self, x, name, k=3, stride=1, pad=None):
    p = (k // 2,) * 4 if pad is None else pad
    return conv2d(x, self.t[name + ".weight"], self.t[name + ".bias"], stride, p)

  def _n(self, x, name):
    return group_norm(x, self.t[name + ".weight"], self.t[name + ".bias"])

  def resnet(self, x, name):
    h = self._c(swish(self._n(x, name + ".norm1")), name + ".conv1")
    h = self._c(swish(self._n(h, name + ".norm2")), name + ".conv2")
    if name + ".nin_shortcut.weight" in self.t:
      x = self._c(x, name + ".nin_shortcut", k=1)
    return x + h

  def attn(self, x, name):
    h = self._n(x, name + ".norm")
    q, k, v = (self._c(h, f"{name}.{p}", k=1) for p in ("q", "k", "v"))
    b, c, hh, ww = q.shape
    q = q.reshape(b, c, hh * ww).transpose(0, 2, 1)            # b, hw, c
    k = k.reshape(b, c, hh * ww)                               # b, c, hw
    w = np.matmul(q, k) * c ** -0.5
    w = np.exp(w - w.max(axis=2, keepdims=True))
    w = w / w.sum(axis=2, keepdims=True)
    v = v.reshape(b, c, hh * ww)
    h = np.matmul(v, w.transpose(0, 2, 1)).reshape(b, c, hh, ww)
    return x + self._c(h, name + ".proj_out", k=1)

  def _mid(self, h, prefix):
    h = self.resnet(h, prefix + ".block_1")
    h = self.attn(h, prefix + ".attn_1")
    return self.resnet(h, prefix + ".block_2")

  def encoder(self, x):
    """VQGANEncoder.forward: [B, 3, H, W] -> [B, D, H/d, W/d]."""
    a = self.args["encoder"]
    h = self._c(x, "encoder.conv_in")
    for i in range(len(a["ch_mult"])):
      for j in range(a["num_res_blocks"][i]):
        h = self.resnet(h, f"encoder.down.{i}.block.{j}")
        if f"encoder.down.{i}.attn.0.q.weight" in self.t:
          h = self.attn(h, f"encoder.down.{i}.attn.{j}")
      if i != len(a["ch_mult"]) - 1:   # Downsample: F.pad (0, 1, 0, 1), stride-2 conv, no padding
        h = self._c(h, f"encoder.down.{i}.downsample.conv", stride=2, pad=(0, 1, 0, 1))
    h = self._mid(h, "encoder.mid")
    h = self._c(swish(self._n(h, "encoder.norm_out")), "encoder.conv_out")
    return self._c(h, "encoder.quant_conv", k=1)

  def decoder(self, z):
    """VQGANDecoder.forward: [B, D, h, w] -> [B, 3, H, W]."""
    a = self.args["decoder"]
    h = self._c(z, "decoder.post_quant_conv", k=1)
    h = self._c(h, "decoder.conv_in")
    h = self._mid(h, "decoder.mid")
    for i in reversed(range(len(a["ch_mult"]))):
      for j in range(a["num_res_blocks"][i]):
        h = self.resnet(h, f"decoder.up.{i}.block.{j}")
        if f"decoder.up.{i}.attn.0.q.weight" in self.t:
          h = self.attn(h, f"decoder.up.{i}.attn.{j}")
      if i != 0:   # Upsample: interpolate(scale_factor=2, mode='nearest'), conv
        h = self._c(h.repeat(2, axis=2).repeat(2, axis=3), f"decoder.up.{i}.upsample.conv")
    return self._c(swish(self._n(h, "decoder.norm_out")), "decoder.conv_out")

  # --- LFQuantizer and MAGVITv2 ---------------------------------------------------------------------------------
  @staticmethod
  def quantize(z):
    """LFQuantizer.forward's z_q: +1 where z > 0, else -1.  [B, D, h, w]"""
    return np.where(z > 0, 1.0, -1.0)

  def get_indices(self, z_q):
    """sum over channels of power_vals * (z_q > 0).  [B, D, h, w] -> [B, 1, h, w]"""
    powers = self.t["quantize.power_vals"].astype(np.int64)
    return (powers.reshape(1, -1, 1, 1) * (z_q > 0)).sum(1, keepdims=True).astype(np.int64)

  def get_codebook_entry(self, indices, shape):
    """embedding[indices], viewed [b, h, w, D], permuted to [b, D, h, w]."""
    h, w = shape
    b = indices.shape[0]
    return self.t["quantize.embedding"][indices.reshape(-1)].reshape(b, h, w, -1).transpose(0, 3, 1, 2)

  @staticmethod
  def preprocess(images_u8):
    """uint8 [B, H, W, 3] -> ToTensor, Normalize(0.5, 0.5): [B, 3, H, W] in [-1, 1]."""
    x = images_u8.astype(np.float64).transpose(0, 3, 1, 2) / 255.0
    return (x - 0.5) / 0.5

  def latents(self, images_u8):
    """Encoder output, NHWC for comparison.  -> [B, h, w, D]"""
    return self.encoder(self.preprocess(images_u8)).transpose(0, 2, 3, 1)

  def get_code(self, images_u8):
    """MAGVITv2.get_code: [B, h*w] int64."""
    z_q = self.quantize(self.encoder(self.preprocess(images_u8)))
    return self.get_indices(z_q).reshape(images_u8.shape[0], -1)

  def decode_code(self, indices, shape):
    """MAGVITv2.decode_code, NHWC for comparison: [B, h*w] -> [B, H, W, 3] float (unclipped)."""
    return self.decoder(self.get_codebook_entry(indices, shape)).transpose(0, 2, 3, 1)

  @staticmethod
  def to_uint8(x):
    return (np.clip((x + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8)
