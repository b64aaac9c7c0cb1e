"""The GPU reference size of the performance issue: ``python -m unimm_jax.bench --config=configs/bench_gpu.py``.

d_model 1024, 16 layers, 16 heads of 64, gated MLP 3072; captions of 128 byte tokens and 32x32 = 1024 image tokens
of a 16,384-code vocabulary (sequence 1152); batch 32; bfloat16 compute with float32 master weights and cuDNN
flash attention. The same sizes as ``../shared/bench/ref_jax.py --config gpu``.
"""

from unimm_jax.configuration import base_config


def get_config():
  config = base_config()
  config.data.source = "folder"          # the bench never reads data; the layout comes from the sizes below
  config.data.path = "/path/to/folder"   # only to train on real data (README, "Folder data")
  config.text.tokenizer = "byte"
  config.text.max_len = 128
  config.image.tokenizer = "patch"
  config.image.size = 512
  config.image.patch = 16
  config.image.codebook_size = 16_384
  config.model.d_model = 1024
  config.model.num_layers = 16
  config.model.num_heads = 16
  config.model.head_dim = 64
  config.model.mlp_dim = 3072
  config.model.max_len = 1152
  config.model.dtype = "bfloat16"
  config.model.attention = "auto"         # cuDNN flash attention on GPU (models/attention.py)
  config.train.batch_size = 32
  config.eval.batch_size = 32
  return config
