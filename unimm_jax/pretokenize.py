"""Pre-tokenize a source: ``python -m unimm_jax.pretokenize --config=configs/X.py --out=DIR [--workers=N]``.

Turns the config's image-caption source (shapes, folder, tfds) into ArrayRecord shards of image token ids plus
captions (``unimm_jax/data/pretokenized.py`` has the layout), so that training reads tokens and never decodes or
encodes an image::

    python -m unimm_jax.main --config=configs/X.py --workdir=RUN \\
        --config.data.source=pretokenized --config.data.path=DIR

* Image tokenizer: the one the config names (``image.tokenizer``): fitted on the train split (patch), built
  (pixel) or loaded from ``image.tokenizer_path`` (fsq, vq); saved in ``DIR/tokenizers/`` and reused on resume.
* Parallel: shards are written by a pool of ``--workers`` processes on the host CPU (each opens the source and
  the tokenizer itself), one shard per task; a process pool rather than threads because image decoding and
  encoding hold the GIL for much of their time. ``--workers=1`` writes in this process on JAX's default device:
  the choice for a large learned tokenizer on an accelerator host (the 256x256 COCO tokenizer).
* Resumable: a shard is written to a temporary name and renamed when complete, so the shards that exist are
  finished and are skipped when the command runs again (after a crash or a preemption). ``DIR/plan.json`` records
  the source, the tokenizer and the shard size; running again with other settings is an error naming them.
* Progress: one line per finished shard with examples/s and an ETA. ``DIR/pretokenized.json`` is written last.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import sys
import time

import numpy as np
from absl import app, flags, logging
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from ml_collections import config_flags

from unimm_jax import configuration, tokenizers
from unimm_jax.data import input_pipeline, pretokenized

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Directory for the shards (new, or an unfinished one to resume).")
_WORKERS = flags.DEFINE_integer("workers", 0, "Processes writing shards (0: one per CPU core; 1: in this process).")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 10_000, "Examples per shard.")
_SPLITS = flags.DEFINE_list("splits", ["train", "val"], "Splits to write.")
flags.mark_flags_as_required(["config", "out"])

# Per worker process: (config, source per split, image tokenizer), built once by _init_worker.
_WORKER: dict = {}


def _init_worker(config_dict: dict, out: str) -> None:
  _WORKER.update(config=configuration.from_dict(config_dict), sources={},
                 tokenizer=tokenizers.load_image_tokenizer(epath.Path(out) / pretokenized.TOKENIZER_DIR))


def write_shard(out: str, split: str, index: int, count: int, start: int, stop: int) -> tuple[str, int, float]:
  """Encodes examples [start, stop) of ``split`` into shard ``index`` of ``count``; returns (split, n, seconds)."""
  t0 = time.perf_counter()
  sources = _WORKER["sources"]
  if split not in sources:
    sources[split] = input_pipeline.make_source(_WORKER["config"], split)
  source, tok = sources[split], _WORKER["tokenizer"]
  final = epath.Path(out) / pretokenized.shard_name(split, index, count)
  tmp = final.parent / (final.name + f".tmp{os.getpid()}")
  writer = ArrayRecordWriter(str(tmp), "group_size:1")
  chunk = getattr(tok, "encode_batch", 256)
  for lo in range(start, stop, chunk):
    items = [source[i] for i in range(lo, min(lo + chunk, stop))]
    ids = tok.encode(np.stack([it["image"] for it in items]))
    for row, item in zip(ids, items):
      writer.write(pretokenized.encode_record(row, item["text"], tok.vocab_size))
  writer.close()
  tmp.rename(final)
  return split, stop - start, time.perf_counter() - t0


def _plan(config, shard_size: int, splits, sources, tok) -> dict:
  keys = ("source", "path", "seed", "train_size", "val_size", "tfds_name", "tfds_data_dir", "tfds_train_split",
          "tfds_val_split", "image_key", "text_key", "label_key", "caption_templates")
  plan = {"source": {k: config.data[k] for k in keys},
          "image": {"size": config.image.size, "channels": config.image.channels},
          "tokenizer": tok.config_dict(), "shard_size": shard_size, "splits": {}}
  for split in splits:
    n = len(sources[split])
    count = max(1, math.ceil(n / shard_size))
    plan["splits"][split] = {"num_examples": n, "shards": [pretokenized.shard_name(split, i, count) for i in range(count)],
                             "skipped": dict(getattr(sources[split], "skipped", {}))}
  return plan


def pretokenize(config, out, *, workers: int = 1, shard_size: int = 10_000,
                splits=("train", "val")) -> dict:
  """Writes (or finishes) the pretokenized directory ``out``; returns its index (``pretokenized.json``)."""
  configuration.validate(config)
  if config.data.source == "pretokenized":
    raise configuration.ConfigError("config.data.source='pretokenized' is already tokens: pretokenize reads shapes, "
                                    "folder or tfds")
  if shard_size < 1:
    raise ValueError(f"--shard_size={shard_size} must be >= 1")
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  sources = {split: input_pipeline.make_source(config, split) for split in splits}

  # ---- The image tokenizer: made once, reused on resume ----------------------------------------------------
  tok_dir = out / pretokenized.TOKENIZER_DIR
  if (tok_dir / tokenizers.IMAGE_TOKENIZER_FILE).exists():
    tok = tokenizers.load_image_tokenizer(tok_dir)
  else:
    tok = input_pipeline.make_image_tokenizer(config, sources.get("train") or input_pipeline.make_source(config, "train"))
    tok.save(tok_dir)
  configuration.check_tokenizers(config, _AnyText(config.text.tokenizer), tok)

  # ---- Plan: checked against an earlier run's ----------------------------------------------------------------
  plan = _plan(config, shard_size, splits, sources, tok)
  plan_file = out / pretokenized.PLAN_FILE
  if plan_file.exists():
    old = json.loads(plan_file.read_text())
    diff = [k for k in plan if old.get(k) != json.loads(json.dumps(plan[k]))]
    if diff:
      raise ValueError(f"{out} holds shards of another plan (differs in: {', '.join(diff)}); use a new --out, or "
                       "the same config and --shard_size as before")
  else:
    plan_file.write_text(json.dumps(plan, indent=1))

  # ---- Shards: the missing ones, in parallel -----------------------------------------------------------------
  tasks, done_examples = [], 0
  for split, info in plan["splits"].items():
    count = len(info["shards"])
    for i, name in enumerate(info["shards"]):
      start, stop = i * shard_size, min((i + 1) * shard_size, info["num_examples"])
      if (out / name).exists():
        done_examples += stop - start
      else:
        tasks.append((str(out), split, i, count, start, stop))
  total = sum(t[5] - t[4] for t in tasks)
  logging.info("pretokenize %s -> %s: %d shards to write (%s examples), %d already done; %d workers",
               config.data.source, out, len(tasks), f"{total:,}", sum(len(i["shards"]) for i in plan["splits"].values())
               - len(tasks), workers)
  t0, written = time.perf_counter(), 0

  def progress(result, finished):
    nonlocal written
    split, n, seconds = result
    written += n
    rate = written / max(time.perf_counter() - t0, 1e-9)
    logging.info("shard done (%s, %s examples in %.1f s) | %d/%d shards | %s examples/s | ETA %s", split, f"{n:,}",
                 seconds, finished, len(tasks), f"{rate:,.0f}", _eta((total - written) / rate if rate else 0))

  if workers <= 1:
    _WORKER.update(config=config, sources=sources, tokenizer=tok)
    for k, task in enumerate(tasks, 1):
      progress(write_shard(*task), k)
  elif tasks:
    ctx = multiprocessing.get_context("spawn")   # no fork of a process that may hold JAX threads
    # Workers encode on the host CPU: an accelerator belongs to one process. JAX reads this when it is imported,
    # i.e. when a spawned worker imports this module, so it is set before they start and restored after.
    saved = os.environ.get("JAX_PLATFORMS")
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                  initargs=(config.to_dict(), str(out))) as pool:
        futures = [pool.submit(write_shard, *task) for task in tasks]
        for k, future in enumerate(concurrent.futures.as_completed(futures), 1):
          progress(future.result(), k)
    finally:
      if saved is None:
        os.environ.pop("JAX_PLATFORMS", None)
      else:
        os.environ["JAX_PLATFORMS"] = saved

  # ---- Index: written last, so its presence means finished ----------------------------------------------------
  index = {"grid": list(tok.grid_shape), "image_vocab": tok.vocab_size, "shard_size": shard_size,
           "splits": plan["splits"], "source": plan["source"]}
  (out / pretokenized.INDEX_FILE).write_text(json.dumps(index, indent=1))
  logging.info("wrote %s (%s)", out / pretokenized.INDEX_FILE,
               ", ".join(f"{s}: {i['num_examples']:,} examples" for s, i in plan["splits"].items()))
  return index


class _AnyText:
  """A stand-in text tokenizer for check_tokenizers: pretokenize keeps captions as text."""

  def __init__(self, kind):
    self.kind = kind


def _eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 60}m{seconds % 60:02d}s"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  try:
    pretokenize(_CONFIG.value, _OUT.value, workers=_WORKERS.value or os.cpu_count() or 1,
                shard_size=_SHARD_SIZE.value, splits=tuple(_SPLITS.value))
  except (configuration.ConfigError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
