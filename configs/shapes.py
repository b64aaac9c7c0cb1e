"""The embedded ``shapes`` data on a 2-core CPU: the README's main job.

Run::

    python -m unimm_jax.main --config=configs/shapes.py --workdir=runs/shapes

24x24 images become 6x6 = 36 tokens of a 4x4-patch codebook (about 150 codes, 4 levels per channel); captions
become at most 21 word tokens plus PAD (24 positions); one sequence is 60 tokens. The model is 4 layers of width
128 with 8 heads of 16 (about 0.9M parameters).

Measured (BENCHMARKS.md, seventh round; 2-core AMD EPYC, 2026-11-24), seeds 0 and 1, from a fresh clone: the
whole command takes 13 min 51 s and 13 min 17 s; val bits/token of the image given the caption 0.0023 / 0.0002;
text->image accuracy 0.996 / 1.000 and image->text 0.910 / 0.986 on 512 val examples whose shape sets were never
trained on (one-shape scenes right both ways in every case), joint consistency 1.00. What made the difference:
query-key normalisation, with which the drawing direction binds each phrase to its grid cell within the run, and
captions chosen among 4 by how likely the drawing direction finds the image given each.
"""

from unimm_jax.configuration import base_config


def get_config():
  config = base_config()
  config.data.source = "shapes"
  config.text.tokenizer = "word"
  config.text.max_len = 24
  config.image.tokenizer = "patch"
  config.image.patch = 4
  config.image.levels = 4
  # Packed id ranges: on a CPU 128-lane alignment buys nothing, and the vocabularies here (about 60 ids in all)
  # would double the embedding table; it also keeps this config's numbers those measured before the option.
  config.sequence.id_align = 1
  config.model.d_model = 128
  config.model.num_layers = 4
  # 8 heads of 16, not 4 of 32: binding a phrase to its grid cell takes several lookups at once (BENCHMARKS,
  # fourth round: lower conditional val bits and higher accuracy at 2,000 steps, for a 20 % slower step).
  config.model.num_heads = 8
  config.model.head_dim = 16
  config.model.mlp_dim = 384
  # Rotary offsets within a modality only (text<->image pairs unrotated, so a caption word finds its grid cell by
  # content and absolute position), every head dimension rotary, and image codes embedded with a projection of
  # their pixels: lower conditional val bits at 2,000 steps than the earlier default (BENCHMARKS, third round).
  config.model.cross_modal_rope = False
  config.model.rope_fraction = 1.0
  config.model.image_code_features = True
  # Phrase membership: per block one head sees only earlier caption words and one only later ones, so a word
  # learns which side of "and" it is on; and a rotary base of 100 (not 10,000), whose frequencies resolve offsets
  # within a 24-word caption and a 6x6 grid. Lower conditional val bits and higher two-shape accuracy at 2,000 and
  # 5,200 steps (BENCHMARKS, fifth round).
  config.model.directional_heads = 1
  config.model.rope_theta = 100.0
  # Queries and keys RMS-normalised (learned gain): binding each phrase to its grid cell, which without it came late
  # and by luck (10,400 steps), is learned by the drawing direction at 2,500-4,500 steps in both seeds tried; its
  # image-given-caption bits fall to 0.0002 and text->image reaches 1.00 (BENCHMARKS, seventh round).
  config.model.qk_norm = True
  # 4,800 steps: at the 160-170 ms a step this machine gives on a slow day (BENCHMARKS, seventh round: 5,400 steps
  # took 16 min 20 s end to end), the whole job fits 15 minutes with a margin.
  config.train.steps = 4_800
  config.train.batch_size = 64
  config.train.log_every = 100
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 100
  # Binding each phrase to its grid cell is learned late and suddenly (10,400 steps: text->image 0.95). Weight decay
  # 0.1 (not 0.01) brings it forward, and a cosine that ends at 0.3 (not 0.1) of the peak keeps it learning through
  # the last third (BENCHMARKS, sixth round).
  config.optim.weight_decay = 0.1
  config.optim.end_lr_ratio = 0.3
  # Mostly the two conditionals that generation uses; a little of the null conditions (for guidance) and of
  # joint noising (for joint generation).
  config.diffusion.tasks.text_to_image = 0.45
  config.diffusion.tasks.image_to_text = 0.45
  config.diffusion.tasks.joint = 0.05
  config.diffusion.tasks.image_only = 0.025
  config.diffusion.tasks.text_only = 0.025
  config.diffusion.loss_weighting = "flat"
  # Masking rates drawn toward the high end (mask share sqrt(t), mean 2/3): more examples where the drawing or the
  # caption must come from the other modality, not from its own visible neighbours (BENCHMARKS, fifth round).
  config.diffusion.schedule = "polynomial"
  config.diffusion.poly_power = 0.5
  # Two single-threaded CPU devices, data parallel: a 10-15 % faster step on 2 cores than one device (BENCHMARKS).
  config.mesh.cpu_devices = 2
  config.model.vocab_multiple = 1      # no mesh axis splits the vocabulary here
  # Sampler of the report: argmax tokens, revealed at a constant rate (BENCHMARKS: +10 points over T=1, cosine).
  config.sample.temperature = 0.0
  config.sample.reveal_schedule = "linear"
  config.sample.joint_order = "text_first"   # joint pairs: a caption from p(text), then its image
  # Captions: 4 drawn per image (confidence noise 1 makes them differ), the one that makes the image likeliest kept.
  # The captioning direction binds phrases to cells later than the drawing one, so a single caption puts the two
  # objects in swapped cells about half the time; the drawing direction tells them apart (BENCHMARKS, seventh
  # round: image->text 0.80 -> 0.98 on the same weights).
  config.sample.i2t_candidates = 4
  config.ckpt.every_steps = 800
  config.eval.every_steps = 800
  return config
