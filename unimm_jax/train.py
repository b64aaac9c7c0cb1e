"""Training: the loop (big_vision style banner sections; the train state and its update step are
:mod:`unimm_jax.train_state`, what validation measures is :mod:`unimm_jax.validation`).

``train_and_evaluate(config, workdir)`` is the whole main job: fit or load tokenizers, build the model, restore
the newest checkpoint or initialise, train with a progress line and TensorBoard events, validate the ELBO per
modality, checkpoint, and write ``WORKDIR/report.json``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from unimm_jax import checkpointing, configuration, init_from, storage, train_loop, train_state, validation
from unimm_jax import sharding as sharding_lib
from unimm_jax.data import input_pipeline
from unimm_jax.models import params as params_lib


# ---------------------------------------------------------------------------------------------------------------
# The main job
# ---------------------------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir) -> dict[str, Any]:
  """Trains (resuming from the newest checkpoint in ``workdir`` if any), validates, writes the report.

  Returns the report (also written to ``WORKDIR/report.json``), plus ``'history'``: the per-step training
  losses of this invocation (for tests of exact resume).
  """
  # ---- Config and workdir ------------------------------------------------------------------------------------
  configuration.validate(config)
  if config.init["from"]:   # saved absolute in config.json: a LoRA workdir's readers find its base from anywhere
    config = config.copy_and_resolve_references()
    config.init["from"] = str(storage.absolute_path(config.init["from"]))
    init_from.find(config.init["from"])   # a path that holds no weights fails here, before any data is read
  mesh = sharding_lib.make_mesh(config.mesh.shape)   # a shape that does not fit the devices fails here, first
  rules = sharding_lib.rules_of(config)
  workdir = storage.absolute_path(workdir)
  is_main = jax.process_index() == 0
  saved_config = workdir / "config.json"
  if saved_config.exists() and checkpointing.has_checkpoints(workdir):
    configuration.check_resumable(config, configuration.from_dict(json.loads(saved_config.read_text())))
  if is_main:
    try:
      workdir.mkdir(parents=True, exist_ok=True)
      saved_config.write_text(config.to_json_best_effort(indent=2))
    except OSError as e:
      raise OSError(f"cannot write to the workdir {workdir}: {e}") from e

  # ---- Input pipeline ------------------------------------------------------------------------------------------
  train_source = input_pipeline.make_source(config, "train")
  val_source = input_pipeline.make_source(config, "val")
  tokenizer_home = workdir
  if config.init["from"] and not checkpointing.has_checkpoints(workdir):
    # A run that starts from other weights uses the tokenizers they were trained with (their ids are the rows of
    # the embedding), not new ones fitted here; the workdir keeps a copy for its readers and resumes.
    source_tokenizers = init_from.tokenizer_dir(config.init["from"])
    if source_tokenizers is not None:
      tokenizer_home = source_tokenizers.parent
      if is_main:
        storage.copy_tree(source_tokenizers, workdir / input_pipeline.TOKENIZER_DIR)
  toks = input_pipeline.fit_or_load_tokenizers(config, tokenizer_home, train_source)
  layout = toks.layout
  if layout.seq_len > config.model.max_len:
    raise configuration.ConfigError(f"config.model.max_len={config.model.max_len} is smaller than the sequence "
                                    f"length {layout.seq_len} of {layout.describe()}")
  if config.train.batch_size % jax.process_count():
    raise configuration.ConfigError(f"config.train.batch_size={config.train.batch_size} is not divisible by the "
                                    f"{jax.process_count()} processes")
  dataset = input_pipeline.train_dataset(train_source, toks, batch_size=config.train.batch_size,
                                   seed=config.seed, shard_index=jax.process_index(),
                                   shard_count=jax.process_count())
  data_iter = input_pipeline.train_iterator(dataset, config.data.num_threads)
  val_batches = input_pipeline.eval_batches(val_source, toks, config.eval.batch_size)
  logging.info("data: %s, %d train / %d val examples; sequence of %d tokens %s; vocabulary %d",
               config.data.source, len(train_source), len(val_source), layout.seq_len, layout.describe(), layout.size)

  # ---- Mesh, model, optimizer -----------------------------------------------------------------------------
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  for name in ("train.batch_size", "eval.batch_size"):
    group, field = name.split(".")
    if config[group][field] % batch_shards:
      raise configuration.ConfigError(f"config.{name}={config[group][field]} is not divisible by the "
                                      f"{batch_shards} batch shards of the mesh (data x fsdp of {dict(mesh.shape)})")
  code_features = toks.image.code_features() if config.model.image_code_features else None
  if code_features is not None and code_features.shape[1] != (want := configuration.image_code_feature_dim(config)):
    raise configuration.ConfigError(
        f"config.model.image_code_features: the image tokenizer's codes have {code_features.shape[1]} numbers "
        f"each, the config implies {want} (for a learned tokenizer, set config.tokenizer.fsq_levels / vq_dim to "
        "the tokenizer's)")
  method = train_state.make_step_inputs(config, layout, code_features)
  if method.diffusion.later_weights:
    logging.info("task mixture: %s", method.diffusion.describe_mixture())
  abstract, shardings = train_state.state_shardings(method, mesh, rules)
  logging.info("mesh: %s over %d devices (%d processes); model: %s parameters%s",
               dict(mesh.shape), mesh.size, jax.process_count(),
               f"{params_lib.param_count(abstract.weights):,}",
               f"; LoRA adapters of rank {method.lora.rank} on {', '.join(method.lora.targets)}: "
               f"{params_lib.param_count(abstract.params):,} trained parameters" if method.lora else "")

  # ---- Checkpoint: resume or start ---------------------------------------------------------------------------
  ckpt = checkpointing.Checkpointer(workdir, every_steps=config.ckpt.every_steps,
                                    max_to_keep=config.ckpt.max_to_keep, async_save=config.ckpt.async_save)
  # Cumulative over invocations, saved with each checkpoint: wall and step time, and the val curve
  # ([step, text bits, image bits] per validation; sweeps plot it) of the steps the newest checkpoint covers.
  meta = {"train_wall_s": 0.0, "train_s": 0.0, "val_curve": []}
  for name in ckpt.incomplete():
    logging.warning("ignoring %s in %s: not a complete checkpoint (a save that was cut off, or one set aside)",
                    name, ckpt.directory)
  resume = ckpt.latest_step() is not None
  weights = None
  if config.init["from"] and (not resume or method.lora):
    # Straight into this run's shardings; names and shapes checked before anything is read (init_from.py).
    weights, source = init_from.load(config.init["from"], abstract.weights)
    logging.info("%s%s", source.describe(), " (the frozen base of the LoRA adapters)" if method.lora else "")
  elif config.init["from"]:
    logging.info("init.from=%s ignored: resuming from the checkpoints in %s", config.init["from"], ckpt.directory)
  if resume:
    # Restored straight onto this run's shardings, whatever the mesh that wrote it.
    saved, restored_step = ckpt.restore_newest_good(abstract.checkpointed(), data_iter)
    state = abstract.resumed(saved, weights)
    meta.update(ckpt.restore_meta(restored_step))
    logging.info("resuming from checkpoint at step %d in %s", int(state.step), ckpt.directory)
  else:
    state = train_state.init_state(method, config.seed, mesh, rules, weights)
    logging.info("no checkpoint in %s: starting from step 0", ckpt.directory)
  del weights   # donated to the state: its parameters (full fine-tuning) or its frozen base (LoRA)
  start = int(state.step)
  report_path = workdir / "report.json"
  if start >= config.train.steps and report_path.exists():
    logging.info("already trained to step %d (config.train.steps=%d); report: %s", start, config.train.steps,
                 report_path)
    ckpt.close()
    return {**json.loads(report_path.read_text()), "history": []}

  # ---- Compiled steps ----------------------------------------------------------------------------------------
  step_fn, eval_fn = train_state.compile_steps(method, mesh, rules, shardings)
  batch_sh = sharding_lib.batch_sharding(mesh)
  writer = train_loop.Writer(workdir)
  loop_start = time.perf_counter()

  figures = validation.val_figures(layout, method.diffusion)

  def run_eval(step):
    params = state.network_params(state.ema_params if config.eval.use_ema else state.params)
    batches = [{**b, "tokens": sharding_lib.global_array(b["tokens"], batch_sh)} for b in val_batches]
    bits = validation.validate(eval_fn, params, batches, config.seed, figures)
    logging.info("step %d | val bits/token: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in bits.items()))
    writer.scalars(step, {f"val/bits_{k}": v for k, v in bits.items()})
    meta["val_curve"] = [p for p in meta.get("val_curve", []) if p[0] < step] + [[step, bits.get("text"), bits.get("image")]]
    return bits

  if start == 0:
    meta["val_bits_initial"] = run_eval(0)   # the untrained model's figure: what training must improve on

  # ---- Train loop --------------------------------------------------------------------------------------------
  total = config.train.steps
  tokens_per_step = config.train.batch_size * layout.seq_len
  history, pending, bits = [], [], None
  train_time, window_start, window_steps, unk = 0.0, time.perf_counter(), 0, 0   # steps only, not the eval above
  skipped, preemption = 0, train_loop.Preemption()

  def flush(first_step):
    """Host-fetches the pending metrics (one sync) and checks them; returns them."""
    nonlocal skipped
    fetched = jax.device_get(pending)
    history.extend(float(m["loss"]) for m in fetched)
    skipped += train_loop.check_finite(first_step, fetched, method.skip_nonfinite, ckpt.directory)
    pending.clear()
    return fetched

  def save(step):
    wall = time.perf_counter() - loop_start
    ckpt.save(step, state.checkpointed(), data_iter, {**meta, "train_wall_s": meta["train_wall_s"] + wall,
                                                      "train_s": meta["train_s"] + train_time}, force=True)

  try:
    for step in range(start, total):
      batch = next(data_iter)
      unk += int(batch["text_unk"].sum())
      state, metrics = step_fn(state, {"tokens": sharding_lib.global_batch(batch["tokens"], batch_sh)})
      pending.append(metrics)
      window_steps += 1
      done = step + 1
      if done % config.train.log_every == 0 or done == total:
        fetched = flush(done - len(pending) + 1)                # the one host sync of a log interval
        now = time.perf_counter()
        elapsed, window_start = now - window_start, now
        train_time += elapsed
        means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        steps_per_s = window_steps / elapsed
        parts = ", ".join(f"{m} {means[f'loss_{m}']:.4f}" for m in ("text", "image") if f"loss_{m}" in means)
        logging.info("step %d/%d | loss %.4f (%s) | %.1f steps/s, %s tokens/s | unk words %d | ETA %s", done, total,
                     means["loss"], parts, steps_per_s, f"{steps_per_s * tokens_per_step:,.0f}", unk,
                     train_loop.format_duration((total - done) / steps_per_s))
        if means["nonfinite"] > 0:
          logging.warning("skipped %d non-finite steps so far (train.on_nonfinite='skip')", skipped)
        lr = float(train_state.learning_rate_schedule(config)(done))
        writer.scalars(done, {**{f"train/{k}": v for k, v in means.items()}, "train/lr": lr,
                              "perf/steps_per_s": steps_per_s, "perf/tokens_per_s": steps_per_s * tokens_per_step})
        window_steps, unk = 0, 0
      if done % config.eval.every_steps == 0 and done != total:
        bits = run_eval(done)
        window_start = time.perf_counter()  # validation time is not training time
      # Asked at every step: across processes the sync point is one agreed step, whatever the save interval.
      preempted = preemption.requested(done)
      if done % config.ckpt.every_steps == 0 or done == total or preempted:
        if pending:
          flush(done - len(pending) + 1)                        # never save a state that went non-finite
        save(done)
      if preempted:
        ckpt.close()
        writer.close()
        preemption.close()
        logging.warning("preempted (SIGTERM): saved a checkpoint at step %d in %s; rerun the same command to resume",
                        done, ckpt.directory)
        return {"preempted": True, "step": done, "history": history}
  except BaseException:
    ckpt.close()   # lets an asynchronous save of a good step finish before the error propagates
    raise
  finally:
    preemption.close()

  # ---- Final validation and report ---------------------------------------------------------------------------
  if start < total or bits is None:
    bits = run_eval(int(state.step))
  ckpt.close()
  writer.close()
  wall = meta["train_wall_s"] + time.perf_counter() - loop_start
  train_time += meta["train_s"]
  report = {
      "step": int(state.step),
      "val_bits_per_token": bits,
      "t2i_accuracy": None,          # generation scores arrive with the sampler (generation issue)
      "i2t_accuracy": None,
      "joint_consistency": None,
      "train_wall_s": round(wall, 2),  # all invocations: compile, train, validate, checkpoint
      "train_tokens_per_s": round(total * tokens_per_step / train_time, 1) if train_time > 0 else None,  # steps only
      "val_bits_per_token_initial": meta.get("val_bits_initial"),
      "val_curve": meta["val_curve"],   # [[step, text, image], ...] bits/token of every validation
      "param_count": params_lib.param_count(state.weights),       # the network's (a LoRA run's, once merged)
      "trained_param_count": params_lib.param_count(state.params),   # a LoRA run: its adapters
      "data_skipped": {split: dict(getattr(src, "skipped", {}))
                       for split, src in (("train", train_source), ("val", val_source))},
      "sequence": {"segments": layout.to_dict()["segments"], "vocab": layout.size,
                   # the first text segment's length and the image grid, as reports before segments had them
                   "text": next((g.length for g in layout.segments if g.modality == "text"), None),
                   "image": list(layout.image_grid) if layout.image_grid else None},
  }
  if is_main:
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    logging.info("wrote %s", workdir / "report.json")
  return {**report, "history": history}
