"""Invariants of the masking schedules, the corruption and the diffusion loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.method import diffusion as loss_lib
from unimm_jax.method import tasks as tasks_lib
from unimm_jax.method.diffusion import MaskedDiffusion, token_nll
from unimm_jax.method.schedules import get_schedule
from unimm_jax.models.transformer import NEG_INF
from unimm_jax.sequence import SequenceLayout, image, text


def _method(layout, schedule, weighting="elbo", modality_weights=(1.0, 1.0), tasks=None, shared_time=False):
  names, weights, roles = tasks_lib.mixture(tasks or {n: 0.2 for n in tasks_lib.BUILTIN}, layout)
  return MaskedDiffusion(layout, schedule, names, tuple(float(w) for w in weights), tuple(map(tuple, roles.tolist())),
                         weighting, 1e-3, shared_time, (("text", modality_weights[0]), ("image", modality_weights[1])))


def _loss(logits, tokens, masked, c, layout, schedule, weighting, modality_weights=(1.0, 1.0)):
  return _method(layout, schedule, weighting, modality_weights).loss(token_nll(logits, tokens), masked, c)


def _elbo_bits(logits, tokens, masked, t, layout, schedule):
  """Every segment noised at times t."""
  c = loss_lib.Corruption(t=t, mask_prob=jnp.zeros_like(t), noised=jnp.ones(t.shape, bool),
                          task=jnp.zeros(t.shape[0], jnp.int32))
  return _method(layout, schedule).elbo_bits(token_nll(logits, tokens), masked, c)

SCHEDULES = [("linear", {}), ("cosine", {}), ("polynomial", {"poly_power": 3.0})]


@pytest.mark.parametrize("name,kw", SCHEDULES)
def test_schedule_endpoints_derivative_and_weight(name, kw):
  s = get_schedule(name, **kw)
  np.testing.assert_allclose(s.alpha(jnp.float32(0.0)), 1.0, atol=1e-6)
  np.testing.assert_allclose(s.alpha(jnp.float32(1.0)), 0.0, atol=1e-6)
  t = jnp.linspace(0.05, 0.95, 19)
  np.testing.assert_allclose(s.dalpha(t), jax.vmap(jax.grad(s.alpha))(t), rtol=1e-4)
  np.testing.assert_allclose(s.weight(t), -s.dalpha(t) / (1.0 - s.alpha(t)), rtol=1e-4)
  assert bool(jnp.all(jnp.diff(s.alpha(t)) < 0)), "alpha must decrease"


def test_low_discrepancy_times_cover_the_interval():
  t = np.sort(np.asarray(loss_lib.low_discrepancy_times(jax.random.PRNGKey(3), 64, 1e-3)))
  gaps = np.diff(t)
  np.testing.assert_allclose(gaps[gaps > 1e-3], 1 / 64, atol=1e-5)  # evenly spaced but for the t_min clip
  assert t.min() >= 1e-3 and t.max() <= 1.0


LAYOUT = SequenceLayout.two_segment(text_vocab=11, image_vocab=7, text_len=16, image_grid=(8, 8))
TEXT_LEN, IMAGE_LEN = 16, 64


@pytest.mark.parametrize("name,kw", SCHEDULES)
@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_masking_rate_matches_one_minus_alpha(name, kw, t):
  schedule = get_schedule(name, **kw)
  batch = 2048
  tokens = jnp.zeros((batch, LAYOUT.seq_len), jnp.int32)
  prob = schedule.mask_prob(jnp.float32(t))
  c = loss_lib.Corruption(t=jnp.full((batch, 2), t), mask_prob=jnp.full((batch, 2), prob),
                          noised=jnp.ones((batch, 2), bool), task=jnp.zeros(batch, jnp.int32))
  noisy, masked = _method(LAYOUT, schedule).corrupt(jax.random.PRNGKey(0), tokens, c)
  assert bool(jnp.all((noisy == LAYOUT.mask_id) == masked))
  for seg in (slice(0, TEXT_LEN), slice(TEXT_LEN, None)):
    n = masked[:, seg].size
    rate = float(masked[:, seg].mean())
    sigma = math.sqrt(float(prob) * (1 - float(prob)) / n)
    assert abs(rate - float(prob)) < 4 * sigma + 1e-6, (rate, float(prob))


def test_tasks_clean_and_null_modalities():
  batch = 4096
  schedule = get_schedule("linear")
  m = _method(LAYOUT, schedule)
  c = m.sample_corruption(jax.random.PRNGKey(1), batch)
  tokens = jnp.zeros((batch, LAYOUT.seq_len), jnp.int32)
  _, masked = m.corrupt(jax.random.PRNGKey(2), tokens, c)
  text_m = np.asarray(masked[:, : TEXT_LEN])
  image_m = np.asarray(masked[:, TEXT_LEN:])
  task = np.asarray(c.task)
  names = m.task_names
  assert names == tasks_lib.BUILTIN
  assert not text_m[task == names.index("text_to_image")].any()      # text given
  assert not image_m[task == names.index("image_to_text")].any()     # image given
  assert text_m[task == names.index("image_only")].all()             # null text condition
  assert image_m[task == names.index("text_only")].all()             # null image condition
  noised = np.asarray(c.noised)
  assert (noised[:, 0] == np.isin(task, [0, 2, 4])).all() and (noised[:, 1] == np.isin(task, [0, 1, 3])).all()
  freq = np.bincount(task, minlength=5) / batch
  np.testing.assert_allclose(freq, 0.2, atol=0.03)
  t = np.asarray(c.t)
  assert not np.allclose(t[:, 0], t[:, 1]), "independent times by default"
  shared = _method(LAYOUT, schedule, shared_time=True).sample_corruption(jax.random.PRNGKey(1), 64, [1, 0, 0, 0, 0])
  np.testing.assert_array_equal(shared.t[:, 0], shared.t[:, 1])


# ---- the loss on a hand-made batch ---------------------------------------------------------------------------
TINY = SequenceLayout.two_segment(text_vocab=3, image_vocab=2, text_len=2, image_grid=(1, 1))  # S = 3, V = 6, MASK = 5


def _logits_from_probs(rows):
  """rows: per position a dict id -> probability over the allowed ids."""
  out = np.full((len(rows), TINY.size), NEG_INF, np.float32)
  for s, row in enumerate(rows):
    for i, p in row.items():
      out[s, i] = math.log(p)
  return out


def test_loss_on_hand_made_batch_equals_hand_computation():
  # Example 0 (joint, t_text=0.5, t_image=0.25): both text positions masked, the image token masked.
  # Example 1 (text_to_image, text clean, t_image=0.8): only the image token masked.
  tokens = jnp.array([[0, 1, 3], [2, 2, 4]], jnp.int32)   # image ids are 3, 4 (offset 3)
  masked = jnp.array([[True, True, True], [False, False, True]])
  logits = jnp.stack([
      _logits_from_probs([{0: 0.5, 1: 0.25, 2: 0.25}, {0: 0.5, 1: 0.25, 2: 0.25}, {3: 0.125, 4: 0.875}]),
      _logits_from_probs([{0: 1 / 3, 1: 1 / 3, 2: 1 / 3}, {2: 0.5, 0: 0.25, 1: 0.25}, {3: 0.5, 4: 0.5}]),
  ])
  c = loss_lib.Corruption(t=jnp.array([[0.5, 0.25], [0.0, 0.8]]), mask_prob=jnp.zeros((2, 2)),
                          noised=jnp.array([[True, True], [False, True]]), task=jnp.array([0, 1]))
  lin = get_schedule("linear")
  # By hand, linear schedule w(t) = 1/t, nats per token:
  #   text:  only example 0 noised: w(0.5) * (log 2 + log 4) / 2 = 2 * 3 log 2 / 2 = 3 log 2
  #   image: ex 0: w(0.25) * log 8 / 1 = 4 * 3 log 2 = 12 log 2;  ex 1: w(0.8) * log 2 = 1.25 log 2
  #          mean over the two = 6.625 log 2
  ln2 = math.log(2)
  total, parts = _loss(logits, tokens, masked, c, TINY, lin, "elbo", (1.0, 0.5))
  np.testing.assert_allclose(parts["loss_text"], 3 * ln2, rtol=1e-6)
  np.testing.assert_allclose(parts["loss_image"], 6.625 * ln2, rtol=1e-6)
  np.testing.assert_allclose(total, 3 * ln2 + 0.5 * 6.625 * ln2, rtol=1e-6)
  # flat: text: (log 2 + log 4) / 2 = 1.5 log 2; image: (log 8 + log 2) / 2 = 2 log 2
  _, flat = _loss(logits, tokens, masked, c, TINY, lin, "flat")
  np.testing.assert_allclose(flat["loss_text"], 1.5 * ln2, rtol=1e-6)
  np.testing.assert_allclose(flat["loss_image"], 2 * ln2, rtol=1e-6)
  # tokens: one mean over all masked image tokens of the batch, (log 8 + log 2) / 2, the same as flat here
  # (one masked token per example); the next test tells them apart.
  _, tok = _loss(logits, tokens, masked, c, TINY, lin, "tokens")
  np.testing.assert_allclose(tok["loss_text"], 1.5 * ln2, rtol=1e-6)
  np.testing.assert_allclose(tok["loss_image"], 2 * ln2, rtol=1e-6)
  # The validation ELBO in bits: ex 0 text 3, image 12 (the clean text of ex 1 is scored as if noised at t=0.0
  # only when the caller says so; elbo_bits treats every modality as noised).
  bits = _elbo_bits(logits[:1], tokens[:1], masked[:1], c.t[:1], TINY, lin)
  np.testing.assert_allclose(bits, [[3.0, 12.0]], rtol=1e-6)


def test_tokens_weighting_weighs_examples_by_their_masked_count():
  # Text of ex 0: two masked tokens with nll log 2 and log 4; text of ex 1: one masked token with nll log 8.
  tokens = jnp.array([[0, 1, 3], [2, 2, 4]], jnp.int32)
  masked = jnp.array([[True, True, False], [True, False, False]])
  logits = jnp.stack([
      _logits_from_probs([{0: 0.5, 1: 0.25, 2: 0.25}, {0: 0.5, 1: 0.25, 2: 0.25}, {3: 0.5, 4: 0.5}]),
      _logits_from_probs([{2: 0.125, 0: 0.875}, {2: 0.5, 0: 0.5}, {3: 0.5, 4: 0.5}]),
  ])
  c = loss_lib.Corruption(t=jnp.array([[0.5, 0.0], [0.5, 0.0]]), mask_prob=jnp.zeros((2, 2)),
                          noised=jnp.array([[True, False], [True, False]]), task=jnp.array([2, 2]))
  lin, ln2 = get_schedule("linear"), math.log(2)
  _, flat = _loss(logits, tokens, masked, c, TINY, lin, "flat")
  _, tok = _loss(logits, tokens, masked, c, TINY, lin, "tokens")
  np.testing.assert_allclose(flat["loss_text"], (1.5 + 3) / 2 * ln2, rtol=1e-6)   # mean of per-example means
  np.testing.assert_allclose(tok["loss_text"], (1 + 2 + 3) / 3 * ln2, rtol=1e-6)   # mean over the 3 tokens
  assert float(tok["loss_image"]) == 0.0   # no image is noised


def test_segment_loss_weight_counts_a_segment_as_repeated_pairs():
  # [text "question" 1 | image 1x1 | text "answer" 1]; both examples' question and answer are noised and masked.
  layout = SequenceLayout((text("question", 1), image("image", (1, 1)), text("answer", 1)), 3, 2)
  masked = jnp.array([[True, False, True], [True, False, True]])
  nll = jnp.log(jnp.array([[2.0, 1.0, 4.0], [8.0, 1.0, 2.0]]))        # -log p = log 2, ., log 4 / log 8, ., log 2
  c = loss_lib.Corruption(t=jnp.full((2, 3), 0.5), mask_prob=jnp.zeros((2, 3)),
                          noised=jnp.array([[True, False, True]] * 2), task=jnp.zeros(2, jnp.int32))
  ln2 = math.log(2)

  def loss(segment_weights):
    m = MaskedDiffusion(layout, get_schedule("linear"), ("vqa",), (1.0,),
                        ((tasks_lib.NOISED, tasks_lib.CLEAN, tasks_lib.NOISED),), "flat",
                        segment_weights=segment_weights)
    return m.loss(nll, masked, c)[1]["loss_text"]

  # Unweighted: mean over the 4 (example, text segment) pairs, (1 + 3 + 2 + 1) / 4 log 2.
  np.testing.assert_allclose(loss(()), 7 / 4 * ln2, rtol=1e-6)
  # answer x 3: (1 + 3 + 3 * (2 + 1)) / 4 log 2, and not renormalised by the weights.
  np.testing.assert_allclose(loss((("answer", 3.0),)), 13 / 4 * ln2, rtol=1e-6)
  np.testing.assert_allclose(loss((("answer", 0.0),)), 4 / 4 * ln2, rtol=1e-6)
  with pytest.raises(ValueError, match="segment_loss_weights names \\['answr'\\]"):
    loss((("answr", 2.0),))


def test_tasks_later_changes_the_mixture_from_its_step_on():
  from unimm_jax import configuration
  config = configuration.base_config()
  config.diffusion.tasks = {"text_to_image": 0.9, "image_to_text": 0.1}
  config.diffusion.tasks_later = {"text_to_image": 0.1, "image_to_text": 0.9}
  config.diffusion.tasks_later_from = 100
  configuration.validate(config)
  m = MaskedDiffusion.from_config(config.diffusion, LAYOUT)
  assert m.task_names == ("text_to_image", "image_to_text") and m.later_weights == (0.1, 0.9)
  draw = jax.jit(lambda step, key: m.sample_corruption(key, 4096, task_weights=m.task_weights_at(step)).task)
  key = jax.random.PRNGKey(0)
  # The share of text_to_image examples (4,096 draws: one standard deviation 0.005) before and after step 100.
  shares = {step: float(jnp.mean(draw(jnp.int32(step), key) == 0)) for step in (0, 99, 100, 5000)}
  assert abs(shares[0] - 0.9) < 0.025 and abs(shares[99] - 0.9) < 0.025, shares
  assert abs(shares[100] - 0.1) < 0.025 and abs(shares[5000] - 0.1) < 0.025, shares
  # Without tasks_later the weights are the mixture's at every step, and a draw is the one of the plain mixture.
  plain = MaskedDiffusion.from_config(configuration.base_config().diffusion, LAYOUT)
  np.testing.assert_array_equal(plain.task_weights_at(jnp.int32(10**6)), np.asarray(plain.task_weights, np.float32))
  np.testing.assert_array_equal(plain.sample_corruption(key, 64, task_weights=plain.task_weights_at(7)).task,
                                plain.sample_corruption(key, 64).task)
  # A name that is not a task of the mixture, or a mixture without its step, is a config error naming the field.
  config.diffusion.tasks_later = {"image_too_text": 0.5}
  with pytest.raises(configuration.ConfigError, match="tasks_later names \\['image_too_text'\\]"):
    configuration.validate(config)
  config.diffusion.tasks_later = {"image_to_text": 0.5}
  config.diffusion.tasks_later_from = 0
  with pytest.raises(configuration.ConfigError, match="go together"):
    configuration.validate(config)


def _batch(batch, seed=0, schedule="linear"):
  key = jax.random.PRNGKey(seed)
  k1, k2, k3 = jax.random.split(key, 3)
  text = jax.random.randint(k1, (batch, TEXT_LEN), 0, LAYOUT.text_vocab)
  image = jax.random.randint(k2, (batch, IMAGE_LEN), 0, LAYOUT.image_vocab) + LAYOUT.image_offset
  tokens = jnp.concatenate([text, image], axis=1)
  s = get_schedule(schedule)
  m = _method(LAYOUT, s)
  c = m.sample_corruption(k3, batch, [1, 0, 0, 0, 0])
  _, masked = m.corrupt(jax.random.fold_in(key, 9), tokens, c)
  return tokens, masked, c, s


@pytest.mark.parametrize("weighting", ["elbo", "flat", "tokens"])
def test_perfect_model_has_zero_loss(weighting):
  tokens, masked, c, s = _batch(64)
  allowed = jnp.asarray(LAYOUT.allowed_ids())[None]
  logits = jnp.where(allowed, 0.0, NEG_INF)
  logits = logits + 1e4 * jax.nn.one_hot(tokens, LAYOUT.size)   # all mass on the true token
  total, parts = _loss(logits, tokens, masked, c, LAYOUT, s, weighting)
  assert float(total) == 0.0 and float(parts["loss_text"]) == 0.0 and float(parts["loss_image"]) == 0.0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_uniform_model_gets_the_analytic_loss(schedule):
  tokens, masked, c, s = _batch(4096, seed=1, schedule=schedule)
  logits = jnp.where(jnp.asarray(LAYOUT.allowed_ids())[None], 0.0, NEG_INF)
  logits = jnp.broadcast_to(logits, tokens.shape + (LAYOUT.size,))
  log_v = np.log([LAYOUT.text_vocab, LAYOUT.image_vocab])
  # flat: every masked token costs exactly log V of its modality.
  _, flat = _loss(logits, tokens, masked, c, LAYOUT, s, "flat")
  np.testing.assert_allclose([flat["loss_text"], flat["loss_image"]], log_v, rtol=1e-5)
  # elbo, per example exactly w(t) * (#masked) * log V / N ...
  bits = np.asarray(_elbo_bits(logits, tokens, masked, c.t, LAYOUT, s))
  count = np.stack([masked[:, :TEXT_LEN].sum(1), masked[:, TEXT_LEN:].sum(1)], 1)
  n = np.array([TEXT_LEN, IMAGE_LEN])
  expect = np.asarray(s.weight(c.t)) * count * log_v / n / math.log(2)
  np.testing.assert_allclose(bits, expect, rtol=1e-5)
  # ... whose expectation over t is log V (E[w(t)(1 - alpha(t))] = alpha(t_min) - alpha(1) ~ 1).
  sem = bits.std(0) / math.sqrt(len(bits))
  target = log_v / math.log(2) * float(s.alpha(jnp.float32(1e-3)))
  assert np.all(np.abs(bits.mean(0) - target) < 4 * sem + 1e-3), (bits.mean(0), target, sem)
