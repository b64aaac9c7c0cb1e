"""A tiny diffusers ``VQModel`` in exactly the upstream's layout, and the upstream's forward pass in numpy.

Written from diffusers' public architecture (``autoencoders/vq_model.py`` ``VQModel``, ``autoencoders/vae.py``
``Encoder`` / ``Decoder`` / ``VectorQuantizer``, ``unet_2d_blocks.py`` ``DownEncoderBlock2D`` /
``UpDecoderBlock2D`` / ``UNetMidBlock2D``, ``resnet.py`` ``ResnetBlock2D``, ``downsampling.py`` ``Downsample2D``
(padding 0: pad right and bottom by one), ``upsampling.py`` ``Upsample2D`` (nearest x2, conv), the mid-block
``Attention`` with ``AttnProcessor2_0``), in torch's NCHW and float64, independent of unimm_jax's modules:

* files: ``config.json`` (the fields diffusers saves for a VQModel, ``_class_name`` first) and
  ``diffusion_pytorch_model.safetensors`` written byte by byte by ``llada_upstream``'s writer (8-byte
  little-endian header length, JSON header, raw float32 data);
* tensors: the state-dict names of ``VQModel`` (``encoder.conv_in.weight`` [c0, 3, 3, 3], ...,
  ``encoder.mid_block.attentions.0.to_q.weight`` [C, C], ``quant_conv.weight`` [D, latent, 1, 1],
  ``quantize.embedding.weight`` [K, D], ``post_quant_conv``, ``decoder.up_blocks.0.upsamplers.0.conv.weight``, ...);
  convolutions OIHW, linear layers [out, in].

The pipelines around it (Lumina-DiMOO ``utils/image_utils.py``, aMUSEd) feed pixels / 255 in [0, 1]
(``VaeImageProcessor(do_normalize=False)``) and read ``decode(...).sample.clip(0, 1)``; :func:`encode_indices`
and :func:`decode_indices` are those calls.
"""

from __future__ import annotations

import json
import os

import numpy as np

# The byte-by-byte safetensors writer (8-byte header length, JSON header, raw little-endian data).
from llada_upstream import write_safetensors

EPS = 1e-6


def tiny_config(**overrides) -> dict:
  cfg = {
      "_class_name": "VQModel", "_diffusers_version": "0.30.0", "act_fn": "silu", "block_out_channels": [8, 16],
      "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"], "force_upcast": False, "in_channels": 3,
      "latent_channels": 4, "layers_per_block": 1, "lookup_from_codebook": True, "mid_block_add_attention": True,
      "norm_num_groups": 4, "norm_type": "group", "num_vq_embeddings": 64, "out_channels": 3, "sample_size": 16,
      "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "vq_embed_dim": 6,
  }
  cfg.update(overrides)
  n = len(cfg["block_out_channels"])
  cfg["down_block_types"] = ["DownEncoderBlock2D"] * n
  cfg["up_block_types"] = ["UpDecoderBlock2D"] * n
  return cfg


# ---------------------------------------------------------------------------------------------------------------
# The state dict's names and shapes, from the upstream constructors
# ---------------------------------------------------------------------------------------------------------------
def _conv(out, name, o, i, k):
  out[name + ".weight"], out[name + ".bias"] = (o, i, k, k), (o,)


def _norm(out, name, c):
  out[name + ".weight"], out[name + ".bias"] = (c,), (c,)


def _resnet(out, name, cin, cout):
  _norm(out, name + ".norm1", cin)
  _conv(out, name + ".conv1", cout, cin, 3)
  _norm(out, name + ".norm2", cout)
  _conv(out, name + ".conv2", cout, cout, 3)
  if cin != cout:
    _conv(out, name + ".conv_shortcut", cout, cin, 1)


def _mid(out, name, c, attention):
  _resnet(out, name + ".resnets.0", c, c)
  if attention:
    a = name + ".attentions.0"
    _norm(out, a + ".group_norm", c)
    for lin in ("to_q", "to_k", "to_v", "to_out.0"):
      out[f"{a}.{lin}.weight"], out[f"{a}.{lin}.bias"] = (c, c), (c,)
  _resnet(out, name + ".resnets.1", c, c)


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  chans, n = cfg["block_out_channels"], cfg["layers_per_block"]
  latent = cfg["latent_channels"]
  d = cfg["vq_embed_dim"] or latent
  attn = cfg["mid_block_add_attention"]
  out: dict[str, tuple[int, ...]] = {}
  _conv(out, "encoder.conv_in", chans[0], cfg["in_channels"], 3)
  cout = chans[0]
  for i, c in enumerate(chans):
    cin, cout = cout, c
    for j in range(n):
      _resnet(out, f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
    if i < len(chans) - 1:
      _conv(out, f"encoder.down_blocks.{i}.downsamplers.0.conv", cout, cout, 3)
  _mid(out, "encoder.mid_block", chans[-1], attn)
  _norm(out, "encoder.conv_norm_out", chans[-1])
  _conv(out, "encoder.conv_out", latent, chans[-1], 3)
  _conv(out, "quant_conv", d, latent, 1)
  out["quantize.embedding.weight"] = (cfg["num_vq_embeddings"], d)
  _conv(out, "post_quant_conv", latent, d, 1)
  rev = list(reversed(chans))
  _conv(out, "decoder.conv_in", rev[0], latent, 3)
  _mid(out, "decoder.mid_block", rev[0], attn)
  cout = rev[0]
  for i, c in enumerate(rev):
    cin, cout = cout, c
    for j in range(n + 1):
      _resnet(out, f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
    if i < len(rev) - 1:
      _conv(out, f"decoder.up_blocks.{i}.upsamplers.0.conv", cout, cout, 3)
  _norm(out, "decoder.conv_norm_out", chans[0])
  _conv(out, "decoder.conv_out", cfg["out_channels"], chans[0], 3)
  return out


def random_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """float32 weights: conv and linear std 1/sqrt(fan_in), biases and norm shifts ~0.1, norm scales ~1, and a
  N(0, 1) codebook (well-separated codes, so the nearest one is never a near tie)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in tensor_shapes(cfg).items():
    if name == "quantize.embedding.weight":
      x = rng.standard_normal(shape)
    elif len(shape) > 1:
      x = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    elif "norm" in name and name.endswith(".weight"):
      x = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      x = 0.1 * rng.standard_normal(shape)
    out[name] = x.astype(np.float32)
  return out


def write_model(directory, cfg: dict, tensors: dict[str, np.ndarray]) -> str:
  """``directory/config.json`` + ``directory/diffusion_pytorch_model.safetensors``, as save_pretrained lays them."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=False)
  write_safetensors(os.path.join(directory, "diffusion_pytorch_model.safetensors"), tensors)
  return str(directory)


# ---------------------------------------------------------------------------------------------------------------
# The forward pass, NCHW, float64
# ---------------------------------------------------------------------------------------------------------------
def conv2d(x, w, b, stride=1, pad=None):
  """torch Conv2d: x [N, I, H, W], w [O, I, k, k], symmetric zero padding (default k // 2)."""
  k = w.shape[-1]
  pad = k // 2 if pad is None else pad
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
  return np.einsum("nihwab,oiab->nohw", win, w) + b[None, :, None, None]


def group_norm(x, groups, w, b):
  n, c, h, wd = x.shape
  g = x.reshape(n, groups, c // groups, h, wd)
  mean = g.mean(axis=(2, 3, 4), keepdims=True)
  var = g.var(axis=(2, 3, 4), keepdims=True)
  g = (g - mean) / np.sqrt(var + EPS)
  return g.reshape(n, c, h, wd) * w[None, :, None, None] + b[None, :, None, None]


def silu(x):
  return x / (1.0 + np.exp(-x))


class Reference:
  """The upstream VQModel over the state dict ``tensors`` (float64)."""

  def __init__(self, cfg: dict, tensors: dict[str, np.ndarray]):
    self.cfg = cfg
    self.t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    self.groups = cfg["norm_num_groups"]

  def _conv(self, name, x, stride=1, pad=None):
    return conv2d(x, self.t[name + ".weight"], self.t[name + ".bias"], stride, pad)

  def _norm(self, name, x):
    return group_norm(x, self.groups, self.t[name + ".weight"], self.t[name + ".bias"])

  def _linear(self, name, x):
    return x @ self.t[name + ".weight"].T + self.t[name + ".bias"]

  def resnet(self, name, x):
    h = self._conv(name + ".conv1", silu(self._norm(name + ".norm1", x)))
    h = self._conv(name + ".conv2", silu(self._norm(name + ".norm2", h)))
    if name + ".conv_shortcut.weight" in self.t:
      x = self._conv(name + ".conv_shortcut", x)
    return (x + h) / 1.0     # output_scale_factor 1

  def attention(self, name, x):
    n, c, h, w = x.shape
    residual = x
    y = self._norm(name + ".group_norm", x).reshape(n, c, h * w).transpose(0, 2, 1)     # [N, HW, C]
    q, k, v = (self._linear(f"{name}.{p}", y) for p in ("to_q", "to_k", "to_v"))
    s = q @ k.transpose(0, 2, 1) / np.sqrt(c)     # one head of dim C: SDPA's default scale
    s = np.exp(s - s.max(-1, keepdims=True))
    o = (s / s.sum(-1, keepdims=True)) @ v
    o = self._linear(name + ".to_out.0", o)
    return o.transpose(0, 2, 1).reshape(n, c, h, w) + residual

  def mid(self, name, x):
    x = self.resnet(name + ".resnets.0", x)
    if self.cfg["mid_block_add_attention"]:
      x = self.attention(name + ".attentions.0", x)
    return self.resnet(name + ".resnets.1", x)

  def encode(self, x):
    """VQModel.encode: x [N, C, H, W] in [0, 1] -> latents [N, D, h, w] (encoder, quant_conv)."""
    chans, n = self.cfg["block_out_channels"], self.cfg["layers_per_block"]
    x = self._conv("encoder.conv_in", x)
    for i in range(len(chans)):
      for j in range(n):
        x = self.resnet(f"encoder.down_blocks.{i}.resnets.{j}", x)
      if i < len(chans) - 1:
        x = np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1)))
        x = self._conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", x, stride=2, pad=0)
    x = self.mid("encoder.mid_block", x)
    x = self._conv("encoder.conv_out", silu(self._norm("encoder.conv_norm_out", x)))
    return self._conv("quant_conv", x)

  def quantize_indices(self, z):
    """VectorQuantizer.forward's indices: argmin over torch.cdist of the [N*h*w, D] rows.  [N, D, h, w] -> [N*h*w]"""
    e = self.t["quantize.embedding.weight"]
    flat = z.transpose(0, 2, 3, 1).reshape(-1, e.shape[1])
    dist = np.sqrt(((flat[:, None, :] - e[None, :, :]) ** 2).sum(-1))
    return np.argmin(dist, axis=1)

  def codebook_entry(self, idx, shape):
    """get_codebook_entry(indices, shape=(N, h, w, D)) -> [N, D, h, w]."""
    return self.t["quantize.embedding.weight"][idx.reshape(-1)].reshape(shape).transpose(0, 3, 1, 2)

  def decode_latents(self, quant):
    """VQModel.decode after the quantizer: post_quant_conv, decoder.  [N, D, h, w] -> [N, C, H, W]"""
    chans, n = list(reversed(self.cfg["block_out_channels"])), self.cfg["layers_per_block"]
    x = self._conv("decoder.conv_in", self._conv("post_quant_conv", quant))
    x = self.mid("decoder.mid_block", x)
    for i in range(len(chans)):
      for j in range(n + 1):
        x = self.resnet(f"decoder.up_blocks.{i}.resnets.{j}", x)
      if i < len(chans) - 1:
        x = x.repeat(2, axis=2).repeat(2, axis=3)
        x = self._conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", x)
    return self._conv("decoder.conv_out", silu(self._norm("decoder.conv_norm_out", x)))

  # The calls the upstream pipelines make, on uint8 NHWC images.
  def encode_indices(self, images):
    """``vqvae.quantize(vqvae.encode(x).latents)[2][2]`` for x = images / 255.  uint8 [N, H, W, C] -> [N, h*w]"""
    x = images.astype(np.float64).transpose(0, 3, 1, 2) / 255.0
    z = self.encode(x)
    return self.quantize_indices(z).reshape(images.shape[0], -1), z

  def decode_indices(self, idx, grid):
    """``vqvae.decode(idx, force_not_quantize=True, shape=(N, h, w, D)).sample`` as NHWC (before clip).
    int [N, h*w] -> float [N, H, W, C]"""
    d = self.t["quantize.embedding.weight"].shape[1]
    quant = self.codebook_entry(idx, (idx.shape[0], grid[0], grid[1], d))
    return self.decode_latents(quant).transpose(0, 2, 3, 1)
