"""Cached conditioning and semi-autoregressive blocks (issue 27, parts 2-3).

``model.isolate_given``: given positions attend only given positions, so their keys and values never depend on
what is generated, and ``sample.cache='exact'`` computes them once per sample. ``sample.cache='dual'`` reuses the
keys and values of the positions outside the block (Fast-dLLM's approximation). These tests check the network's
partial forward against its full forward, the samplers' outputs against the uncached ones, and the blocks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from unimm_jax import configuration
from unimm_jax.data import shapes
from unimm_jax.method import samplers
from unimm_jax.method.diffusion import MaskedDiffusion
from unimm_jax.models.transformer import Transformer, TransformerConfig, sequence_nll
from unimm_jax.sequence import SequenceLayout
from test_model import randomize_value_positions
from test_sampling import random_pipeline  # pytest puts tests/ on sys.path (prepend import mode)

LAYOUT = SequenceLayout.two_segment(text_vocab=13, image_vocab=9, text_len=5, image_grid=(3, 4))
TEXT_LEN = 5
IMAGE_ROWS = np.arange(TEXT_LEN, LAYOUT.seq_len)


def _network(**overrides):
  """A tiny random network over [text | image] (random head) and random tokens, MASK included."""
  model = Transformer(TransformerConfig(LAYOUT, d_model=32, num_layers=2, num_heads=4, head_dim=16, mlp_dim=48,
                                        **overrides))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (3, LAYOUT.seq_len), 0, LAYOUT.size)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), tokens)["params"])
  params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), params["head"]["kernel"].shape)
  return model, randomize_value_positions(params), tokens


def _new_image(tokens, seed):
  """The same sequences with other image tokens (what a sampler's steps change)."""
  lo = LAYOUT.id_range("image")[0]
  image = jax.random.randint(jax.random.PRNGKey(seed), (tokens.shape[0], len(IMAGE_ROWS)), lo, lo + 9)
  return tokens.at[:, TEXT_LEN:].set(image)


TEXT_GIVEN = np.broadcast_to(np.arange(LAYOUT.seq_len) < TEXT_LEN, (3, LAYOUT.seq_len))

OPTIONS = [
    dict(),
    dict(scan_layers=True, remat="full"),
    dict(positions="rope+learned", rope_fraction=0.5, cross_modal_rope=False, directional_heads=1),
    dict(positions="rope+learned", value_positions=True),
    dict(pad_key_id=3, rope_layout="sequence", modality_embedding=False),
    dict(image_row_end_id=4, rope_layout="sequence", modality_embedding=False),
]


@pytest.mark.parametrize("overrides", OPTIONS)
def test_exact_cache_gives_the_full_forward_of_an_isolated_network(overrides):
  """With ``isolate_given``, the image rows computed from a cache filled on *other* image tokens equal the full
  forward on the new tokens: the text's keys and values never saw the image."""
  model, params, tokens = _network(isolate_given=True, **overrides)
  apply = lambda t, **kw: model.apply({"params": params}, t, given=TEXT_GIVEN, **kw)
  full, kv = apply(tokens, return_kv=True)
  np.testing.assert_allclose(full, apply(tokens), atol=1e-6, rtol=0)   # return_kv changes nothing
  for seed in (5, 6):
    new = _new_image(tokens, seed)
    np.testing.assert_allclose(apply(new, rows=IMAGE_ROWS, kv=kv), apply(new)[:, IMAGE_ROWS], atol=2e-5, rtol=0)


def test_isolation_is_a_real_mask_and_the_partial_forward_is_exact_on_its_own_cache():
  """Without isolation the text rows see the image (so an old cache is stale), with it they do not; for any
  network, rows read from a cache filled on the same tokens equal the full forward."""
  for isolate in (False, True):
    model, params, tokens = _network(isolate_given=isolate)
    apply = lambda t, **kw: model.apply({"params": params}, t, given=TEXT_GIVEN, **kw)
    new = _new_image(tokens, 5)
    text_change = np.abs(apply(new)[:, :TEXT_LEN] - apply(tokens)[:, :TEXT_LEN]).max()
    assert (text_change == 0.0) == isolate, text_change
    full, kv = apply(new, return_kv=True)
    # Float32 tolerance: the rows' matmuls have other shapes than the full forward's, and XLA:CPU sums them in
    # another order on some CPUs (an AVX-512 EPYC: 6.7e-6 at logits of about 11, some 7 ulps; an AVX2 one: < 1e-6).
    np.testing.assert_allclose(apply(new, rows=IMAGE_ROWS, kv=kv), full[:, IMAGE_ROWS], atol=2e-5, rtol=0)
    stale = np.abs(apply(new, rows=IMAGE_ROWS, kv=apply(tokens, return_kv=True)[1]) - full[:, IMAGE_ROWS]).max()
    assert (stale < 2e-5) == isolate, stale
  with pytest.raises(ValueError, match="sorted unique"):
    model.apply({"params": params}, tokens, rows=IMAGE_ROWS[::-1], kv=kv)


def test_training_isolates_the_segments_that_are_not_noised():
  """The loss's ``given`` is every position outside the noised segments: the clean text's nll does not move when
  the noised image's tokens do."""
  diffusion = MaskedDiffusion.from_config(configuration.base_config().diffusion, LAYOUT)
  corruption = diffusion.corruption_at(jnp.full((3, 2), 0.5), diffusion.roles("text_to_image"))
  given = np.asarray(diffusion.given_positions(corruption))
  np.testing.assert_array_equal(given, TEXT_GIVEN)
  model, params, tokens = _network(isolate_given=True)
  nll = lambda t: sequence_nll(model, params, t, tokens, given)
  np.testing.assert_array_equal(nll(tokens)[:, :TEXT_LEN], nll(_new_image(tokens, 7))[:, :TEXT_LEN])


def test_isolation_refuses_the_kernels_that_cannot_take_its_mask():
  config = configuration.base_config()
  config.model.isolate_given = True
  config.model.attention = "splash"
  with pytest.raises(configuration.ConfigError, match="isolate_given"):
    configuration.validate(config)
  config.model.attention, config.model.dtype = "cudnn", "bfloat16"
  with pytest.raises(configuration.ConfigError, match="isolate_given"):
    configuration.validate(config)


@pytest.fixture(scope="module")
def isolated():
  return random_pipeline(num_layers=2, isolate_given=True)


@pytest.fixture(scope="module")
def plain():
  return random_pipeline(num_layers=2)


PROMPTS = [shapes.sample_example("val", 0, i)[2] for i in range(5)]
ARGMAX = dict(steps=6, temperature=0.0, confidence_noise=0.0)


NOISY = dict(steps=6, temperature=1.0, confidence_noise=1.0)


@pytest.mark.parametrize("method,guidance_scale,noise", [("confidence", 0.0, ARGMAX), ("threshold", 2.0, ARGMAX),
                                                         ("threshold", 0.0, NOISY), ("ancestral", 0.0, NOISY)])
def test_exact_cache_samples_the_uncached_tokens(isolated, method, guidance_scale, noise):
  """Text->image on an isolated model: the exact cache (text computed once) gives the uncached sampler's tokens,
  guided (the uncond rows cached too) or not, drawn at temperature 1 with confidence noise too (every draw is
  made for the whole sequence and read at the computed positions); so does the dual cache (exact on this model
  too)."""
  run = lambda **kw: isolated.complete({"text": PROMPTS}, ["image"], as_ids=True, method=method,
                                       guidance_scale=guidance_scale, **noise, **kw)["image"]
  plain_ids = run()
  np.testing.assert_array_equal(run(cache="exact"), plain_ids)
  np.testing.assert_array_equal(run(cache="dual", refresh_every=2), plain_ids)


def test_dual_cache_refreshed_every_step_is_the_uncached_sampler_and_exact_needs_isolation(plain):
  run = lambda **kw: plain.complete({"text": PROMPTS}, ["image"], as_ids=True, **ARGMAX, **kw)["image"]
  plain_ids = run()
  np.testing.assert_array_equal(run(cache="dual", refresh_every=1), plain_ids)
  stale = run(cache="dual", refresh_every=0)           # the text's keys and values from step 0 only
  assert stale.shape == plain_ids.shape and (stale != plain.layout.mask_id).all()
  with pytest.raises(ValueError, match="isolate_given"):
    run(cache="exact")
  with pytest.raises(ValueError, match="cache"):
    samplers.SamplerConfig(cache="some")


@pytest.mark.parametrize("cache", ["none", "dual", "exact"])
def test_semi_autoregressive_blocks_never_write_outside_the_current_block(isolated, monkeypatch, cache):
  """Every loop of a block decode changes its own block only, with every later block still MASK; each block is
  finished before the next starts; the given image never changes."""
  record = []
  real = samplers.sample_with_steps

  def recording(network, tokens, keys, *, generate, **kw):
    out, steps = real(network, tokens, keys, generate=generate, **kw)
    jax.debug.callback(lambda g, a, b: record.append((np.asarray(g), np.asarray(a), np.asarray(b))),
                       jnp.asarray(generate), tokens, out)
    return out, steps

  monkeypatch.setattr(samplers, "sample_with_steps", recording)
  isolated.programs.samplers.clear()
  images = np.stack([shapes.sample_example("val", 0, i)[1] for i in range(3)])
  isolated.complete({"image": images}, ["text"], block_length=4, cache=cache, steps=3, seed=1)
  isolated.programs.samplers.clear()
  lay, mask = isolated.layout, isolated.layout.mask_id
  text_at = np.flatnonzero(lay.positions_of(["text"]))
  blocks = [text_at[i:i + 4] for i in range(0, len(text_at), 4)]
  assert len(record) == len(blocks) >= 3
  for (generate, before, after), block in zip(record, blocks):
    np.testing.assert_array_equal(np.flatnonzero(generate), block)
    outside = np.ones(lay.seq_len, bool)
    outside[block] = False
    np.testing.assert_array_equal(after[:, outside], before[:, outside])    # nothing written outside
    assert (before[:, block] == mask).all() and (after[:, block] != mask).all()
    assert (before[:, block[-1] + 1:text_at[-1] + 1] == mask).all()         # later blocks still MASK


@pytest.mark.parametrize("method,cache", [("ancestral", "none"), ("confidence", "dual"), ("threshold", "exact")])
def test_each_sampler_is_one_compiled_program_for_any_batch_size(isolated, method, cache):
  isolated.programs.samplers.clear()
  for n in (1, 3, 11):
    out = isolated.complete({"text": PROMPTS[:1] * n}, ["image"], steps=3, method=method, cache=cache, as_ids=True)
    assert out["image"].shape[0] == n
  (program,) = isolated.programs.samplers.values()
  assert program._cache_size() == 1
