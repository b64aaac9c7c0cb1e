"""``python -m unimm_jax.convert import|export`` (see :mod:`unimm_jax.convert`)::

    python -m unimm_jax.convert import --format=llada --src=HF_DIR --out=BUNDLE [--config=configs/llada_8b.py]
                                      [--seq_len=N] [--config.mesh.shape=...]
    python -m unimm_jax.convert import --format=mmada --src=HF_DIR --image_tokenizer=MAGVIT_DIR --out=BUNDLE
                                      [--config=configs/mmada_8b.py]
    python -m unimm_jax.convert import --format=lumina_dimoo --src=HF_DIR --out=BUNDLE [--image_size=1024]
    python -m unimm_jax.convert export --format=llada --workdir=BUNDLE_OR_WORKDIR --out=HF_DIR
                                      [--dtype=bfloat16|float32] [--max_shard_gb=5]

Without ``--config``, import takes the upstream's architecture over a text-only layout of ``--seq_len`` tokens
(default its ``max_sequence_length``). Errors are one line and exit 2; nothing is written to ``--out`` then.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from unimm_jax import configuration
from unimm_jax import safetensors_io

_CONFIG = config_flags.DEFINE_config_file("config", None, "Target config (import); default: the upstream's "
                                          "architecture.", lock_config=True)
_FORMAT = flags.DEFINE_string("format", "llada", "Upstream layout: llada | mmada | lumina_dimoo.")
_SRC = flags.DEFINE_string("src", None, "import: the Hugging Face model directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "export: a bundle or a training workdir.")
_OUT = flags.DEFINE_string("out", None, "The new directory to write.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "import without --config: tokens per sequence.")
_DTYPE = flags.DEFINE_string("dtype", None, "export: stored dtype (default: each tensor's upstream dtype).")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "export: the largest safetensors shard, in GB (2^30).")
_IMAGE_TOKENIZER = flags.DEFINE_string("image_tokenizer", "", "import --format=mmada: the MAGVIT-v2 directory "
                                       "(safetensors + config.json) whose codes the checkpoint's image ids are; "
                                       "lumina_dimoo: its VQ-GAN (default SRC/vqvae).")
_MAX_TEXT_LEN = flags.DEFINE_integer("max_text_len", 128, "import --format=mmada without --config: the text-to-image "
                                     "prompt's tokens (the upstream's max_text_len; its segment holds one more).")
_QUESTION_LEN = flags.DEFINE_integer("question_len", 64, "import --format=mmada without --config: tokens of a "
                                     "question in its chat template.")
_ANSWER_LEN = flags.DEFINE_integer("answer_len", 128, "import --format=mmada without --config: tokens of an answer.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 512, "import --format=lumina_dimoo without --config: image pixels a "
                                   "side (the grid is image_size / 16 a side).")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16"], "import without --config: the stored "
                                 "dtype of the parameters (default float32, the trainer's master weights).")

USAGE = ("usage: python -m unimm_jax.convert import --format=llada|mmada|lumina_dimoo --src=HF_DIR --out=BUNDLE "
         "[--config=...] [--image_tokenizer=DIR] | export --format=FORMAT --workdir=BUNDLE_OR_WORKDIR --out=HF_DIR")


def peak_rss_bytes() -> int | None:
  """This process's peak resident memory (Linux ``VmHWM``: its own address space only; ``getrusage`` would also
  count the parent's pages it was forked with), or None elsewhere."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _lengths() -> dict[str, int] | None:
  if _FORMAT.value not in ("mmada", "lumina_dimoo"):
    return None
  out = {"max_text_len": _MAX_TEXT_LEN.value, "question_len": _QUESTION_LEN.value, "answer_len": _ANSWER_LEN.value}
  if _FORMAT.value == "lumina_dimoo":
    out["image_size"] = _IMAGE_SIZE.value
  return out


def main(argv):
  logging.set_verbosity(logging.INFO)
  from unimm_jax import convert  # pylint: disable=g-import-not-at-top
  command = argv[1] if len(argv) == 2 else None
  if command not in ("import", "export"):
    print(f"error: expected one command, import or export; got {argv[1:]}\n{USAGE}", file=sys.stderr)
    sys.exit(2)
  need = {"import": (("src", _SRC), ("out", _OUT)), "export": (("workdir", _WORKDIR), ("out", _OUT))}[command]
  missing = [f"--{name}" for name, flag in need if not flag.value]
  if missing:
    print(f"error: {command} needs {', '.join(missing)}\n{USAGE}", file=sys.stderr)
    sys.exit(2)
  try:
    if command == "import":
      config = _CONFIG.value
      if config is None and _PARAM_DTYPE.value:
        with open(f"{_SRC.value}/config.json") as f:
          config = convert.default_config(_FORMAT.value, epath.Path(_SRC.value), json.load(f), seq_len=_SEQ_LEN.value,
                                          image_tokenizer=_IMAGE_TOKENIZER.value, lengths=_lengths())
        config.model.param_dtype = _PARAM_DTYPE.value
      if config is not None:
        # Not prepare_host: its allocator setting (mesh.retain_host_memory) keeps every freed buffer in the
        # process, which helps a loop of train steps and would make a streaming import hold each tensor it read.
        configuration.split_cpu_devices(config.mesh.cpu_devices)
      meta = convert.import_checkpoint(_FORMAT.value, _SRC.value, _OUT.value, config, seq_len=_SEQ_LEN.value,
                                       image_tokenizer=_IMAGE_TOKENIZER.value, lengths=_lengths())
      peak = peak_rss_bytes()
      print(f"imported {_SRC.value} -> {_OUT.value}: {meta['param_count']:,} parameters ({meta['dtype']})"
            + (f"; peak RSS {peak / 2**30:.2f} GiB ({peak} bytes)" if peak else ""))
    else:
      files = convert.export_checkpoint(_FORMAT.value, _WORKDIR.value, _OUT.value, dtype=_DTYPE.value,
                                        max_shard_bytes=int(_MAX_SHARD_GB.value * 2**30))
      print(f"exported {_WORKDIR.value} -> {_OUT.value}: {', '.join(files)}")
  except (convert.ConvertError, safetensors_io.CheckpointError, configuration.ConfigError,
          FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
