"""The network: output restricted to each position's modality, rotary positions, attention options per segment,
dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from unimm_jax.sequence import SequenceLayout
from unimm_jax.models import attention, layers
from unimm_jax.method import diffusion as loss_lib
from unimm_jax.models.transformer import Transformer, TransformerConfig, segment_nll, token_positions

LAYOUT = SequenceLayout.two_segment(text_vocab=13, image_vocab=9, text_len=5, image_grid=(3, 4))
TEXT_LEN, IMAGE_LEN = 5, 12


def _random_model(dtype="float32", positions="rope", rope_fraction=1.0, cross_modal_rope=True,
                  value_positions=False):
  model = Transformer(TransformerConfig(LAYOUT, d_model=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=48,
                                        dtype=dtype, positions=positions, rope_fraction=rope_fraction,
                                        cross_modal_rope=cross_modal_rope, value_positions=value_positions))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (4, LAYOUT.seq_len), 0, LAYOUT.size)  # MASK included
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), tokens)["params"])
  # The head starts at zero (a uniform model); give it random weights so the restriction is really tested.
  params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), params["head"]["kernel"].shape)
  return model, randomize_value_positions(params), tokens


def randomize_value_positions(params, seed: int = 3):
  """``params`` with every ``value_position`` kernel (which starts at zero, ``model.value_positions``) random."""
  def visit(tree, path=()):
    if isinstance(tree, dict):
      return {k: visit(v, path + (k,)) for k, v in tree.items()}
    if "value_position" in path:
      return 0.3 * jax.random.normal(jax.random.PRNGKey(seed), tree.shape, tree.dtype)
    return tree
  return visit(params)


def test_model_never_gives_probability_to_other_modality_or_mask():
  for positions, fraction, cross in (("rope", 1.0, True), ("learned", 1.0, True), ("rope+learned", 1.0, True),
                                     ("rope+learned", 0.5, True), ("rope+learned", 1.0, False)):
    model, params, tokens = _random_model(positions=positions, rope_fraction=fraction, cross_modal_rope=cross)
    probs = np.asarray(jax.nn.softmax(model.apply({"params": params}, tokens), axis=-1))
    text, image = probs[:, : TEXT_LEN], probs[:, TEXT_LEN:]
    assert np.all(text[..., LAYOUT.text_vocab:] == 0.0)            # image ids and MASK
    assert np.all(image[..., : LAYOUT.image_offset] == 0.0)        # text ids
    assert np.all(image[..., LAYOUT.mask_id] == 0.0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert text[..., : LAYOUT.text_vocab].min() > 0 and image[..., LAYOUT.image_offset:LAYOUT.mask_id].min() > 0


def test_per_modality_head_equals_restricted_full_logits_and_their_gradient():
  """The training loss's per-modality head (only each modality's own columns) is the full restricted head."""
  model, params, _ = _random_model()
  rng = np.random.default_rng(0)
  clean = LAYOUT.pack({"text": rng.integers(0, LAYOUT.text_vocab, (4, TEXT_LEN)),
                      "image": rng.integers(0, LAYOUT.image_vocab, (4, IMAGE_LEN))}).astype(np.int32)
  noisy = np.where(rng.random(clean.shape) < 0.5, LAYOUT.mask_id, clean)

  def full(p):
    return loss_lib.token_nll(model.apply({"params": p}, noisy), clean)

  def sliced(p):
    return segment_nll(model.config, p, model.apply({"params": p}, noisy, hidden=True), clean)

  np.testing.assert_allclose(jax.jit(sliced)(params), jax.jit(full)(params), rtol=1e-5, atol=1e-5)
  g_full = jax.jit(jax.grad(lambda p: full(p).mean()))(params)   # jitted: eager autodiff dispatches op by op
  g_sliced = jax.jit(jax.grad(lambda p: sliced(p).mean()))(params)
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_sliced)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_within_modality_rope_scores_cross_modal_pairs_unrotated():
  """cross_modal_rope=False: with one modality everywhere it is ordinary rotary attention; across modalities the
  score of a pair does not depend on the positions (only same-modality pairs rotate)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 16))
  positions = jnp.asarray(np.stack([np.arange(6), np.arange(6)], axis=1))
  plain = layers.Attention(2, 8, 10_000.0, 1.0)
  within = layers.Attention(2, 8, 10_000.0, 1.0, cross_modal_rope=False)
  params = plain.init(jax.random.PRNGKey(1), x, positions)
  one = (jnp.zeros(6, jnp.int32), jnp.ones(6, bool))      # (segment of each position, is it text)
  np.testing.assert_allclose(within.apply(params, x, positions, one), plain.apply(params, x, positions),
                             rtol=1e-5, atol=1e-5)
  # Alternating modalities: moving every position by the same offset keeps same-modality offsets (rotary is
  # relative) and cross-modal pairs are unrotated, so the output is unchanged; a shift of odd positions only is not.
  alt = (jnp.asarray([0, 1, 0, 1, 0, 1]), jnp.asarray([0, 1, 0, 1, 0, 1]) == 0)
  base = within.apply(params, x, positions, alt)
  np.testing.assert_allclose(within.apply(params, x, positions + 7, alt), base, rtol=1e-4, atol=1e-5)
  odd_shift = positions + jnp.asarray([0, 3, 0, 3, 0, 3])[:, None]
  np.testing.assert_allclose(within.apply(params, x, odd_shift, alt), base, rtol=1e-4, atol=1e-5)   # cross pairs
  even_only = positions + jnp.asarray([0, 0, 5, 0, 0, 0])[:, None]       # breaks an even-even offset
  assert np.abs(np.asarray(within.apply(params, x, even_only, alt) - base)).max() > 1e-3


def test_directional_heads_see_one_side_of_the_caption_and_all_of_the_image():
  """directional_heads=1 of 3 heads: head 0 sees the same or earlier caption words, head 1 the same or later ones,
  head 2 everything; every head sees every image token and image queries see everything (checked through the
  Jacobian of each head's output with respect to each input position)."""
  segment = jnp.asarray([0, 0, 0, 0, 1, 1, 1])
  modality = (segment, segment == 0)              # (segment of each position, is it text)
  positions = jnp.asarray([[0, 0], [1, 1], [2, 2], [3, 3], [0, 0], [0, 1], [1, 0]])
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 7, 12))
  attn = layers.Attention(3, 8, 10_000.0, 1.0, cross_modal_rope=False, directional_heads=1)
  params = attn.init(jax.random.PRNGKey(1), x, positions, modality)
  q, k, v = (jax.random.normal(key, (1, 7, 3, 8)) for key in jax.random.split(jax.random.PRNGKey(2), 3))
  allowed = attention.head_masks(*modality, 3, 1, xp=jnp)[None]           # [1, 3, 7, 7]
  # Jacobian of the output at (query i, head n) with respect to the value at key j.
  jac = jax.jacobian(lambda v: layers.heads_first_attention(q, k, v, allowed=allowed))(v)  # [1,7,3,8, 1,7,3,8]
  dep = np.abs(np.asarray(jac)[0, :, :, :, 0, :, :, :]).sum(axis=(2, 5))        # [query, head, key, head']
  dep = np.stack([dep[:, n, :, n] for n in range(3)])                            # [head, query, key]
  text = np.arange(4)
  for i in text:
    assert np.all(dep[0, i, i + 1:4] == 0) and np.all(dep[0, i, :i + 1] > 0)    # left-looking
    assert np.all(dep[1, i, :i] == 0) and np.all(dep[1, i, i:4] > 0)            # right-looking
    assert np.all(dep[:, i, 4:] > 0)                                            # the image, from every head
  assert np.all(dep[2] > 0) and np.all(dep[:, 4:, :] > 0)                       # head 2 and image queries: all
  # The module applies that mask: with only head 0 reaching the output (the out projection of heads 1, 2 zeroed),
  # a later caption word's change leaves the earlier words' outputs exactly unchanged; an earlier one's does not.
  only_left = jax.tree.map(lambda a: a, nn.meta.unbox(params))
  only_left["params"]["out"]["kernel"] = only_left["params"]["out"]["kernel"].at[1:].set(0.0)
  out = lambda x: attn.apply(only_left, x, positions, modality)
  assert np.all(np.asarray(out(x.at[0, 3].add(1.0)) - out(x))[0, :3] == 0)
  assert np.all(np.abs(np.asarray(out(x.at[0, 0].add(1.0)) - out(x)))[0, 1:4].max(axis=-1) > 0)
  with np.testing.assert_raises(ValueError):
    layers.Attention(2, 8, 10_000.0, 1.0, directional_heads=2).init(jax.random.PRNGKey(1), x, positions, modality)


def test_cross_modal_heads_give_each_direction_of_lookup_heads_of_its_own():
  """cross_modal_heads=1 of 4 heads (with directional_heads=1): in head 0 image queries see no text key and in head
  1 text queries see no image key; every other pair of those heads, and heads 2-3, as before (head 0 also looks
  left, head 1 right, within the caption). Checked through each head's dependence on each input position, and
  through the module: with only head 0 reaching the output, changing a caption word leaves every image position's
  output exactly unchanged; with only head 1, changing an image token leaves every caption word's output so."""
  segment = jnp.asarray([0, 0, 0, 1, 1, 1, 1])
  modality = (segment, segment == 0)
  positions = jnp.asarray([[0, 0], [1, 1], [2, 2], [0, 0], [0, 1], [1, 0], [1, 1]])
  allowed = attention.head_masks(*modality, 4, 1, xp=jnp, cross_modal=1)[None]    # [1, 4, 7, 7]
  q, k, v = (jax.random.normal(key, (1, 7, 4, 8)) for key in jax.random.split(jax.random.PRNGKey(2), 3))
  jac = jax.jacobian(lambda v: layers.heads_first_attention(q, k, v, allowed=allowed))(v)
  dep = np.abs(np.asarray(jac)[0, :, :, :, 0, :, :, :]).sum(axis=(2, 5))
  dep = np.stack([dep[:, n, :, n] for n in range(4)])                            # [head, query, key]
  text, image = np.arange(3), np.arange(3, 7)
  assert np.all(dep[0][np.ix_(image, text)] == 0) and np.all(dep[0][np.ix_(image, image)] > 0)
  assert np.all(dep[0][np.ix_(text, image)] > 0)                                 # text reads the image
  assert np.all(dep[1][np.ix_(text, image)] == 0) and np.all(dep[1][np.ix_(image, text)] > 0)
  for i in text:                                                                 # directional within the caption
    assert np.all(dep[0, i, i + 1:3] == 0) and np.all(dep[1, i, :i] == 0)
  assert np.all(dep[2:] > 0)
  np.testing.assert_array_equal(np.asarray(allowed[0, 2:]), True)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 7, 12))
  attn = layers.Attention(4, 8, 10_000.0, 1.0, cross_modal_rope=False, directional_heads=1, cross_modal_heads=1)
  params = nn.meta.unbox(attn.init(jax.random.PRNGKey(1), x, positions, modality))
  for head, changed, unchanged in ((0, text, image), (1, image, text)):
    only = jax.tree.map(lambda a: a, params)
    kernel = only["params"]["out"]["kernel"]
    only["params"]["out"]["kernel"] = jnp.zeros_like(kernel).at[head].set(kernel[head])
    out = lambda x: attn.apply(only, x, positions, modality)
    moved = np.abs(np.asarray(out(x.at[0, changed[0]].add(1.0)) - out(x)))[0].max(axis=-1)
    assert np.all(moved[unchanged] == 0) and np.all(moved[changed[:1]] > 0)
  with np.testing.assert_raises(ValueError):
    layers.Attention(2, 8, 10_000.0, 1.0, cross_modal_heads=2).init(jax.random.PRNGKey(1), x, positions, modality)


def test_value_positions_let_a_head_read_where_the_token_it_found_is():
  """model.value_positions: each value is ``u @ W_v + P @ W_p`` (P the key's learned absolute position vector, W_p
  per layer, zero at the start). Checked on the module: with every position's content the same and no rotary
  embedding, the output is the found key's value, so it says which key it was exactly when W_p is not zero (and
  equals the formula); at the start the module computes what it does without the option."""
  s, d = 6, 12
  x = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(0), (1, 1, d)), (1, s, d))       # same content
  table = jax.random.normal(jax.random.PRNGKey(1), (s, d))                                     # P [S, D]
  positions = jnp.zeros((s, 2), jnp.int32)
  attn = layers.Attention(2, 8, None, 1.0)
  params = nn.meta.unbox(attn.init(jax.random.PRNGKey(2), x, positions, value_pos=table))["params"]
  assert params["value_position"]["kernel"].shape == (d, 2, 8)
  np.testing.assert_array_equal(params["value_position"]["kernel"], 0.0)
  plain = {k: v for k, v in params.items() if k != "value_position"}
  np.testing.assert_allclose(attn.apply({"params": params}, x, positions, value_pos=table),
                             attn.apply({"params": plain}, x, positions), atol=1e-6)
  params["value_position"]["kernel"] = jax.random.normal(jax.random.PRNGKey(3), (d, 2, 8))
  only = lambda j: jnp.arange(s)[None] == j                     # bool [1, S]: key j alone is there
  found = lambda p, j, **kw: np.asarray(attn.apply({"params": p}, x, positions, key_valid=only(j), **kw))[0, 0]
  assert np.abs(found(params, 1, value_pos=table) - found(params, 4, value_pos=table)).max() > 0.1
  np.testing.assert_allclose(found(plain, 1), found(plain, 4), atol=1e-6)   # without: nothing says which key
  want = (np.einsum("d,dnh->nh", x[0, 1], params["qkv"]["kernel"][:, 2])
          + np.einsum("d,dnh->nh", table[4], params["value_position"]["kernel"]))
  np.testing.assert_allclose(found(params, 4, value_pos=table), np.einsum("nh,nhd->d", want, params["out"]["kernel"]),
                             rtol=1e-4, atol=1e-5)


def test_value_positions_pass_no_derivative_back_to_the_position_table():
  """The values read the learned position table through ``stop_gradient``: only the input embedding shapes it.

  Along a random change of the table, the forward's central difference counts both paths and the model's own
  derivative (``jax.jvp``, as ``jax.grad`` sees it) only the input one; they differ exactly when a ``value_position``
  kernel is not zero, and agree at the start (zero kernels) and without the option."""
  def derivative_and_difference(model, params, tokens):
    table = {k: v for k, v in params.items() if k.endswith(("_position", "_row", "_col"))}
    direction = jax.tree.map(lambda a: jax.random.normal(jax.random.PRNGKey(7), a.shape, a.dtype), table)
    f = lambda t: model.apply({"params": {**params, **t}}, tokens)
    _, jvp = jax.jvp(f, (table,), (direction,))
    eps = 1e-2
    step = lambda s: jax.tree.map(lambda a, d: a + s * eps * d, table, direction)
    return np.asarray(jvp), np.asarray((f(step(1.0)) - f(step(-1.0))) / (2 * eps))

  for value_positions, randomize in ((False, False), (True, False), (True, True)):
    model, params, tokens = _random_model(positions="learned", value_positions=value_positions)
    if value_positions and not randomize:
      params = jax.tree_util.tree_map_with_path(
          lambda path, a: jnp.zeros_like(a) if "value_position" in jax.tree_util.keystr(path) else a, params)
    jvp, difference = derivative_and_difference(model, params, tokens)
    gap = np.abs(jvp - difference).max() / np.abs(difference).max()
    if randomize:
      assert gap > 0.05, gap                    # the value path moves the output and passes no derivative
    else:
      assert gap < 1e-3, gap


def test_qk_norm_makes_scores_independent_of_query_and_key_scale():
  """qk_norm=True: scaling the query and key projections (what weight decay and learning rate act on) leaves the
  output unchanged, and the learned gains of the norms scale the scores; without it the same scaling changes it."""
  positions = jnp.stack([jnp.arange(6) // 3, jnp.arange(6) % 3], -1)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 12))
  for qk_norm in (True, False):
    attn = layers.Attention(2, 8, 100.0, 1.0, qk_norm=qk_norm)
    params = nn.meta.unbox(attn.init(jax.random.PRNGKey(1), x, positions))["params"]
    scaled = jax.tree.map(lambda a: a, params)
    scaled["qkv"]["kernel"] = params["qkv"]["kernel"].at[:, :2].multiply(7.0)       # q and k, not v
    moved = np.abs(np.asarray(attn.apply({"params": scaled}, x, positions) - attn.apply({"params": params}, x,
                                                                                         positions))).max()
    if qk_norm:
      assert moved < 1e-4, moved
      assert set(params) == {"qkv", "out", "query_norm", "key_norm"}
      sharper = jax.tree.map(lambda a: a, params)
      sharper["query_norm"]["scale"] = params["query_norm"]["scale"] * 3.0
      assert np.abs(np.asarray(attn.apply({"params": sharper}, x, positions)
                               - attn.apply({"params": params}, x, positions))).max() > 1e-2
    else:
      assert moved > 1e-2, moved


def test_heads_first_attention_and_2d_matmul_equal_the_library_computations():
  """The XLA attention path and the 2-D projections are layouts of the same maths: they must agree with
  ``jax.nn.dot_product_attention`` and a multi-dimensional einsum, values and gradients."""
  q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 7, 4, 8))
  np.testing.assert_allclose(layers.heads_first_attention(q, k, v), jax.nn.dot_product_attention(q, k, v),
                             rtol=1e-5, atol=1e-6)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  got = jax.grad(loss(layers.heads_first_attention), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 3, 4))
  kernel = jax.random.normal(jax.random.PRNGKey(2), (3, 4, 2, 6))
  np.testing.assert_allclose(layers.matmul_2d(x, kernel, 2), jnp.einsum("bsij,ijkl->bskl", x, kernel),
                             rtol=1e-5, atol=1e-5)


def test_bidirectional_every_position_sees_every_other():
  model, params, tokens = _random_model()
  f = lambda tok: model.apply({"params": params}, tok)
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % LAYOUT.size)   # change the last image token
  diff = np.abs(np.asarray(f(changed) - f(tokens))).max(axis=-1)     # [B, S]
  assert np.all(diff[:, 0] > 0), "the first text position must see the last image token (no causal mask)"


def test_rope_2d_scores_depend_only_on_offsets():
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 16))
  def score(pq, pk):
    rq = layers.apply_rope_2d(q, jnp.array([pq]), 10_000.0)
    rk = layers.apply_rope_2d(k, jnp.array([pk]), 10_000.0)
    return float(jnp.sum(rq * rk))
  base = score((1, 2), (3, 1))
  np.testing.assert_allclose(score((4, 7), (6, 6)), base, rtol=1e-4)       # same (row, col) offset
  assert abs(score((1, 2), (3, 2)) - base) > 1e-3                          # another column offset
  assert abs(score((1, 2), (4, 1)) - base) > 1e-3                          # another row offset


def test_partial_rope_leaves_the_other_dimensions_unrotated():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, LAYOUT.seq_len, 1, 16))
  attn = layers.Attention(num_heads=1, head_dim=16, rope_theta=10_000.0, rope_fraction=0.5)
  params = attn.init(jax.random.PRNGKey(1), x[..., 0], jnp.asarray(token_positions(LAYOUT)))
  # Half of the dims rotate: the output depends on position offsets only (a common shift changes nothing), and
  # still on them (other offsets change it).
  pos_a = jnp.asarray(token_positions(LAYOUT))
  out_a = attn.apply(params, x[..., 0], pos_a)
  out_b = attn.apply(params, x[..., 0], pos_a + 3)                       # a common shift: offsets unchanged
  np.testing.assert_allclose(out_a, out_b, atol=1e-4)
  out_c = attn.apply(params, x[..., 0], pos_a * 2)                       # other offsets: output changes
  assert float(jnp.abs(out_a - out_c).max()) > 1e-3


def test_token_positions_layout():
  pos = token_positions(LAYOUT)
  np.testing.assert_array_equal(pos[:5], [[i, i] for i in range(5)])
  np.testing.assert_array_equal(pos[5:9], [[0, 0], [0, 1], [0, 2], [0, 3]])
  np.testing.assert_array_equal(pos[-1], [2, 3])


def test_bfloat16_compute_keeps_float32_params_and_agrees():
  model32, params, tokens = _random_model("float32")
  model16 = Transformer(model32.config.__class__(**{**model32.config.__dict__, "dtype": "bfloat16"}))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out32 = model32.apply({"params": params}, tokens)
  out16 = model16.apply({"params": params}, tokens)
  assert out16.dtype == jnp.float32   # logits are always float32
  # ... but the residual stream (what a scanned, rematerialised layer keeps for the backward) is bfloat16.
  assert model16.apply({"params": params}, tokens, hidden=True).dtype == jnp.bfloat16
  layer_out = jax.eval_shape(lambda p: model16.apply({"params": p}, tokens, capture_intermediates=True,
                                                     hidden=True)[1], params)
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(layer_out["intermediates"]["block_0"]["__call__"]))
  p32, p16 = jax.nn.softmax(out32), jax.nn.softmax(out16)
  assert float(jnp.abs(p32 - p16).max()) < 0.05


def test_scanned_layers_and_remat_compute_the_same_function():
  model, params, tokens = _random_model(positions="rope+learned", rope_fraction=0.5, value_positions=True)
  stacked = {k: v for k, v in params.items() if not k.startswith("block_")}
  stacked["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), params["block_0"], params["block_1"])
  want = model.apply({"params": params}, tokens)
  for remat in ("none", "full", "dots", "save_qkv", "save_attention", "minimal"):
    scanned = Transformer(dataclasses.replace(model.config, scan_layers=True, remat=remat))
    np.testing.assert_allclose(jax.jit(scanned.apply)({"params": stacked}, tokens), want, rtol=1e-5, atol=1e-5)
  # Gradients through rematerialised blocks equal the plain ones. The loss is a fixed random mix of the
  # probabilities, so every gradient is of order one (a loss of log-probabilities would reach the ~1e9 of the ids a
  # position may not take, whose cancellations no float32 comparison survives); jitted, as training runs it.
  weights = jax.random.normal(jax.random.PRNGKey(4), want.shape)
  loss = lambda m, p: jnp.sum(jax.nn.softmax(m.apply({"params": p}, tokens)) * weights)
  g1 = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g1)) > 1e-2   # the comparison is not of zeros
  for policy in ("full", "minimal"):
    remat = Transformer(dataclasses.replace(model.config, remat=policy))
    g2 = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_vocabulary_rows_are_padded_to_the_multiple_and_cut_from_the_logits():
  model, params, tokens = _random_model()
  assert params["token_embedding"].shape == (128, 32) and params["head"]["kernel"].shape == (32, 128)
  assert model.apply({"params": params}, tokens).shape == (4, LAYOUT.seq_len, LAYOUT.size)
