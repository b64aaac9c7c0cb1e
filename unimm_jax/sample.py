"""Sample from a trained model: ``python -m unimm_jax.sample --workdir=DIR --task=t2i --prompt="..." --out=OUT``.

Tasks:
  t2i      --prompt=TEXT (repeatable) [--num=N images per prompt]
  i2t      --image=FILE (repeatable)
  joint    --num=N
  inpaint  --image=FILE --mask=FILE [--prompt=TEXT]   (mask: an image, white = redraw)
  infill   --prompt="a <mask> red circle at the top left"  (each <mask> is one token) [--image=FILE]
  edit     --image=FILE --instruction="make the red circle blue"   (repeatable, one per image, or one for all)
  vqa      --image=FILE --question="what colour is the circle?"    (repeatable, one per image, or one for all)

Writes PNGs into OUT and ``OUT/samples.json`` listing what was generated (prompts, captions, files). Bad input
(a missing flag, a file that is not an image, a directory that is no trained model) is one ``error:`` line on
stderr and exit status 2.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from absl import app, flags, logging
from etils import epath
from PIL import Image

from unimm_jax.data import folder

TASKS = ("t2i", "i2t", "joint", "inpaint", "infill", "edit", "vqa")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
_TASK = flags.DEFINE_enum("task", "t2i", TASKS, "What to generate.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Caption(s) for t2i / inpaint, text with <mask> for infill.")
_IMAGE = flags.DEFINE_multi_string("image", [], "Image file(s) for i2t / inpaint / infill.")
_MASK = flags.DEFINE_string("mask", None, "inpaint: mask image, white (>= 128) = redraw.")
_INSTRUCTION = flags.DEFINE_multi_string("instruction", [], "edit: instruction(s), one per --image or one for all.")
_QUESTION = flags.DEFINE_multi_string("question", [], "vqa: question(s), one per --image or one for all.")
_NUM = flags.DEFINE_integer("num", 4, "t2i: images per prompt; joint: pairs.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps (default: the run's config.sample.*_steps).")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance w (default: config).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature (default: config).")
_METHOD = flags.DEFINE_enum("method", None, ["confidence", "ancestral", "threshold"], "Sampler (default: config).")
_THRESHOLD = flags.DEFINE_float("threshold", None, "--method=threshold: reveal every position whose drawn token's "
                                 "probability reaches this (default: config.sample.threshold).")
_CACHE = flags.DEFINE_enum("cache", None, ["none", "exact", "dual"], "Keys and values of the positions not being "
                           "generated: exact (computed once; a model.isolate_given run) or dual (Fast-dLLM's "
                           "approximate cache); default: config.sample.cache.")
_REFRESH = flags.DEFINE_integer("refresh_every", None, "--cache=dual: recompute every N steps (0: at each block's "
                                "first step only).")
_BLOCK = flags.DEFINE_integer("block_length", None, "Generate in blocks of this many positions, left to right "
                              "(semi-autoregressive; default: config.sample.block_length for infill, else 0).")
_PRESET = flags.DEFINE_string("preset", None, "An upstream's decoding per task (mmada), replacing config.sample's "
                              "settings; '' for none (default: config.sample.preset).")
_CANDIDATES = flags.DEFINE_integer("candidates", None, "i2t: captions drawn per image, the one that makes the "
                                   "image likeliest kept (default: config.sample.i2t_candidates).")
_SCORE_PASSES = flags.DEFINE_integer("score_passes", None, "i2t with candidates: forward passes scoring each "
                                     "candidate, 1 = one pass with the image all MASK (default: "
                                     "config.sample.i2t_score_passes).")
_SEED = flags.DEFINE_integer("seed", 0, "Same seed, same output.")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "raw"], "Which weights of a training workdir.")


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _read_image(flag: str, path: str, size: int, channels: int) -> np.ndarray:
  """The image file a flag names, uint8 [size, size, channels]; a file that cannot be read ends the program."""
  try:
    return folder.load_image(path, size, channels)
  except OSError as e:
    _fail(f"--{flag}: cannot read {path}: {e.strerror or e}")
  except ValueError as e:
    _fail(f"--{flag}: {e}")


def _load_images(paths, size, channels) -> np.ndarray:
  if not paths:
    _fail(f"--task={_TASK.value} needs --image=FILE")
  return np.stack([_read_image("image", p, size, channels) for p in paths])


def _save(out: epath.Path, name: str, image: np.ndarray) -> str:
  Image.fromarray(np.asarray(image, np.uint8).squeeze()).save(out / name)
  return name


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  missing = [f"--{f.name}" for f in (_WORKDIR, _OUT) if f.value is None]
  if missing:
    _fail(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required, e.g. python -m unimm_jax.sample "
          "--workdir=runs/shapes --out=samples --task=t2i --prompt='a small red circle at the top left'")
  from unimm_jax.pipeline import Pipeline, sampler_kwargs  # pylint: disable=g-import-not-at-top
  try:
    pipe = Pipeline.load(_WORKDIR.value, weights=_WEIGHTS.value)
  except FileNotFoundError as e:   # not a workdir, or one without a checkpoint yet
    _fail(f"--workdir: {e}")
  s = pipe.config.sample
  task = _TASK.value
  if _PRESET.value is not None:
    s.preset = _PRESET.value
  try:
    kw = sampler_kwargs(pipe.config, task)
  except ValueError as e:   # an unknown preset
    _fail(f"--preset: {e}")
  kw.update(seed=_SEED.value, steps=_STEPS.value or kw["steps"], method=_METHOD.value or kw["method"])
  if _TEMPERATURE.value is not None:
    kw["temperature"] = _TEMPERATURE.value
  if kw["method"] == "threshold":
    kw.setdefault("threshold", s.threshold)
    kw.setdefault("max_per_step", s.max_per_step)
    if _THRESHOLD.value is not None:
      kw["threshold"] = _THRESHOLD.value
  elif _THRESHOLD.value is not None:
    _fail("--threshold is for --method=threshold")
  if _CACHE.value is not None:
    kw["cache"] = _CACHE.value
  if _REFRESH.value is not None:
    if kw.get("cache", "none") != "dual":
      _fail("--refresh_every is for --cache=dual")
    kw["refresh_every"] = _REFRESH.value
  if kw.get("cache", "none") == "none":
    kw.pop("cache", None), kw.pop("refresh_every", None)
  elif kw["cache"] == "exact" and not pipe.model.config.isolate_given:
    _fail("--cache=exact needs a model trained with config.model.isolate_given=True (use --cache=dual)")
  if _BLOCK.value is not None:
    if task not in ("i2t", "infill", "vqa", "joint"):
      _fail("--block_length is for tasks that write text (i2t, infill, vqa, joint)")
    kw["block_length"] = _BLOCK.value
  if _CANDIDATES.value is not None:
    if task != "i2t":
      _fail("--candidates is for --task=i2t")
    kw["candidates"] = _CANDIDATES.value
  if _SCORE_PASSES.value is not None:
    if task != "i2t" or kw.get("candidates", 1) < 2:
      _fail("--score_passes is for --task=i2t with --candidates (or config.sample.i2t_candidates) above 1")
    kw["score_passes"] = _SCORE_PASSES.value
  if kw.get("candidates", 1) == 1:
    kw.pop("score_passes", None)
  guidance = kw.pop("guidance_scale", s.guidance_scale) if _GUIDANCE.value is None else _GUIDANCE.value
  kw.pop("guidance_scale", None)
  size, _, channels = pipe.tokenizers.image.image_shape
  out = epath.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  records = []
  if task == "t2i":
    if not _PROMPT.value:
      _fail("--task=t2i needs --prompt=TEXT")
    prompts = [p for p in _PROMPT.value for _ in range(_NUM.value)]
    for i, (p, img) in enumerate(zip(prompts, pipe.text_to_image(prompts, guidance_scale=guidance, **kw))):
      records.append({"prompt": p, "image": _save(out, f"t2i_{i:03d}.png", img)})
  elif task == "i2t":
    images = _load_images(_IMAGE.value, size, channels)
    for path, cap in zip(_IMAGE.value, pipe.image_to_text(images, guidance_scale=guidance, **kw)):
      records.append({"image": path, "caption": cap})
  elif task == "joint":
    texts, images = pipe.generate(_NUM.value, **kw)
    for i, (t, img) in enumerate(zip(texts, images)):
      records.append({"caption": t, "image": _save(out, f"joint_{i:03d}.png", img)})
  elif task == "inpaint":
    images = _load_images(_IMAGE.value[:1], size, channels)
    if not _MASK.value:
      _fail("--task=inpaint needs --mask=FILE")
    mask = _read_image("mask", _MASK.value, size, 1)[..., 0] >= 128
    prompts = _PROMPT.value[:1] or None
    result = pipe.inpaint(images, mask[None], prompts=prompts, guidance_scale=guidance, **kw)[0]
    records.append({"image": _IMAGE.value[0], "mask": _MASK.value, "prompt": prompts and prompts[0],
                    "inpainted": _save(out, "inpaint_000.png", result)})
  elif task in ("edit", "vqa"):
    flag, texts = ("instruction", _INSTRUCTION.value) if task == "edit" else ("question", _QUESTION.value)
    images = _load_images(_IMAGE.value, size, channels)
    if not texts:
      _fail(f"--task={task} needs --{flag}=TEXT")
    if len(texts) not in (1, len(images)):
      _fail(f"--task={task}: {len(texts)} --{flag} for {len(images)} --image; give one per image or one for all")
    texts = texts * len(images) if len(texts) == 1 else texts
    try:
      if task == "edit":
        results = pipe.edit(images, texts, guidance_scale=guidance, **kw)
      else:
        results = pipe.answer(images, texts, guidance_scale=guidance, **kw)
    except ValueError as e:   # an empty instruction or question; a model not trained on the task
      _fail(f"--task={task}: {e}")
    for i, (path, text, result) in enumerate(zip(_IMAGE.value, texts, results)):
      if task == "edit":
        records.append({"image": path, "instruction": text, "edited": _save(out, f"edit_{i:03d}.png", result)})
      else:
        records.append({"image": path, "question": text, "answer": result})
  else:
    if not _PROMPT.value:
      _fail('--task=infill needs --prompt="text with <mask> holes"')
    images = _load_images(_IMAGE.value, size, channels) if _IMAGE.value else None
    for p, t in zip(_PROMPT.value, pipe.infill(_PROMPT.value, images=images, **kw)):
      records.append({"text_with_holes": p, "filled": t})
  (out / "samples.json").write_text(json.dumps({"task": task, **kw, "samples": records}, indent=2))
  for r in records:
    print(json.dumps(r))
  logging.info("wrote %d samples to %s", len(records), out)


if __name__ == "__main__":
  app.run(main)
