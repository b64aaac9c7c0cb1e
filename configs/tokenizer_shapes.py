"""An FSQ image tokenizer for the embedded ``shapes`` data: 24x24 RGB -> 6x6 tokens of 1,000 codes, on a CPU.

Run::

    python -m unimm_jax.tokenizer_main --config=configs/tokenizer_shapes.py --workdir=runs/tok_shapes

then train the unified model on its tokens (pre-tokenized, so no image is encoded while training)::

    python -m unimm_jax.pretokenize --config=configs/tokenizer_shapes.py --out=runs/shapes_fsq_tokens
    python -m unimm_jax.main --config=configs/shapes.py --workdir=runs/shapes_fsq \\
        --config.image.tokenizer=fsq --config.data.source=pretokenized --config.data.path=runs/shapes_fsq_tokens

The tokenizer: widths (16, 32, 64), two halvings (4x4 pixels per token), FSQ levels (8, 5, 5, 5).
Measured (BENCHMARKS.md, "Learned image tokenizer"; 2-core AMD EPYC shared with other work, 2026-11-24): the
command takes 4 min 15 s and ends at val PSNR 35.80 dB (30.1 dB at step 500), 401 of the 1,000 codes used, code
perplexity 106.3.
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
