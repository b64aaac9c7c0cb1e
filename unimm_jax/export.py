"""Export a trained run to a lean inference bundle; ``Pipeline.load(OUT)`` samples from it on one CPU.

    python -m unimm_jax.export --workdir=DIR --out=OUT [--step=N] [--weights=ema|raw]
                               [--dtype=float32|bfloat16] [--format=orbax|safetensors]

What a bundle holds (``model.json``, ``tokenizers/``, the parameters as ``model.safetensors`` or an Orbax tree
``params/``, a model card ``README.md``) and how its tensors are named: ``unimm_jax/bundle.py``, with which
``Pipeline.load`` reads it. Only parameters travel (no optimizer state, no EMA twin), gathered onto the host from
whatever sharding the run trained with, in the chosen dtype.

The bundle describes itself: ``model.json``'s ``conventions`` (:func:`conventions`) and the card's section "How to
run the forward pass" (rendered from the same dict, so the two never disagree) state everything a reader with only
the bundle needs to compute the logits: the sequence and vocabulary layout, the input embedding, the norms, the
q/k/v layout, qk-norm and the rotary embedding, the attention masks, the MLP, the head and its output restriction,
and how the layers' tensors are named. ``tests/test_bundle_card.py`` runs the forward pass in numpy from those and
the safetensors file alone and checks it against the model.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from unimm_jax import bundle, sequence, storage
from unimm_jax.pipeline import Pipeline

FORMATS = ("orbax", "safetensors")
DTYPES = ("float32", "bfloat16")
EXPORT_VERSION = 1
CONVENTIONS_VERSION = 1
NEG_INF = -1e9   # the output restriction's fill (models/transformer.py NEG_INF)


# ---- conventions: what the forward pass does, for a reader with only the bundle --------------------------------
def conventions(config, layout: sequence.SequenceLayout) -> dict:
  """The forward pass of the network of ``config`` over ``layout``, as data (``model.json``'s ``conventions``).

  Derived here from the config and the layout by the formulas the network implements (``models/transformer.py``,
  ``models/layers.py``, ``models/attention.py``), not read back from the modules, so that a change of the network
  that this does not follow makes ``tests/test_bundle_card.py`` (a numpy forward from this dict alone) fail.
  Options the config lacks take the defaults the network has. Every value is JSON (tensor names, sizes, numbers),
  the per-position rotary positions and the per-pair frequencies in full:

    sequence     length; segments in order: name, modality, modality_id, [start, end), length | grid | token_ids
    vocabulary   text_vocab, image_vocab, id_align, ranges {modality: [lo, hi)}, special_ids, mask_id, size (the
                 logits' width), vocab_multiple, padded_size (rows of the embedding, columns of the head)
    embedding    token table; code_features (table, projection, ids) | None; modality (tensor, row per
                 modality) | None; learned_positions {segment: tensor names} | None; scale
    norm         eps (every RMSNorm, in float32)
    layers       num_layers, scan, prefix ('block_{i}', or 'blocks' with a leading layer axis), the norms' names
    attention    num_heads, head_dim, qkv (fused name and order, or q/k/v names), out, qk_norm | None, scale,
                 left_heads / right_heads (the directional heads), text_reads_image_heads /
                 image_reads_text_heads (the cross-modal heads), value_positions (kernel name) | None
    rotary       None, or layout, rotating_dims r, pair_offset (pair j is (x[j], x[j + r/2])), frequencies f_j,
                 position_component c_j, positions p [S, 2] (angle of pair j at s: p[s][c_j] * f_j), cross_modal
    mlp          gate, up, down (SwiGLU), hidden;   output: final_norm, head, columns, restrict, fill

  Args:
    config: the run's config (a dict or ConfigDict; groups ``model``, ``sequence``, ``image``).
    layout: the sequence layout the network was built over (the bundle's tokenizers give it).
  Returns:
    The dict above, plus version, dtype (compute), d_model and token_grid; the card's section
    (:func:`_forward_section`) says the same in words.
  """
  model = config["model"]
  opt = model.get
  d, n, h = int(model["d_model"]), int(model["num_heads"]), int(model["head_dim"])
  eps = float(opt("norm_eps", 1e-6))
  vocab_multiple = int(opt("vocab_multiple", 128))
  padded = -(-layout.size // vocab_multiple) * vocab_multiple
  positions = opt("positions", "rope+learned")

  segments = []
  for seg in layout.segments:
    start, end = layout.span(seg.name)
    entry = {"name": seg.name, "modality": seg.modality, "modality_id": sequence.MODALITY_ID[seg.modality],
             "start": start, "end": end}
    if seg.modality == sequence.IMAGE:
      entry["grid"] = list(seg.grid)
    elif seg.modality == sequence.SPECIAL:
      entry["tokens"] = list(seg.tokens)
      entry["token_ids"] = [layout.special_id(t) for t in seg.tokens]
    else:
      entry["length"] = seg.size
    segments.append(entry)

  ranges = {m: list(layout.id_range(m)) for m in sequence.MODALITIES}
  vocabulary = {
      "text_vocab": layout.text_vocab, "image_vocab": layout.image_vocab, "id_align": layout.id_align,
      "ranges": ranges, "special_ids": {t: layout.special_id(t) for t in layout.specials},
      "mask_id": layout.mask_id, "mask_is_text_id": layout.mask_id < layout.text_vocab,
      "size": layout.size, "vocab_multiple": vocab_multiple, "padded_size": padded,
  }

  code = None
  if opt("image_code_features", False):
    code = {"features": "image_code_features", "projection": "code_projection/kernel",
            "ids": ranges[sequence.IMAGE]}
  modality = None
  if opt("modality_embedding", True):
    modality = {"tensor": "modality_embedding", "rows": 3 if layout.specials else 2,
                "row": {m: sequence.MODALITY_ID[m] for m in sequence.MODALITIES}}
  learned = None
  if positions in ("learned", "rope+learned"):
    learned = {s.name: ({"row": f"{s.name}_row", "col": f"{s.name}_col"} if s.modality == sequence.IMAGE
                        else {"index": f"{s.name}_position"}) for s in layout.segments}
  embedding = {"token": "token_embedding", "code_features": code, "modality": modality, "learned_positions": learned,
               "scale": float(opt("embedding_scale", 1.0 / math.sqrt(3.0)))}

  r = int(h * float(opt("rope_fraction", 0.5))) // 4 * 4
  rope_layout = opt("rope_layout", "segment")
  rotary = None
  if positions in ("rope", "rope+learned") and r:
    theta = float(opt("rope_theta", 10_000.0))
    if rope_layout == "sequence":      # layers.apply_rope_1d: r/2 frequencies theta^(-2j/r), flat index
      freqs = [theta ** (-2.0 * j / r) for j in range(r // 2)]
      component = [0] * (r // 2)
      pos = [[i, i] for i in range(layout.seq_len)]
    else:                              # layers.apply_rope_2d: r/4 frequencies, twice: row (or index), then column
      freqs = [theta ** (-j / (r // 4)) for j in range(r // 4)] * 2
      component = [0] * (r // 4) + [1] * (r // 4)
      pos = []
      for seg in layout.segments:
        if seg.modality == sequence.IMAGE:
          pos += [[row, col] for row in range(seg.grid[0]) for col in range(seg.grid[1])]
        else:
          pos += [[i, i] for i in range(seg.size)]
    rotary = {"layout": rope_layout, "theta": theta, "fraction": float(opt("rope_fraction", 0.5)),
              "rotating_dims": r, "pair_offset": r // 2, "frequencies": freqs, "position_component": component,
              "positions": pos, "cross_modal": bool(opt("cross_modal_rope", True))}

  p = int(opt("directional_heads", 0))
  c = int(opt("cross_modal_heads", 0))
  attention = {
      "num_heads": n, "head_dim": h,
      "qkv": ({"fused": "attn/qkv/kernel", "order": ["q", "k", "v"]} if opt("fused_qkv", True)
              else {"q": "attn/query/kernel", "k": "attn/key/kernel", "v": "attn/value/kernel"}),
      "out": "attn/out/kernel",
      "qk_norm": {"q": "attn/query_norm/scale", "k": "attn/key_norm/scale"} if opt("qk_norm", False) else None,
      "scale": 1.0 / math.sqrt(h),
      "directional_heads": p, "left_heads": list(range(p)), "right_heads": list(range(p, 2 * p)),
      "cross_modal_heads": c, "text_reads_image_heads": list(range(c)),
      "image_reads_text_heads": list(range(c, 2 * c)),
      "value_positions": "attn/value_position/kernel" if opt("value_positions", False) else None,
  }
  scan = bool(opt("scan_layers", False))
  return {
      "version": CONVENTIONS_VERSION,
      "dtype": opt("dtype", "float32"), "d_model": d,
      "sequence": {"length": layout.seq_len, "segments": segments, "describe": layout.describe()},
      "vocabulary": vocabulary,
      "token_grid": list(layout.image_grid) if layout.image_grid else None,
      "embedding": embedding,
      "norm": {"eps": eps, "dtype": "float32"},
      "layers": {"num_layers": int(model["num_layers"]), "scan": scan, "prefix": "blocks" if scan else "block_{i}",
                 "attn_norm": "attn_norm/scale", "mlp_norm": "mlp_norm/scale"},
      "attention": attention,
      "rotary": rotary,
      "mlp": {"gate": "mlp/wi_0/kernel", "up": "mlp/wi_1/kernel", "down": "mlp/wo/kernel",
              "hidden": int(model["mlp_dim"])},
      "output": {"final_norm": "final_norm/scale", "head": "head/kernel", "columns": layout.size,
                 "restrict": bool(opt("restrict_output", True)), "fill": NEG_INF},
  }


def _number(x: float) -> str:
  """-1e9, not -1000000000.0."""
  return f"{x:.0e}".replace("e+0", "e").replace("e+", "e") if abs(x) >= 1e6 and float(x).is_integer() else repr(x)


def _ids(lo_hi) -> str:
  lo, hi = lo_hi
  return f"[{lo}, {hi})" if hi > lo else "none"


def _forward_section(conv: dict, meta: dict) -> list[str]:
  """The card's "How to run the forward pass": :func:`conventions` in words and formulas."""
  voc, emb, att, rot, lay, out = (conv[k] for k in ("vocabulary", "embedding", "attention", "rotary", "layers",
                                                    "output"))
  eps, h, n = conv["norm"]["eps"], att["head_dim"], att["num_heads"]
  ranges = voc["ranges"]
  if meta["format"] != "safetensors":
    weights = f"the Orbax tree `{bundle.PARAMS_DIR}/`"
  elif meta["dtype"] == "float32":
    weights = f"`{bundle.SAFETENSORS_FILE}` (`safetensors.numpy.load_file` reads it alone)"
  else:
    weights = (f"`{bundle.SAFETENSORS_FILE}` (BF16 tensors, which numpy has no dtype for: read them with a "
               "framework that has one, or `unimm_jax.bundle.read_safetensors`, and compute in float32)")
  lines = [
      "## How to run the forward pass",
      "",
      "What follows is all a reader needs to compute this model's logits from the bundle alone; `model.json`'s "
      "`conventions` holds the same in machine-readable form (with the rotary frequencies and every position's "
      f"rotary position in full). Tensors are in {weights}, stored in {meta['dtype']}, under the names written "
      f"here. D = {conv['d_model']}, N = {n} heads of H = {h}, tokens `t` int [B, S].",
      "",
      f"**1. Sequence** ({conv['sequence']['length']} tokens, `{conv['sequence']['describe']}`): the segments, in "
      "this order in the flat sequence:",
      "",
      "| segment | modality (id) | positions | layout |",
      "| --- | --- | --- | --- |",
  ]
  for seg in conv["sequence"]["segments"]:
    if "grid" in seg:
      gh, gw = seg["grid"]
      what = f"{gh}x{gw} grid, row-major: cell (r, c) at {seg['start']} + {gw} r + c"
    elif "tokens" in seg:
      what = "fixed tokens " + ", ".join(f"`{t}` = {i}" for t, i in zip(seg["tokens"], seg["token_ids"]))
    else:
      what = f"{seg['length']} tokens (text is PAD-padded to the length)"
    lines.append(f"| `{seg['name']}` | {seg['modality']} ({seg['modality_id']}) | {seg['start']}-{seg['end'] - 1} "
                 f"| {what} |")
  specials = ", ".join(f"`{t}` = {i}" for t, i in voc["special_ids"].items()) or "none"
  mask = (f"MASK = {voc['mask_id']}" + (" (one of the text ids, as in the imported vocabulary: no row of its own)"
                                        if voc["mask_is_text_id"] else " (its own row, after the last range)"))
  grid = conv["token_grid"]
  lines += [
      "",
      f"**2. Vocabulary.** One id space: text ids {_ids(ranges['text'])} (the {voc['text_vocab']} ids of "
      f"`tokenizers/`' text tokenizer, PAD included), "
      + (f"image ids {_ids(ranges['image'])} (the {voc['image_vocab']} codes of the image tokenizer: code c is id "
         f"{ranges['image'][0]} + c), " if voc["image_vocab"] else "no image ids, ")
      + (f"special tokens {_ids(ranges['special'])} ({specials}), " if voc["special_ids"] else "no special tokens, ")
      + f"{mask}. The image and special ranges start at multiples of "
      f"`sequence.id_align` = {voc['id_align']}; ids between ranges are never used. The logits have "
      f"{voc['size']} columns (ids 0 to {voc['size'] - 1}); `{emb['token']}` has {voc['padded_size']} rows and "
      f"`{out['head']}` {voc['padded_size']} columns (padded to a multiple of `model.vocab_multiple` = "
      f"{voc['vocab_multiple']}): the padding rows are never looked up and their columns are cut off.",
      "",
      (f"Token grid: each image is {grid[0]}x{grid[1]} tokens (`image.size` {meta['config']['image']['size']} px, "
       f"`{meta['config']['image']['tokenizer']}` tokenizer), row-major." if grid else "No image segment."),
      "",
      f"**3. Input embedding** (float32 [B, S, D]): `x = {emb['token']}[t]`",
  ]
  if emb["code_features"]:
    c = emb["code_features"]
    lines.append(f"- plus, where `t` is an image code ({_ids(c['ids'])}; MASK is not), "
                 f"`({c['features']} @ {c['projection']})[t - {c['ids'][0]}]`: `{c['features']}` [image_vocab, F] "
                 f"(what each code looks like; fixed), `{c['projection']}` [F, D];")
  if emb["modality"]:
    m = emb["modality"]
    lines.append(f"- plus `{m['tensor']}[row]` of the position's modality ({m['rows']} rows: "
                 + ", ".join(f"{k} {v}" for k, v in m["row"].items() if v < m["rows"]) + ");")
  if emb["learned_positions"]:
    parts = [f"`{v['index']}[i]` at the i-th position of segment `{k}`" if "index" in v else
             f"`{v['row']}[r] + {v['col']}[c]` at cell (r, c) of segment `{k}`"
             for k, v in emb["learned_positions"].items()]
    lines.append("- plus the learned absolute positions: " + "; ".join(parts) + ";")
  lines += [
      f"- then `x = x * {emb['scale']!r}`.",
      "",
      f"**4. RMSNorm** (every norm; in float32): `y = x / sqrt(mean(x**2, last axis) + {eps!r}) * scale`, no mean "
      "subtraction, no bias.",
      "",
      f"**5. Blocks.** {lay['num_layers']} pre-norm blocks, "
      + (f"stacked: every `{lay['prefix']}/...` tensor has a leading layer axis [{lay['num_layers']}, ...] "
         "(`model.scan_layers`); block i uses slice i" if lay["scan"] else
         f"block i's tensors under `block_{{i}}/` (i = 0 to {lay['num_layers'] - 1})")
      + f": `x = x + attn(RMSNorm[{lay['attn_norm']}](x))`, then `x = x + mlp(RMSNorm[{lay['mlp_norm']}](x))`.",
      "",
      "**6. Attention** (of the normed input `u` [B, S, D]):",
  ]
  if "fused" in att["qkv"]:
    lines.append(f"- `W = {att['qkv']['fused']}` [D, 3, N, H]: `q = u @ W[:, 0]`, `k = u @ W[:, 1]`, "
                 "`v = u @ W[:, 2]` (each [B, S, N, H]);")
  else:
    lines.append(f"- `q = u @ {att['qkv']['q']}`, `k = u @ {att['qkv']['k']}`, `v = u @ {att['qkv']['v']}` "
                 "(each kernel [D, N, H], each result [B, S, N, H]);")
  if att.get("value_positions"):
    lines.append(f"- values that carry positions (`model.value_positions`): `v = v + P @ {att['value_positions']}` "
                 "([D, N, H]), P [S, D] the learned absolute positions of step 3 (before the scale), the same at "
                 "every example;")
  if att["qk_norm"]:
    lines.append(f"- qk-norm, before the rotary embedding: `q = RMSNorm[{att['qk_norm']['q']}](q)`, "
                 f"`k = RMSNorm[{att['qk_norm']['k']}](k)` over each head's H dims (scale [H], eps {eps!r});")
  if rot:
    r, half = rot["rotating_dims"], rot["pair_offset"]
    lines.append(f"- rotary embedding of q and k (not v){' after the qk-norm' if att['qk_norm'] else ''}: the "
                 f"first r = int(H * rope_fraction) // 4 * 4 = {r} dims of each head rotate (`model.rope_fraction` "
                 f"= {rot['fraction']!r}), the other H - r = {h - r} pass unchanged. Pair j (j < {half}) is "
                 f"`(x[j], x[j + {half}])`: `x[j] <- x[j] cos(a) - x[j + {half}] sin(a)`, "
                 f"`x[j + {half}] <- x[j] sin(a) + x[j + {half}] cos(a)`, angle `a = p[c_j] * f_j` with `p` the "
                 "position's rotary position (p0, p1):")
    theta = rot["theta"]
    if rot["layout"] == "sequence":
      lines.append(f"  1-D over the flat sequence (`model.rope_layout='sequence'`): "
                   f"`f_j = {theta!r} ** (-2 j / {r})`, `c_j = 0`, `p = (i, i)` for the index i in the flat sequence;")
    else:
      q = r // 4
      lines.append(f"  2-D (`model.rope_layout='segment'`): {q} frequencies `f_j = {theta!r} ** (-(j mod {q}) / "
                   f"{q})`; pairs j < {q} turn by component 0 (`c_j = 0`: image row, or text index), pairs j >= {q} "
                   "by component 1 (image column, or text index again); `p = (i, i)` at the i-th position of a text "
                   "(or special) segment, `p = (r, c)` at cell (r, c) of an image grid;")
    if not rot["cross_modal"]:
      lines.append("  `model.cross_modal_rope=False`: a query-key pair of positions of different modalities (the "
                   "modality ids of step 1) scores with the UNROTATED q and k (after qk-norm), a pair of the same "
                   "modality with the rotated ones;")
  else:
    lines.append("- no rotary embedding (`model.positions` has no `rope`, or no head dimension rotates);")
  lines.append(f"- scores `s = (q . k) * {att['scale']!r}` (1/sqrt(H)), in float32, every query against every key "
               "(bidirectional);")
  if att["directional_heads"]:
    lines.append(f"- directional heads: between two positions of the same text segment, heads "
                 f"{att['left_heads']} let a query at i see only keys j <= i, heads {att['right_heads']} only "
                 "j >= i (the other scores -inf); every other pair and every other head sees all keys;")
  if att.get("cross_modal_heads"):
    lines.append(f"- cross-modal heads: in heads {att['text_reads_image_heads']} a query at an image position sees "
                 f"no text key, in heads {att['image_reads_text_heads']} a query at a text position sees no image "
                 "key (those scores -inf; combined with any directional restriction of the same head);")
  lines += [
      f"- `o = softmax(s over keys) @ v` [B, S, N, H], then `o @ {att['out']}` ([N, H, D]) -> [B, S, D].",
      "",
      f"**7. MLP** (SwiGLU, of the normed input `u`): `(silu(u @ {conv['mlp']['gate']}) * (u @ "
      f"{conv['mlp']['up']})) @ {conv['mlp']['down']}`, kernels [D, {conv['mlp']['hidden']}], "
      f"[D, {conv['mlp']['hidden']}], [{conv['mlp']['hidden']}, D]; `silu(z) = z * sigmoid(z)` (wi_0 is the gate).",
      "",
      f"**8. Output.** `x = RMSNorm[{out['final_norm']}](x)`, `logits = (x @ {out['head']})[..., :{out['columns']}]`"
      + (f"; then at each position the ids outside its modality's range (the special ids and MASK always; at "
         f"special positions every id) are set to {_number(out['fill'])}, so a softmax of a row is over the position's "
         "own modality." if out["restrict"] else
         " (`model.restrict_output=False`: the raw logits over the whole vocabulary)."),
      "",
      f"**9. Dtype.** Compute dtype {conv['dtype']}; the norms, the rotary embedding and the attention softmax are "
      "float32 whatever it is.",
      "",
  ]
  return lines


def model_card(meta: dict) -> str:
  c, r = meta["config"], meta.get("report") or {}
  m, conv = c["model"], meta["conventions"]

  def fig(key, fmt="{:.3f}"):
    v = r.get(key)
    return "not measured" if v is None else fmt.format(v)

  bits = r.get("val_bits_per_token") or {}
  lines = [
      "# unimm_jax model",
      "",
      f"A masked discrete-diffusion transformer over `{conv['sequence']['describe']}` token sequences: one set of "
      "weights fills in any masked part of a sequence given the rest (with a caption and an image: draws images "
      "from captions, captions images, makes both at once and fills in masked parts of either).",
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
      "Files: `model.json` (config, figures, tensor list, `conventions`), `tokenizers/`, and the parameters "
      f"(`{bundle.SAFETENSORS_FILE if meta['format'] == 'safetensors' else bundle.PARAMS_DIR + '/'}`). Tensor "
      "names are parameter paths joined by `/` (see `unimm_jax/bundle.py`).",
      "",
  ]
  return "\n".join(lines + _forward_section(conv, meta))


def bundle_meta(config, layout: sequence.SequenceLayout, tensors: dict, *, step: int, weights: str, dtype: str,
                fmt: str, report: dict | None = None) -> dict:
  """A bundle's ``model.json``: what it is, its figures, its tensors ({flat name: array or ShapeDtypeStruct}) and
  the conventions of its forward pass. ``python -m unimm_jax.convert import`` writes the same, plus ``source``."""
  keep = ("val_bits_per_token", "t2i_accuracy", "i2t_accuracy", "joint_consistency", "step", "train_wall_s")
  report = report or {}
  return {
      "unimm_jax_export": EXPORT_VERSION, "step": step, "weights": weights, "dtype": dtype, "format": fmt,
      "param_count": int(sum(math.prod(v.shape) for v in tensors.values())),
      "config": config.to_dict(), "report": {k: report[k] for k in keep if k in report},
      "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(tensors.items())},
      "conventions": conventions(config, layout),
  }


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
  meta = bundle_meta(pipe.config, pipe.layout, flat, step=pipe.step, weights=weights, dtype=dtype, fmt=fmt,
                     report=report)
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
  (out / "README.md").write_text(model_card(meta))
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
