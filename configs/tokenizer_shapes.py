"""An FSQ image tokenizer for the embedded ``shapes`` data: 24x24 RGB -> 6x6 tokens of 1,000 codes, on a CPU.

Run::

    python -m unimm_jax.tokenizer_main --config=configs/tokenizer_shapes.py --workdir=runs/tok_shapes

then train the unified model on its tokens (pre-tokenized, so no image is encoded while training)::

    python -m unimm_jax.pretokenize --config=configs/tokenizer_shapes.py --out=runs/shapes_fsq_tokens
    python -m unimm_jax.main --config=configs/shapes.py --workdir=runs/shapes_fsq \\
        --config.image.tokenizer=fsq --config.data.source=pretokenized --config.data.path=runs/shapes_fsq_tokens

The tokenizer: the patch encoder (``tokenizer.encoder='patch'``: a token's code from its own 4x4 pixels only), a
convolutional decoder of widths (64, 32, 16), FSQ levels (8, 5, 5, 5). Measured (BENCHMARKS.md, "Learned image
tokenizer"; 2-core AMD EPYC, 2026-11-24): the command takes about 67 s and ends at val PSNR 35.64 dB, 102 of the
1,000 codes used, code perplexity 3.4. The convolutional encoder reached 35.80 dB with 401 codes (perplexity 106),
but its codes depend on a patch's surroundings, and the unified model then found 1.2-1.6 bits per image token left
given the caption against 0.02 with the patch encoder (0.0009 once the code features show each code's look).
"""

from unimm_jax.configuration import base_config


def get_config():
  config = base_config()
  config.data.source = "shapes"
  config.data.train_size = 100_000
  config.data.val_size = 512
  config.image.tokenizer = "fsq"
  config.image.tokenizer_path = "runs/tok_shapes"   # where pretokenize and the unified model find it
  config.image.size = 24
  config.tokenizer.widths = (16, 32, 64)
  config.tokenizer.encoder = "patch"
  config.tokenizer.res_blocks = 1
  config.tokenizer.fsq_levels = (8, 5, 5, 5)
  config.tokenizer.steps = 1_200
  config.tokenizer.batch_size = 64
  config.tokenizer.learning_rate = 3e-3
  config.tokenizer.warmup_steps = 100
  config.tokenizer.log_every = 100
  config.tokenizer.eval_every = 500
  # One CPU device (XLA's multi-threaded Eigen), not mesh.cpu_devices=2: a 2-device run of this config aborted in
  # an XLA CPU all-reduce rendezvous timeout (40 s) on a heavily shared 2-core machine (BENCHMARKS.md).
  config.mesh.cpu_devices = 0
  config.eval.batch_size = 128
  return config
