"""Layouts other than ``[text | image]``: ``[text | image | image]`` and the reordered ``[image | text | text]`` train
through the main job's loop, then generate any segment given the others (with guidance against any set of nulled
segments) and score any segment given any others; the sampler invariants hold on each. A sampler and a task
defined in this file alone are registered, trained with and sampled with."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax import train
from unimm_jax.method import samplers, tasks
from unimm_jax.method.samplers import loop
from unimm_jax.pipeline import Pipeline
from test_train import tiny_config

LAYOUTS = {
    # A caption, a source image and a target image (both images are the example's: the fields map).
    "text_image_image": dict(
        segments=(("caption", "text"), ("source", "image"), ("target", "image")),
        fields=(("caption", "text"), ("source", "image"), ("target", "image")),
        tasks={"joint": 0.2, "text_to_image": 0.3, "image_to_text": 0.3, "image_only": 0.0, "text_only": 0.0,
               "copy": 0.2},
        roles={"copy": "caption:clean source:clean target:noised"}),
    # Reordered, two text segments of their own lengths: [image | question | answer].
    "image_text_text": dict(
        segments=(("image", "image"), ("question", "text", 12), ("answer", "text", 16)),
        fields=(("question", "text"), ("answer", "text")),
        tasks={"joint": 0.3, "text_to_image": 0.2, "image_to_text": 0.2, "image_only": 0.0, "text_only": 0.0,
               "answer": 0.3},
        roles={"answer": "image:clean question:clean answer:noised"}),
}


def _config(spec, **overrides):
  config = tiny_config(**{"train.steps": 4, "model.num_layers": 1, "model.directional_heads": 1,
                          "model.cross_modal_rope": False, "model.qk_norm": True, "model.max_len": 96,
                          "ckpt.every_steps": 4, **overrides})
  config.sequence.segments = spec["segments"]
  config.data.fields = spec["fields"]
  config.diffusion.tasks = spec["tasks"]
  for name, roles in spec.get("roles", {}).items():
    config.diffusion.task_roles[name] = roles
  return config


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def trained(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  report = train.train_and_evaluate(_config(LAYOUTS[request.param]), path)
  return request.param, Pipeline.load(path, batch_size=4), report


def _values(pipe, n=3, seed=0):
  """{segment: int local ids [n, size]}: random whole values of every generative segment."""
  rng = np.random.default_rng(seed)
  lay = pipe.layout
  return {s.name: rng.integers(0, lay.text_vocab if s.modality == "text" else lay.image_vocab, (n, s.size))
          for s in lay.segments if s.generative}


def test_trains_and_validates_every_segment(trained):
  name, pipe, report = trained
  assert report["step"] == 4 and np.isfinite(report["history"]).all()
  bits = report["val_bits_per_token"]
  assert {"text", "image"} <= set(bits) and all(np.isfinite(v) for v in bits.values())
  generative = [s for s in pipe.layout.names]
  assert sum(k.endswith("_given_" + "+".join(g for g in generative if g != k.split("_given_")[0]))
             for k in bits) == len(generative)
  assert [s["name"] for s in report["sequence"]["segments"]] == [s[0] for s in LAYOUTS[name]["segments"]]


def test_any_segment_given_the_others_and_guided_against_any_nulled_set(trained):
  _, pipe, _ = trained
  values = _values(pipe)
  for i, target in enumerate(pipe.layout.names):
    given = {k: v for k, v in values.items() if k != target}
    out = pipe.complete(given, [target], steps=3, seed=1)
    seg = pipe.layout.segment(target)
    if seg.modality == "text":
      assert len(out[target]) == 3 and all(isinstance(t, str) for t in out[target])
    else:
      assert out[target].shape == (3,) + pipe.tokenizers.image.image_shape and out[target].dtype == np.uint8
    # Guidance against a nulled set: each nonempty subset of the given segments once over the targets (every
    # subset for the first target); each is its own compiled program, so not all pairs.
    subsets = [c for k in range(1, len(given) + 1) for c in itertools.combinations(sorted(given), k)]
    for null in (subsets if i == 0 else subsets[i % len(subsets):][:1]):
      guided = pipe.complete(given, [target], steps=3, seed=1, guidance_scale=2.0, guidance_null=list(null))
      assert np.asarray(guided[target]).shape == np.asarray(out[target]).shape
  # Staged generation: every segment from nothing, one after another.
  staged = pipe.complete({}, [[n] for n in pipe.layout.names], n=2, steps=2)
  assert set(staged) == set(pipe.layout.names)


def test_sampler_invariants_on_the_layout(trained):
  """Given tokens never change, no MASK is left where generated, the confidence method follows its schedule,
  with guidance nulling segments or not."""
  _, pipe, _ = trained
  lay = pipe.layout
  tokens = lay.pack(_values(pipe, n=4, seed=2))
  rng = np.random.default_rng(3)
  tokens = np.where(rng.random(tokens.shape) < 0.6, lay.mask_id, tokens)
  fn = lambda t: pipe.model.apply({"params": pipe.params}, t)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(4))
  null = lay.positions_of(lay.names[:1])
  guide = ((tuple(map(bool, ~null)), tuple(map(bool, null))),)
  for method, w in (("confidence", 0.0), ("ancestral", 0.0), ("confidence", 1.5)):
    cfg = samplers.SamplerConfig(method=method, steps=5, guidance_scale=w)
    out, counts = samplers.sample_with_trace(fn, jnp.asarray(tokens), keys, mask_id=lay.mask_id, config=cfg,
                                             schedule=pipe.schedule, guide=guide if w else ())
    out, counts = np.asarray(out), np.asarray(counts)
    given = tokens != lay.mask_id
    np.testing.assert_array_equal(out[given], tokens[given])
    assert not (out == lay.mask_id).any() and counts[-1].sum() == 0
    assert lay.allowed_ids()[np.arange(lay.seq_len)[None], out].all()      # each token of its segment's modality
    if method == "confidence":
      want = samplers.remaining_masked(jnp.asarray((~given).sum(1)), 5, cfg.reveal_schedule)
      np.testing.assert_array_equal(counts, np.asarray(want))


def test_score_any_segment_given_any_others(trained):
  _, pipe, _ = trained
  values = _values(pipe, n=3, seed=4)
  names = list(values)
  for i, target in enumerate(names):
    others = [n for n in names if n != target]
    # Given all the others, none of them (all null), and one of them (a different one per target).
    for cond in (others, [], [others[i % len(others)]]):
      bits = pipe.likelihood({target: values[target], **{c: values[c] for c in cond}}, [target], seed=0)
      assert set(bits) == {target} and bits[target].shape == (3,) and (bits[target] > 0).all()
  both = pipe.likelihood(values, names[:2])
  assert set(both) == set(names[:2])
  with pytest.raises(ValueError, match="has no value"):
    pipe.likelihood({names[0]: values[names[0]]}, [names[1]])


# ---- extension from this file alone ------------------------------------------------------------------------------
def left_to_right(step: loop.Step):
  """A sampler: reveal the leftmost masked positions, as many as the schedule asks."""
  s = step.masked.shape[1]
  order = jnp.where(step.masked, jnp.arange(s)[None], s)               # masked positions by index, others last
  rank = jnp.argsort(jnp.argsort(order, axis=1), axis=1)
  reveal_count = step.masked.sum(axis=1) - step.remaining
  return step.masked & (rank < reveal_count[:, None])


def test_a_new_sampler_and_task_registered_here_train_and_sample(tmp_path):
  samplers.register_sampler("left_to_right", left_to_right)
  tasks.register_task("caption_given_target",
                      lambda layout: {"caption": "noised", "source": "null", "target": "clean"})
  spec = dict(LAYOUTS["text_image_image"], tasks={"caption_given_target": 1.0}, roles={})
  report = train.train_and_evaluate(_config(spec), tmp_path)
  assert report["step"] == 4 and np.isfinite(report["history"]).all()
  pipe = Pipeline.load(tmp_path, batch_size=4)
  assert pipe.diffusion.task_names == ("caption_given_target",) and pipe.diffusion.task_weights == (1.0,)
  values = _values(pipe)
  start = pipe.layout.pack({"target": values["target"]})
  out = pipe._generate(start, (("caption",),), pipe._sampler_config(6, 0.0, 0.0, "left_to_right"), (), seed=0)
  caption = pipe.layout.split(out)["caption"]
  assert not (caption == pipe.layout.mask_id).any()
  np.testing.assert_array_equal(pipe.layout.split(out)["target"], pipe.layout.split(start)["target"])
  assert (pipe.layout.split(out)["source"] == pipe.layout.mask_id).all()         # null: not generated
  text = pipe.complete({"target": values["target"]}, ["caption"], steps=6, method="left_to_right")["caption"]
  assert len(text) == 3
