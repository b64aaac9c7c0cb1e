"""``convert import|export --format=lumina_dimoo``: a tiny Lumina-DiMOO checkpoint in the upstream's layout
(lumina_dimoo_upstream.py: its vocabulary, specials, prompts; the aMUSEd-layout VQ-GAN of vqgan_upstream.py in its
``vqvae/``), checked against the upstream's prompt builders and its forward pass in numpy. The upstream's grid
ends every row with <end-of-line>, which the network inserts (``model.image_row_end_id``)."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import lumina_dimoo_upstream as lu  # pylint: disable=g-import-not-at-top,wrong-import-position
import vqgan_upstream as vq  # pylint: disable=g-import-not-at-top,wrong-import-position

LENGTHS = dict(max_text_len=24, question_len=48, answer_len=8, image_size=8)   # 2x VQ-GAN: a 4 x 4 grid
IDS = lu.TINY_IDS
PROMPTS = ["a red circle", "small blue square", ""]
QUESTIONS = ["what colour is the circle ?", "Please describe this"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
  root = tmp_path_factory.mktemp("lumina")
  cfg = lu.tiny_config()
  tensors = lu.random_tensors(cfg)
  lu.write_checkpoint(root / "hf", cfg, tensors)
  vc = vq.tiny_config()
  vq.write_model(root / "hf" / "vqvae", vc, vq.random_tensors(vc))
  return root, cfg, tensors


@pytest.fixture(scope="module")
def imported(upstream):
  from unimm_jax import Pipeline, convert
  root, _, _ = upstream
  meta = convert.import_checkpoint("lumina_dimoo", root / "hf", root / "bundle", lengths=LENGTHS)
  return root / "bundle", meta, Pipeline.load(root / "bundle", batch_size=2)


def _network_rows(pipe, tokens):
  """What the network runs on for each row: the pads taken out, a row end after every image row."""
  from unimm_jax.models import transformer
  src, inserted = transformer.row_end_expansion(pipe.layout)
  expanded = np.where(inserted[None], IDS["newline"], np.asarray(tokens)[:, src])
  return [row[row != IDS["pad"]] for row in expanded]


def _ids(pipe, text):
  return pipe.tokenizers.text.encode_ids(text, add_special_tokens=False)


def test_vocabulary_codes_at_the_end_and_specials_by_name(imported):
  _, meta, pipe = imported
  assert pipe.layout.size == 164 and pipe.layout.id_range("image") == (IDS["image_offset"], 164)
  assert pipe.layout.mask_id == IDS["mask"] and pipe.tokenizers.text.vocab_size == IDS["image_offset"]
  special = dict(pipe.layout.special_ids)
  assert (special["<IMAGE>"], special["</answer>"], special["<end-of-line>"]) == (IDS["boi"], IDS["eoa"],
                                                                                 IDS["newline"])
  assert meta["config"]["model"]["image_row_end_id"] == IDS["newline"]


def test_sequences_are_the_upstreams_token_for_token(imported):
  _, _, pipe = imported
  t2i = pipe.view("t2i")
  rows = _network_rows(t2i, t2i.start_tokens({"prompt": PROMPTS}, ["image"]))
  for row, p in zip(rows, PROMPTS):
    want, _ = lu.t2i_sequence(_ids(pipe, lu.t2i_texts(p)[0]), 4, 4)
    np.testing.assert_array_equal(row, want)
  # Guidance's uncond pass: the prompt of <uncondition> (inference_t2i.py), the grid as the cond pass has it.
  (_, null, null_tokens), = t2i._guide(["image"], ["prompt"])   # pylint: disable=protected-access
  uncond = np.where(np.asarray(null), np.asarray(null_tokens), t2i.start_tokens({"prompt": ["x"]}, ["image"])[0])
  want, _ = lu.t2i_sequence(_ids(pipe, lu.t2i_texts("x")[1]), 4, 4)
  np.testing.assert_array_equal(_network_rows(t2i, uncond[None])[0], want)
  mmu = pipe.view("mmu")
  codes = np.random.default_rng(0).integers(0, 64, (2, 16))
  rows = _network_rows(mmu, mmu.start_tokens({"image": codes, "question": QUESTIONS}, ["answer"]))
  for row, q, c in zip(rows, QUESTIONS, codes):
    want, _ = lu.mmu_sequence(_ids(pipe, lu.mmu_text(q)), c.reshape(4, 4), 8, rebreak=False)
    np.testing.assert_array_equal(row, want)


def test_logits_match_the_upstream_forward(upstream, imported):
  _, cfg, tensors = upstream
  _, _, pipe = imported
  mmu = pipe.view("mmu")
  codes = np.random.default_rng(1).integers(0, 64, (2, 16))
  tokens = mmu.start_tokens({"image": codes, "question": QUESTIONS}, ["answer"])
  tokens = np.where(tokens == IDS["mask"], np.arange(tokens.shape[1]) % 50 + 1, tokens)   # answers being written
  ours = np.asarray(mmu.model.apply({"params": mmu.params}, tokens))
  from unimm_jax.models import transformer
  src, inserted = transformer.row_end_expansion(mmu.layout)
  for row, logits, net in zip(tokens, ours, _network_rows(mmu, tokens)):
    ref = lu.reference_logits(cfg, tensors, net[None])[0]
    # our positions, in the network's order without pads: drop the inserted row ends from the reference
    expanded = np.where(inserted, IDS["newline"], row[src])
    kept = ~inserted[expanded != IDS["pad"]]
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(logits[row != IDS["pad"]], ref[kept], atol=1e-4, rtol=0)


def test_import_export_import_is_bit_exact(upstream, imported, tmp_path):
  from unimm_jax import Pipeline, convert
  from unimm_jax import safetensors_io as st
  root, cfg, tensors = upstream
  bundle_dir, _, pipe = imported
  files = convert.export_checkpoint("lumina_dimoo", bundle_dir, tmp_path / "hf", max_shard_bytes=30_000)
  assert "model.safetensors.index.json" in files
  assert json.loads((tmp_path / "hf" / "config.json").read_text()) == cfg
  back = st.CheckpointReader(tmp_path / "hf")
  for name, x in tensors.items():
    y = back.read(name)
    assert y.dtype == x.dtype and y.tobytes() == x.tobytes(), name
  convert.import_checkpoint("lumina_dimoo", tmp_path / "hf", tmp_path / "again", lengths=LENGTHS,
                            image_tokenizer=str(root / "hf" / "vqvae"))
  import jax
  for a, b in zip(jax.tree.leaves(pipe.params), jax.tree.leaves(Pipeline.load(tmp_path / "again").params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_draw_and_answer_with_the_upstream_preset(imported):
  from unimm_jax import pipeline as pipeline_lib
  _, _, pipe = imported
  t2i_kw = pipeline_lib.sampler_kwargs(pipe.config, "t2i")
  assert (t2i_kw["steps"], t2i_kw["guidance_scale"]) == (64, 4.0)
  images = pipe.text_to_image(PROMPTS[:2], **{**t2i_kw, "steps": 3})
  assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8
  vqa_kw = pipeline_lib.sampler_kwargs(pipe.config, "vqa")
  assert (vqa_kw["block_length"], vqa_kw["steps"]) == (2, 2)      # one token a step, blocks of a quarter
  answers = pipe.answer(images, QUESTIONS, **vqa_kw)
  assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_a_checkpoint_without_its_vqgan_is_one_line(upstream, tmp_path):
  import shutil
  import subprocess
  root, _, _ = upstream
  src = tmp_path / "hf"
  shutil.copytree(root / "hf", src, ignore=shutil.ignore_patterns("vqvae"))
  run = subprocess.run([sys.executable, "-m", "unimm_jax.convert", "import", "--format=lumina_dimoo", f"--src={src}",
                        f"--out={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 2
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "is not a diffusers VQModel directory" in last, last
  assert not (tmp_path / "out").exists()


def test_an_explicit_config_takes_the_tokenizers_special_ids(upstream, tmp_path):
  """A config file's ids of the special tokens (configs/lumina_dimoo_8b.py writes the released ones) give way to
  the checkpoint's tokenizer, which names them."""
  from unimm_jax import convert
  root, cfg, _ = upstream
  config = convert.default_config("lumina_dimoo", root / "hf", cfg, lengths=LENGTHS)
  config.sequence.special_ids = {**dict(config.sequence.special_ids), "</answer>": 7, "<end-of-line>": 8,
                                 "<|pad|>": 9}
  config.model.pad_key_id, config.model.image_row_end_id = 9, 8
  meta = convert.import_checkpoint("lumina_dimoo", root / "hf", tmp_path / "b", config)
  seq, model = meta["config"]["sequence"], meta["config"]["model"]
  assert (seq["special_ids"]["</answer>"], model["image_row_end_id"], model["pad_key_id"]) == (IDS["eoa"],
                                                                                              IDS["newline"], IDS["pad"])
