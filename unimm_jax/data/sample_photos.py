"""A folder dataset of random crops of the two photographs that scikit-learn ships (offline real images).

``python -m unimm_jax.data.sample_photos --out=DIR [--size=32 --train=20000 --val=2000]`` writes
``DIR/train.jsonl``, ``DIR/val.jsonl`` and PNG crops in the folder format (``unimm_jax/data/folder.py``), so the
photograph measurements of the tokenizer use the same code path as a user's photos.

``sklearn.datasets.load_sample_images()`` holds two 427x640 RGB photographs (a temple in China and a flower).
Each is split by columns: crops for ``train`` come from its left three quarters, crops for ``val`` from its right
quarter, so no val pixel was seen in training. Crop corners are uniform, drawn from ``--seed``. Captions name the
photograph ("a photo of a temple in china", "a photo of a flower"): the folder format needs one, the tokenizer
ignores it. Needs scikit-learn (the ``photos`` extra), only to write the folder.
"""

from __future__ import annotations

import json

import numpy as np
from etils import epath
from PIL import Image

CAPTIONS = {"china.jpg": "a photo of a temple in china", "flower.jpg": "a photo of a flower"}
TRAIN_FRACTION = 0.75   # of each photograph's width


def load_photos() -> dict[str, np.ndarray]:
  """{file name: uint8 [H, W, 3]} of scikit-learn's sample photographs."""
  try:
    from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the sample photographs come with scikit-learn: pip install 'unimm_jax[photos]'") from e
  data = load_sample_images()
  return {epath.Path(name).name: np.asarray(img, np.uint8) for name, img in zip(data.filenames, data.images)}


def random_crops(photo: np.ndarray, n: int, size: int, columns: tuple[int, int], rng) -> np.ndarray:
  """n crops of size x size whose columns lie in [columns[0], columns[1]).  # uint8 [n, size, size, 3]"""
  lo, hi = columns
  if hi - lo < size or photo.shape[0] < size:
    raise ValueError(f"a {size}x{size} crop does not fit columns {columns} of a {photo.shape[:2]} photograph")
  ys = rng.integers(0, photo.shape[0] - size + 1, n)
  xs = rng.integers(lo, hi - size + 1, n)
  return np.stack([photo[y:y + size, x:x + size] for y, x in zip(ys, xs)])


def write_folder(out, *, size: int = 32, train: int = 20_000, val: int = 2_000, seed: int = 0) -> dict[str, int]:
  """Writes the folder dataset (module docstring); returns {split: examples}."""
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  photos = load_photos()
  counts = {}
  for split, total in (("train", train), ("val", val)):
    (out / split).mkdir(exist_ok=True)
    lines = []
    for p, (name, photo) in enumerate(sorted(photos.items())):
      cut = int(photo.shape[1] * TRAIN_FRACTION)
      columns = (0, cut) if split == "train" else (cut, photo.shape[1])
      n = total // len(photos) + (p < total % len(photos))
      for i, crop in enumerate(random_crops(photo, n, size, columns, rng)):
        rel = f"{split}/{epath.Path(name).stem}_{i:06d}.png"
        Image.fromarray(crop).save(out / rel)
        lines.append(json.dumps({"image": rel, "text": CAPTIONS.get(name, "a photo")}))
    (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    counts[split] = len(lines)
  return counts


def _cli():
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  out = flags.DEFINE_string("out", None, "Directory of the folder dataset.")
  size = flags.DEFINE_integer("size", 32, "Crop side in pixels.")
  train = flags.DEFINE_integer("train", 20_000, "Training crops.")
  val = flags.DEFINE_integer("val", 2_000, "Validation crops.")
  seed = flags.DEFINE_integer("seed", 0, "Seed of the crop positions.")
  flags.mark_flags_as_required(["out"])

  def main(argv):
    del argv
    counts = write_folder(out.value, size=size.value, train=train.value, val=val.value, seed=seed.value)
    print(f"wrote {out.value}: {counts['train']:,} train and {counts['val']:,} val crops of {size.value}x{size.value}")

  app.run(main)


if __name__ == "__main__":
  _cli()
