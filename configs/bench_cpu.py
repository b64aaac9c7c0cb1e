"""The CPU reference size of the performance issue: ``python -m unimm_jax.bench --config=configs/bench_cpu.py``.

d_model 512, 8 layers, 8 heads of 64, gated MLP 1536; captions of 64 byte tokens and 256x256 images as 16x16 = 256
tokens of an 8,192-code vocabulary (what a learned tokenizer gives), so a sequence is 320 tokens; batch 8, float32.
The bench feeds random tokens (timing does not depend on them); every feature of the real model is on: per-modality
output restriction, per-modality times, 2-D rotary plus learned positions, EMA. The same sizes as
``../shared/bench/ref_jax.py --config cpu``, the plain-JAX yardstick.

The step runs as two concurrent sub-batches of 4 (``train.concurrent_chunks=2``: the same update, and 4-7 % faster
on a 2-core CPU, whose thunk executor then overlaps one sub-batch's serial operations with the other's work).
"""

from unimm_jax.configuration import base_config


def get_config():
  config = base_config()
  config.data.source = "folder"          # the bench never reads data; the layout comes from the sizes below
  config.data.path = "/path/to/folder"   # only to train on real data (README, "Folder data")
  config.text.tokenizer = "byte"
  config.text.max_len = 64
  config.image.tokenizer = "patch"
  config.image.size = 256
  config.image.patch = 16
  config.image.codebook_size = 8_192
  config.model.d_model = 512
  config.model.num_layers = 8
  config.model.num_heads = 8
  config.model.head_dim = 64
  config.model.mlp_dim = 1536
  config.model.max_len = 320
  config.model.vocab_multiple = 1
  config.train.batch_size = 8
  config.train.concurrent_chunks = 2
  config.eval.batch_size = 8
  return config
