"""One model, every task (configs/shapes_unified.py): absent segments in the layout and the method, each kind of
example trained on the tasks that fit it, and editing / question answering through the Pipeline, the sample CLI
and the report."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from unimm_jax import Pipeline, evaluate, train, train_state, validation
from unimm_jax import sequence as seq
from unimm_jax.data import shapes, shapes_tasks
from unimm_jax.method import tasks as tasks_lib
from unimm_jax.method.diffusion import MaskedDiffusion
from unimm_jax.models import layers, transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def unified_config(**overrides):
  spec = importlib.util.spec_from_file_location("_shapes_unified_config", ROOT / "configs" / "shapes_unified.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.fit_examples = 300
  c.data.train_size = 2000
  c.data.val_size = 32
  c.mesh.cpu_devices = 0
  c.model.d_model = 32
  c.model.num_layers = 1
  c.model.num_heads = 2
  c.model.head_dim = 16
  c.model.mlp_dim = 64
  c.model.directional_heads = 0
  c.train.steps = 3
  c.train.log_every = 1
  c.train.batch_size = 8
  c.data.kind_rows = (("caption", 2), ("edit", 1), ("vqa", 1))
  c.optim.warmup_steps = 1
  c.eval.batch_size = 16
  c.eval.every_steps = 3
  c.eval.num_generate = 6
  c.ckpt.every_steps = 3
  c.sample.i2t_candidates = 1
  for key, value in overrides.items():
    group, name = key.split(".")
    c[group][name] = value
  return c


def small_layout():
  return seq.SequenceLayout((seq.text("text", 4), seq.image("image", (2, 2)), seq.image("target", (2, 2)),
                             seq.text("answer", 2)), text_vocab=10, image_vocab=5, specials=(seq.ABSENT,))


# ---- the layout and the method -----------------------------------------------------------------------------------
def test_absent_segments_pack_unpack_and_are_found_again():
  lay = small_layout()
  tokens = lay.pack({"text": [[1, 2, 0, 0]], "image": [[0, 1, 2, 3]], "target": [[-2] * 4], "answer": [[-2] * 2]})
  assert (tokens[0, 8:14] == lay.absent_id).all() and lay.absent_id != lay.mask_id
  np.testing.assert_array_equal(lay.present(tokens), [[True, True, False, False]])
  np.testing.assert_array_equal(lay.present(jnp.asarray(tokens), jnp), [[True, True, False, False]])
  back = lay.unpack(tokens)
  assert (back["target"] == seq.LOCAL_ABSENT).all() and back["image"].tolist() == [[0, 1, 2, 3]]
  with pytest.raises(ValueError, match="every position"):
    lay.pack({"target": [[-2, 0, 0, 0]]})
  plain = seq.SequenceLayout.two_segment(10, 5, 4, (2, 2))
  assert not plain.has_absent and plain.present(plain.pack({"text": [[1] * 4]})).all()
  with pytest.raises(ValueError, match="MASK"):
    plain.pack({"text": [[-2] * 4]})
  with pytest.raises(ValueError, match="<absent>"):
    tasks_lib.roles_of("t", plain, {"t": "text:noised image:absent"})


def _method(layout):
  return MaskedDiffusion.from_config(unified_config().diffusion, layout)


def test_each_example_draws_only_the_tasks_that_fit_it():
  lay = small_layout()
  method = _method(lay)
  kinds = {"caption": [1, 1, 0, 0], "edit": [1, 1, 1, 0], "vqa": [1, 1, 0, 1], "none": [0, 1, 0, 0]}
  n = 4000
  present = jnp.asarray(np.repeat(np.asarray(list(kinds.values()), bool), n, axis=0))
  c = method.sample_corruption(jax.random.PRNGKey(0), present.shape[0], present=present)
  task, noised, mask_prob = np.asarray(c.task), np.asarray(c.noised), np.asarray(c.mask_prob)
  roles = np.asarray(method.task_roles)
  weights = np.asarray(method.task_weights)
  for k, (kind, row) in enumerate(kinds.items()):
    rows = slice(k * n, (k + 1) * n)
    absent = ~np.asarray(row, bool)
    assert not noised[rows][:, absent].any() and (mask_prob[rows][:, absent] == 0).all()   # absent: left as is
    fits = [t for t in range(len(roles)) if ((roles[t] == tasks_lib.ABSENT) == absent).all()]
    if kind == "none":        # no task fits: no loss at all
      assert not fits and not noised[rows].any()
      continue
    assert set(np.unique(task[rows])) <= set(fits)
    expected = weights[fits] / weights[fits].sum()
    drawn = np.asarray([np.mean(task[rows] == t) for t in fits])
    np.testing.assert_allclose(drawn, expected, atol=0.03)   # 4,000 draws: 3 standard errors of the largest share
  names = method.task_names
  assert {names[t] for t in np.unique(task[n:2 * n])} == {"edit", "edit_null"}
  # Without absent segments the draw is the plain mixture, as before.
  plain = MaskedDiffusion.from_config(train_config_plain().diffusion, seq.SequenceLayout.two_segment(10, 5, 4, (2, 2)))
  a = plain.sample_corruption(jax.random.PRNGKey(3), 64)
  assert a.noised.shape == (64, 2)


def train_config_plain():
  from unimm_jax import configuration   # pylint: disable=import-outside-toplevel
  return configuration.base_config()


def test_corruption_and_validation_leave_absent_segments_alone():
  lay = small_layout()
  method = _method(lay)
  tokens = jnp.asarray(lay.pack({"text": [[1, 2, 3, 0]] * 2, "image": [[0, 1, 2, 3]] * 2,
                                 "target": [[-2] * 4, [4, 3, 2, 1]], "answer": [[-2] * 2] * 2}))
  c = method.sample_corruption(jax.random.PRNGKey(1), 2, present=lay.present(tokens, jnp))
  noisy, masked = method.corrupt(jax.random.PRNGKey(2), tokens, c)
  absent = np.asarray(tokens) == lay.absent_id
  assert not np.asarray(masked)[absent].any() and (np.asarray(noisy)[absent] == lay.absent_id).all()
  # Validation: a column that measures nothing for an example is NaN there, and validate() skips it.
  config = unified_config()
  model = transformer.Transformer(transformer.TransformerConfig.from_config(config.model, lay))
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  step_inputs = train_state.StepInputs(model=model, diffusion=method, tx=None)
  bits = np.asarray(validation.eval_step(step_inputs, params, tokens, jax.random.PRNGKey(4)))
  assert validation.val_figures(seq.SequenceLayout.two_segment(10, 5, 4, (2, 2))) == (
      "text", "image", "text_given_image", "image_given_text")   # the two-segment figures, as before
  figures = validation.val_figures(lay, method)
  assert figures == ("text", "image", "text_to_image", "image_to_text", "edit", "vqa")   # tasks nulling nothing
  col = dict(zip(figures, bits.T))
  # Example 0 is a caption pair, example 1 an edit: each task's figure counts only the examples it fits.
  assert np.isfinite(col["text_to_image"][0]) and np.isnan(col["text_to_image"][1])
  assert np.isnan(col["edit"][0]) and np.isfinite(col["edit"][1]) and np.isnan(col["vqa"]).all()
  means = validation.validate(lambda p, t, k: bits, params, [{"tokens": tokens, "weight": np.ones(2, np.float32)}], 0,
                         figures)
  assert means["edit"] == pytest.approx(float(col["edit"][1])) and np.isnan(means["vqa"])


def test_rotary_pairs_rotate_within_a_modality_across_segments():
  """Two image segments (an edit's source and target) of one modality: their pairs rotate, so the layer is the
  plain rotary attention however the positions are split into segments; with the segments as groups it is not."""
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 16))
  positions = jnp.asarray(np.stack([np.arange(8) % 4, np.arange(8) % 4], axis=1))   # the same cells twice
  plain = layers.Attention(2, 8, 100.0, 1.0)
  within = layers.Attention(2, 8, 100.0, 1.0, cross_modal_rope=False)
  params = plain.init(jax.random.PRNGKey(1), x, positions)
  segment = jnp.asarray([0] * 4 + [1] * 4)
  one_modality = (segment, jnp.zeros(8, bool), jnp.ones(8, jnp.int32))
  np.testing.assert_allclose(within.apply(params, x, positions, one_modality), plain.apply(params, x, positions),
                             rtol=1e-5, atol=1e-5)
  by_segment = (segment, jnp.zeros(8, bool))
  assert np.abs(np.asarray(within.apply(params, x, positions, by_segment) - plain.apply(params, x, positions))).max() > 1e-3
  # The model's own segment info groups by modality.
  _, _, groups = transformer.segment_info(small_layout())
  np.testing.assert_array_equal(groups, small_layout().modality_ids())


# ---- a tiny trained model: Pipeline, CLI, report -----------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("unified")
  report = train.train_and_evaluate(unified_config(), path)
  assert report["step"] == 3 and all(np.isfinite(v) for v in report["val_bits_per_token"].values())
  return path


def _edits(n):
  edits = [shapes_tasks.sample_edit("val", 0, i) for i in range(n)]
  return edits, np.stack([shapes.render(e.source) for e in edits])


def test_an_edit_never_changes_the_instruction_or_the_source(workdir):
  pipe = Pipeline.load(workdir, batch_size=4)
  edits, sources = _edits(5)
  given = {"text": [e.instruction for e in edits], "image": sources}
  tokens, stages, holed = pipe._plan(given, ["target"], None)               # pylint: disable=protected-access
  cfg = pipe._sampler_config(4, 1.0, 0.0, "confidence")                     # pylint: disable=protected-access
  out = pipe._generate(tokens, stages, cfg, pipe._guide(["target"], ["text"]), 0, holed=holed)  # pylint: disable=protected-access
  lay = pipe.layout
  kept = lay.positions_of(["text", "image", "answer"])
  np.testing.assert_array_equal(out[:, kept], tokens[:, kept])           # instruction, source, absent answer
  assert (out[:, lay.positions_of(["answer"])] == lay.absent_id).all()
  target = lay.unpack(out)["target"]
  assert (target >= 0).all()                                              # every target token drawn
  edited = pipe.edit(sources, [e.instruction for e in edits], steps=4)
  assert edited.shape == sources.shape and edited.dtype == np.uint8
  answers = pipe.answer(sources, ["what colour is the circle?"] * 5)
  assert len(answers) == 5 and all(isinstance(a, str) for a in answers)


def test_edit_and_answer_refuse_bad_input_with_a_clear_error(workdir):
  pipe = Pipeline.load(workdir, batch_size=4)
  _, sources = _edits(2)
  with pytest.raises(ValueError, match=r"uint8 \[N, 24, 24, 3\]"):
    pipe.edit(sources[:, :12], ["make it blue"] * 2)
  with pytest.raises(ValueError, match="instruction 1 is empty"):
    pipe.edit(sources, ["make the red circle blue", "  "])
  with pytest.raises(ValueError, match="question 0 is empty"):
    pipe.answer(sources, ["", "what colour is the circle?"])
  with pytest.raises(ValueError, match="1 questions for 2 images"):
    pipe.answer(sources, ["what colour is the circle?"])
  with pytest.raises(TypeError, match="list of strings"):
    pipe.edit(sources, "make it blue")


def test_sample_cli_edits_and_answers(workdir, tmp_path):
  src = tmp_path / "src.png"
  Image.fromarray(shapes.render(_edits(1)[0][0].source)).save(src)
  run = lambda *args: subprocess.run([sys.executable, "-m", "unimm_jax.sample", f"--workdir={workdir}",
                                      f"--out={tmp_path / 'out'}", f"--image={src}", "--steps=2", *args],
                                     capture_output=True, text=True, timeout=300, cwd=ROOT,
                                     env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  done = run("--task=edit", "--instruction=make the shape blue")
  assert done.returncode == 0, done.stderr[-2000:]
  record = json.loads((tmp_path / "out" / "samples.json").read_text())["samples"][0]
  assert record["instruction"] == "make the shape blue" and (tmp_path / "out" / record["edited"]).exists()
  done = run("--task=vqa", "--question=how many shapes are there?")
  assert done.returncode == 0, done.stderr[-2000:]
  record = json.loads((tmp_path / "out" / "samples.json").read_text())["samples"][0]
  assert record["question"] == "how many shapes are there?" and isinstance(record["answer"], str)
  missing = run("--task=edit")
  assert missing.returncode == 2 and "error: --task=edit needs --instruction=TEXT" in missing.stderr


def test_report_scores_edits_and_questions_per_kind(workdir):
  report = evaluate.evaluate_workdir(workdir)
  for key in ("t2i_accuracy", "i2t_accuracy", "edit_accuracy", "vqa_accuracy"):
    assert 0.0 <= report[key] <= 1.0
  assert set(report["edit_accuracy_by_kind"]) == set(shapes_tasks.EDIT_KINDS)
  assert set(report["vqa_accuracy_by_kind"]) == set(shapes_tasks.QUESTION_KINDS)
  assert report["edit_val_pairs_unseen"] == 1.0
  page = (workdir / "report.html").read_text()
  assert "Editing (val source images)" in page and "Visual question answering" in page
  assert "edit accuracy by kind" in page


def test_the_sampler_bench_runs_on_the_unified_layout(workdir, tmp_path):
  """``bench --what=sample`` on a unified shapes workdir compares the sampler settings (text->image and image->text
  with the other segments absent), candidates included."""
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, "-m", "unimm_jax.bench", "--what=sample", f"--workdir={workdir}",
                         "--sample_num=2", "--thresholds=0.9", "--caches=none", "--candidates=1,2/1",
                         "--sample_batches=2", "--repeats=1", f"--out={out}"], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())["samplers"]
  assert [r["sampler"] for r in rows][1::2] == ["confidence (plain), 2 candidates (1 scoring pass)",
                                                 "threshold 0.9, 2 candidates (1 scoring pass)"]
  config = Pipeline.load(workdir).config
  assert rows[0]["i2t_passes_mean"] == config.sample.i2t_steps
  assert rows[1]["i2t_passes_mean"] == 2 * config.sample.i2t_steps + 2
  assert all(0.0 <= r["t2i_accuracy"] <= 1.0 and 0.0 <= r["i2t_accuracy"] <= 1.0 for r in rows)
