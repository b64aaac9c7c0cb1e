"""``image.tokenizer=magvitv2``: the pretrained MAGVIT-v2 tokenizer of Show-o and MMaDA, behind the image interface.

The upstream is Gen-Verse/MMaDA ``models/modeling_magvitv2.py`` (``MAGVITv2``: ``VQGANEncoder``, ``LFQuantizer``,
``VQGANDecoder``), published as ``showlab/magvitv2``: 256 px RGB -> 16 x 16 codes of a 2^13 = 8,192 lookup-free
codebook (16x downsampling). The network (Flax) is in ``models/magvitv2.py``, imported only when a tokenizer is built,
because this module is imported with the ``tokenizers`` package, which loads no JAX.

  encode  uint8 [N, H, W, 3] -> (v / 255 - 0.5) / 0.5 (the upstream's ToTensor + Normalize(0.5, 0.5)) -> encoder
          -> z [N, h, w, D] -> index = sum_c [z_c > 0] 2^(D-1-c) (channel 0 the most significant bit)
          -> int32 [N, h*w], row-major over the grid
  decode  index -> code q_c = 2 ((index >> (D-1-c)) & 1) - 1 in {-1, +1} -> decoder -> x about [-1, 1]
          -> uint8 floor(clamp((x + 1) / 2, 0, 1) * 255) (the upstream scripts' ``.astype(np.uint8)`` truncates)

Weights are read from a directory: the upstream's ``config.json`` (if there; its ``_class_name`` must be
``MAGVITv2``) and one ``*.safetensors`` (``pytorch_model.safetensors`` as the upstream's ``save_pretrained`` names
it; ``model.safetensors`` or a sharded index work too). ``MAGVITv2.__init__`` takes no arguments, so its config
holds no sizes: the architecture (widths, blocks per level, attention, code bits) is read from the tensors' names
and shapes (:func:`arch_from_shapes`), and every tensor is checked against it.

The published checkpoint is a PyTorch ``pytorch_model.bin``; convert it to safetensors on your own machine (this
project reads no pickles)::

  pip install torch safetensors
  python -c "import torch; from safetensors.torch import save_file; \\
    sd = torch.load('pytorch_model.bin', map_location='cpu', weights_only=True); \\
    save_file({k: v.contiguous() for k, v in sd.items()}, 'pytorch_model.safetensors')"

then ``--config.image.tokenizer=magvitv2 --config.image.tokenizer_path=DIR --config.image.size=256
--config.image.codebook_size=8192``. A unified run saves the tokenizer into ``WORKDIR/tokenizers/`` (its
``image_tokenizer.json`` and the weights, in the upstream's names and layout, under ``magvitv2/``), from where every
reader loads it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

from etils import epath
import numpy as np

from unimm_jax import safetensors_io
from unimm_jax.tokenizers import base

KIND = "magvitv2"
UPSTREAM_CLASS = "MAGVITv2"
WEIGHTS_DIR = "magvitv2"   # beside image_tokenizer.json: the weights in the upstream's layout
_BIN = "pytorch_model.bin"
PRECISIONS = ("highest", "high", "default")
_EXPECTED = ("encoder.conv_in.weight, encoder.down.N.block.M.*, encoder.quant_conv.weight, decoder.conv_in.weight, "
             "decoder.up.N.block.M.*, decoder.post_quant_conv.weight")


# ---------------------------------------------------------------------------------------------------------------
# The architecture, as the tensors state it
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MagvitArch:
  """Everything static about a MAGVIT-v2 network (hashable: a jit-static argument).

  Widths are channels per level (the upstream's ``ch * ch_mult[i]``); ``*_attn[i]``: that level's res blocks are
  each followed by an AttnBlock (the upstream's ``curr_res in attn_resolutions``).
  """

  in_channels: int
  enc_in: int                    # conv_in's output channels (ch)
  enc_widths: tuple[int, ...]
  enc_blocks: tuple[int, ...]
  enc_attn: tuple[bool, ...]
  codebook_dim: int              # D: LFQ bits (z_channels)
  dec_in: int                    # decoder conv_in's output channels (ch * ch_mult[-1])
  dec_widths: tuple[int, ...]
  dec_blocks: tuple[int, ...]
  dec_attn: tuple[bool, ...]
  out_channels: int

  @property
  def codebook_size(self) -> int:
    return 2 ** self.codebook_dim

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.enc_widths) - 1)

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> MagvitArch:
    return cls(**{f.name: tuple(d[f.name]) if isinstance(d[f.name], list) else d[f.name]
                  for f in dataclasses.fields(cls)})

  def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
    """The upstream state dict's ``encoder.*`` / ``decoder.*`` names and torch shapes (conv weights [O, I, kh, kw])."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
      out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
      out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
      norm(f"{name}.norm1", cin)
      conv(f"{name}.conv1", cin, cout, 3)
      norm(f"{name}.norm2", cout)
      conv(f"{name}.conv2", cout, cout, 3)
      if cin != cout:
        conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
      norm(f"{name}.norm", c)
      for part in ("q", "k", "v", "proj_out"):
        conv(f"{name}.{part}", c, c, 1)

    def mid(name, c):
      resnet(f"{name}.block_1", c, c)
      attn(f"{name}.attn_1", c)
      resnet(f"{name}.block_2", c, c)

    def level(name, cin, width, blocks, attend, resample):
      for j in range(blocks):
        resnet(f"{name}.block.{j}", cin if j == 0 else width, width)
        if attend:
          attn(f"{name}.attn.{j}", width)
      if resample:
        conv(f"{name}.{resample}.conv", width, width, 3)

    d = self.codebook_dim
    conv("encoder.conv_in", self.in_channels, self.enc_in, 3)
    c, last = self.enc_in, len(self.enc_widths) - 1
    for i, (w, b, a) in enumerate(zip(self.enc_widths, self.enc_blocks, self.enc_attn)):
      level(f"encoder.down.{i}", c, w, b, a, None if i == last else "downsample")
      c = w
    mid("encoder.mid", c)
    norm("encoder.norm_out", c)
    conv("encoder.conv_out", c, d, 3)
    conv("encoder.quant_conv", d, d, 1)

    conv("decoder.post_quant_conv", d, d, 1)
    conv("decoder.conv_in", d, self.dec_in, 3)
    mid("decoder.mid", self.dec_in)
    c = self.dec_in
    for i in reversed(range(len(self.dec_widths))):
      w = self.dec_widths[i]
      level(f"decoder.up.{i}", c, w, self.dec_blocks[i], self.dec_attn[i], "upsample" if i else None)
      c = w
    norm("decoder.norm_out", c)
    conv("decoder.conv_out", c, self.out_channels, 3)
    return out


# The published showlab/magvitv2 (the upstream's defaults): ch 128, encoder ch_mult (1, 2, 2, 4, 4) with (4, 3, 4, 3, 4)
# blocks, decoder ch_mult (1, 1, 2, 2, 4) with (4, 4, 3, 4, 3), no attention outside the mids (attn_resolutions [5]
# never occurs), 13 bits. Only the geometry of a config without a tokenizer_path is read from it (a dry run).
PUBLISHED = MagvitArch(3, 128, (128, 256, 256, 512, 512), (4, 3, 4, 3, 4), (False,) * 5, 13,
                       512, (128, 128, 256, 256, 512), (4, 4, 3, 4, 3), (False,) * 5, 3)


def arch_from_shapes(shapes: dict[str, tuple[int, ...]], where: str) -> MagvitArch:
  """The architecture the upstream tensors ``{name: torch shape}`` describe; ValueError naming what is missing."""

  def shape(name):
    if name not in shapes:
      raise ValueError(f"{where} is not a MAGVIT-v2 checkpoint: no tensor {name} (expected the upstream's "
                       f"{_EXPECTED}; models/modeling_magvitv2.py of Gen-Verse/MMaDA)")
    return shapes[name]

  def levels(prefix):
    widths, blocks, attn = [], [], []
    while f"{prefix}.{len(widths)}.block.0.conv1.weight" in shapes:
      i = len(widths)
      widths.append(shapes[f"{prefix}.{i}.block.0.conv1.weight"][0])
      n = 1
      while f"{prefix}.{i}.block.{n}.conv1.weight" in shapes:
        n += 1
      blocks.append(n)
      attn.append(f"{prefix}.{i}.attn.0.q.weight" in shapes)
    if not widths:
      shape(f"{prefix}.0.block.0.conv1.weight")   # raises, naming it
    return tuple(widths), tuple(blocks), tuple(attn)

  conv_in = shape("encoder.conv_in.weight")
  d = shape("encoder.quant_conv.weight")[0]
  enc = levels("encoder.down")
  dec = levels("decoder.up")
  arch = MagvitArch(conv_in[1], conv_in[0], *enc, d, shape("decoder.conv_in.weight")[0], *dec,
                    shape("decoder.conv_out.weight")[0])
  if len(arch.dec_widths) != len(arch.enc_widths):
    raise ValueError(f"{where}: the encoder has {len(arch.enc_widths)} levels (downsampling {arch.downsample}) but "
                     f"the decoder {len(arch.dec_widths)}; a MAGVIT-v2 decoder upsamples what its encoder downsamples")
  return arch


def check_tensors(shapes: dict[str, tuple[int, ...]], arch: MagvitArch, where: str) -> None:
  """Every encoder/decoder tensor the architecture needs, of its shape, and none else; the GroupNorms' channels
  divisible by 32; the quantizer's buffers, when saved, the LFQ rule's. One-line ValueError otherwise."""
  want = arch.tensor_shapes()
  for name, s in want.items():
    if name not in shapes:
      raise ValueError(f"{where}: tensor {name} {list(s)} is missing (a MAGVIT-v2 checkpoint with "
                       f"{len(arch.enc_widths)} levels needs {len(want)} encoder/decoder tensors)")
    if tuple(shapes[name]) != s:
      raise ValueError(f"{where}: tensor {name} is {list(shapes[name])}, the architecture its other tensors "
                       f"state needs {list(s)}")
  extra = sorted(n for n in shapes if n.startswith(("encoder.", "decoder.")) and n not in want)
  if extra:
    raise ValueError(f"{where}: tensor {extra[0]} (and {len(extra) - 1} more) is not part of a MAGVIT-v2 "
                     "encoder/decoder (temb_proj, conv_shortcut and double_z are not supported)")
  for name, s in want.items():
    if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "norm_out.weight")) and s[0] % 32:
      raise ValueError(f"{where}: {name} has {s[0]} channels; the upstream's GroupNorm(32) needs a multiple of 32")


def code_table(bits: int) -> np.ndarray:
  """Every LFQ code in index order: row i = 2 ((i >> (D-1-c)) & 1) - 1.  float32 [2^D, D] in {-1, +1}

  (the upstream's ``LFQuantizer.embedding`` buffer)."""
  i = np.arange(2 ** bits, dtype=np.int64)[:, None]
  return (((i >> np.arange(bits - 1, -1, -1)) & 1) * 2 - 1).astype(np.float32)


def _check_quantizer(reader: safetensors_io.CheckpointReader, d: int, where: str) -> None:
  """The saved ``quantize.embedding`` / ``quantize.power_vals`` buffers (if any) are the rule this module uses."""
  if "quantize.embedding" in reader.tensors:
    emb = reader.read("quantize.embedding")
    if emb.shape != (2 ** d, d) or not np.array_equal(emb.astype(np.float32), code_table(d)):
      raise ValueError(f"{where}: quantize.embedding {list(emb.shape)} is not the LFQ table of {d} bits "
                       f"(row i = the bits of i, most significant first, as -1/+1); [{2 ** d}, {d}] expected")
  if "quantize.power_vals" in reader.tensors:
    powers = reader.read("quantize.power_vals")
    if not np.array_equal(powers.astype(np.int64), 2 ** np.arange(d - 1, -1, -1)):
      raise ValueError(f"{where}: quantize.power_vals {powers.tolist()} is not [2^{d - 1}, ..., 2, 1]")


# ---------------------------------------------------------------------------------------------------------------
# Reading a checkpoint directory (no JAX)
# ---------------------------------------------------------------------------------------------------------------
def _reader(directory: epath.Path) -> safetensors_io.CheckpointReader:
  if not directory.is_dir():
    raise FileNotFoundError(f"MAGVIT-v2 tokenizer directory {directory} does not exist: download the upstream "
                            "(showlab/magvitv2) there and convert its weights to safetensors (see "
                            "unimm_jax/tokenizers/magvitv2.py)")
  if (directory / safetensors_io.INDEX_FILE).exists() or (directory / safetensors_io.SINGLE_FILE).exists():
    return safetensors_io.CheckpointReader(directory)
  files = sorted(p.name for p in directory.glob("*.safetensors"))
  if len(files) == 1:
    return safetensors_io.CheckpointReader(directory / files[0])
  if files:
    raise ValueError(f"{directory}: several .safetensors files ({', '.join(files)}) and no "
                     f"{safetensors_io.INDEX_FILE}; leave the MAGVIT-v2 weights as the only one")
  if (directory / _BIN).exists():
    raise ValueError(f"{directory / _BIN} is a PyTorch pickle, which this project does not read: convert it to "
                     f"{directory / 'pytorch_model.safetensors'} on your own machine (the command is in "
                     "unimm_jax/tokenizers/magvitv2.py's docstring)")
  raise ValueError(f"{directory} is not a MAGVIT-v2 checkpoint: no *.safetensors file (expected config.json and "
                   "pytorch_model.safetensors of showlab/magvitv2)")


def _check_upstream_config(directory: epath.Path) -> None:
  path = directory / "config.json"
  if not path.exists():
    return
  cls = json.loads(path.read_text()).get("_class_name")
  if cls not in (None, UPSTREAM_CLASS):
    raise ValueError(f"{path}: _class_name {cls!r} is not {UPSTREAM_CLASS!r}: this is not a MAGVIT-v2 checkpoint "
                     "(a diffusers VQModel such as aMUSEd's is image.tokenizer=vqgan)")


def _check_not_saved_other_kind(directory: epath.Path) -> dict[str, Any] | None:
  """The parsed image_tokenizer.json if ``directory`` holds a saved magvitv2 tokenizer; ValueError for another kind."""
  path = directory / base.IMAGE_TOKENIZER_FILE
  if not path.exists():
    return None
  payload = base.read_json(directory, base.IMAGE_TOKENIZER_FILE, "image")
  if payload.get("kind") != KIND:
    raise ValueError(f"{path} holds a saved {payload.get('kind')!r} image tokenizer, not a MAGVIT-v2 checkpoint; "
                     f"use config.image.tokenizer={payload.get('kind')!r}, or point image.tokenizer_path at the "
                     "MAGVIT-v2 download")
  return payload


def read_checkpoint(directory) -> tuple[MagvitArch, safetensors_io.CheckpointReader]:
  """The architecture and a reader of the upstream checkpoint in ``directory``, every tensor checked (no JAX)."""
  directory = epath.Path(directory)
  _check_not_saved_other_kind(directory)
  _check_upstream_config(directory)
  reader = _reader(directory)
  where = str(directory)
  shapes = {name: info.shape for name, info in reader.tensors.items()}
  arch = arch_from_shapes(shapes, where)
  check_tensors(shapes, arch, where)
  _check_quantizer(reader, arch.codebook_dim, where)
  return arch, reader


@functools.lru_cache(maxsize=8)
def _arch_at(path: str) -> MagvitArch:
  directory = epath.Path(path)
  payload = _check_not_saved_other_kind(directory)
  if payload is not None:
    return MagvitArch.from_dict(payload["config"]["arch"])
  return read_checkpoint(directory)[0]


def arch_of_config(config) -> MagvitArch:
  """The architecture of ``config.image.tokenizer_path`` (headers only), or the published one without a path."""
  path = config.image.tokenizer_path
  return _arch_at(str(path)) if path else PUBLISHED


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------------------
def check_size(size: int, arch: MagvitArch, where: str = "config.image.size") -> None:
  if size <= 0 or size % arch.downsample:
    raise ValueError(f"{where}={size} is not a positive multiple of the MAGVIT-v2 tokenizer's downsampling "
                     f"{arch.downsample}; use e.g. {max(size // arch.downsample, 1) * arch.downsample}")


class MagvitV2Tokenizer(base.CompiledImageTokenizer):
  """MAGVIT-v2 with lookup-free quantization as an ImageTokenizer (module docstring).

  Encode and decode run as jitted calls over chunks of ``encode_batch`` images (the last one padded), so any
  number of images reuses one compiled program and an image's codes do not depend on its batch.
  """

  kind = KIND

  def __init__(self, arch: MagvitArch, tensors: dict[str, np.ndarray], size: int, *, encode_batch: int = 8,
               precision: str = "highest"):
    """``tensors``: the upstream's ``encoder.*`` / ``decoder.*`` state dict (torch names and layouts);
    ``precision``: matmul precision of the network (models/magvitv2.py: 'highest' keeps every code's sign float32)."""
    import jax  # pylint: disable=g-import-not-at-top  (the package imports no JAX; a built tokenizer does)
    from unimm_jax.models import magvitv2 as net  # pylint: disable=g-import-not-at-top
    check_size(size, arch, "image size")
    if encode_batch < 1:
      raise ValueError(f"encode_batch={encode_batch} must be >= 1")
    if precision not in PRECISIONS:
      raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    self.arch = arch
    self.encode_batch = int(encode_batch)
    self.precision = precision
    self.image_shape = (size, size, arch.in_channels)
    self.grid_shape = (size // arch.downsample, size // arch.downsample)
    self._net = net
    self._params = jax.device_put(net.params_from_torch(tensors, arch), jax.local_devices()[0])
    self._encode_fn = jax.jit(functools.partial(net.encode, arch, precision))
    self._latents_fn = jax.jit(functools.partial(net.encode_latents, arch, precision))
    self._decode_fn = jax.jit(functools.partial(net.decode, arch, precision, self.grid_shape))
    self._decode_float_fn = jax.jit(functools.partial(net.decode_float, arch, precision, self.grid_shape))

  @property
  def vocab_size(self) -> int:
    return self.arch.codebook_size

  def code_features(self) -> np.ndarray:
    """float32 [2^D, D]: each code's LFQ vector in {-1, +1}, the decoder's input (the upstream's embedding)."""
    return code_table(self.arch.codebook_dim)

  def latents(self, images: np.ndarray) -> np.ndarray:
    """The encoder's output before quantization.  uint8 [N, H, W, C] -> float32 [N, h, w, D]"""
    images = np.asarray(images)
    self.encode(images[:0])   # the same shape and dtype checks, on no images
    if not len(images):
      return np.zeros((0, *self.grid_shape, self.arch.codebook_dim), np.float32)
    return self._chunked(self._latents_fn, images)

  def decode_float(self, tokens: np.ndarray) -> np.ndarray:
    """The decoder's output, unclipped, in the upstream's [-1, 1] scale.  int [N, h*w] -> float32 [N, H, W, C]"""
    tokens = np.asarray(tokens)
    self.decode(tokens[:0])   # the same shape checks, on no tokens
    base.check_ids(tokens, self.vocab_size, type(self).__name__)
    if not len(tokens):
      return np.zeros((0, *self.image_shape), np.float32)
    return self._chunked(self._decode_float_fn, tokens.astype(np.int32))

  def config_dict(self) -> dict[str, Any]:
    return {**super().config_dict(), "arch": self.arch.to_dict(), "encode_batch": self.encode_batch,
            "precision": self.precision}

  def upstream_tensors(self) -> dict[str, np.ndarray]:
    """The weights back in the upstream's names and torch layouts (float32)."""
    return self._net.torch_from_params(self._params, self.arch)

  def _save_arrays(self, directory: epath.Path) -> dict[str, Any]:
    tensors = self.upstream_tensors()
    safetensors_io.write_checkpoint(directory / WEIGHTS_DIR, [
        safetensors_io.Planned(name, x.shape, x.dtype, lambda x=x: x) for name, x in tensors.items()])
    (directory / WEIGHTS_DIR / "config.json").write_text(json.dumps({"_class_name": UPSTREAM_CLASS}) + "\n")
    return {"weights_dir": WEIGHTS_DIR}


def _read_tensors(reader: safetensors_io.CheckpointReader) -> dict[str, np.ndarray]:
  return {name: reader.read(name).astype(np.float32) for name in reader.names()
          if name.startswith(("encoder.", "decoder."))}


def from_directory(directory, size: int, *, encode_batch: int = 8) -> MagvitV2Tokenizer:
  """The tokenizer of the upstream checkpoint in ``directory`` for ``size`` x ``size`` images."""
  arch, reader = read_checkpoint(directory)
  check_size(size, arch)
  return MagvitV2Tokenizer(arch, _read_tensors(reader), size, encode_batch=encode_batch)


def load(directory, payload: dict[str, Any]) -> MagvitV2Tokenizer:
  """A tokenizer that ``save`` wrote into ``directory`` (``payload``: its parsed image_tokenizer.json)."""
  cfg = payload["config"]
  arch, reader = read_checkpoint(epath.Path(directory) / payload["weights_dir"])
  if arch != MagvitArch.from_dict(cfg["arch"]):
    raise ValueError(f"{epath.Path(directory) / payload['weights_dir']}: its tensors describe {arch}, "
                     f"{base.IMAGE_TOKENIZER_FILE} says {cfg['arch']}")
  return MagvitV2Tokenizer(arch, _read_tensors(reader), cfg["size"], encode_batch=cfg.get("encode_batch", 8),
                           precision=cfg.get("precision", "highest"))


# ---------------------------------------------------------------------------------------------------------------
# The kind
# ---------------------------------------------------------------------------------------------------------------
def _config_problems(config, arch: MagvitArch, where: str) -> list[str]:
  problems = []
  if config.image.codebook_size != arch.codebook_size:
    problems.append(f"config.image.codebook_size={config.image.codebook_size} but the MAGVIT-v2 tokenizer at "
                    f"{where} has 2^{arch.codebook_dim} = {arch.codebook_size} codes; set "
                    f"--config.image.codebook_size={arch.codebook_size}")
  if config.image.channels != arch.in_channels:
    problems.append(f"config.image.channels={config.image.channels} but the MAGVIT-v2 tokenizer at {where} reads "
                    f"{arch.in_channels}-channel images; set --config.image.channels={arch.in_channels}")
  return problems


def make(config, items) -> MagvitV2Tokenizer:
  """The tokenizer at ``config.image.tokenizer_path`` (an upstream download, or a saved magvitv2 tokenizer)."""
  del items
  path = config.image.tokenizer_path
  if not path:
    raise ValueError("config.image.tokenizer=magvitv2 needs config.image.tokenizer_path: the directory of the "
                     "MAGVIT-v2 weights (showlab/magvitv2, converted to safetensors)")
  directory = epath.Path(path)
  payload = _check_not_saved_other_kind(directory)
  if payload:   # a saved tokenizer: its weights are an upstream checkpoint in its weights_dir
    directory = directory / payload["weights_dir"]
  arch, reader = read_checkpoint(directory)
  problems = _config_problems(config, arch, path)
  if problems:
    raise ValueError(problems[0])
  check_size(config.image.size, arch)   # the same weights serve any size the downsampling divides
  return MagvitV2Tokenizer(arch, _read_tensors(reader), config.image.size)


def _check_saved(config, tokenizer: base.ImageTokenizer) -> list[str]:
  return _config_problems(config, tokenizer.arch, "the workdir") if isinstance(tokenizer, MagvitV2Tokenizer) else []


def _code_bits(config) -> int:
  bits = int(config.image.codebook_size).bit_length() - 1
  if config.image.codebook_size != 2 ** bits:
    raise ValueError(f"config.image.codebook_size={config.image.codebook_size} is not a power of two, which a "
                     "MAGVIT-v2 (lookup-free, 2^bits codes) tokenizer always has; set it to the checkpoint's "
                     "(8192 for showlab/magvitv2)")
  return bits


base.register_image_kind(base.ImageKind(
    name=KIND,
    make=make,
    load=load,
    downsample=lambda config: arch_of_config(config).downsample,
    vocab_bound=lambda config: config.image.codebook_size,
    config_fields=("size", "channels"),
    code_feature_dim=_code_bits,   # a code's D bits as -1/+1
    check_saved=_check_saved,
))
