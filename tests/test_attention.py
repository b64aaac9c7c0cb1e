"""Attention kernels per platform (models/attention.py): the choice, the errors, and the splash kernel's maths.

The splash kernel runs here in the Pallas interpreter, so its masks (directional heads, rotary within a segment,
the padding of the sequence to 128) are checked against the XLA path on the real network, forward and backward.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from unimm_jax import configuration
from unimm_jax.models import attention
from unimm_jax.models.transformer import Transformer, TransformerConfig, own_scores
from unimm_jax.sequence import SequenceLayout

LAYOUT = SequenceLayout.two_segment(text_vocab=13, image_vocab=9, text_len=6, image_grid=(3, 3))


def test_auto_picks_the_platform_kernel():
  plain = {"directional_heads": False, "cross_modal_rope": False}
  assert attention.resolve("auto", "tpu", dtype="float32", own_scores=plain) == "splash"
  assert attention.resolve("auto", "gpu", dtype="bfloat16", own_scores=plain) == "cudnn"
  assert attention.resolve("auto", "cpu", dtype="bfloat16", own_scores=plain) == "xla"
  # Masks the splash kernel takes as block masks.
  masked = {"directional_heads": True, "cross_modal_rope": True}
  assert attention.resolve("auto", "tpu", dtype="bfloat16", own_scores=masked) == "splash"
  assert attention.resolve("xla", "gpu", dtype="float32", own_scores=masked) == "xla"


@pytest.mark.parametrize("dtype,masked,field", [
    ("float32", {}, "config.model.dtype='float32'"),
    ("bfloat16", {"directional_heads": True}, "config.model.directional_heads"),
    ("bfloat16", {"cross_modal_rope": True}, "config.model.cross_modal_rope"),
])
def test_cudnn_that_cannot_take_the_settings_is_an_error_naming_them_and_auto_says_why_it_took_xla(
    dtype, masked, field, caplog):
  with pytest.raises(configuration.ConfigError) as e:
    attention.resolve("cudnn", "gpu", dtype=dtype, own_scores=masked)
  assert field in str(e.value) and "config.model.attention='cudnn'" in str(e.value)
  with caplog.at_level("INFO"):
    assert attention.resolve("auto", "gpu", dtype=dtype, own_scores=masked) == "xla"
  assert field in caplog.text and "XLA attention path" in caplog.text


def test_a_kernel_for_another_platform_is_an_error():
  plain = {"directional_heads": False, "cross_modal_rope": False}
  with pytest.raises(configuration.ConfigError, match="'splash' is a TPU kernel and the program is for cpu"):
    attention.resolve("splash", "cpu", dtype="float32", own_scores=plain)
  with pytest.raises(configuration.ConfigError, match="'cudnn' is a GPU kernel and the program is for tpu"):
    attention.resolve("cudnn", "tpu", dtype="bfloat16", own_scores=plain)
  assert attention.resolve("splash", "any", dtype="float32", own_scores=plain) == "splash"


def test_explicit_cudnn_with_a_mask_fails_validation_on_any_host():
  config = configuration.base_config()
  config.model.attention = "cudnn"
  config.model.dtype = "bfloat16"
  config.model.directional_heads = 1
  with pytest.raises(configuration.ConfigError, match="directional_heads"):
    configuration.validate(config)
  config.model.directional_heads = 0
  config.model.cross_modal_rope = True
  assert not any(own_scores(config.model).values())


def _models(**overrides):
  base = TransformerConfig(LAYOUT, d_model=32, num_layers=2, num_heads=4, head_dim=16, mlp_dim=48,
                           positions="rope+learned", **overrides)
  return Transformer(base), Transformer(dataclasses.replace(base, attention="splash", attention_interpret=True))


@pytest.mark.parametrize("overrides", [
    # two key sets and per-head masks (a left- and a right-looking head, each also one direction of cross-modal lookup)
    dict(rope_fraction=0.5, cross_modal_rope=False, directional_heads=1, cross_modal_heads=1),
    dict(rope_fraction=1.0, cross_modal_rope=True),                          # one key set, no mask but padding
])
def test_splash_kernel_equals_the_xla_path_forward_and_backward(overrides):
  xla, splash = _models(**overrides)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, LAYOUT.seq_len), 0, LAYOUT.size)
  params = nn.meta.unbox(xla.init(jax.random.PRNGKey(1), tokens)["params"])
  params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), params["head"]["kernel"].shape)
  want = xla.apply({"params": params}, tokens)
  got = splash.apply({"params": params}, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  weights = jax.random.normal(jax.random.PRNGKey(3), want.shape)
  loss = lambda m, p: jnp.sum(jax.nn.softmax(m.apply({"params": p}, tokens)) * weights)
  g_want, g_got = jax.grad(lambda p: loss(xla, p))(params), jax.grad(lambda p: loss(splash, p))(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_want), jax.tree.leaves(g_got)):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_splash_masks_pad_to_128_and_split_the_keys_by_segment():
  segment = np.asarray([0, 0, 0, 1, 1])
  text = segment == 0
  mask = attention.splash_mask(segment, text, num_heads=3, directional=1, within_segment_rope=True)
  assert mask.shape == (3, 128, 256)
  same, cross = mask[:, :5, :5], mask[:, :5, 128:133]
  assert not np.any(same & cross)                                   # each real key once per query
  assert np.all((same | cross)[2])                                  # a plain head sees everything
  assert not same[0, 0, 1] and same[0, 1, 0] and same[1, 0, 1]      # left- and right-looking heads in the caption
  assert np.all(cross[:, :3, 3:]) and not np.any(cross[:, :3, :3])  # across segments: the unrotated key set
  assert not np.any(mask[:, :, 5:128]) and not np.any(mask[:, :, 133:])   # padded keys never attended
  assert np.all(mask[:, 5:].any(axis=-1))                           # padded queries keep a key


def test_bfloat16_xla_attention_backward_runs_its_matmuls_in_bfloat16():
  """The scores accumulate in float32, but no matmul of the backward takes a float32 operand."""
  q, k, v = (jax.random.normal(key, (2, 8, 2, 16), jnp.bfloat16) for key in jax.random.split(jax.random.PRNGKey(0), 3))
  loss = lambda q, k, v: attention.xla_attention(q, k, v).astype(jnp.float32).sum()
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  assert len(dots) >= 6   # 2 forward, 4 backward
  for e in dots:
    assert all(x.aval.dtype == jnp.bfloat16 for x in e.invars), e
  # ... and it is the same function as the float32 path, up to bfloat16 rounding.
  want = attention.xla_attention(*(t.astype(jnp.float32) for t in (q, k, v)))
  np.testing.assert_allclose(attention.xla_attention(q, k, v).astype(jnp.float32), want, atol=0.03)


def _equations(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for sub in jax.core.jaxprs_in_params(e.params):
      yield from _equations(sub)


PAD = 5   # a text id that means "not there" (model.pad_key_id)
TEXT_ONLY = SequenceLayout((SequenceLayout.two_segment(13, 9, 6, (3, 3)).segments[0],), text_vocab=13, image_vocab=0)


def _padded_models(layout, **overrides):
  base = TransformerConfig(layout, d_model=32, num_layers=2, num_heads=4, head_dim=16, mlp_dim=48, positions="rope",
                           rope_layout="sequence", modality_embedding=False, restrict_output=False, pad_key_id=PAD,
                           vocab_multiple=1, **overrides)
  return Transformer(base), Transformer(dataclasses.replace(base, attention="splash", attention_interpret=True))


def test_pad_tokens_are_not_there_padded_sequences_equal_the_unpadded_ones():
  """With model.pad_key_id, pads anywhere (MMaDA left-pads its prompts and questions) leave every other position's
  logits as the sequence without them gives: no query attends a pad and a pad takes no rotary position."""
  real = np.asarray([[1, 2, 3, 4], [7, 8, 9, 10]])
  padded = np.asarray([[PAD, PAD, 1, 2, 3, 4], [7, PAD, 8, PAD, 9, 10]])
  four = SequenceLayout((TEXT_ONLY.segments[0].__class__("text", "text", length=4),), text_vocab=13, image_vocab=0)
  short, _ = _padded_models(four)
  long, _ = _padded_models(TEXT_ONLY)
  params = nn.meta.unbox(long.init(jax.random.PRNGKey(1), padded)["params"])
  params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), params["head"]["kernel"].shape)
  want = np.asarray(short.apply({"params": params}, real))
  got = np.asarray(long.apply({"params": params}, padded))
  np.testing.assert_allclose(got[padded != PAD].reshape(want.shape), want, atol=1e-5, rtol=0)
  # Without the option the pads change the other positions (the test can fail).
  plain = Transformer(dataclasses.replace(long.config, pad_key_id=-1))
  other = np.asarray(plain.apply({"params": params}, padded))
  assert np.abs(other[padded != PAD].reshape(want.shape) - want).max() > 1e-3


def test_splash_kernel_takes_the_pads_as_segment_ids_and_equals_the_xla_path():
  xla, splash = _padded_models(TEXT_ONLY)
  tokens = np.asarray([[PAD, PAD, 1, 2, 3, 4], [7, PAD, 8, PAD, 9, 10]])
  params = nn.meta.unbox(xla.init(jax.random.PRNGKey(1), tokens)["params"])
  params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), params["head"]["kernel"].shape)
  real = tokens != PAD
  np.testing.assert_allclose(np.asarray(splash.apply({"params": params}, tokens))[real],
                             np.asarray(xla.apply({"params": params}, tokens))[real], rtol=1e-4, atol=1e-4)


def test_pad_key_id_is_a_mask_cudnn_cannot_take_and_needs_sequence_rotary():
  config = configuration.base_config()
  config.model.pad_key_id = 3
  assert own_scores(config.model)["pad_key_id"]
  with pytest.raises(configuration.ConfigError, match="pad_key_id=3 .* needs config.model.positions='rope' and "
                     "config.model.rope_layout='sequence'"):
    configuration.validate(config)
