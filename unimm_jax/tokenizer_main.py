"""Trains the learned image tokenizer: ``python -m unimm_jax.tokenizer_main --config=configs/tokenizer_shapes.py
--workdir=runs/tok_shapes``.

The same flags as the main job (``unimm_jax.main``: config overrides, ``--distributed`` and the coordinator
flags, ``mesh.cpu_devices``); the work is ``unimm_jax.tokenizer_train.train_and_evaluate``. Rerun the same
command to resume. When it finishes, ``WORKDIR`` holds the tokenizer, which the unified model uses with
``--config.image.tokenizer=fsq --config.image.tokenizer_path=WORKDIR`` (or ``vq``).
"""

from __future__ import annotations

import sys

from absl import app

from unimm_jax import configuration
from unimm_jax import main as main_lib   # its flags (--config, --workdir, distributed) are this tool's flags


def main(argv):
  if main_lib._DRY_RUN.value:  # pylint: disable=protected-access
    raise app.UsageError("--dry_run sizes the unified model; the tokenizer trainer has none")
  config = main_lib.start(argv)
  from unimm_jax import sharding, tokenizer_train  # pylint: disable=g-import-not-at-top
  try:
    report = tokenizer_train.train_and_evaluate(config, main_lib.workdir())
  except (configuration.ConfigError, sharding.MeshError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if report.get("preempted"):
    print(f"preempted: checkpoint saved at step {report['step']}; rerun the same command to resume")
    return
  v = report["val"]
  print(f"tokenizer at step {report['step']}: val PSNR {v['psnr']:.2f} dB, codebook usage {v['usage']:.1%}, "
        f"code perplexity {v['perplexity']:.1f}; report: {main_lib.workdir()}/report.html")


if __name__ == "__main__":
  app.run(main, flags_parser=main_lib._parse_flags)  # pylint: disable=protected-access
