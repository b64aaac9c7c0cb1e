"""``convert import|export --format=mmada``: a tiny MMaDA checkpoint in the upstream's exact layout (mmada_upstream.py:
its vocabulary with the task tokens as reserved ids, image codes at len(tokenizer)), with a tiny MAGVIT-v2
(magvitv2_upstream.py) as its image tokenizer, checked against the upstream's prompt builders and its forward pass
with the attention mask, in numpy."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import magvitv2_upstream as mv  # pylint: disable=g-import-not-at-top,wrong-import-position
import mmada_upstream as mu  # pylint: disable=g-import-not-at-top,wrong-import-position

MAX_TEXT_LEN, QUESTION_LEN, ANSWER_LEN = 12, 20, 8
SIZE = 16          # tiny MAGVIT-v2: 4x downsampling -> a 4 x 4 grid = the tiny config's num_vq_tokens 16
PROMPTS = ["a red circle", "the small blue square on the left and a green triangle at the top", ""]
QUESTIONS = ["what colour is the circle ?", "  is there a square ?  "]


def _convert(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "unimm_jax.convert", *map(str, args)], capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
  root = tmp_path_factory.mktemp("mmada")
  cfg = mu.tiny_config()
  tensors = mu.random_tensors(cfg)
  mu.write_checkpoint(root / "hf", cfg, tensors)
  mv.write_checkpoint(root / "magvit", mv.random_tensors(mv.tiny_args()))
  return root, cfg, tensors


@pytest.fixture(scope="module")
def imported(upstream):
  root, _, _ = upstream
  run = _convert("import", "--format=mmada", f"--src={root / 'hf'}", f"--image_tokenizer={root / 'magvit'}",
                 f"--out={root / 'bundle'}", f"--max_text_len={MAX_TEXT_LEN}", f"--question_len={QUESTION_LEN}",
                 f"--answer_len={ANSWER_LEN}")
  assert run.returncode == 0, run.stderr[-3000:]
  from unimm_jax import Pipeline
  return root / "bundle", Pipeline.load(root / "bundle", batch_size=4)


def _words(pipe, text):
  return pipe.tokenizers.text.encode_ids(text, add_special_tokens=False) if text else []


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def test_the_vocabulary_and_formats_are_the_upstreams(upstream, imported):
  _, cfg, _ = upstream
  _, pipe = imported
  lay = pipe.layout
  assert lay.size == cfg["new_vocab_size"] == 528 and lay.mask_id == mu.MASK
  assert lay.id_range("image") == (mu.TEXT_VOCAB_SIZE, mu.TEXT_VOCAB_SIZE + 64)   # codes at len(tokenizer)
  assert dict(lay.special_ids) == mu.TASK        # read from the tokenizer's reserved tokens, not by MMaDA's names
  assert pipe.config.model.pad_key_id == mu.TASK["[iPAD]"]
  assert pipe.config.sample.preset == "mmada"


def test_text_to_image_sequences_equal_the_upstream_prompts(upstream, imported):
  _, cfg, _ = upstream
  _, pipe = imported
  t2i = pipe.view("t2i")
  ours = t2i.start_tokens({"prompt": PROMPTS}, ["image"])
  want, mask = mu.t2i_gen_prompt([_words(pipe, p) for p in PROMPTS], 16, cfg, MAX_TEXT_LEN)
  np.testing.assert_array_equal(ours, want)       # token for token: pads, task token, BOS, truncation, EOS, MASKs
  assert mask[1].all() and not mask[0].all()      # the long prompt was cut (no pad), the short ones padded
  uncond, _ = mu.t2i_uncond_prompt(1, 16, cfg, MAX_TEXT_LEN)
  np.testing.assert_array_equal(t2i.start_tokens({"prompt": [""]}, ["image"]), uncond)
  # Guidance's uncond pass gives the prompt segment MMaDA's unconditional prompt (the empty caption's), not MASK.
  (target, null, null_tokens), = t2i._guide(["image"], ["prompt"])   # pylint: disable=protected-access
  lo, hi = t2i.layout.span("prompt")
  assert all(null[lo:hi]) and not any(null[hi:]) and all(target[-17:-1])
  np.testing.assert_array_equal(np.asarray(null_tokens)[lo:hi], uncond[0, lo:hi])


def test_understanding_sequences_equal_the_upstream_prompt_without_its_pads(upstream, imported):
  """The question segment is left-padded with [iPAD], which the network treats as not there (no attention, no
  position): with the pads taken out, each row is the upstream's unpadded sequence token for token."""
  _, cfg, _ = upstream
  _, pipe = imported
  mmu = pipe.view("mmu")
  codes = np.random.default_rng(3).integers(0, 64, (len(QUESTIONS), 16))
  ours = mmu.start_tokens({"image": codes, "question": QUESTIONS}, ["answer"])
  for row, q, c in zip(ours, QUESTIONS, codes):
    want = mu.mmu_prompt(c[None], [_words(pipe, q.strip())], cfg, max_new_tokens=ANSWER_LEN)[0]
    np.testing.assert_array_equal(row[row != mu.TASK["[iPAD]"]], want)


def test_logits_match_the_upstream_forward_with_its_attention_mask(upstream, imported):
  _, cfg, tensors = upstream
  _, pipe = imported
  t2i = pipe.view("t2i")
  ids, mask = mu.t2i_gen_prompt([_words(pipe, p) for p in PROMPTS], 16, cfg, MAX_TEXT_LEN)
  ids[:, -17:-1] = np.random.default_rng(1).integers(mu.TEXT_VOCAB_SIZE, mu.TEXT_VOCAB_SIZE + 64, (3, 16))  # codes
  ours = np.asarray(t2i.model.apply({"params": t2i.params}, ids))
  ref = mu.reference_logits(cfg, tensors, ids, mask)
  real = mask.astype(bool)
  assert np.abs(ref[real]).max() > 1.0
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
  # Understanding: our padded rows against the upstream's unpadded ones, position by position.
  mmu = pipe.view("mmu")
  codes = np.random.default_rng(4).integers(0, 64, (len(QUESTIONS), 16))
  padded = mmu.start_tokens({"image": codes, "question": QUESTIONS}, ["answer"])
  padded = np.where(padded == mu.MASK, np.arange(padded.shape[1]) % 40 + 1, padded)   # answers being written
  ours = np.asarray(mmu.model.apply({"params": mmu.params}, padded))
  for row, logits in zip(padded, ours):
    keep = row != mu.TASK["[iPAD]"]
    ref = mu.reference_logits(cfg, tensors, row[keep][None])[0]
    np.testing.assert_allclose(logits[keep], ref, atol=1e-4, rtol=0)


def test_import_export_import_is_bit_exact(upstream, imported, tmp_path):
  from unimm_jax import Pipeline, convert
  from unimm_jax import safetensors_io as st
  root, cfg, tensors = upstream
  bundle_dir, pipe = imported
  hf = tmp_path / "hf"
  files = convert.export_checkpoint("mmada", bundle_dir, hf, max_shard_bytes=30_000)
  assert "model.safetensors.index.json" in files
  assert json.loads((hf / "config.json").read_text()) == cfg
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    assert (hf / name).read_text() == (root / "hf" / name).read_text()
  back = st.CheckpointReader(hf)
  assert back.names() == sorted(tensors)
  for name, x in tensors.items():
    y = back.read(name)
    assert y.dtype == x.dtype and y.shape == x.shape and y.tobytes() == x.tobytes(), name
  convert.import_checkpoint("mmada", hf, tmp_path / "again", image_tokenizer=str(root / "magvit"),
                            lengths=dict(max_text_len=MAX_TEXT_LEN, question_len=QUESTION_LEN, answer_len=ANSWER_LEN))
  again = Pipeline.load(tmp_path / "again")
  import jax
  for a, b in zip(jax.tree.leaves(pipe.params), jax.tree.leaves(again.params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_draw_caption_and_answer_with_the_upstream_presets(imported):
  """End to end on the imported model: images drawn through the MAGVIT-v2 decoder, captions and answers written
  with MMaDA's decoding (sample.preset='mmada')."""
  from unimm_jax import pipeline as pipeline_lib
  _, pipe = imported
  t2i_kw = pipeline_lib.sampler_kwargs(pipe.config, "t2i")
  assert (t2i_kw["steps"], t2i_kw["guidance_scale"], t2i_kw["reveal_schedule"]) == (15, 3.5, "cosine")
  images = pipe.text_to_image(PROMPTS[:2], seed=0, **{**t2i_kw, "steps": 4})
  assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.uint8 and images.std() > 0
  vqa_kw = pipeline_lib.sampler_kwargs(pipe.config, "vqa")
  assert (vqa_kw["block_length"], vqa_kw["steps"], vqa_kw["temperature"]) == (2, 1, 0.0)   # answer 8: 4 blocks
  answers = pipe.answer(_images(2), QUESTIONS, **vqa_kw)
  captions = pipe.image_to_text(_images(2, seed=1), **pipeline_lib.sampler_kwargs(pipe.config, "i2t"))
  assert len(answers) == len(captions) == 2 and all(isinstance(a, str) for a in answers + captions)
  ids = pipe.view("mmu").complete({"image": _images(2), "question": QUESTIONS}, ["answer"], as_ids=True,
                                  **vqa_kw)["answer"]
  assert ids.shape == (2, ANSWER_LEN) and (ids >= 0).all() and (ids != mu.MASK).all()


def test_sample_command_line_on_the_imported_bundle(imported, tmp_path):
  from PIL import Image
  bundle_dir, _ = imported
  Image.fromarray(_images(1)[0]).save(tmp_path / "a.png")
  for task, extra in (("t2i", ["--prompt=a red circle", "--num=1", "--steps=2"]),
                      ("vqa", [f"--image={tmp_path / 'a.png'}", "--question=what colour is the circle ?"])):
    run = subprocess.run([sys.executable, "-m", "unimm_jax.sample", f"--workdir={bundle_dir}", f"--task={task}",
                          f"--out={tmp_path / task}", *extra], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / task / "samples.json").read_text())
    assert len(record["samples"]) == 1
    if task == "t2i":   # MMaDA's preset, its steps overridden
      assert record["steps"] == 2 and record["reveal_schedule"] == "cosine"
      assert (tmp_path / task / record["samples"][0]["image"]).exists()
    else:
      assert record["block_length"] == 2 and record["temperature"] == 0.0
      assert isinstance(record["samples"][0]["answer"], str)


def test_lora_fine_tuning_on_pretokenized_folder_pairs(imported, tmp_path):
  """The user's folder of image/caption pairs pretokenized with the imported MAGVIT-v2 (the bundle's saved
  tokenizer), then a few LoRA steps of text-to-image on it, in MMaDA's t2i format."""
  from PIL import Image
  from unimm_jax import Pipeline, configuration, pretokenize, train
  bundle_dir, _ = imported
  data = tmp_path / "data"
  data.mkdir()
  for split, n in (("train", 8), ("val", 4)):
    lines = []
    for i, img in enumerate(_images(n, seed=10 + n)):
      Image.fromarray(img).save(data / f"{split}{i}.png")
      lines.append(json.dumps({"image": f"{split}{i}.png", "text": PROMPTS[i % 2]}))
    (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
  config = configuration.from_dict(json.loads((bundle_dir / "model.json").read_text())["config"])
  config.init["from"] = str(bundle_dir)
  config.data.source, config.data.path = "folder", str(data)
  config.data.fields = (("prompt", "text"),)
  config.image.tokenizer_path = str(bundle_dir / "tokenizers")
  index = pretokenize.pretokenize(config, tmp_path / "tokens", workers=1, shard_size=8)
  assert (index["splits"]["train"]["num_examples"], index["splits"]["val"]["num_examples"]) == (8, 4)
  assert json.loads((tmp_path / "tokens" / "tokenizers" / "image_tokenizer.json").read_text())["kind"] == "magvitv2"
  config.data.source, config.data.path = "pretokenized", str(tmp_path / "tokens")
  config.model.lora_rank, config.model.lora_alpha = 4, 8.0
  config.train.steps, config.train.batch_size, config.train.log_every = 2, 4, 1
  config.optim.warmup_steps, config.optim.learning_rate = 1, 1e-2
  config.eval.every_steps, config.ckpt.every_steps, config.eval.batch_size = 2, 2, 4
  config.mesh.cpu_devices = 0
  report = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert report["step"] == 2 and np.isfinite(report["val_bits_per_token"]["image"])
  tuned = Pipeline.load(tmp_path / "run", batch_size=2)
  assert tuned.text_to_image(PROMPTS[:1], steps=2).shape == (1, SIZE, SIZE, 3)


@pytest.mark.parametrize("damage, message", [
    ("vqgan", "is not a MAGVIT-v2"),
    ("codebook", "codebook_size=32 but the MAGVIT-v2 tokenizer at"),
    ("no_tokenizer", "needs --image_tokenizer"),
])
def test_bad_input_is_one_line_and_writes_nothing(upstream, tmp_path, damage, message):
  import shutil
  root, cfg, tensors = upstream
  src, magvit = root / "hf", root / "magvit"
  if damage == "vqgan":
    import vqgan_upstream as vq  # pylint: disable=g-import-not-at-top
    magvit = tmp_path / "vqgan"
    vq.write_model(magvit, vq.tiny_config(), vq.random_tensors(vq.tiny_config()))
  elif damage == "codebook":
    src = tmp_path / "hf"
    shutil.copytree(root / "hf", src)
    (src / "config.json").write_text(json.dumps({**cfg, "codebook_size": 32}))
  args = ["import", "--format=mmada", f"--src={src}", f"--out={tmp_path / 'out'}", f"--max_text_len={MAX_TEXT_LEN}",
          f"--question_len={QUESTION_LEN}", f"--answer_len={ANSWER_LEN}"]
  if damage != "no_tokenizer":
    args.append(f"--image_tokenizer={magvit}")
  run = _convert(*args)
  assert run.returncode == 2, run.stderr[-2000:]
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, last
  assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_an_image_of_a_size_the_tokenizer_cannot_take_is_one_clear_error(imported):
  _, pipe = imported
  with pytest.raises(ValueError, match="16"):
    pipe.answer(np.zeros((1, 12, 12, 3), np.uint8), ["what colour is the circle ?"])
