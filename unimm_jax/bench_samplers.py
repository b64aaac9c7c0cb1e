"""Speed beside quality: ``python -m unimm_jax.bench --what=sample --workdir=RUN`` on a model trained on ``shapes``.

For each sampler setting (the run's plain confidence sampler, then confidence-threshold decoding with the
threshold swept), each with every cache setting (``caches``: ``none``; ``exact`` on a model trained with
``model.isolate_given``; ``dual`` or ``dual/N``, Fast-dLLM's approximate cache refreshed at the first step or
every N steps) and every caption-candidates setting (``candidates``: ``1``, one caption per image; ``K``, K
captions, the one that makes the image likeliest kept, scored with the run's ``sample.i2t_score_passes``;
``K/s``, scored with s passes; text -> image does not use candidates, so its figures are the same sampler's
measured once), on the first ``num`` val examples of ``shapes``:

* text -> image and image -> text accuracy, exactly as the report scores them (``evaluate``'s checkers);
* forward passes per sample (``Pipeline.last_forward_passes``: sampler steps over the sequence, mean and max);
* wall time per image and per caption at batch 1 and at batch 64 (median of ``repeats`` calls, after a
  compiling call).

Timing is a benchmark, not a test: record the figures in BENCHMARKS.md with the machine they came from.
"""

from __future__ import annotations

import re
import time

import numpy as np
from absl import logging

from unimm_jax import pipeline as pipeline_lib
from unimm_jax.data import shapes

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def default_caches(config) -> tuple[str, ...]:
  """The cache settings worth comparing for a run: the exact cache where the model was trained for it, else the
  approximate one refreshed once and every 4 steps."""
  return ("none", "exact") if config.model.get("isolate_given", False) else ("none", "dual", "dual/4")


def cache_kwargs(cache: str) -> dict:
  """``none`` | ``exact`` | ``dual`` | ``dual/N`` -> sampler call arguments."""
  name, _, every = cache.partition("/")
  if name not in ("none", "exact", "dual") or (every and (name != "dual" or not every.isdigit())):
    raise ValueError(f"cache setting {cache!r} is not none, exact, dual or dual/N")
  return {} if name == "none" else dict(cache=name, refresh_every=int(every or 0))


def default_candidates(config) -> tuple[str, ...]:
  """One caption per image, and the run's own candidates setting where it has one."""
  k = int(config.sample.get("i2t_candidates", 1))
  return ("1",) if k == 1 else ("1", str(k))


def candidates_kwargs(config, setting: str) -> dict:
  """``K`` | ``K/s`` -> image_to_text call arguments (``K``: the run's scoring passes)."""
  k, _, passes = setting.partition("/")
  if not k.isdigit() or int(k) < 1 or (passes and (not passes.isdigit() or int(passes) < 1 or k == "1")):
    raise ValueError(f"candidates setting {setting!r} is not K or K/s (K >= 1 captions, s >= 1 scoring passes)")
  if int(k) == 1:
    return dict(candidates=1)
  return dict(candidates=int(k), score_passes=int(passes or config.sample.get("i2t_score_passes", 8)))


def settings(config, thresholds=THRESHOLDS, caches=("none",), candidates=("1",)) -> list[tuple[str, dict, dict]]:
  """(name, t2i call arguments, i2t call arguments) of each sampler setting the sweep compares."""
  out = []
  t2i, i2t = pipeline_lib.sampler_kwargs(config, "t2i"), pipeline_lib.sampler_kwargs(config, "i2t")
  i2t.pop("candidates", None), i2t.pop("score_passes", None)
  for kw in (t2i, i2t):
    kw["guidance_scale"] = config.sample.guidance_scale
    kw.pop("cache", None), kw.pop("refresh_every", None)
  methods = [(f"{t2i['method']} (plain)", {})]
  methods += [(f"threshold {tau}", dict(method="threshold", threshold=float(tau), max_per_step=0))
              for tau in thresholds]
  for cache in caches:
    extra_cache = cache_kwargs(cache)
    for name, extra in methods:
      label = name if cache == "none" else f"{name}, cache {cache}"
      for setting in candidates:
        extra_i2t = candidates_kwargs(config, setting)
        k = extra_i2t["candidates"]
        passes = extra_i2t.get("score_passes", 0)
        suffix = "" if k == 1 else f", {k} candidates ({passes} scoring pass{'es' if passes > 1 else ''})"
        out.append((label + suffix, {**t2i, **extra, **extra_cache}, {**i2t, **extra, **extra_cache, **extra_i2t}))
  return out


def _timed(fn, repeats: int) -> float:
  fn()   # compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def bench_samplers(pipe, num: int = 256, batches=(1, 64), repeats: int = 3, thresholds=THRESHOLDS,
                   seed: int = 0, caches=None, candidates=None) -> list[dict]:
  """One row per sampler setting (module docstring); ``caches`` default: :func:`default_caches`, ``candidates``:
  :func:`default_candidates`."""
  config = pipe.config
  examples = [shapes.sample_example("val", config.data.seed, i) for i in range(num)]
  sets = [e[0] for e in examples]
  images = np.stack([e[1] for e in examples])
  captions = [e[2] for e in examples]
  rows = []
  uncached = {}   # sampler name -> (images, captions) drawn without a cache
  t2i_done = {}   # the t2i call arguments -> (its row's t2i figures, the images drawn)
  caches = default_caches(config) if caches is None else caches
  candidates = default_candidates(config) if candidates is None else candidates
  for name, t2i, i2t in settings(config, thresholds, caches, candidates):
    row = {"sampler": name, "t2i": dict(t2i), "i2t": dict(i2t)}
    pipe.batch_size = min(64, num)
    t2i_key = repr(sorted(t2i.items()))
    if t2i_key in t2i_done:     # a candidates setting of a sampler already measured: text -> image is the same
      row.update(t2i_done[t2i_key][0])
      drawn = t2i_done[t2i_key][1]
    else:
      drawn = pipe.text_to_image(captions, seed=seed, **t2i)
      passes = pipe.last_forward_passes
      row["t2i_accuracy"] = float(np.mean([shapes.read_image(d) == s for d, s in zip(drawn, sets)]))
      row["t2i_passes_mean"], row["t2i_passes_max"] = float(passes.mean()), int(passes.max())
    written = pipe.image_to_text(images, seed=seed, **i2t)
    passes = pipe.last_forward_passes
    row["i2t_accuracy"] = float(np.mean([shapes.read_caption(w) == s for w, s in zip(written, sets)]))
    row["i2t_passes_mean"], row["i2t_passes_max"] = float(passes.mean()), int(passes.max())
    base = re.sub(r", cache [^,]*", "", name)   # the same setting without its cache
    if "cache" not in t2i:
      uncached[base] = (drawn, written)
    elif base in uncached:
      # The cache's error against the uncached sampler: the share of samples drawn identically (same seed; the
      # method's noise is drawn over the computed positions only, so with temperature or confidence noise > 0 a
      # cached draw differs by its randomness too, and only the accuracy compares).
      row["t2i_same_as_uncached"] = float(np.mean([np.array_equal(a, b) for a, b in zip(drawn, uncached[base][0])]))
      row["i2t_same_as_uncached"] = float(np.mean([a == b for a, b in zip(written, uncached[base][1])]))
    for b in batches:
      pipe.batch_size = b
      if t2i_key not in t2i_done:
        row[f"t2i_s_per_image_b{b}"] = _timed(lambda: pipe.text_to_image(captions[:b], seed=seed, **t2i),
                                              repeats) / b
      row[f"i2t_s_per_caption_b{b}"] = _timed(lambda: pipe.image_to_text(images[:b], seed=seed, **i2t), repeats) / b
    t2i_done.setdefault(t2i_key, ({k: v for k, v in row.items() if k.startswith("t2i_")}, drawn))
    logging.info("%s: t2i %.3f in %.1f passes, i2t %.3f in %.1f passes; %s", name, row["t2i_accuracy"],
                 row["t2i_passes_mean"], row["i2t_accuracy"], row["i2t_passes_mean"],
                 ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row.items() if k.endswith(tuple(f"_b{b}" for b in batches))))
    rows.append(row)
  return rows


def table(rows: list[dict], batches=(1, 64)) -> str:
  """The rows as a markdown table (BENCHMARKS.md)."""
  head = ["sampler", "t2i acc", "t2i passes", "i2t acc", "i2t passes", "same as uncached (t2i / i2t)"]
  head += [f"ms/image b{b}" for b in batches] + [f"ms/caption b{b}" for b in batches]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for r in rows:
    cells = [r["sampler"], f"{r['t2i_accuracy']:.3f}", f"{r['t2i_passes_mean']:.1f} (max {r['t2i_passes_max']})",
             f"{r['i2t_accuracy']:.3f}", f"{r['i2t_passes_mean']:.1f} (max {r['i2t_passes_max']})",
             f"{r['t2i_same_as_uncached']:.3f} / {r['i2t_same_as_uncached']:.3f}" if "t2i_same_as_uncached" in r else ""]
    cells += [f"{r[f't2i_s_per_image_b{b}'] * 1e3:.1f}" for b in batches]
    cells += [f"{r[f'i2t_s_per_caption_b{b}'] * 1e3:.1f}" for b in batches]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
  """Accuracy against forward passes per sample, t2i and i2t, one point per setting without a cache: the
  threshold sweep as a curve, the plain sampler as a star, for image -> text one curve per candidates setting."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  uncached = [r for r in rows if "cache" not in r["t2i"]]
  for ax, task in zip(axes, ("t2i", "i2t")):
    groups = {}   # candidates setting -> its rows
    for r in uncached:
      k = r["i2t"].get("candidates", 1)
      passes = r["i2t"].get("score_passes", 0)
      label = "one caption" if k == 1 else f"{k} candidates, {passes} scoring pass{'es' if passes > 1 else ''}"
      if task == "i2t" or k == 1:
        groups.setdefault(label, []).append(r)
    for (label, group), color in zip(groups.items(), ("C0", "C1", "C2", "C3", "C4", "C5")):
      sweep = [r for r in group if r["t2i"].get("method") == "threshold"]
      ax.plot([r[f"{task}_passes_mean"] for r in sweep], [r[f"{task}_accuracy"] for r in sweep], "o-",
              color=color, label=f"threshold (swept), {label}" if task == "i2t" else "threshold (swept)")
      for r in sweep:
        ax.annotate(f"{r['t2i']['threshold']:g}", (r[f"{task}_passes_mean"], r[f"{task}_accuracy"]), fontsize=7)
      plain = [r for r in group if r["t2i"].get("method") != "threshold"]
      ax.plot([r[f"{task}_passes_mean"] for r in plain], [r[f"{task}_accuracy"] for r in plain], "*",
              markersize=12, color=color, label=f"plain, {label}" if task == "i2t" else "plain")
    ax.set_xlabel("forward passes per sample")
    ax.set_ylabel(f"{task} accuracy")
    ax.set_title({"t2i": "text -> image", "i2t": "image -> text"}[task])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
