"""The base config (every key the code reads, with its default) and the validation of a run's config.

The fields are records in ``config_schema.py`` (name, type, default, meaning, choices, bounds, state, legacy);
this module builds and checks configs from them. Every config in ``configs/`` starts from :func:`base_config`
and changes values; it may not add keys, except names in an open group (``diffusion.tasks``,
``diffusion.task_roles``). :func:`validate` runs before anything is compiled and raises one :class:`ConfigError`
that names every bad field: a key the base config does not have (with the closest existing one), a wrong type, a
value outside its choices or range, or sizes that do not fit together (text length + image tokens vs
``model.max_len``, image size vs patch). Sizes that depend on fitted tokenizers are checked by
:func:`check_tokenizers`.
"""

from __future__ import annotations

import ctypes
import difflib
import os
import re
import sys
from typing import Any

import ml_collections

from unimm_jax import config_schema as schema
from unimm_jax import tokenizers   # no JAX: the registry of tokenizer kinds and their geometry

ConfigDict = ml_collections.ConfigDict


def _accept_keyword_overrides() -> None:
  """Lets ``--config.init.from=PATH`` through ml_collections' flag parser, which reads an override's path as a
  Python expression, where ``init.from`` (``from`` is a keyword) is a syntax error. A path that fails that parse
  but is a chain of names is split on its dots. Applied once, when this module is imported (every entry point
  with ``--config`` flags imports it first)."""
  from ml_collections.config_flags import config_path  # pylint: disable=g-import-not-at-top
  if getattr(config_path.split, "accepts_keywords", False):
    return
  split = config_path.split

  def split_keywords_too(path: str):
    try:
      return split(path)
    except ValueError:
      parts = tuple(path.split("."))
      if all(p.isidentifier() for p in parts):
        return parts
      raise
  split_keywords_too.accepts_keywords = True
  config_path.split = split_keywords_too


_accept_keyword_overrides()


class ConfigError(ValueError):
  """A config that cannot run; the message names each bad field."""


# Views of the schema (unimm_jax/config_schema.py) by role.
CHOICES = {f.name: f.choices for f in schema.FIELDS if f.choices}           # the value must be one of these
# Fields that fix the shapes and structure of the train state: a checkpoint restores only into the same values.
STATE_FIELDS = tuple(f.name for f in schema.FIELDS if f.state)
# Fields that changed the parameter layout when they were added, with the value that means "as before".
LEGACY_DEFAULTS = {f.name: f.legacy for f in schema.FIELDS if f.legacy is not None}
describe_fields = schema.describe_fields
# The learned image tokenizers (trained by ``python -m unimm_jax.tokenizer_main``, config group ``tokenizer``).
LEARNED_IMAGE_TOKENIZERS = tuple(name for name, kind in tokenizers.IMAGE_KINDS.items() if kind.learned)
TOKENIZER_ENCODERS = tokenizers.TOKENIZER_ENCODERS   # tokenizer.encoder (models/autoencoder.py)


def base_config() -> ConfigDict:
  """Every key the code reads, with defaults sized for the embedded ``shapes`` data on a CPU (from the schema)."""
  c = ConfigDict()
  for f in schema.FIELDS:
    *groups, leaf = f.name.split(".")
    node = c
    for g in groups:
      if g not in node:
        node[g] = ConfigDict()
      node = node[g]
    node[leaf] = ConfigDict(dict(f.default)) if f.open else f.default
  return c


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
  except the fields with a ``legacy`` value in the schema (:data:`LEGACY_DEFAULTS`), which change the parameter
  layout: a config saved without one was trained with the layout before the field existed. An open group
  (``diffusion.tasks``, ``diffusion.task_roles``) is taken whole from the saved config, any names included, so
  a task mixture comes back exactly as it was trained. Any other saved field that the base config does not know
  is an error that names it. Lists (JSON) in tuple fields come back as tuples, nested ones included.
  """
  config = base_config()
  for name, value in LEGACY_DEFAULTS.items():
    if not _has(saved, name):
      _set(config, name, value)

  def merge(target: ConfigDict, values: dict, prefix: str):
    for key, value in values.items():
      name = prefix + key
      if key not in target:
        raise ConfigError(unknown_field_message(name))
      if name in schema.OPEN_GROUPS:
        if not isinstance(value, dict):
          raise ConfigError(f"config.{name}={value!r} must be a group of names (name -> value)")
        target[key] = ConfigDict(value)
      elif isinstance(target[key], ConfigDict):
        merge(target[key], value, f"{name}.")
      else:
        target[key] = _tuples(value) if isinstance(target[key], tuple) else value

  merge(config, saved, "")
  return validate(config)


def _tuples(value: Any) -> Any:
  """Lists (as JSON returns tuples) as tuples, at every depth."""
  return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _has(saved: dict, name: str) -> bool:
  node = saved
  for part in name.split("."):
    if not isinstance(node, dict) or part not in node:
      return False
    node = node[part]
  return True


def _get(config: ConfigDict, name: str) -> Any:
  for part in name.split("."):
    config = config[part]
  return config


def _plain(value: Any) -> Any:
  """A field's value for comparison: an open group (a ConfigDict, or the dict a saved config holds) as a dict."""
  return dict(value.to_dict() if hasattr(value, "to_dict") else value) if isinstance(value, (ConfigDict, dict)) \
      else value


def _set(config: ConfigDict, name: str, value: Any) -> None:
  *groups, leaf = name.split(".")
  for part in groups:
    config = config[part]
  config[leaf] = value


def _flatten(cfg: ConfigDict, prefix: str = "", open_groups: bool = False) -> dict[str, Any]:
  """{dotted name: value}; with ``open_groups`` an open group is one entry (its ConfigDict), not its names."""
  out = {}
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    if isinstance(value, ConfigDict) and not (open_groups and name in schema.OPEN_GROUPS):
      out.update(_flatten(value, name + ".", open_groups))
    else:
      out[name] = value
  return out


def _type_ok(value: Any, type_: type) -> bool:
  """Whether ``value`` may stand in a field of ``type_`` (an int where a float goes, a list where a tuple goes)."""
  if type_ is bool:
    return isinstance(value, bool)
  if type_ is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if type_ is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if type_ is tuple:
    return isinstance(value, (tuple, list))
  return isinstance(value, type_)


def image_token_grid(config: ConfigDict) -> tuple[int, int]:
  """(h, w) of the image token grid that the configured image tokenizer produces."""
  return _image_kind(config).grid(config)


def _pretrained_downsample(config: ConfigDict) -> int:
  """A pretrained image tokenizer's downsampling (read from its checkpoint, or the published default); 1 when the
  checkpoint cannot be read here (making the tokenizer then says what is wrong with it)."""
  try:
    return tokenizer_downsample(config)
  except (OSError, ValueError, KeyError):
    return 1


def tokenizer_downsample(config: ConfigDict) -> int:
  """Image pixels per token side: 1 (pixel), image.patch (patch), 2 ** (len(tokenizer.widths) - 1) (fsq, vq)."""
  return _image_kind(config).downsample(config)


def _kind_rows_problems(c: ConfigDict) -> list[str]:
  """``data.kind_rows``: each kind at fixed rows of every batch, computed on its own segments."""
  rows = tuple(map(tuple, c.data.kind_rows))
  if not rows:
    return []
  problems = []
  if c.data.source != "shapes":
    problems.append(f"config.data.kind_rows needs config.data.source='shapes' (it makes each kind on demand), got "
                    f"{c.data.source!r}: set config.data.kind_rows=() to draw the kinds as the data gives them")
  kinds = [k for k, _ in rows]
  if len(set(kinds)) != len(kinds) or any(int(n) < 1 for _, n in rows) or \
      set(kinds) - {"caption", "edit", "vqa"}:
    problems.append(f"config.data.kind_rows={rows} must be (kind, rows >= 1) pairs of distinct kinds of caption, "
                    "edit, vqa")
    return problems
  period = sum(int(n) for _, n in rows)
  if c.train.batch_size % period:
    problems.append(f"config.train.batch_size={c.train.batch_size} must be a multiple of the {period} rows of "
                    f"config.data.kind_rows")
  elif c.train.concurrent_chunks > 1 and any(c.train.batch_size // period * int(n) % c.train.concurrent_chunks
                                             for _, n in rows):
    problems.append(f"config.train.concurrent_chunks={c.train.concurrent_chunks} must divide every kind's rows of a "
                    f"batch (config.data.kind_rows={rows}, batch {c.train.batch_size})")
  if not c.model.mask_absent:
    problems.append("config.data.kind_rows computes each kind on its own segments, which equals the whole layout "
                    "only when absent segments are not attended: set config.model.mask_absent=True")
  if c.model.rope_layout != "segment" or c.model.image_row_end_id >= 0 or c.model.pad_key_id >= 0:
    problems.append("config.data.kind_rows needs positions that do not depend on the other segments: "
                    "config.model.rope_layout='segment', no image_row_end_id, no pad_key_id")
  return problems


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


def _values(field: schema.Field, value: Any) -> list[tuple[str, Any]]:
  """[(dotted name, value)] of a field: itself, or each entry of an open group."""
  if field.open:
    return [(f"{field.name}.{key}", v) for key, v in value.items()]
  return [(field.name, value)]


def _within(value: Any, bounds: str) -> bool:
  """``value`` within a schema bound: ">0", ">=0", or an interval such as "[0, 1)" (written so NaN fails)."""
  if bounds == ">0":
    return value > 0
  if bounds == ">=0":
    return value >= 0
  lo, hi = (float(x) for x in bounds[1:-1].split(","))
  above = lo <= value if bounds[0] == "[" else lo < value
  below = value <= hi if bounds[-1] == "]" else value < hi
  return above and below


def validate(config: ConfigDict) -> ConfigDict:
  """Checks ``config`` against the schema; returns it, or raises one ConfigError naming every bad field.

  First each field alone: a known name, its type, then the choices and bounds of its record (in an open group,
  any names, each value of the group's type). Then the fields together: sizes that must fit, settings that
  exclude each other, what a data source needs.
  """
  flat = _flatten(config, open_groups=True)
  problems = []
  for name, value in flat.items():
    field = schema.BY_NAME.get(name)
    if field is None:
      problems.append(unknown_field_message(name))
    elif field.open and not isinstance(value, (ConfigDict, dict)):
      problems.append(f"config.{name}={value!r} must be a group of names (name -> {field.type.__name__})")
    else:
      for key, v in _values(field, value):
        if not _type_ok(v, field.type):
          problems.append(f"config.{key}={v!r} has type {type(v).__name__}, expected {field.type.__name__}")
  for name in schema.BY_NAME:
    if name not in flat:
      problems.append(f"config.{name} is missing (start configs from unimm_jax.configuration.base_config())")
  if problems:  # the checks below assume known keys of the right types
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))

  for field in schema.FIELDS:
    for key, value in _values(field, flat[field.name]):
      if field.choices and value not in field.choices:
        problems.append(f"config.{key}={value!r} is not one of {field.choices}")
      if field.bounds and not _within(value, field.bounds):
        wanted = {">0": "> 0", ">=0": ">= 0"}.get(field.bounds, f"in {field.bounds}")
        problems.append(f"config.{key}={value!r} must be {wanted}")

  c = config
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
  if c.image.tokenizer == "patch" and c.image.patch > 0 and c.image.size % c.image.patch:
    problems.append(f"config.image.size={c.image.size} is not a multiple of config.image.patch={c.image.patch}")
  elif learned and c.tokenizer.widths and c.image.size % tokenizer_downsample(c):
    problems.append(f"config.image.size={c.image.size} is not a multiple of the learned tokenizer's downsampling "
                    f"{tokenizer_downsample(c)} (2 ** (len(config.tokenizer.widths) - 1))")
  elif c.image.tokenizer in ("magvitv2", "vqgan") and c.image.size % _pretrained_downsample(c):
    problems.append(f"config.image.size={c.image.size} is not a multiple of the {c.image.tokenizer} tokenizer's "
                    f"downsampling {_pretrained_downsample(c)}")
  elif c.image.size > 0 and c.image.patch > 0 and c.sequence.segments:
    from unimm_jax import sequence  # pylint: disable=g-import-not-at-top  (numpy only, no JAX)
    try:
      segments = sequence.parse_segments(c.sequence.segments, c.text.max_len, image_token_grid(c))
      need = sum(seg.size for seg in segments)
      if need > c.model.max_len:
        problems.append(f"config.model.max_len={c.model.max_len} is smaller than the {need} tokens of "
                        f"config.sequence.segments")
    except ValueError as e:
      problems.append(str(e))
  elif c.image.size > 0 and c.image.patch > 0:
    h, w = image_token_grid(c)
    need = c.text.max_len + h * w
    if need > c.model.max_len:
      problems.append(f"config.model.max_len={c.model.max_len} is smaller than config.text.max_len "
                      f"({c.text.max_len}) + image tokens ({h}x{w}={h * w}) = {need}")
  if c.model.attention != "auto":   # 'auto' is checked when the platform is known (models/attention.resolve)
    from unimm_jax.models import attention  # pylint: disable=g-import-not-at-top  (keeps JAX off this module's import)
    from unimm_jax.models import transformer  # pylint: disable=g-import-not-at-top
    try:
      attention.resolve(c.model.attention, "any", dtype=c.model.dtype, own_scores=transformer.own_scores(c.model))
    except attention.AttentionConfigError as e:
      problems.append(str(e))
  if c.model.pad_key_id >= 0 and (c.model.rope_layout != "sequence" or "learned" in c.model.positions):
    problems.append(f"config.model.pad_key_id={c.model.pad_key_id} (pads take no position) needs "
                    f"config.model.positions='rope' and config.model.rope_layout='sequence', got "
                    f"{c.model.positions!r} and {c.model.rope_layout!r}")
  if c.model.image_row_end_id >= 0 and (c.model.rope_layout != "sequence" or "learned" in c.model.positions
                                         or c.model.modality_embedding or c.model.image_code_features):
    problems.append(f"config.model.image_row_end_id={c.model.image_row_end_id} (row ends inside the network) needs "
                    "config.model.rope_layout='sequence', positions='rope', modality_embedding=False and "
                    "image_code_features=False")
  if c.model.value_positions and "learned" not in c.model.positions:
    problems.append(f"config.model.value_positions projects the learned absolute positions into every block's "
                    f"values: it needs config.model.positions='learned' or 'rope+learned', got {c.model.positions!r}")
  for name, unit in (("directional_heads", "one left-looking and one right-looking"),
                     ("cross_modal_heads", "one for each direction of lookup")):
    if 2 * c.model[name] > c.model.num_heads:
      problems.append(f"config.model.{name}={c.model[name]} takes {2 * c.model[name]} heads ({unit} per unit); "
                      f"config.model.num_heads is {c.model.num_heads}")
  if c.model.lora_rank:
    problems += _lora_problems(c)
  if c.train.concurrent_chunks > 0 and c.train.batch_size % c.train.concurrent_chunks:
    problems.append(f"config.train.batch_size={c.train.batch_size} must be a multiple of "
                    f"config.train.concurrent_chunks={c.train.concurrent_chunks}")
  problems += _kind_rows_problems(c)
  tasks = dict(c.diffusion.tasks)
  if any(w < 0 for w in tasks.values()) or sum(tasks.values()) <= 0:
    problems.append(f"config.diffusion.tasks={tasks} must be non-negative with a positive sum")
  later = dict(c.diffusion.get("tasks_later", {}) or {})
  unknown = sorted(set(later) - set(tasks))
  if unknown:
    problems.append(f"config.diffusion.tasks_later names {unknown}, not tasks of config.diffusion.tasks "
                    f"{sorted(tasks)}")
  elif later and sum({**tasks, **later}.values()) <= 0:
    problems.append(f"config.diffusion.tasks_later={later} leaves no task with a positive weight")
  if bool(later) != (c.diffusion.get("tasks_later_from", 0) > 0):
    problems.append(f"config.diffusion.tasks_later={later} and config.diffusion.tasks_later_from="
                    f"{c.diffusion.get('tasks_later_from', 0)} go together: both set (a mixture and the step it "
                    "starts) or neither")
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


def _lora_problems(c: ConfigDict) -> list[str]:
  """What is wrong with a LoRA run's settings (``model.lora_rank`` > 0; unimm_jax/models/lora.py)."""
  problems = []
  targets = tuple(c.model.lora_targets)
  if not c.init["from"]:
    problems.append(f"config.model.lora_rank={c.model.lora_rank} trains adapters on a frozen base: set "
                    "config.init.from=PATH (a training workdir or an export bundle holding the base)")
  if not targets:
    problems.append("config.model.lora_targets is empty; name projections from "
                    f"{schema.LORA_TARGETS}, or set config.model.lora_rank=0")
  for name in targets:
    if name == "head":
      problems.append("config.model.lora_targets: 'head' cannot take adapters (the trainer applies the output head "
                      "per segment, outside the network); drop it, or fine-tune fully with config.model.lora_rank=0")
    elif name not in schema.LORA_TARGETS:
      problems.append(f"config.model.lora_targets: {name!r} is not one of {schema.LORA_TARGETS}")
    elif c.model.fused_qkv and name in ("query", "key", "value"):
      problems.append(f"config.model.lora_targets: {name!r} is part of the fused q/k/v projection of "
                      "config.model.fused_qkv=True; name 'qkv' (or set config.model.fused_qkv=False)")
  return problems


def check_resumable(config: ConfigDict, saved: ConfigDict) -> None:
  """ConfigError naming every field (both values) that makes ``saved``'s checkpoints unrestorable into ``config``.

  Checked before anything is built or compiled, so a resumed run with, say, another width fails in one message
  instead of deep inside Orbax. The fields are the schema's ``state=True`` ones (:data:`STATE_FIELDS`).
  (``optim.grad_clip`` between 0 and > 0 changes the optimizer state's structure; any other change keeps it.)
  """
  problems = []
  for name in STATE_FIELDS:
    new, old = _plain(_get(config, name)), _plain(_get(saved, name))
    if name == "optim.grad_clip":
      new, old = new > 0, old > 0
    if new != old:
      problems.append(f"config.{name}: {_get(config, name)!r} here, {_get(saved, name)!r} in the checkpoint")
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
  other backends (GPU, TPU) ignore these CPU flags. Whoever set the device count (this function, or
  ``launch.local --cpu_devices``), :func:`reserve_cpu_client_threads` then gives XLA's CPU client the threads
  that many devices need.
  """
  if n > 0 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags_ = f"--xla_force_host_platform_device_count={n} --xla_cpu_multi_thread_eigen=false"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags_).strip()
  reserve_cpu_client_threads()


def reserve_cpu_client_threads() -> int:
  """Gives XLA's CPU client 2N threads for N fake CPU devices, so their collectives cannot deadlock; returns them.

  The client runs launches and programs on one pool of ``max(cores, N)`` threads (``NPROC``, when set, stands for
  the core count). A device's share of a program holds a thread until the program ends; a device's launch of the
  next program holds one too while it waits for a slot, once that device has 32 programs in flight. So with N
  devices on N cores, a host loop that dispatches 32 steps ahead (the train loop between two log lines, when the
  host is faster than the step) parks a launch on one of the threads, one device's share of the step in flight
  finds none free, and the other device waits for it in the all-reduce until XLA aborts the process (a warning
  after 20 s, ``rendezvous.cc: Termination timeout ... only 1 of them arrived on time`` 40 s later, SIGABRT).
  That is a deadlock, with or without other load: a longer
  ``--xla_cpu_collective_call_terminate_timeout_seconds`` (jax-ml/jax#31818) only makes it a hang. With 2N
  threads, N parked launches still leave N for the step (BENCHMARKS.md, "CPU split under load"). ``NPROC`` also
  sizes the intra-op pool that the devices' matmuls use: 2N threads there too where the machine has fewer cores.
  A larger ``NPROC`` is left as it is; fewer than 2 devices change nothing (returns 0). Must run before JAX starts.
  """
  match = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  devices = int(match.group(1)) if match else 0
  if devices < 2:
    return 0
  threads = max(usable_cores(), 2 * devices)
  try:
    threads = max(threads, int(os.environ.get("NPROC", "0")))
  except ValueError:
    pass   # not a number: XLA ignores it too, and the value set below replaces it
  os.environ["NPROC"] = str(threads)
  return threads


def usable_cores() -> int:
  """The cores this process may run on (its CPU affinity where the OS has one, else every core)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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
