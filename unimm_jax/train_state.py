"""The train state and its update step: :class:`TrainState` (and a LoRA run's :class:`LoraTrainState`), the
step's static pieces (:class:`StepInputs`: the model, the method, the optimizer and its schedule), a fresh state
created directly sharded, and the jitted train and eval steps (big_vision style banner sections). The loop that
runs them is :mod:`unimm_jax.train`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from unimm_jax import configuration, validation
from unimm_jax import sharding as sharding_lib
from unimm_jax.data import input_pipeline
from unimm_jax.method.diffusion import MaskedDiffusion
from unimm_jax.models import lora as lora_lib
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
