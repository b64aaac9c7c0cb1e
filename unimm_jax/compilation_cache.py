"""JAX's persistent compilation cache for the main job (``train.compilation_cache``).

Compiled programs are kept, by default in ``WORKDIR/compilation_cache``, so the same command run again, a resume
after preemption above all, loads them instead of compiling them. A module of its own (not ``main``, whose
import defines the command's global flags) so tools and tests can use it.
"""

from __future__ import annotations

import os
from typing import Mapping

from unimm_jax import storage


# Programs that compile in less than this are not written to the persistent cache; JAX's default is 1 s. The
# main job on CPU (configs/shapes.py shrunk to the tests' one 32-wide layer, 2 busy cores) compiles its train
# step in 16 s, validation in 6-9 s and the samplers in 4-7 s; the other 59 of its 66 programs (slices, casts,
# RNG folds) take 0.04-0.3 s, a few gs:// round trips, so keeping them saves next to nothing. Half of JAX's
# default still keeps every program that matters on a host that compiles several times faster.
CACHE_MIN_COMPILE_S = 0.5


def directory(setting: str, workdir: str, environ: Mapping[str, str] = os.environ) -> str | None:
  """``train.compilation_cache`` -> the directory of JAX's persistent compilation cache, or None (off).

  ``auto``: ``$JAX_COMPILATION_CACHE_DIR`` when the environment sets one (a cache shared by several runs: a test
  session, a sweep), else ``WORKDIR/compilation_cache``, beside the checkpoints, so the rerun that resumes a run
  (a preempted slice recreated by ``launch.tpu watch``, a requeued SLURM job) finds it. ``gs://`` works: JAX
  reads and writes its cache through etils.epath, like the rest of the workdir. ``none`` or ``''``: off. Any
  other value is the directory (``~`` expanded); local paths are made absolute, as the workdir's are for Orbax.
  """
  setting = setting.strip()
  if setting.lower() in ("", "none"):
    return None
  if setting == "auto":
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
      return environ["JAX_COMPILATION_CACHE_DIR"]
    return str(storage.absolute_path(workdir) / "compilation_cache")
  return str(storage.absolute_path(os.path.expanduser(setting)))


def enable(setting: str, workdir: str) -> str | None:
  """Points JAX's persistent compilation cache at :func:`directory`; returns it (None: off).

  Must run before the first compile: JAX opens the cache once, at its first compile, and keeps that choice.
  Written: every program that took at least :data:`CACHE_MIN_COMPILE_S` to compile, whatever its size (-1: no
  size bound, and none that JAX's backend may substitute for the default 0); the environment's
  ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` / ``JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES`` win. Only
  process 0 writes (JAX's rule); every process reads. On a remote directory (``gs://``) XLA's own GPU autotune
  cache, which JAX would place beside it, stays off: XLA opens that path itself, not through epath.
  """
  import jax  # pylint: disable=g-import-not-at-top
  path = directory(setting, workdir)
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
  if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  if "://" in path:
    jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
  return path
