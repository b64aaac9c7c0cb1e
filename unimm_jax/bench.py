"""Speed measurements: ``python -m unimm_jax.bench --workdir=DIR [--what=sample] [--out=bench.json]``.

``sample``: images per second of ``Pipeline.text_to_image`` at 16 and 32 steps (batch ``--batch``), and the ratio
of its time to ``steps x`` one forward pass of the same batch: the cost of the sampling loop beyond the network
(drawing tokens, ranking confidences, bookkeeping). Each figure is the median of ``--repeats`` timed calls after a
warm-up call, every call synchronised on its result.
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


def _cli():
  workdir = flags.DEFINE_string("workdir", None, "A training workdir to load.")
  what = flags.DEFINE_list("what", ["sample"], "What to measure: sample.")
  batch = flags.DEFINE_integer("batch", 64, "Batch of the sampler measurement.")
  repeats = flags.DEFINE_integer("repeats", 5, "Timed repeats (median).")
  out_path = flags.DEFINE_string("out", None, "Write the figures as JSON here.")
  flags.mark_flags_as_required(["workdir"])

  def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    from unimm_jax.pipeline import Pipeline  # pylint: disable=g-import-not-at-top
    result = {"device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "cpu": platform.processor() or platform.machine(), "jax": jax.__version__}
    if "sample" in what.value:
      result["sample"] = bench_sample(Pipeline.load(workdir.value), batch.value, repeats=repeats.value)
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if out_path.value:
      with open(out_path.value, "w") as f:
        f.write(text)

  app.run(main)


if __name__ == "__main__":
  _cli()
