"""A 1.3B-parameter unified model for 256x256 images and long captions, sized for a Cloud TPU v5e-32 slice.

Sizes: d_model 2048, 24 layers, 16 heads of 128, gated MLP 5632: 1,303,025,664 parameters, embeddings and head
included (id ranges aligned to 128: ``sequence.id_align``). Captions of up to 256 byte tokens; 256x256 RGB images as 16x16 = 256 tokens of a 16,384-code
vocabulary (16x16-pixel patches; the learned tokenizer of the real-images issue gives the same grid), so a
sequence is 512 tokens. Global batch 256.

Sharding: full FSDP over the 32 chips (mesh (1, 32, 1)): every parameter, AdamW moment and EMA array is split
along its ``embed`` dimension, layers are scanned (compile time flat in depth) and rematerialised with the named
policy ``minimal`` (every matmul output of a block kept, never attention scores); attention is splash (Pallas) on
the TPU (``model.attention=auto``). Check it without a TPU::

    python -m unimm_jax.aot --config=configs/large_v5e32.py          # compiles for mesh.topology, v5e:4x8

Memory per chip, from the TPU executable compiled on a CPU host (``unimm_jax.aot``, libtpu 0.0.42.1, 2026-12-02;
BENCHMARKS.md, "Compiled for the chips"): train step 6.08 GiB of a v5e chip's 16 GiB HBM (38 %): arguments
0.61 GiB (the train state's shard: float32 parameters, AdamW moments, EMA), of which the outputs alias all,
temporaries 5.43 GiB (activations of 8 sequences of 512 tokens, gradients, XLA's scratch), code 0.03 GiB. The
sampling loop (text->image, batch 256): 0.85 GiB. Compile time of the train step: 157 s on a 2-core CPU host.
Data: a ``folder`` (or, with the real-images issue, pre-tokenized) source at ``data.path``.
"""

from unimm_jax.configuration import base_config


def get_config():
  config = base_config()
  config.data.source = "folder"
  config.data.path = "gs://YOUR_BUCKET/coco256"   # train.jsonl / val.jsonl + images (README, "Folder data")
  config.text.tokenizer = "byte"
  config.text.max_len = 256
  config.image.tokenizer = "patch"
  config.image.size = 256
  config.image.patch = 16
  config.image.codebook_size = 16_384
  config.model.d_model = 2048
  config.model.num_layers = 24
  config.model.num_heads = 16
  config.model.head_dim = 128
  config.model.mlp_dim = 5632
  config.model.max_len = 512
  config.model.dtype = "bfloat16"
  config.model.scan_layers = True
  config.model.remat = "minimal"          # every named matmul output saved, never attention scores (transformer.py)
  config.mesh.topology = "v5e:4x8"       # python -m unimm_jax.aot compiles for it (README, "Will it fit?")
  config.mesh.shape = (1, -1, 1)
  config.train.batch_size = 256
  config.train.steps = 200_000
  config.train.log_every = 100
  config.optim.learning_rate = 3e-4
  config.optim.warmup_steps = 2_000
  config.ckpt.every_steps = 2_000
  config.eval.every_steps = 2_000
  config.eval.batch_size = 256
  return config
