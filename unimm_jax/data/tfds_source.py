"""Any TFDS image dataset with captions or class labels, read through ``tfds.data_source`` (grain-ready).

``tfds.data_source`` opens a dataset that was built in the ArrayRecord file format as a random-access source and
decodes examples with numpy and PIL: reading needs ``tensorflow-datasets`` but not TensorFlow. (Building most
datasets does need TensorFlow: README, "COCO captions on a TPU".)

The config maps the dataset's features onto an image and a caption:

* ``data.image_key``: the image feature (``"image"``); ``/`` walks nested features (``"image/encoded"``).
* ``data.text_key``: a caption feature: a string, or a sequence of them (COCO's ``"captions/text"``), of which the
  first is used, so an example's caption does not change from epoch to epoch (and pretokenized data agrees).
* ``data.label_key``: or a ``ClassLabel`` whose name fills a template of ``data.caption_templates``; example i
  uses template ``i mod len(templates)``, deterministically. Underscores in names become spaces.

Images are converted to RGB or grey, resized (shorter side to ``image.size``, bicubic) and centre-cropped like
the folder source.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
from PIL import Image

from unimm_jax.data import folder


def _lookup(example: dict[str, Any], key: str):
  node = example
  for part in key.split("/"):
    if not isinstance(node, dict) or part not in node:
      have = sorted(node) if isinstance(node, dict) else type(node).__name__
      raise KeyError(f"TFDS feature {key!r}: no {part!r} in the example (it has {have}); set config.data.image_key"
                     " / text_key / label_key to the dataset's feature names")
    node = node[part]
  return node


def _as_text(value) -> str:
  if isinstance(value, np.ndarray):
    if value.ndim == 0:
      value = value.item()
    elif len(value):
      value = value.reshape(-1)[0]
    else:
      return ""
  elif isinstance(value, (list, tuple)):
    value = value[0] if value else ""
  return (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip()


class TfdsSource:
  """Grain random-access source of {'image': uint8 [S, S, C], 'text': str} over one TFDS split."""

  def __init__(self, name: str, split: str, *, data_dir: str | None, image_size: int, channels: int,
               image_key: str = "image", text_key: str = "", label_key: str = "",
               caption_templates: tuple[str, ...] = ("a photo of a {}.",)):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (only this source needs it)
    if bool(text_key) == bool(label_key):
      raise ValueError("TfdsSource needs exactly one of text_key and label_key")
    self.name, self.split = name, split
    self.image_size, self.channels = image_size, channels
    self.image_key, self.text_key, self.label_key = image_key, text_key, label_key
    self.templates = tuple(caption_templates)
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:  # pylint: disable=broad-except  (TFDS raises several types for a missing dataset)
      raise FileNotFoundError(
          f"TFDS dataset {name!r} split {split!r} cannot be opened from data_dir={data_dir!r} ({type(e).__name__}: "
          f"{e}). It must be built in the array_record format first (README: 'COCO captions on a TPU')") from e
    self._names = None
    if label_key:
      feature = self._source.dataset_info.features
      for part in label_key.split("/"):
        feature = feature[part]
      self._names = [n.replace("_", " ") for n in feature.names]

  @classmethod
  def from_config(cls, config, split: str) -> "TfdsSource":
    d = config.data
    return cls(d.tfds_name, d.tfds_train_split if split == "train" else d.tfds_val_split,
               data_dir=d.tfds_data_dir, image_size=config.image.size, channels=config.image.channels,
               image_key=d.image_key, text_key=d.text_key, label_key=d.label_key,
               caption_templates=tuple(d.caption_templates))

  def __len__(self) -> int:
    return len(self._source)

  def caption(self, index: int, example: dict[str, Any]) -> str:
    if self._names is not None:
      label = int(np.asarray(_lookup(example, self.label_key)))
      return self.templates[index % len(self.templates)].format(self._names[label])
    return _as_text(_lookup(example, self.text_key))

  def __getitem__(self, index: int) -> dict[str, Any]:
    i = operator.index(index)
    if not 0 <= i < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    example = self._source[i]
    image = np.asarray(_lookup(example, self.image_key))
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise ValueError(f"TFDS feature {self.image_key!r} is {image.dtype} {image.shape}, not a uint8 image")
    pil = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
    return {"image": folder.fit_image(pil, self.image_size, self.channels), "text": self.caption(i, example)}

  def __repr__(self) -> str:  # grain checkpoints record the source's repr
    return (f"TfdsSource(name={self.name!r}, split={self.split!r}, image_size={self.image_size}, "
            f"channels={self.channels}, n={len(self)})")
