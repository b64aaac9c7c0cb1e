"""The ``shapes`` data as a TFDS dataset: the project's own dataset builder, for testing the TFDS path offline.

``build(data_dir, train=..., val=...)`` writes ``unimm_shapes`` in the ArrayRecord file format under ``data_dir``
without downloading anything and without TensorFlow (images are handed to TFDS as PNG bytes, which it stores
as they are). The features are those of real captioned / labelled datasets, so a run reads it exactly as it
would read COCO captions or an ImageNet-style dataset::

    --config.data.source=tfds --config.data.tfds_name=unimm_shapes --config.data.tfds_data_dir=DIR
    --config.data.text_key=caption                    # captions
    --config.data.label_key=label                     # or class names through config.data.caption_templates

``label`` is the colour and kind of the example's first shape ("red circle"), ``caption`` the shapes caption.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from unimm_jax.data import shapes

NAME = "unimm_shapes"
LABELS = tuple(f"{c} {k}" for c in shapes.COLOURS for k in shapes.KINDS)


class UnimmShapes(tfds.core.GeneratorBasedBuilder):
  """Shapes examples with an image, a caption and a class label."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # Nothing is downloaded, so there are no checksums to look up. (Looking them up finds this module's directory
  # through importlib_resources, which TFDS uses without depending on it.)
  url_infos = None

  def __init__(self, *, train: int = 256, val: int = 64, seed: int = 0, **kwargs):
    self._sizes, self._seed = {"train": train, "validation": val}, seed
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Procedural shapes (unimm_jax.data.shapes) as a TFDS dataset.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=[n.replace(" ", "_") for n in LABELS]),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager   # nothing to download
    return {split: self._generate_examples(split, n) for split, n in self._sizes.items()}

  def _generate_examples(self, split: str, n: int):
    for i in range(n):
      shape_set, image, caption = shapes.sample_example("train" if split == "train" else "val", self._seed, i)
      first = min(shape_set, key=lambda s: s.cell)
      buf = io.BytesIO()
      Image.fromarray(np.asarray(image)).save(buf, format="png")
      yield i, {"image": buf.getvalue(), "caption": caption, "label": LABELS.index(f"{first.colour} {first.kind}")}


def build(data_dir, *, train: int = 256, val: int = 64, seed: int = 0) -> UnimmShapes:
  """Builds (or finds) the dataset in ``data_dir`` in the ArrayRecord format; returns the builder."""
  builder = UnimmShapes(train=train, val=val, seed=seed, data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return builder
