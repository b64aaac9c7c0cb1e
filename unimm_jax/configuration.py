"""The base config (every key the code reads, with its default) and the validation of a run's config.

Every config in ``configs/`` starts from :func:`base_config` and changes values; it may not add keys.
:func:`validate` runs before anything is compiled and raises one :class:`ConfigError` that names every bad
field: a key the base config does not have (with the closest existing one), a wrong type, a value outside its
choices or range, or sizes that do not fit together (text length + image tokens vs ``model.max_len``, image
size vs patch). Sizes that depend on fitted tokenizers are checked by :func:`check_tokenizers`.
"""

from __future__ import annotations

import ctypes
import difflib
import os
import sys
from typing import Any

import ml_collections

from unimm_jax import tokenizers   # no JAX: the registry of tokenizer kinds and their geometry

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
  """A config that cannot run; the message names each bad field."""


# Fields whose value must be one of a fixed set.
CHOICES = {
    "data.source": ("shapes", "folder", "tfds", "pretokenized"),
    "text.tokenizer": ("word", "byte", "sentencepiece"),
    "text.sentencepiece_type": ("unigram", "bpe"),
    "image.tokenizer": ("pixel", "patch", "fsq", "vq"),
    "diffusion.schedule": ("linear", "cosine", "polynomial"),
    "diffusion.loss_weighting": ("elbo", "flat", "tokens"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.positions": ("rope", "learned", "rope+learned"),
    "model.attention": ("xla", "cudnn"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "train.on_nonfinite": ("stop", "skip"),
    "sample.method": ("confidence", "ancestral"),
    "sample.reveal_schedule": ("cosine", "linear"),
    "sample.joint_order": ("together", "text_first", "image_first"),
}
# Fields that must be > 0 (ints and floats); ">= 0" ones below.
POSITIVE = (
    "model.d_model", "model.num_layers", "model.vocab_multiple", "model.num_heads", "model.head_dim", "model.mlp_dim", "model.max_len",
    "text.max_len", "image.size", "image.channels", "image.patch", "image.codebook_size", "train.steps",
    "train.batch_size", "train.concurrent_chunks", "train.log_every", "eval.every_steps", "eval.batch_size", "ckpt.every_steps",
    "ckpt.max_to_keep", "optim.learning_rate", "data.train_size", "data.val_size", "data.fit_examples",
    "diffusion.poly_power", "model.rope_theta", "eval.num_generate", "sample.t2i_steps", "sample.i2t_steps",
    "sample.i2t_candidates", "sample.joint_steps", "text.vocab_size", "tokenizer.res_blocks",
    "tokenizer.vq_codebook_size", "tokenizer.vq_dim", "tokenizer.steps", "tokenizer.batch_size",
    "tokenizer.learning_rate", "tokenizer.log_every", "tokenizer.eval_every", "tokenizer.encode_batch",
)
NON_NEGATIVE = ("mesh.cpu_devices", "model.directional_heads", "sample.temperature", "sample.confidence_noise", "sample.guidance_scale", "optim.warmup_steps",
                "optim.weight_decay", "optim.grad_clip", "diffusion.text_loss_weight", "diffusion.image_loss_weight",
                "data.num_threads", "text.max_vocab", "seed", "data.seed", "tokenizer.warmup_steps",
                "tokenizer.grad_clip", "tokenizer.weight_decay", "tokenizer.vq_commitment",
                "tokenizer.vq_dead_threshold", "tokenizer.report_images")
# The learned image tokenizers (trained by ``python -m unimm_jax.tokenizer_main``, config group ``tokenizer``).
LEARNED_IMAGE_TOKENIZERS = tuple(name for name, kind in tokenizers.IMAGE_KINDS.items() if kind.learned)
TOKENIZER_ENCODERS = tokenizers.TOKENIZER_ENCODERS   # tokenizer.encoder (models/autoencoder.py)


def base_config() -> ConfigDict:
  """Every key the code reads, with defaults sized for the embedded ``shapes`` data on a CPU."""
  c = ConfigDict()
  c.seed = 0                     # model: initialisation, masking noise, data order

  c.data = ConfigDict()
  c.data.source = "shapes"       # shapes | folder | tfds | pretokenized
  c.data.path = ""               # folder: DIR with train.jsonl / val.jsonl; pretokenized: the pretokenize --out DIR
  c.data.seed = 0                # shapes: which examples the splits hold; fixed, so every run is scored on one val set
  c.data.train_size = 100_000    # shapes: examples in the train split (procedural, so size is free)
  c.data.val_size = 512          # shapes: examples in the val split
  c.data.fit_examples = 5_000    # training examples used to fit the tokenizers at the first run
  c.data.num_threads = 1         # grain prefetch threads; 0 reads in the main thread
  # tfds: any TFDS image dataset with captions or class labels, read through tfds.data_source (no TensorFlow)
  c.data.tfds_name = ""          # e.g. "coco_captions", "imagenet2012", "my_dataset:1.0.0"
  c.data.tfds_data_dir = ""      # where it was built (gs:// works); "" = TFDS's default (~/tensorflow_datasets)
  c.data.tfds_train_split = "train"
  c.data.tfds_val_split = "validation"
  c.data.image_key = "image"     # feature holding the image; nested features with "/" ("image/encoded")
  c.data.text_key = ""           # feature holding the caption (a string, or a sequence: its first) ...
  c.data.label_key = ""          # ... or a ClassLabel, whose name goes into a template (exactly one of the two)
  c.data.caption_templates = ("a photo of a {}.",)  # label captions; example i uses template i mod len

  c.text = ConfigDict()
  c.text.tokenizer = "word"      # word | byte | sentencepiece
  c.text.max_len = 24            # text positions per sequence; captions are truncated / PAD-padded
  c.text.max_vocab = 0           # word: keep the most frequent N words (0 = all)
  c.text.vocab_size = 8_000      # sentencepiece: pieces to train (an upper bound: small corpora get fewer)
  c.text.sentencepiece_type = "unigram"  # sentencepiece: unigram | bpe
  c.text.sentencepiece_model = ""  # sentencepiece: a trained .model file to use instead of training one

  c.image = ConfigDict()
  c.image.tokenizer = "patch"    # pixel | patch | fsq | vq (learned: config.tokenizer, tokenizer_main)
  c.image.tokenizer_path = ""    # fsq | vq: the tokenizer_main workdir (or any directory with image_tokenizer.json)
  c.image.size = 24
  c.image.channels = 3
  c.image.levels = 4             # quantization levels per channel
  c.image.patch = 4              # patch: side of a patch in pixels
  c.image.codebook_size = 1024   # patch: keep at most this many distinct training patches

  # The learned image tokenizer (image.tokenizer fsq | vq): network, quantizer and its own training run.
  c.tokenizer = ConfigDict()
  c.tokenizer.widths = (16, 32, 64)   # channels per resolution; len - 1 halvings: 24 px -> 6x6 tokens
  c.tokenizer.res_blocks = 1     # residual blocks per resolution
  c.tokenizer.encoder = "conv"   # conv | patch: a token's code from its own pixels only (models/autoencoder.py)
  c.tokenizer.fsq_levels = (8, 5, 5, 5)  # fsq: levels per latent channel; codebook = product (1,000)
  c.tokenizer.vq_codebook_size = 1024    # vq: codes
  c.tokenizer.vq_dim = 8         # vq: dimension of a code
  c.tokenizer.vq_decay = 0.99    # vq: EMA decay of the codebook statistics
  c.tokenizer.vq_commitment = 0.25       # vq: beta of the commitment loss
  c.tokenizer.vq_dead_threshold = 0.1    # vq: restart a code whose EMA count (uses per batch) falls below this
  c.tokenizer.steps = 1_200
  c.tokenizer.batch_size = 64
  c.tokenizer.learning_rate = 3e-3
  c.tokenizer.warmup_steps = 100
  c.tokenizer.weight_decay = 0.0
  c.tokenizer.grad_clip = 1.0
  c.tokenizer.log_every = 100
  c.tokenizer.eval_every = 500   # validation (PSNR, code usage, perplexity) and checkpoint interval
  c.tokenizer.report_images = 16 # val reconstructions shown in the tokenizer's report.html
  c.tokenizer.encode_batch = 64  # images per compiled encode/decode call when the tokenizer is used as one

  c.model = ConfigDict()
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.head_dim = 32
  c.model.mlp_dim = 384          # hidden width of the gated MLP
  c.model.max_len = 64           # must hold text.max_len + image tokens
  c.model.positions = "rope+learned"  # rope (1-D text, 2-D image) | learned (absolute) | rope+learned
  c.model.rope_theta = 10_000.0
  c.model.rope_fraction = 0.5    # share of each head's dimensions that rotate; the rest match by content (BENCHMARKS)
  c.model.dtype = "float32"      # compute dtype; bfloat16 keeps float32 master weights
  c.model.param_dtype = "float32"
  c.model.attention = "xla"      # implementation for jax.nn.dot_product_attention: xla | cudnn (GPU)
  c.model.vocab_multiple = 128   # embedding/head rows padded to a multiple of this (1 = no padding)
  c.model.scan_layers = False    # nn.scan over the layers: compile time flat in depth (checkpoints differ in layout)
  c.model.image_code_features = False  # add a learned projection of each image code's appearance to its embedding
  c.model.cross_modal_rope = True  # False: rotary offsets within a modality only; text<->image pairs unrotated
  c.model.qk_norm = False        # RMS-normalise each head's queries and keys (learned gain) before scoring
  c.model.directional_heads = 0  # P: per block, P heads see only earlier caption words and P only later ones
  c.model.fused_qkv = True       # one [d_model, 3, heads, head_dim] q/k/v projection (BENCHMARKS: speed)
  c.model.remat = "none"         # rematerialise blocks: none | full | dots | dots_no_batch

  c.diffusion = ConfigDict()
  c.diffusion.schedule = "linear"        # linear | cosine | polynomial
  c.diffusion.poly_power = 2.0           # polynomial: alpha = 1 - t^k
  c.diffusion.shared_time = False        # one t for both modalities (UniDisc) instead of one each
  c.diffusion.loss_weighting = "elbo"    # elbo | flat | tokens
  c.diffusion.t_min = 1e-3
  c.diffusion.text_loss_weight = 1.0
  c.diffusion.image_loss_weight = 1.0
  c.diffusion.tasks = ConfigDict()       # per-example task mixture (normalised weights)
  c.diffusion.tasks.joint = 0.4          # both modalities noised, each at its own t
  c.diffusion.tasks.text_to_image = 0.2  # text clean, image noised
  c.diffusion.tasks.image_to_text = 0.2  # image clean, text noised
  c.diffusion.tasks.image_only = 0.1     # text fully masked (null condition), image noised
  c.diffusion.tasks.text_only = 0.1      # image fully masked (null condition), text noised

  c.train = ConfigDict()
  c.train.steps = 2_000
  c.train.batch_size = 64        # global batch
  c.train.log_every = 50
  c.train.ema_decay = 0.999
  c.train.on_nonfinite = "stop"  # a NaN/inf loss: stop (last good checkpoint kept) | skip the step
  c.train.concurrent_chunks = 1  # forward/backward as N independent sub-batches in one program (CPU: see train.py)

  c.optim = ConfigDict()
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 100
  c.optim.end_lr_ratio = 0.1     # cosine decay ends at learning_rate * end_lr_ratio
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.grad_clip = 1.0

  c.mesh = ConfigDict()
  c.mesh.shape = (-1, 1, 1)      # ('data', 'fsdp', 'tensor'); -1 = the remaining devices
  c.mesh.cpu_devices = 0         # main job on CPU: split the host into N XLA devices, one thread each (0 = one)
  c.mesh.retain_host_memory = True  # keep freed host memory in the process (glibc): see retain_host_memory()
  # Logical axis -> mesh axes, in priority order (unimm_jax/sharding.py): a rule whose mesh axis an earlier
  # dimension of the same array already took is skipped, so activations keep 'embed' whole.
  c.mesh.rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("vocab", "tensor"),
      ("kv", None),
      ("length", None),
      ("layers", None),
  )

  c.ckpt = ConfigDict()
  c.ckpt.every_steps = 500
  c.ckpt.max_to_keep = 3
  c.ckpt.async_save = True

  c.eval = ConfigDict()
  c.eval.every_steps = 500
  c.eval.batch_size = 128
  c.eval.use_ema = True          # evaluate the EMA weights
  c.eval.num_generate = 512      # val examples scored by generation (shapes only) at the end of the main job

  c.sample = ConfigDict()        # sampler settings of the report and the sample CLI
  c.sample.method = "confidence" # confidence (MaskGIT) | ancestral (MDLM)
  c.sample.t2i_steps = 16
  c.sample.i2t_steps = 24
  c.sample.i2t_candidates = 1     # K > 1: K captions per image, the one that makes the image likeliest kept
  c.sample.joint_steps = 32
  c.sample.temperature = 1.0     # 0 = argmax
  c.sample.confidence_noise = 1.0  # confidence: Gumbel noise on the confidences at the first step, annealed to 0
  c.sample.reveal_schedule = "cosine"  # confidence: cosine | linear
  c.sample.guidance_scale = 0.0
  c.sample.joint_order = "together"  # joint generation: together | text_first | image_first (each stage joint_steps)
  return c


# Fields that changed the parameter layout when they were added, with the value that means "as before".
LEGACY_DEFAULTS = {
    "model.vocab_multiple": 1,     # embedding/head rows were the exact vocabulary
    "model.fused_qkv": False,      # separate query/key/value projections
}


def image_code_feature_dim(config) -> int:
  """F of ``model.image_code_features`` (0 when off): numbers per image code, from the image tokenizer's kind."""
  if not config.model.image_code_features:
    return 0
  kind = _image_kind(config)
  if kind.code_feature_dim is None:
    raise ConfigError(f"config.model.image_code_features=True, but the {kind.name!r} image tokenizer has no code "
                      "features; set config.model.image_code_features=False")
  return kind.code_feature_dim(config)


def from_dict(saved: dict) -> ConfigDict:
  """A saved config (``WORKDIR/config.json``) on top of today's base config, validated.

  Fields added to the base config after the run was saved take their defaults, so old workdirs stay loadable,
  except the fields in :data:`LEGACY_DEFAULTS`, which change the parameter layout: a config saved without one
  was trained with the layout before the field existed. A saved field that the base config does not know is an
  error that names it.
  """
  config = base_config()
  for name, value in LEGACY_DEFAULTS.items():
    group, field = name.split(".")
    if field not in saved.get(group, {}):
      config[group][field] = value

  def merge(target: ConfigDict, values: dict, prefix: str):
    for key, value in values.items():
      if key not in target:
        raise ConfigError(unknown_field_message(prefix + key))
      if isinstance(target[key], ConfigDict):
        merge(target[key], value, f"{prefix}{key}.")
      else:
        target[key] = tuple(value) if isinstance(target[key], tuple) else value

  merge(config, saved, "")
  return validate(config)


def _flatten(cfg: ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    if isinstance(value, ConfigDict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _type_ok(value: Any, default: Any) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def image_token_grid(config: ConfigDict) -> tuple[int, int]:
  """(h, w) of the image token grid that the configured image tokenizer produces."""
  return _image_kind(config).grid(config)


def tokenizer_downsample(config: ConfigDict) -> int:
  """Image pixels per token side: 1 (pixel), image.patch (patch), 2 ** (len(tokenizer.widths) - 1) (fsq, vq)."""
  return _image_kind(config).downsample(config)


def _image_kind(config: ConfigDict) -> tokenizers.ImageKind:
  """The registry's record of ``config.image.tokenizer`` (each kind's geometry is defined there, once)."""
  if config.image.tokenizer not in tokenizers.IMAGE_KINDS:
    raise ConfigError(f"config.image.tokenizer={config.image.tokenizer!r} is not one of "
                      f"{tuple(tokenizers.IMAGE_KINDS)}")
  return tokenizers.IMAGE_KINDS[config.image.tokenizer]


def flat_field_names() -> set[str]:
  """Dotted names of every field of the base config ('model.num_layers', ...)."""
  return set(_flatten(base_config()))


def unknown_field_message(name: str) -> str:
  """'config.NAME is not a known field; did you mean ...?' with the closest field of the base config."""
  close = difflib.get_close_matches(name, _flatten(base_config()), n=1, cutoff=0.6)
  hint = f"; did you mean {close[0]}?" if close else ""
  return f"config.{name} is not a known field{hint}"


def validate(config: ConfigDict) -> ConfigDict:
  """Checks ``config`` against the base config; returns it, or raises one ConfigError naming every bad field."""
  base = _flatten(base_config())
  flat = _flatten(config)
  problems = []
  for name, value in flat.items():
    if name not in base:
      problems.append(unknown_field_message(name))
    elif not _type_ok(value, base[name]):
      problems.append(f"config.{name}={value!r} has type {type(value).__name__}, "
                      f"expected {type(base[name]).__name__}")
  for name in base:
    if name not in flat:
      problems.append(f"config.{name} is missing (start configs from unimm_jax.configuration.base_config())")
  if problems:  # the checks below assume known keys of the right types
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))

  for name, choices in CHOICES.items():
    if flat[name] not in choices:
      problems.append(f"config.{name}={flat[name]!r} is not one of {choices}")
  for name in POSITIVE:
    if not flat[name] > 0:
      problems.append(f"config.{name}={flat[name]!r} must be > 0")
  for name in NON_NEGATIVE:
    if flat[name] < 0:
      problems.append(f"config.{name}={flat[name]!r} must be >= 0")

  c = config
  if not 2 <= c.image.levels <= 256:
    problems.append(f"config.image.levels={c.image.levels} must be in [2, 256]")
  if c.image.channels not in (1, 3):
    problems.append(f"config.image.channels={c.image.channels} must be 1 (grey) or 3 (RGB)")
  if c.image.tokenizer == "pixel" and c.image.levels ** c.image.channels > 2 ** 20:
    problems.append(f"config.image.levels={c.image.levels} gives a pixel vocabulary of "
                    f"{c.image.levels ** c.image.channels} ids (levels ** channels); use fewer levels")
  learned = c.image.tokenizer in LEARNED_IMAGE_TOKENIZERS
  if not c.tokenizer.widths or any(not isinstance(w, int) or w < 1 for w in c.tokenizer.widths):
    problems.append(f"config.tokenizer.widths={tuple(c.tokenizer.widths)} must be positive channel counts")
  if not c.tokenizer.fsq_levels or any(not isinstance(l, int) or l < 2 for l in c.tokenizer.fsq_levels):
    problems.append(f"config.tokenizer.fsq_levels={tuple(c.tokenizer.fsq_levels)} must be integers >= 2")
  if c.tokenizer.encoder not in TOKENIZER_ENCODERS:
    problems.append(f"config.tokenizer.encoder={c.tokenizer.encoder!r} must be one of {TOKENIZER_ENCODERS}")
  if not 0.0 <= c.tokenizer.vq_decay < 1.0:
    problems.append(f"config.tokenizer.vq_decay={c.tokenizer.vq_decay} must be in [0, 1)")
  if c.image.tokenizer == "patch" and c.image.patch > 0 and c.image.size % c.image.patch:
    problems.append(f"config.image.size={c.image.size} is not a multiple of config.image.patch={c.image.patch}")
  elif learned and c.tokenizer.widths and c.image.size % tokenizer_downsample(c):
    problems.append(f"config.image.size={c.image.size} is not a multiple of the learned tokenizer's downsampling "
                    f"{tokenizer_downsample(c)} (2 ** (len(config.tokenizer.widths) - 1))")
  elif c.image.size > 0 and c.image.patch > 0:
    h, w = image_token_grid(c)
    need = c.text.max_len + h * w
    if need > c.model.max_len:
      problems.append(f"config.model.max_len={c.model.max_len} is smaller than config.text.max_len "
                      f"({c.text.max_len}) + image tokens ({h}x{w}={h * w}) = {need}")
  # Both compute their attention scores themselves (layers.Attention), which the cuDNN kernel cannot take.
  own_scores = {"cross_modal_rope=False": not c.model.cross_modal_rope,
                "directional_heads > 0": c.model.directional_heads > 0}
  for setting in (name for name, on in own_scores.items() if on and c.model.attention == "cudnn"):
    problems.append(f"config.model.{setting} computes attention scores itself; it cannot use "
                    "config.model.attention='cudnn'")
  if 2 * c.model.directional_heads > c.model.num_heads:
    problems.append(f"config.model.directional_heads={c.model.directional_heads} takes "
                    f"{2 * c.model.directional_heads} heads (one left-looking and one right-looking per unit); "
                    f"config.model.num_heads is {c.model.num_heads}")
  if not 0.0 <= c.model.rope_fraction <= 1.0:
    problems.append(f"config.model.rope_fraction={c.model.rope_fraction} must be in [0, 1]")
  if c.train.concurrent_chunks > 0 and c.train.batch_size % c.train.concurrent_chunks:
    problems.append(f"config.train.batch_size={c.train.batch_size} must be a multiple of "
                    f"config.train.concurrent_chunks={c.train.concurrent_chunks}")
  if not 0.0 <= c.train.ema_decay < 1.0:
    problems.append(f"config.train.ema_decay={c.train.ema_decay} must be in [0, 1)")
  if not 0.0 < c.diffusion.t_min < 0.5:
    problems.append(f"config.diffusion.t_min={c.diffusion.t_min} must be in (0, 0.5)")
  if not 0.0 <= c.optim.end_lr_ratio <= 1.0:
    problems.append(f"config.optim.end_lr_ratio={c.optim.end_lr_ratio} must be in [0, 1]")
  tasks = dict(c.diffusion.tasks)
  if any(w < 0 for w in tasks.values()) or sum(tasks.values()) <= 0:
    problems.append(f"config.diffusion.tasks={tasks} must be non-negative with a positive sum")
  if c.tokenizer.warmup_steps >= c.tokenizer.steps > 0:
    problems.append(f"config.tokenizer.warmup_steps={c.tokenizer.warmup_steps} must be < "
                    f"config.tokenizer.steps={c.tokenizer.steps}")
  if c.optim.warmup_steps >= c.train.steps > 0:
    problems.append(f"config.optim.warmup_steps={c.optim.warmup_steps} must be < config.train.steps={c.train.steps}")
  if len(c.mesh.shape) != 3:
    problems.append(f"config.mesh.shape={tuple(c.mesh.shape)} must have 3 entries ('data', 'fsdp', 'tensor')")
  mesh_axes = ("data", "fsdp", "tensor")
  for rule in c.mesh.rules:
    axes = rule[1] if isinstance(rule, (tuple, list)) and len(rule) == 2 else None
    names = axes if isinstance(axes, (tuple, list)) else (() if axes is None else (axes,))
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
            and all(a in mesh_axes for a in names)):
      problems.append(f"config.mesh.rules entry {rule!r} must be (logical name, mesh axis | tuple of mesh axes | "
                      f"None) with mesh axes from {mesh_axes}")
  if c.data.source == "folder" and not c.data.path:
    problems.append("config.data.path is empty; config.data.source='folder' needs a directory "
                    "holding train.jsonl and val.jsonl")
  if c.data.source == "pretokenized" and not c.data.path:
    problems.append("config.data.path is empty; config.data.source='pretokenized' needs the directory written by "
                    "python -m unimm_jax.pretokenize --out=DIR")
  if c.data.source == "tfds":
    if not c.data.tfds_name:
      problems.append("config.data.tfds_name is empty; config.data.source='tfds' needs a dataset name")
    if bool(c.data.text_key) == bool(c.data.label_key):
      problems.append(f"config.data.text_key={c.data.text_key!r} and config.data.label_key={c.data.label_key!r}: "
                      "set exactly one (a caption feature, or a class label put into config.data.caption_templates)")
  if c.data.label_key and (not c.data.caption_templates
                           or any(not isinstance(t, str) or "{}" not in t for t in c.data.caption_templates)):
    problems.append(f"config.data.caption_templates={tuple(c.data.caption_templates)} must be strings that each "
                    "hold '{}' (where the label name goes)")
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
  return config


# Fields that fix the shapes and structure of the train state: a checkpoint restores only into the same values.
STATE_FIELDS = ("model.d_model", "model.num_layers", "model.num_heads", "model.head_dim", "model.mlp_dim",
                "model.positions", "model.vocab_multiple", "model.scan_layers", "model.fused_qkv", "model.param_dtype",
                "model.image_code_features",
                "text.max_len", "image.size", "image.channels", "image.patch", "image.tokenizer", "text.tokenizer",
                "optim.grad_clip")


def check_resumable(config: ConfigDict, saved: ConfigDict) -> None:
  """ConfigError naming every field (both values) that makes ``saved``'s checkpoints unrestorable into ``config``.

  Checked before anything is built or compiled, so a resumed run with, say, another width fails in one message
  instead of deep inside Orbax. (``optim.grad_clip`` between 0 and > 0 changes the optimizer state's structure.)
  """
  problems = []
  for name in STATE_FIELDS:
    group, field = name.split(".")
    new, old = config[group][field], saved[group][field]
    if name == "optim.grad_clip":
      new, old = new > 0, old > 0
    if new != old:
      problems.append(f"config.{name}: {config[group][field]!r} here, {saved[group][field]!r} in the checkpoint")
  if problems:
    raise ConfigError("this config cannot resume the checkpoints in the workdir (use a new --workdir, or the "
                      "config it was trained with):\n  " + "\n  ".join(problems))


def check_tokenizers(config: ConfigDict, text_tokenizer, image_tokenizer) -> None:
  """Checks that fitted or loaded tokenizers agree with the config (a resumed run may have changed it)."""
  problems = []
  if text_tokenizer.kind != config.text.tokenizer:
    problems.append(f"config.text.tokenizer={config.text.tokenizer!r} but the workdir's saved text tokenizer "
                    f"is {text_tokenizer.kind!r}")
  img = image_tokenizer.config_dict()
  kind = _image_kind(config)
  want = {"kind": kind.name, **{field: config.image[field] for field in kind.config_fields}}
  for key, value in want.items():
    field = "tokenizer" if key == "kind" else key
    if img.get(key) != value:
      problems.append(f"config.image.{field}={value!r} but the workdir's saved image tokenizer has "
                      f"{key}={img.get(key)!r}")
  problems += kind.check_saved(config, image_tokenizer)
  if problems:
    raise ConfigError("the config does not match the tokenizers saved in the workdir (use a new --workdir, "
                      "or restore the config it was trained with):\n  " + "\n  ".join(problems))


def split_cpu_devices(n: int) -> None:
  """``mesh.cpu_devices=N``: N single-threaded XLA CPU devices, data-parallel, instead of one multi-threaded one.

  A small model's step is bound by per-operation overhead, which one thread per device and the batch split over
  the cores (a real SPMD program, collectives included) cut by 10-15 % on 2 cores (BENCHMARKS.md). Must happen
  before JAX starts (this module never imports JAX); flags already in XLA_FLAGS are left as they are, and
  other backends (GPU, TPU) ignore these CPU flags.
  """
  if n <= 0 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  flags_ = f"--xla_force_host_platform_device_count={n} --xla_cpu_multi_thread_eigen=false"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags_).strip()


def prepare_host(config: ConfigDict) -> None:
  """What the config asks of the host before JAX starts its backend: the CPU split (``mesh.cpu_devices``) and the
  allocator (``mesh.retain_host_memory``). Every entry point that trains or times calls this one function."""
  split_cpu_devices(config.mesh.cpu_devices)
  retain_host_memory(config.mesh.retain_host_memory)


def retain_host_memory(enabled: bool = True) -> bool:
  """``mesh.retain_host_memory``: glibc's allocator keeps freed memory for reuse instead of returning it to the OS.

  XLA:CPU allocates every step's buffers (activations, gradients, the temporary arena) with ``malloc``. glibc
  serves large blocks with ``mmap`` and gives them back with ``munmap`` on free, and threads other than the main
  one get their own arenas, which also hand large blocks to ``mmap``; so every step touches hundreds of MB of
  fresh pages again and pays a page fault per 4 KiB: about 5 million faults in 30 s of ``bench_cpu`` steps, and
  a fifth of the step time (BENCHMARKS.md, performance issue: the ``bench_cpu`` step 1.94 s -> 1.60 s, the
  ``shapes`` step 160 -> 122 ms). One arena, no ``mmap`` and no trimming keep those pages in the process, so
  the next step reuses them. The cost: the process keeps its peak host memory (``bench_cpu``: 4.8 GiB resident
  instead of 3.0). Accelerator memory is not affected; on GPU and TPU hosts only host-side buffers are.

  Must run before JAX starts its backend (its thread pool then uses the one arena). A no-op (returns False)
  where the C library is not glibc; this module never imports JAX.
  """
  if not enabled or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):   # musl and other C libraries: nothing to tune
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8   # <malloc.h>
  # A trim threshold of -1: glibc stores mallopt's int as a size_t, so this is SIZE_MAX, "never trim". The
  # largest positive int (2 GiB) is not enough: a bench_cpu step sometimes needs 1.4 GiB more heap than the
  # step before, the free top of the heap then passes 2 GiB, glibc hands 2.8 GiB back to the OS, and the next
  # steps fault all of it in again (366,000 page faults, 2-3 s added to a 1.6 s step, every few steps).
  ok = mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, -1) and mallopt(m_arena_max, 1)
  return bool(ok)
