"""Trains the learned image tokenizer: ``python -m unimm_jax.tokenizer_main --config=configs/tokenizer_shapes.py
--workdir=runs/tok_shapes``.

The same flags as the main job (``unimm_jax.main``: config overrides, ``--distributed`` and the coordinator
flags, ``mesh.cpu_devices``); the work is ``unimm_jax.tokenizer_train.train_and_evaluate``. Rerun the same
command to resume. When it finishes, ``WORKDIR`` holds the tokenizer, which the unified model uses with
``--config.image.tokenizer=fsq --config.image.tokenizer_path=WORKDIR`` (or ``vq``).
"""

from __future__ import annotations

import sys

from absl import app, logging

from unimm_jax import configuration
from unimm_jax import main as main_lib   # its flags (--config, --workdir, distributed) are this tool's flags


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if main_lib._DRY_RUN.value:  # pylint: disable=protected-access
    raise app.UsageError("--dry_run sizes the unified model; the tokenizer trainer has none")
  logging.set_verbosity(logging.INFO)
  config = main_lib._CONFIG.value  # pylint: disable=protected-access
  try:
    configuration.validate(config)
  except configuration.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  configuration.split_cpu_devices(config.mesh.cpu_devices)
  # pylint: disable=g-import-not-at-top
  import jax
  from unimm_jax import sharding, tokenizer_train
  if main_lib._COORDINATOR.value or main_lib._DISTRIBUTED.value:  # pylint: disable=protected-access
    sharding.initialize_distributed(main_lib._COORDINATOR.value, main_lib._NUM_PROCESSES.value,  # pylint: disable=protected-access
                                    main_lib._PROCESS_ID.value)  # pylint: disable=protected-access
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  try:
    report = tokenizer_train.train_and_evaluate(config, main_lib._WORKDIR.value)  # pylint: disable=protected-access
  except (configuration.ConfigError, sharding.MeshError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  v = report["val"]
  print(f"tokenizer at step {report['step']}: val PSNR {v['psnr']:.2f} dB, codebook usage {v['usage']:.1%}, "
        f"code perplexity {v['perplexity']:.1f}; report: {main_lib._WORKDIR.value}/report.html")  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main, flags_parser=main_lib._parse_flags)  # pylint: disable=protected-access
