"""The network: one bidirectional transformer over segmented token sequences.

It maps token ids (MASK included) to logits and knows nothing about diffusion: no time input, no masking
rates. What it knows of the data is the :class:`~unimm_jax.sequence.SequenceLayout`: the segment and modality of
each position (for the modality embedding, the positions, the attention options and the output restriction).

Positions (config ``model.positions``): ``rope`` is rotary, 1-D within a text segment and 2-D (row, column) within
an image grid, so attention between image tokens depends on their grid offsets; ``learned`` adds absolute
embeddings per segment (per text index; per image row plus per image column); ``rope+learned`` does both. Rotary
alone gives attention only *relative* offsets, and between a text token and an image token those mean little,
so an image token cannot tell where on the grid it sits, which text->image needs ("... at the top left"); the
absolute embeddings give it that.

The output at each position is restricted to its own modality's ids: the logits of the other modalities, of
special tokens and of MASK are set to a large negative value, so their probabilities are exactly 0 in float32
while every value stays finite (``-inf`` would make ``p * log p`` NaN in entropy and KL terms).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from unimm_jax.models import attention as attention_lib
from unimm_jax.models import layers
from unimm_jax.sequence import IMAGE, MODALITIES, SPECIAL, TEXT, SequenceLayout

NEG_INF = -1e9

# Rematerialisation: what a block keeps from its forward pass for the backward pass (the rest is recomputed).
# The named policies save matmul outputs by the names layers.py gives them (MaxText's manner) and never the
# attention scores ([B, N, S, S] per layer on the XLA path; splash and cuDNN never write them).
_SAVE = jax.checkpoint_policies.save_only_these_names
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,                       # keep only the block's input
    "save_qkv": _SAVE("qkv_proj"),                                          # + q, k, v: recompute attention, MLP
    "save_attention": _SAVE("qkv_proj", "context", "out_proj"),             # + the attention half: recompute MLP
    "minimal": _SAVE("qkv_proj", "context", "out_proj", "mlp_wi_0", "mlp_wi_1", "mlp_wo"),  # every matmul output
    # Unnamed policies: every matmul output, the XLA path's float32 attention scores included (kept for old runs).
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # ... but not batched (attention)
}


def _ScanBlock(block_cls, return_kv: bool = False):  # pylint: disable=invalid-name
  """``block_cls`` with the (carry, output) signature ``nn.scan`` needs: the layer's cache (``kv``) scanned in,
  its keys and values (with ``return_kv``) scanned out."""
  class ScanBlock(block_cls):
    def __call__(self, x, kv, positions, segments, key_valid=None, given=None, rows=None, value_pos=None):
      # (The cache arguments only when caching: a rematerialised block traces every argument it is given.)
      caching = () if rows is None and not return_kv else (rows, kv, return_kv)
      out = super().__call__(x, positions, segments, key_valid, given, *caching, value_pos=value_pos)
      return out if return_kv else (out, None)
  ScanBlock.__name__ = f"Scan{block_cls.__name__}"
  return ScanBlock


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Network hyper-parameters (the ``model`` config group plus the sequence layout)."""

  layout: SequenceLayout
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  head_dim: int = 32
  mlp_dim: int = 384
  positions: str = "rope"      # rope | learned | rope+learned
  rope_theta: float = 10_000.0
  rope_fraction: float = 1.0   # share of head dimensions that rotate; the rest match by content only
  dtype: str = "float32"       # compute dtype
  param_dtype: str = "float32"
  attention: str = "xla"       # xla | splash | cudnn: the kernel, resolved for the platform (attention.resolve)
  attention_interpret: bool = False   # splash in the Pallas interpreter (tests on CPU)
  vocab_multiple: int = 128    # embedding/head rows padded to a multiple (so a mesh axis can split them)
  scan_layers: bool = False    # one nn.scan over stacked layers: compile time flat in depth
  remat: str = "none"          # rematerialisation policy of a block: none | REMAT_POLICIES
  fused_qkv: bool = True       # one q/k/v projection matmul per block instead of three
  cross_modal_rope: bool = True  # False: rotary offsets only within a modality (layers.Attention)
  directional_heads: int = 0   # P: per block, P heads look only left and P only right within each text segment
  cross_modal_heads: int = 0   # C: per block, C heads where only text reads the image, C where only image reads text
  value_positions: bool = False  # every block's values also carry each key's absolute position (layers.Attention)
  qk_norm: bool = False        # RMS-normalised queries and keys (layers.Attention)
  code_feature_dim: int = 0    # F > 0: image tokens also embed a projection of their code's appearance [V_img, F]
  rope_layout: str = "segment"  # segment: 1-D per text segment, 2-D per image grid | sequence: 1-D over all (LLaDA)
  norm_eps: float = 1e-6       # every RMS norm
  embedding_scale: float = 0.5773502691896258   # input embeddings times this (1/sqrt(3); imported backbones 1)
  modality_embedding: bool = True   # a learned vector per modality added to the input
  restrict_output: bool = True      # logits outside a position's modality (and MASK) set to NEG_INF
  pad_key_id: int = -1         # >= 0: tokens of this id are not there (never attended, no position; MMaDA's [iPAD])
  image_row_end_id: int = -1   # >= 0: the network sees this token after every image row (Lumina-DiMOO's <end-of-line>)
  isolate_given: bool = False  # given (not generated) positions attend only given positions (cacheable; __call__)
  mask_absent: bool = False    # no query attends an ABSENT position: an example is computed as its own segments alone

  @property
  def segments_alone(self) -> bool:
    """Whether an example is computed exactly as the layout of its present segments alone (``layout.only``, the
    same parameters): absent positions are not attended and no position's input depends on another segment
    (segment-local rotary positions, no row-end tokens, no pad keys). The Pipeline's calls on a layout with absent
    segments compute the present positions only when it holds; the train step's ``data.kind_rows`` needs the same
    (checked on the config, ``configuration._kind_rows_problems``, with an error for each condition)."""
    return (self.mask_absent and self.rope_layout == "segment" and self.image_row_end_id < 0
            and self.pad_key_id < 0)

  @classmethod
  def from_config(cls, model_config, layout: SequenceLayout, code_feature_dim: int = 0,
                  platform: str | None = None) -> "TransformerConfig":
    """The config group ``model`` over ``layout``, its ``attention`` resolved for ``platform`` (default: JAX's
    default backend; the AOT compiler passes the target's)."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"layout", "code_feature_dim", "attention"}
    kernel = attention_lib.resolve(model_config.get("attention", "xla"), platform or jax.default_backend(),
                                   dtype=model_config.get("dtype", "float32"), own_scores=own_scores(model_config))
    return cls(layout=layout, code_feature_dim=code_feature_dim, attention=kernel,
               **{k: v for k, v in model_config.items() if k in fields})


def own_scores(model_config) -> dict[str, bool]:
  """The settings whose attention needs a mask (which cuDNN cannot take): setting name -> whether it is on."""
  rotary = model_config.get("positions", "rope") in ("rope", "rope+learned") and \
      int(model_config.get("head_dim", 32) * model_config.get("rope_fraction", 1.0)) // 4 > 0
  return {"directional_heads": bool(model_config.get("directional_heads", 0)),
          "cross_modal_heads": bool(model_config.get("cross_modal_heads", 0)),
          "cross_modal_rope": rotary and not model_config.get("cross_modal_rope", True),
          "pad_key_id": model_config.get("pad_key_id", -1) >= 0,   # (image_row_end_id needs no mask)
          "mask_absent": bool(model_config.get("mask_absent", False)),
          "isolate_given": bool(model_config.get("isolate_given", False))}


def token_positions(layout: SequenceLayout, rope_layout: str = "segment") -> np.ndarray:
  """int32 [S, 2]: (i, i) for index i within a text segment; (row, col) for image grid cells (row-major). With
  ``rope_layout='sequence'``: (i, i) for the index i in the flat sequence."""
  if rope_layout == "sequence":
    return np.repeat(np.arange(layout.seq_len, dtype=np.int32)[:, None], 2, axis=1)
  if rope_layout != "segment":
    raise ValueError(f"model.rope_layout={rope_layout!r} is not one of ('segment', 'sequence')")
  return layout.positions()


def row_end_expansion(layout: SequenceLayout) -> tuple[np.ndarray, np.ndarray]:
  """(src int32 [S'], inserted bool [S']): the sequence the network runs on when every image row is followed by a
  row-end token (``model.image_row_end_id``): position j of it is position ``src[j]`` of the layout's sequence, or
  an inserted row end (``src`` then names the last cell of its row). S' = S + the image rows."""
  src, inserted = [], []
  for seg in layout.segments:
    lo, hi = layout.span(seg.name)
    if seg.modality != IMAGE:
      src += list(range(lo, hi))
      inserted += [False] * (hi - lo)
      continue
    h, w = seg.grid
    for r in range(h):
      src += list(range(lo + r * w, lo + (r + 1) * w)) + [lo + (r + 1) * w - 1]
      inserted += [False] * w + [True]
  return np.asarray(src, np.int32), np.asarray(inserted, bool)


def segment_info(layout: SequenceLayout):
  """(segment index int32 [S], is-text bool [S], modality id int32 [S]) of each position, built in the program
  from iota comparisons. The modality id groups the positions whose pairs rotate (``cross_modal_rope=False``)."""
  masks = layout.modality_masks(jnp)
  text = masks.get(TEXT, jnp.zeros(layout.seq_len, bool))
  modality = sum(MODALITIES.index(m) * w.astype(jnp.int32) for m, w in masks.items())
  return layout.segment_index(jnp), text, modality


class Transformer(nn.Module):
  """tokens int32 [B, S] -> logits float32 [B, S, V], V = layout.size."""

  config: TransformerConfig

  def _absolute_positions(self, init, param_dtype):
    """float [S, D]: per segment, a learned vector per text index; per image cell, a learned row plus a learned
    column vector (parameters ``{segment}_position``, ``{segment}_row``, ``{segment}_col``).

    The factorised image table shares what is learned about a row (or column) across its cells, so "top left"
    binds to the right cells after fewer examples than a free vector per cell would need.
    """
    layout, d = self.config.layout, self.config.d_model
    axes = nn.with_logical_partitioning(init, (None, "embed"))
    parts = []
    for seg in layout.segments:
      if seg.modality == IMAGE:
        h, w = seg.grid
        rows = self.param(f"{seg.name}_row", axes, (h, d), param_dtype)
        cols = self.param(f"{seg.name}_col", axes, (w, d), param_dtype)
        parts.append((rows[:, None, :] + cols[None, :, :]).reshape(h * w, d))
      else:
        parts.append(self.param(f"{seg.name}_position", axes, (seg.size, d), param_dtype))
    return jnp.concatenate(parts, axis=0)

  def _code_embedding(self, tokens, param_dtype):
    """float [B, S, D]: at image positions holding a code (not MASK), a learned projection of the code's features.

    The features (``image_code_features``, [V_img, F], the image tokenizer's ``code_features()``) are set when the
    run starts and never trained (no gradient, no weight decay); they travel in checkpoints, so a restored model
    needs no tokenizer to rebuild them. A code's colour and shape are then readable from its first use, and what
    is learned about one code carries to the codes that look like it: image->text reading starts from pixels,
    not from one free vector per code.
    """
    layout, d = self.config.layout, self.config.d_model
    features = self.param("image_code_features", nn.with_logical_partitioning(nn.initializers.zeros, (None, None)),
                          (layout.image_vocab, self.config.code_feature_dim), param_dtype)
    table = layers.Projection((self.config.code_feature_dim,), (d,), (None, "embed"), name="code_projection")(
        jax.lax.stop_gradient(jnp.asarray(features, jnp.float32)))                    # [V_img, D]
    lo, hi = layout.id_range(IMAGE)
    ids = jnp.clip(tokens - lo, 0, layout.image_vocab - 1)
    is_code = (tokens >= lo) & (tokens < hi)
    return jnp.where(is_code[..., None], jnp.take(table, ids, axis=0), 0.0)

  @nn.compact
  def __call__(self, tokens, *, hidden: bool = False, given=None, rows=None, kv=None, return_kv: bool = False):
    """tokens int32 [B, S] -> logits float32 [B, S, V]; with ``hidden=True`` the final-normed features [B, S, D]
    instead (the training loss applies the head per segment: :func:`segment_nll`).

    Args:
      given: bool [B, S]: the positions that are given rather than generated (clean or null segments; every
        position not being generated, when sampling). Read only with ``model.isolate_given``, which needs it: a
        given position then attends only given positions (LaViDa's prefix mask), so its keys and values do not
        depend on the generated positions and a sampler computes them once (``sample.cache='exact'``). None:
        nothing is given (every position attends every position). Training, validation, scoring and the
        sampler always pass it.
      rows: int [A] (static, sorted, unique) or None: compute the outputs of these positions only ([B, A, ...]),
        reading the keys and values of every other position from ``kv``. With ``model.isolate_given`` and the
        given positions outside ``rows``, this is the full forward's output at ``rows`` exactly; otherwise the
        other positions' keys and values are those of the call that made ``kv`` (Fast-dLLM's approximate cache).
      kv: the cache of every layer (from a call with ``return_kv=True`` on the same ``given``).
      return_kv: also return that cache: (out, kv), each layer's keys and values at every position, [B, S(')]
        leading (the network's own sequence: S' with ``image_row_end_id``).
    """
    cfg = self.config
    layout = cfg.layout
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if tokens.shape[-1] != layout.seq_len:
      raise ValueError(f"expected sequences of {layout.seq_len} tokens, got shape {tokens.shape}")
    given = jnp.asarray(given, bool) if cfg.isolate_given and given is not None else None
    if rows is not None:
      rows = np.asarray(rows, np.int64)
      if rows.ndim != 1 or np.any(np.diff(rows) <= 0) or kv is None:
        raise ValueError("rows must be sorted unique positions (int [A]) and come with the cache kv")

    embed_init = nn.initializers.normal(stddev=1.0)
    # Rows past layout.size are padding (never looked up, their logits cut off): a vocabulary of a multiple of
    # vocab_multiple can be split over the 'tensor' axis whatever the fitted tokenizers' sizes.
    vocab = -(-layout.size // cfg.vocab_multiple) * cfg.vocab_multiple
    table = self.param("token_embedding", nn.with_logical_partitioning(embed_init, ("vocab", "embed")),
                       (vocab, cfg.d_model), param_dtype)
    # Gather from the float32 table and cast afterwards: a bf16 gather makes a bf16 scatter-add in the
    # gradient, slow on GPU because about half of the positions hold the same (MASK) id.
    if cfg.image_row_end_id >= 0:
      # The upstream's grid ends every row with a token of its own: the network runs on that longer sequence (its
      # positions, attention and pads; row_end_expansion) and returns the layout's positions only. (Validation
      # keeps the options that read the layout's length, the modality embedding and absolute positions, off.)
      src, inserted = row_end_expansion(layout)
      tokens = jnp.where(jnp.asarray(inserted)[None], cfg.image_row_end_id, tokens[:, src])   # int32 [B, S']
    x = jnp.take(table, tokens, axis=0).astype(dtype)                          # [B, S(')', D]
    if cfg.code_feature_dim:
      x = x + self._code_embedding(tokens, param_dtype).astype(dtype)
    if cfg.modality_embedding:
      x = x + self._modality_embedding(embed_init, param_dtype).astype(dtype)[None]
    value_pos = None
    if cfg.positions in ("learned", "rope+learned"):
      absolute = self._absolute_positions(embed_init, param_dtype).astype(dtype)               # [S, D]
      x = x + absolute[None]
      # The values read the table the input learns; their gradient does not reshape it (with it, every task
      # learned slower and the drawing direction bound late: BENCHMARKS.md, "values that say where").
      value_pos = jax.lax.stop_gradient(absolute) if cfg.value_positions else None
    elif cfg.value_positions:
      raise ValueError(f"model.value_positions projects the learned absolute positions into every block's values: "
                       f"it needs model.positions='learned' or 'rope+learned', not {cfg.positions!r}")
    # Unit-variance embeddings are scaled so the residual stream starts near the size of one block's output.
    # (A numpy float64 scalar is not weakly typed: it would promote a bfloat16 residual stream to float32.)
    if cfg.embedding_scale != 1.0:
      x = x * jnp.asarray(cfg.embedding_scale, dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    positions = jnp.asarray(token_positions(layout, cfg.rope_layout))
    segments = segment_info(layout)
    keep = None
    net_rows = rows   # the rows in the network's own sequence
    if cfg.image_row_end_id >= 0:   # (the tokens were expanded before the embedding)
      src, inserted = row_end_expansion(layout)
      positions = jnp.repeat(jnp.arange(len(src), dtype=jnp.int32)[:, None], 2, axis=1)
      segments = tuple(a[src] for a in segments)
      keep = np.flatnonzero(~inserted)
      given = None if given is None else given[:, src]
      if rows is not None:   # a computed row's row end is computed with it
        computed = np.zeros(layout.seq_len, bool)
        computed[rows] = True
        net_rows = np.flatnonzero(computed[src])
        keep = np.flatnonzero(~inserted[net_rows])
    if rows is not None:
      x = x[:, net_rows]
    key_valid = None
    if cfg.pad_key_id >= 0:
      # A pad is not there: no query attends it and it takes no position, so the tokens around it see each other
      # at the offsets they would have without it (MMaDA left-pads its prompts and masks the pads out).
      key_valid = tokens != cfg.pad_key_id                                       # bool [B, S]
      counted = jnp.maximum(jnp.cumsum(key_valid.astype(jnp.int32), axis=1) - 1, 0)
      positions = jnp.repeat(counted[..., None], 2, axis=-1)                     # int32 [B, S, 2]
    if cfg.mask_absent and layout.has_absent:
      # The segments an example lacks are not there for it: with every position segment-local (rope_layout
      # 'segment', no absolute table over the flat sequence), each example's outputs are exactly those of the
      # layout of its present segments alone, which is what lets the train step run each kind of example on its
      # own shorter layout (StepInputs.row_groups). Unlike a pad, an absent position keeps its position.
      present_keys = tokens != layout.absent_id                                  # bool [B, S]
      key_valid = present_keys if key_valid is None else key_valid & present_keys
    rope_theta = cfg.rope_theta if cfg.positions in ("rope", "rope+learned") else None
    static_segments = None
    if cfg.attention == "splash":   # the kernel's block masks are built from the static segment ids
      at = row_end_expansion(layout)[0] if keep is not None else np.arange(layout.seq_len)
      static_segments = (tuple(int(i) for i in layout.segment_index(np)[at]),
                         tuple(bool(b) for b in layout.modality_masks(np).get(TEXT, np.zeros(layout.seq_len, bool))[at]),
                         tuple(int(i) for i in layout.modality_ids()[at]))
    block_args = (cfg.num_heads, cfg.head_dim, cfg.mlp_dim, rope_theta, cfg.attention, cfg.rope_fraction,
                  cfg.fused_qkv, cfg.cross_modal_rope, cfg.directional_heads, cfg.qk_norm, cfg.attention_interpret,
                  static_segments, cfg.rope_layout == "sequence", cfg.norm_eps)
    block_kw = dict(dtype=dtype, param_dtype=param_dtype, cross_modal_heads=cfg.cross_modal_heads)
    caching = rows is not None or return_kv   # a sampling path: nothing to rematerialise
    block = layers.Block if cfg.remat == "none" or caching else nn.remat(
        layers.Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      # Parameters stacked on a leading "layers" axis; XLA compiles the block once, whatever the depth.
      stack = nn.scan(_ScanBlock(block, return_kv), variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(0,) + (nn.broadcast,) * 6, length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, new_kv = stack(*block_args, **block_kw, name="blocks")(x, kv, positions, segments, key_valid, given,
                                                                 net_rows, value_pos)
    else:
      new_kv = []
      for i in range(cfg.num_layers):
        layer_cache = (net_rows, None if kv is None else kv[i], return_kv) if caching else ()
        out = block(*block_args, **block_kw, name=f"block_{i}")(x, positions, segments, key_valid, given,
                                                                 *layer_cache, value_pos=value_pos)
        x, layer_kv = out if return_kv else (out, None)
        new_kv.append(layer_kv)
    if keep is not None:
      x = x[:, keep]
    out = self._head(x, vocab, rows, hidden)
    return (out, new_kv) if return_kv else out

  def _head(self, x, vocab: int, rows, hidden: bool):
    """The final norm, then (unless ``hidden``) the output projection and the modality restriction of
    :meth:`__call__` at ``rows`` (all positions when None)."""
    cfg, layout = self.config, self.config.layout
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    x = layers.RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name="final_norm")(x)
    if hidden:
      return x
    logits = layers.Projection((cfg.d_model,), (vocab,), ("embed", "vocab"), dtype=dtype, param_dtype=param_dtype,
                               kernel_init=nn.initializers.zeros, name="head")(x)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab")).astype(jnp.float32)
    logits = logits[..., :layout.size] if vocab != layout.size else logits
    if not cfg.restrict_output:
      return logits
    allowed = layout.allowed_ids(jnp)
    return jnp.where((allowed if rows is None else allowed[rows])[None], logits, NEG_INF)

  def _modality_embedding(self, init, param_dtype):
    """float [S, D]: each position's modality vector (rows: text, image, and special when the layout has special
    tokens), chosen by a select over iota comparisons: a gather with constant indices would make its backward a
    scatter-add, slow on accelerators."""
    layout = self.config.layout
    rows = 3 if layout.specials else 2
    table = self.param("modality_embedding", nn.with_logical_partitioning(init, (None, "embed")),
                       (rows, self.config.d_model), param_dtype)
    masks = layout.modality_masks(jnp)
    out = jnp.broadcast_to(table[MODALITIES.index(layout.modalities[-1])], (layout.seq_len, self.config.d_model))
    for m in reversed(layout.modalities[:-1]):
      out = jnp.where(masks[m][:, None], table[MODALITIES.index(m)], out)
    return out


def segment_nll(config: TransformerConfig, params, features, targets):
  """-log p(target) at every position, each position's softmax over its own modality's ids only: float32 [B, S]
  (0 at special positions, which are never predicted).

  Equal to ``token_nll`` of the restricted logits of ``Transformer.__call__`` (the other ids get probability exactly
  0 there), but the head is applied per segment to its modality's columns only: text positions to the text ids,
  image positions to the image ids. The cross-modality columns and MASK are never computed, which spares the
  matmul and the softmax of every text position over the image vocabulary (with an 8k-16k image codebook and
  captions of a fifth of the sequence, most of the head's work in a full-width head), forward and backward.

  Args:
    config: the network's config (layout, dtype).
    params: the network's parameters.
    features: [B, S, D] from ``Transformer.apply(..., hidden=True)``.
    targets: int32 [B, S] global ids of the right modality at each position (clean tokens).
  """
  layout, dtype = config.layout, jnp.dtype(config.dtype)
  kernel = nn.unbox(params["head"]["kernel"])
  feature_parts, target_parts = layout.split(features), layout.split(targets)
  out = []
  for seg in layout.segments:
    if seg.modality == SPECIAL:
      out.append(jnp.zeros(target_parts[seg.name].shape, jnp.float32))
      continue
    lo, hi = layout.id_range(seg.modality)
    logits = layers.matmul_2d(feature_parts[seg.name].astype(dtype), kernel[:, lo:hi].astype(dtype), 1)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab")).astype(jnp.float32)
    if config.restrict_output and lo <= layout.mask_id < hi:   # a MASK among the text ids (sequence.mask_id)
      logits = jnp.where(jnp.arange(hi - lo) == layout.mask_id - lo, NEG_INF, logits)
    local = jnp.clip(target_parts[seg.name] - lo, 0, hi - lo - 1)
    target_logit = jnp.take_along_axis(logits, local[..., None], axis=-1)[..., 0]
    out.append(jax.nn.logsumexp(logits, axis=-1) - target_logit)
  return jnp.concatenate(out, axis=1)


def sequence_nll(model: Transformer, params, noisy, targets, given=None):
  """-log p(x0 | x_t) at every position, float32 [B, S]: the network's features on ``noisy`` (int32 [B, S]), then
  the head per segment (:func:`segment_nll`). The one path of training, validation and scoring. ``given``: bool
  [B, S], the positions of the segments that are not noised (read with ``model.isolate_given``)."""
  features = model.apply({"params": params}, noisy, hidden=True, given=given)
  return segment_nll(model.config, params, features, targets)


def from_config(config, layout: SequenceLayout, platform: str | None = None) -> Transformer:
  """The network of a run's config (``model`` group) over a layout, its attention kernel chosen for ``platform``
  (default: JAX's default backend)."""
  from unimm_jax import configuration  # pylint: disable=g-import-not-at-top  (JAX-free; kept off the import path)
  return Transformer(TransformerConfig.from_config(config.model, layout, configuration.image_code_feature_dim(config),
                                                   platform))
