"""``config.init.from``: a run's parameters start from those stored elsewhere, not from the random init.

    python -m unimm_jax.main --config=configs/NAME.py --workdir=NEW --config.init.from=PATH

PATH is one of
- a training workdir: its newest checkpoint's EMA weights (what validation, sampling and export use; to start
  from the raw weights, export a bundle with ``--weights=raw`` and start from that). A checkpoint that holds no
  EMA twin gives its ``params``. A LoRA workdir gives its base (its own ``init.from``) with its adapters merged in.
- an export bundle (a directory with ``model.json``: ``python -m unimm_jax.export``, or an importer of published
  weights): its parameters, ``model.safetensors`` or the Orbax tree ``params/``, cast to the run's
  ``model.param_dtype``.

The arrays go straight into the run's shardings: an Orbax tree (a workdir's checkpoint, a bundle's ``params/``) is
restored onto the abstract target, so each host reads only its shards; a safetensors file is read one tensor at a
time and each device's shard is cut from it (``jax.make_array_from_callback``), so no host holds the model whole
beside its shards. Before anything is read, every tensor's name and shape is checked against the run's parameters
(:func:`check`): the first mismatch is one :class:`~unimm_jax.configuration.ConfigError` line.

The trainer (``train.train_and_evaluate``) calls :func:`load` when a run starts with no checkpoint (the optimizer
starts fresh at step 0, the EMA twin equal to the loaded weights), and at every start of a LoRA run, whose frozen
base is not in its checkpoints. Such a run also takes PATH's tokenizers (:func:`tokenizer_dir`), whose ids the
loaded embedding rows belong to, instead of fitting its own. ``Pipeline.load`` of a training workdir reads it
with :func:`workdir_weights`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import jax
import numpy as np
from etils import epath

from unimm_jax import bundle, checkpointing, configuration, safetensors_io, storage, tokenizers
from unimm_jax.data import input_pipeline
from unimm_jax.models import lora

@dataclasses.dataclass(frozen=True)
class Source:
  """What a PATH of ``init.from`` holds, read from its metadata alone (no arrays)."""

  path: epath.Path
  kind: str                                   # workdir | bundle
  format: str                                 # orbax | safetensors
  step: int | None                            # the training step of the weights, when known
  tensors: dict[str, tuple[tuple[int, ...], str]]   # name ('block_0/attn/qkv/kernel') -> (shape, dtype)
  which: str = ""                             # workdir: the saved subtree read (ema_params | params)
  lora_spec: lora.LoraSpec | None = None      # a LoRA workdir's adapters ...
  base: "Source | None" = None                # ... and the base they are merged into

  def describe(self) -> str:
    """One line: what was (or will be) loaded."""
    count = sum(math.prod(shape) for shape, _ in self.tensors.values())
    if self.kind == "bundle":
      what = f"an export bundle ({self.format}) of step {self.step}"
    else:
      weights = {"ema_params": "EMA", "params": "raw"}[self.which]
      what = f"the {weights} weights of step {self.step} of a training workdir"
      if self.lora_spec is not None:
        what += f" (LoRA rank {self.lora_spec.rank}, merged into its base {self.base.path})"
    return f"init.from={self.path}: {what}; {len(self.tensors)} tensors, {count:,} parameters"


def inspect(path, *, which: str = "ema_params", step: int | None = None) -> Source:
  """The :class:`Source` at ``path`` (``which`` and ``step`` choose a workdir's weights; a bundle has one set)."""
  path = storage.absolute_path(path)
  if (path / bundle.MODEL_FILE).exists():
    meta = json.loads((path / bundle.MODEL_FILE).read_text())
    tensors = {k: (tuple(v["shape"]), v["dtype"]) for k, v in meta["tensors"].items()}
    return Source(path, "bundle", meta["format"], meta.get("step"), tensors)
  if not (path / "config.json").exists():
    raise configuration.ConfigError(
        f"init.from={path}: neither a training workdir (config.json, checkpoints/) nor an export bundle "
        f"({bundle.MODEL_FILE}); give a workdir or bundle holding the parameters to start from")
  if not checkpointing.has_checkpoints(path):
    raise FileNotFoundError(f"no checkpoint in {path / 'checkpoints'}")
  config = configuration.from_dict(json.loads((path / "config.json").read_text()))
  manager = checkpointing.weights_manager(path)
  try:
    step = manager.latest_step() if step is None else step
    if step not in manager.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {path / 'checkpoints'} (steps: "
                              f"{manager.all_steps()})")
    saved = manager.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)
  finally:
    manager.close()
  if which not in saved and "params" in saved:   # a checkpoint without an EMA twin
    which = "params"
  spec = lora.LoraSpec.from_config(config.model)
  if spec is not None:   # adapters only: the tensors are those of the base they merge into
    base = inspect(config.init["from"])
    return Source(path, "workdir", "orbax", int(step), base.tensors, which, spec, base)
  tensors = {k: (tuple(m.shape), str(m.dtype)) for k, m in bundle.flatten(saved[which]).items()}
  return Source(path, "workdir", "orbax", int(step), tensors, which)


def find(path, *, which: str = "ema_params", step: int | None = None) -> Source:
  """:func:`inspect` for ``init.from``: a path without weights is a ConfigError that names it."""
  try:
    return inspect(path, which=which, step=step)
  except FileNotFoundError as e:
    raise configuration.ConfigError(f"init.from={path}: {e}; give a workdir with a checkpoint or an export "
                                    "bundle") from e


def tokenizer_dir(path) -> epath.Path | None:
  """The tokenizers saved at ``path`` (a workdir's or a bundle's ``tokenizers/``, both files), or None."""
  directory = storage.absolute_path(path) / input_pipeline.TOKENIZER_DIR
  files = (tokenizers.TEXT_TOKENIZER_FILE, tokenizers.IMAGE_TOKENIZER_FILE)
  return directory if all((directory / f).exists() for f in files) else None


def check(source: Source, target) -> None:
  """ConfigError naming the first tensor whose name or shape differs between ``source`` and ``target`` (the run's
  parameters: a tree of ``jax.ShapeDtypeStruct``); dtypes may differ (the loaded arrays are cast)."""
  want = {name: tuple(leaf.shape) for name, leaf in bundle.flatten(target).items()}
  scan_hint = ""
  if any(n.startswith("blocks/") for n in want) != any(n.startswith("blocks/") for n in source.tensors):
    scan_hint = " (one stacks its layers, the other not: config.model.scan_layers differs)"
  for name, shape in want.items():
    if name not in source.tensors:
      raise configuration.ConfigError(f"init.from={source.path}: has no tensor {name}, which the config makes with "
                                      f"shape {shape}{scan_hint}")
    there = tuple(source.tensors[name][0])
    if there != shape:
      raise configuration.ConfigError(f"init.from={source.path}: {name} has shape {there} there, the config makes "
                                      f"{shape}")
  extra = [name for name in source.tensors if name not in want]
  if extra:
    raise configuration.ConfigError(f"init.from={source.path}: {extra[0]} there is not a parameter of the config's "
                                    f"model ({len(extra)} such tensors){scan_hint}")


def load(path, target=None, *, which: str = "ema_params", step: int | None = None) -> tuple[Any, Source]:
  """(the network's parameters stored at ``path``, its :class:`Source`).

  Args:
    path: a training workdir or an export bundle (module docstring).
    target: the run's parameters as a nested dict of ``jax.ShapeDtypeStruct`` with shardings: names and shapes
      are checked against it first (:func:`check`), and each array is read into its sharding and dtype. None:
      the stored shapes and dtypes, on the first device (a bundle: float32 numpy arrays).
    which, step: a workdir's weights (``ema_params`` | ``params``) and checkpoint step (default: the newest).
  """
  source = find(path, which=which, step=step)
  if target is not None:
    check(source, target)
  if source.kind == "workdir":
    params, _ = workdir_weights(source.path, source.which, source.step, target, source=source)
  elif target is None:
    params = bundle.load_params(source.path, json.loads((source.path / bundle.MODEL_FILE).read_text()))
  elif source.format == "orbax":
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(source.path / bundle.PARAMS_DIR, target)
  else:
    params = read_safetensors_sharded(source.path / bundle.SAFETENSORS_FILE, target)
  return params, source


def workdir_weights(workdir, which: str = "ema_params", step: int | None = None, target=None, *,
                    source: Source | None = None) -> tuple[Any, int]:
  """(the network's weights of a training workdir, their step): its checkpoint's ``which`` subtree, or for a
  LoRA workdir its base (its config's ``init.from``) with the adapters merged in (``lora.merge``), in the base's
  names and layout. ``target`` as in :func:`load` (None: on the first device)."""
  source = source or inspect(workdir, which=which, step=step)
  if source.lora_spec is None:
    return checkpointing.restore_weights(source.path, source.which, source.step, target=target)
  base, _ = load(source.base.path, target)
  if target is None:
    adapters, _ = checkpointing.restore_weights(source.path, source.which, source.step)
    return jax.jit(functools.partial(lora.merge, scale=source.lora_spec.scale))(base, adapters), source.step
  sharding = jax.tree.leaves(target)[0].sharding
  replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()) \
      if isinstance(sharding, jax.sharding.NamedSharding) else sharding
  adapters, _ = checkpointing.restore_weights(source.path, source.which, source.step, device=replicated)
  merge = jax.jit(functools.partial(lora.merge, scale=source.lora_spec.scale),
                  out_shardings=jax.tree.map(lambda t: t.sharding, target))
  return merge(base, adapters), source.step


def read_safetensors_sharded(path, target) -> Any:
  """The tensors of a ``.safetensors`` file as ``target`` (a nested dict of ``jax.ShapeDtypeStruct`` with
  shardings, named like the file's tensors) places and types them: one tensor read at a time
  (:mod:`unimm_jax.safetensors_io`), each device's shard cut from it (``jax.make_array_from_callback``), so a host
  holds its shards of the model plus one tensor."""
  reader = safetensors_io.CheckpointReader(path)

  def place(name: str, leaf) -> jax.Array:
    source = reader.read(name)
    return jax.make_array_from_callback(leaf.shape, leaf.sharding,
                                        lambda index: np.ascontiguousarray(source[index], dtype=leaf.dtype))
  flat = bundle.flatten(target)
  return bundle.unflatten({name: place(name, leaf) for name, leaf in flat.items()})
