"""Transformer building blocks in Flax linen, each parameter with logical axis names.

Logical names (``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``, ``layers``) are mapped onto mesh axes by the
rules in the config (sharding issue); here they only label the parameters, and ``nn.with_logical_constraint``
labels activations (``batch``, ``length``, ``embed``, ``heads``, ``kv``) at block boundaries. Without rules in
scope both are no-ops, so the same module runs on one CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from unimm_jax.models import attention

Dtype = jnp.dtype


class RMSNorm(nn.Module):
  """Root-mean-square norm (no mean subtraction, no bias), computed in float32."""

  eps: float = 1e-6
  axis_name: str = "embed"   # logical axis of the scale (the normalised, last axis of x)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [..., D] -> [..., D]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float) -> jnp.ndarray:
  """float32 [head_dim // 4]: the rotary frequencies of one half of the rotary pairs."""
  quarter = head_dim // 4
  return 1.0 / (theta ** (jnp.arange(quarter, dtype=jnp.float32) / quarter))


def apply_rope_2d(x, positions, theta: float):
  """2-D rotary position embedding.

  The head dimension holds head_dim/2 rotary pairs; the first half of the pairs turn with ``positions[:, 0]``
  (image row, or the text index) and the second half with ``positions[:, 1]`` (image column, or the text index
  again). A text token at index i therefore gets a 1-D rotary embedding; an image token at (r, c) gets one that
  makes attention depend on the row and column offsets separately (the 2-D grid is not flattened).

  Args:
    x: [B, S, N, H] queries or keys, H divisible by 4.
    positions: int32 [S, 2].
    theta: rotary base.
  Returns:
    [B, S, N, H], same dtype as x.
  """
  head_dim = x.shape[-1]
  freqs = rope_frequencies(head_dim, theta)                                    # [H/4]
  angles = jnp.concatenate([positions[:, :1] * freqs, positions[:, 1:] * freqs], axis=-1)  # [S, H/2]
  sin = jnp.sin(angles)[None, :, None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)                                          # pairs (x1[j], x2[j])
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.astype(x.dtype)


def apply_rope_1d(x, positions, theta: float):
  """1-D rotary position embedding with the standard frequencies (RoFormer; LLaDA, LLaMA, GPT-NeoX's layout).

  The head dimension H holds H/2 pairs (x[j], x[j + H/2]); pair j turns by ``position * theta^(-2j/H)``.

  Args:
    x: [B, S, N, H] queries or keys, H even.
    positions: int32 [S]: each position's index; or int32 [B, S], each example's own (``model.pad_key_id``:
      pads take no position).
    theta: rotary base.
  Returns:
    [B, S, N, H], same dtype as x (computed in float32).
  """
  half = x.shape[-1] // 2
  freqs = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1]))   # [H/2]
  angles = positions.astype(jnp.float32)[..., None] * freqs                             # [(B,) S, H/2]
  angles = angles if angles.ndim == 3 else angles[None]                                 # [1 or B, S, H/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class Attention(nn.Module):
  """Bidirectional multi-head self-attention with the kernel of :mod:`unimm_jax.models.attention` (``kernel``:
  xla | splash | cudnn, already resolved for the platform)."""

  num_heads: int
  head_dim: int
  rope_theta: float | None   # None: no rotary embedding (learned absolute positions are used instead)
  rope_fraction: float = 1.0  # share of each head's dimensions that rotate (a multiple of 4 of them)
  kernel: str = "xla"        # xla | splash | cudnn (attention.resolve)
  fused_qkv: bool = True     # one [D, 3, N, H] projection (one matmul) instead of three
  cross_modal_rope: bool = True  # False: pairs across modalities score with the unrotated q, k (see __call__)
  directional_heads: int = 0  # P > 0: P heads see only earlier caption words, P only later ones (see __call__)
  qk_norm: bool = False      # RMS-normalise each head's query and key (learned scale) before the rotary embedding
  interpret: bool = False    # splash only: the Pallas interpreter (tests on CPU)
  # splash only: (segment index, is-text) of each position as static tuples, which the kernel's masks are built from
  static_segments: tuple[tuple, ...] | None = None   # (segment index, is-text[, modality id]) per position
  rope_1d: bool = False      # rotary over positions[:, 0] with the standard 1-D frequencies (apply_rope_1d)
  norm_eps: float = 1e-6     # qk_norm's epsilon
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  cross_modal_heads: int = 0  # C > 0: C heads where only text reads the image, C where only the image reads text

  @nn.compact
  def __call__(self, x, positions, segments=None, key_valid=None, given=None, rows=None, kv=None,
               return_kv: bool = False, value_pos=None):
    """x: [B, S, D], positions: int32 [S, 2] (or [B, S, 2] per example with ``rope_1d``), segments: (segment
    index int [S], is-text bool [S][, modality id int [S]]) of each position (needed when not cross_modal_rope,
    or with directional heads; without the modality ids, pairs rotate within a segment), key_valid: bool [B, S]
    or None, False at the keys no query may attend (pad tokens, ``model.pad_key_id``) -> [B, S, D].

    ``given``: bool [B, S] or None: where True, a query attends only keys where it is True (the given positions
    see only each other: ``model.isolate_given``). ``rows``: int [A] (sorted) or None: ``x`` holds only these
    positions ([B, A, D]); their queries attend every position, reading the keys and values of the others from
    ``kv`` (this layer's ``{'k', 'v'[, 'k_raw']}``, [B, S, N, H] each, from an earlier call with ``return_kv``),
    on the XLA path whatever ``kernel`` is (a sampling path: A queries against S keys). With ``return_kv`` the
    result is (out, kv of every position: the rows' own keys and values in place of the cache's).

    With ``cross_modal_rope=False``, the rotary embedding applies within a modality only: a pair of positions of
    one modality scores with the rotated q, k (relative offsets in a caption; on the grid, also between two image
    segments, whose grids are the same tokenizer's, so an edit's target cell finds the same cell of its source at
    offset 0), a pair across modalities with the unrotated ones over the whole head, so that a caption word finds
    its grid cell by content and absolute position alone. Across modalities a rotary offset (text index i against
    grid cell (r, c)) means nothing and only adds noise to those scores. (With one segment per modality, as in
    ``[text | image]``, within a modality is within a segment.)

    With ``directional_heads=P``, between the words of one text segment the first P heads attend only to the same
    or earlier words and the next P heads only to the same or later ones (every other pair, and every other
    head, as before).

    A bidirectional attention can tell left from right only through rotary phases, which over a caption's length
    are nearly flat at the low frequencies and wrap at the high ones; a left-looking head that finds the word
    "and" says at once which phrase of a caption a word belongs to, which binding each phrase to its own grid
    cell needs (BENCHMARKS.md, generation issue).

    With ``cross_modal_heads=C``, in the first C heads no image query attends a text key (text reads the image
    there) and in the next C no text query attends an image key (the image reads the text): the two directions of
    cross-modal lookup (a caption word finding its cell; a cell finding the phrase that names it) each get heads
    of their own instead of sharing every head. Within a modality every head sees as before.

    The matmul outputs carry ``checkpoint_name``s (``qkv_proj``, ``context``, ``out_proj``) for the named
    rematerialisation policies (``transformer.REMAT_POLICIES``); the attention scores never do.
    """
    d, shape = x.shape[-1], (self.num_heads, self.head_dim)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.fused_qkv:
      # One matmul of 3x the width: fewer, larger operations (what a small model's step is bound by on CPU).
      # Fan-in initialisation is per output column, so q, k and v start exactly as three projections would.
      qkv = Projection((d,), (3,) + shape, ("embed", None, "heads", "kv"), name="qkv", **kw)(x)
      qkv = checkpoint_name(qkv, "qkv_proj")
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      q, k, v = (checkpoint_name(Projection((d,), shape, ("embed", "heads", "kv"), name=n, **kw)(x), "qkv_proj")
                 for n in ("query", "key", "value"))
    if self.qk_norm:
      # Query-key normalisation (ViT-22B, OLMo 2, Gemma 3): score scale set by a learned per-dimension gain rather
      # than by the growth of the projection weights, which weight decay holds back.
      q = RMSNorm(self.norm_eps, name="query_norm", axis_name="kv", **kw)(q)
      k = RMSNorm(self.norm_eps, name="key_norm", axis_name="kv", **kw)(k)
    if value_pos is not None:
      # Each key's absolute position, projected per layer into its value (zero at the start): a head that has
      # found a token by its content can read where that token is at any depth. Otherwise only the first layer's
      # values carry it (BENCHMARKS.md, "values that say where").
      at = value_pos if rows is None else jnp.take(value_pos, rows, axis=0)                     # [S or A, D]
      v = v + Projection((value_pos.shape[-1],), shape, ("embed", "heads", "kv"), kernel_init=nn.initializers.zeros,
                         name="value_position", **kw)(at)[None]
    q_raw, k_raw = q, k
    r = 0
    if self.rope_theta is not None:
      # Partial rotary: the unrotated dimensions score query-key pairs by content alone, whatever their positions,
      # which is what text<->image lookups need (a text index and an image cell have no meaningful offset).
      r = int(self.head_dim * self.rope_fraction) // 4 * 4
      at = positions if rows is None else jnp.take(positions, rows, axis=-2)   # the rows' own positions
      if self.rope_1d:
        rope = lambda x: apply_rope_1d(x, at[..., 0], self.rope_theta)
      else:
        rope = lambda x: apply_rope_2d(x, at, self.rope_theta)
      rot = lambda x: jnp.concatenate([rope(x[..., :r]), x[..., r:]], -1)
      q, k = (rot(q), rot(k)) if r else (q, k)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    within_segment_rope = bool(not self.cross_modal_rope and r)
    if rows is not None:
      if kv is None:
        raise ValueError("Attention(rows=...) computes some positions only: it needs the keys and values of the "
                         "others (kv, from a call with return_kv=True)")
      k, v = kv["k"].at[:, rows].set(k), kv["v"].at[:, rows].set(v)
      if within_segment_rope:
        k_raw = kv["k_raw"].at[:, rows].set(k_raw)
    new_kv = {"k": k, "v": v, **({"k_raw": k_raw} if within_segment_rope else {})}
    query_rows = (lambda a, axis: a) if rows is None else (lambda a, axis: jnp.take(a, rows, axis=axis))
    masked_heads = self.directional_heads or self.cross_modal_heads
    if (within_segment_rope or masked_heads) and segments is None:
      raise ValueError("Attention(cross_modal_rope=False, directional_heads > 0 or cross_modal_heads > 0) needs the "
                       "segment of each position")
    for name in ("directional_heads", "cross_modal_heads"):
      if 2 * getattr(self, name) > self.num_heads:
        raise ValueError(f"{name}={getattr(self, name)} needs at least {2 * getattr(self, name)} heads, got "
                         f"{self.num_heads}")
    if given is not None and self.kernel != "xla" and rows is None:
      raise attention.AttentionConfigError(f"model.isolate_given needs a per-example mask, which the {self.kernel} "
                                           "kernel does not take: set config.model.attention=xla")
    if self.kernel == "cudnn" and rows is None:
      if within_segment_rope or masked_heads or key_valid is not None:
        raise attention.AttentionConfigError("cuDNN attention cannot take cross_modal_rope=False, "
                                             "directional_heads > 0, cross_modal_heads > 0 or pad_key_id "
                                             "(attention.resolve)")
      out = attention.cudnn_attention(q, k, v)
    elif self.kernel == "splash" and rows is None:
      if self.static_segments is None:
        raise ValueError("Attention(kernel='splash') needs static_segments")
      segment, text, *groups = (np.asarray(a) for a in self.static_segments)
      mask = attention.splash_mask(segment, text, self.num_heads, self.directional_heads, within_segment_rope,
                                   groups=groups[0] if groups else None, cross_modal=self.cross_modal_heads)
      out = attention.splash_attention(q, k, v, mask, q_raw, k_raw, r, interpret=self.interpret,
                                       key_valid=key_valid)
    else:
      allowed = None
      if masked_heads:
        masks = attention.head_masks(*segments[:2], self.num_heads, self.directional_heads, xp=jnp,
                                     cross_modal=self.cross_modal_heads)                 # [N, S, S]
        allowed = query_rows(masks, 1)[None]                                              # [1, N, A, S]
      if key_valid is not None:
        keys = key_valid[:, None, None, :]                                                # [B, 1, 1, S]
        allowed = keys if allowed is None else allowed & keys
      if given is not None:
        # A given query sees the given keys only; a generated query sees everything.
        isolated = ~query_rows(given, 1)[:, None, :, None] | given[:, None, None, :]     # [B, 1, A, S]
        allowed = isolated if allowed is None else allowed & isolated
      if within_segment_rope:
        group = segments[2] if len(segments) > 2 else segments[0]   # the modality (default: the segment)
        same = (query_rows(group, 0)[:, None] == group[None, :])[None, None]             # [1, 1, A, S]
        out = attention.xla_attention(q, k, v, q_raw, k_raw, same, allowed=allowed)
      else:
        out = attention.xla_attention(q, k, v, allowed=allowed)
    out = checkpoint_name(out, "context")
    out = checkpoint_name(Projection(shape, (d,), ("heads", "kv", "embed"), name="out", **kw)(out), "out_proj")
    return (out, new_kv) if return_kv else out


heads_first_attention = attention.xla_attention   # the name tests and older code use


def matmul_2d(x, kernel, n_in: int):
  """x [..., *in] times kernel [*in, *out] -> [..., *out], as ONE 2-D matmul [M, K] @ [K, N].

  Contracting the same dimensions with a multi-dimensional ``dot_general`` is the same maths, but XLA:CPU then
  computes the weight gradient (which contracts over batch *and* length) and some of the input gradients far
  below its matmul rate: a gated MLP at the ``bench_cpu`` sizes took 154 ms for its gradient in 3-D against
  111 ms in 2-D (BENCHMARKS.md, performance issue). Row-major reshapes are free (no copy) on every backend, and
  a batch dimension sharded over a mesh axis stays the leading, sharded one after the merge.
  """
  lead, ins, outs = x.shape[:x.ndim - n_in], kernel.shape[:n_in], kernel.shape[n_in:]
  k, n = int(np.prod(ins)), int(np.prod(outs))
  y = jnp.dot(x.reshape(-1, k), kernel.reshape(k, n))
  return y.reshape(lead + outs)


class Projection(nn.Module):
  """A bias-free linear map from the last ``len(in_shape)`` dims of x to ``out_shape``, kernel ``in + out``.

  Written out (not ``nn.DenseGeneral``) because DenseGeneral initialises a flattened 2-D kernel, which breaks
  the logical partitioning of a 3-D one under a mesh. Fan-in initialisation over all input dims (for a 2-D
  kernel the same as ``nn.Dense``'s ``variance_scaling(1, 'fan_in', 'truncated_normal')``). Applied as one
  2-D matmul (:func:`matmul_2d`).
  """

  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  axes: tuple[str, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: nn.initializers.Initializer | None = None  # default: fan-in variance scaling

  @nn.compact
  def __call__(self, x):
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    init = self.kernel_init or nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), self.in_shape + self.out_shape,
                        self.param_dtype)
    return matmul_2d(x.astype(self.dtype), kernel.astype(self.dtype), n_in)


class GatedMLP(nn.Module):
  """SwiGLU: ``wo(silu(wi_0 x) * wi_1 x)`` (matmul outputs named ``mlp_wi_0``, ``mlp_wi_1``, ``mlp_wo`` for remat)."""

  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, S, D] -> [B, S, D]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    gate = checkpoint_name(Projection((d,), (self.hidden,), ("embed", "mlp"), name="wi_0", **kw)(x), "mlp_wi_0")
    up = checkpoint_name(Projection((d,), (self.hidden,), ("embed", "mlp"), name="wi_1", **kw)(x), "mlp_wi_1")
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return checkpoint_name(Projection((self.hidden,), (d,), ("mlp", "embed"), name="wo", **kw)(h), "mlp_wo")


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  num_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float | None
  kernel: str = "xla"        # attention kernel (Attention.kernel)
  rope_fraction: float = 1.0
  fused_qkv: bool = True
  cross_modal_rope: bool = True
  directional_heads: int = 0
  qk_norm: bool = False
  interpret: bool = False
  static_segments: tuple[tuple, ...] | None = None   # (segment index, is-text[, modality id]) per position
  rope_1d: bool = False      # Attention.rope_1d
  norm_eps: float = 1e-6     # of every RMS norm of the block
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  cross_modal_heads: int = 0  # Attention.cross_modal_heads

  @nn.compact
  def __call__(self, x, positions, segments=None, key_valid=None, given=None, rows=None, kv=None,
               return_kv: bool = False, value_pos=None):
    """[B, S, D] -> [B, S, D] (or [B, A, D] of ``rows``; with ``return_kv``, also the attention's keys and values:
    :meth:`Attention.__call__`)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(self.norm_eps, name="attn_norm", **kw)(x)
    out = Attention(self.num_heads, self.head_dim, self.rope_theta, self.rope_fraction, self.kernel,
                    self.fused_qkv, self.cross_modal_rope, self.directional_heads, self.qk_norm, self.interpret,
                    self.static_segments, self.rope_1d, self.norm_eps, name="attn",
                    cross_modal_heads=self.cross_modal_heads, **kw)(
                        h, positions, segments, key_valid, given, rows, kv, return_kv, value_pos=value_pos)
    out, new_kv = out if return_kv else (out, None)
    x = x + out
    h = RMSNorm(self.norm_eps, name="mlp_norm", **kw)(x)
    x = x + GatedMLP(self.mlp_dim, name="mlp", **kw)(h)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return (x, new_kv) if return_kv else x
