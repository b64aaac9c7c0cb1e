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


class Attention(nn.Module):
  """Bidirectional multi-head self-attention: :func:`heads_first_attention` (XLA), or ``jax.nn.dot_product_attention``
  with ``implementation='cudnn'`` on GPU."""

  num_heads: int
  head_dim: int
  rope_theta: float | None   # None: no rotary embedding (learned absolute positions are used instead)
  rope_fraction: float = 1.0  # share of each head's dimensions that rotate (a multiple of 4 of them)
  implementation: str | None = None   # None (XLA) or 'cudnn'
  fused_qkv: bool = True     # one [D, 3, N, H] projection (one matmul) instead of three
  cross_modal_rope: bool = True  # False: text<->image pairs score with the unrotated q, k (see __call__)
  directional_heads: int = 0  # P > 0: P heads see only earlier caption words, P only later ones (see __call__)
  qk_norm: bool = False      # RMS-normalise each head's query and key (learned scale) before the rotary embedding
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, segments=None):
    """x: [B, S, D], positions: int32 [S, 2], segments: (segment index int [S], is-text bool [S]) of each position
    (needed when not cross_modal_rope, or with directional heads) -> [B, S, D].

    With ``cross_modal_rope=False``, the rotary embedding applies within a segment only: a pair of positions of
    one segment scores with the rotated q, k (relative offsets in the caption, on the grid), a pair across
    segments with the unrotated ones over the whole head, so that a caption word finds its grid cell by content
    and absolute position alone. Across segments a rotary offset (text index i against grid cell (r, c), or two
    captions' indices, which both start at 0) means nothing and only adds noise to those scores. This takes a
    second score matmul, done here by XLA (no cuDNN).

    With ``directional_heads=P``, between the words of one text segment the first P heads attend only to the same
    or earlier words and the next P heads only to the same or later ones (every other pair, and every other
    head, as before).
    A bidirectional attention can tell left from right only through rotary phases, which over a caption's length
    are nearly flat at the low frequencies and wrap at the high ones; a left-looking head that finds the word
    "and" says at once which phrase of a caption a word belongs to, which binding each phrase to its own grid
    cell needs (BENCHMARKS.md, generation issue).
    """
    d, shape = x.shape[-1], (self.num_heads, self.head_dim)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.fused_qkv:
      # One matmul of 3x the width: fewer, larger operations (what a small model's step is bound by on CPU).
      # Fan-in initialisation is per output column, so q, k and v start exactly as three projections would.
      qkv = Projection((d,), (3,) + shape, ("embed", None, "heads", "kv"), name="qkv", **kw)(x)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      q, k, v = (Projection((d,), shape, ("embed", "heads", "kv"), name=n, **kw)(x)
                 for n in ("query", "key", "value"))
    if self.qk_norm:
      # Query-key normalisation (ViT-22B, OLMo 2, Gemma 3): score scale set by a learned per-dimension gain rather
      # than by the growth of the projection weights, which weight decay holds back.
      q = RMSNorm(name="query_norm", axis_name="kv", **kw)(q)
      k = RMSNorm(name="key_norm", axis_name="kv", **kw)(k)
    q_raw, k_raw = q, k
    r = 0
    if self.rope_theta is not None:
      # Partial rotary: the unrotated dimensions score query-key pairs by content alone, whatever their positions,
      # which is what text<->image lookups need (a text index and an image cell have no meaningful offset).
      r = int(self.head_dim * self.rope_fraction) // 4 * 4
      rot = lambda x: jnp.concatenate([apply_rope_2d(x[..., :r], positions, self.rope_theta), x[..., r:]], -1)
      q, k = (rot(q), rot(k)) if r else (q, k)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    own_scores = (not self.cross_modal_rope and r) or self.directional_heads
    if own_scores and segments is None:
      raise ValueError("Attention(cross_modal_rope=False or directional_heads > 0) needs the segment of each "
                       "position")
    if self.implementation is not None:
      if own_scores:
        raise ValueError("Attention(cross_modal_rope=False or directional_heads > 0) computes its scores itself; "
                         f"it has no implementation={self.implementation!r}")
      out = jax.nn.dot_product_attention(q, k, v, is_causal=False, implementation=self.implementation)
    elif self.cross_modal_rope or not r:
      out = heads_first_attention(q, k, v, allowed=self._directional_mask(segments))
    else:
      segment = segments[0]
      same = (segment[:, None] == segment[None, :])[None, None]                        # [1, 1, S, S]
      out = heads_first_attention(q, k, v, q_raw, k_raw, same, allowed=self._directional_mask(segments))
    return Projection(shape, (d,), ("heads", "kv", "embed"), name="out", **kw)(out)

  def _directional_mask(self, segments):
    """bool [1, N, S, S], True where a query may attend a key, or None (every pair) without directional heads."""
    p = self.directional_heads
    if not p:
      return None
    if 2 * p > self.num_heads:
      raise ValueError(f"directional_heads={p} needs at least {2 * p} heads, got {self.num_heads}")
    segment, text = segments
    s = segment.shape[0]
    text_pair = text[:, None] & text[None, :] & (segment[:, None] == segment[None, :])  # [S, S]: within a caption
    idx = jnp.arange(s)
    left = ~text_pair | (idx[None, :] <= idx[:, None])
    right = ~text_pair | (idx[None, :] >= idx[:, None])
    every = jnp.ones((s, s), bool)
    return jnp.stack([left] * p + [right] * p + [every] * (self.num_heads - 2 * p))[None]


def heads_first_attention(q, k, v, q_raw=None, k_raw=None, rotated_where=None, allowed=None):
  """Softmax attention of [B, S, N, H] q, k, v computed in the [B, N, S, H] layout -> [B, S, N, H].

  The XLA path on every backend (``model.attention='xla'``). ``jax.nn.dot_product_attention``'s XLA fallback
  contracts [B, S, N, H] operands directly; with the heads moved next to the batch first, the score and value
  matmuls are batched over contiguous [S, H] blocks, and the transposes fuse into the producers (the rotary
  embedding): the attention layer's gradient at the ``bench_cpu`` sizes took 105 ms instead of 129 ms
  (BENCHMARKS.md). Scores, the softmax and the weighted sum accumulate in float32 whatever the compute dtype.

  With ``q_raw``, ``k_raw`` and a boolean ``rotated_where`` [1, 1, S, S], the score of a pair is ``q . k`` where
  it is True and ``q_raw . k_raw`` elsewhere (``Attention(cross_modal_rope=False)``). A boolean ``allowed``
  [1 or B, N, S, S] leaves out the pairs where it is False (every query must keep at least one key).
  """
  heads_first = lambda t: jnp.swapaxes(t, 1, 2)
  scale = jnp.asarray(1.0 / np.sqrt(q.shape[-1]), q.dtype)
  score = lambda q, k: jnp.einsum("bnqh,bnkh->bnqk", heads_first(q) * scale, heads_first(k),
                                  preferred_element_type=jnp.float32)
  scores = score(q, k)
  if rotated_where is not None:
    scores = jnp.where(rotated_where, scores, score(q_raw, k_raw))
  if allowed is not None:
    scores = jnp.where(allowed, scores, -1e30)
  # Normalised after the value matmul, as flash attention does: one divide per output [.., S, H] instead of per
  # score [.., S, S]. The max is a constant shift (softmax ignores it), so it takes no gradient.
  weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
  out = jnp.einsum("bnqk,bnkh->bnqh", weights.astype(v.dtype), heads_first(v), preferred_element_type=jnp.float32)
  return heads_first(out / weights.sum(axis=-1, keepdims=True)).astype(v.dtype)


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
  """SwiGLU: ``wo(silu(wi_0 x) * wi_1 x)``."""

  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, S, D] -> [B, S, D]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    gate = Projection((d,), (self.hidden,), ("embed", "mlp"), name="wi_0", **kw)(x)
    up = Projection((d,), (self.hidden,), ("embed", "mlp"), name="wi_1", **kw)(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return Projection((self.hidden,), (d,), ("mlp", "embed"), name="wo", **kw)(h)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  num_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float | None
  attention: str | None = None
  rope_fraction: float = 1.0
  fused_qkv: bool = True
  cross_modal_rope: bool = True
  directional_heads: int = 0
  qk_norm: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, segments=None):  # [B, S, D] -> [B, S, D]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(name="attn_norm", **kw)(x)
    x = x + Attention(self.num_heads, self.head_dim, self.rope_theta, self.rope_fraction, self.attention,
                      self.fused_qkv, self.cross_modal_rope, self.directional_heads, self.qk_norm, name="attn",
                      **kw)(h, positions, segments)
    h = RMSNorm(name="mlp_norm", **kw)(x)
    x = x + GatedMLP(self.mlp_dim, name="mlp", **kw)(h)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))
