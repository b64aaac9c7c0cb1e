"""The main job: ``python -m unimm_jax.main --config=configs/shapes.py --workdir=runs/shapes``.

Trains on the configured data, checkpoints into ``WORKDIR/checkpoints``, validates, and writes
``WORKDIR/report.json``. Run the same command again and it resumes from the newest checkpoint. Any config field
can be overridden on the command line: ``--config.model.num_layers=4 --config.train.steps=500``.

``--dry_run`` sizes the run without allocating it (``unimm_jax/dry_run.py``); ``--dry_run_devices=N`` does so for
N devices you do not have (a TPU slice, from a laptop).

Multi-process (several hosts, or several processes on one): JAX's distributed runtime is started when
``--coordinator_address`` (or ``JAX_COORDINATOR_ADDRESS``) is given, with ``--num_processes`` / ``--process_id``
(or ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``), or with ``--distributed`` alone on a Cloud TPU pod, whose
runtime knows the rest (and under SLURM or Open MPI, whose environment ``jax.distributed`` reads itself). Only process 0 logs at INFO and writes reports and TensorBoard; checkpoints are written
by all processes together.

Compiled programs are kept in JAX's persistent compilation cache (``train.compilation_cache``, default
``WORKDIR/compilation_cache``), so the same command run again, a resume above all, loads them instead of
compiling them: :func:`unimm_jax.compilation_cache.enable`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from unimm_jax import compilation_cache, configuration

def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, tokenizers, TensorBoard and report.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the parameter count and per-device memory of the train "
                             "state under the mesh, and the ten largest arrays; allocate and train nothing.")
_DRY_RUN_DEVICES = flags.DEFINE_integer("dry_run_devices", 0, "Size the dry run for this many devices "
                                        "(default: the devices here).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Start jax.distributed even without a coordinator address "
                                 "(Cloud TPU pods).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                                   "host:port of process 0 for jax.distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", _env_int("JAX_NUM_PROCESSES"), "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", _env_int("JAX_PROCESS_ID"), "This process's index.")
_REQUIRED = {"config": "a config file, e.g. --config=configs/shapes.py",
             "workdir": "the run's directory for checkpoints and reports, e.g. --workdir=runs/shapes"}


def _parse_flags(argv):
  """absl flag parsing, with a one-line error (not a traceback or a usage screen) for a missing flag or a bad
  ``--config.*`` override."""
  try:
    argv = flags.FLAGS(argv)
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
  missing = [name for name in _REQUIRED if flags.FLAGS[name].value is None]
  if missing:
    print("error: " + "; ".join(f"--{name} is required: {_REQUIRED[name]}" for name in missing), file=sys.stderr)
    sys.exit(2)
  return argv


def start(argv):
  """The start-up every entry point with these flags shares (``main`` and ``tokenizer_main``); returns the config.

  Rejects stray arguments; validates the config (one message and exit 2 for a user error, before anything
  compiles); splits the CPU and tunes the host allocator (``configuration.prepare_host``, before JAX starts
  its backend); opens the persistent compilation cache (before the first compile; not for a dry run, which
  compiles nothing worth keeping); joins the distributed run when asked; quiets the processes other than 0.
  """
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)", file=sys.stderr)
    sys.exit(2)
  logging.set_verbosity(logging.INFO)
  config = _CONFIG.value
  try:
    configuration.validate(config)
  except configuration.ConfigError as e:
    # One clear message, before anything is compiled; no traceback for a user error.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  configuration.prepare_host(config)
  # pylint: disable=g-import-not-at-top  (imported here so --help and config errors are fast)
  import jax
  cache = None if _DRY_RUN.value else compilation_cache.enable(config.train.compilation_cache, _WORKDIR.value)
  from unimm_jax import sharding
  if _COORDINATOR.value or _DISTRIBUTED.value:
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  if not _DRY_RUN.value:
    logging.info("compilation cache: %s", cache or "off (train.compilation_cache)")
  return config


def workdir() -> str:
  """The ``--workdir`` flag's value (for entry points sharing these flags)."""
  return _WORKDIR.value


def main(argv):
  config = start(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from unimm_jax import sharding  # pylint: disable=g-import-not-at-top
  if _DRY_RUN.value:
    from unimm_jax import dry_run
    try:
      print(dry_run.format_plan(dry_run.plan(config, _WORKDIR.value, _DRY_RUN_DEVICES.value or None)))
    except (configuration.ConfigError, sharding.MeshError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    return
  from unimm_jax import evaluate, train
  try:
    report = train.train_and_evaluate(config, _WORKDIR.value)
  except (sharding.MeshError, configuration.ConfigError) as e:   # e.g. an init.from that does not fit
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if report.get("preempted"):
    print(f"preempted: checkpoint saved at step {report['step']}; rerun the same command to resume")
    return
  if report.get("generation_step") == report["step"]:
    return
  if jax.process_count() > 1:
    # The sampler runs on one device; a multi-host job leaves generation scoring to one host afterwards.
    logging.info("generation report: run `python -m unimm_jax.evaluate --workdir=%s` on one host", _WORKDIR.value)
  else:
    evaluate.evaluate_workdir(_WORKDIR.value, config)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
