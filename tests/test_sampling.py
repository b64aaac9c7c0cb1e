"""Sampler invariants, guidance, and the Pipeline's batching and errors (on an untrained random model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from unimm_jax import configuration, tokenizers
from unimm_jax.data import input_pipeline
from unimm_jax.data import shapes
from unimm_jax.method import samplers as sampling
from unimm_jax.method.schedules import get_schedule
from unimm_jax.models.transformer import Transformer, TransformerConfig
from unimm_jax.pipeline import Pipeline


def random_pipeline(num_layers: int = 1, **model) -> Pipeline:
  """A Pipeline over a random (untrained) tiny model with a random head, so its outputs are diverse; ``model``:
  other ``config.model`` fields."""
  config = configuration.base_config()
  config.model.d_model, config.model.num_layers, config.model.num_heads = 32, num_layers, 2
  config.model.head_dim, config.model.mlp_dim = 16, 32
  config.model.update(model)
  examples = [shapes.sample_example("train", 0, i) for i in range(200)]
  text_tok = tokenizers.WordTokenizer.fit([e[2] for e in examples])
  image_tok = tokenizers.PatchTokenizer.fit(np.stack([e[1] for e in examples]), 24, 3, 4, 4, 1024)
  toks = input_pipeline.Tokenizers(text_tok, image_tok, config.text.max_len)
  model = Transformer(TransformerConfig.from_config(config.model, toks.layout))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, toks.layout.seq_len), jnp.int32)))
  params = params["params"]
  params["head"]["kernel"] = 0.5 * jax.random.normal(jax.random.PRNGKey(1), params["head"]["kernel"].shape)
  return Pipeline(config, params, toks, batch_size=8)


@pytest.fixture(scope="module")
def pipe():
  return random_pipeline()


def _start(pipe, n, seed=0):
  """Random sequences with a random subset of positions masked: int32 [n, S]."""
  lay = pipe.layout
  rng = np.random.default_rng(seed)
  text = rng.integers(0, lay.text_vocab, (n, lay.segment("text").size))
  image = rng.integers(0, lay.image_vocab, (n, lay.segment("image").size))
  tokens = lay.pack({"text": text, "image": image})
  masked = rng.random(tokens.shape) < rng.uniform(0.2, 1.0, (n, 1))
  return np.where(masked, lay.mask_id, tokens)


@pytest.mark.parametrize("method,reveal", [("confidence", "cosine"), ("confidence", "linear"), ("ancestral", "cosine")])
def test_given_tokens_fixed_all_masks_resolved_counts_follow_schedule(pipe, method, reveal):
  tokens = _start(pipe, 8)
  cfg = sampling.SamplerConfig(method=method, steps=7, reveal_schedule=reveal)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(8))
  fn = lambda t: pipe.model.apply({"params": pipe.params}, t)
  out, counts = jax.jit(lambda t, k: sampling.sample_with_trace(
      fn, t, k, mask_id=pipe.layout.mask_id, config=cfg, schedule=get_schedule("linear")))(jnp.asarray(tokens), keys)
  out, counts = np.asarray(out), np.asarray(counts)
  given = tokens != pipe.layout.mask_id
  np.testing.assert_array_equal(out[given], tokens[given])          # given tokens never change
  assert not (out == pipe.layout.mask_id).any()                     # every mask resolved
  assert counts[-1].sum() == 0
  # Revealed tokens are in their own modality's range.
  parts = pipe.layout.unpack(out)
  t_ids, i_ids = parts["text"], parts["image"]
  assert (t_ids >= 0).all() and (t_ids < pipe.layout.text_vocab).all()
  assert (i_ids >= 0).all() and (i_ids < pipe.layout.image_vocab).all()
  if method == "confidence":   # exactly the scheduled number stays masked after each step
    expected = np.asarray(sampling.remaining_masked(jnp.asarray((~given).sum(1)), 7, reveal))
    np.testing.assert_array_equal(counts, expected)
    assert (np.diff(expected, axis=0) <= 0).all()


def test_only_generates_the_named_positions_and_ordered_joint_generation_is_one_program(pipe):
  """``generate``: MASK outside stays MASK (the null condition) and the revealed count follows the schedule there;
  ``generate(order='text_first')`` fills both modalities, the caption drawn before the image."""
  lay = pipe.layout
  tokens = np.full((8, lay.seq_len), lay.mask_id, np.int32)
  text_pos = lay.modality_ids() == 0
  cfg = sampling.SamplerConfig(steps=5, reveal_schedule="linear")
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(8))
  fn = lambda t: pipe.model.apply({"params": pipe.params}, t)
  out, counts = jax.jit(lambda t, k: sampling.sample_with_trace(fn, t, k, mask_id=lay.mask_id, config=cfg,
                                                                       generate=text_pos))(
      jnp.asarray(tokens), keys)
  out, counts = np.asarray(out), np.asarray(counts)
  assert not (out[:, text_pos] == lay.mask_id).any()          # the caption is written
  assert (out[:, ~text_pos] == lay.mask_id).all()             # the image stays MASK
  expected = np.asarray(sampling.remaining_masked(jnp.full((8,), lay.segment("text").size), 5, "linear"))
  np.testing.assert_array_equal(counts, expected)
  texts, images = pipe.generate(8, steps=4, seed=3, order="text_first")
  assert len(texts) == 8 and images.shape == (8, 24, 24, 3)
  again = pipe.generate(8, steps=4, seed=3, order="text_first")
  assert again[0] == texts and np.array_equal(again[1], images)
  with pytest.raises(ValueError, match="order"):
    pipe.generate(2, order="sideways")


def test_remaining_masked_schedules():
  got = np.asarray(sampling.remaining_masked(jnp.array([10, 0, 3]), 4, "linear"))
  np.testing.assert_array_equal(got, [[7, 0, 2], [5, 0, 1], [2, 0, 0], [0, 0, 0]])
  got = np.asarray(sampling.remaining_masked(jnp.array([100]), 2, "cosine"))
  np.testing.assert_array_equal(got[:, 0], [70, 0])   # floor(100 cos(pi/4)) = 70
  # As many steps as masked tokens: exactly one revealed per step, whatever float32 makes of N (1 - k/K).
  for n in (16, 24, 36, 256, 1024):
    got = np.asarray(sampling.remaining_masked(jnp.array([n]), n, "linear"))[:, 0]
    np.testing.assert_array_equal(got, np.arange(n - 1, -1, -1))
  # Half as many steps as tokens: exactly two per step.
  got = np.asarray(sampling.remaining_masked(jnp.array([48]), 24, "linear"))[:, 0]
  np.testing.assert_array_equal(got, np.arange(46, -1, -2))
  # The cosine schedule where the product is whole: N = 2, K = 3 keeps floor(2 cos(pi/3)) = 1 after step 2 (float32
  # makes 2 cos(pi/3) 0.99999994).
  np.testing.assert_array_equal(np.asarray(sampling.remaining_masked(jnp.array([2]), 3, "cosine"))[:, 0], [1, 1, 0])


def test_guidance_formula_and_zero_scale(pipe):
  lay = pipe.layout
  tokens = jnp.asarray(_start(pipe, 4, seed=3))
  fn = lambda t: pipe.model.apply({"params": pipe.params}, t)
  text_pos = jnp.asarray(lay.modality_ids() == 0)
  cond = jax.nn.log_softmax(fn(tokens))
  unc_text = jax.nn.log_softmax(fn(jnp.where(text_pos[None], tokens, lay.mask_id)))   # image masked
  unc_image = jax.nn.log_softmax(fn(jnp.where(text_pos[None], lay.mask_id, tokens)))  # text masked
  w = 1.5
  want = jnp.where(text_pos[None, :, None], (1 + w) * cond - w * unc_text, (1 + w) * cond - w * unc_image)
  text_t, image_t = tuple(map(bool, text_pos)), tuple(not x for x in map(bool, text_pos))
  both = ((text_t, image_t), (image_t, text_t))   # text positions against the image nulled, and the reverse
  got = sampling.guided_log_probs(fn, tokens, lay.mask_id, w, both)
  allowed = jnp.asarray(lay.allowed_ids())[None]
  np.testing.assert_allclose(jnp.where(allowed, got, 0), jnp.where(allowed, jax.nn.log_softmax(want), 0),
                             atol=2e-4)
  zero = sampling.guided_log_probs(fn, tokens, lay.mask_id, 0.0, both)
  np.testing.assert_allclose(zero, cond, atol=1e-6)
  # w = 0 through the sampler equals the conditional sampler.
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(5), i))(jnp.arange(4))
  run = lambda cfg, guide: sampling.sample(fn, tokens, keys, mask_id=lay.mask_id, config=cfg, guide=guide)
  np.testing.assert_array_equal(run(sampling.SamplerConfig(steps=4, guidance_scale=0.0), both),
                                run(sampling.SamplerConfig(steps=4), ()))
  assert not np.array_equal(run(sampling.SamplerConfig(steps=4, guidance_scale=3.0), both),
                            run(sampling.SamplerConfig(steps=4), ()))


def test_same_seed_same_output_whatever_the_batch_size(pipe):
  prompts = [shapes.sample_example("val", 0, i)[2] for i in range(11)]
  a = pipe.text_to_image(prompts, steps=4, seed=7)
  b = pipe.text_to_image(prompts[:3], steps=4, seed=7)      # one padded batch instead of two
  np.testing.assert_array_equal(a[:3], b)
  assert a.shape == (11, 24, 24, 3) and a.dtype == np.uint8
  assert not np.array_equal(a, pipe.text_to_image(prompts, steps=4, seed=8))
  caps = pipe.image_to_text(a[:5], steps=4, seed=1)
  assert caps == pipe.image_to_text(a[:5], steps=4, seed=1) and len(caps) == 5
  texts, images = pipe.generate(3, steps=4)
  assert len(texts) == 3 and images.shape == (3, 24, 24, 3)


def test_inpaint_keeps_unmasked_tokens_and_infill_keeps_words(pipe):
  images = np.stack([shapes.sample_example("val", 0, i)[1] for i in range(3)])
  mask = np.zeros((3, 24, 24), bool)
  mask[:, :, 12:] = True                                       # redraw the right half
  out = pipe.inpaint(images, mask, steps=4)
  before = pipe.tokenizers.image.encode(images).reshape(3, 6, 6)
  after = pipe.tokenizers.image.encode(out).reshape(3, 6, 6)
  np.testing.assert_array_equal(before[:, :, :3], after[:, :, :3])   # the left half is given
  filled = pipe.infill(["a small <mask> circle at the top left"], steps=4)
  words = tokenizers.split_words(filled[0])
  want = tokenizers.split_words("a small X circle at the top left")
  assert len(words) == len(want) and words[:2] == want[:2] and words[3:] == want[3:], filled


def test_score_is_finite_per_example_and_modality(pipe):
  ex = [shapes.sample_example("val", 0, i) for i in range(3)]
  bits = pipe.score([e[2] for e in ex], np.stack([e[1] for e in ex]))
  assert bits["text"].shape == (3,) and bits["image"].shape == (3,)
  assert np.isfinite(bits["text"]).all() and (bits["image"] > 0).all()


def test_clear_errors_for_bad_inputs(pipe):
  with pytest.raises(ValueError, match="prompt list is empty"):
    pipe.text_to_image([])
  with pytest.raises(TypeError, match="list of strings"):
    pipe.text_to_image("a red circle")
  with pytest.raises(ValueError, match=r"images must be uint8 \[N, 24, 24, 3\].*got shape \(2, 32, 32, 3\)"):
    pipe.image_to_text(np.zeros((2, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match="mask must be bool"):
    pipe.inpaint(np.zeros((1, 24, 24, 3), np.uint8), np.zeros((1, 12, 12), bool))
  with pytest.raises(ValueError, match="steps=0"):
    pipe.text_to_image(["a red circle"], steps=0)
  long = " and ".join(["a small red circle at the top left"] * 5)
  assert pipe.text_to_image([long], steps=2).shape == (1, 24, 24, 3)   # truncated, with a warning


def test_uniform_reveal_schedule_is_lladas_transfer_counts():
  """LLaDA's get_num_transfer_tokens: N // K a step, the first N % K steps one more (10 over 4: 3, 3, 2, 2)."""
  from unimm_jax.method.samplers.loop import remaining_masked
  remaining = np.asarray(remaining_masked(jnp.asarray([10, 4, 0, 7]), 4, "uniform"))
  np.testing.assert_array_equal(remaining[:, 0], [7, 4, 2, 0])
  np.testing.assert_array_equal(remaining[:, 1], [3, 2, 1, 0])
  np.testing.assert_array_equal(remaining[:, 2], [0, 0, 0, 0])
  np.testing.assert_array_equal(remaining[:, 3], [5, 3, 1, 0])   # 2, 2, 2, 1


def test_guidance_null_tokens_replace_the_null_positions_instead_of_mask():
  """A guide entry's third member: the ids the null positions take in the uncond pass (-1 keeps MASK)."""
  from unimm_jax.method.samplers import loop
  seen = []

  def logits_fn(t):
    seen.append(t)
    return jnp.zeros(t.shape + (7,))
  tokens = jnp.asarray([[1, 2, 3, 6, 6]])
  target, null = (False, False, False, True, True), (True, True, True, False, False)
  loop.guided_log_probs(logits_fn, tokens, 6, 2.0, ((target, null, (4, -1, 5, -1, -1)),))
  np.testing.assert_array_equal(np.asarray(seen[0]), [[1, 2, 3, 6, 6], [4, 6, 5, 6, 6]])
  seen.clear()
  loop.guided_log_probs(logits_fn, tokens, 6, 2.0, ((target, null),))
  np.testing.assert_array_equal(np.asarray(seen[0]), [[1, 2, 3, 6, 6], [6, 6, 6, 6, 6]])


def test_the_pipeline_reports_forward_passes_and_the_bench_sweep_runs(pipe, tmp_path):
  """Pipeline.last_forward_passes: K for the plain sampler (every step a pass), fewer with threshold decoding
  when the model is confident, blocks summed; the bench's sampler sweep scores and times each setting."""
  from unimm_jax import bench_samplers
  prompts = [shapes.sample_example("val", 0, i)[2] for i in range(3)]
  pipe.text_to_image(prompts, steps=6, seed=0)
  np.testing.assert_array_equal(pipe.last_forward_passes, [6, 6, 6])
  pipe.text_to_image(prompts, steps=6, seed=0, method="threshold", threshold=1e-6, max_per_step=0)
  np.testing.assert_array_equal(pipe.last_forward_passes, [1, 1, 1])   # everything passes: one step
  pipe.complete({"image": np.zeros((3, 24, 24, 3), np.uint8)}, ["text"], steps=2, block_length=8)
  blocks = -(-pipe.layout.segment("text").size // 8)
  np.testing.assert_array_equal(pipe.last_forward_passes, [2 * blocks] * 3)
  rows = bench_samplers.bench_samplers(pipe, num=2, batches=(2,), repeats=1, thresholds=(0.5,),
                                       caches=("none", "dual/2"), candidates=("1", "2/1"))
  two = ", 2 candidates (1 scoring pass)"
  assert [r["sampler"] for r in rows] == [
      "confidence (plain)", "confidence (plain)" + two, "threshold 0.5", "threshold 0.5" + two,
      "confidence (plain), cache dual/2", "confidence (plain), cache dual/2" + two, "threshold 0.5, cache dual/2",
      "threshold 0.5, cache dual/2" + two]
  # Candidates: two sampling loops and two scoring passes per caption; text -> image measured once per sampler.
  assert rows[1]["i2t_passes_mean"] == 2 * pipe.config.sample.i2t_steps + 2
  assert rows[1]["t2i_s_per_image_b2"] == rows[0]["t2i_s_per_image_b2"] and "i2t_s_per_caption_b2" in rows[1]
  bench_samplers.plot(rows, str(tmp_path / "curve.png"))
  assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  rows = rows[0::2]
  assert rows[2]["t2i"]["cache"] == "dual" and rows[2]["t2i"]["refresh_every"] == 2
  assert 0.0 <= rows[2]["i2t_same_as_uncached"] <= 1.0 and "t2i_same_as_uncached" not in rows[0]
  assert bench_samplers.default_caches(pipe.config) == ("none", "dual", "dual/4")
  with pytest.raises(ValueError, match="dual/N"):
    bench_samplers.cache_kwargs("exact/3")
  for bad in ("0", "1/2", "4/0", "four"):
    with pytest.raises(ValueError, match="K or K/s"):
      bench_samplers.candidates_kwargs(pipe.config, bad)
  assert rows[0]["t2i_passes_mean"] == pipe.config.sample.t2i_steps
  assert rows[1]["t2i_passes_max"] <= rows[0]["t2i_passes_max"]
  assert all(0.0 <= r["t2i_accuracy"] <= 1.0 and r["t2i_s_per_image_b2"] > 0 for r in rows)
  assert "| threshold 0.5 |" in bench_samplers.table(rows, (2,))
