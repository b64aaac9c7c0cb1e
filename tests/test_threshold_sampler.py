"""Confidence-threshold parallel decoding (samplers/threshold.py) on toy jnp models: no network, no training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax import config_schema, configuration
from unimm_jax.method import samplers

V = 8          # token ids 0 .. V-1
MASK = V       # the MASK id is outside the logits, so it is never a candidate
S = 12


def toy_logits(scale: float = 3.0, seed: int = 0):
  """A context-dependent toy network, int32 [B', S] -> float32 [B', S, V]: every position's logits move with the
  mean embedding of the whole sequence (MASK has its own row). tanh bounds them to [-scale, scale], so no
  probability reaches 1 (at scale 3, at most e^6 / (e^6 + 7 e^-6) < 0.99998)."""
  table = jax.random.normal(jax.random.PRNGKey(seed), (S, V))
  embed = jax.random.normal(jax.random.PRNGKey(seed + 1), (V + 1, V))
  return lambda tokens: scale * jnp.tanh(table[None] + embed[tokens].mean(axis=1)[:, None])


def recording(fn, history: list):
  """``fn`` that also appends every batch it is called with (int32 [B', S], numpy) to ``history``."""
  def wrapped(tokens):
    jax.debug.callback(lambda t: history.append(np.asarray(t)), tokens, ordered=True)
    return fn(tokens)
  return wrapped


def example_keys(n, seed=0):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(n))   # [n, 2]


def random_start(n, seed=0):
  """int32 [n, S]: random tokens, each example with its own share of MASK (at least one)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V, (n, S))
  masked = rng.random((n, S)) < rng.uniform(0.2, 1.0, (n, 1))
  masked[:, 0] = True
  return np.where(masked, MASK, tokens).astype(np.int32)


def run(fn, tokens, config, *, keys=None, guide=(), generate=None, trace=False):
  """The jitted threshold sampler: (tokens, steps [B]) or, with ``trace``, (tokens, counts [K, B])."""
  sampler = samplers.sample_with_trace if trace else samplers.sample_with_steps
  keys = example_keys(tokens.shape[0]) if keys is None else keys
  jitted = jax.jit(lambda t, k: sampler(fn, t, k, mask_id=MASK, config=config, guide=guide, generate=generate))
  return tuple(np.asarray(x) for x in jitted(jnp.asarray(tokens), keys))


@pytest.mark.parametrize("threshold,max_per_step,steps", [(0.3, 0, 12), (0.3, 2, 12), (0.9, 0, 3)])
def test_reveals_each_generated_position_once_and_never_changes_given_tokens(threshold, max_per_step, steps):
  tokens = random_start(6)
  generate = np.ones(S, bool)
  generate[-3:] = False                                   # a MASK here stays MASK (the null condition)
  config = samplers.SamplerConfig(method="threshold", steps=steps, threshold=threshold, max_per_step=max_per_step)
  history = []
  out, counts = run(recording(toy_logits(), history), tokens, config, generate=tuple(generate), trace=True)
  fill = (tokens == MASK) & generate[None]
  np.testing.assert_array_equal(out[~fill], tokens[~fill])          # given and not-generated positions untouched
  assert not (out[fill] == MASK).any() and (out[fill] < V).all()
  # Every step's input: each position goes from MASK to its final value once and never changes after.
  states = np.stack(history + [out])                                # [steps run + 1, B, S]
  assert len(history) <= steps
  revealed = states != MASK
  assert (revealed[1:] >= revealed[:-1]).all()                      # never re-masked
  np.testing.assert_array_equal(np.where(revealed, states, out[None]), np.broadcast_to(out, states.shape))
  # Each step reveals at least one position of an unfinished example, and at most max_per_step but at the last.
  left = np.concatenate([fill.sum(1)[None], counts])                # [K + 1, B] masked before each step
  revealed_now = left[:-1] - left[1:]
  unfinished = left[:-1] > 0
  assert (revealed_now[unfinished] >= 1).all() and (revealed_now[~unfinished] == 0).all()
  if max_per_step:
    assert (revealed_now[:-1] <= max_per_step).all()
  assert (counts[-1] == 0).all()


def test_cap_one_is_the_confidence_sampler_with_one_reveal_a_step():
  """The most confident position a step, both ways: ``max_per_step=1`` (any threshold), or threshold 1.0 when no
  probability reaches 1. The confidence sampler reveals one a step when its schedule says so (``uniform`` with
  K >= every example's masked count) and ranks by the same confidence when ``confidence_noise=0``."""
  tokens = random_start(8, seed=1)
  num_masked = (tokens == MASK).sum(1)
  steps = S + 2                                                    # more than any example needs
  fn = toy_logits()
  keys = example_keys(8, seed=3)
  for temperature in (1.0, 0.0):
    want, _ = run(fn, tokens, samplers.SamplerConfig(method="confidence", steps=steps, temperature=temperature,
                                                     confidence_noise=0.0, reveal_schedule="uniform"), keys=keys)
    for threshold, cap in ((0.05, 1), (1.0, 0)):
      got, taken = run(fn, tokens, samplers.SamplerConfig(method="threshold", steps=steps, temperature=temperature,
                                                          threshold=threshold, max_per_step=cap,
                                                          confidence_noise=0.0), keys=keys)
      np.testing.assert_array_equal(got, want)
      np.testing.assert_array_equal(taken, num_masked)
  # And with every example masked alike, the linear schedule with K = N steps is one a step too.
  tokens = np.where(np.arange(S)[None] % 2 == 0, MASK, tokens % V).astype(np.int32)
  want, _ = run(fn, tokens, samplers.SamplerConfig(method="confidence", steps=S // 2, confidence_noise=0.0,
                                                   reveal_schedule="linear"), keys=keys)
  got, taken = run(fn, tokens, samplers.SamplerConfig(method="threshold", steps=S // 2, threshold=1.0,
                                                      confidence_noise=0.0), keys=keys)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(taken, np.full(8, S // 2))


def flagged_logits(tokens):
  """int32 [B', S] -> float32 [B', S, V]: sure of one token per position (p ~ 1) when position 0 holds 0, unsure
  otherwise (logits in [-1, 1]: p <= e / (e + 7 / e) < 0.52)."""
  sure = (tokens[:, 0] == 0)[:, None, None]
  table = jax.random.normal(jax.random.PRNGKey(7), (S, V))
  return jnp.where(sure, 30.0 * jax.nn.one_hot(jnp.arange(S) % V, V)[None], jnp.tanh(table)[None])


def test_per_example_steps_and_finished_examples_stop_changing():
  tokens = np.full((3, S), MASK, np.int32)
  tokens[:, 0] = [0, 1, 1]                                          # example 0 sure, examples 1 and 2 unsure
  tokens[2, 1:5] = 3                                                # example 2 has fewer to fill
  m = (tokens == MASK).sum(1)                                       # 11, 11, 7
  config = samplers.SamplerConfig(method="threshold", steps=20, threshold=0.9)
  out, taken = run(flagged_logits, tokens, config)
  np.testing.assert_array_equal(taken, [1, m[1], m[2]])             # all at once; one a step
  assert not (out == MASK).any()
  # The sure example is filled at step 0 and left alone for the 10 steps the others still take: it comes out as
  # when sampled on its own (one step); so does the unsure example 2 beside example 1, which outlasts it.
  for i in (0, 2):
    alone, alone_taken = run(flagged_logits, tokens[i:i + 1], config, keys=example_keys(3)[i:i + 1])
    np.testing.assert_array_equal(alone[0], out[i])
    assert alone_taken[0] == taken[i]
  _, counts = run(flagged_logits, tokens, config, trace=True)
  np.testing.assert_array_equal(counts[:, 0], 0)
  np.testing.assert_array_equal(counts[:12, 1], [10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0])
  np.testing.assert_array_equal(counts[11:], 0)                     # the loop stopped: no step ran after 10
  # The bound: with 4 steps the unsure ones reveal one a step, then all that is left at the last.
  bounded = samplers.SamplerConfig(method="threshold", steps=4, threshold=0.9)
  out, counts = run(flagged_logits, tokens, bounded, trace=True)
  assert not (out == MASK).any()
  np.testing.assert_array_equal(counts, [[0, 10, 6], [0, 9, 5], [0, 8, 4], [0, 0, 0]])
  np.testing.assert_array_equal(run(flagged_logits, tokens, bounded)[1], [1, 4, 4])


def test_guidance_sharpens_the_confidences_the_threshold_reads():
  """The cond pass is sure-ish of token 1 (p = 0.8 < threshold 0.9) when position 0 is given; the uncond pass (position 0
  nulled) is flat. Guided, (1 + w) cond - w uncond with w = 1 doubles the logits: p = 28^2 / (28^2 + 7) > 0.99, so
  everything passes at once; unguided, one a step."""
  calls = []

  def fn(tokens):
    calls.append(tokens.shape)                                      # at trace time: the batched cond + uncond
    jax.debug.callback(lambda t: history.append(np.asarray(t)), tokens, ordered=True)
    given = (tokens[:, 0] != MASK)[:, None, None]
    return jnp.where(given, jnp.log(28.0) * jax.nn.one_hot(jnp.ones(S, jnp.int32), V)[None], 0.0)

  history = []
  tokens = np.full((2, S), MASK, np.int32)
  tokens[:, 0] = 5
  target = tuple(i > 0 for i in range(S))
  guide = ((target, tuple(not t for t in target)),)                 # the generated positions against position 0 nulled
  config = lambda w: samplers.SamplerConfig(method="threshold", steps=S, threshold=0.9, guidance_scale=w,
                                            temperature=0.0)   # argmax: token 1 everywhere
  out, taken = run(fn, tokens, config(1.0), guide=guide)
  assert calls[-1] == (4, S)                                        # one forward: 2 cond rows, then 2 uncond rows
  np.testing.assert_array_equal(history[0][2:, 0], MASK)
  np.testing.assert_array_equal(history[0][:2], tokens)
  np.testing.assert_array_equal(taken, [1, 1])
  np.testing.assert_array_equal(out[:, 1:], 1)
  _, unguided = run(fn, tokens, config(0.0), guide=guide)
  np.testing.assert_array_equal(unguided, [S - 1, S - 1])


def test_config_fields_and_bounds():
  assert "threshold" in samplers.registered()
  assert "threshold" in config_schema.BY_NAME["sample.method"].choices
  config = configuration.base_config()
  assert config.sample.threshold == 0.9 and config.sample.max_per_step == 0
  config.sample.method, config.sample.threshold = "threshold", 1.0
  configuration.validate(config)
  for bad in (0.0, 1.5):
    config.sample.threshold = bad
    with pytest.raises(configuration.ConfigError, match=r"sample.threshold.*\(0, 1\]"):
      configuration.validate(config)
    with pytest.raises(ValueError, match=r"threshold=.* must be in \(0, 1\]"):
      samplers.SamplerConfig(method="threshold", threshold=bad)
  with pytest.raises(ValueError, match="max_per_step=-1"):
    samplers.SamplerConfig(method="threshold", max_per_step=-1)


def half_sure_logits(tokens):
  """int32 [B', S] -> float32 [B', S, V]: the even positions sure of one token (p ~ 1), the odd ones unsure
  (p < 0.52), whatever the tokens."""
  table = jax.random.normal(jax.random.PRNGKey(9), (S, V))
  sure = 30.0 * jax.nn.one_hot(jnp.arange(S) % V, V)
  logits = jnp.where((jnp.arange(S) % 2 == 0)[:, None], sure, jnp.tanh(table))
  return jnp.broadcast_to(logits, tokens.shape + (V,))


def test_noise_picks_among_the_unsure_only():
  """``confidence_noise`` decides which position a step reveals when none passes (so samples of one input differ
  where the model is unsure), never whether a passing position is revealed: with any noise the sure positions
  all come at step 0, then one unsure position a step."""
  tokens = np.full((16, S), MASK, np.int32)
  half = S // 2
  orders = set()
  for noise in (0.0, 1.0, 50.0):
    config = samplers.SamplerConfig(method="threshold", steps=S, threshold=0.9, temperature=0.0,
                                    confidence_noise=noise)
    history = []
    out, taken = run(recording(half_sure_logits, history), tokens, config)
    np.testing.assert_array_equal(taken, np.full(16, 1 + half))
    states = np.stack(history + [out])                                        # [steps + 1, B, S]
    revealed = states != MASK
    assert revealed[1, :, 0::2].all() and not revealed[1, :, 1::2].any()      # all sure ones at step 0
    np.testing.assert_array_equal(np.diff(revealed.sum(-1), axis=0)[1:], 1)   # then one a step
    first_step = (revealed.argmax(axis=0))                                    # [B, S] step each was revealed
    example_orders = {tuple(np.argsort(first_step[b, 1::2], kind="stable")) for b in range(16)}
    if noise == 0.0:
      assert len(example_orders) == 1                                         # deterministic: one order
    orders |= example_orders
  assert len(orders) > 2                                                      # noise: the unsure order varies
