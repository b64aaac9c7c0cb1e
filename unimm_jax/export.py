"""Export a trained run to a lean inference bundle; ``Pipeline.load(OUT)`` samples from it on one CPU.

    python -m unimm_jax.export --workdir=DIR --out=OUT [--step=N] [--weights=ema|raw]
                               [--dtype=float32|bfloat16] [--format=orbax|safetensors]

The bundle::

    OUT/model.json          what the bundle is: the run's full config, step, weights, dtype, format, parameter
                            count, the report's figures, and the name, shape and dtype of every tensor
    OUT/tokenizers/         the run's fitted tokenizers (copied)
    OUT/params/             (orbax) the parameters, one Orbax PyTree checkpoint
    OUT/model.safetensors   (safetensors) the parameters, one file, flat names (below)
    OUT/README.md           a model card for people

Only parameters travel (no optimizer state, no EMA twin), gathered onto the host from whatever sharding the run
trained with, in the chosen dtype.

Tensor names (safetensors): the parameter path joined by ``/``, e.g. ``token_embedding``,
``block_0/attn/qkv/kernel`` (``[d_model, 3, heads, head_dim]``: q, k, v), ``block_0/mlp/wi_0/kernel`` (``[d_model, mlp]``),
``head/kernel`` (``[d_model, vocab]``); with ``model.scan_layers`` the blocks are one stack, ``blocks/...``,
with the layer as the leading dimension. A float32 file loads with ``safetensors.numpy.load_file`` alone. A
bfloat16 file holds ``BF16`` tensors, which numpy has no dtype for: read it with a framework that has one
(``safetensors.flax`` needs numpy too, so use :func:`read_safetensors` here, or export float32 for numpy).
"""

from __future__ import annotations

import json
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from unimm_jax import storage

FORMATS = ("orbax", "safetensors")
DTYPES = ("float32", "bfloat16")
MODEL_FILE = "model.json"
SAFETENSORS_FILE = "model.safetensors"
PARAMS_DIR = "params"
EXPORT_VERSION = 1


def flatten(params) -> dict[str, np.ndarray]:
  """{'a/b/c': array} of a nested dict of arrays."""
  flat = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    flat["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
  return flat


def unflatten(flat: dict) -> dict:
  out: dict = {}
  for name, value in flat.items():
    node = out
    *parents, last = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return out


def read_safetensors(path) -> dict[str, np.ndarray]:
  """{name: array} of a .safetensors file, BF16 included (as ``jnp.bfloat16`` numpy arrays).

  The format is 8 bytes of little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``
  and the raw little-endian bytes; parsed here so bfloat16 needs no framework.
  """
  dtypes = {"F32": np.float32, "BF16": jnp.bfloat16, "F16": np.float16, "I32": np.int32, "I64": np.int64}
  data = epath.Path(path).read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + n])
  header.pop("__metadata__", None)
  body = memoryview(data)[8 + n:]
  out = {}
  for name, info in header.items():
    begin, end = info["data_offsets"]
    out[name] = np.frombuffer(body[begin:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
  return out


def _model_card(meta: dict) -> str:
  c, r = meta["config"], meta.get("report") or {}
  m = c["model"]

  def fig(key, fmt="{:.3f}"):
    v = r.get(key)
    return "not measured" if v is None else fmt.format(v)

  bits = r.get("val_bits_per_token") or {}
  lines = [
      "# unimm_jax model",
      "",
      "A masked discrete-diffusion transformer over `[text | image]` token sequences: one set of weights draws "
      "images from captions, captions images, makes both at once and fills in masked parts of either.",
      "",
      "```python",
      "from unimm_jax import Pipeline",
      "pipe = Pipeline.load('THIS_DIRECTORY')",
      "images = pipe.text_to_image(['a small red circle at the top left'], seed=0)",
      "```",
      "",
      "| | |",
      "| --- | --- |",
      f"| training step | {meta['step']} |",
      f"| weights | {meta['weights']} ({meta['dtype']}, {meta['format']}) |",
      f"| parameters | {meta['param_count']:,} |",
      f"| model | d_model {m['d_model']}, {m['num_layers']} layers, {m['num_heads']} heads of {m['head_dim']}, "
      f"gated MLP {m['mlp_dim']}, positions {m['positions']} |",
      f"| data | {c['data']['source']}; text {c['text']['tokenizer']} x {c['text']['max_len']}, image "
      f"{c['image']['tokenizer']} {c['image']['size']}px |",
      f"| val bits/token (text, image) | {bits.get('text', float('nan')):.4f}, "
      f"{bits.get('image', float('nan')):.4f} |" if bits else "| val bits/token | not measured |",
      f"| text->image accuracy | {fig('t2i_accuracy')} |",
      f"| image->text accuracy | {fig('i2t_accuracy')} |",
      f"| joint consistency | {fig('joint_consistency')} |",
      "",
      "Files: `model.json` (config, figures, tensor list), `tokenizers/`, and the parameters "
      f"(`{SAFETENSORS_FILE if meta['format'] == 'safetensors' else PARAMS_DIR + '/'}`). Tensor names are "
      "parameter paths joined by `/` (see `unimm_jax/export.py`).",
      "",
  ]
  return "\n".join(lines)


def export(workdir, out, *, step: int | None = None, weights: str = "ema", dtype: str = "float32",
           fmt: str = "safetensors") -> dict:
  """Writes the bundle (module docstring) and returns its ``model.json`` content."""
  from unimm_jax.pipeline import Pipeline  # pylint: disable=g-import-not-at-top
  if dtype not in DTYPES or fmt not in FORMATS:
    raise ValueError(f"dtype must be one of {DTYPES} and format one of {FORMATS}, got {dtype!r}, {fmt!r}")
  workdir, out = epath.Path(workdir), epath.Path(out)
  pipe = Pipeline.load(workdir, weights=weights, step=step)   # gathered onto one device
  params = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, dtype)), pipe.params)
  flat = flatten(params)
  report_file = workdir / "report.json"
  report = json.loads(report_file.read_text()) if report_file.exists() else {}
  keep = ("val_bits_per_token", "t2i_accuracy", "i2t_accuracy", "joint_consistency", "step", "train_wall_s")
  meta = {
      "unimm_jax_export": EXPORT_VERSION, "step": pipe.step, "weights": weights, "dtype": dtype, "format": fmt,
      "param_count": int(sum(math.prod(v.shape) for v in flat.values())),
      "config": pipe.config.to_dict(), "report": {k: report[k] for k in keep if k in report},
      "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in flat.items()},
  }
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"{out} exists and is not empty; choose a new --out")
  out.mkdir(parents=True, exist_ok=True)
  storage.copy_tree(workdir / "tokenizers", out / "tokenizers")
  if fmt == "safetensors":
    from safetensors.flax import save  # pylint: disable=g-import-not-at-top
    # Serialised in memory and written through epath (safetensors' save_file knows only local paths).
    (out / SAFETENSORS_FILE).write_bytes(save({k: jnp.asarray(v) for k, v in flat.items()},
                                              metadata={"format": "unimm_jax", "dtype": dtype}))
  else:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(out / PARAMS_DIR, params)
  (out / MODEL_FILE).write_text(json.dumps(meta, indent=1, default=float))
  (out / "README.md").write_text(_model_card(meta))
  logging.info("exported step %d (%s weights, %s, %s) to %s", pipe.step, weights, dtype, fmt, out)
  return meta


def load_params(bundle, meta: dict):
  """The bundle's parameters as a nested dict of float32 numpy arrays (compute casts as the config says)."""
  bundle = epath.Path(bundle)
  if meta["format"] == "safetensors":
    flat = read_safetensors(bundle / SAFETENSORS_FILE)
  else:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    target = unflatten({k: jax.ShapeDtypeStruct(tuple(v["shape"]), jnp.dtype(v["dtype"]))
                        for k, v in meta["tensors"].items()})
    with ocp.StandardCheckpointer() as ckptr:
      flat = flatten(ckptr.restore(bundle / PARAMS_DIR, target))
  return unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})


def _cli():
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  workdir = flags.DEFINE_string("workdir", None, "A training workdir.")
  out = flags.DEFINE_string("out", None, "Directory of the bundle (new or empty).")
  step = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  weights = flags.DEFINE_enum("weights", "ema", ["ema", "raw"], "EMA or raw training weights.")
  dtype = flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Stored dtype of the parameters.")
  fmt = flags.DEFINE_enum("format", "safetensors", list(FORMATS), "One .safetensors file or an Orbax tree.")
  flags.mark_flags_as_required(["workdir", "out"])

  def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    meta = export(workdir.value, out.value, step=step.value, weights=weights.value, dtype=dtype.value,
                  fmt=fmt.value)
    print(f"wrote {out.value}: {meta['param_count']:,} parameters, step {meta['step']}, {meta['dtype']}, "
          f"{meta['format']}")

  app.run(main)


if __name__ == "__main__":
  _cli()
