"""Quantizers of the learned image tokenizer: finite scalar quantization (default) and a VQ codebook.

Both are pure functions of arrays (no Flax module), so the method sits next to its formula and the network
(``models/autoencoder.py``) knows nothing about quantization.

FSQ (Mentzer et al., 2023, "Finite Scalar Quantization: VQ-VAE Made Simple")
---------------------------------------------------------------------------
Each of the d latent channels is bounded and rounded to one of L_i levels; the code is the tuple of levels, so
the codebook is the implicit grid of prod(L_i) points and needs no parameters, no EMA, no restarts:

    bound(z)_i = tanh(z_i + s_i) * h_i - o_i,     h_i = (L_i - 1)(1 - eps)/2,  o_i = 0.5 if L_i even else 0,
                                                 s_i = atanh(o_i / h_i)
    q_i        = round(bound(z)_i) / (L_i // 2)   with a straight-through gradient:
                 round_ste(x) = x + stop_gradient(round(x) - x), so dq/dz = d bound/dz.

The integer levels round(bound(z)_i) lie in [-(L_i // 2), L_i - 1 - L_i // 2], i.e. exactly L_i values; the code
index is their mixed-radix number ``sum_i (level_i + L_i // 2) * prod_{j<i} L_j`` (channel 0 least significant),
a bijection between [0, prod L) and the grid (:func:`fsq_indexes_to_codes` inverts :func:`fsq_codes_to_indexes`).

VQ (van den Oord et al., 2017; EMA codebook of Razavi et al., 2019)
-------------------------------------------------------------------
Each latent vector z is replaced by its nearest codebook row e_k (L2); the encoder gets a straight-through
gradient and a commitment loss beta * |z - sg(e_k)|^2. The codebook is not trained by gradients but by an
exponential moving average of the vectors assigned to each code:

    N_k <- gamma N_k + (1 - gamma) n_k,          m_k <- gamma m_k + (1 - gamma) sum_{z assigned to k} z
    e_k  = m_k / N~_k,  N~_k = (N_k + eps) / (sum N + K eps) * sum N   (Laplace smoothing: never divide by 0)

Dead-code restart: a code whose EMA count N_k falls below ``dead_threshold`` (it is never chosen) is moved onto a
random latent vector of the current batch, with N_k = 1 and m_k = that vector, so the whole codebook stays in use
(the fix for codebook collapse used by e.g. Jukebox and SoundStream).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

_FSQ_EPS = 1e-3


# ---------------------------------------------------------------------------------------------------------------
# FSQ
# ---------------------------------------------------------------------------------------------------------------
def check_fsq_levels(levels: Sequence[int]) -> tuple[int, ...]:
  levels = tuple(int(l) for l in levels)
  if not levels or any(l < 2 for l in levels):
    raise ValueError(f"FSQ levels {levels} must be a non-empty tuple of integers >= 2, e.g. (8, 5, 5, 5)")
  return levels


def fsq_codebook_size(levels: Sequence[int]) -> int:
  return math.prod(check_fsq_levels(levels))


def round_ste(x: jax.Array) -> jax.Array:
  """round(x) forward, identity backward (straight-through estimator)."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def fsq_bound(z: jax.Array, levels: Sequence[int]) -> jax.Array:
  """tanh(z + s) * h - o (module docstring): values whose rounding takes exactly L levels. [..., d] -> [..., d]"""
  lv = np.asarray(check_fsq_levels(levels), np.float32)
  half_l = (lv - 1.0) * (1.0 - _FSQ_EPS) / 2.0
  offset = np.where(lv % 2 == 1, 0.0, 0.5).astype(np.float32)
  shift = np.arctanh(offset / half_l).astype(np.float32)
  return jnp.tanh(z + shift) * half_l - offset


def fsq_quantize(z: jax.Array, levels: Sequence[int]) -> jax.Array:
  """Quantized codes in [-1, 1] with straight-through gradients.  float [..., d] -> float32 [..., d]"""
  half_width = np.asarray(check_fsq_levels(levels), np.float32) // 2
  return round_ste(fsq_bound(z.astype(jnp.float32), levels)) / half_width


def _basis(levels: Sequence[int]) -> np.ndarray:
  return np.cumprod((1,) + tuple(levels[:-1])).astype(np.int32)


def fsq_codes_to_indexes(codes: jax.Array, levels: Sequence[int]) -> jax.Array:
  """Quantized codes (values of :func:`fsq_quantize`) -> code index.  float [..., d] -> int32 [...]"""
  lv = np.asarray(check_fsq_levels(levels), np.float32)
  if codes.shape[-1] != len(lv):
    raise ValueError(f"codes have {codes.shape[-1]} channels, the FSQ levels {tuple(levels)} need {len(lv)}")
  digits = jnp.round(codes * (lv // 2) + lv // 2).astype(jnp.int32)     # [..., d] in [0, L_i)
  return jnp.sum(digits * _basis(levels), axis=-1)


def fsq_indexes_to_codes(indexes: jax.Array, levels: Sequence[int]) -> jax.Array:
  """Inverse of :func:`fsq_codes_to_indexes`.  int [...] -> float32 [..., d]"""
  lv = np.asarray(check_fsq_levels(levels), np.int32)
  digits = (jnp.asarray(indexes, jnp.int32)[..., None] // _basis(levels)) % lv
  return (digits - lv // 2).astype(jnp.float32) / (lv // 2).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# VQ with an EMA codebook
# ---------------------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class VQCodebook:
  """The codebook and its EMA statistics (not trained by gradients)."""

  codes: jax.Array       # float32 [K, D]: e_k = ema_sum_k / smoothed ema_count_k
  ema_count: jax.Array   # float32 [K]: N_k
  ema_sum: jax.Array     # float32 [K, D]: m_k


def vq_init(key: jax.Array, size: int, dim: int) -> VQCodebook:
  """Codes drawn like a latent of unit scale; counts 1 so the first batches move them (nothing is 'dead' yet)."""
  if size < 1 or dim < 1:
    raise ValueError(f"VQ codebook size {size} and dim {dim} must be >= 1")
  codes = jax.random.normal(key, (size, dim), jnp.float32)
  return VQCodebook(codes=codes, ema_count=jnp.ones((size,), jnp.float32), ema_sum=codes)


def vq_nearest(z: jax.Array, codes: jax.Array) -> jax.Array:
  """Index of the nearest code (L2) of each vector.  float [..., D], [K, D] -> int32 [...]"""
  flat = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
  dist = jnp.sum(codes**2, axis=1)[None, :] - 2.0 * flat @ codes.T      # |z - e|^2 - |z|^2
  return jnp.argmin(dist, axis=1).astype(jnp.int32).reshape(z.shape[:-1])


def vq_quantize(z: jax.Array, codes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(quantized with straight-through gradient [..., D], indexes int32 [...], commitment loss |z - sg(e)|^2 [])."""
  idx = vq_nearest(z, codes)
  e = codes[idx]
  commitment = jnp.mean(jnp.square(z - jax.lax.stop_gradient(e)))
  return z + jax.lax.stop_gradient(e - z), idx, commitment


def vq_ema_update(book: VQCodebook, z: jax.Array, idx: jax.Array, key: jax.Array, *, decay: float,
                  dead_threshold: float, eps: float = 1e-5) -> tuple[VQCodebook, jax.Array]:
  """One EMA step of the codebook on a batch, then dead-code restart (formulas in the module docstring).

  Args:
    z: float [..., D] the batch's latent vectors (gradients are not taken through this).
    idx: int32 [...] their assigned codes.
  Returns:
    (new codebook, number of codes restarted: int32 []).
  """
  k = book.codes.shape[0]
  flat = jax.lax.stop_gradient(z).reshape(-1, z.shape[-1]).astype(jnp.float32)      # [M, D]
  onehot = jax.nn.one_hot(idx.reshape(-1), k, dtype=jnp.float32)                     # [M, K]
  count = decay * book.ema_count + (1.0 - decay) * onehot.sum(0)
  total = decay * book.ema_sum + (1.0 - decay) * onehot.T @ flat
  n = count.sum()
  smoothed = (count + eps) / (n + k * eps) * n
  codes = total / smoothed[:, None]
  # Restart: each dead code takes a random vector of the batch (drawn with replacement; distinct in practice).
  dead = count < dead_threshold
  pick = flat[jax.random.randint(key, (k,), 0, flat.shape[0])]
  codes = jnp.where(dead[:, None], pick, codes)
  total = jnp.where(dead[:, None], pick, total)
  count = jnp.where(dead, 1.0, count)
  return VQCodebook(codes=codes, ema_count=count, ema_sum=total), dead.sum().astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------------
# Code statistics
# ---------------------------------------------------------------------------------------------------------------
def code_statistics(counts: np.ndarray) -> dict[str, float]:
  """{'usage': share of codes used at least once, 'perplexity': exp(entropy) of the code frequencies}.

  counts: int [K] how often each code was chosen. Perplexity is K for uniform use, 1 for a single code.
  """
  counts = np.asarray(counts, np.float64)
  p = counts / max(counts.sum(), 1.0)
  nz = p[p > 0]
  return {"usage": float((counts > 0).mean()), "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
          "codes_used": int((counts > 0).sum()), "codebook_size": int(len(counts))}
