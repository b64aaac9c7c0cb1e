"""Lumina-DiMOO-8B (``Alpha-VLLM/Lumina-DiMOO``) in unimm_jax: a LLaDA-8B backbone over text ids, its added special
tokens and the 8,192 codes of its aMUSEd VQ-GAN, with its own sequence formats (``unimm_jax/convert/lumina_dimoo.py``):
the end-of-line token after every image row is inserted inside the network (``model.image_row_end_id``).

Download on your own machine (unimm_jax never downloads anything), then::

    python -m unimm_jax.convert import --format=lumina_dimoo --src=~/lumina-dimoo --out=gs://B/dimoo \\
        --config=configs/lumina_dimoo_8b.py                      # the VQ-GAN is read from ~/lumina-dimoo/vqvae
    python -m unimm_jax.sample --workdir=gs://B/dimoo --task=t2i --prompt="a red bus in the snow" --out=samples/
    python -m unimm_jax.main --config=configs/lumina_dimoo_8b.py --workdir=gs://B/ft \\
        --config.init.from=gs://B/dimoo --config.data.path=gs://B/pairs [--config.model.lora_rank=16]
    python -m unimm_jax.convert export --format=lumina_dimoo --workdir=gs://B/ft --out=~/lumina-dimoo-ft

Vocabulary (assumed from its code: ``vocab_size`` 134,548 = 126,356 + 8,192, the sampler reading the code offset
as ``V - 8192``): text and special ids 0..126,355 (MASK 126,336, <end-of-line> 126,084, <IMAGE> 126,349, <answer>
126,354), image code k at 126,356 + k. Images 512 x 512 here -> 32 x 32 codes (Lumina-DiMOO draws up to 1,024 px:
raise ``image.size``; the sequence, with a row end per row, grows to 4,160 tokens at 1,024).
Formats (``Pipeline.view``): ``t2i`` = system prompt and caption (128 tokens, left-padded with a token the network
treats as not there) <answer> <IMAGE> 32 x (32 codes <end-of-line>) </IMAGE> </answer> (1,188 tokens as the
network sees them); ``mmu`` = system prompt and question (96) <IMAGE> grid </IMAGE> </user> <answer> answer (128)
</answer>.

Sizing: ``python -m unimm_jax.main --config=configs/lumina_dimoo_8b.py --dry_run --dry_run_devices=N``
(BENCHMARKS.md, "Lumina-DiMOO-8B sized").
"""

from unimm_jax.configuration import base_config
from unimm_jax.convert import lumina_dimoo

SPECIAL_IDS = {"<end-of-line>": 126_084, "<IMAGE>": 126_349, "</IMAGE>": 126_350, "<answer>": 126_354,
               "</answer>": 126_355, "</user>": 126_353, "<|pad|>": 126_339}   # the import takes the tokenizer's


def get_config():
  config = lumina_dimoo.apply_unified(base_config(), lumina_dimoo.LUMINA_DIMOO_8B, codebook_size=8192,
                                      task_ids=SPECIAL_IDS, downsample=16, image_size=512, max_text_len=128,
                                      question_len=96, answer_len=128)
  config.text.hf_path = ""
  config.image.tokenizer_path = ""      # the import's bundle carries the VQ-GAN
  config.data.source = "folder"
  config.data.path = "gs://YOUR_BUCKET/pairs"
  config.data.fields = (("prompt", "text"),)
  config.model.dtype = "bfloat16"
  config.model.scan_layers = True
  config.model.remat = "minimal"
  config.model.vocab_multiple = 4        # 134,548 = 4 x 33,637: the rows as the checkpoint has them
  config.mesh.topology = "v5p:4x4x4"
  config.mesh.shape = (1, -1, 1)
  config.train.batch_size = 64
  config.train.steps = 5_000
  config.train.log_every = 10
  config.optim.learning_rate = 2e-5
  config.optim.warmup_steps = 100
  config.optim.weight_decay = 0.01
  config.ckpt.every_steps = 500
  config.eval.every_steps = 500
  config.eval.batch_size = 64
  return config
