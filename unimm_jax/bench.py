"""Speed, measured: ``python -m unimm_jax.bench --config=configs/NAME.py [--what=train,sample,data] [--out=F.json]``.

Any config override works as in ``main`` (``--config.train.batch_size=16``); ``mesh.cpu_devices`` splits the CPU as
in the main job. Prints a table and writes the figures as JSON (``--out``).

``train``: the real training step (``train_state.compile_steps``: the model, per-modality loss and head, AdamW, EMA,
jitted with the config's mesh and shardings, state donated) on random tokens of the config's sizes:

* compile seconds; step time, median and p90 over ``--steps`` timed steps after ``--warmup`` (each synchronised with
  ``block_until_ready``); tokens/s and examples/s;
* model FLOPs per step (:func:`model_flops_per_step`: 6 x non-embedding matmul parameters x tokens + attention
  12 x layers x batch x length^2 x d_model) and MFU against the chip's peak: on CPU a float32 matmul rate measured in
  this process on the same devices (:func:`measured_matmul_peak`), on GPU/TPU a nominal dense bf16 peak per device
  kind (:data:`NOMINAL_PEAKS`) with the measured bf16 rate beside it;
* peak memory: ``device.memory_stats()`` where the backend has it, process peak RSS on CPU.

``sample``: images/s of ``Pipeline.text_to_image`` at 16 and 32 steps and batch 1, 8 and 64 (``--sample_batches``),
and one sampler step's time against one forward pass of the same batch. With ``--workdir`` the trained pipeline;
without, the config's network with random weights (the timing does not depend on them).

``data``: batches/s of the grain input pipeline alone (read, tokenize, batch) against the batches/s the train step
consumes, for configs whose data source is readable here (``configs/shapes.py``).

``scaling``: train-step time as the sequence doubles (320 -> 640 -> 1280 tokens) and as layers double (4 -> 8 ->
16), beside the ratio the FLOPs formula predicts.

``compile`` (``--layers=4,8,16,32``): seconds to lower and compile the train step on one device at each depth,
unrolled and with ``model.scan_layers``. ``checkpoint``: the step's time with a checkpoint saved every 20 steps,
asynchronously and synchronously, against no saves.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from unimm_jax.data import shapes
from unimm_jax.models import params as params_lib


def _median_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())                    # warm-up: compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _one_device_step(config, **model_overrides):
  """(config, method, mesh, abstract state, jitted train step) on one device, the layout from the config's sizes.

  A word tokenizer's vocabulary is taken as ``text.max_vocab`` or 64 words (timing does not depend on it).
  """
  from unimm_jax import dry_run, sharding, train_state  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  for name, value in model_overrides.items():
    c.model[name] = value
  if c.text.tokenizer == "word" and not c.text.max_vocab:
    c.text.max_vocab = 64
  method = train_state.make_step_inputs(c, dry_run.planned_layout(c))
  mesh, rules = sharding.single_device_mesh(), sharding.rules_of(c)
  abstract, shardings = train_state.state_shardings(method, mesh, rules)
  step_fn, _ = train_state.compile_steps(method, mesh, rules, shardings)
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
  from unimm_jax import checkpointing, sharding, train_state  # pylint: disable=g-import-not-at-top
  c, method, mesh, _, step_fn = _one_device_step(config)
  state = train_state.init_state(method, 0, mesh, sharding.rules_of(c))
  lay = method.layout
  rng = np.random.default_rng(0)
  batches = [sharding.global_array(lay.random_tokens(rng, c.train.batch_size), sharding.batch_sharding(mesh))
             for _ in range(4)]
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


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and peaks
# ---------------------------------------------------------------------------------------------------------------
# Nominal dense bf16 peaks, FLOP/s per device, by a substring of ``device.device_kind`` (first match wins).
NOMINAL_PEAKS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
    ("v6 lite", 918e12), ("v6e", 918e12), ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v4", 275e12),
)


IMPORT_SIZES = dict(d_model=2048, layers=16, heads=16, mlp=5632)   # 1,339,164,672 parameters with LLaDA's vocabulary


def bench_import(param_dtype: str = "float32", directory=None) -> dict:
  """The streaming import (``python -m unimm_jax.convert import``) of a synthetic 1.34B-parameter LLaDA-layout
  checkpoint (bfloat16, :mod:`unimm_jax.convert.synthetic`): wall time and the import process's peak RSS against
  the model's size in ``param_dtype`` plus its largest tensor."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from unimm_jax.convert import synthetic  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    cfg = synthetic.synthetic_config(IMPORT_SIZES["d_model"], IMPORT_SIZES["layers"], IMPORT_SIZES["heads"],
                                     IMPORT_SIZES["mlp"])
    written = synthetic.write_synthetic(f"{tmp}/hf", cfg)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "unimm_jax.convert", "import", "--format=llada", f"--src={tmp}/hf",
                          f"--out={tmp}/bundle", "--seq_len=64", f"--param_dtype={param_dtype}"],
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    wall = time.perf_counter() - start
    if run.returncode:
      raise RuntimeError(f"the import failed: {run.stderr[-2000:]}")
  itemsize = np.dtype(param_dtype if param_dtype == "float32" else jnp.bfloat16).itemsize
  model_bytes = written["params"] * itemsize
  largest = written["largest_tensor_bytes"] // 2 * itemsize     # the same tensor in the target dtype
  # The import process's own peak (VmHWM, which it prints): getrusage(RUSAGE_CHILDREN) would count this
  # process's pages too, which the child had until it exec'd.
  match = re.search(r"peak RSS [0-9.]+ GiB \(([0-9]+) bytes\)", run.stdout)
  if not match:
    raise RuntimeError(f"the import did not report its peak memory: {run.stdout[-500:]}")
  peak = int(match.group(1))
  return {"params": written["params"], "upstream_bytes": written["bytes"], "param_dtype": param_dtype,
          "model_bytes": model_bytes, "largest_tensor_bytes": largest, "import_s": wall,
          "peak_rss_bytes": peak, "bound_bytes": model_bytes + largest, "within_bound": peak < model_bytes + largest,
          "write_synthetic_s": written["write_s"]}


def nominal_peak(device_kind: str) -> float | None:
  """The nominal dense bf16 FLOP/s of one device of this kind, or None (CPU, unknown chips)."""
  for name, peak in NOMINAL_PEAKS:
    if name.lower() in device_kind.lower():
      return peak
  return None


def matmul_param_count(params) -> int:
  """Parameters that multiply activations: every ``kernel`` (attention, MLP, output head); no embeddings or norms."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if getattr(path[-1], "key", None) == "kernel":
      total += int(np.prod(leaf.shape))
  return total


def model_flops_per_step(params, model_config, batch: int, seq_len: int) -> float:
  """Model FLOPs of one training step (forward + backward), the one formula the bench and its test use.

  6 x (non-embedding matmul parameters, the output head at every position included) x tokens, plus attention's
  score and value matmuls, 12 x layers x batch x length^2 x d_model (bidirectional: no causal halving). As in
  MaxText's MFU, work the step skips (the head's columns of the other modality) still counts: skipping it is speed.
  """
  tokens = batch * seq_len
  attention = 12.0 * model_config.num_layers * batch * seq_len ** 2 * model_config.num_heads * model_config.head_dim
  return 6.0 * matmul_param_count(params) * tokens + attention


def step_model_flops(method, network, batch: int) -> float:
  """:func:`model_flops_per_step` of the step ``method`` compiles: with ``data.kind_rows`` (``method.row_groups``)
  each group's rows over its own positions only, which is all that step computes; else the whole layout."""
  if not method.row_groups:
    return model_flops_per_step(network, method.model.config, batch, method.layout.seq_len)
  period = sum(rows for _, rows, _ in method.row_groups)
  return sum(model_flops_per_step(network, method.model.config, batch // period * rows, len(cols))
             for _, rows, cols in method.row_groups)


def measured_matmul_peak(devices, repeats: int = 7) -> dict:
  """The matmul rate these devices reach together, measured now: {'flops_per_s', 'how'}.

  One 2048^3 float32 matmul per device on CPU (8192^3 bfloat16 on accelerators), the devices working at once
  (a batch of matmuls split over them), median of ``repeats`` timed calls after warm-up. On a CPU split into
  single-threaded devices (``mesh.cpu_devices``) this is the rate the split can reach, the fair peak for it.
  """
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  cpu = devices[0].platform == "cpu"
  n, dtype = (2048, jnp.float32) if cpu else (8192, jnp.bfloat16)
  mesh = Mesh(np.asarray(devices), ("d",))
  sharding = NamedSharding(mesh, P("d"))
  make = jax.jit(lambda key: jax.random.normal(key, (len(devices), n, n), dtype), out_shardings=sharding)
  a, b = make(jax.random.PRNGKey(1)), make(jax.random.PRNGKey(2))
  matmul = jax.jit(lambda a, b: jnp.einsum("dij,djk->dik", a, b), out_shardings=sharding)
  seconds = _median_seconds(lambda: matmul(a, b), repeats)
  flops = 2.0 * n ** 3 * len(devices) / seconds
  return {"flops_per_s": flops,
          "how": f"{len(devices)} x {n}^3 {jnp.dtype(dtype).name} matmul at once, median of {repeats}"}


def peak_memory_bytes(devices) -> dict:
  """{'device_peak_bytes': max over devices (None where not reported), 'process_peak_rss_bytes'}."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except  (backends without memory stats raise various errors)
      stats = {}
    if "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB
  return {"device_peak_bytes": max(peaks) if peaks else None, "process_peak_rss_bytes": int(rss)}


def _percentile(values, q: float) -> float:
  return float(np.percentile(np.asarray(values), q))


# ---------------------------------------------------------------------------------------------------------------
# Train step
# ---------------------------------------------------------------------------------------------------------------
def _random_tokens(layout, batch: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return layout.random_tokens(rng, batch)


def _train_setup(config):
  """(config, method, mesh, rules, abstract state, shardings) on the config's mesh, layout from its sizes."""
  from unimm_jax import dry_run, sharding, train_state  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  if c.text.tokenizer == "word" and not c.text.max_vocab:
    c.text.max_vocab = 64
  method = train_state.make_step_inputs(c, dry_run.planned_layout(c))
  mesh, rules = sharding.make_mesh(c.mesh.shape), sharding.rules_of(c)
  abstract, shardings = train_state.state_shardings(method, mesh, rules)
  return c, method, mesh, rules, abstract, shardings


def bench_train(config, steps: int = 10, warmup: int = 3, peak: dict | None = None) -> dict:
  """The train step's compile time, step times, throughput, model FLOPs, MFU and peak memory."""
  from unimm_jax import sharding, train_state  # pylint: disable=g-import-not-at-top
  c, method, mesh, rules, abstract, shardings = _train_setup(config)
  layout, batch = method.layout, c.train.batch_size
  step_fn, _ = train_state.compile_steps(method, mesh, rules, shardings)
  batches = [sharding.global_array(_random_tokens(layout, batch, i), sharding.batch_sharding(mesh)) for i in range(2)]
  start = time.perf_counter()
  compiled = step_fn.lower(abstract, {"tokens": batches[0]}).compile()
  compile_s = time.perf_counter() - start
  state = train_state.init_state(method, 0, mesh, rules)
  for i in range(warmup):
    state, metrics = compiled(state, {"tokens": batches[i % 2]})
  jax.block_until_ready(metrics)
  times = []
  for i in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, {"tokens": batches[i % 2]})
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  network = abstract.network_params(abstract.params)   # a LoRA run's base with its adapters
  flops = step_model_flops(method, network, batch)
  devices = list(mesh.devices.flat)
  peak = peak or measured_matmul_peak(devices)
  nominal = nominal_peak(devices[0].device_kind)
  achieved = flops / median
  out = {
      "batch": batch, "seq_len": layout.seq_len, "devices": len(devices), "mesh": dict(mesh.shape),
      "params": params_lib.param_count(network), "matmul_params": matmul_param_count(network),
      "compile_s": compile_s, "step_s_median": median, "step_s_p90": _percentile(times, 90), "steps_timed": steps,
      "tokens_per_s": batch * layout.seq_len / median, "examples_per_s": batch / median,
      "model_flops_per_step": flops, "achieved_flops_per_s": achieved,
      "measured_peak_flops_per_s": peak["flops_per_s"], "measured_peak_how": peak["how"],
      "mfu_vs_measured": achieved / peak["flops_per_s"],
      "nominal_peak_flops_per_s": nominal, "mfu_vs_nominal": achieved / nominal if nominal else None,
      "loss": float(metrics["loss"]),
      **peak_memory_bytes(devices),
  }
  logging.info("train step: %.1f ms median, %.1f ms p90, %.0f tokens/s, MFU %.3f (measured peak %.1f GFLOP/s)",
               1e3 * median, 1e3 * out["step_s_p90"], out["tokens_per_s"], out["mfu_vs_measured"],
               peak["flops_per_s"] / 1e9)
  return out


def bench_scaling(config, steps: int = 3) -> dict:
  """Step time as the sequence doubles and as layers double, beside what the FLOPs formula predicts.

  Sequences: (text, image grid) = (64, 16x16) -> (64, 24x24) -> (256, 32x32), i.e. 320 -> 640 -> 1280 tokens at the
  config's depth; depths 4 -> 8 -> 16 at 320 tokens. ``predicted`` is the FLOPs ratio to the first row.
  """
  rows = {"sequence": [], "layers": []}
  peak = measured_matmul_peak(list(jax.devices()))

  def run(kind, mutate):
    c = config.copy_and_resolve_references()
    mutate(c)
    r = bench_train(c, steps=steps, warmup=1, peak=peak)
    rows[kind].append({"seq_len": r["seq_len"], "layers": c.model.num_layers, "step_s": r["step_s_median"],
                       "model_flops": r["model_flops_per_step"], "mfu": r["mfu_vs_measured"]})

  for text_len, grid in ((64, 16), (64, 24), (256, 32)):
    def seq(c, text_len=text_len, grid=grid):
      c.text.max_len, c.image.size = text_len, grid * c.image.patch
      c.model.max_len = max(c.model.max_len, text_len + grid * grid)
    run("sequence", seq)
  for depth in (4, 8, 16):
    def deep(c, depth=depth):
      c.text.max_len, c.image.size, c.model.num_layers = 64, 16 * c.image.patch, depth
      c.model.max_len = max(c.model.max_len, 320)
    run("layers", deep)
  for table in rows.values():
    for r in table:
      r["measured_ratio"] = r["step_s"] / table[0]["step_s"]
      r["predicted_ratio"] = r["model_flops"] / table[0]["model_flops"]
  return rows


# ---------------------------------------------------------------------------------------------------------------
# Sampler and data
# ---------------------------------------------------------------------------------------------------------------
def random_pipeline(config):
  """A Pipeline of the config's network with random weights, and tokenizers of its sizes (for timing only).

  Text is the config's byte or word tokenizer (a word vocabulary from the shapes captions); the image tokenizer
  is a patch codebook of random distinct patches, as large as ``image.codebook_size``.
  """
  from unimm_jax import pipeline as pipeline_lib, tokenizers, train_state  # pylint: disable=g-import-not-at-top
  from unimm_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  c = config
  if c.text.tokenizer == "byte":
    text = tokenizers.ByteTokenizer()
  else:
    text = tokenizers.WordTokenizer.fit([shapes.sample_example("train", 0, i)[2] for i in range(500)])
  rng = np.random.default_rng(0)
  dim = c.image.patch ** 2 * c.image.channels
  codebook = np.unique(rng.integers(0, c.image.levels, (c.image.codebook_size + 64, dim), dtype=np.uint8), axis=0)
  image = tokenizers.PatchTokenizer(c.image.size, c.image.channels, c.image.levels, c.image.patch,
                                    codebook[:c.image.codebook_size])
  toks = input_pipeline.Tokenizers(text, image, c.text.max_len, id_align=c.sequence.id_align)
  method = train_state.make_step_inputs(c, toks.layout)
  state = train_state.init_state(method, 0)
  params = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.PRNGKey(3), x.shape, x.dtype),
                        state.params)   # the head starts at zero: give the sampler non-uniform logits
  return pipeline_lib.Pipeline(c, params, toks)


def bench_sample(pipe, batch: int, steps_list=(16, 32), repeats: int = 5) -> dict:
  """Images/s of text_to_image at each step count, and one sampler step against one forward pass."""
  prompts = [shapes.sample_example("val", 0, i)[2] for i in range(batch)]
  pipe.batch_size = batch
  tokens = jnp.zeros((batch, pipe.layout.seq_len), jnp.int32) + pipe.layout.mask_id
  forward = jax.jit(lambda p, t: pipe.model.apply({"params": p}, t))
  fwd_s = _median_seconds(lambda: forward(pipe.params, tokens), repeats)
  out = {"batch": batch, "forward_s": fwd_s, "text_to_image": {}}
  for steps in steps_list:
    sec = _median_seconds(lambda: pipe.text_to_image(prompts, steps=steps, seed=0), repeats)
    out["text_to_image"][str(steps)] = {
        "seconds": sec, "images_per_s": batch / sec, "step_over_forward": sec / (steps * fwd_s)}
    logging.info("text_to_image, %d steps, batch %d: %.3f s, %.1f images/s, a step is %.3fx a forward pass",
                 steps, batch, sec, batch / sec, sec / (steps * fwd_s))
  return out


def bench_data(config, batches: int = 50, train_step_s: float | None = None) -> dict:
  """Batches/s of the grain pipeline alone (read, tokenize, batch), against the train step's consumption."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from unimm_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  source = input_pipeline.make_source(config, "train")
  toks = input_pipeline.fit_or_load_tokenizers(config, tempfile.mkdtemp(), source)
  dataset = input_pipeline.train_dataset(source, toks, batch_size=config.train.batch_size, seed=config.seed)
  it = input_pipeline.train_iterator(dataset, config.data.num_threads)
  next(it)                                                     # start the threads
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  per_s = batches / (time.perf_counter() - start)
  out = {"batches_per_s": per_s, "batch_size": config.train.batch_size, "num_threads": config.data.num_threads}
  if train_step_s:
    out["train_steps_per_s"] = 1.0 / train_step_s
    out["headroom"] = per_s * train_step_s
  logging.info("data: %.1f batches/s%s", per_s,
               f", {out['headroom']:.1f}x what the train step consumes" if train_step_s else "")
  return out


def _table(result: dict) -> str:
  lines = []
  t = result.get("train")
  if t:
    lines += ["train step", f"  batch {t['batch']} x {t['seq_len']} tokens on {t['devices']} device(s) {t['mesh']}",
              f"  compile {t['compile_s']:.1f} s; step {1e3 * t['step_s_median']:.1f} ms median, "
              f"{1e3 * t['step_s_p90']:.1f} ms p90 ({t['steps_timed']} steps)",
              f"  {t['tokens_per_s']:,.0f} tokens/s, {t['examples_per_s']:.2f} examples/s",
              f"  model FLOPs/step {t['model_flops_per_step']:.3e}; achieved {t['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s",
              f"  MFU {t['mfu_vs_measured']:.3f} vs measured peak {t['measured_peak_flops_per_s'] / 1e9:.1f} GFLOP/s"
              + (f"; {t['mfu_vs_nominal']:.3f} vs nominal {t['nominal_peak_flops_per_s'] / 1e12:.0f} TFLOP/s"
                 if t["mfu_vs_nominal"] else "")]
    mem = t["device_peak_bytes"] or t["process_peak_rss_bytes"]
    lines.append(f"  peak memory {mem / 2**30:.2f} GiB ({'device' if t['device_peak_bytes'] else 'process RSS'})")
  for r in result.get("sample", []):
    for steps, v in r["text_to_image"].items():
      lines.append(f"sample: batch {r['batch']}, {steps} steps: {v['images_per_s']:.2f} images/s, "
                   f"a step {v['step_over_forward']:.3f}x a forward pass ({1e3 * r['forward_s']:.1f} ms)")
  if "data" in result:
    d = result["data"]
    lines.append(f"data: {d['batches_per_s']:.1f} batches/s" +
                 (f" ({d['headroom']:.1f}x the train step's {d['train_steps_per_s']:.2f} steps/s)" if "headroom" in d else ""))
  for kind, rows in (result.get("scaling") or {}).items():
    lines.append(f"scaling by {kind}: " + "; ".join(
        f"{r['seq_len']} tok x {r['layers']} layers {r['step_s']:.2f} s ({r['measured_ratio']:.2f}x, "
        f"FLOPs {r['predicted_ratio']:.2f}x)" for r in rows))
  if "ab" in result:
    a = result["ab"]
    lines.append(f"A/B against {a['against']}: this {1e3 * a['this_step_s']:.1f} ms, other {1e3 * a['other_step_s']:.1f} ms "
                 f"per step; ratio this/other {a['ratio_median']:.3f} median of {a['rounds']} rounds "
                 f"({a['ratio_min']:.3f}-{a['ratio_max']:.3f})")
  if "import" in result:
    i = result["import"]
    lines.append(f"import: {i['params']:,} parameters ({i['upstream_bytes'] / 2**30:.2f} GiB bfloat16) to "
                 f"{i['param_dtype']} in {i['import_s']:.1f} s; peak RSS {i['peak_rss_bytes'] / 2**30:.2f} GiB against "
                 f"model {i['model_bytes'] / 2**30:.2f} GiB + largest tensor {i['largest_tensor_bytes'] / 2**30:.2f} "
                 f"GiB = {i['bound_bytes'] / 2**30:.2f} GiB ({'within' if i['within_bound'] else 'OVER'})")
  return "\n".join(lines)


def _cli():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file("config", None, "A config file; overrides as in main.")
  workdir = flags.DEFINE_string("workdir", None, "sample: a trained workdir (else random weights of --config).")
  what = flags.DEFINE_list("what", ["train"], "train, sample, data, scaling, compile, checkpoint, ab, import.")
  against = flags.DEFINE_string("against", None, "ab: another checkout (e.g. a git worktree at an older commit) "
                                "whose train step is timed against this one's, alternating in one process.")
  rounds = flags.DEFINE_integer("rounds", 10, "ab: alternating rounds of --steps_per_round steps each.")
  steps_per_round = flags.DEFINE_integer("steps_per_round", 5, "ab: steps per side and round.")
  steps = flags.DEFINE_integer("steps", 10, "train: timed steps (after --warmup).")
  warmup = flags.DEFINE_integer(
      "warmup", 3, "train: untimed steps first (XLA:CPU's host heap grows over the first 2-3 steps).")
  layers = flags.DEFINE_list("layers", ["4", "8", "16", "32"], "compile: depths to time.")
  sample_batches = flags.DEFINE_list("sample_batches", ["1", "8", "64"], "sample: batch sizes.")
  repeats = flags.DEFINE_integer("repeats", 5, "sample: timed repeats (median).")
  out_path = flags.DEFINE_string("out", None, "Write the figures as JSON here.")
  import_dtype = flags.DEFINE_enum("import_dtype", "float32", ["float32", "bfloat16"], "import: parameter dtype.")
  sample_num = flags.DEFINE_integer("sample_num", 256, "sample, a shapes workdir: val examples each sampler setting "
                                    "is scored on (bench_samplers).")
  thresholds = flags.DEFINE_list("thresholds", ["0.5", "0.7", "0.8", "0.9", "0.95", "0.99"],
                                 "sample, a shapes workdir: the thresholds of confidence-threshold decoding.")
  caches = flags.DEFINE_list("caches", None, "sample, a shapes workdir: cache settings, each none | exact | dual | "
                             "dual/N (default: none and exact for a model.isolate_given run, else none, dual, dual/4).")
  candidates = flags.DEFINE_list("candidates", None, "sample, a shapes workdir: caption-candidates settings, each K "
                                  "or K/s (K captions per image scored with s passes; default: 1 and the run's own).")
  plot = flags.DEFINE_string("plot", None, "sample, a shapes workdir: the accuracy-speed curve as a PNG here.")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    from unimm_jax import configuration  # pylint: disable=g-import-not-at-top
    cfg = config.value
    if cfg is None and not (workdir.value and set(what.value) <= {"sample"}) and set(what.value) != {"import"}:
      raise app.UsageError("--config=FILE is needed (only --what=sample with --workdir can do without)")
    if cfg is not None:
      configuration.validate(cfg)
      configuration.prepare_host(cfg)   # before JAX starts its backend, as main does
    unknown = set(what.value) - {"train", "sample", "data", "scaling", "compile", "checkpoint", "ab", "import"}
    if unknown:
      raise app.UsageError(f"unknown --what: {sorted(unknown)}")
    result = {"device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "devices": jax.device_count(), "cpu": _cpu_name(), "jax": jax.__version__,
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "date": time.strftime("%Y-%m-%d")}
    if "train" in what.value:
      result["train"] = bench_train(cfg, steps.value, warmup.value)
    if "sample" in what.value:
      from unimm_jax.pipeline import Pipeline  # pylint: disable=g-import-not-at-top
      pipe = Pipeline.load(workdir.value) if workdir.value else random_pipeline(cfg)
      if workdir.value and pipe.config.data.source == "shapes":
        # A trained shapes model (captions and images in [text | image], or among other segments as in
        # configs/shapes_unified.py): every sampler setting with its accuracy, passes and wall time.
        from unimm_jax import bench_samplers  # pylint: disable=g-import-not-at-top
        batches = tuple(int(b) for b in sample_batches.value)
        rows = bench_samplers.bench_samplers(pipe, sample_num.value, batches, repeats.value,
                                             tuple(float(t) for t in thresholds.value),
                                             caches=None if caches.value is None else tuple(caches.value),
                                             candidates=None if candidates.value is None else tuple(candidates.value))
        result["samplers"] = rows
        print(bench_samplers.table(rows, batches))
        if plot.value:
          bench_samplers.plot(rows, plot.value)
      else:
        result["sample"] = [bench_sample(pipe, int(b), repeats=repeats.value) for b in sample_batches.value]
    if "data" in what.value:
      step_s = result["train"]["step_s_median"] if "train" in result else None
      result["data"] = bench_data(cfg, train_step_s=step_s)
    if "scaling" in what.value:
      result["scaling"] = bench_scaling(cfg)
    if "compile" in what.value:
      result["compile"] = bench_compile(cfg, tuple(int(n) for n in layers.value))
    if "checkpoint" in what.value:
      result["checkpoint"] = bench_checkpoint(cfg)
    if "import" in what.value:
      result["import"] = bench_import(import_dtype.value)
    if "ab" in what.value:
      if not against.value:
        raise app.UsageError("--what=ab needs --against=DIR, a checkout to time against")
      from unimm_jax import bench_ab  # pylint: disable=g-import-not-at-top
      result["ab"] = bench_ab.bench_ab(cfg, against.value, rounds.value, steps_per_round.value, warmup.value)
    print(_table(result))
    text = json.dumps(result, indent=2, default=float)
    if out_path.value:
      with open(out_path.value, "w") as f:
        f.write(text)
    else:
      print(text)

  app.run(main)


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
  except OSError:
    pass
  return platform.processor() or platform.machine()


if __name__ == "__main__":
  _cli()
