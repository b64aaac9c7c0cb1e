"""Attention kernels, chosen per platform: the XLA path, splash attention (Pallas, TPU) and cuDNN flash attention.

``model.attention``:

* ``auto`` (default): ``splash`` on TPU; on GPU ``cudnn`` where the config allows it (bfloat16 or float16, no mask),
  else ``xla``, with a log line saying why; ``xla`` on CPU (:func:`resolve`);
* ``xla``: :func:`xla_attention`, scores in memory ([B, N, S, S] per layer), every mask the model has;
* ``splash``: the Pallas TPU kernel (``jax.experimental.pallas.ops.tpu.splash_attention``), tiled, scores never in
  HBM, inside ``shard_map`` over the mesh (batch over ``data`` x ``fsdp``, heads over ``tensor``); the model's masks
  (directional heads, rotary within a segment) are static block-sparse splash masks built from the layout;
* ``cudnn``: ``jax.nn.dot_product_attention(implementation='cudnn')``, bfloat16 (or float16) only, no mask.

A kernel named explicitly that cannot take the config (cuDNN with float32 or a mask, a kernel of another platform)
is an :class:`AttentionConfigError` naming the fields, never a silent fallback.

The masks (:func:`head_masks`). With ``directional_heads = P``, within a text segment the first P heads see only
the same or earlier words and the next P only the same or later ones; with ``cross_modal_heads = C``, in the first
C heads only text reads the image and in the next C only the image reads the text (one direction of cross-modal
lookup each). With rotary offsets within a segment only (``cross_modal_rope = False``), a pair of one segment
scores with the rotated q, k and a pair across segments with the unrotated ones.
The splash kernel computes one score per (query, key) pair, so the second case is written as attention over twice
the keys: query ``[rot(q_r), q_r, q_p]`` (rotating dims r, passing dims p), keys ``[rot(k_r), 0, k_p]`` allowed
only within the query's segment and ``[0, k_r, k_p]`` allowed only across, the values twice. Exactly one of each
key's two copies is allowed for a query, so the softmax is the same; splash skips the blocks a mask leaves empty,
so the work is about one extra score matmul, as on the XLA path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn

from unimm_jax import configuration

KINDS = ("auto", "xla", "splash", "cudnn")
# What ``auto`` picks on each platform.
AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "xla", "cpu": "xla"}
SPLASH_BLOCK = 128   # splash tiles: sequences are padded to a multiple (NUM_LANES of a TPU vector register)


class AttentionConfigError(configuration.ConfigError):
  """A ``model.attention`` choice that the model's other settings do not allow."""


def resolve(kind: str, platform: str, *, dtype: str, own_scores: dict[str, bool]) -> str:
  """The kernel to use: ``kind`` itself, or for ``auto`` the platform's choice (:data:`AUTO`).

  Args:
    kind: ``config.model.attention``.
    platform: the target devices' platform (``tpu``, ``gpu``, ``cpu``): the mesh's, not necessarily this host's;
      ``any`` checks only what holds on every platform (config validation).
    dtype: the compute dtype (``config.model.dtype``).
    own_scores: setting name -> whether it is on, for the settings that need a mask (``directional_heads``,
      ``cross_modal_rope=False`` with rotary positions).
  Raises:
    AttentionConfigError: a kernel that cannot take the dtype or the masks, naming the fields and the way out.
  """
  if kind not in KINDS:
    raise AttentionConfigError(f"config.model.attention={kind!r} is not one of {KINDS}")
  chosen = AUTO.get(platform, "xla") if kind == "auto" else kind
  why = f"config.model.attention={kind!r}" + (f" (on {platform}: {chosen})" if kind == "auto" else "")
  home = {"splash": ("tpu",), "cudnn": ("gpu", "cuda")}.get(chosen)
  if home and platform != "any" and platform not in home:
    raise AttentionConfigError(f"{why} is a {home[0].upper()} kernel and the program is for {platform}: set "
                               "config.model.attention=auto (or xla)")
  if chosen == "splash" and own_scores.get("isolate_given"):
    # The per-example given/generated split is not a splash block mask: the XLA path on TPU.
    if kind == "auto":
      logging.info("config.model.attention='auto' on %s: the XLA attention path, since splash cannot take the "
                   "per-example mask of config.model.isolate_given", platform)
      return "xla"
    raise AttentionConfigError(f"{why} runs the splash kernel, which cannot take the per-example mask of "
                               "config.model.isolate_given; set config.model.attention=xla (or auto)")
  if chosen == "cudnn":
    problems = _cudnn_problems(dtype, own_scores)
    if problems and kind == "auto":
      # auto's rule on GPU: cuDNN where the config allows it, else the XLA path, said in the log.
      logging.info("config.model.attention='auto' on %s: the XLA attention path, since cuDNN flash attention %s",
                   platform, ", and ".join(problems))
      return "xla"
    if problems:
      raise AttentionConfigError(f"{why} runs cuDNN flash attention, which " + ", and ".join(problems) +
                                 "; or set config.model.attention=xla (or auto)")
  return chosen


def _cudnn_problems(dtype: str, own_scores: dict[str, bool]) -> list[str]:
  problems = []
  if dtype not in ("bfloat16", "float16"):
    problems.append(f"takes bfloat16 or float16, not config.model.dtype={dtype!r} (set config.model.dtype=bfloat16)")
  problems += [f"cannot express the mask of config.model.{name} (turn it off)" for name, on in own_scores.items() if on]
  return problems


# ---------------------------------------------------------------------------------------------------------------
# XLA
# ---------------------------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_f32(spec: str, a, b):
  """``einsum(spec, a, b)`` accumulated and returned in float32 while its backward stays in the inputs' dtype.

  ``preferred_element_type=float32`` alone makes the cotangent float32, and JAX's transpose of the einsum then
  multiplies float32 by float32 (the bfloat16 operand upcast): a bfloat16 model's attention backward would run its
  two largest matmuls in float32. Here the cotangent is cast to the operands' dtype first, as the forward's
  inputs were (the accumulation inside the matmul units is float32 either way).
  """
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(spec, a, b):
  return _einsum_f32(spec, a, b), (a, b)


def _einsum_f32_bwd(spec, residuals, g):
  a, b = residuals
  _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a, b)
  return vjp(g.astype(a.dtype))


_einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


def _einsum(spec: str, a, b):
  """float32 [..] einsum of a, b: plain in float32, :func:`_einsum_f32` (low-precision backward) otherwise."""
  if a.dtype == jnp.float32 and b.dtype == jnp.float32:
    return jnp.einsum(spec, a, b)
  return _einsum_f32(spec, a, b)


def xla_attention(q, k, v, q_raw=None, k_raw=None, rotated_where=None, allowed=None):
  """Softmax attention of [B, S, N, H] q, k, v computed in the [B, N, S, H] layout -> [B, S, N, H].

  The XLA path (``model.attention='xla'``). ``jax.nn.dot_product_attention``'s XLA fallback contracts
  [B, S, N, H] operands directly; with the heads moved next to the batch first, the score and value matmuls are
  batched over contiguous [S, H] blocks, and the transposes fuse into the producers (the rotary embedding): the
  attention layer's gradient at the ``bench_cpu`` sizes took 105 ms instead of 129 ms (BENCHMARKS.md). Scores,
  the softmax and the weighted sum accumulate in float32 whatever the compute dtype; their backward matmuls run in
  the compute dtype (:func:`_einsum_f32`).

  With ``q_raw``, ``k_raw`` and a boolean ``rotated_where`` [1, 1, S, S], the score of a pair is ``q . k`` where
  it is True and ``q_raw . k_raw`` elsewhere (``Attention(cross_modal_rope=False)``). A boolean ``allowed``
  [1 or B, N, S, S] leaves out the pairs where it is False (every query must keep at least one key).
  """
  heads_first = lambda t: jnp.swapaxes(t, 1, 2)
  scale = jnp.asarray(1.0 / np.sqrt(q.shape[-1]), q.dtype)
  score = lambda q, k: _einsum("bnqh,bnkh->bnqk", heads_first(q) * scale, heads_first(k))
  # The masks enter as arithmetic on [1, .., S, S] constants, not as selects: a select's backward keeps its
  # predicate broadcast to [B, N, S, S], which a scan over rematerialised layers then carries for every layer.
  # Both are exact: s * 1 + t * 0 = s for finite scores, and s - 1e30 = -1e30 in float32 for |s| << 1e22.
  scores = score(q, k)
  if rotated_where is not None:
    rotated = rotated_where.astype(jnp.float32)
    scores = scores * rotated + score(q_raw, k_raw) * (1.0 - rotated)
  if allowed is not None:
    scores = scores + jnp.where(allowed, 0.0, -1e30).astype(jnp.float32)
  # Normalised after the value matmul, as flash attention does: one divide per output [.., S, H] instead of per
  # score [.., S, S]. The max is a constant shift (softmax ignores it), so it takes no gradient.
  weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
  out = _einsum("bnqk,bnkh->bnqh", weights.astype(v.dtype), heads_first(v))
  return heads_first(out / weights.sum(axis=-1, keepdims=True)).astype(v.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Masks (numpy, from the layout's static segment ids)
# ---------------------------------------------------------------------------------------------------------------
def head_masks(segment, is_text, num_heads: int, directional: int, xp=np, cross_modal: int = 0):
  """bool [N, S, S], True where a query may attend a key: the first P heads look left and the next P right
  between the words of one text segment; with ``cross_modal = C``, in the first C heads an image query sees no
  text key (only text reads the image there) and in the next C a text query sees no image key (only the image
  reads the text); every other pair and head sees everything. The two kinds of restriction are independent and
  combine (a head may be both left-looking and text-reads-image).

  ``xp=jnp`` builds it inside the program from the (iota-built) segment ids, so no [N, S, S] constant is baked
  into it; ``xp=np`` gives the static mask the splash kernel is built from."""
  s = segment.shape[0]
  text_pair = is_text[:, None] & is_text[None, :] & (segment[:, None] == segment[None, :])
  idx = xp.arange(s)
  left = ~text_pair | (idx[None, :] <= idx[:, None])
  right = ~text_pair | (idx[None, :] >= idx[:, None])
  every = xp.ones((s, s), bool)
  sides = xp.stack([left] * directional + [right] * directional + [every] * (num_heads - 2 * directional))
  if not cross_modal:
    return sides
  text_reads_image = ~(~is_text[:, None] & is_text[None, :])     # no image query -> text key pair
  image_reads_text = ~(is_text[:, None] & ~is_text[None, :])     # no text query -> image key pair
  crossing = xp.stack([text_reads_image] * cross_modal + [image_reads_text] * cross_modal
                      + [every] * (num_heads - 2 * cross_modal))
  return sides & crossing


def splash_mask(segment: np.ndarray, is_text: np.ndarray, num_heads: int, directional: int,
                within_segment_rope: bool, groups: np.ndarray | None = None, cross_modal: int = 0) -> np.ndarray:
  """bool [N, S', K'] of the splash call: S' = S padded to a multiple of :data:`SPLASH_BLOCK`; K' = S' (one key
  set) or 2 S' (keys scored with the rotated q, k within a segment, then the unrotated ones across segments).

  Padded keys are never attended; padded queries attend the real keys (their outputs are dropped)."""
  s = segment.shape[0]
  pad = -(-s // SPLASH_BLOCK) * SPLASH_BLOCK
  allowed = head_masks(segment, is_text, num_heads, directional, cross_modal=cross_modal)   # [N, S, S]
  groups = segment if groups is None else groups   # the rotating pairs: within a group (layers.Attention)
  same = groups[:, None] == groups[None, :]
  parts = [allowed & same, allowed & ~same] if within_segment_rope else [allowed]
  out = np.zeros((num_heads, pad, pad * len(parts)), bool)
  for i, part in enumerate(parts):
    out[:, :s, i * pad:i * pad + s] = part
  out[:, s:, :s] = True
  return out


# ---------------------------------------------------------------------------------------------------------------
# Splash (TPU)
# ---------------------------------------------------------------------------------------------------------------
def splash_attention(q, k, v, mask: np.ndarray, q_raw=None, k_raw=None, rotating: int = 0, interpret: bool = False,
                     key_valid=None):
  """Attention of [B, S, N, H] q, k, v with the splash kernel -> [B, S, N, H].

  Args:
    q, k, v: queries (rotated), keys (rotated), values.
    mask: bool [N, S', K'] from :func:`splash_mask`.
    q_raw, k_raw: the unrotated queries and keys, when ``mask`` has two key sets (rotary within a segment).
    rotating: how many leading head dims the rotary embedding turns (those differ between q and q_raw).
    interpret: run the kernel in the Pallas interpreter (any backend: tests on CPU).
    key_valid: bool [B, S] or None: False at the keys no query may attend (``model.pad_key_id``), given to the
      kernel as segment ids (a pad is segment 1, every other token and the block padding segment 0), so real
      queries never see pads (a pad's own query sees only pads; its output is never read).

  Inside ``shard_map`` over the mesh in scope (the abstract mesh of :func:`unimm_jax.sharding.scope`), the batch
  split as the logical rules split ``batch`` and the heads as they split ``heads``; the sequence must be whole.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_masks  # pylint: disable=g-import-not-at-top
  b, s, n, h = q.shape
  pad = mask.shape[1]
  heads_first = lambda t: jnp.swapaxes(t, 1, 2)                                        # [B, N, S, H]
  padded = lambda t: jnp.pad(heads_first(t), ((0, 0), (0, 0), (0, pad - s), (0, 0)))
  q = q * jnp.asarray(1.0 / np.sqrt(h), q.dtype)
  if mask.shape[2] == pad:
    qs, ks, vs = padded(q), padded(k), padded(v)
  else:
    # [rot(q_r), q_r, q_p] against [rot(k_r), 0, k_p] (within a segment) and [0, k_r, k_p] (across).
    r = rotating
    q_raw = q_raw * jnp.asarray(1.0 / np.sqrt(h), q.dtype)
    zeros = jnp.zeros_like(k[..., :r])
    qs = padded(jnp.concatenate([q[..., :r], q_raw[..., :r], q[..., r:]], -1))
    ks = jnp.concatenate([padded(jnp.concatenate([k[..., :r], zeros, k[..., r:]], -1)),
                          padded(jnp.concatenate([zeros, k_raw[..., :r], k_raw[..., r:]], -1))], axis=2)
    vs = jnp.concatenate([padded(v), padded(v)], axis=2)

  segment_ids = None
  if key_valid is not None:
    ids = jnp.pad((~key_valid).astype(jnp.int32), ((0, 0), (0, pad - s)))               # [B, S']
    segment_ids = splash.SegmentIds(q=ids, kv=jnp.concatenate([ids] * (ks.shape[2] // pad), axis=1))
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    kernel = splash.make_splash_mha(splash_masks.MultiHeadMask([splash_masks.NumpyMask(m) for m in mask]),
                                    head_shards=1, q_seq_shards=1, interpret=interpret)
    out = jax.vmap(kernel)(qs, ks, vs, segment_ids=segment_ids) if segment_ids is not None else \
        jax.vmap(kernel)(qs, ks, vs)
  else:
    batch_axes, length_axes, head_axes, _ = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
    if length_axes is not None:
      raise AttentionConfigError(f"config.model.attention='splash' needs whole sequences on each device; the mesh "
                                 f"rules split 'length' over {length_axes}")
    if batch_axes is not None and b % int(np.prod([mesh.shape[a] for a in _axes(batch_axes)])):
      batch_axes = None   # a batch the mesh cannot split (the initialiser's one example): each device runs it whole
    head_shards = int(np.prod([mesh.shape[a] for a in _axes(head_axes)])) if head_axes else 1
    if n % head_shards:
      raise AttentionConfigError(f"config.model.num_heads={n} cannot be split over the {head_shards} devices of "
                                 f"mesh axes {head_axes}")
    kernel = splash.make_splash_mha(splash_masks.MultiHeadMask([splash_masks.NumpyMask(m) for m in mask]),
                                    head_shards=head_shards, q_seq_shards=1, interpret=interpret)
    kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, jax.P(head_axes, None)))
    spec = jax.P(batch_axes, head_axes, None, None)
    if segment_ids is None:
      run = jax.shard_map(lambda kernel, q, k, v: jax.vmap(kernel)(q, k, v), mesh=mesh,
                          in_specs=(kernel_spec, spec, spec, spec), out_specs=spec, check_vma=False)
      out = run(kernel, qs, ks, vs)
    else:
      ids_spec = splash.SegmentIds(q=jax.P(batch_axes, None), kv=jax.P(batch_axes, None))
      run = jax.shard_map(lambda kernel, q, k, v, ids: jax.vmap(kernel)(q, k, v, segment_ids=ids), mesh=mesh,
                          in_specs=(kernel_spec, spec, spec, spec, ids_spec), out_specs=spec, check_vma=False)
      out = run(kernel, qs, ks, vs, segment_ids)
  return heads_first(out[:, :, :s]).astype(v.dtype)


def _axes(axes):
  return axes if isinstance(axes, tuple) else (axes,)


def cudnn_attention(q, k, v):
  """cuDNN flash attention of [B, S, N, H] q, k, v (bfloat16 or float16) -> [B, S, N, H]."""
  return jax.nn.dot_product_attention(q, k, v, is_causal=False, implementation="cudnn")
