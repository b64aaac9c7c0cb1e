"""The grain input pipeline: encoding, unknown-word counts, checkpointable position, eval batches."""

import numpy as np

from unimm_jax import configuration, tokenizers
from unimm_jax.data import input_pipeline, shapes


def _toks(text_len=24):
  examples = [shapes.sample_example("train", 0, i) for i in range(300)]
  text = tokenizers.WordTokenizer.fit([e[2] for e in examples])
  image = tokenizers.PatchTokenizer.fit(np.stack([e[1] for e in examples]), 24, 3, 4, 4, 1024)
  return input_pipeline.Tokenizers(text, image, text_len)


def test_encode_packs_and_counts_unknown_words():
  toks = _toks()
  _, image, caption = shapes.sample_example("val", 0, 0)
  out = input_pipeline.Encode(toks).map({"image": image, "text": caption})
  assert out["tokens"].shape == (toks.layout.seq_len,) and out["text_unk"] == 0
  texts, images = toks.decode(out["tokens"][None])
  assert texts[0] == caption and shapes.read_image(images[0]) == shapes.read_image(image)
  odd = input_pipeline.Encode(toks).map({"image": image, "text": "a purple hexagon at the top left"})
  assert odd["text_unk"] == 2                       # "purple" and "hexagon" are not in the vocabulary


def test_train_iterator_resumes_from_its_saved_position():
  config = configuration.base_config()
  config.data.train_size = 500
  source = input_pipeline.make_source(config, "train")
  toks = _toks()
  ds = input_pipeline.train_dataset(source, toks, batch_size=16, seed=3)
  it = input_pipeline.train_iterator(ds, num_threads=1)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it)["tokens"] for _ in range(3)]
  again = input_pipeline.train_iterator(ds, num_threads=1)
  again.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(again)["tokens"], want)
  # Shuffled, and every example of an epoch is seen once before any repeats.
  fresh = input_pipeline.train_iterator(input_pipeline.train_dataset(source, toks, batch_size=50, seed=3), num_threads=0)
  epoch = np.concatenate([next(fresh)["tokens"] for _ in range(10)])
  direct = np.stack([toks.encode(source[i]["text"], source[i]["image"]) for i in range(len(source))])
  assert sorted(r.tobytes() for r in epoch) == sorted(r.tobytes() for r in direct)   # each example once
  assert not np.array_equal(epoch, direct)                                            # in shuffled order


def test_process_rows_stack_into_the_single_process_batch():
  config = configuration.base_config()
  config.data.train_size = 64
  source = input_pipeline.make_source(config, "train")
  toks = _toks()
  single = input_pipeline.train_iterator(input_pipeline.train_dataset(source, toks, batch_size=16, seed=0), num_threads=0)
  parts = [input_pipeline.train_iterator(input_pipeline.train_dataset(source, toks, batch_size=16, seed=0, shard_index=i,
                                                          shard_count=2), num_threads=0) for i in range(2)]
  for _ in range(6):   # past the first epoch (64 examples = 4 batches): reshuffled, still aligned
    want = next(single)["tokens"]
    halves = [next(p)["tokens"] for p in parts]
    assert halves[0].shape == (8, toks.layout.seq_len)
    np.testing.assert_array_equal(np.concatenate(halves), want)
    assert not {r.tobytes() for r in halves[0]} & {r.tobytes() for r in halves[1]}   # each reads its own rows


def test_eval_batches_cover_every_example_once_with_padding_weights():
  config = configuration.base_config()
  config.data.val_size = 70
  source = input_pipeline.make_source(config, "val")
  batches = input_pipeline.eval_batches(source, _toks(), batch_size=32)
  assert [b["tokens"].shape[0] for b in batches] == [32, 32, 32]
  assert sum(b["weight"].sum() for b in batches) == 70
  np.testing.assert_array_equal(batches[-1]["weight"], [1.0] * 6 + [0.0] * 26)


def test_the_model_seed_does_not_change_the_examples_only_data_seed_does():
  config = configuration.base_config()
  other = configuration.base_config()
  other.seed = 7                                    # another model (init, noise, order): same val set
  for split in ("train", "val"):
    a, b = input_pipeline.make_source(config, split)[3], input_pipeline.make_source(other, split)[3]
    assert a["text"] == b["text"] and np.array_equal(a["image"], b["image"])
  other.data.seed = 1
  assert input_pipeline.make_source(other, "val")[3]["text"] != input_pipeline.make_source(config, "val")[3]["text"]
