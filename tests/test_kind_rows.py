"""Each kind of example on its own segments: ``model.mask_absent`` and ``data.kind_rows``.

With absent segments not attended, an example of the covering layout is computed exactly as the layout of its own
segments alone; the train step uses that to run each kind (at fixed rows of every batch) on its shorter layout.
These tests pin the equivalences that make this an optimisation and not a change of model.
"""


import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax import configuration, train_state
from unimm_jax import sequence as seq
from unimm_jax.data import input_pipeline, shapes_tasks
from unimm_jax.models import transformer
from test_unified import unified_config as tiny_unified_config  # tests/ is on sys.path (as test_train)

KIND_ROWS = (("caption", 2), ("edit", 1), ("vqa", 1))
KIND_SEGMENTS = {"caption": ("text", "image"), "edit": ("text", "image", "target"), "vqa": ("text", "image", "answer")}


def unified_config(**overrides):
  """test_unified's tiny configs/shapes_unified.py, with 4 heads (one directional pair) and KIND_ROWS."""
  return tiny_unified_config(**{"model.num_layers": 2, "model.num_heads": 4, "model.head_dim": 8,
                                "model.directional_heads": 1, "data.kind_rows": KIND_ROWS, **overrides})


def layout():
  return seq.SequenceLayout((seq.text("text", 24), seq.image("image", (6, 6)), seq.image("target", (6, 6)),
                             seq.text("answer", 3)), text_vocab=40, image_vocab=30, specials=(seq.ABSENT,))


def patterned_tokens(lay, blocks: int, seed: int = 0, kind_rows=KIND_ROWS):
  """int32 [blocks * 4, S]: rows of the kinds of ``kind_rows`` in order, random ids, about a third of them MASK."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(blocks):
    for kind, n in kind_rows:
      for _ in range(n):
        values = {}
        for s in lay.segments:
          if s.name not in KIND_SEGMENTS[kind]:
            values[s.name] = np.full((1, s.size), seq.LOCAL_ABSENT)
          else:
            vocab = lay.text_vocab if s.modality == seq.TEXT else lay.image_vocab
            ids = rng.integers(0, vocab, (1, s.size))
            values[s.name] = np.where(rng.random((1, s.size)) < 0.3, -1, ids)   # -1: MASK
        rows.append(lay.pack(values))
  return jnp.asarray(np.concatenate(rows))


def test_kind_segments_follow_the_fields():
  c = unified_config()
  assert {k: input_pipeline.kind_segments(c, k) for k in KIND_SEGMENTS} == KIND_SEGMENTS


@pytest.mark.parametrize("mask_absent", [True, False])
def test_an_example_is_its_own_segments_alone_when_absent_is_masked(mask_absent):
  lay = layout()
  model = transformer.from_config(unified_config(**{"model.mask_absent": mask_absent}), lay)
  tokens = patterned_tokens(lay, 1)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"]
  full = np.asarray(jax.jit(functools.partial(model.apply, hidden=True))({"params": params}, tokens))
  worst = 0.0
  for row, kind in enumerate(k for k, n in KIND_ROWS for _ in range(n)):
    cols = np.flatnonzero(lay.positions_of(KIND_SEGMENTS[kind]))
    alone = model.clone(config=model.config.__class__(**{**vars(model.config), "layout": lay.only(KIND_SEGMENTS[kind])}))
    apply = jax.jit(functools.partial(alone.apply, hidden=True))
    out = np.asarray(apply({"params": params}, tokens[row:row + 1, cols]))[0]
    worst = max(worst, float(np.abs(out - full[row, cols]).max()))
  if mask_absent:
    assert worst < 1e-5, worst
  else:   # attending the <absent> tokens changes every output: the equivalence is the mask's doing
    assert worst > 1e-2, worst


MERGED_ROWS = (("caption", 2), ("vqa", 1), ("edit", 1))   # caption pairs ride in the question's forward


@pytest.mark.parametrize("kind_rows, groups", [
    (KIND_ROWS, [(KIND_SEGMENTS[k], n) for k, n in KIND_ROWS]),
    (MERGED_ROWS, [(("text", "image", "answer"), 3), (("text", "image", "target"), 1)])])
def test_the_grouped_step_equals_one_forward_of_the_whole_layout(kind_rows, groups):
  """Loss and gradients of the per-kind forwards equal those of one forward over the covering layout; neighbouring
  kinds whose segments nest within 10 % more positions share one forward."""
  lay = layout()
  c = unified_config(**{"data.kind_rows": kind_rows})
  grouped = train_state.make_step_inputs(c, lay)
  assert [(m.config.layout.names, n) for m, n, _ in grouped.row_groups] == groups
  whole = grouped.replace(row_groups=())
  tokens = patterned_tokens(lay, 2, seed=1, kind_rows=kind_rows)
  diffusion = grouped.diffusion
  corruption = diffusion.sample_corruption(jax.random.PRNGKey(1), tokens.shape[0], present=lay.present(tokens, jnp))
  noisy, masked = diffusion.corrupt(jax.random.PRNGKey(2), tokens, corruption)
  given = diffusion.given_positions(corruption)
  params = jax.jit(grouped.model.init)(jax.random.PRNGKey(0), tokens)["params"]
  # The head starts at zero (every position's nll log V, whatever it attends): give every parameter some size.
  params = jax.jit(lambda p: jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(5), x.shape), p))(
      params)

  def loss(method):   # jitted: eager autodiff through the layer scan costs minutes of op-by-op dispatch
    return jax.jit(jax.value_and_grad(lambda p: diffusion.loss(
        train_state.grouped_nll(method, p, noisy, tokens, given), masked, corruption)[0]))(params)

  (a, grad_a), (b, grad_b) = loss(grouped), loss(whole)
  assert float(b) > 0.1
  np.testing.assert_allclose(a, b, rtol=1e-5)
  for ga, gb in zip(jax.tree.leaves(grad_a), jax.tree.leaves(grad_b)):
    np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-6)
  # A row of the wrong kind is computed on the wrong segments: the grouping is not a no-op that hides mistakes.
  swapped = jnp.concatenate([tokens[3:4], tokens[1:3], tokens[0:1], tokens[4:]])
  nll = lambda m: jax.jit(lambda p: train_state.grouped_nll(m, p, swapped, swapped, jnp.ones_like(given)))(params)
  assert float(jnp.abs(nll(grouped) - nll(whole)).max()) > 1e-2


def test_training_batches_hold_each_kind_at_its_rows_on_any_number_of_processes(tmp_path):
  c = unified_config()
  source = input_pipeline.make_source(c, "train")
  assert isinstance(source, input_pipeline.KindRows) and source.period == 4
  toks = input_pipeline.fit_or_load_tokenizers(c, tmp_path, source)
  lay = toks.layout
  expected = np.asarray([[name in KIND_SEGMENTS[k] for name in lay.names] for k, n in KIND_ROWS for _ in range(n)])
  one = input_pipeline.train_dataset(source, toks, batch_size=8, seed=3)
  halves = [input_pipeline.train_dataset(source, toks, batch_size=8, seed=3, shard_index=i, shard_count=2)
            for i in range(2)]
  seen = set()
  for b in range(3):
    tokens = one[b]["tokens"]
    np.testing.assert_array_equal(lay.present(tokens), np.concatenate([expected, expected]))
    np.testing.assert_array_equal(np.concatenate([h[b]["tokens"] for h in halves]), tokens)
    seen |= {row.tobytes() for row in tokens}
  assert len(seen) == 24   # every row a different example: each kind's stream moves on
  # The val split keeps the drawn mixture (its examples are read in order, every kind).
  val = input_pipeline.make_source(c, "val")
  assert isinstance(val, shapes_tasks.MixedShapesSource)


def test_kind_rows_refuse_what_breaks_the_equivalence():
  with pytest.raises(configuration.ConfigError, match="mask_absent=True"):
    configuration.validate(unified_config(**{"model.mask_absent": False}))
  with pytest.raises(configuration.ConfigError, match="multiple of the 4 rows"):
    configuration.validate(unified_config(**{"train.batch_size": 6}))
  with pytest.raises(configuration.ConfigError, match="distinct kinds"):
    configuration.validate(unified_config(**{"data.kind_rows": (("caption", 2), ("photo", 2))}))
  configuration.validate(unified_config())


def _random_pipeline(tmp_path, **model):
  """A Pipeline over the tiny unified config's layout with random weights of some size (so outputs differ)."""
  from unimm_jax.pipeline import Pipeline  # pylint: disable=g-import-not-at-top
  c = unified_config(**{f"model.{k}": v for k, v in model.items()})
  toks = input_pipeline.fit_or_load_tokenizers(c, tmp_path, input_pipeline.make_source(c, "train"))
  net = transformer.from_config(c, toks.layout)
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, toks.layout.seq_len), jnp.int32))["params"]
  params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(5), x.shape), params)
  return Pipeline(c, params, toks, batch_size=4)


def test_pipeline_calls_compute_the_present_segments_alone_and_give_the_whole_layouts_output(tmp_path):
  """Sampling and scoring on a layout with absent segments run over the present segments only (a question's 63
  positions of the 99) and give what the whole layout gives: the same tokens (no sampling noise), the same bits
  (no random masks: one grid pass)."""
  pipe = _random_pipeline(tmp_path)
  whole = lambda tokens: (pipe.programs, None)
  scenes = [shapes_tasks.sample_question("val", 0, i) for i in range(5)]
  from unimm_jax.data import shapes  # pylint: disable=g-import-not-at-top
  images = np.stack([shapes.render(q.scene) for q in scenes])
  questions = [q.question for q in scenes]
  calls = {"answer": dict(given={"text": questions, "image": images}, generate=["answer"]),
           "caption": dict(given={"image": images}, generate=["text"]),
           "edit": dict(given={"text": questions, "image": images}, generate=["target"])}
  sizes = {"answer": 63, "caption": 60, "edit": None}   # an edit's 96 of 99 positions: not worth a program
  kw = dict(steps=3, temperature=0.0, confidence_noise=0.0, as_ids=True)
  drawn = {}
  for name, call in calls.items():
    tokens = pipe.start_tokens(call["given"], call["generate"])
    programs, cols = pipe._alone(tokens)
    assert (cols is None and programs is pipe.programs) if sizes[name] is None else \
        (programs is not pipe.programs and len(cols) == sizes[name]), name
    alone = pipe.complete(**call, **kw)
    with pytest.MonkeyPatch.context() as m:
      m.setattr(pipe, "_alone", whole)
      full = pipe.complete(**call, **kw)
    for segment in alone:
      np.testing.assert_array_equal(alone[segment], full[segment], err_msg=name)
    drawn[name] = alone
  assert len({tuple(a) for a in drawn["caption"]["text"].tolist()}) > 1   # the random model draws different captions
  tokens = pipe._absent(pipe._start({"text": questions, "image": images}, None), {"text", "image"})
  keys = pipe._example_keys(0, len(tokens))
  roles = {"text": "clean", "image": "noised"}
  a = pipe._score_bits(roles, tokens, keys, 1, grid=True)
  with pytest.MonkeyPatch.context() as m:
    m.setattr(pipe, "_alone", whole)
    b = pipe._score_bits(roles, tokens, keys, 1, grid=True)
  assert a.shape == b.shape == (5, 4) and float(b[:, 1].min()) > 0.1
  np.testing.assert_allclose(a, b, rtol=1e-5)
  # A network that attends absent positions computes every position: nothing is cut.
  assert _random_pipeline(tmp_path / "attending", mask_absent=False)._alone(tokens)[1] is None
