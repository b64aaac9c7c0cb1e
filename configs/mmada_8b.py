"""MMaDA-8B (``Gen-Verse/MMaDA-8B-Base`` / ``-MixCoT``) in unimm_jax: a LLaDA-8B backbone over text ids and the
8,192 MAGVIT-v2 codes, with MMaDA's own sequence formats (``unimm_jax/convert/mmada.py``). Import it, draw,
caption and answer with MMaDA's decoding (``sample.preset='mmada'``), fine-tune it (full or LoRA), export it back.

Download on your own machine (unimm_jax never downloads anything), convert the MAGVIT-v2 weights to safetensors
(README, "Run MMaDA-8B"), then::

    python -m unimm_jax.convert import --format=mmada --src=~/mmada-8b --image_tokenizer=~/magvitv2 \\
        --out=gs://B/mmada8b --config=configs/mmada_8b.py
    python -m unimm_jax.sample --workdir=gs://B/mmada8b --task=t2i --prompt="a red bus in the snow"
    python -m unimm_jax.main --config=configs/mmada_8b.py --workdir=gs://B/ft --config.init.from=gs://B/mmada8b \\
        --config.data.path=gs://B/my_pairs [--config.model.lora_rank=16]
    python -m unimm_jax.convert export --format=mmada --workdir=gs://B/ft --out=~/mmada-8b-ft

The network is LLaDA-8B's (``configs/llada_8b.py``: 32 layers of 4096, 32 heads of 128, SwiGLU 12,288, RMSNorm
1e-5, rotary base 500,000 over the flat sequence) with 134,656 embedding and output rows: 8,082,690,048
parameters. Vocabulary: text ids 0..126,348 (LLaDA's tokenizer, MASK 126,336, the task tokens at its reserved ids
126,084..126,094), image code c at 126,349 + c, the last 115 rows unused. Images 512 x 512 -> 32 x 32 codes.
Formats (views of the one network, ``Pipeline.view``): ``t2i`` = [iPAD].. <|t2i|> BOS prompt EOS (129 tokens,
left-padded) <|soi|> 1,024 codes <|eoi|> (1,155 tokens; the default layout, which fine-tuning trains);
``mmu`` = <|mmu|> <|soi|> codes <|eoi|> chat-templated question (64, left-padded) answer (128) (1,219 tokens).

Sizing (``python -m unimm_jax.main --config=configs/mmada_8b.py --dry_run --dry_run_devices=N``): BENCHMARKS.md,
"MMaDA-8B sized"; the README gives the per-chip figures.
"""

from unimm_jax.configuration import base_config
from unimm_jax.convert import mmada

MAX_TEXT_LEN, QUESTION_LEN, ANSWER_LEN = 128, 64, 128


def get_config():
  config = mmada.apply_unified(base_config(), mmada.MMADA_8B, text_vocab=126_349, task_ids=mmada.RESERVED_IDS,
                               downsample=16, max_text_len=MAX_TEXT_LEN, question_len=QUESTION_LEN,
                               answer_len=ANSWER_LEN)
  config.text.hf_path = ""              # the import's bundle carries the upstream tokenizer
  config.image.tokenizer_path = ""      # ... and the MAGVIT-v2 (the import's --image_tokenizer)
  config.data.source = "folder"
  config.data.path = "gs://YOUR_BUCKET/pairs"     # train.jsonl / val.jsonl: {"image": ..., "text": ...}
  config.data.fields = (("prompt", "text"),)
  config.model.dtype = "bfloat16"
  config.model.scan_layers = True
  config.model.remat = "minimal"
  config.model.vocab_multiple = 128     # 134,656 = 1,052 x 128: no padding
  config.mesh.topology = "v5p:4x4x4"
  config.mesh.shape = (1, -1, 1)         # FSDP over every chip
  config.train.batch_size = 64
  config.train.steps = 5_000
  config.train.log_every = 10
  config.optim.learning_rate = 5e-5      # MMaDA's fine-tuning rate (configs/mmada_demo.yaml)
  config.optim.warmup_steps = 100
  config.optim.weight_decay = 0.01
  config.ckpt.every_steps = 500
  config.eval.every_steps = 500
  config.eval.batch_size = 64
  return config
