"""The learned image tokenizer end to end on tiny configs: training improves PSNR and reports, exact resume, VQ,
saving/loading, and plugging it into the unified model (training, Pipeline decoding, export bundles)."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax import configuration, export, tokenizer_train, tokenizers, train, train_loop
from unimm_jax.data import input_pipeline, shapes
from unimm_jax.models import autoencoder
from unimm_jax.pipeline import Pipeline
from unimm_jax.tokenizers import learned

from test_train import tiny_config  # pylint: disable=g-bad-import-order


def tiny_tokenizer_config(**overrides):
  c = configuration.base_config()
  c.image.tokenizer = "fsq"
  c.tokenizer.widths = (8, 16, 16)
  c.tokenizer.fsq_levels = (5, 5, 3)
  c.tokenizer.steps = 40
  c.tokenizer.batch_size = 16
  c.tokenizer.learning_rate = 3e-3
  c.tokenizer.warmup_steps = 5
  c.tokenizer.log_every = 10
  c.tokenizer.eval_every = 20
  c.tokenizer.report_images = 4
  c.tokenizer.encode_batch = 16
  c.data.train_size = 1000
  c.data.val_size = 48
  c.eval.batch_size = 32
  c.ckpt.max_to_keep = 5
  for key, value in overrides.items():
    group, name = key.split(".")
    c[group][name] = value
  return configuration.validate(c)


@pytest.fixture(scope="module")
def fsq_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tok")
  report = tokenizer_train.train_and_evaluate(tiny_tokenizer_config(), workdir)
  return workdir, report


def test_training_improves_psnr_and_writes_report_and_tokenizer(fsq_workdir):
  workdir, report = fsq_workdir
  before, after = report["val_initial"], report["val"]
  assert after["psnr"] > before["psnr"] + 3.0, (before, after)
  assert report["grid"] == [6, 6] and report["codebook_size"] == 75
  assert 0 < after["usage"] <= 1 and 1 <= after["perplexity"] <= 75 and after["images"] == 48
  on_disk = json.loads((workdir / "report.json").read_text())
  assert on_disk["val"]["psnr"] == after["psnr"]
  assert (workdir / "report.html").read_text().count("<img") == 2 * 4
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  # The saved tokenizer reproduces the trainer's validation figure exactly.
  tok = learned.from_workdir(workdir)
  assert tok.kind == "fsq" and tok.vocab_size == 75 and tok.grid_shape == (6, 6)
  val = shapes.ShapesSource("val", 48)
  images = np.stack([val[i]["image"] for i in range(48)])
  ids = tok.encode(images)
  assert ids.shape == (48, 36) and ids.dtype == np.int32 and ids.max() < 75
  recon = tok.decode(ids)
  mse = np.mean(((recon.astype(np.float64) - images) / 255.0) ** 2)
  assert 10 * np.log10(1 / mse) == pytest.approx(after["psnr"], abs=1e-6)
  # An image's tokens do not depend on the batch it is encoded in.
  np.testing.assert_array_equal(tok.encode(images[5:6]), ids[5:6])
  np.testing.assert_array_equal(tok.encode(images[3:40]), ids[3:40])


def test_resume_continues_exactly(fsq_workdir, tmp_path):
  workdir, full = fsq_workdir
  shutil.copytree(workdir, tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "40")
  (tmp_path / "b" / "report.json").unlink()
  resumed = tokenizer_train.train_and_evaluate(tiny_tokenizer_config(), tmp_path / "b")
  assert resumed["history"] == full["history"][20:]
  assert resumed["val"] == full["val"]


def test_a_preempted_run_saves_at_that_step_and_the_rerun_finishes_the_same(fsq_workdir, tmp_path, monkeypatch):
  _, full = fsq_workdir
  # SIGTERM's flag, raised after step 13 (not a log or save step); the signal itself: test_lifecycle.py.
  monkeypatch.setattr(train_loop.Preemption, "requested", lambda self, step: step == 13)
  stopped = tokenizer_train.train_and_evaluate(tiny_tokenizer_config(), tmp_path)
  assert stopped == {"preempted": True, "step": 13, "history": full["history"][:13]}
  assert (tmp_path / "checkpoints" / "13").is_dir() and not (tmp_path / "report.json").exists()
  monkeypatch.undo()
  resumed = tokenizer_train.train_and_evaluate(tiny_tokenizer_config(), tmp_path)
  assert resumed["history"] == full["history"][13:]
  assert resumed["val"] == full["val"]


def test_vq_tokenizer_trains_saves_and_loads(tmp_path):
  config = tiny_tokenizer_config(**{"image.tokenizer": "vq", "tokenizer.vq_codebook_size": 32,
                                    "tokenizer.vq_dim": 4, "tokenizer.steps": 10,
                                    "tokenizer.eval_every": 10})
  report = tokenizer_train.train_and_evaluate(config, tmp_path)
  assert report["kind"] == "vq" and report["codebook_size"] == 32
  assert report["val"]["psnr"] > report["val_initial"]["psnr"]
  tok = tokenizers.load_image_tokenizer(tmp_path)
  images = np.stack([shapes.ShapesSource("val", 8)[i]["image"] for i in range(8)])
  ids = tok.encode(images)
  assert ids.shape == (8, 36) and ids.max() < 32
  assert tok.decode(ids).shape == (8, 24, 24, 3)


def test_the_trainer_rejects_non_learned_tokenizers(tmp_path):
  with pytest.raises(configuration.ConfigError, match="fsq"):
    tokenizer_train.train_and_evaluate(tiny_tokenizer_config(**{"image.tokenizer": "patch"}), tmp_path)


def test_unified_model_on_fsq_tokens_trains_generates_and_exports(fsq_workdir, tmp_path):
  tok_dir, _ = fsq_workdir
  config = tiny_config(**{"image.tokenizer": "fsq", "image.tokenizer_path": str(tok_dir), "train.steps": 3,
                          "eval.num_generate": 4, "model.image_code_features": True,
                          "tokenizer.fsq_levels": (5, 5, 3)})
  report = train.train_and_evaluate(config, tmp_path / "run")
  assert report["sequence"]["image"] == [6, 6] and np.isfinite(report["val_bits_per_token"]["image"])
  saved = tokenizers.load_image_tokenizer(tmp_path / "run" / "tokenizers")
  assert saved.kind == "fsq"
  pipe = Pipeline.load(tmp_path / "run")
  tok = pipe.tokenizers.image
  assert isinstance(tok, learned.LearnedImageTokenizer)
  # Image codes embed their look and their quantized latents (model.image_code_features): 4x4x3 decoded pixels,
  # then the FSQ grid point, one distinct vector per code.
  features = tok.code_features()
  assert features.shape == (75, 48 + 3) and np.abs(features).max() <= 1.0
  latents = features[:, 48:]
  assert len(np.unique(latents, axis=0)) == 75
  drawn = tok.decode(np.full((1, 36), 7, np.int32))[0]           # a grid of code 7 alone
  np.testing.assert_allclose(features[7, :48], drawn[12:16, 12:16].reshape(-1) / 255.0 - 0.5, atol=1e-6)
  # The pipeline holds the EMA weights: decay * x + (1 - decay) * x of a never-trained array is x to an ulp or two.
  np.testing.assert_allclose(np.asarray(pipe.params["image_code_features"]), features, rtol=0, atol=1e-7)
  decoded = []
  original = tok._decode  # pylint: disable=protected-access
  tok._decode = lambda ids: decoded.append((ids, original(ids))) or decoded[-1][1]  # pylint: disable=protected-access
  images = pipe.text_to_image(["a small red circle at the top left"] * 2, steps=4)
  # The generated tokens were decoded by the learned tokenizer, and that is what the pipeline returned.
  assert len(decoded) == 1 and decoded[0][0].shape == (2, 36)
  np.testing.assert_array_equal(images, decoded[0][1])
  assert images.shape == (2, 24, 24, 3) and images.dtype == np.uint8
  # An export bundle carries the tokenizer's parameters and decodes the same.
  bundle = tmp_path / "bundle"
  export.export(tmp_path / "run", bundle)
  assert (bundle / "tokenizers" / learned.PARAMS_FILE).exists()
  ids = decoded[0][0]
  np.testing.assert_array_equal(Pipeline.load(bundle).tokenizers.image.decode(ids), images)


def test_missing_tokenizer_path_is_a_clear_error(tmp_path):
  config = tiny_config(**{"image.tokenizer": "fsq"})
  with pytest.raises(configuration.ConfigError, match="tokenizer_path"):
    train.train_and_evaluate(config, tmp_path / "a")
  config = tiny_config(**{"image.tokenizer": "fsq", "image.tokenizer_path": str(tmp_path / "nothing")})
  with pytest.raises(FileNotFoundError, match="tokenizer_main"):
    train.train_and_evaluate(config, tmp_path / "b")


CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))
LEARNED = [p for p in CONFIGS if "image.tokenizer = \"fsq\"" in p.read_text() or "image.tokenizer = \"vq\"" in p.read_text()]


@pytest.mark.parametrize("path", LEARNED, ids=lambda p: p.stem)
def test_configs_with_a_learned_tokenizer_build_it(path):
  """Every such config describes a valid tokenizer whose grid is the one the unified model plans for; the
  largest (coco256, which no test trains) also traces one tokenizer train step."""
  from ml_collections.config_flags import config_flags as cf  # pylint: disable=g-import-not-at-top
  config = configuration.validate(cf._LoadConfigModule(path.stem, str(path)).get_config())  # pylint: disable=protected-access
  method = tokenizer_train.make_method(config)
  assert method.spec.grid == configuration.image_token_grid(config)
  if path.stem != "coco256":
    return
  state = jax.eval_shape(lambda: tokenizer_train._init(method, 0))  # pylint: disable=protected-access
  size, channels = config.image.size, config.image.channels
  images = jax.ShapeDtypeStruct((config.tokenizer.batch_size, size, size, channels), jnp.uint8)
  new_state, metrics = jax.eval_shape(lambda s, x: tokenizer_train.train_step(method, s, x), state, images)
  assert metrics["psnr"].shape == () and new_state.step.shape == ()
  assert method.spec.grid == (16, 16) and method.spec.vocab_size == 15_360


def test_learned_tokenizer_configs_exist():
  assert {p.stem for p in LEARNED} >= {"tokenizer_shapes", "tokenizer_photos", "coco256"}


def test_tokenizer_main_command_line_trains_and_reports(tmp_path):
  """The entry point itself (flags shared with the main job, CPU split before JAX starts)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "tok"
  proc = subprocess.run(
      [sys.executable, "-m", "unimm_jax.tokenizer_main", "--config=configs/tokenizer_shapes.py",
       f"--workdir={workdir}", "--config.tokenizer.widths=(8,16,16)", "--config.tokenizer.fsq_levels=(5,5,3)",
       "--config.tokenizer.steps=3", "--config.tokenizer.warmup_steps=1", "--config.tokenizer.eval_every=3", "--config.tokenizer.log_every=1",
       "--config.tokenizer.report_images=2", "--config.data.train_size=200", "--config.data.val_size=16",
       "--config.eval.batch_size=16", "--config.tokenizer.batch_size=8"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / "report.json").exists() and (workdir / "report.html").exists()


@pytest.mark.parametrize("encoder", ["conv", "patch"])
def test_a_patch_encoders_codes_depend_on_its_own_pixels_only(encoder):
  """encoder='patch': changing one 4x4 patch changes that token's latent and no other; the conv encoder's
  receptive field and GroupNorm reach further (the reason the patch encoder exists)."""
  spec = learned.spec_from_config(tiny_tokenizer_config(**{"tokenizer.encoder": encoder}))
  params = learned.init_params(spec, jax.random.key(0))
  images = np.asarray(jax.random.randint(jax.random.key(1), (1, 24, 24, 3), 0, 256), np.uint8)
  edited = images.copy()
  edited[0, 8:12, 12:16] = 255 - edited[0, 8:12, 12:16]   # the patch of token (2, 3) of the 6x6 grid
  net = autoencoder.Autoencoder(spec.net)
  z0, z1 = (np.asarray(net.apply({"params": params}, autoencoder.to_unit(x), method=autoencoder.Autoencoder.encode))
            for x in (images, edited))
  changed = np.abs(z1 - z0).max(-1)[0] > 1e-6
  assert changed[2, 3]
  if encoder == "patch":
    assert changed.sum() == 1
  else:
    assert changed.sum() > 1


def test_the_encoder_kind_is_saved_with_the_tokenizer(tmp_path):
  config = tiny_tokenizer_config(**{"tokenizer.encoder": "patch", "tokenizer.steps": 10, "tokenizer.eval_every": 10})
  report = tokenizer_train.train_and_evaluate(config, tmp_path)
  tok = learned.from_workdir(tmp_path)
  assert tok.spec.net.encoder == "patch"
  val = shapes.ShapesSource("val", 8)
  images = np.stack([val[i]["image"] for i in range(8)])
  np.testing.assert_array_equal(tok.decode(tok.encode(images)).shape, images.shape)
  assert np.isfinite(report["val"]["psnr"])
  with pytest.raises(configuration.ConfigError, match="tokenizer.encoder"):
    tiny_tokenizer_config(**{"tokenizer.encoder": "vit"})


def test_a_tokenizer_saved_before_the_encoder_choice_loads_as_conv():
  spec = learned.spec_from_config(tiny_tokenizer_config(**{"tokenizer.encoder": "patch"}))
  saved = spec.to_dict()
  assert learned.TokenizerSpec.from_dict(saved) == spec
  del saved["encoder"]   # what image_tokenizer.json held before tokenizer.encoder existed
  assert learned.TokenizerSpec.from_dict(saved).net.encoder == "conv"


@pytest.mark.parametrize("kind", ["fsq", "vq"])
def test_learned_kind_geometry_from_the_config_is_what_the_tokenizer_reports(kind, tmp_path):
  """The grid, downsampling, code feature dimension and vocabulary the registry derives from the config (what the
  unified model is sized by before the tokenizer is loaded) are those of the tokenizer the config describes."""
  config = tiny_tokenizer_config(**{"image.tokenizer": kind, "tokenizer.vq_codebook_size": 16,
                                    "tokenizer.vq_dim": 4, "model.image_code_features": True})
  spec = learned.spec_from_config(config)
  codebook = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32) if kind == "vq" else None
  tok = learned.LearnedImageTokenizer(spec, learned.init_params(spec, jax.random.key(0)), codebook, encode_batch=16)
  registered = tokenizers.image_kind(kind)
  assert registered.learned and not registered.fitted
  assert configuration.image_token_grid(config) == registered.grid(config) == tok.grid_shape == spec.grid
  assert configuration.tokenizer_downsample(config) == spec.net.downsample
  assert tok.code_features().shape == (tok.vocab_size, configuration.image_code_feature_dim(config))
  assert tok.vocab_size == registered.vocab_bound(config)
  # Made through the registry from tokenizer_path, it is the saved one and agrees with the config.
  tok.save(tmp_path)
  config.image.tokenizer_path = str(tmp_path)
  made = input_pipeline.make_image_tokenizer(config, None)
  assert isinstance(made, learned.LearnedImageTokenizer) and made.config_dict() == tok.config_dict()
  configuration.check_tokenizers(config, tokenizers.make_text_tokenizer(config, ["a red circle"]), made)
