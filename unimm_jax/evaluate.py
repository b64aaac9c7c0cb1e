"""Generation scores and the human-readable report: ``python -m unimm_jax.evaluate --workdir=DIR``.

On ``shapes`` data the dataset's checker reads generated images and captions back into sets of shapes, so every
direction is scored exactly, over the first ``eval.num_generate`` examples of the val split (shape sets never
seen in training):

* text->image accuracy: share of images drawn for val captions whose shape set equals the caption's; per
  attribute, share whose multiset of that attribute (colour, kind, size, position, count) matches;
* image->text accuracy: share of captions written for val images that parse and equal the image's set;
* joint consistency: share of jointly generated pairs whose caption parses, is non-empty and equals its image;
* for a model trained on edits and questions too (``data.shapes_kinds``, ``configs/shapes_unified.py``): edit
  accuracy, the share of val edits whose generated target holds exactly the expected shapes, overall and per
  edit kind; VQA accuracy, the share of val questions answered exactly, overall and per question kind (the first
  ``eval.num_generate`` val edits and questions, whose source scenes were never trained on).

Other data sources have no checker: those figures are null. ``report.json`` gets the figures (beside the ELBO
and timing of training); ``report.html`` shows them with the samples, side by side.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections import Counter

import numpy as np
from absl import app, flags, logging
from PIL import Image

from unimm_jax import pipeline as pipeline_lib, storage
from unimm_jax.data import pretokenized, shapes, shapes_tasks

ATTRIBUTES = ("colour", "kind", "size", "cell")


def _attribute_match(got: frozenset, want: frozenset) -> dict[str, bool]:
  out = {a: Counter(getattr(s, a) for s in got) == Counter(getattr(s, a) for s in want) for a in ATTRIBUTES}
  out["count"] = len(got) == len(want)
  return out


def _by_count(correct, sets) -> dict[str, float]:
  """Accuracy over the examples of each shape count: {'1': ..., '2': ...}. Two shapes are where binding
  attributes to the right shape is tested, so this split says whether a model reads scenes or single objects."""
  return _by_kind(correct, [str(len(s)) for s in sets], [str(n) for n in sorted({len(s) for s in sets})])


def generation_scores(pipe, config, num: int, seed: int = 0) -> tuple[dict, dict]:
  """(figures, samples for the html report) on the first ``num`` val examples of ``shapes``."""
  examples = [shapes.sample_example("val", config.data.seed, i) for i in range(num)]
  sets = [e[0] for e in examples]
  images = np.stack([e[1] for e in examples])
  captions = [e[2] for e in examples]
  figures, timing = {}, {}

  start = time.perf_counter()
  drawn = pipe.text_to_image(captions, guidance_scale=config.sample.guidance_scale, seed=seed,
                             **pipeline_lib.sampler_kwargs(config, "t2i"))
  timing["t2i_s"] = time.perf_counter() - start
  read = [shapes.read_image(img) for img in drawn]
  figures["t2i_accuracy"] = float(np.mean([r == s for r, s in zip(read, sets)]))
  figures["t2i_accuracy_by_count"] = _by_count([r == s for r, s in zip(read, sets)], sets)
  per = [_attribute_match(r, s) for r, s in zip(read, sets)]
  figures["t2i_attribute_accuracy"] = {a: float(np.mean([p[a] for p in per])) for a in per[0]}

  start = time.perf_counter()
  written = pipe.image_to_text(images, guidance_scale=config.sample.guidance_scale, seed=seed,
                               **pipeline_lib.sampler_kwargs(config, "i2t"))
  timing["i2t_s"] = time.perf_counter() - start
  parsed = [shapes.read_caption(c) for c in written]
  figures["i2t_accuracy"] = float(np.mean([p == s for p, s in zip(parsed, sets)]))
  figures["i2t_accuracy_by_count"] = _by_count([p == s for p, s in zip(parsed, sets)], sets)
  per = [_attribute_match(p, s) for p, s in zip(parsed, sets) if p is not None]
  figures["i2t_parse_rate"] = float(np.mean([p is not None for p in parsed]))
  figures["i2t_attribute_accuracy"] = (
      {a: float(np.sum([q[a] for q in per]) / num) for a in per[0]} if per else None)

  start = time.perf_counter()
  joint_texts, joint_images = pipe.generate(num, seed=seed, **pipeline_lib.sampler_kwargs(config, "joint"))
  timing["joint_s"] = time.perf_counter() - start
  consistent = []
  for text, img in zip(joint_texts, joint_images):
    p = shapes.read_caption(text)
    consistent.append(bool(p) and p == shapes.read_image(img))
  figures["joint_consistency"] = float(np.mean(consistent))

  # One inpainting example per row: the right half of a val image redrawn for its caption.
  k = min(8, num)
  mask = np.zeros((k,) + images.shape[1:3], bool)
  mask[:, :, images.shape[2] // 2:] = True
  inpainted = pipe.inpaint(images[:k], mask, prompts=captions[:k], seed=seed,
                           **pipeline_lib.sampler_kwargs(config, "inpaint"))
  kinds = dict(map(tuple, config.data.get("shapes_kinds", ())))
  task_rows = {}
  for task, scores in (("edit", edit_scores), ("vqa", vqa_scores)):
    if kinds.get(task, 0) > 0:
      start = time.perf_counter()
      task_figures, task_rows[task] = scores(pipe, config, num, seed)
      timing[f"{task}_s"] = time.perf_counter() - start
      figures.update(task_figures)
  figures["sample_seconds"] = {k_: round(v, 2) for k_, v in timing.items()}
  samples = {
      "t2i": list(zip(captions[:12], drawn[:12], [r == s for r, s in zip(read[:12], sets[:12])])),
      "i2t": list(zip(images[:12], written[:12], [p == s for p, s in zip(parsed[:12], sets[:12])])),
      "joint": list(zip(joint_texts[:12], joint_images[:12], consistent[:12])),
      "inpaint": list(zip(images[:k], mask, inpainted, captions[:k])),
  }
  samples.update(task_rows)
  return figures, samples


def _by_kind(correct, kinds, names) -> dict[str, float | None]:
  """Accuracy over the examples of each kind (None for a kind with no example)."""
  out = {}
  for name in names:
    hits = [c for c, k in zip(correct, kinds) if k == name]
    out[name] = float(np.mean(hits)) if hits else None
  return out


def edit_scores(pipe, config, num: int, seed: int = 0) -> tuple[dict, list]:
  """({'edit_accuracy', 'edit_accuracy_by_kind', 'edit_val_pairs_unseen'}, html rows) on the first ``num`` val
  edits: each generated target read back from its pixels and compared with the expected shapes exactly."""
  edits = [shapes_tasks.sample_edit("val", config.data.seed, i) for i in range(num)]
  sources = np.stack([shapes.render(e.source) for e in edits])
  out = pipe.edit(sources, [e.instruction for e in edits], guidance_scale=config.sample.guidance_scale, seed=seed,
                  **pipeline_lib.sampler_kwargs(config, "edit"))
  correct = [shapes_tasks.check_edit(e.target, img) for e, img in zip(edits, out)]
  figures = {
      "edit_accuracy": float(np.mean(correct)),
      "edit_accuracy_by_kind": _by_kind(correct, [e.kind for e in edits], shapes_tasks.EDIT_KINDS),
      # A train (scene, edit) pair has a train scene as its source: a val pair with a val source was never seen.
      "edit_val_pairs_unseen": float(np.mean([shapes.split_of(e.source) == "val" for e in edits])),
  }
  rows = [(sources[i], edits[i].instruction, out[i], shapes.render(edits[i].target), correct[i])
          for i in range(min(12, num))]
  return figures, rows


def vqa_scores(pipe, config, num: int, seed: int = 0) -> tuple[dict, list]:
  """({'vqa_accuracy', 'vqa_accuracy_by_kind'}, html rows) on the first ``num`` val questions, answers compared
  exactly (:func:`shapes_tasks.check_answer`)."""
  questions = [shapes_tasks.sample_question("val", config.data.seed, i) for i in range(num)]
  images = np.stack([shapes.render(q.scene) for q in questions])
  answers = pipe.answer(images, [q.question for q in questions], guidance_scale=config.sample.guidance_scale,
                        seed=seed, **pipeline_lib.sampler_kwargs(config, "vqa"))
  correct = [shapes_tasks.check_answer(q.answer, a) for q, a in zip(questions, answers)]
  figures = {
      "vqa_accuracy": float(np.mean(correct)),
      "vqa_accuracy_by_kind": _by_kind(correct, [q.kind for q in questions], shapes_tasks.QUESTION_KINDS),
  }
  rows = [(images[i], questions[i].question, answers[i], questions[i].answer, correct[i]) for i in range(min(12, num))]
  return figures, rows


# ---------------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------------
def png_html(image: np.ndarray, scale: int = 4) -> str:
  img = Image.fromarray(np.asarray(image, np.uint8).squeeze())
  img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _cell(value) -> str:
  """An html table cell's content: an image (uint8 array) or escaped text."""
  return png_html(value) if isinstance(value, np.ndarray) else html.escape(str(value))


def _mark(ok: bool) -> str:
  return '<span class="ok">&#10003;</span>' if ok else '<span class="bad">&#10007;</span>'


def render_html(report: dict, samples: dict | None) -> str:
  def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"
  bits = report.get("val_bits_per_token") or {}
  def by_count(key):
    split = report.get(key) or {}
    return ", ".join(f"{n} shape{'s' if n != '1' else ''}: {pct(v)}" for n, v in split.items()) or "n/a"
  def by_kind(key):
    return ", ".join(f"{k}: {pct(v)}" for k, v in (report.get(key) or {}).items()) or "n/a"
  rows = [
      ("step", report.get("step")),
      ("val bits/token, text", f"{bits.get('text', float('nan')):.4f}"),
      ("val bits/token, image", f"{bits.get('image', float('nan')):.4f}"),
      ("val bits/token, text given the image", f"{bits.get('text_given_image', float('nan')):.4f}"),
      ("val bits/token, image given the text", f"{bits.get('image_given_text', float('nan')):.4f}"),
      *((f"val bits/token, {name.replace('_', ' ')}", f"{value:.4f}") for name, value in bits.items()
        if name not in ("text", "image", "text_given_image", "image_given_text")),   # e.g. the unified tasks'
      ("text&rarr;image accuracy", pct(report.get("t2i_accuracy"))),
      ("image&rarr;text accuracy", pct(report.get("i2t_accuracy"))),
      ("text&rarr;image by shape count", by_count("t2i_accuracy_by_count")),
      ("image&rarr;text by shape count", by_count("i2t_accuracy_by_count")),
      ("joint consistency", pct(report.get("joint_consistency"))),
      *((("edit accuracy", pct(report.get("edit_accuracy"))),
         ("edit accuracy by kind", by_kind("edit_accuracy_by_kind"))) if "edit_accuracy" in report else ()),
      *((("VQA accuracy", pct(report.get("vqa_accuracy"))),
         ("VQA accuracy by kind", by_kind("vqa_accuracy_by_kind"))) if "vqa_accuracy" in report else ()),
      ("training wall time", f"{report.get('train_wall_s')} s"),
      ("training tokens/s", report.get("train_tokens_per_s")),
  ]
  parts = ["<!doctype html><meta charset='utf-8'><title>unimm_jax report</title><style>",
           "body{font-family:sans-serif;margin:2em} td,th{padding:4px 10px;vertical-align:middle}",
           "table{border-collapse:collapse} tr:nth-child(even){background:#f4f4f4} .ok{color:green}",
           ".bad{color:#b00} img{image-rendering:pixelated;border:1px solid #ccc}</style>",
           "<h1>unimm_jax report</h1><table>"]
  parts += [f"<tr><th align=left>{k}</th><td>{html.escape(str(v)) if '&' not in str(v) else v}</td></tr>"
            for k, v in rows]
  parts.append("</table>")
  if samples:
    parts.append("<h2>Text &rarr; image (val captions)</h2><table>")
    parts += [f"<tr><td>{html.escape(c)}</td><td>{png_html(i)}</td><td>{_mark(ok)}</td></tr>" for c, i, ok in samples["t2i"]]
    parts.append("</table><h2>Image &rarr; text (val images)</h2><table>")
    parts += [f"<tr><td>{png_html(i)}</td><td>{html.escape(c)}</td><td>{_mark(ok)}</td></tr>" for i, c, ok in samples["i2t"]]
    parts.append("</table><h2>Joint generation</h2><table>")
    parts += [f"<tr><td>{html.escape(c)}</td><td>{png_html(i)}</td><td>{_mark(ok)}</td></tr>" for c, i, ok in samples["joint"]]
    parts.append("</table><h2>Inpainting (right half redrawn for the caption)</h2><table>"
                 "<tr><th>original</th><th>kept</th><th>inpainted</th><th>caption</th></tr>")
    for img, mask, out, cap in samples["inpaint"]:
      kept = np.where(mask[..., None], 64, img).astype(np.uint8)
      parts.append(f"<tr><td>{png_html(img)}</td><td>{png_html(kept)}</td><td>{png_html(out)}</td><td>{html.escape(cap)}</td></tr>")
    parts.append("</table>")
    tables = (("edit", "Editing (val source images)", ("source", "instruction", "result", "expected")),
              ("vqa", "Visual question answering (val images)", ("image", "question", "answer", "expected")))
    for key, title, headers in tables:
      if samples.get(key):   # rows: (four cells: an image or a text each, right or not)
        parts.append(f"<h2>{title}</h2><table><tr>" + "".join(f"<th>{h}</th>" for h in headers) + "<th></th></tr>")
        parts += ["<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row[:-1]) + f"<td>{_mark(row[-1])}</td></tr>"
                  for row in samples[key]]
        parts.append("</table>")
  return "\n".join(parts)


def shapes_seed(config) -> int | None:
  """``data.seed`` of the shapes examples the run trained on, directly or pre-tokenized; None for other data
  (which has no checker to score generation with)."""
  if config.data.source == "shapes":
    return config.data.seed
  if config.data.source == "pretokenized":
    source = pretokenized.read_index(config.data.path)["source"]
    return source["seed"] if source["source"] == "shapes" else None
  return None


def evaluate_workdir(workdir, config=None) -> dict:
  """Scores the newest checkpoint in ``workdir`` and writes report.json (merged) and report.html."""
  workdir = storage.absolute_path(workdir)
  pipe = pipeline_lib.Pipeline.load(workdir)
  config = config or pipe.config
  report_path = workdir / "report.json"
  report = json.loads(report_path.read_text()) if report_path.exists() else {}
  samples = None
  seed = shapes_seed(config)
  if seed is not None:
    config = config.copy_and_resolve_references()
    config.data.seed = seed
    start = time.perf_counter()
    figures, samples = generation_scores(pipe, config, config.eval.num_generate)
    figures["generation_eval_s"] = round(time.perf_counter() - start, 2)
    report.update(figures, generation_step=int(report.get("step", -1)))
    logging.info("text->image accuracy %.3f, image->text accuracy %.3f, joint consistency %.3f (%d val examples)",
                 figures["t2i_accuracy"], figures["i2t_accuracy"], figures["joint_consistency"],
                 config.eval.num_generate)
    for task in ("edit", "vqa"):
      if f"{task}_accuracy" in figures:
        logging.info("%s accuracy %.3f; by kind: %s", task, figures[f"{task}_accuracy"],
                     ", ".join(f"{k} {v:.3f}" for k, v in figures[f"{task}_accuracy_by_kind"].items() if v is not None))
  else:
    report.update({"t2i_accuracy": None, "i2t_accuracy": None, "joint_consistency": None})
  report_path.write_text(json.dumps(report, indent=2, default=float))
  (workdir / "report.html").write_text(render_html(report, samples))
  logging.info("wrote %s and %s", report_path, workdir / "report.html")
  return report


def _cli():
  # Flags are defined here, not at import, because the main job imports this module beside its own flags.
  workdir = flags.DEFINE_string("workdir", None, "A training workdir.")
  flags.mark_flags_as_required(["workdir"])

  def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    evaluate_workdir(workdir.value)

  app.run(main)


if __name__ == "__main__":
  _cli()
