"""Export a trained run to a lean inference bundle; ``Pipeline.load(OUT)`` samples from it on one CPU.

    python -m unimm_jax.export --workdir=DIR --out=OUT [--step=N] [--weights=ema|raw]
                               [--dtype=float32|bfloat16] [--format=orbax|safetensors]

What a bundle holds (``model.json``, ``tokenizers/``, the parameters as ``model.safetensors`` or an Orbax tree
``params/``, a model card ``README.md``) and how its tensors are named: ``unimm_jax/bundle.py``, with which
``Pipeline.load`` reads it. Only parameters travel (no optimizer state, no EMA twin), gathered onto the host from
whatever sharding the run trained with, in the chosen dtype.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from unimm_jax import bundle, storage
from unimm_jax.pipeline import Pipeline

FORMATS = ("orbax", "safetensors")
DTYPES = ("float32", "bfloat16")
EXPORT_VERSION = 1


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
      f"(`{bundle.SAFETENSORS_FILE if meta['format'] == 'safetensors' else bundle.PARAMS_DIR + '/'}`). Tensor "
      "names are parameter paths joined by `/` (see `unimm_jax/bundle.py`).",
      "",
  ]
  return "\n".join(lines)


def export(workdir, out, *, step: int | None = None, weights: str = "ema", dtype: str = "float32",
           fmt: str = "safetensors") -> dict:
  """Writes the bundle (module docstring) and returns its ``model.json`` content."""
  if dtype not in DTYPES or fmt not in FORMATS:
    raise ValueError(f"dtype must be one of {DTYPES} and format one of {FORMATS}, got {dtype!r}, {fmt!r}")
  workdir, out = epath.Path(workdir), epath.Path(out)
  pipe = Pipeline.load(workdir, weights=weights, step=step)   # gathered onto one device
  params = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, dtype)), pipe.params)
  flat = bundle.flatten(params)
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
    (out / bundle.SAFETENSORS_FILE).write_bytes(save({k: jnp.asarray(v) for k, v in flat.items()},
                                                     metadata={"format": "unimm_jax", "dtype": dtype}))
  else:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(out / bundle.PARAMS_DIR, params)
  (out / bundle.MODEL_FILE).write_text(json.dumps(meta, indent=1, default=float))
  (out / "README.md").write_text(_model_card(meta))
  logging.info("exported step %d (%s weights, %s, %s) to %s", pipe.step, weights, dtype, fmt, out)
  return meta


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
