"""Speed measurements: ``python -m unimm_jax.bench [--workdir=DIR] [--config=FILE] [--what=sample,compile]``.

``sample``: images per second of ``Pipeline.text_to_image`` at 16 and 32 steps (batch ``--batch``), and the ratio
of its time to ``steps x`` one forward pass of the same batch: the cost of the sampling loop beyond the network
(drawing tokens, ranking confidences, bookkeeping). Each figure is the median of ``--repeats`` timed calls after a
warm-up call, every call synchronised on its result.

``compile`` (``--config``, ``--layers=4,8,16,32``): seconds to lower and compile the train step on one device at
each depth, with the layers unrolled and with ``model.scan_layers`` (one compiled block, whatever the depth).
A word tokenizer's vocabulary is taken as ``text.max_vocab`` or 64 words (it does not change compile time).

``checkpoint`` (``--config``): the train step's time with a checkpoint saved every 20 steps, asynchronously and
synchronously, against no saves (200 steps each, random tokens, one device): what a save costs the loop.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from unimm_jax.data import shapes


def _median_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())                    # warm-up: compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_sample(pipe, batch: int, steps_list=(16, 32), repeats: int = 5) -> dict:
  """Sampler throughput and its overhead over the forward passes it needs."""
  prompts = [shapes.sample_example("val", 0, i)[2] for i in range(batch)]
  pipe.batch_size = batch
  tokens = jnp.zeros((batch, pipe.layout.seq_len), jnp.int32) + pipe.layout.mask_id
  forward = jax.jit(lambda p, t: pipe.model.apply({"params": p}, t))
  fwd_s = _median_seconds(lambda: forward(pipe.params, tokens), repeats)
  out = {"batch": batch, "forward_s": fwd_s, "text_to_image": {}}
  for steps in steps_list:
    sec = _median_seconds(lambda: pipe.text_to_image(prompts, steps=steps, seed=0), repeats)
    out["text_to_image"][str(steps)] = {
        "seconds": sec, "images_per_s": batch / sec, "loop_over_forwards": sec / (steps * fwd_s)}
    logging.info("text_to_image, %d steps, batch %d: %.3f s, %.1f images/s, %.3fx of %d forward passes", steps,
                 batch, sec, batch / sec, sec / (steps * fwd_s), steps)
  return out


def _one_device_step(config, **model_overrides):
  """(config, method, mesh, abstract state, jitted train step) on one device, the layout from the config's sizes.

  A word tokenizer's vocabulary is taken as ``text.max_vocab`` or 64 words (timing does not depend on it).
  """
  from unimm_jax import dry_run, sharding, train  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  for name, value in model_overrides.items():
    c.model[name] = value
  if c.text.tokenizer == "word" and not c.text.max_vocab:
    c.text.max_vocab = 64
  method = train.make_method(c, dry_run.planned_layout(c))
  mesh, rules = sharding.single_device_mesh(), sharding.rules_of(c)
  abstract, shardings = train.state_shardings(method, mesh, rules)
  step_fn, _ = train.compile_steps(method, mesh, rules, shardings)
  return c, method, mesh, abstract, step_fn


def bench_compile(config, layers=(4, 8, 16, 32)) -> dict:
  """{'unrolled'|'scan': {layers: seconds}}: lower + compile of the jitted train step, nothing executed."""
  out = {"unrolled": {}, "scan": {}}
  for scan in (False, True):
    for n in layers:
      c, method, _, abstract, step_fn = _one_device_step(config, num_layers=n, scan_layers=scan)
      batch = {"tokens": jax.ShapeDtypeStruct((c.train.batch_size, method.layout.seq_len), jnp.int32)}
      start = time.perf_counter()
      step_fn.lower(abstract, batch).compile()
      sec = time.perf_counter() - start
      out["scan" if scan else "unrolled"][str(n)] = sec
      logging.info("compile train step: %d layers, %s: %.2f s", n, "scan" if scan else "unrolled", sec)
  return out


def bench_checkpoint(config, steps: int = 200, every: int = 20) -> dict:
  """{'no_save'|'async'|'sync': {'mean_ms', 'median_ms' (steps without a save), 'save_step_ms'}}."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from unimm_jax import checkpointing, sharding, train  # pylint: disable=g-import-not-at-top
  c, method, mesh, _, step_fn = _one_device_step(config)
  state = train.init_state(method, 0, mesh, sharding.rules_of(c))
  lay = method.layout
  rng = np.random.default_rng(0)
  batches = [sharding.global_array(lay.pack(rng.integers(0, lay.text_vocab, (c.train.batch_size, lay.text_len)),
                                            rng.integers(0, lay.image_vocab, (c.train.batch_size, lay.image_len))
                                            ).astype(np.int32), sharding.batch_sharding(mesh)) for _ in range(4)]
  for i in range(5):
    state, metrics = step_fn(state, {"tokens": batches[i % 4]})
  jax.block_until_ready(metrics)
  out = {}
  for mode in ("no_save", "async", "sync"):
    ckpt = checkpointing.Checkpointer(tempfile.mkdtemp(), every_steps=every, max_to_keep=2, async_save=mode == "async")
    times = []
    for i in range(steps):
      start = time.perf_counter()
      state, metrics = step_fn(state, {"tokens": batches[i % 4]})
      if mode != "no_save" and (i + 1) % every == 0:
        ckpt.save(i + 1, state, force=True)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    ckpt.close()
    saves = [t for i, t in enumerate(times) if (i + 1) % every == 0]
    others = [t for i, t in enumerate(times) if (i + 1) % every]
    out[mode] = {"mean_ms": 1e3 * statistics.mean(times), "median_ms": 1e3 * statistics.median(others),
                 "save_step_ms": 1e3 * statistics.median(saves)}
    logging.info("checkpoint every %d steps, %s: mean step %.1f ms, median %.1f ms, steps with a save %.1f ms",
                 every, mode, *out[mode].values())
  return out


def _cli():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  workdir = flags.DEFINE_string("workdir", None, "A training workdir to load (sample).")
  config = config_flags.DEFINE_config_file("config", None, "A config file (compile).")
  layers = flags.DEFINE_list("layers", ["4", "8", "16", "32"], "compile: depths to time.")
  what = flags.DEFINE_list("what", ["sample"], "What to measure: sample, compile, checkpoint.")
  batch = flags.DEFINE_integer("batch", 64, "Batch of the sampler measurement.")
  repeats = flags.DEFINE_integer("repeats", 5, "Timed repeats (median).")
  out_path = flags.DEFINE_string("out", None, "Write the figures as JSON here.")

  def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    from unimm_jax.pipeline import Pipeline  # pylint: disable=g-import-not-at-top
    result = {"device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "cpu": platform.processor() or platform.machine(), "jax": jax.__version__}
    if "compile" in what.value:
      if config.value is None:
        raise app.UsageError("--what=compile needs --config=FILE")
      result["compile"] = bench_compile(config.value, tuple(int(n) for n in layers.value))
    if "checkpoint" in what.value:
      if config.value is None:
        raise app.UsageError("--what=checkpoint needs --config=FILE")
      result["checkpoint"] = bench_checkpoint(config.value)
    if "sample" in what.value:
      if workdir.value is None:
        raise app.UsageError("--what=sample needs --workdir=DIR")
      result["sample"] = bench_sample(Pipeline.load(workdir.value), batch.value, repeats=repeats.value)
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if out_path.value:
      with open(out_path.value, "w") as f:
        f.write(text)

  app.run(main)


if __name__ == "__main__":
  _cli()
