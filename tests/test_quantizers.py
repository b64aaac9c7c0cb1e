"""Quantizers of the learned image tokenizer: FSQ's straight-through gradient and index <-> code bijection; the
VQ codebook's EMA update and dead-code restart; code statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.models import quantizers as q

LEVELS = (8, 5, 5, 3)


def test_fsq_takes_exactly_the_levels_of_each_channel():
  z = jnp.linspace(-20.0, 20.0, 20_001)[:, None] * jnp.ones((1, len(LEVELS)))
  codes = np.asarray(q.fsq_quantize(z, LEVELS))
  for c, levels in enumerate(LEVELS):
    values = np.unique(codes[:, c])
    assert len(values) == levels, (levels, values)
    assert values.min() >= -1.0 and values.max() <= 1.0


def test_fsq_index_code_bijection():
  n = q.fsq_codebook_size(LEVELS)
  assert n == 8 * 5 * 5 * 3
  idx = jnp.arange(n)
  codes = q.fsq_indexes_to_codes(idx, LEVELS)
  # Every index maps to a distinct code and back.
  assert len({tuple(c) for c in np.asarray(codes).tolist()}) == n
  np.testing.assert_array_equal(np.asarray(q.fsq_codes_to_indexes(codes, LEVELS)), np.arange(n))
  # Codes that quantization produces are exactly these: quantize a dense sweep, map to indexes and back.
  axes = np.meshgrid(*[np.linspace(-3, 3, 4 * l + 1) for l in LEVELS], indexing="ij")
  grid = jnp.asarray(np.stack([a.reshape(-1) for a in axes], axis=1), jnp.float32)
  quant = q.fsq_quantize(grid, LEVELS)
  back = q.fsq_indexes_to_codes(q.fsq_codes_to_indexes(quant, LEVELS), LEVELS)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(quant))
  assert set(np.asarray(q.fsq_codes_to_indexes(quant, LEVELS)).tolist()) == set(range(n))


def test_fsq_straight_through_gradient_is_the_gradient_of_the_bound():
  z = jax.random.normal(jax.random.PRNGKey(0), (64, len(LEVELS))) * 2.0
  w = jax.random.normal(jax.random.PRNGKey(1), (64, len(LEVELS)))
  grad = jax.grad(lambda z: jnp.sum(w * q.fsq_quantize(z, LEVELS)))(z)
  half_width = np.asarray(LEVELS, np.float32) // 2
  expected = jax.grad(lambda z: jnp.sum(w * q.fsq_bound(z, LEVELS) / half_width))(z)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-6)
  assert np.all(np.abs(np.asarray(grad)) > 0)          # plain rounding would give zero everywhere
  rounded_grad = jax.grad(lambda z: jnp.sum(w * jnp.round(q.fsq_bound(z, LEVELS))))(z)
  assert np.all(np.asarray(rounded_grad) == 0)


def test_vq_nearest_and_straight_through():
  codes = jnp.asarray([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
  z = jnp.asarray([[0.1, -0.1], [0.9, 0.2], [0.2, 1.5], [0.6, 0.0]])
  quant, idx, commitment = q.vq_quantize(z, codes)
  np.testing.assert_array_equal(np.asarray(idx), [0, 1, 2, 1])
  np.testing.assert_allclose(np.asarray(quant), np.asarray(codes)[[0, 1, 2, 1]], atol=1e-7)
  np.testing.assert_allclose(float(commitment), float(np.mean((np.asarray(z) - np.asarray(codes)[[0, 1, 2, 1]]) ** 2)))
  grad = jax.grad(lambda z: jnp.sum(q.vq_quantize(z, codes)[0] * 3.0))(z)
  np.testing.assert_allclose(np.asarray(grad), 3.0)


def test_vq_ema_update_moves_codes_to_the_mean_of_their_vectors():
  book = q.VQCodebook(codes=jnp.asarray([[0.0, 0.0], [5.0, 5.0]]), ema_count=jnp.asarray([1.0, 1.0]),
                      ema_sum=jnp.asarray([[0.0, 0.0], [5.0, 5.0]]))
  z = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [4.0, 4.0]])
  idx = q.vq_nearest(z, book.codes)
  np.testing.assert_array_equal(np.asarray(idx), [0, 0, 1])
  decay = 0.5
  new, restarted = q.vq_ema_update(book, z, idx, jax.random.PRNGKey(0), decay=decay, dead_threshold=0.0, eps=0.0)
  count = decay * np.array([1.0, 1.0]) + (1 - decay) * np.array([2.0, 1.0])
  total = decay * np.array([[0.0, 0.0], [5.0, 5.0]]) + (1 - decay) * np.array([[1.0, 1.0], [4.0, 4.0]])
  np.testing.assert_allclose(np.asarray(new.ema_count), count)
  np.testing.assert_allclose(np.asarray(new.ema_sum), total)
  np.testing.assert_allclose(np.asarray(new.codes), total / count[:, None], rtol=1e-6)
  assert int(restarted) == 0
  # Repeated updates on the same batch converge to the mean of each code's vectors.
  step = jax.jit(lambda b, key: q.vq_ema_update(b, z, q.vq_nearest(z, b.codes), key, decay=decay,
                                                 dead_threshold=0.0, eps=0.0)[0])
  for i in range(60):
    new = step(new, jax.random.PRNGKey(i))
  np.testing.assert_allclose(np.asarray(new.codes), [[0.5, 0.5], [4.0, 4.0]], atol=1e-5)


def test_vq_dead_codes_are_restarted_onto_batch_vectors():
  k, d = 16, 3
  book = q.vq_init(jax.random.PRNGKey(0), k, d)
  book = book.replace(codes=book.codes.at[3:].set(100.0), ema_sum=book.ema_sum.at[3:].set(100.0))  # far away
  z = jax.random.normal(jax.random.PRNGKey(1), (256, d))
  idx = q.vq_nearest(z, book.codes)
  assert set(np.asarray(idx).tolist()) <= {0, 1, 2}
  new = book
  step = jax.jit(lambda b, key: q.vq_ema_update(b, z, q.vq_nearest(z, b.codes), key, decay=0.9, dead_threshold=0.1))
  for i in range(40):    # EMA counts of the unused codes decay below the threshold...
    new, restarted = step(new, jax.random.PRNGKey(i))
    if int(restarted):
      break
  assert int(restarted) >= k - 3
  codes = np.asarray(new.codes)
  # ...and then each sits on a vector of the batch, with a fresh count, so it is chosen again.
  batch = np.asarray(z)
  for c in range(3, k):
    assert np.min(np.abs(batch - codes[c]).sum(1)) < 1e-6
    assert float(new.ema_count[c]) == 1.0
  used = set(np.asarray(q.vq_nearest(z, new.codes)).tolist())
  assert len(used) > 3 + (k - 3) // 2


def test_code_statistics():
  s = q.code_statistics(np.array([5, 5, 5, 5, 0, 0, 0, 0]))
  assert s["usage"] == 0.5 and s["codes_used"] == 4
  assert s["perplexity"] == pytest.approx(4.0)
  assert q.code_statistics(np.array([7, 0, 0]))["perplexity"] == pytest.approx(1.0)


def test_bad_levels_are_rejected():
  with pytest.raises(ValueError, match="levels"):
    q.fsq_quantize(jnp.zeros((2, 2)), (8, 1))
