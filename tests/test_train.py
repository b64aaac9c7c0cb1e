"""The main job end to end on tiny configs: learning, exact resume, fitted tokenizers kept, folder data."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from unimm_jax import configuration, evaluate, train, train_state
from unimm_jax.data import input_pipeline, shapes


def tiny_config(**overrides):
  c = configuration.base_config()
  c.sequence.id_align = 1    # packed ids, as configs/shapes.py on CPU (the tests' models and figures predate it)
  c.model.d_model = 32
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.head_dim = 16
  c.model.mlp_dim = 64
  c.train.batch_size = 16
  c.train.steps = 6
  c.train.log_every = 1
  c.optim.warmup_steps = 2
  c.optim.learning_rate = 3e-3
  c.ckpt.every_steps = 3
  c.ckpt.max_to_keep = 5
  c.eval.every_steps = 1000
  c.eval.batch_size = 64
  c.data.val_size = 128
  c.data.fit_examples = 500
  c.data.train_size = 2000
  for key, value in overrides.items():
    group, name = key.split(".")
    c[group][name] = value
  return configuration.validate(c)


def test_tiny_run_lowers_the_validation_elbo_of_both_modalities_and_reports(tmp_path):
  config = tiny_config(**{"train.steps": 60, "train.log_every": 20, "eval.num_generate": 8})
  report = train.train_and_evaluate(config, tmp_path)
  before, after = report["val_bits_per_token_initial"], report["val_bits_per_token"]
  assert after["text"] < before["text"] - 0.5, (before, after)
  assert after["image"] < before["image"] - 1.0, (before, after)
  on_disk = json.loads((tmp_path / "report.json").read_text())
  for key in ("step", "val_bits_per_token", "t2i_accuracy", "i2t_accuracy", "joint_consistency", "train_wall_s",
              "train_tokens_per_s"):
    assert key in on_disk
  assert on_disk["step"] == 60 and on_disk["train_tokens_per_s"] > 0
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"
  # The generation report on top (scores of an undertrained model: only their range is known).
  full = evaluate.evaluate_workdir(tmp_path, config)
  for key in ("t2i_accuracy", "i2t_accuracy", "joint_consistency"):
    assert 0.0 <= full[key] <= 1.0
  assert set(full["t2i_attribute_accuracy"]) == {"colour", "kind", "size", "cell", "count"}
  assert full["val_bits_per_token"] == report["val_bits_per_token"]     # merged, not replaced
  page = (tmp_path / "report.html").read_text()
  assert page.count("<img") >= 3 * 8 and "text&rarr;image accuracy" in page


def test_restore_then_next_steps_equal_the_uninterrupted_run(tmp_path):
  config = tiny_config()
  full = train.train_and_evaluate(config, tmp_path / "a")
  assert len(full["history"]) == 6
  # An interrupted run: the same workdir as it was after the checkpoint at step 3.
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
  (tmp_path / "b" / "report.json").unlink()
  resumed = train.train_and_evaluate(config, tmp_path / "b")
  assert resumed["history"] == full["history"][3:]          # bit for bit: model, optimizer, RNG and data
  assert resumed["val_bits_per_token"] == full["val_bits_per_token"]
  # Running the finished command again trains nothing and keeps the report.
  again = train.train_and_evaluate(config, tmp_path / "a")
  assert again["history"] == [] and again["step"] == 6


def test_fitted_tokenizers_are_saved_and_loaded_not_refitted(tmp_path, monkeypatch):
  config = tiny_config(**{"train.steps": 3})
  monkeypatch.chdir(tmp_path.parent)
  train.train_and_evaluate(config, tmp_path.name)   # a relative workdir, as in the README's command
  saved = sorted(p.name for p in (tmp_path / "tokenizers").iterdir())
  assert "text_tokenizer.json" in saved and "image_tokenizer.json" in saved
  before = (tmp_path / "tokenizers" / "image_tokenizer.json").read_text()

  def no_refit(*args, **kwargs):
    raise AssertionError("tokenizers were refitted instead of loaded from the workdir")

  monkeypatch.setattr(input_pipeline, "_fit_tokenizers", no_refit)
  config.unlock()
  config.train.steps = 6
  config.lock()
  report = train.train_and_evaluate(config, tmp_path)   # resumes from step 3 with the saved tokenizers
  assert report["step"] == 6
  assert (tmp_path / "tokenizers" / "image_tokenizer.json").read_text() == before
  toks = input_pipeline.load_tokenizers(tmp_path, config)
  assert toks.layout.seq_len == 24 + 36


def _write_folder(root, n_good, *, broken: bool):
  root.mkdir(parents=True, exist_ok=True)
  lines = []
  for i in range(n_good):
    _, image, caption = shapes.sample_example("train", 7, i)
    # Users' images come in other sizes and modes: make some bigger, some RGBA, some grey.
    img = Image.fromarray(image).resize((48, 60), Image.NEAREST)
    img = img.convert(["RGB", "RGBA", "L"][i % 3])
    img.save(root / f"img{i}.png")
    lines.append({"image": f"img{i}.png", "text": caption})
  if broken:
    lines.append({"image": "does_not_exist.png", "text": "a red circle"})
    (root / "broken.png").write_bytes(b"\x89PNG not really an image")
    lines.append({"image": "broken.png", "text": "a blue square"})
    lines.append({"image": "img0.png", "text": "   "})
  return "\n".join(json.dumps(x) for x in lines) + "\n"


def test_folder_source_skips_bad_examples_trains_and_reports_them(tmp_path):
  data = tmp_path / "data"
  (data / "train.jsonl").parent.mkdir(parents=True)
  (data / "train.jsonl").write_text(_write_folder(data, 40, broken=True))
  (data / "val.jsonl").write_text(_write_folder(data, 8, broken=False))
  config = tiny_config(**{"data.source": "folder", "data.path": str(data), "train.steps": 3})
  report = train.train_and_evaluate(config, tmp_path / "run")
  assert report["step"] == 3 and np.isfinite(report["val_bits_per_token"]["image"])
  skipped = report["data_skipped"]["train"]
  assert (skipped["missing_image"], skipped["unreadable_image"], skipped["empty_caption"]) == (1, 1, 1)
  assert sum(report["data_skipped"]["val"].values()) == 0


def test_folder_source_with_nothing_usable_is_a_clear_error(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  (data / "train.jsonl").write_text(json.dumps({"image": "missing.png", "text": "x"}) + "\n")
  (data / "val.jsonl").write_text(json.dumps({"image": "missing.png", "text": "x"}) + "\n")
  config = tiny_config(**{"data.source": "folder", "data.path": str(data)})
  with pytest.raises(ValueError, match="train.jsonl"):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_image_code_features_are_the_codebook_kept_fixed_and_restored(tmp_path):
  """model.image_code_features: the table starts as the tokenizer's code features, never changes in training
  (no gradient, no weight decay) while its projection learns, and comes back from the checkpoint."""
  config = tiny_config(**{"model.image_code_features": True, "train.steps": 4, "optim.weight_decay": 0.5})
  report = train.train_and_evaluate(config, tmp_path)
  assert report["step"] == 4
  toks = input_pipeline.load_tokenizers(tmp_path, config)
  features = toks.image.code_features()
  assert features.shape == (toks.layout.image_vocab, 4 * 4 * 3) and features.min() >= -0.5 and features.max() <= 0.5
  from unimm_jax.pipeline import Pipeline  # pylint: disable=g-import-not-at-top
  for weights in ("raw", "ema"):
    pipe = Pipeline.load(tmp_path, weights=weights)
    np.testing.assert_array_equal(np.asarray(pipe.params["image_code_features"]), features)
  fresh = train_state.init_state(train_state.make_step_inputs(config, toks.layout, features), config.seed)
  assert np.abs(np.asarray(pipe.params["code_projection"]["kernel"])
                - np.asarray(fresh.params["code_projection"]["kernel"])).max() > 0    # the projection trained


def test_concurrent_map_keeps_the_order_of_the_rows():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)
  y = jnp.arange(8, dtype=jnp.int32)[:, None] * 10
  fn = lambda x, y: x * 2.0 + y + x.sum(axis=-1, keepdims=True)    # per-row
  for chunks in (1, 2, 4, 8):
    np.testing.assert_array_equal(train_state.concurrent_map(fn, chunks, x, y), fn(x, y))
  with pytest.raises(ValueError, match="does not divide the batch of 8"):
    train_state.concurrent_map(fn, 3, x, y)


def test_a_step_in_concurrent_chunks_is_the_same_update():
  import jax  # pylint: disable=g-import-not-at-top
  from unimm_jax.sequence import SequenceLayout  # pylint: disable=g-import-not-at-top
  layout = SequenceLayout.two_segment(text_vocab=40, image_vocab=64, text_len=8, image_grid=(4, 4))
  rng = np.random.default_rng(0)
  tokens = layout.pack({"text": rng.integers(0, 40, (16, 8)), "image": rng.integers(0, 64, (16, 16))}).astype(np.int32)
  results = []
  for chunks in (1, 2):
    method = train_state.make_step_inputs(tiny_config(**{"train.concurrent_chunks": chunks}), layout)
    state = train_state.init_state(method, 0)
    state, metrics = jax.jit(lambda s, b, m=method: train_state.train_step(m, s, b))(state, {"tokens": tokens})
    results.append((float(metrics["loss"]), state.params))
  assert np.isfinite(results[0][0])
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), results[1][1], results[0][1])
  with pytest.raises(configuration.ConfigError, match="concurrent_chunks"):
    tiny_config(**{"train.concurrent_chunks": 3})


def test_the_train_step_draws_from_the_later_mixture_from_its_step_on():
  import jax  # pylint: disable=g-import-not-at-top
  from unimm_jax.sequence import SequenceLayout  # pylint: disable=g-import-not-at-top
  layout = SequenceLayout.two_segment(text_vocab=40, image_vocab=64, text_len=8, image_grid=(4, 4))
  rng = np.random.default_rng(0)
  tokens = layout.pack({"text": rng.integers(0, 40, (16, 8)), "image": rng.integers(0, 64, (16, 16))}).astype(np.int32)
  # Only text->image before step 3 (no text noised: no text loss), only image->text from step 3 on.
  config = tiny_config(**{"diffusion.tasks": {"text_to_image": 1.0, "image_to_text": 0.0},
                          "diffusion.tasks_later": {"text_to_image": 0.0, "image_to_text": 1.0},
                          "diffusion.tasks_later_from": 3})
  method = train_state.make_step_inputs(config, layout)
  step = jax.jit(lambda s, b: train_state.train_step(method, s, b)[1])
  state = train_state.init_state(method, 0)
  for at, (zero, nonzero) in ((0, ("loss_text", "loss_image")), (2, ("loss_text", "loss_image")),
                              (3, ("loss_image", "loss_text")), (40, ("loss_image", "loss_text"))):
    metrics = step(state.replace(step=jax.numpy.int32(at)), {"tokens": tokens})
    assert float(metrics[zero]) == 0.0 and float(metrics[nonzero]) > 0.0, (at, metrics)
