"""``image.tokenizer=vqgan``: a pretrained VQ-GAN in the diffusers ``VQModel`` layout as an image tokenizer.

This is the tokenizer of aMUSEd, Muddit / Meissonic and Lumina-DiMOO (8,192 codes, 16x downsampling). Point
``config.image.tokenizer_path`` at the model's directory, ``config.json`` (``_class_name`` ``VQModel``) plus
``diffusion_pytorch_model.safetensors``, or at a checkpoint that holds it in a ``vqvae/`` subfolder (as
Lumina-DiMOO's and aMUSEd's do; their code loads ``VQModel.from_pretrained(path, subfolder="vqvae")``)::

  encode  uint8 [N, H, W, 3] -> x = pixels / 255 in [0, 1] -> encoder, quant_conv -> z [N, h, w, D]
          -> index = argmin_k ||z - e_k||  -> int32 [N, h*w], row-major over the grid
  decode  int [N, h*w] -> e_index [N, h, w, D] -> post_quant_conv, decoder -> clip to [0, 1] -> round(255 x) -> uint8

The pixel range is the upstream's: its pipelines preprocess with ``VaeImageProcessor(do_normalize=False)`` (pixels
/ 255, no shift to [-1, 1]) and postprocess ``decode(...).sample.clip(0, 1)`` with ``(x * 255).round()``.
``scaling_factor``, ``force_upcast`` and ``lookup_from_codebook`` concern diffusers' continuous-latent and fp16
paths; the token path here always decodes by codebook lookup, in float32. The network is
``unimm_jax/models/vqgan.py``. Geometry (ImageKind): the downsampling 2 ** (len(block_out_channels) - 1), read
from ``config.json`` (no JAX, so a config is checked before JAX starts; without a path, aMUSEd's); the vocabulary is the model's
``config.image.codebook_size`` (set it to the checkpoint's ``num_vq_embeddings``, 8,192 for aMUSEd and
Lumina-DiMOO: making the tokenizer fails in one line when they differ); code features
(``model.image_code_features``) are the codebook vectors, F = ``vq_embed_dim``.

Encode and decode are jitted over chunks of ``encode_batch`` images (the last chunk padded), on the first local
device, so an image's tokens do not depend on the others encoded with it. ``save`` copies the two upstream files
into ``DIR/vqgan/`` beside ``image_tokenizer.json``, so a workdir or bundle carries the tokenizer it was made with.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from etils import epath
import numpy as np

from unimm_jax.tokenizers import base

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_FILES = (WEIGHTS_FILE, "diffusion_pytorch_model.fp16.safetensors")   # the fp16 variant, if alone
SUBFOLDER = "vqvae"     # where Lumina-DiMOO and aMUSEd keep it inside their checkpoints
SAVED_DIR = "vqgan"     # where save() puts the upstream files, beside image_tokenizer.json
PRECISIONS = ("highest", "default")


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
  """The fields of a diffusers ``VQModel`` config.json that shape the network (hashable: jit-static)."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 3
  num_vq_embeddings: int = 256
  vq_embed_dim: int = 3
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True

  @property
  def downsample(self) -> int:
    """Image pixels per token side: one halving per down block after the first."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_json(cls, cfg: dict[str, Any], where: str) -> "VQGANConfig":
    """Parses a VQModel config.json (diffusers' defaults for absent fields); ValueError, one line, naming ``where``
    and the field, for anything this network does not build."""
    if cfg.get("_class_name") != "VQModel":
      raise ValueError(f"{where} is not a diffusers VQModel config: _class_name is {cfg.get('_class_name')!r}, "
                       "expected 'VQModel'; config.image.tokenizer=vqgan needs a VQModel directory (e.g. "
                       "Lumina-DiMOO's or aMUSEd's vqvae/)")
    chans = tuple(int(c) for c in cfg.get("block_out_channels", (64,)))
    down = tuple(cfg.get("down_block_types", ("DownEncoderBlock2D",)))
    up = tuple(cfg.get("up_block_types", ("UpDecoderBlock2D",)))
    checks = [
        (set(down) <= {"DownEncoderBlock2D"} and len(down) == len(chans),
         f"down_block_types {list(down)}: only {len(chans)} x 'DownEncoderBlock2D' (one per block_out_channels) is built"),
        (set(up) <= {"UpDecoderBlock2D"} and len(up) == len(chans),
         f"up_block_types {list(up)}: only {len(chans)} x 'UpDecoderBlock2D' (one per block_out_channels) is built"),
        (cfg.get("norm_type", "group") == "group",
         f"norm_type {cfg.get('norm_type')!r}: only 'group' is built (the 'spatial' norm is MoVQ's, not aMUSEd's)"),
        (cfg.get("act_fn", "silu") in ("silu", "swish"), f"act_fn {cfg.get('act_fn')!r}: only 'silu' is built"),
    ]
    for ok, problem in checks:
      if not ok:
        raise ValueError(f"{where}: {problem}")
    latent = int(cfg.get("latent_channels", 3))
    out = cls(in_channels=int(cfg.get("in_channels", 3)), out_channels=int(cfg.get("out_channels", 3)),
              block_out_channels=chans, layers_per_block=int(cfg.get("layers_per_block", 1)),
              latent_channels=latent, num_vq_embeddings=int(cfg.get("num_vq_embeddings", 256)),
              vq_embed_dim=int(cfg.get("vq_embed_dim") or latent),
              norm_num_groups=int(cfg.get("norm_num_groups", 32)),
              mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)))
    bad_groups = [c for c in chans if c % out.norm_num_groups]
    if bad_groups:
      raise ValueError(f"{where}: norm_num_groups {out.norm_num_groups} does not divide block_out_channels "
                       f"{list(chans)}")
    return out


# aMUSEd's VQ-GAN (diffusers scripts/convert_amused.py), which Muddit / Meissonic and Lumina-DiMOO use: the geometry a
# config without config.image.tokenizer_path (a dry run, a bundle read elsewhere) is sized by.
PUBLISHED = VQGANConfig(block_out_channels=(128, 256, 256, 512, 768), layers_per_block=2, latent_channels=64,
                        num_vq_embeddings=8192, vq_embed_dim=64, norm_num_groups=32, mid_block_add_attention=False)


# ---------------------------------------------------------------------------------------------------------------
# Finding and reading the upstream directory (no JAX)
# ---------------------------------------------------------------------------------------------------------------
def model_dir(path: base.PathLike, field: str = "config.image.tokenizer_path") -> epath.Path:
  """The VQModel directory at ``path`` or in its ``vqvae/`` subfolder; ValueError, one line, saying what was
  expected and, for a unimm_jax tokenizer directory, which kind it holds."""
  if not str(path):
    raise ValueError(f"config.image.tokenizer=vqgan needs {field}: a diffusers VQModel directory ({CONFIG_FILE} "
                     f"with _class_name 'VQModel' and {WEIGHTS_FILE}), e.g. Lumina-DiMOO's {SUBFOLDER}/")
  path = epath.Path(path)
  for candidate in (path, path / SUBFOLDER):
    if (candidate / CONFIG_FILE).exists():
      return candidate
  hint = ""
  if (path / base.IMAGE_TOKENIZER_FILE).exists():
    kind = json.loads((path / base.IMAGE_TOKENIZER_FILE).read_text()).get("kind")
    hint = f"; it holds a unimm_jax {kind!r} image tokenizer: use config.image.tokenizer={kind!r}"
  raise ValueError(f"{field}={str(path)!r} is not a diffusers VQModel directory: no {CONFIG_FILE} there or in "
                   f"{SUBFOLDER}/ (expected {CONFIG_FILE} with _class_name 'VQModel' and {WEIGHTS_FILE}){hint}")


def read_config(path: base.PathLike, field: str = "config.image.tokenizer_path") -> VQGANConfig:
  """The network config of the VQModel directory at ``path`` (see :func:`model_dir`)."""
  directory = model_dir(path, field)
  return VQGANConfig.from_json(json.loads((directory / CONFIG_FILE).read_text()), str(directory / CONFIG_FILE))


def weights_file(directory: epath.Path) -> epath.Path:
  for name in WEIGHTS_FILES:
    if (directory / name).exists():
      return directory / name
  if (directory / "diffusion_pytorch_model.bin").exists():
    raise ValueError(
        f"{directory} holds diffusion_pytorch_model.bin (a PyTorch pickle), which is not read here; turn it into "
        f"{WEIGHTS_FILE} once where torch is installed: python -c \"import torch; from safetensors.torch import "
        f"save_file; save_file(torch.load('{directory}/diffusion_pytorch_model.bin'), "
        f"'{directory}/{WEIGHTS_FILE}')\"")
  raise ValueError(f"{directory} has {CONFIG_FILE} but no {WEIGHTS_FILE}: copy the VQModel's weights there")


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------------------
class VQGANTokenizer(base.CompiledImageTokenizer):
  """A diffusers VQModel as an ImageTokenizer (module docstring)."""

  kind = "vqgan"

  def __init__(self, path: base.PathLike, size: int, channels: int = 3, *, encode_batch: int = 64,
               precision: str = "highest", field: str = "config.image.tokenizer_path"):
    """Loads the VQModel at ``path`` (or ``path/vqvae``) for ``size`` x ``size`` images of ``channels`` channels;
    ``field`` names ``path`` in errors."""
    import jax  # pylint: disable=g-import-not-at-top  (this module is imported before JAX starts)
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from unimm_jax import safetensors_io  # pylint: disable=g-import-not-at-top
    from unimm_jax.models import vqgan as net  # pylint: disable=g-import-not-at-top

    self.directory = model_dir(path, field)
    self.cfg = read_config(self.directory, field)
    where = str(self.directory / CONFIG_FILE)
    d = self.cfg.downsample
    if size < 1 or size % d:
      raise ValueError(f"config.image.size={size} is not a positive multiple of the VQ-GAN's downsampling {d} "
                       f"(2 ** (len(block_out_channels) - 1), {where}); use e.g. {max(d, size // d * d)}")
    if channels != self.cfg.in_channels or channels != self.cfg.out_channels:
      raise ValueError(f"config.image.channels={channels}, but {where} has in_channels {self.cfg.in_channels} and "
                       f"out_channels {self.cfg.out_channels}; set config.image.channels={self.cfg.in_channels}")
    if encode_batch < 1:
      raise ValueError(f"encode_batch={encode_batch} must be >= 1")
    if precision not in PRECISIONS:
      raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    self.image_shape = (size, size, channels)
    self.grid_shape = (size // d, size // d)
    self.encode_batch = int(encode_batch)
    self.precision = precision

    self.weights = weights_file(self.directory)
    reader = safetensors_io.CheckpointReader(self.weights)
    rows = reader.info("quantize.embedding.weight").shape[0] if "quantize.embedding.weight" in reader.tensors else None
    if rows is not None and rows != self.cfg.num_vq_embeddings:
      raise ValueError(f"{self.weights}: the codebook quantize.embedding.weight has {rows} codes, {where} says "
                       f"num_vq_embeddings {self.cfg.num_vq_embeddings}; the two files are not of one model")
    params = net.params_from_state_dict(self.cfg, {n: reader.read(n) for n in reader.names()}, str(self.weights))
    device = jax.local_devices()[0]
    self._params = jax.device_put(jax.tree.map(jnp.asarray, params), device)
    model = net.VQModel(self.cfg, precision)
    h, w = self.grid_shape

    def encode(params, images):   # uint8 [B, H, W, C] -> int32 [B, h*w]
      x = images.astype(jnp.float32) / 255.0
      return model.apply({"params": params}, x, method=net.VQModel.codes).reshape(images.shape[0], h * w)

    def decode(params, idx):      # int32 [B, h*w] -> uint8 [B, H, W, C]
      x = decode_float(params, idx)
      return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)

    def decode_float(params, idx):   # int32 [B, h*w] -> float32 [B, H, W, C], the decoder's raw output
      z = model.apply({"params": params}, idx.reshape(idx.shape[0], h, w), method=net.VQModel.codebook_entries)
      return model.apply({"params": params}, z, method=net.VQModel.decode)

    self._encode_fn = jax.jit(encode)
    self._decode_fn = jax.jit(decode)
    self._decode_float_fn = jax.jit(decode_float)

  @property
  def vocab_size(self) -> int:
    return self.cfg.num_vq_embeddings

  @property
  def codebook(self) -> np.ndarray:
    """float32 [K, D]: the code vectors e_k."""
    return np.asarray(self._params["quantize"]["embedding"], np.float32)

  def code_features(self) -> np.ndarray:
    """The codebook, float32 [vocab_size, vq_embed_dim]: what the decoder reads for each code."""
    return self.codebook

  def decode_float(self, tokens: np.ndarray) -> np.ndarray:
    """The decoder's output before clipping and rounding.  int [N, h*w] -> float32 [N, H, W, C], ~[0, 1]"""
    tokens = np.asarray(tokens)
    base.check_ids(tokens, self.vocab_size, type(self).__name__)
    return self._chunked(self._decode_float_fn, tokens.astype(np.int32))

  def config_dict(self) -> dict[str, Any]:
    return {**super().config_dict(), "downsample": self.cfg.downsample, "encode_batch": self.encode_batch,
            "precision": self.precision}

  def _save_arrays(self, directory: epath.Path) -> dict[str, Any]:
    """Copies config.json and the weights, byte for byte, into ``directory/vqgan/``."""
    target = directory / SAVED_DIR
    if target.resolve() != self.directory.resolve():
      target.mkdir(parents=True, exist_ok=True)
      (target / CONFIG_FILE).write_text((self.directory / CONFIG_FILE).read_text())
      self.weights.copy(target / self.weights.name, overwrite=True)
    return {"vqgan_dir": SAVED_DIR}


def load(directory: epath.Path, payload: dict[str, Any]) -> VQGANTokenizer:
  """The tokenizer saved in ``directory`` (``payload``: its parsed image_tokenizer.json)."""
  cfg = payload["config"]
  tok = VQGANTokenizer(epath.Path(directory) / payload.get("vqgan_dir", SAVED_DIR), cfg["size"], cfg["channels"],
                       encode_batch=cfg.get("encode_batch", 64), precision=cfg.get("precision", "highest"),
                       field=f"the saved tokenizer in {directory}")
  if tok.vocab_size != cfg["vocab_size"]:
    raise ValueError(f"{directory / base.IMAGE_TOKENIZER_FILE} says vocab_size {cfg['vocab_size']}, its VQ-GAN "
                     f"has {tok.vocab_size} codes")
  return tok


def config_of(config) -> VQGANConfig:
  """The network config at ``config.image.tokenizer_path``, or the published aMUSEd one without a path."""
  path = config.image.tokenizer_path
  return read_config(path) if path else PUBLISHED


def _codebook_problems(config, codes: int, where: str) -> list[str]:
  """config.image.codebook_size (the model's image vocabulary) against the VQ-GAN's ``codes``."""
  if config.image.codebook_size != codes:
    return [f"config.image.codebook_size={config.image.codebook_size} but the VQ-GAN at {where} has {codes} codes "
            f"(num_vq_embeddings); set --config.image.codebook_size={codes}"]
  return []


def _make(config, items) -> VQGANTokenizer:
  """The VQ-GAN at config.image.tokenizer_path, once its codebook agrees with config.image.codebook_size."""
  del items
  path = config.image.tokenizer_path
  problems = _codebook_problems(config, read_config(path).num_vq_embeddings, repr(str(path)))
  if problems:
    raise ValueError(problems[0])
  return VQGANTokenizer(path, config.image.size, config.image.channels, encode_batch=config.tokenizer.encode_batch)


def _saved_problems(config, tokenizer: base.ImageTokenizer) -> list[str]:
  if not isinstance(tokenizer, VQGANTokenizer):
    return []
  return _codebook_problems(config, tokenizer.vocab_size, "the workdir")


base.register_image_kind(base.ImageKind(
    name="vqgan",
    make=_make,
    load=load,
    downsample=lambda config: config_of(config).downsample,
    vocab_bound=lambda config: config.image.codebook_size,   # checked against the checkpoint's by make
    config_fields=("size", "channels"),
    code_feature_dim=lambda config: config_of(config).vq_embed_dim,
    check_saved=_saved_problems,
))
