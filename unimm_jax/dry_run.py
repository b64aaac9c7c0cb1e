"""``python -m unimm_jax.main --config=... --workdir=... --dry_run [--dry_run_devices=N]``: size a run, allocate nothing.

Builds the mesh (over this machine's devices, or an abstract one of N devices for a slice you do not have),
abstract-evaluates the initialiser (``jax.eval_shape``), places every array of the train state with the logical
rules, and reports the parameter count, the bytes each device holds of parameters, optimizer state and EMA, and
the ten largest arrays with their sharding. Activations are not included: they depend on batch, remat and XLA's
schedule (measure them with ``python -m unimm_jax.bench`` on the real chip).

The vocabulary comes from the workdir's fitted tokenizers when there are some, else from the config's upper
bounds (:func:`planned_layout`): the patch codebook's ``image.codebook_size``, the byte tokenizer's 257 ids, a word
vocabulary's ``text.max_vocab``.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from etils import epath
from jax.sharding import AbstractMesh

from unimm_jax import configuration, tokenizers, train_state
from unimm_jax import sharding as sharding_lib
from unimm_jax.data import input_pipeline
from unimm_jax import sequence
from unimm_jax.models import params as params_lib


def planned_layout(config) -> sequence.SequenceLayout:
  """The token layout the config asks for, from its sizes alone (no data, no fitted tokenizer): each tokenizer
  kind's ``vocab_bound``."""
  text_kind = tokenizers.text_kind(config.text.tokenizer)
  try:
    text_vocab = text_kind.vocab_bound(config)
  except ValueError as e:
    raise configuration.ConfigError(f"a dry run without fitted tokenizers (or a workdir that has them) sizes the "
                                    f"vocabulary from the config: {e}") from None
  image_vocab = tokenizers.image_kind(config.image.tokenizer).vocab_bound(config)
  return sequence.from_config(config, text_vocab, image_vocab, configuration.image_token_grid(config))


def plan(config, workdir=None, num_devices: int | None = None) -> dict:
  """The sizes of a run: {'param_count', 'mesh', 'per_device_bytes': {...}, 'largest': [...], ...}."""
  configuration.validate(config)
  n = num_devices or jax.device_count()
  shape = sharding_lib.resolve_mesh_shape(config.mesh.shape, n)
  saved = workdir is not None and (epath.Path(workdir) / input_pipeline.TOKENIZER_DIR).exists()
  layout = input_pipeline.load_tokenizers(workdir, config).layout if saved else planned_layout(config)
  mesh = (sharding_lib.make_mesh(shape) if n == jax.device_count()
          else AbstractMesh(shape, sharding_lib.AXES))
  method = train_state.make_step_inputs(config, layout)
  abstract, shardings = train_state.state_shardings(method, mesh, sharding_lib.rules_of(config))
  per_device = {
      "params": sharding_lib.per_device_bytes(abstract.params, shardings.params),
      "opt_state": sharding_lib.per_device_bytes(abstract.opt_state, shardings.opt_state),
      "ema_params": sharding_lib.per_device_bytes(abstract.ema_params, shardings.ema_params),
      "step_and_rng": sharding_lib.per_device_bytes((abstract.step, abstract.rng), (shardings.step, shardings.rng)),
  }
  parts = ("params", "opt_state", "ema_params")
  if isinstance(abstract, train_state.LoraTrainState):   # LoRA: the three above are the adapters'; the frozen base
    per_device["base"] = sharding_lib.per_device_bytes(abstract.base, shardings.base)
    parts += ("base",)
  per_device["total"] = sum(per_device.values())
  leaves = []
  for part in parts:
    tree, shs = getattr(abstract, part), getattr(shardings, part)
    for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shs)):
      nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
      leaves.append({"name": part + jax.tree_util.keystr(path), "shape": list(leaf.shape),
                     "dtype": str(leaf.dtype), "bytes": nbytes, "sharding": sharding_lib.describe(sh),
                     "per_device_shape": list(sh.shard_shape(leaf.shape))})
  leaves.sort(key=lambda r: -r["bytes"])
  return {
      "param_count": params_lib.param_count(abstract.weights),
      "mesh": dict(zip(sharding_lib.AXES, shape)),
      "devices": n,
      "abstract_mesh": n != jax.device_count(),
      "sequence": {"segments": layout.describe(), "length": layout.seq_len, "vocab": layout.size},
      "layout_from": "fitted tokenizers" if saved else "config",
      "per_device_bytes": per_device,
      "largest": leaves[:10],
  }


def _gib(n: int) -> str:
  return f"{n / 2**30:.3f} GiB"


def format_plan(p: dict) -> str:
  pd = p["per_device_bytes"]
  mesh = " x ".join(f"{k} {v}" for k, v in p["mesh"].items())
  lines = [
      f"dry run: {p['param_count']:,} parameters; sequence of {p['sequence']['length']} tokens "
      f"{p['sequence']['segments']}, vocabulary {p['sequence']['vocab']} (from {p['layout_from']})",
      f"mesh: {mesh} = {p['devices']} devices" + (" (abstract: sizes only)" if p["abstract_mesh"] else ""),
      "per device (train state, no activations):",
      f"  params      {pd['params']:>16,} bytes  {_gib(pd['params'])}",
      f"  opt_state   {pd['opt_state']:>16,} bytes  {_gib(pd['opt_state'])}",
      f"  ema_params  {pd['ema_params']:>16,} bytes  {_gib(pd['ema_params'])}",
      f"  step, rng   {pd['step_and_rng']:>16,} bytes",
      *([f"  LoRA base   {pd['base']:>16,} bytes  {_gib(pd['base'])}  (params, opt_state, ema_params: the "
         "adapters')"] if "base" in pd else []),
      f"  total       {pd['total']:>16,} bytes  {_gib(pd['total'])}",
      "ten largest arrays:",
  ]
  for r in p["largest"]:
    lines.append(f"  {r['name']:<52} {str(tuple(r['shape'])):<20} {r['dtype']:<8} {r['sharding']:<28} "
                 f"per device {tuple(r['per_device_shape'])}")
  return "\n".join(lines)
