"""LLaDA-8B (``GSAI-ML/LLaDA-8B-Base`` or ``-Instruct``) as a configuration of unimm_jax's transformer: import it,
fine-tune it (fully or with LoRA) on a TPU slice, sample from it, export it back.

Download the weights on your own machine (unimm_jax never downloads anything), then::

    huggingface-cli download GSAI-ML/LLaDA-8B-Instruct --local-dir ~/llada-8b-instruct
    python -m unimm_jax.convert import --format=llada --src=~/llada-8b-instruct --out=gs://B/llada8b \\
        --config=configs/llada_8b.py
    python -m unimm_jax.main --config=configs/llada_8b.py --workdir=gs://B/ft \\
        --config.init.from=gs://B/llada8b [--config.model.lora_rank=16]
    python -m unimm_jax.convert export --format=llada --workdir=gs://B/ft --out=~/llada-8b-ft

Architecture (upstream ``config.json``, checked field by field at import: ``unimm_jax/convert/llada.py``):
d_model 4096, 32 layers, 32 heads of 128 (no grouped-query attention), SwiGLU MLP 12,288, RMSNorm eps 1e-5, no
biases, no qk-norm, rotary over the whole flat sequence with base 500,000 (``model.rope_layout='sequence'``), no
embedding scale and no modality embedding, separate input embedding and output head, a vocabulary of 126,464 ids
whose MASK is 126,336 (``sequence.mask_id``), raw logits over the whole vocabulary (``model.restrict_output``
False): 8,015,581,184 parameters. Sequences: one text segment of 1,024 tokens here (the upstream trained on up
to 4,096: raise ``text.max_len`` and ``model.max_len`` together, and the segment with them).

Sizing (``python -m unimm_jax.main --config=configs/llada_8b.py --dry_run --dry_run_devices=N``; BENCHMARKS.md,
"LLaDA-8B sized"): full fine-tuning holds float32 parameters, two AdamW moments and the EMA, 16 bytes a
parameter = 128 GB of state, split by FSDP over the chips; LoRA holds the bfloat16 base (16 GB, split) and
only the adapters' state. Figures per chip are in BENCHMARKS.md and the README ("Start from LLaDA-8B").
"""

from unimm_jax.configuration import base_config

SEQ_LEN = 1024


def get_config():
  config = base_config()
  config.data.source = "folder"
  config.data.path = "gs://YOUR_BUCKET/text_data"
  config.text.tokenizer = "hf"
  config.text.hf_path = ""              # set by the import: the bundle carries the upstream tokenizer
  config.text.max_len = SEQ_LEN
  config.text.vocab_size = 126_464      # the upstream's embedding rows (its tokenizer has fewer ids)
  config.image.tokenizer = "none"       # a text-only backbone: no image ids, no image segment
  config.sequence.segments = (("text", "text", SEQ_LEN),)
  config.sequence.id_align = 1
  config.sequence.mask_id = 126_336
  config.model.d_model = 4096
  config.model.num_layers = 32
  config.model.num_heads = 32
  config.model.head_dim = 128
  config.model.mlp_dim = 12_288
  config.model.max_len = SEQ_LEN
  config.model.positions = "rope"
  config.model.rope_layout = "sequence"
  config.model.rope_theta = 500_000.0
  config.model.rope_fraction = 1.0
  config.model.norm_eps = 1e-5
  config.model.embedding_scale = 1.0
  config.model.modality_embedding = False
  config.model.restrict_output = False
  config.model.qk_norm = False
  config.model.cross_modal_rope = True
  config.model.directional_heads = 0
  config.model.vocab_multiple = 128     # 126,464 = 988 x 128: no padding
  config.model.dtype = "bfloat16"
  config.model.scan_layers = True
  config.model.remat = "minimal"
  config.diffusion.tasks = {"text": 1.0}
  config.diffusion.task_roles = {"text": "text:noised"}
  config.diffusion.loss_weighting = "elbo"
  config.diffusion.schedule = "linear"   # LLaDA's: a token is masked with probability t
  # The upstream's decoding (its generate.py defaults): blocks of 32, 32 steps a block, low-confidence remasking
  # (argmax, no noise, N // K reveals a step); Pipeline.infill and the sample CLI read these.
  config.sample.block_length = 32
  config.sample.i2t_steps = 32
  config.sample.reveal_schedule = "uniform"
  config.sample.temperature = 0.0
  config.sample.confidence_noise = 0.0
  config.mesh.topology = "v5p:4x4x4"     # python -m unimm_jax.aot compiles for it
  config.mesh.shape = (1, -1, 1)         # FSDP over every chip
  config.train.batch_size = 64
  config.train.steps = 10_000
  config.train.log_every = 10
  config.optim.learning_rate = 2.5e-5
  config.optim.warmup_steps = 100
  config.optim.weight_decay = 0.1
  config.ckpt.every_steps = 500
  config.eval.every_steps = 500
  config.eval.batch_size = 64
  return config
