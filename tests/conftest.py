"""Test set-up: CPU only, quiet JAX, and one persistent compilation cache per test session.

Many tests start fresh JAX processes (fake-device meshes, several processes, kill-and-resume) that compile the same
tiny programs again; a cache directory shared by the session's processes (inherited through the environment) lets
each program compile once. It lives in a new temporary directory, so no state is carried between sessions. Every
process compiles with LLVM's cheap settings, since compiling is most of what the tests spend.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="unimm_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The tests' programs are tiny, so compiling them, not running them, is most of the suite's time: LLVM's cheap
# settings compile them about 3x faster (test_compilation_cache measures it) and give the same results to float
# rounding. Child processes inherit the flags; scripts that add fake devices append to them.
CHEAP_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CHEAP_COMPILE_FLAGS).strip()
