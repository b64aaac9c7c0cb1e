"""Test set-up: CPU only, quiet JAX, one persistent compilation cache per test session, and tests that run alone.

Many tests start fresh JAX processes (fake-device meshes, several processes, kill-and-resume) that compile the same
tiny programs again; a cache directory shared by the session's processes (inherited through the environment) lets
each program compile once. It lives in a new temporary directory, so no state is carried between sessions. Every
process compiles with LLVM's cheap settings, since compiling is most of what the tests spend.

The suite runs in one pytest worker per core (pytest-xdist, ``-n auto`` in ``pyproject.toml``; at most
``MAX_WORKERS``): a tiny program's compile is single-threaded, so two workers on two cores finish sooner than one.
Tests marked ``exclusive`` (several JAX processes joined by Gloo, whose 30 s key-value deadline a loaded core can
miss, or timings taken under a load the test sets up itself) run while no other worker runs a test: every test
holds a shared lock from its setup to its teardown, an exclusive test the lock alone (``run_alone.RunAlone``).
"""

import atexit
import os
import shutil
import tempfile

import pytest

from run_alone import RunAlone


def _session_dir(variable, prefix):
  """A new temporary directory in ``os.environ[variable]``, removed at exit, unless the variable is already set.

  The controller imports this file before its pytest-xdist workers start; they inherit the variable and so share
  the directory. A user's own ``variable`` (e.g. a cache directory of theirs) is used as it is and kept.
  """
  if variable not in os.environ:
    path = tempfile.mkdtemp(prefix=prefix)
    os.environ[variable] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)


os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_session_dir("JAX_COMPILATION_CACHE_DIR", "unimm_jax_test_xla_cache_")
# The locks of run_alone.RunAlone (kept apart from the cache, which a user may point at a directory of their own).
_session_dir("UNIMM_JAX_TEST_LOCKS", "unimm_jax_test_locks_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The tests' programs are tiny, so compiling them, not running them, is most of the suite's time: LLVM's cheap
# settings compile them about 3x faster (test_compilation_cache measures it) and give the same results to float
# rounding. Child processes inherit the flags; scripts that add fake devices append to them.
CHEAP_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CHEAP_COMPILE_FLAGS).strip()

MAX_WORKERS = 4   # more workers than this buy little on a laptop and multiply the memory of JAX processes


def pytest_configure(config):
  config.addinivalue_line("markers", "exclusive: runs while no other pytest-xdist worker runs a test")


def pytest_xdist_auto_num_workers(config):   # pylint: disable=unused-argument
  from unimm_jax.configuration import usable_cores   # pylint: disable=import-outside-toplevel  (no JAX)
  return max(1, min(usable_cores(), MAX_WORKERS))


_LOCK = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):   # pylint: disable=unused-argument
  """Setup, call and teardown of each test (module fixtures included) under the lock, in a pytest-xdist worker."""
  global _LOCK   # pylint: disable=global-statement
  if "PYTEST_XDIST_WORKER" not in os.environ:
    yield
    return
  if _LOCK is None:
    _LOCK = RunAlone(os.environ["UNIMM_JAX_TEST_LOCKS"])
  with _LOCK.hold(exclusive=item.get_closest_marker("exclusive") is not None):
    yield
