"""Real-data paths: the sentencepiece text tokenizer, pre-tokenized ArrayRecord shards (same batches as on the
fly, resumable, parallel), and TFDS datasets built locally by the project's own builder (no download, no
TensorFlow)."""

import json
import os

import jax
import numpy as np
import pytest

from unimm_jax import configuration, evaluate, pretokenize, tokenizers, train
from unimm_jax.data import input_pipeline, pretokenized, shapes, tfds_shapes, tfds_source
from unimm_jax.tokenizers import learned

from test_train import tiny_config  # pylint: disable=g-bad-import-order


# ---------------------------------------------------------------------------------------------------------------
# sentencepiece
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_train_save_load_round_trip(tmp_path, model_type):
  train_caps = [shapes.ShapesSource("train", 400)[i]["text"] for i in range(400)]
  val_caps = [shapes.ShapesSource("val", 50)[i]["text"] for i in range(50)]
  tok = tokenizers.SentencePieceTokenizer.fit(train_caps, vocab_size=60, model_type=model_type)
  assert 2 < tok.vocab_size <= 61 and tok.pad_id == 0 and tok.unk_id == 1
  tok.save(tmp_path)
  loaded = tokenizers.load_text_tokenizer(tmp_path)
  assert isinstance(loaded, tokenizers.SentencePieceTokenizer) and loaded.vocab_size == tok.vocab_size
  for caption in val_caps:
    ids = tok.encode(caption, 64)
    np.testing.assert_array_equal(loaded.encode(caption, 64), ids)
    n = int((ids != 0).sum())
    assert n < 64 and (ids[:n] != 0).all() and (ids[n:] == 0).all()     # padded with PAD, no PAD inside
    assert loaded.decode(ids) == caption                                 # lossless on normalised captions
  # A given .model file (config.text.sentencepiece_model) is used as it is, not retrained.
  config = tiny_config(**{"text.tokenizer": "sentencepiece",
                          "text.sentencepiece_model": str(tmp_path / tokenizers.SENTENCEPIECE_FILE)})
  given = tokenizers.make_text_tokenizer(config, ["entirely different words"])
  np.testing.assert_array_equal(given.encode(val_caps[0], 40), tok.encode(val_caps[0], 40))


# ---------------------------------------------------------------------------------------------------------------
# Pre-tokenized data
# ---------------------------------------------------------------------------------------------------------------
def _random_fsq_tokenizer(directory) -> None:
  """A learned FSQ tokenizer with random weights (the data path does not care whether it was trained)."""
  c = configuration.base_config()
  c.image.tokenizer = "fsq"
  c.tokenizer.widths = (8, 16, 16)
  c.tokenizer.fsq_levels = (5, 5, 3)
  spec = learned.spec_from_config(c)
  params = jax.jit(lambda key: learned.init_params(spec, key))(jax.random.PRNGKey(0))
  learned.LearnedImageTokenizer(spec, params, encode_batch=16).save(directory)


@pytest.mark.parametrize("image_tokenizer", ["patch", "fsq"])
def test_pretokenized_batches_equal_on_the_fly_batches(tmp_path, image_tokenizer):
  overrides = {"data.train_size": 300, "data.val_size": 40, "data.fit_examples": 300}
  if image_tokenizer == "fsq":
    _random_fsq_tokenizer(tmp_path / "tok")
    overrides.update({"image.tokenizer": "fsq", "image.tokenizer_path": str(tmp_path / "tok")})
  config = tiny_config(**overrides)
  index = pretokenize.pretokenize(config, tmp_path / "tokens", workers=1, shard_size=128)
  assert index["splits"]["train"]["num_examples"] == 300 and len(index["splits"]["train"]["shards"]) == 3

  pre_config = tiny_config(**{**overrides, "data.source": "pretokenized", "data.path": str(tmp_path / "tokens")})
  fly_toks = input_pipeline.fit_or_load_tokenizers(config, tmp_path / "fly")
  pre_toks = input_pipeline.fit_or_load_tokenizers(pre_config, tmp_path / "pre")
  assert pre_toks.layout == fly_toks.layout
  fly = input_pipeline.train_iterator(input_pipeline.train_dataset(input_pipeline.make_source(config, "train"), fly_toks,
                                                       batch_size=16, seed=5), num_threads=0)
  pre = input_pipeline.train_iterator(input_pipeline.train_dataset(input_pipeline.make_source(pre_config, "train"), pre_toks,
                                                       batch_size=16, seed=5), num_threads=0)
  for _ in range(25):     # more than one epoch of 300 examples: reshuffled epochs agree too
    a, b = next(fly), next(pre)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["text_unk"], b["text_unk"])
  val_fly = input_pipeline.eval_batches(input_pipeline.make_source(config, "val"), fly_toks, 32)
  val_pre = input_pipeline.eval_batches(input_pipeline.make_source(pre_config, "val"), pre_toks, 32)
  for a, b in zip(val_fly, val_pre, strict=True):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_pretokenize_resumes_in_parallel(tmp_path):
  config = tiny_config(**{"data.train_size": 200, "data.val_size": 32, "data.fit_examples": 200})
  out = tmp_path / "tokens"
  first = pretokenize.pretokenize(config, out, workers=1, shard_size=64)
  shards = sorted(p.name for p in out.glob("*.array_record"))
  assert len(shards) == 4 + 1
  # An interrupted run: one shard never finished, no index yet.
  victim = out / first["splits"]["train"]["shards"][2]
  good = victim.read_bytes()
  victim.unlink()
  (out / pretokenized.INDEX_FILE).unlink()
  kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.array_record")}
  with pytest.raises(FileNotFoundError, match="not a finished"):
    pretokenized.PretokenizedSource(out, "train")
  pretokenize.pretokenize(config, out, workers=2, shard_size=64)          # two worker processes
  assert victim.read_bytes() == good
  assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.array_record") if p.name in kept} == kept
  assert not list(out.glob("*.tmp*"))
  # Generation is scored on shapes data whether the run read it directly or pre-tokenized.
  pre_config = tiny_config(**{"data.source": "pretokenized", "data.path": str(out), "data.seed": 3})
  assert evaluate.shapes_seed(pre_config) == config.data.seed == 0
  # Other settings on the same directory are refused.
  with pytest.raises(ValueError, match="another plan"):
    pretokenize.pretokenize(config, out, workers=1, shard_size=50)



# ---------------------------------------------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  tfds_shapes.build(data_dir, train=96, val=32)
  return data_dir


def _tfds_overrides(data_dir, **extra):
  return {"data.source": "tfds", "data.tfds_name": tfds_shapes.NAME, "data.tfds_data_dir": str(data_dir),
          "data.fit_examples": 96, **extra}


def test_tfds_labels_become_captions_through_templates(tfds_dir):
  config = tiny_config(**_tfds_overrides(tfds_dir, **{"data.label_key": "label",
                                                      "data.caption_templates": ("a photo of a {}.", "a {}")}))
  source = input_pipeline.make_source(config, "train")
  assert len(source) == 96 and source[0]["image"].shape == (24, 24, 3)
  texts = [source[i]["text"] for i in range(4)]
  assert texts[0].startswith("a photo of a ") and not texts[1].startswith("a photo")
  for text in texts:
    assert any(text.endswith(label) or text.endswith(label + ".") for label in tfds_shapes.LABELS), text
  with pytest.raises(configuration.ConfigError, match="exactly one"):
    tiny_config(**_tfds_overrides(tfds_dir, **{"data.label_key": "label", "data.text_key": "caption"}))
  bad = tiny_config(**_tfds_overrides(tfds_dir, **{"data.text_key": "captions"}))
  with pytest.raises(KeyError, match="captions"):
    input_pipeline.make_source(bad, "train")[0]


def test_tfds_captions_train_a_few_steps_with_sentencepiece_and_pretokenized(tfds_dir, tmp_path, monkeypatch):
  overrides = _tfds_overrides(tfds_dir, **{"data.text_key": "caption", "text.tokenizer": "sentencepiece",
                                           "text.vocab_size": 80, "train.steps": 4, "eval.batch_size": 32})
  config = tiny_config(**overrides)
  report = train.train_and_evaluate(config, tmp_path / "run")
  assert report["step"] == 4 and np.isfinite(report["val_bits_per_token"]["text"])
  assert (tmp_path / "run" / "tokenizers" / tokenizers.SENTENCEPIECE_FILE).exists()
  shapes_caption = input_pipeline.make_source(config, "val")[0]["text"]
  assert shapes.read_caption(shapes_caption) is not None
  # The same TFDS source pre-tokenized, then trained on: token ids are read, no image is decoded or encoded.
  pretokenize.pretokenize(config, tmp_path / "tokens", workers=1, shard_size=1000)

  def no_images(*args, **kwargs):
    raise AssertionError("an image was read or encoded while training on pretokenized data")

  monkeypatch.setattr(tokenizers.PatchTokenizer, "_encode", no_images)
  monkeypatch.setattr(tfds_source.TfdsSource, "__getitem__", no_images)
  pre = tiny_config(**{**overrides, "data.source": "pretokenized", "data.path": str(tmp_path / "tokens")})
  report = train.train_and_evaluate(pre, tmp_path / "run_pre")
  assert report["step"] == 4
  saved = json.loads((tmp_path / "tokens" / pretokenized.INDEX_FILE).read_text())
  assert saved["splits"]["val"]["num_examples"] == 32 and saved["source"]["tfds_name"] == tfds_shapes.NAME
  assert "tensorflow" not in os.sys.modules
