"""Training the learned image tokenizer (FSQ or VQ autoencoder): state, update step, validation, loop, report.

``train_and_evaluate(config, workdir)`` is the whole job of ``python -m unimm_jax.tokenizer_main``: the same
mesh, grain iterator, Orbax checkpoints (resume, exact data position), and the same loop parts
(``train_loop.py``: progress line, TensorBoard events, a stop at a non-finite step, a checkpoint on SIGTERM) as the
main model's ``train.py``, on images only. The objective is the mean squared error of the reconstruction
(plus beta times the commitment loss for VQ):

    L = mean |D(q(E(x))) - x|^2  [+ beta |E(x) - sg(e)|^2]          x in [-1, 1]

No adversarial or perceptual term: both need a pretrained or jointly trained critic, and this project trains
from nothing offline; at 256x256 that costs sharpness (README).

Validation reports, on every val image once and on what the tokenizer finally gives (uint8 reconstructions of
the code indexes): PSNR = 10 log10(1 / MSE) with MSE over all val pixels in [0, 1]; codebook usage (share of codes
chosen at least once) and code perplexity (exp of the entropy of the code frequencies; the codebook size when
all codes are used equally). At the end it writes ``WORKDIR/report.json``, ``WORKDIR/report.html`` (figures and
val reconstructions beside their originals) and the tokenizer itself (``image_tokenizer.json`` + parameters),
which ``--config.image.tokenizer=fsq --config.image.tokenizer_path=WORKDIR`` plugs into the unified model.

Parameters are replicated and the batch is split over the mesh's ``data`` x ``fsdp`` devices (data parallel; a
tokenizer is a few million parameters).
"""

from __future__ import annotations

import functools
import html
import json
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from unimm_jax import checkpointing, configuration, evaluate, storage, train_loop
from unimm_jax import sharding as sharding_lib
from unimm_jax.data import input_pipeline
from unimm_jax.models import params as params_lib, quantizers
from unimm_jax.models.autoencoder import Autoencoder, to_unit
from unimm_jax.tokenizers import learned
from unimm_jax.tokenizers.learned import TokenizerSpec

REPORT_FILE = "report.json"


@flax.struct.dataclass
class TokenizerState:
  step: jax.Array        # int32 []
  params: Any            # {'encoder': ..., 'decoder': ...}
  opt_state: Any
  codebook: Any          # VQCodebook (vq) or None (fsq: the grid is implicit)
  rng: jax.Array         # uint32 [2]; step s uses fold_in(rng, s)


@flax.struct.dataclass
class TokenizerMethod:
  """The static pieces of a step."""

  spec: TokenizerSpec = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  vq_decay: float = flax.struct.field(pytree_node=False, default=0.99)
  vq_commitment: float = flax.struct.field(pytree_node=False, default=0.25)
  vq_dead_threshold: float = flax.struct.field(pytree_node=False, default=0.1)

  @property
  def model(self) -> Autoencoder:
    return Autoencoder(self.spec.net)


def make_method(config) -> TokenizerMethod:
  t = config.tokenizer
  schedule = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, t.warmup_steps, t.steps,
                                                end_value=t.learning_rate * 0.1)
  parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  parts.append(optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=t.weight_decay))
  return TokenizerMethod(spec=learned.spec_from_config(config), tx=optax.chain(*parts),
                         vq_decay=t.vq_decay, vq_commitment=t.vq_commitment, vq_dead_threshold=t.vq_dead_threshold)


def _init(method: TokenizerMethod, seed: int) -> TokenizerState:
  k_params, k_book, k_state = jax.random.split(jax.random.PRNGKey(seed), 3)
  spec = method.spec
  params = learned.init_params(spec, k_params)
  codebook = (quantizers.vq_init(k_book, spec.vq_codebook_size, spec.net.latent_dim) if spec.kind == "vq"
              else None)
  return TokenizerState(step=jnp.zeros((), jnp.int32), params=params, opt_state=method.tx.init(params),
                        codebook=codebook, rng=k_state)


def state_shardings(method: TokenizerMethod, mesh) -> tuple[TokenizerState, Any]:
  """(abstract state carrying its shardings, shardings): everything replicated (module docstring)."""
  abstract = jax.eval_shape(functools.partial(_init, method, 0))
  shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), abstract)
  abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
  return abstract, shardings


def init_state(method: TokenizerMethod, seed: int, mesh) -> TokenizerState:
  _, shardings = state_shardings(method, mesh)
  return jax.jit(functools.partial(_init, method, seed), out_shardings=shardings)()


# ---------------------------------------------------------------------------------------------------------------
# Update step
# ---------------------------------------------------------------------------------------------------------------
def _quantize(method: TokenizerMethod, z, codebook):
  """(quantized latents with straight-through gradients, indexes, commitment loss)."""
  spec = method.spec
  if spec.kind == "fsq":
    q = quantizers.fsq_quantize(z, spec.fsq_levels)
    return q, quantizers.fsq_codes_to_indexes(q, spec.fsq_levels), jnp.zeros((), jnp.float32)
  return quantizers.vq_quantize(z, codebook.codes)


def train_step(method: TokenizerMethod, state: TokenizerState, images) -> tuple[TokenizerState, dict]:
  """One AdamW update (and, for VQ, one EMA codebook update with dead-code restart).

  images: uint8 [B, H, W, C]. Returns (new state, scalar metrics).
  """
  x = to_unit(images)
  model = method.model

  def loss_fn(params):
    z = model.apply({"params": params}, x, method=Autoencoder.encode)
    q, idx, commitment = _quantize(method, z, state.codebook)
    recon = model.apply({"params": params}, q, method=Autoencoder.decode)
    mse = jnp.mean(jnp.square(recon - x))
    return mse + method.vq_commitment * commitment, (mse, commitment, idx, z)

  (loss, (mse, commitment, idx, z)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = method.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  codebook, restarted = state.codebook, jnp.zeros((), jnp.int32)
  if method.spec.kind == "vq":
    key = jax.random.fold_in(state.rng, state.step)
    codebook, restarted = quantizers.vq_ema_update(state.codebook, z, idx, key, decay=method.vq_decay,
                                                   dead_threshold=method.vq_dead_threshold)
  counts = jnp.bincount(idx.reshape(-1), length=method.spec.vocab_size)
  grad_norm = optax.tree.norm(grads)
  metrics = {
      "loss": loss, "mse": mse, "commitment": commitment,
      "psnr": 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)),   # range [-1, 1]: peak-to-peak 2
      "batch_usage": jnp.mean(counts > 0), "restarted": restarted,
      "grad_norm": grad_norm,
      "nonfinite": 1.0 - (jnp.isfinite(loss) & jnp.isfinite(grad_norm)).astype(jnp.float32),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, codebook=codebook), metrics


def eval_step(method: TokenizerMethod, params, codebook, images, weight):
  """What the tokenizer gives on a val batch: (squared error sum per image in [0, 1] units: float32 [B],
  code counts float32 [K] of the weighted images, reconstructions uint8 [B, H, W, C]).

  images: uint8 [B, H, W, C]; weight: float32 [B], 0 on padding.
  """
  spec = method.spec
  books = None if codebook is None else codebook.codes
  idx = learned.encode_images(spec, params, books, images)                                 # [B, h*w]
  recon = learned.decode_indexes(spec, params, books, idx)
  err = jnp.sum(jnp.square((recon.astype(jnp.float32) - images.astype(jnp.float32)) / 255.0), axis=(1, 2, 3))
  counts = jnp.zeros((spec.vocab_size,), jnp.float32).at[idx].add(weight[:, None])
  return err, counts, recon


def compile_steps(method: TokenizerMethod, mesh, shardings):
  batch_sh, rep = sharding_lib.batch_sharding(mesh, 4), sharding_lib.replicated(mesh)
  step_fn = jax.jit(functools.partial(train_step, method), in_shardings=(shardings, batch_sh),
                    out_shardings=(shardings, rep), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, method),
                    in_shardings=(shardings.params, shardings.codebook, batch_sh, sharding_lib.batch_sharding(mesh, 1)),
                    out_shardings=(rep, rep, rep))
  return step_fn, eval_fn


def val_batches(source, batch_size: int) -> list[dict[str, np.ndarray]]:
  """Every val image once: [{'images': uint8 [B, H, W, C], 'weight': float32 [B] (0 on padding)}]."""
  if not len(source):
    raise ValueError("the validation split is empty")
  out = []
  for start in range(0, len(source), batch_size):
    images = np.stack([source[i]["image"] for i in range(start, min(start + batch_size, len(source)))])
    weight = np.zeros(batch_size, np.float32)
    weight[: len(images)] = 1.0
    images = np.concatenate([images, np.repeat(images[-1:], batch_size - len(images), axis=0)])
    out.append({"images": images, "weight": weight})
  return out


def validate(eval_fn, params, codebook, batches, mesh, keep: int = 0) -> tuple[dict[str, Any], list]:
  """({'psnr', 'mse', 'usage', 'perplexity', 'codes_used', 'codebook_size', 'images'}, first ``keep``
  (original, reconstruction) pairs)."""
  err_total, pixels, counts, pairs = 0.0, 0, None, []
  batch_sh, vec_sh = sharding_lib.batch_sharding(mesh, 4), sharding_lib.batch_sharding(mesh, 1)
  for batch in batches:
    err, c, recon = eval_fn(params, codebook, sharding_lib.global_array(batch["images"], batch_sh),
                            sharding_lib.global_array(batch["weight"], vec_sh))
    err, c = np.asarray(err), np.asarray(c)
    err_total += float((err * batch["weight"]).sum())
    pixels += int(batch["weight"].sum()) * int(np.prod(batch["images"].shape[1:]))
    counts = c if counts is None else counts + c
    n = min(keep - len(pairs), int(batch["weight"].sum()))
    if n > 0:
      recon = np.asarray(recon)
      pairs.extend(zip(batch["images"][:n], recon[:n]))
  mse = err_total / pixels
  stats = quantizers.code_statistics(counts)
  return {"psnr": float(10.0 * np.log10(1.0 / max(mse, 1e-12))), "mse": mse, **stats,
          "images": pixels // int(np.prod(batches[0]["images"].shape[1:]))}, pairs


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def render_html(report: dict, pairs) -> str:
  v = report["val"]
  rows = [("step", report["step"]), ("quantizer", f"{report['kind']}, {report['codebook_size']:,} codes"),
          ("tokens per image", "x".join(map(str, report["grid"]))),
          ("val PSNR", f"{v['psnr']:.2f} dB"), ("val codebook usage", f"{v['usage']:.1%} ({v['codes_used']:,} codes)"),
          ("val code perplexity", f"{v['perplexity']:.1f}"), ("val images", v["images"]),
          ("parameters", f"{report['param_count']:,}"), ("training wall time", f"{report['train_wall_s']:.0f} s")]
  table = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(val))}</td></tr>" for k, val in rows)
  cells = "".join(f"<td>{evaluate.png_html(a)}<br>{evaluate.png_html(b)}</td>" for a, b in pairs)
  return ("<!doctype html><meta charset='utf-8'><title>image tokenizer report</title>"
          "<style>body{font-family:sans-serif} td,th{padding:4px;text-align:left}</style>"
          f"<h1>Image tokenizer</h1><table>{table}</table>"
          "<h2>Val reconstructions (top: original, bottom: decoded from its tokens)</h2>"
          f"<table><tr>{cells}</tr></table>")


# ---------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir) -> dict[str, Any]:
  """Trains the tokenizer (resuming if possible), validates, writes the report and the tokenizer; returns the
  report plus ``'history'`` (this invocation's per-step losses)."""
  # ---- Config and workdir ------------------------------------------------------------------------------------
  configuration.validate(config)
  if config.image.tokenizer not in configuration.LEARNED_IMAGE_TOKENIZERS:
    raise configuration.ConfigError(f"config.image.tokenizer={config.image.tokenizer!r}: tokenizer_main trains "
                                    "'fsq' or 'vq' (set --config.image.tokenizer=fsq)")
  if config.data.source == "pretokenized":
    raise configuration.ConfigError("config.data.source='pretokenized' holds tokens, not images: train the "
                                    "tokenizer on the source the tokens were made from")
  t = config.tokenizer
  mesh = sharding_lib.make_mesh(config.mesh.shape)
  workdir = storage.absolute_path(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  # ---- Input pipeline ------------------------------------------------------------------------------------------
  train_source = input_pipeline.make_source(config, "train")
  val_source = input_pipeline.make_source(config, "val")
  dataset = input_pipeline.image_dataset(train_source, batch_size=t.batch_size, seed=config.seed,
                                   shard_index=jax.process_index(), shard_count=jax.process_count())
  data_iter = input_pipeline.train_iterator(dataset, config.data.num_threads)
  batches = val_batches(val_source, config.eval.batch_size)

  # ---- Mesh, model, optimizer ----------------------------------------------------------------------------------
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  for name, value in (("tokenizer.batch_size", t.batch_size), ("eval.batch_size", config.eval.batch_size)):
    if value % shards:
      raise configuration.ConfigError(f"config.{name}={value} is not divisible by the {shards} batch shards of "
                                      f"the mesh {dict(mesh.shape)}")
  method = make_method(config)
  spec = method.spec
  abstract, shardings = state_shardings(method, mesh)
  n_params = params_lib.param_count(abstract.params)
  logging.info("tokenizer: %s, %s codes, %dx%d -> %dx%d tokens, %s parameters; data %s: %d train / %d val images",
               spec.kind, f"{spec.vocab_size:,}", spec.size, spec.size, *spec.grid, f"{n_params:,}",
               config.data.source, len(train_source), len(val_source))

  # ---- Checkpoint: resume or start ---------------------------------------------------------------------------
  ckpt = checkpointing.Checkpointer(workdir, every_steps=t.eval_every, max_to_keep=config.ckpt.max_to_keep,
                                    async_save=config.ckpt.async_save)
  meta = {"train_wall_s": 0.0, "train_s": 0.0}
  if ckpt.latest_step() is not None:
    state, restored = ckpt.restore_newest_good(abstract, data_iter)
    meta.update(ckpt.restore_meta(restored))
    logging.info("resuming from checkpoint at step %d in %s", int(state.step), ckpt.directory)
  else:
    state = init_state(method, config.seed, mesh)
  start = int(state.step)
  if start >= t.steps and (workdir / REPORT_FILE).exists():
    ckpt.close()
    logging.info("already trained to step %d; report: %s", start, workdir / REPORT_FILE)
    return {**json.loads((workdir / REPORT_FILE).read_text()), "history": []}

  # ---- Compiled steps ----------------------------------------------------------------------------------------
  step_fn, eval_fn = compile_steps(method, mesh, shardings)
  batch_sh = sharding_lib.batch_sharding(mesh, 4)
  writer = train_loop.Writer(workdir)
  loop_start = time.perf_counter()

  def run_eval(step, keep=0):
    figures, pairs = validate(eval_fn, state.params, state.codebook, batches, mesh, keep)
    logging.info("step %d | val PSNR %.2f dB | codebook usage %.1f%% (%d of %d) | code perplexity %.1f", step,
                 figures["psnr"], 100 * figures["usage"], figures["codes_used"], figures["codebook_size"],
                 figures["perplexity"])
    writer.scalars(step, {f"val/{k}": figures[k] for k in ("psnr", "mse", "usage", "perplexity")})
    return figures, pairs

  if start == 0:
    meta["val_initial"] = run_eval(0)[0]   # the untrained network's figures: what training must improve on

  # ---- Train loop --------------------------------------------------------------------------------------------
  progress = train_loop.Progress(t.steps, ckpt.directory, fix="Lower config.tokenizer.learning_rate.")
  preemption = train_loop.Preemption()

  def save(step):
    wall = time.perf_counter() - loop_start
    ckpt.save(step, state, data_iter, {**meta, "train_wall_s": meta["train_wall_s"] + wall,
                                       "train_s": meta["train_s"] + progress.train_time}, force=True)

  try:
    for step in range(start, t.steps):
      state, metrics = step_fn(state, sharding_lib.global_batch(next(data_iter), batch_sh))
      progress.add(metrics)
      done = step + 1
      if done % t.log_every == 0 or done == t.steps:
        window = progress.lap(done)                # the one host sync of a log interval
        means, rate = window.means, window.steps_per_s
        logging.info("step %d/%d | loss %.5f | train PSNR %.2f dB | batch code usage %.1f%%%s | %.1f steps/s, "
                     "%s images/s | ETA %s", done, t.steps, means["loss"], means["psnr"], 100 * means["batch_usage"],
                     f" | restarted {round(means['restarted'] * window.steps)} codes" if spec.kind == "vq" else "",
                     rate, f"{rate * t.batch_size:,.0f}", progress.eta(done, rate))
        writer.scalars(done, {**{f"train/{k}": v for k, v in means.items()}, "perf/steps_per_s": rate,
                              "perf/images_per_s": rate * t.batch_size})
      preempted = preemption.requested(done)
      if done % t.eval_every == 0 or done == t.steps or preempted:
        progress.fetch(done)                       # never validate or save a state that went non-finite
        if done % t.eval_every == 0 and done != t.steps:
          run_eval(done)
          progress.restart_clock()                 # validation time is not training time
        save(done)
      if preempted:
        ckpt.close()
        writer.close()
        preemption.log_saved(done, ckpt.directory)
        return {"preempted": True, "step": done, "history": progress.history}
  except BaseException:
    ckpt.close()
    raise
  finally:
    preemption.close()

  # ---- Final validation, report and the tokenizer ------------------------------------------------------------
  figures, pairs = run_eval(int(state.step), keep=t.report_images)
  ckpt.close()
  writer.close()
  wall = meta["train_wall_s"] + time.perf_counter() - loop_start
  train_time = progress.train_time + meta["train_s"]
  report = {
      "step": int(state.step), "kind": spec.kind, "codebook_size": spec.vocab_size, "grid": list(spec.grid),
      "image_size": spec.size, "val": figures, "val_initial": meta.get("val_initial"), "param_count": n_params,
      "train_wall_s": round(wall, 2),   # all invocations: compile, train, validate, checkpoint
      "train_images_per_s": round(t.steps * t.batch_size / train_time, 1) if train_time > 0 else None,
      "data": {"source": config.data.source, "train_images": len(train_source), "val_images": len(val_source)},
  }
  if is_main:
    codebook = None if state.codebook is None else np.asarray(jax.device_get(state.codebook.codes))
    tokenizer = learned.LearnedImageTokenizer(spec, jax.device_get(state.params), codebook,
                                              encode_batch=t.encode_batch)
    tokenizer.save(workdir)
    (workdir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    (workdir / "report.html").write_text(render_html(report, pairs))
    logging.info("wrote the tokenizer and %s; use it with --config.image.tokenizer=%s "
                 "--config.image.tokenizer_path=%s", workdir / REPORT_FILE, spec.kind, workdir)
  return {**report, "history": progress.history}
