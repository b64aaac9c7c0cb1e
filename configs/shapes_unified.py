"""One model for drawing, captioning, editing and answering on the embedded ``shapes`` data (2-core CPU).

Run::

    python -m unimm_jax.main --config=configs/shapes_unified.py --workdir=runs/unified

Every example is one sequence of the layout ``[text "text" 24 | image "image" 6x6 | image "target" 6x6 |
text "answer" 3]`` (99 tokens), which covers the three kinds of example the data mixes:

==========  ===========================  ===================  ==========  =========
kind        text                         image                target      answer
==========  ===========================  ===================  ==========  =========
caption     the caption                  the image            absent      absent
edit        the instruction              the source image     the target  absent
vqa         the question                 the image            absent      the answer
==========  ===========================  ===================  ==========  =========

Why one covering layout, with the segments an example lacks *absent* (every position the ``<absent>`` token),
rather than one layout per kind padded to a common length: each kind's tokens sit where that kind's own layout
would put them, unpadded (the caption and the instruction are the same 24-word text segment; the source image and
the drawn image the same grid), so what the model learns about a caption's words or an image's codes is shared by
every kind through the same positions and embeddings; and the whole machinery (one compiled step, the corruption,
the ELBO, the samplers, the Pipeline) stays that of one layout. Its cost is compute on absent positions: a caption
pair uses 60 of the 99 positions, an edit 96, a question 63. Several layouts padded to one length would cost the
same compute (99 for all), and the absent token tells the model what a pad would.

Each kind trains on its own tasks (``diffusion.task_roles``): an example draws among the tasks whose absent
segments are exactly the ones it lacks, so the mixture below is, per kind: caption pairs 45 % text->image, 45 %
image->text, and a little joint and null conditions; edits mostly the target given the instruction and the
source, 5 % with the instruction null (the guidance null condition); questions likewise for the answer.

Measured (BENCHMARKS.md, "One model for every task", second run and second seed; 6,000 steps), on 512 val examples
of each task about scenes never trained on, seeds 0 / 1: edit accuracy 0.953 / 0.949 (every kind >= 0.91); VQA
0.961 / 0.902 (position 0.766 on seed 0; kind 0.851 and exists 0.727 on seed 1; the others >= 0.92);
text->image 0.613 / 0.607 and image->text 0.674 / 0.631 (one-shape scenes 1.000 both ways, two-shape 0.26-0.39);
joint consistency 0.99 / 1.00. The issue's bars for VQA, text->image and image->text are not reached:
text->image's val bits plateau near 0.03 from step 4,000 on both seeds.
"""

import importlib.util
import pathlib

# The base is configs/shapes.py, loaded by path: config files are loaded by path, not as a package.
_SPEC = importlib.util.spec_from_file_location("_shapes_config", pathlib.Path(__file__).with_name("shapes.py"))
shapes_config = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(shapes_config)

ABSENT_IN_CAPTIONS = "target:absent answer:absent"


def get_config():
  config = shapes_config.get_config()
  config.data.shapes_kinds = (("caption", 0.6), ("edit", 0.2), ("vqa", 0.2))
  # An instruction or a question is the text segment's value, a source image the image segment's (the folder
  # source reads the same fields from JSON lines).
  config.data.fields = (("text", "text", "instruction", "question"), ("image", "image", "source"),
                        ("target", "target"), ("answer", "answer"))
  config.sequence.segments = (("text", "text", 24), ("image", "image"), ("target", "image"), ("answer", "text", 3))
  config.sequence.specials = ("<absent>",)
  config.model.max_len = 99
  config.diffusion.tasks = {
      "text_to_image": 0.45, "image_to_text": 0.45, "joint": 0.05, "image_only": 0.025, "text_only": 0.025,
      "edit": 0.95, "edit_null": 0.05, "vqa": 0.95, "vqa_null": 0.05}
  config.diffusion.task_roles = {
      "text_to_image": f"text:clean image:noised {ABSENT_IN_CAPTIONS}",
      "image_to_text": f"text:noised image:clean {ABSENT_IN_CAPTIONS}",
      "joint": f"text:noised image:noised {ABSENT_IN_CAPTIONS}",
      "image_only": f"text:null image:noised {ABSENT_IN_CAPTIONS}",
      "text_only": f"text:noised image:null {ABSENT_IN_CAPTIONS}",
      "edit": "text:clean image:clean target:noised answer:absent",
      "edit_null": "text:null image:clean target:noised answer:absent",
      "vqa": "text:clean image:clean target:absent answer:noised",
      "vqa_null": "text:null image:clean target:absent answer:noised",
  }
  # Each kind at fixed rows of every batch, computed on its own segments only (absent segments are not attended,
  # so this equals the covering layout): caption pairs and questions in one forward of [text | image | answer]
  # (63 positions), edits in one of [text | image | target] (96), not all 99. In every 16 rows, 12 caption pairs
  # (the drawing direction binds phrases to cells after about as many text->image examples as configs/shapes.py
  # sees), 2 questions and 2 edits.
  config.model.mask_absent = True
  config.data.kind_rows = (("caption", 12), ("vqa", 2), ("edit", 2))
  config.data.val_size = 1024
  config.eval.num_generate = 512
  # 516 ms a step on the 2-core AVX-512 Xeon, 1.18 s on an AVX2-only EPYC (BENCHMARKS.md)
  config.train.steps = 6_000
  config.eval.every_steps = 1_500
  config.ckpt.every_steps = 1_500
  return config
