"""Training: the train state, the update step, and the loop (big_vision style banner sections; what validation
measures is :mod:`unimm_jax.validation`).

``train_and_evaluate(config, workdir)`` is the whole main job: fit or load tokenizers, build the model, restore
the newest checkpoint or initialise, train with a progress line and TensorBoard events, validate the ELBO per
modality, checkpoint, and write ``WORKDIR/report.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import linen as nn

from unimm_jax import checkpointing, configuration, init_from, storage, train_loop, validation
from unimm_jax import sharding as sharding_lib
from unimm_jax.data import input_pipeline
from unimm_jax.method.diffusion import MaskedDiffusion
from unimm_jax.models import lora as lora_lib
from unimm_jax.models import params as params_lib
from unimm_jax.models import transformer
from unimm_jax.models.transformer import Transformer
from unimm_jax.sequence import SequenceLayout


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 []: number of updates applied
  params: Any           # float32 (param_dtype) pytree
  opt_state: Any
  ema_params: Any       # exponential moving average of params
  rng: jax.Array        # uint32 [2]: base key; step s uses fold_in(rng, s), so a resumed run draws the same noise

  def network_params(self, params):
    """The parameters the network runs with, given trainable ``params`` (``self.params`` or the EMA twin)."""
    return params

  @property
  def weights(self):
    """The parameters ``init.from`` fills (here the trainable ones; a LoRA run's frozen base)."""
    return self.params

  def start_from(self, weights, tx: optax.GradientTransformation) -> "TrainState":
    """This fresh state with ``weights`` (``init.from``) in place of the random ones: the parameters and their
    EMA twin equal to them, the optimizer's state fresh."""
    return self.replace(params=weights, opt_state=tx.init(weights), ema_params=weights)

  def checkpointed(self) -> "TrainState":
    """What a checkpoint holds of this state (all of it)."""
    return self

  def resumed(self, saved: "TrainState", weights=None) -> "TrainState":
    """The state of a run resumed from ``saved`` (a restored :meth:`checkpointed`); ``weights`` unused here."""
    del weights
    return saved


@flax.struct.dataclass
class LoraTrainState(TrainState):
  """A LoRA run's state (``model.lora_rank`` > 0, models/lora.py): ``params``, their EMA twin and the optimizer's
  state are the adapters' only; the network's other parameters are the frozen ``base``, loaded from
  ``init.from`` at every start (checkpoints do not hold it) and never differentiated."""

  base: Any = None      # the frozen base parameters (the network's tree without the adapters)

  def network_params(self, params):
    return lora_lib.combine(self.base, params)

  @property
  def weights(self):
    return self.base

  def start_from(self, weights, tx: optax.GradientTransformation) -> "LoraTrainState":
    del tx   # the adapters start as initialised (B = 0: the base model)
    return self.replace(base=weights)

  def checkpointed(self) -> TrainState:
    return TrainState(step=self.step, params=self.params, opt_state=self.opt_state, ema_params=self.ema_params,
                      rng=self.rng)

  def resumed(self, saved: TrainState, weights=None) -> "LoraTrainState":
    return LoraTrainState(step=saved.step, params=saved.params, opt_state=saved.opt_state,
                          ema_params=saved.ema_params, rng=saved.rng, base=weights)


@flax.struct.dataclass
class StepInputs:
  """The static (hashable) pieces a train or eval step needs besides the state and the batch."""

  model: Transformer = flax.struct.field(pytree_node=False)
  diffusion: MaskedDiffusion = flax.struct.field(pytree_node=False)   # the method: tasks, corruption, loss
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  ema_decay: float = flax.struct.field(pytree_node=False, default=0.999)
  skip_nonfinite: bool = flax.struct.field(pytree_node=False, default=False)   # train.on_nonfinite == 'skip'
  concurrent_chunks: int = flax.struct.field(pytree_node=False, default=1)      # train.concurrent_chunks
  image_code_features: Any = flax.struct.field(pytree_node=False, default=None)  # np [V_img, F] for a fresh init
  # data.kind_rows: per kind, (the network over that kind's segments alone, its rows in every block of P, the
  # positions of those segments in the layout); the blocks' rows follow the kinds' order. () = one forward.
  row_groups: tuple = flax.struct.field(pytree_node=False, default=())

  @property
  def layout(self) -> SequenceLayout:
    return self.diffusion.layout

  @property
  def schedule(self):
    return self.diffusion.schedule

  @property
  def lora(self) -> lora_lib.LoraSpec | None:
    """The adapters of a LoRA run (the network is then a ``lora.LoraTransformer``); None otherwise."""
    return getattr(self.model, "lora", None)


def make_model(config, layout: SequenceLayout, platform: str | None = None) -> Transformer:
  """The network, its attention kernel chosen for ``platform`` (default: JAX's default backend); with
  ``model.lora_rank`` > 0, with adapters on the projections of ``model.lora_targets`` (models/lora.py)."""
  model = transformer.from_config(config, layout, platform)
  spec = lora_lib.LoraSpec.from_config(config.model)
  return model if spec is None else lora_lib.LoraTransformer(model.config, lora=spec)


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup to ``optim.learning_rate``, cosine decay to ``learning_rate * end_lr_ratio`` at the end."""
  o = config.optim
  return optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, o.warmup_steps, config.train.steps,
                                            end_value=o.learning_rate * o.end_lr_ratio)


def make_optimizer(config) -> optax.GradientTransformation:
  """Gradient clipping, then AdamW; no weight decay on vectors (norm scales)."""
  o = config.optim
  def decay_mask(params):   # matrices decay; vectors (norm scales) and the fixed image code features do not
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and getattr(path[-1], "key", None) != "image_code_features", params)
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)


def make_step_inputs(config, layout: SequenceLayout, image_code_features=None,
                     platform: str | None = None) -> StepInputs:
  """The step's static pieces. ``image_code_features`` (float [V_img, F], the image tokenizer's ``code_features()``)
  fills the parameter of ``model.image_code_features`` when a run starts; restores take it from the checkpoint.
  ``platform`` is the one the step is compiled for (default: JAX's default backend)."""
  platform = platform or jax.default_backend()
  if config.train.concurrent_chunks > 1 and platform != "cpu":
    # Accelerators run one operation at a time: the chunks would only duplicate the graph (and its compile time).
    raise configuration.ConfigError(
        f"config.train.concurrent_chunks={config.train.concurrent_chunks} is for XLA:CPU's concurrent thunks; on "
        f"{platform} set it to 1")
  model = make_model(config, layout, platform)
  return StepInputs(model=model, diffusion=MaskedDiffusion.from_config(config.diffusion, layout),
                tx=make_optimizer(config), ema_decay=config.train.ema_decay,
                skip_nonfinite=config.train.on_nonfinite == "skip", concurrent_chunks=config.train.concurrent_chunks,
                image_code_features=None if image_code_features is None else np.asarray(image_code_features, np.float32),
                row_groups=row_groups(config, layout, model))


def row_groups(config, layout: SequenceLayout, model) -> tuple:
  """``StepInputs.row_groups`` of ``data.kind_rows``: per kind, the network over the layout of its segments alone
  (the same parameters: with ``model.mask_absent`` and segment-local positions nothing in the network depends on
  the other segments), its rows per block, and where its segments sit in the full layout."""
  merged = []   # [(segment names, rows)]: neighbours whose segments nest, within 10 % positions, share a forward
  for kind, rows in config.data.get("kind_rows", ()):
    present = set(input_pipeline.kind_segments(config, kind))
    if merged:
      last, last_rows = merged[-1]
      union = last | present
      size = lambda names: int(layout.positions_of(sorted(names)).sum())
      if union in (last, present) and size(union) <= 1.1 * min(size(last), size(present)):
        merged[-1] = (union, last_rows + int(rows))
        continue
    merged.append((present, int(rows)))
  groups = []
  for present, rows in merged:
    names = tuple(n for n in layout.names if n in present)
    cols = tuple(int(i) for i in np.flatnonzero(layout.positions_of(names)))
    groups.append((model.clone(config=dataclasses.replace(model.config, layout=layout.only(names))), rows, cols))
  return tuple(groups)


def _initialiser(method: StepInputs, seed: int):
  """() -> (boxed params with logical names, TrainState): the fresh state, as one traceable function."""
  def init():
    init_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
    tokens = jnp.zeros((1, method.layout.seq_len), jnp.int32)
    boxed = method.model.init(init_key, tokens)["params"]
    if "image_code_features" in boxed and method.image_code_features is not None:
      # Without them (abstract shapes for restores, dry runs, timing) the table stays zero: a no-op input.
      boxed["image_code_features"] = boxed["image_code_features"].replace_boxed(
          jnp.asarray(method.image_code_features))
    params = nn.meta.unbox(boxed)
    if method.lora is not None:   # the optimizer, the EMA and the gradient see the adapters only
      base, params = lora_lib.split(params)
      return boxed, LoraTrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=method.tx.init(params),
                                   ema_params=params, rng=state_key, base=base)
    return boxed, TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=method.tx.init(params),
                             ema_params=params, rng=state_key)
  return init


def state_shardings(method: StepInputs, mesh, rules) -> tuple[TrainState, TrainState]:
  """(abstract TrainState of ShapeDtypeStructs carrying their shardings, TrainState of NamedShardings).

  Parameters (and EMA, and a LoRA run's base) are placed by their logical axis names through ``rules``; optimizer
  moments like their parameter; step, rng and counts replicated. Computed with ``jax.eval_shape``: nothing is
  allocated.
  """
  with sharding_lib.scope(mesh, rules):
    boxed, abstract = jax.eval_shape(_initialiser(method, 0))
  param_sh = sharding_lib.logical_shardings(boxed, mesh, rules)
  rep = sharding_lib.replicated(mesh)
  extra = {}
  if isinstance(abstract, LoraTrainState):
    extra["base"], param_sh = lora_lib.split(param_sh)
  shardings = type(abstract)(step=rep, params=param_sh,
                             opt_state=sharding_lib.opt_state_shardings(method.tx, abstract.params, param_sh, mesh),
                             ema_params=param_sh, rng=rep, **extra)
  sharding_lib.check_divisible(abstract, shardings)
  abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
  return abstract, shardings


def init_state(method: StepInputs, seed: int, mesh=None, rules=(), weights=None) -> TrainState:
  """A fresh state, created directly sharded by one jitted call (never whole on one device).

  Without a mesh: on the first device. Random values do not depend on the mesh (partitionable threefry).
  ``weights`` (``init.from``: the tree of :attr:`TrainState.weights`, already in its shardings) replace the
  random parameters (:meth:`TrainState.start_from`); the random ones they replace are never computed (XLA drops
  what no output needs).
  """
  mesh = sharding_lib.single_device_mesh() if mesh is None else mesh
  _, shardings = state_shardings(method, mesh, rules)
  init = _initialiser(method, seed)

  def fresh(weights):
    state = init()[1]
    return state if weights is None else state.start_from(weights, method.tx)
  return jax.jit(sharding_lib.in_scope(fresh, mesh, rules), out_shardings=shardings, donate_argnums=0)(weights)


# ---------------------------------------------------------------------------------------------------------------
# Update step
# ---------------------------------------------------------------------------------------------------------------
def concurrent_map(fn, chunks: int, *batch: jax.Array) -> jax.Array:
  """``fn(*batch)`` for a per-example ``fn``, computed as ``chunks`` independent sub-batches in one program.

  ``train.concurrent_chunks``. Each sub-batch's forward and backward is a chain of its own, with no data flowing
  between the chains until their gradients are summed, so XLA:CPU's thunk executor, which runs whatever operations
  are ready on its thread pool, fills one core with one chain's work while the other waits on the next
  operation of the other chain. One chain is a strict sequence of operations, many of them too small or too
  serial (softmax, norms, layout changes, reductions) to keep two cores busy: the ``bench_cpu`` step, whose
  two-thread time was 1.63x faster than one thread on a matmul peak that doubles, ran 4-7 % faster with two
  chunks (BENCHMARKS.md, performance issue). The maths is the same (the model holds no batch statistics), up to
  the order of float sums in the weight gradients. Accelerators run one operation at a time and gain nothing.

  Chunk i takes rows i, i + chunks, i + 2 chunks, ... so that each chunk has an equal share of every device's
  rows when the batch is split over a mesh; the outputs are put back in the input's order.
  """
  if chunks <= 1:
    return fn(*batch)
  rows = batch[0].shape[0]
  if rows % chunks:
    raise ValueError(f"train.concurrent_chunks={chunks} does not divide the batch of {rows}")
  split = lambda x: x.reshape((rows // chunks, chunks) + x.shape[1:])
  parts = [fn(*(split(x)[:, i] for x in batch)) for i in range(chunks)]
  out = jnp.stack(parts, axis=1)
  return out.reshape((rows,) + out.shape[2:])


def train_step(method: StepInputs, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
  """One AdamW update on the diffusion loss of a batch.

  Args:
    batch: {'tokens': int32 [B, S] clean global ids, ...}.
  Returns:
    (new state, metrics of scalars).
  """
  diffusion = method.diffusion
  tokens = batch["tokens"]
  key = jax.random.fold_in(state.rng, state.step)
  k_corruption, k_mask = jax.random.split(key)
  present = method.layout.present(tokens, jnp) if method.layout.has_absent else None
  corruption = diffusion.sample_corruption(k_corruption, tokens.shape[0], present=present,
                                           task_weights=diffusion.task_weights_at(state.step))
  noisy, masked = diffusion.corrupt(k_mask, tokens, corruption)

  def loss_fn(params):   # a LoRA run differentiates the adapters only: its base is a constant here
    network = state.network_params(params)
    nll = grouped_nll(method, network, noisy, tokens, diffusion.given_positions(corruption))
    return diffusion.loss(nll, masked, corruption)

  (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = method.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # EMA with a warm-up of the decay, so early averages are not dominated by the random initialisation.
  decay = jnp.minimum(method.ema_decay, (1.0 + state.step) / (10.0 + state.step))
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  grad_norm, update_norm = optax.tree.norm(grads), optax.tree.norm(updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
  if method.skip_nonfinite:   # a bad batch changes nothing but the step (so data and noise move on)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state, ema = keep(params, state.params), keep(opt_state, state.opt_state), keep(ema, state.ema_params)
  metrics = {
      "loss": loss, **parts,
      "nonfinite": 1.0 - finite.astype(jnp.float32),
      "grad_norm": grad_norm,
      "param_norm": optax.tree.norm(params),
      "update_norm": update_norm,
      "masked_fraction": masked.mean(),
  }
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
  return new_state, metrics


def grouped_nll(method: StepInputs, params, noisy, tokens, given):
  """-log p(x0 | x_t), float32 [B, S]: one forward of the whole layout, or with ``method.row_groups`` one forward
  per kind of example over its own segments only (0 at the positions of segments it lacks, which never carry loss).

  Rows are taken block by block (a batch is B / P blocks of P rows, kinds in the same rows of every block), so a
  batch split over a mesh's data axis on whole blocks keeps every kind's rows where they are. With
  ``model.mask_absent`` this equals the one forward at every present position; a caption pair then costs its 60
  positions of the unified layout's 99, not all 99.
  """
  chunks = method.concurrent_chunks
  if not method.row_groups:
    return concurrent_map(functools.partial(transformer.sequence_nll, method.model, params), chunks, noisy, tokens,
                          given)
  batch, length = tokens.shape
  period = sum(rows for _, rows, _ in method.row_groups)
  blocks = lambda x: x.reshape((batch // period, period) + x.shape[1:])
  out = jnp.zeros((batch // period, period, length), jnp.float32)
  start = 0
  for model, rows, cols in method.row_groups:
    cols = np.asarray(cols)
    take = lambda x: blocks(x)[:, start:start + rows][:, :, cols].reshape(-1, len(cols))   # [B / P * rows, S_k]
    nll = concurrent_map(functools.partial(transformer.sequence_nll, model, params), chunks, take(noisy), take(tokens),
                         take(given))
    out = out.at[:, start:start + rows, cols].set(nll.reshape(batch // period, rows, len(cols)))
    start += rows
  return out.reshape(batch, length)


def compile_steps(method: StepInputs, mesh, rules, shardings: TrainState):
  """(train step, eval step), jitted with explicit in/out shardings (pjit) and traced under the logical rules.

  train: (state, {'tokens': [B, S] split over data x fsdp}) -> (state, replicated metrics), state donated.
  eval: (network params, tokens [B, S], key) -> replicated bits [B, 2] (every process can read it).
  """
  batch_sh, rep = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  step_fn = jax.jit(sharding_lib.in_scope(functools.partial(train_step, method), mesh, rules),
                    in_shardings=(shardings, {"tokens": batch_sh}), out_shardings=(shardings, rep),
                    donate_argnums=0)
  eval_fn = jax.jit(sharding_lib.in_scope(functools.partial(validation.eval_step, method), mesh, rules),
                    in_shardings=(shardings.network_params(shardings.params), batch_sh, rep), out_shardings=rep)
  return step_fn, eval_fn


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
  method = make_step_inputs(config, layout, code_features)
  if method.diffusion.later_weights:
    logging.info("task mixture: %s", method.diffusion.describe_mixture())
  abstract, shardings = state_shardings(method, mesh, rules)
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
    state = init_state(method, config.seed, mesh, rules, weights)
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
  step_fn, eval_fn = compile_steps(method, mesh, rules, shardings)
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
        lr = float(learning_rate_schedule(config)(done))
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
