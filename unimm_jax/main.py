"""The main job: ``python -m unimm_jax.main --config=configs/shapes.py --workdir=runs/shapes``.

Trains on the configured data, checkpoints into ``WORKDIR/checkpoints``, validates, and writes
``WORKDIR/report.json``. Run the same command again and it resumes from the newest checkpoint. Any config field
can be overridden on the command line: ``--config.model.num_layers=4 --config.train.steps=500``.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from unimm_jax import configuration

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, tokenizers, TensorBoard and report.")
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv):
  """absl flag parsing, with a one-line error (not a traceback) for a bad ``--config.*`` override."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (config_flags raises several types)
    known = configuration.flat_field_names()
    for arg in argv[1:]:
      if arg.startswith("--config.") and "=" in arg:
        name = arg[len("--config."):].split("=", 1)[0]
        if name not in known:
          print(f"error: {configuration.unknown_field_message(name)}", file=sys.stderr)
          sys.exit(2)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  config = _CONFIG.value
  try:
    configuration.validate(config)
  except configuration.ConfigError as e:
    # One clear message, before anything is compiled; no traceback for a user error.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  # pylint: disable=g-import-not-at-top  (imported here so --help and config errors are fast)
  import jax
  from unimm_jax import evaluate, train
  report = train.train_and_evaluate(config, _WORKDIR.value)
  if jax.process_index() == 0 and report.get("generation_step") != report["step"]:
    evaluate.evaluate_workdir(_WORKDIR.value, config)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
