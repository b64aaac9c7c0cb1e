"""The config schema: one record per field (name, type, default, meaning, allowed values, role in the train state).

:func:`unimm_jax.configuration.base_config` is built from :data:`FIELDS`, :func:`~unimm_jax.configuration.validate`
reads each record's choices and bounds, ``check_resumable`` its ``state`` flag and ``from_dict`` its ``legacy``
value; the checks that relate several fields are code in ``configuration.py``. To add a field, add one record
here. No JAX (and nothing else of unimm_jax) is imported, so configs load before JAX starts.

An *open* group (``open=True``) is a field whose value is a group of any names, each holding a value of the
record's type: ``diffusion.tasks`` (task name -> weight) and ``diffusion.task_roles``. Its default is a dict.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Field:
  """``config.<name>``: what it holds and which values it takes."""

  name: str                   # dotted: "model.d_model"
  type: type                  # bool | int | float | str | tuple; an open group: the type of each of its values
  default: Any                # an open group: a dict, name -> value
  doc: str
  choices: tuple | None = None  # the value must be one of these
  bounds: str | None = None   # ">0", ">=0", or an interval such as "[2, 256]", "[0, 1)", "(0, 0.5)"
  state: bool = False         # fixes the train state's shapes/structure: checkpoints restore only into the same value
  legacy: Any = None          # for a config saved before the field existed: the value that means "as before"
  open: bool = False          # a group of any names (see the module docstring)


_TASKS_DOC = ("per-example task mixture, task name -> weight (normalised); any name, its roles built in or in "
              "diffusion.task_roles. joint: both modalities noised, each at its own t; text_to_image: text clean, "
              "image noised; image_to_text: image clean, text noised; image_only: text fully masked (null "
              "condition), image noised; text_only: image fully masked (null condition), text noised")
_MESH_RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
               ("vocab", "tensor"), ("kv", None), ("length", None), ("layers", None))

# What model.lora_targets may name (models/lora.py): projections of layers.Attention and layers.GatedMLP.
LORA_TARGETS = ("qkv", "query", "key", "value", "out", "wi_0", "wi_1", "wo")

F = Field
FIELDS: tuple[Field, ...] = (
    F("seed", int, 0, "model: initialisation, masking noise, data order", bounds=">=0"),

    F("data.source", str, "shapes", "where examples come from", choices=("shapes", "folder", "tfds", "pretokenized")),
    F("data.path", str, "", "folder: DIR with train.jsonl / val.jsonl; pretokenized: the pretokenize --out DIR"),
    F("data.seed", int, 0, "shapes: which examples the splits hold; fixed, so every run is scored on one val set",
      bounds=">=0"),
    F("data.train_size", int, 100_000, "shapes: examples in the train split (procedural, so size is free)",
      bounds=">0"),
    F("data.val_size", int, 512, "shapes: examples in the val split", bounds=">0"),
    F("data.shapes_kinds", tuple, (("caption", 1.0),), "shapes: kinds of example and their shares, "
      "(kind, weight) pairs of caption | edit | vqa (data/shapes_tasks.py); caption only is the original data"),
    F("data.kind_rows", tuple, (), "shapes: (kind, rows) pairs; every block of sum(rows) consecutive rows of a "
      "training batch holds that many examples of each kind, in this order (each kind shuffled on its own), and the "
      "train step computes each kind on its own segments only (needs model.mask_absent); () draws each example's kind "
      "from data.shapes_kinds"),
    F("data.fit_examples", int, 5_000, "training examples used to fit the tokenizers at the first run", bounds=">0"),
    F("data.num_threads", int, 1, "grain prefetch threads; 0 reads in the main thread", bounds=">=0"),
    # tfds: any TFDS image dataset with captions or class labels, read through tfds.data_source (no TensorFlow)
    F("data.tfds_name", str, "", "tfds: the dataset, e.g. 'coco_captions', 'imagenet2012', 'my_dataset:1.0.0'"),
    F("data.tfds_data_dir", str, "", "tfds: where it was built (gs:// works); '' = TFDS's default "
      "(~/tensorflow_datasets)"),
    F("data.tfds_train_split", str, "train", "tfds: the split trained on"),
    F("data.tfds_val_split", str, "validation", "tfds: the split evaluated on"),
    F("data.image_key", str, "image", "feature holding the image; nested features with '/' ('image/encoded')"),
    F("data.text_key", str, "", "feature holding the caption (a string, or a sequence: its first) ..."),
    F("data.label_key", str, "", "... or a ClassLabel, whose name goes into a template (exactly one of the two)"),
    F("data.caption_templates", tuple, ("a photo of a {}.",), "label captions; example i uses template i mod len"),
    F("data.fields", tuple, (), "(segment, source key, ...) entries: where a segment's value comes from, the first "
      "key an example has (none: the segment is absent); default its name"),

    F("sequence.segments", tuple, (), "named segments of a sequence, e.g. (('caption', 'text', 24), ('image', "
      "'image')); () = today's [text | image]. Specs: (name, 'text'[, length]) (length default text.max_len), "
      "(name, 'image') (the image tokenizer's grid), (name, 'special', token, ...) (fixed tokens, always given)",
      state=True),
    F("sequence.specials", tuple, (), "names of special tokens segments may hold, beyond those special segments "
      "hold, e.g. ('<t2i>',)", state=True),
    F("sequence.id_align", int, 128, "the image and special id ranges start at multiples of this, so each "
      "modality's head columns start on a 128-lane boundary (1 = packed ranges)", bounds=">0", state=True,
      legacy=1),   # before: packed ranges [text | image | specials | MASK]
    F("sequence.mask_id", int, -1, "-1: MASK is the id after the last range; >= 0: MASK is this text id (an "
      "imported vocabulary's own, e.g. LLaDA's 126336), and the vocabulary has no extra row", bounds="[-1, 1e12)",
      state=True),

    F("sequence.special_ids", int, {}, "special tokens that are an upstream vocabulary's own text ids, name -> id "
      "(MMaDA's '<|soi|>': 126084); they take no id of the special range", open=True, state=True),
    F("sequence.vocab_rows", int, 0, "0, or the embedding's ids when an upstream has more than its ranges use "
      "(ids past the ranges are never used)", bounds=">=0", state=True),
    F("sequence.text_frames", tuple, {}, "segment -> (template, pad side, pad token[, 'trim']): an upstream's "
      "format of a text segment (data/frames.py), e.g. ('<|t2i|><|startoftext|>{text}<|endoftext|>', 'left', "
      "'[iPAD]'); in the template, names of sequence.special_ids become their ids, the rest is tokenized", open=True),
    F("sequence.views", tuple, {}, "other layouts of the same network, name -> segment specs as sequence.segments "
      "(an imported checkpoint's per-task formats: Pipeline.view)", open=True),

    F("text.tokenizer", str, "word", "text tokenizer kind (hf: a Hugging Face tokenizer.json, text.hf_path)",
      choices=("word", "byte", "sentencepiece", "hf"), state=True),
    F("text.max_len", int, 24, "text positions per sequence; captions are truncated / PAD-padded", bounds=">0",
      state=True),
    F("text.max_vocab", int, 0, "word: keep the most frequent N words (0 = all)", bounds=">=0"),
    F("text.vocab_size", int, 8_000, "sentencepiece: pieces to train (an upper bound: small corpora get fewer); "
      "hf: rows of the text vocabulary when more than the tokenizer's ids (the upstream's embedding size)",
      bounds=">0"),
    F("text.sentencepiece_type", str, "unigram", "sentencepiece: the model type", choices=("unigram", "bpe")),
    F("text.sentencepiece_model", str, "", "sentencepiece: a trained .model file to use instead of training one"),
    F("text.hf_path", str, "", "hf: a Hugging Face model directory (tokenizer.json, tokenizer_config.json) or a "
      "tokenizer.json file; read with the tokenizers package"),

    F("image.tokenizer", str, "patch", "image tokenizer kind (learned fsq | vq: config.tokenizer, tokenizer_main)",
      choices=("pixel", "patch", "fsq", "vq", "none", "magvitv2", "vqgan"), state=True),
    F("image.tokenizer_path", str, "", "fsq | vq: the tokenizer_main workdir (or any directory with "
      "image_tokenizer.json); magvitv2 | vqgan: the upstream's directory (safetensors + config.json)"),
    F("image.size", int, 24, "side of the (square) images in pixels", bounds=">0", state=True),
    F("image.channels", int, 3, "1 (grey) or 3 (RGB)", bounds=">0", state=True),
    F("image.levels", int, 4, "quantization levels per channel", bounds="[2, 256]"),
    F("image.patch", int, 4, "patch: side of a patch in pixels", bounds=">0", state=True),
    F("image.codebook_size", int, 1024, "patch: keep at most this many distinct training patches; magvitv2 | "
      "vqgan: the pretrained codebook's size (checked against the checkpoint)", bounds=">0"),

    # The learned image tokenizer (image.tokenizer fsq | vq): network, quantizer and its own training run.
    F("tokenizer.widths", tuple, (16, 32, 64), "channels per resolution; len - 1 halvings: 24 px -> 6x6 tokens"),
    F("tokenizer.res_blocks", int, 1, "residual blocks per resolution", bounds=">0"),
    F("tokenizer.encoder", str, "conv", "conv | patch: a token's code from its own pixels only "
      "(models/autoencoder.py; checked against tokenizers.TOKENIZER_ENCODERS)"),
    F("tokenizer.fsq_levels", tuple, (8, 5, 5, 5), "fsq: levels per latent channel; codebook = product (1,000)"),
    F("tokenizer.vq_codebook_size", int, 1024, "vq: codes", bounds=">0"),
    F("tokenizer.vq_dim", int, 8, "vq: dimension of a code", bounds=">0"),
    F("tokenizer.vq_decay", float, 0.99, "vq: EMA decay of the codebook statistics", bounds="[0, 1)"),
    F("tokenizer.vq_commitment", float, 0.25, "vq: beta of the commitment loss", bounds=">=0"),
    F("tokenizer.vq_dead_threshold", float, 0.1, "vq: restart a code whose EMA count (uses per batch) falls below "
      "this", bounds=">=0"),
    F("tokenizer.steps", int, 1_200, "training steps of the tokenizer", bounds=">0"),
    F("tokenizer.batch_size", int, 64, "images per tokenizer training step", bounds=">0"),
    F("tokenizer.learning_rate", float, 3e-3, "peak learning rate of the tokenizer", bounds=">0"),
    F("tokenizer.warmup_steps", int, 100, "linear warmup of the tokenizer's learning rate", bounds=">=0"),
    F("tokenizer.weight_decay", float, 0.0, "AdamW weight decay of the tokenizer", bounds=">=0"),
    F("tokenizer.grad_clip", float, 1.0, "global gradient norm clip of the tokenizer (0 = none)", bounds=">=0"),
    F("tokenizer.log_every", int, 100, "steps between the tokenizer's train log lines", bounds=">0"),
    F("tokenizer.eval_every", int, 500, "validation (PSNR, code usage, perplexity) and checkpoint interval",
      bounds=">0"),
    F("tokenizer.report_images", int, 16, "val reconstructions shown in the tokenizer's report.html", bounds=">=0"),
    F("tokenizer.encode_batch", int, 64, "images per compiled encode/decode call when the tokenizer is used as one",
      bounds=">0"),

    F("model.d_model", int, 128, "width of the residual stream", bounds=">0", state=True),
    F("model.num_layers", int, 4, "transformer blocks", bounds=">0", state=True),
    F("model.num_heads", int, 4, "attention heads per block", bounds=">0", state=True),
    F("model.head_dim", int, 32, "dimension of each head's queries, keys and values", bounds=">0", state=True),
    F("model.mlp_dim", int, 384, "hidden width of the gated MLP", bounds=">0", state=True),
    F("model.max_len", int, 64, "must hold text.max_len + image tokens", bounds=">0"),
    F("model.positions", str, "rope+learned", "rope (1-D text, 2-D image) | learned (absolute) | rope+learned",
      choices=("rope", "learned", "rope+learned"), state=True),
    F("model.rope_theta", float, 10_000.0, "base of the rotary frequencies", bounds=">0"),
    F("model.rope_layout", str, "segment", "segment: rotary positions 1-D within a text segment, 2-D (row, col) "
      "within an image grid; sequence: 1-D over the whole flat sequence with the standard frequencies "
      "theta^(-2j/r), pairs (j, j + r/2) (LLaDA's)", choices=("segment", "sequence")),
    F("model.norm_eps", float, 1e-6, "epsilon of every RMS norm (LLaDA: 1e-5)", bounds=">0"),
    F("model.embedding_scale", float, 0.5773502691896258, "the input embeddings are multiplied by this (1/sqrt(3) "
      "by default; imported backbones: 1.0)", bounds=">0"),
    F("model.modality_embedding", bool, True, "add a learned vector per modality to the input (imported "
      "text backbones have none)", state=True),
    F("model.restrict_output", bool, True, "set the logits of ids outside a position's modality (and of MASK) to "
      "-1e9; False returns the head's raw logits over the whole vocabulary (an imported text-only model)"),
    F("model.pad_key_id", int, -1, "-1, or a token id that means 'not there': never attended and taking no rotary "
      "position (needs rope_layout=sequence), so a padded sequence equals the unpadded one (MMaDA's [iPAD] "
      "left-padding of its prompts)", bounds="[-1, 1e12)"),
    F("model.image_row_end_id", int, -1, "-1, or a token id the network sees after every image row (Lumina-DiMOO's "
      "<end-of-line>): inserted inside the network, so the layout, the data and the sampler keep plain grids (needs "
      "rope_layout=sequence, no modality embedding, no learned positions)", bounds="[-1, 1e12)"),
    F("model.isolate_given", bool, False, "given positions (the segments that are clean or null, not generated) "
      "attend only given positions, in training and sampling (LaViDa's prefix mask): their keys and values then do "
      "not depend on what is generated, so sample.cache='exact' computes them once per sample (XLA attention only)",
      state=True),
    F("model.mask_absent", bool, False, "no query attends an <absent> position (a segment the example does not "
      "have): each example is computed as the layout of its own segments alone, which lets data.kind_rows train each "
      "kind on that shorter layout; False: absent positions are seen as ordinary given tokens"),
    F("model.rope_fraction", float, 0.5, "share of each head's dimensions that rotate; the rest match by content "
      "(BENCHMARKS)", bounds="[0, 1]"),
    F("model.dtype", str, "float32", "compute dtype; bfloat16 keeps float32 master weights",
      choices=("float32", "bfloat16")),
    F("model.param_dtype", str, "float32", "dtype of the stored parameters", choices=("float32", "bfloat16"),
      state=True),
    F("model.attention", str, "auto", "attention kernel: auto (splash on TPU, cudnn on GPU, xla on CPU) | xla | "
      "splash (Pallas, TPU) | cudnn (GPU, bfloat16); models/attention.py", choices=("auto", "xla", "splash", "cudnn")),
    F("model.vocab_multiple", int, 128, "embedding/head rows padded to a multiple of this (1 = no padding)",
      bounds=">0", state=True, legacy=1),   # before: rows were the exact vocabulary
    F("model.scan_layers", bool, False, "nn.scan over the layers: compile time flat in depth (checkpoints differ in "
      "layout)", state=True),
    F("model.image_code_features", bool, False, "add a learned projection of each image code's appearance to its "
      "embedding", state=True),
    F("model.cross_modal_rope", bool, True, "False: rotary offsets within a modality only; text<->image pairs "
      "unrotated"),
    F("model.qk_norm", bool, False, "RMS-normalise each head's queries and keys (learned gain) before scoring"),
    F("model.directional_heads", int, 0, "P: per block, P heads see only earlier caption words and P only later "
      "ones", bounds=">=0"),
    F("model.cross_modal_heads", int, 0, "C: per block, C heads where only text reads the image (image queries see "
      "no text) and C where only the image reads the text", bounds=">=0"),
    F("model.value_positions", bool, False, "every block's values also carry each key's learned absolute position "
      "(a per-layer projection, zero at the start), so a head that finds a token by content can read where it is "
      "at any depth (needs model.positions=learned or rope+learned)"),
    F("model.fused_qkv", bool, True, "one [d_model, 3, heads, head_dim] q/k/v projection (BENCHMARKS: speed)",
      state=True, legacy=False),   # before: separate query/key/value projections
    F("model.remat", str, "none", "rematerialise blocks: none | full | save_qkv | save_attention | minimal (named "
      "matmul outputs, never the attention scores) | dots | dots_no_batch (models/transformer.py)",
      choices=("none", "full", "save_qkv", "save_attention", "minimal", "dots", "dots_no_batch")),
    F("model.lora_rank", int, 0, "r > 0: train low-rank adapters (rank r) on the projections of "
      "model.lora_targets, the base frozen and taken from init.from (models/lora.py); 0 = train every weight",
      bounds=">=0", state=True),
    F("model.lora_alpha", float, 16.0, "LoRA: the adapters' update is scaled by lora_alpha / lora_rank",
      bounds=">0"),
    F("model.lora_targets", tuple, ("qkv", "out", "wi_0", "wi_1", "wo"), "LoRA: the projections that get "
      f"adapters, of {LORA_TARGETS}; qkv = the q, k, v projections (fused or not); the output head cannot be one",
      state=True),

    F("diffusion.schedule", str, "linear", "masking schedule alpha(t)", choices=("linear", "cosine", "polynomial")),
    F("diffusion.poly_power", float, 2.0, "polynomial: alpha = 1 - t^k", bounds=">0"),
    F("diffusion.shared_time", bool, False, "one t for both modalities (UniDisc) instead of one each"),
    F("diffusion.loss_weighting", str, "elbo", "weight of each masked token's loss",
      choices=("elbo", "flat", "tokens")),
    F("diffusion.t_min", float, 1e-3, "smallest sampled t", bounds="(0, 0.5)"),
    F("diffusion.text_loss_weight", float, 1.0, "multiplies the text tokens' loss", bounds=">=0"),
    F("diffusion.image_loss_weight", float, 1.0, "multiplies the image tokens' loss", bounds=">=0"),
    F("diffusion.segment_loss_weights", float, {}, "segment name -> c: multiplies that segment's loss within "
      "its modality's mean (method/diffusion.py), e.g. {'answer': 2.0}; a segment not named keeps 1", bounds=">=0",
      open=True),
    F("diffusion.tasks", float, {"joint": 0.4, "text_to_image": 0.2, "image_to_text": 0.2, "image_only": 0.1,
                                 "text_only": 0.1}, _TASKS_DOC, open=True),
    F("diffusion.task_roles", str, {}, "tasks declared here: name -> 'segment:role ...' (clean | noised | null | absent), "
      "e.g. 'text:clean image:noised'", open=True),
    F("diffusion.tasks_later", float, {}, "from step diffusion.tasks_later_from on, these tasks take these weights "
      "(task name -> weight; tasks not named keep theirs); every name must be one of diffusion.tasks", bounds=">=0",
      open=True),
    F("diffusion.tasks_later_from", int, 0, "the step from which diffusion.tasks_later applies; 0: one mixture "
      "throughout", bounds=">=0"),

    F("train.steps", int, 2_000, "optimizer steps", bounds=">0"),
    F("train.batch_size", int, 64, "global batch", bounds=">0"),
    F("train.log_every", int, 50, "steps between train log lines", bounds=">0"),
    F("train.ema_decay", float, 0.999, "decay of the EMA of the weights", bounds="[0, 1)"),
    F("train.on_nonfinite", str, "stop", "a NaN/inf loss: stop (last good checkpoint kept) | skip the step",
      choices=("stop", "skip")),
    F("train.concurrent_chunks", int, 1, "forward/backward as N independent sub-batches in one program (CPU: see "
      "train_state.py)", bounds=">0"),
    F("train.compilation_cache", str, "auto", "JAX's persistent compilation cache: auto ($JAX_COMPILATION_CACHE_DIR "
      "if set, else WORKDIR/compilation_cache; gs:// too) | a directory | none (off); unimm_jax/main.py"),

    F("optim.learning_rate", float, 1e-3, "peak learning rate", bounds=">0"),
    F("optim.warmup_steps", int, 100, "linear warmup steps", bounds=">=0"),
    F("optim.end_lr_ratio", float, 0.1, "cosine decay ends at learning_rate * end_lr_ratio", bounds="[0, 1]"),
    F("optim.weight_decay", float, 0.01, "AdamW weight decay", bounds=">=0"),
    F("optim.b1", float, 0.9, "Adam beta1"),
    F("optim.b2", float, 0.99, "Adam beta2"),
    F("optim.grad_clip", float, 1.0, "global gradient norm clip (0 = none; 0 vs > 0 changes the optimizer state)",
      bounds=">=0", state=True),

    F("mesh.shape", tuple, (-1, 1, 1), "('data', 'fsdp', 'tensor'); -1 = the remaining devices"),
    F("mesh.topology", str, "", "the Cloud TPU slice the config is sized for, e.g. v5e:4x8 (python -m "
      "unimm_jax.aot compiles for it by default)"),
    F("mesh.cpu_devices", int, 0, "main job on CPU: split the host into N XLA devices, one thread each (0 = one)",
      bounds=">=0"),
    F("mesh.retain_host_memory", bool, True, "keep freed host memory in the process (glibc): see "
      "retain_host_memory()"),
    F("mesh.rules", tuple, _MESH_RULES, "logical axis -> mesh axes, in priority order (unimm_jax/sharding.py): a "
      "rule whose mesh axis an earlier dimension of the same array already took is skipped, so activations keep "
      "'embed' whole"),

    F("init.from", str, "", "a training workdir (its newest checkpoint's EMA weights) or an export bundle whose "
      "parameters a new run starts from, optimizer fresh at step 0; ignored when the workdir has checkpoints, "
      "except by LoRA runs, whose frozen base it is (unimm_jax/init_from.py)"),

    F("ckpt.every_steps", int, 500, "steps between checkpoints", bounds=">0"),
    F("ckpt.max_to_keep", int, 3, "checkpoints kept", bounds=">0"),
    F("ckpt.async_save", bool, True, "write checkpoints in the background"),

    F("eval.every_steps", int, 500, "steps between validations", bounds=">0"),
    F("eval.batch_size", int, 128, "validation batch", bounds=">0"),
    F("eval.use_ema", bool, True, "evaluate the EMA weights"),
    F("eval.num_generate", int, 512, "val examples scored by generation (shapes only) at the end of the main job",
      bounds=">0"),

    # Sampler settings of the report and the sample CLI.
    F("sample.method", str, "confidence", "confidence (MaskGIT) | ancestral (MDLM) | threshold (Fast-dLLM: "
      "every position whose confidence passes sample.threshold, until none is left; steps is the bound)",
      choices=("confidence", "ancestral", "threshold")),
    F("sample.preset", str, "", "'' or an upstream's decoding per task, which then replaces the settings below "
      "(method/samplers/presets.py)", choices=("", "mmada", "lumina_dimoo")),
    F("sample.t2i_steps", int, 16, "steps of text-to-image generation", bounds=">0"),
    F("sample.i2t_steps", int, 24, "steps of image-to-text generation", bounds=">0"),
    F("sample.i2t_candidates", int, 1, "K > 1: K captions per image, the one that makes the image likeliest kept",
      bounds=">0"),
    F("sample.i2t_score_passes", int, 8, "i2t_candidates > 1: forward passes scoring each candidate (at t = 1/n, "
      "2/n, .., 1; 1 = one pass with the image all MASK)", bounds=">0"),
    F("sample.joint_steps", int, 32, "steps of joint generation (per stage)", bounds=">0"),
    F("sample.edit_steps", int, 16, "steps of instruction editing (the target image)", bounds=">0"),
    F("sample.vqa_steps", int, 3, "steps of visual question answering (the answer)", bounds=">0"),
    F("sample.temperature", float, 1.0, "sampling temperature; 0 = argmax", bounds=">=0"),
    F("sample.confidence_noise", float, 1.0, "confidence, threshold: Gumbel noise on the confidences that rank "
      "the positions, annealed to 0 over the steps", bounds=">=0"),
    F("sample.reveal_schedule", str, "cosine", "confidence: how many positions each step reveals (uniform: "
      "N // K a step, the first N % K one more, LLaDA's)", choices=("cosine", "linear", "uniform")),
    F("sample.threshold", float, 0.9, "threshold: a step reveals every masked position whose drawn token has "
      "probability >= this (at least the most confident one)", bounds="(0, 1]"),
    F("sample.max_per_step", int, 0, "threshold: the most positions a step reveals, the last step excepted "
      "(0 = no limit)", bounds=">=0"),
    F("sample.block_length", int, 0, "L > 0: generate the positions of a call in blocks of L, left to right, each "
      "block its own steps (LLaDA's semi-autoregressive decoding); 0 = all at once", bounds=">=0"),
    F("sample.cache", str, "none", "keys and values of the positions not being generated: none (every step a full "
      "forward) | exact (computed once per sample; needs model.isolate_given) | dual (Fast-dLLM's approximate "
      "cache: recomputed every refresh_every steps and at each block's start)", choices=("none", "exact", "dual")),
    F("sample.refresh_every", int, 0, "dual cache: recompute every N steps (0: only at each block's first step)",
      bounds=">=0"),
    F("sample.guidance_scale", float, 0.0, "classifier-free guidance against the null condition (0 = none)",
      bounds=">=0"),
    F("sample.joint_order", str, "together", "joint generation: together | text_first | image_first (each stage "
      "joint_steps)", choices=("together", "text_first", "image_first")),
)
del F

BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
OPEN_GROUPS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.open)


def describe_fields() -> list[tuple[str, Any, str, str, str]]:
  """The schema as rows (name, default, type, allowed values, doc), e.g. for a table in the docs or ``--help``."""
  rows = []
  for f in FIELDS:
    allowed = " | ".join(map(str, f.choices)) if f.choices else (f.bounds or "")
    kind = f"{{name: {f.type.__name__}}}" if f.open else f.type.__name__
    rows.append((f.name, f.default, kind, allowed, f.doc))
  return rows
