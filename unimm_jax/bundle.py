"""The inference bundle's format: its file names, tensor names and readers.

``python -m unimm_jax.export`` writes a bundle (``export.py``); ``Pipeline.load`` reads one. This module imports
neither, so the reader does not depend on the writer::

    OUT/model.json          what the bundle is: the run's full config, step, weights, dtype, format, parameter
                            count, the report's figures, the name, shape and dtype of every tensor, and the
                            ``conventions`` of the forward pass (``export.conventions``)
    OUT/tokenizers/         the run's fitted tokenizers
    OUT/params/             (orbax) the parameters, one Orbax PyTree checkpoint
    OUT/model.safetensors   (safetensors) the parameters, one file, flat names (below)
    OUT/README.md           a model card for people

Tensor names (safetensors): the parameter path joined by ``/``, e.g. ``token_embedding`` (``[vocab, d_model]``),
``block_0/attn/qkv/kernel`` (``[d_model, 3, heads, head_dim]``: q, k, v; with ``model.fused_qkv=False``
``block_0/attn/query/kernel``, ``key``, ``value``, each ``[d_model, heads, head_dim]``), ``block_0/mlp/wi_0/kernel``
(``[d_model, mlp]``), ``head/kernel`` (``[d_model, vocab]``), vocab padded to a multiple of ``model.vocab_multiple``;
with ``model.scan_layers`` the blocks are one stack, ``blocks/...``, with the layer as the leading dimension. The
card's "How to run the forward pass" says what each tensor does. A float32 file loads with
``safetensors.numpy.load_file`` alone. A bfloat16 file holds ``BF16`` tensors, which numpy has no dtype for: read it
with a framework that has one (``safetensors.flax`` needs numpy too, so use :func:`read_safetensors` here, or export
float32 for numpy).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from unimm_jax import safetensors_io

MODEL_FILE = "model.json"
SAFETENSORS_FILE = "model.safetensors"
PARAMS_DIR = "params"


def flatten(params) -> dict[str, np.ndarray]:
  """{'a/b/c': array} of a nested dict of arrays."""
  flat = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    flat["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
  return flat


def unflatten(flat: dict) -> dict:
  """The nested dict of ``{'a/b/c': array}`` (inverse of :func:`flatten`)."""
  out: dict = {}
  for name, value in flat.items():
    node = out
    *parents, last = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return out


def read_safetensors(path) -> dict[str, np.ndarray]:
  """{name: array} of a .safetensors file, BF16 included (as ``jnp.bfloat16`` numpy arrays): parsed here
  (:mod:`unimm_jax.safetensors_io`), so bfloat16 needs no framework."""
  return safetensors_io.read_file(path)


def load_params(directory, meta: dict):
  """The parameters of the bundle in ``directory`` (``meta``: its ``model.json``) as a nested dict of float32
  numpy arrays (compute casts as the config says)."""
  directory = epath.Path(directory)
  if meta["format"] == "safetensors":
    flat = read_safetensors(directory / SAFETENSORS_FILE)
  else:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    target = unflatten({k: jax.ShapeDtypeStruct(tuple(v["shape"]), jnp.dtype(v["dtype"]))
                        for k, v in meta["tensors"].items()})
    with ocp.StandardCheckpointer() as ckptr:
      flat = flatten(ckptr.restore(directory / PARAMS_DIR, target))
  return unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
