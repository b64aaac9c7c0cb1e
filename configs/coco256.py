"""COCO captions at 256x256: an FSQ tokenizer (256x256 -> 16x16 tokens) and a 1.4B unified model on its tokens,
sentencepiece captions; sized for a Cloud TPU v5e-32 slice (32 chips of 16 GiB HBM). README: "COCO captions on
a TPU" gives every step (building the TFDS dataset into a bucket needs TensorFlow; nothing after that does).

One config serves the three stages, with the data source switched on the command line::

    # 1. the image tokenizer, from the TFDS images (data parallel over the 32 chips)
    python -m unimm_jax.tokenizer_main --config=configs/coco256.py --workdir=gs://BUCKET/runs/coco256_tok --distributed
    # 2. pre-tokenize the captioned images once (on a CPU VM; parallel and resumable)
    python -m unimm_jax.pretokenize --config=configs/coco256.py --out=gs://BUCKET/coco256_tokens
    # 3. the unified model, reading tokens only
    python -m unimm_jax.main --config=configs/coco256.py --workdir=gs://BUCKET/runs/coco256 --distributed \\
        --config.data.source=pretokenized --config.data.path=gs://BUCKET/coco256_tokens

Check the sizes without a TPU::

    python -m unimm_jax.main --config=configs/coco256.py --workdir=/tmp/coco --dry_run --dry_run_devices=32

Tokenizer: widths (128, 128, 256, 256, 512), 4 halvings (16x16 pixels per token), 2 residual blocks per
resolution, FSQ levels (8, 8, 8, 6, 5) = 15,360 codes (the FSQ paper's choice for about 2^14); 36.9M parameters,
replicated, the batch split over the chips. Unified model: d_model 2048, 24 layers, 16 heads of 128, MLP 5632 (as
configs/large_v5e32.py; 1,428,461,568 parameters with this vocabulary), sequences of 64 sentencepiece tokens
(32,000 pieces) + 256 image tokens, splash attention on the TPU, ``minimal`` remat (matmul outputs, never scores).

Memory per chip, from the TPU executable compiled on a CPU host (``python -m unimm_jax.aot
--config=configs/coco256.py``, for ``mesh.topology`` v5e:4x8; libtpu 0.0.42.1, 2026-12-02; BENCHMARKS.md, "Compiled
for the chips"): train step 4.26 GiB of 16 GiB HBM (27 %): arguments 0.67 GiB (the train state's shard, aliased by
the outputs), temporaries 3.55 GiB (activations of 8 sequences of 320 tokens), code 0.04 GiB; the sampling loop
1.35 GiB. Compile time of the train step: 78 s on a 2-core CPU host.
"""

from unimm_jax.configuration import base_config


def get_config():
  config = base_config()
  # Data: TFDS coco_captions built in the array_record format into a bucket (README); captions: the first of each
  # image's five.
  config.data.source = "tfds"
  config.data.tfds_name = "coco_captions"
  config.data.tfds_data_dir = "gs://YOUR_BUCKET/tensorflow_datasets"
  config.data.tfds_train_split = "train"
  config.data.tfds_val_split = "val"
  config.data.image_key = "image"
  config.data.text_key = "captions/text"
  config.data.fit_examples = 100_000     # captions that train the sentencepiece model at the first run
  config.data.num_threads = 16

  config.text.tokenizer = "sentencepiece"
  config.text.vocab_size = 32_000
  config.text.sentencepiece_type = "unigram"
  config.text.max_len = 64

  config.image.tokenizer = "fsq"
  config.image.tokenizer_path = "gs://YOUR_BUCKET/runs/coco256_tok"
  config.image.size = 256
  config.image.channels = 3

  config.tokenizer.widths = (128, 128, 256, 256, 512)
  config.tokenizer.res_blocks = 2
  config.tokenizer.fsq_levels = (8, 8, 8, 6, 5)
  config.tokenizer.steps = 100_000
  config.tokenizer.batch_size = 256      # 8 images per chip
  config.tokenizer.learning_rate = 2e-4
  config.tokenizer.warmup_steps = 2_000
  config.tokenizer.log_every = 100
  config.tokenizer.eval_every = 5_000
  config.tokenizer.encode_batch = 256

  config.model.d_model = 2048
  config.model.num_layers = 24
  config.model.num_heads = 16
  config.model.head_dim = 128
  config.model.mlp_dim = 5632
  config.model.max_len = 320
  config.model.dtype = "bfloat16"
  config.model.scan_layers = True
  config.model.remat = "minimal"          # every named matmul output saved, never attention scores (transformer.py)
  config.mesh.topology = "v5e:4x8"       # python -m unimm_jax.aot compiles for it (README, "Will it fit?")
  config.mesh.shape = (1, -1, 1)         # FSDP over the slice (unified model); the tokenizer's batch splits the same way

  config.train.batch_size = 256
  config.train.steps = 200_000
  config.train.log_every = 100
  config.optim.learning_rate = 3e-4
  config.optim.warmup_steps = 2_000
  config.ckpt.every_steps = 2_000
  config.eval.every_steps = 2_000
  config.eval.batch_size = 256
  return config
