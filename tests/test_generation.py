"""Generation from a (briefly) trained workdir: likelihood scores and the ``unimm_jax.sample`` command line."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from unimm_jax import bundle, train
from unimm_jax.data import shapes
from unimm_jax.pipeline import Pipeline
from test_train import tiny_config  # pytest puts tests/ on sys.path (rootdir-less "prepend" import mode)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny model trained for 150 steps: enough to tie colours and words together, not to draw well."""
  path = tmp_path_factory.mktemp("trained")
  config = tiny_config(**{"train.steps": 150, "train.log_every": 50, "ckpt.every_steps": 150,
                          "optim.warmup_steps": 10})
  train.train_and_evaluate(config, path)
  return path


def test_score_of_real_pairs_is_lower_than_of_mismatched_pairs(workdir):
  pipe = Pipeline.load(workdir)
  examples = [shapes.sample_example("val", 0, i) for i in range(48)]
  captions = [e[2] for e in examples]
  images = np.stack([e[1] for e in examples])
  real = pipe.score(captions, images, seed=0)
  swapped = pipe.score(captions[1:] + captions[:1], images, seed=0)   # each image with another's caption
  # The same seed gives the same times and masks, so the two differ only by the pairing.
  for m in ("text", "image"):
    assert real[m].mean() < swapped[m].mean(), (m, real[m].mean(), swapped[m].mean())
  assert np.mean(real["text"] < swapped["text"]) > 0.5
  np.testing.assert_array_equal(real["text"], pipe.score(captions, images, seed=0)["text"])   # deterministic


def test_conditional_scores_keep_the_condition_clean(workdir):
  """given='text' scores the image with the caption clean, given='image' the caption with the image clean: a
  matching condition beats another example's, and a clean condition helps over a noised one (the joint bound)."""
  pipe = Pipeline.load(workdir)
  examples = [shapes.sample_example("val", 0, i) for i in range(48)]
  captions = [e[2] for e in examples]
  images = np.stack([e[1] for e in examples])
  other = captions[1:] + captions[:1]
  joint = pipe.score(captions, images, seed=0)
  image_given = pipe.score(captions, images, seed=0, given="text")
  text_given = pipe.score(captions, images, seed=0, given="image")
  assert set(image_given) == {"image"} and set(text_given) == {"text"}
  assert image_given["image"].mean() < pipe.score(other, images, seed=0, given="text")["image"].mean()
  assert text_given["text"].mean() < pipe.score(other, images, seed=0, given="image")["text"].mean()
  assert text_given["text"].mean() < joint["text"].mean()
  with pytest.raises(ValueError, match="given"):
    pipe.score(captions, images, given="caption")


def test_caption_candidates_keep_the_one_that_makes_the_image_likeliest(workdir):
  """image_to_text(candidates=K): candidate 0 is the plain call's caption, the K draw differently, the one kept has
  the fewest image-given-caption bits, and the choice is the same whatever the batch it is in."""
  pipe = Pipeline.load(workdir)
  images = np.stack([shapes.sample_example("val", 0, i)[1] for i in range(6)])
  kw = dict(steps=8, temperature=1.0, seed=3)
  drawn, bits = pipe._caption_candidates(images, 4, kw["seed"], steps=8, temperature=1.0, guidance_scale=0.0,
                                         method="confidence")
  assert drawn.shape == (4, 6, pipe.layout.seq_len) and bits.shape == (4, 6) and np.all(np.isfinite(bits))
  captions = [pipe.tokenizers.decode(d)[0] for d in drawn]
  assert captions[0] == pipe.image_to_text(images, **kw)
  assert len({tuple(c) for c in captions}) > 1                                   # the candidates differ
  chosen = pipe.image_to_text(images, candidates=4, **kw)
  assert chosen == [captions[k][i] for i, k in enumerate(bits.argmin(axis=0))]
  np.testing.assert_array_equal(pipe.last_forward_passes, 4 * 8 + 4 * 8)   # 4 loops of 8 steps, 4 x 8 scorings
  assert chosen[:2] == pipe.image_to_text(images[:2], candidates=4, **kw)
  with pytest.raises(ValueError, match="candidates"):
    pipe.image_to_text(images, candidates=0)
  with pytest.raises(ValueError, match="score_passes"):
    pipe.image_to_text(images, candidates=2, score_passes=0)


def test_threshold_candidates_differ_by_their_noise_and_one_scoring_pass_has_no_randomness(workdir):
  """Threshold decoding at temperature 0 draws different candidates through its confidence noise alone (threshold
  1.0: every step a forced pick); one scoring pass masks the whole image, so its bits do not depend on the key;
  the passes counted are the loops' and the scorings'."""
  pipe = Pipeline.load(workdir)
  images = np.stack([shapes.sample_example("val", 0, i)[1] for i in range(6)])
  kw = dict(steps=8, temperature=0.0, guidance_scale=0.0, method="threshold", threshold=1.0)
  drawn, bits = pipe._caption_candidates(images, 3, 5, score_passes=1, **kw)
  assert len({tuple(map(tuple, d)) for d in drawn}) == 3
  chosen = pipe.image_to_text(images, candidates=3, score_passes=1, seed=5, **kw)
  assert chosen == [pipe.tokenizers.decode(drawn[k])[0][i] for i, k in enumerate(bits.argmin(axis=0))]
  passes = pipe.last_forward_passes
  assert (passes >= 3 + 3).all() and (passes <= 3 * 8 + 3).all()
  one = pipe.programs.score_fn(pipe._roles({"text": "clean", "image": "noised"}), num_samples=1, grid=True)
  a, b = (pipe._batched(one, drawn[0], pipe._example_keys(seed, 6)) for seed in (0, 1))
  np.testing.assert_array_equal(a, b)
  assert np.all(a[:, pipe.layout.index("image")] > 0)


def _sample(workdir, out, *args):
  cmd = [sys.executable, "-m", "unimm_jax.sample", f"--workdir={workdir}", f"--out={out}", "--steps=4", *args]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((out / "samples.json").read_text()), proc


def test_sample_cli_writes_pngs_and_a_json_for_every_task(workdir, tmp_path):
  prompt = "a small red circle at the top left"
  got, _ = _sample(workdir, tmp_path / "t2i", "--task=t2i", f"--prompt={prompt}", "--num=3", "--seed=5")
  assert got["task"] == "t2i" and got["steps"] == 4 and len(got["samples"]) == 3
  pngs = [np.asarray(Image.open(tmp_path / "t2i" / s["image"])) for s in got["samples"]]
  assert all(p.shape == (24, 24, 3) and p.dtype == np.uint8 for p in pngs)
  assert {s["prompt"] for s in got["samples"]} == {prompt}
  # The same seed through the Python API gives the same images.
  settings = {k: v for k, v in got.items() if k not in ("task", "samples")}   # seed and every sampler setting
  api = Pipeline.load(workdir).text_to_image([prompt] * 3, **settings)
  np.testing.assert_array_equal(np.stack(pngs), api)

  image_file = tmp_path / "val0.png"
  Image.fromarray(shapes.sample_example("val", 0, 0)[1]).save(image_file)
  got, _ = _sample(workdir, tmp_path / "i2t", "--task=i2t", f"--image={image_file}", "--candidates=3",
                   "--score_passes=1")
  assert got["samples"][0]["image"] == str(image_file) and isinstance(got["samples"][0]["caption"], str)
  assert got["candidates"] == 3 and got["score_passes"] == 1
  settings = {k: v for k, v in got.items() if k not in ("task", "samples")}   # candidates=3 among them
  image = np.asarray(Image.open(image_file))[None]
  assert got["samples"][0]["caption"] == Pipeline.load(workdir).image_to_text(image, **settings)[0]

  got, _ = _sample(workdir, tmp_path / "joint", "--task=joint", "--num=2")
  assert len(got["samples"]) == 2 and (tmp_path / "joint" / got["samples"][1]["image"]).exists()

  mask = np.zeros((24, 24), np.uint8)
  mask[:, 12:] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  got, _ = _sample(workdir, tmp_path / "inpaint", "--task=inpaint", f"--image={image_file}",
                   f"--mask={tmp_path / 'mask.png'}", f"--prompt={prompt}")
  out = np.asarray(Image.open(tmp_path / "inpaint" / got["samples"][0]["inpainted"]))
  assert out.shape == (24, 24, 3)

  got, _ = _sample(workdir, tmp_path / "infill", "--task=infill", "--prompt=a small <mask> circle at the top left")
  filled = got["samples"][0]["filled"]
  assert filled.startswith("a small ") and filled.endswith(" circle at the top left"), filled


def test_sample_cli_usage_errors_are_one_line_not_tracebacks(workdir, tmp_path):
  cmd = [sys.executable, "-m", "unimm_jax.sample", f"--workdir={workdir}", f"--out={tmp_path}", "--task=i2t"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "needs --image=FILE" in proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


# ---- export ------------------------------------------------------------------------------------------------------
def _bytes(path):
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _logits(pipe, tokens):
  return np.asarray(pipe.model.apply({"params": pipe.params}, tokens))


def test_float32_safetensors_export_gives_identical_logits_and_images(workdir, tmp_path):
  from safetensors.numpy import load_file
  from unimm_jax import export
  out = tmp_path / "bundle"
  meta = export.export(workdir, out, dtype="float32", fmt="safetensors")
  trained, exported = Pipeline.load(workdir), Pipeline.load(out)
  assert exported.step == trained.step == meta["step"] == 150
  # Readable with safetensors.numpy alone, under the documented flat names.
  tensors = load_file(str(out / bundle.SAFETENSORS_FILE))
  assert set(tensors) == set(bundle.flatten(trained.params)) and "block_0/attn/qkv/kernel" in tensors
  np.testing.assert_array_equal(tensors["head/kernel"], np.asarray(trained.params["head"]["kernel"]))
  tokens = trained.layout.pack({"text": trained._text_ids(["a small red circle at the top left"] * 2)})
  np.testing.assert_array_equal(_logits(exported, tokens), _logits(trained, tokens))
  prompts = [shapes.sample_example("val", 0, i)[2] for i in range(4)]
  np.testing.assert_array_equal(exported.text_to_image(prompts, steps=4, seed=3),
                                trained.text_to_image(prompts, steps=4, seed=3))
  card = (out / "README.md").read_text()
  assert "| training step | 150 |" in card and f"{meta['param_count']:,}" in card
  # Parameters only: at least 2.5x smaller than the training checkpoint (params + AdamW moments + EMA).
  ckpt = workdir / "checkpoints" / "150"
  assert _bytes(ckpt) >= 2.5 * _bytes(out), (_bytes(ckpt), _bytes(out))


def test_bfloat16_orbax_export_stays_within_tolerance(workdir, tmp_path):
  from unimm_jax import export
  out = tmp_path / "bf16"
  export.export(workdir, out, dtype="bfloat16", fmt="orbax")
  meta = json.loads((out / bundle.MODEL_FILE).read_text())
  assert {t["dtype"] for t in meta["tensors"].values()} == {"bfloat16"}
  trained, exported = Pipeline.load(workdir), Pipeline.load(out)
  tokens = trained.layout.pack(
      {"image": trained._image_ids(np.stack([shapes.sample_example("val", 0, i)[1] for i in range(3)]))})
  a, b = _logits(trained, tokens), _logits(exported, tokens)
  allowed = np.asarray(trained.layout.allowed_ids())[None] & np.ones(a.shape, bool)
  # bfloat16 keeps 8 significant bits (relative rounding 2^-9 per weight): logits within 2 % of their spread.
  spread = a[allowed].max() - a[allowed].min()
  assert np.abs(a - b)[allowed].max() < 0.02 * spread, (np.abs(a - b)[allowed].max(), spread)


def test_pipeline_load_of_something_else_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither a training workdir .* nor an exported model"):
    Pipeline.load(tmp_path)


def test_the_bundle_format_is_read_without_the_exporter():
  # export.py writes bundles with Pipeline.load; Pipeline.load reads them with bundle.py, which imports neither
  # (only the safetensors format module, which imports nothing of unimm_jax).
  code = ("import sys; import unimm_jax.bundle; print(sorted(m for m in sys.modules if m.startswith('unimm_jax.'))); "
          "import unimm_jax.pipeline; print('unimm_jax.export' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["['unimm_jax.bundle',", "'unimm_jax.safetensors_io']", "False"], out.stdout


def test_read_safetensors_reads_bfloat16_that_numpy_cannot(tmp_path):
  import jax.numpy as jnp
  from safetensors.flax import save_file
  want = {"a/kernel": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3) / 7, "b": jnp.ones(4, jnp.float32)}
  save_file(want, str(tmp_path / "x.safetensors"))
  got = bundle.read_safetensors(tmp_path / "x.safetensors")
  assert got["a/kernel"].dtype == jnp.bfloat16 and got["b"].dtype == np.float32
  np.testing.assert_array_equal(got["a/kernel"].astype(np.float32), np.asarray(want["a/kernel"], np.float32))
