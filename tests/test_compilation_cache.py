"""The main job's persistent compilation cache (``train.compilation_cache``, unimm_jax/compilation_cache.py): where
it goes, that the main job fills it before its first compile, that a second process loads the programs from it, and that
a ``gs://`` workdir holds it. The evidence of a load is JAX's own: its "Persistent compilation cache hit" log line
and its ``/jax/compilation_cache/cache_hits`` event, never a timing.

Each run is a fresh process with none of the session cache's variables (conftest.py), so the job's own setting
is what counts.
"""

import json
import os
import re
import subprocess
import sys

from unimm_jax import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
_HIT = re.compile(r"Persistent compilation cache hit for '[^']*' with key '([^']+)'")


def _env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "XLA_FLAGS")}
  return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _entries(cache_dir):
  """The cache keys stored in a local cache directory (JAX names each entry KEY-cache)."""
  return {n[:-len("-cache")] for n in os.listdir(cache_dir) if n.endswith("-cache")}


def test_cache_directory_of_each_setting():
  assert compilation_cache.directory("auto", "runs/a", {}) == os.path.abspath("runs/a/compilation_cache")
  assert compilation_cache.directory("auto", "gs://bucket/runs/a", {}) == "gs://bucket/runs/a/compilation_cache"
  # A cache the environment names (a test session, a sweep) is kept by auto, not by an explicit setting.
  assert compilation_cache.directory("auto", "runs/a", {"JAX_COMPILATION_CACHE_DIR": "/shared/c"}) == "/shared/c"
  assert compilation_cache.directory("/tmp/c", "runs/a", {"JAX_COMPILATION_CACHE_DIR": "/shared/c"}) == "/tmp/c"
  assert compilation_cache.directory("gs://b/c", "runs/a", {}) == "gs://b/c"
  assert compilation_cache.directory("~/c", "runs/a", {}) == os.path.expanduser("~/c")
  for off in ("none", "None", "", " "):
    assert compilation_cache.directory(off, "runs/a", {"JAX_COMPILATION_CACHE_DIR": "/shared/c"}) is None


def test_main_job_fills_the_workdir_cache_and_a_second_run_loads_every_program_from_it(tmp_path):
  # The tiny main job of test_launch's two-process run: one step, one device, one sampler step. Both runs compile
  # with LLVM's cheap settings (flags are part of the cache key, so both use the same): 3x less compile time.
  overrides = {"model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2, "model.head_dim": 16,
               "model.mlp_dim": 64, "train.steps": 1, "train.batch_size": 16, "optim.warmup_steps": 0,
               "eval.batch_size": 32, "data.val_size": 32, "data.train_size": 2000, "data.fit_examples": 200,
               "train.log_every": 1, "ckpt.every_steps": 1, "eval.num_generate": 4, "mesh.cpu_devices": 1,
               "sample.t2i_steps": 1, "sample.i2t_steps": 1, "sample.joint_steps": 1}
  env = _env(JAX_DEBUG_LOG_MODULES="jax._src.compiler",
             XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

  def run(workdir, *extra):
    proc = subprocess.run([sys.executable, "-m", "unimm_jax.main", "--config=configs/shapes.py",
                           f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items()), *extra],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr

  # First run, default setting: the cache is WORKDIR/compilation_cache, filled from nothing.
  cache = tmp_path / "a" / "compilation_cache"
  log = run(tmp_path / "a")
  assert f"compilation cache: {cache}" in log
  assert not _HIT.findall(log)
  written = _entries(cache)
  assert written and any(key.startswith("jit_wrapped-") for key in written), sorted(written)
  # Second run, another workdir pointed at that cache: every program the first run wrote is loaded, not
  # compiled (the same config compiles the same programs), and nothing goes to the new workdir.
  log = run(tmp_path / "b", f"--config.train.compilation_cache={cache}")
  assert f"compilation cache: {cache}" in log
  hits = set(_HIT.findall(log))
  assert written <= hits, sorted(written - hits)
  assert not (tmp_path / "b" / "compilation_cache").exists()


_PROBE = f"""
import json, sys
sys.path.insert(0, {TESTS!r})
from fake_gcs import fake_gcs
setting, workdir, root = sys.argv[1:]
with fake_gcs(root):
  from unimm_jax import compilation_cache
  path = compilation_cache.enable(setting, workdir)   # what the main job's start-up does
  import jax, jax.numpy as jnp
  hits = []
  jax.monitoring.register_event_listener(
      lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
  jax.jit(lambda a: jnp.tanh(a @ a.T).sum())(jnp.ones((64, 64))).block_until_ready()
print(json.dumps({{"path": path, "hits": len(hits)}}))
"""


def test_cache_on_a_gs_workdir_and_off(tmp_path):
  """Through epath on the fake Cloud Storage of test_storage: written under gs://WORKDIR/compilation_cache by
  one process, every entry loaded by the next; ``none`` writes and loads nothing. The probe's programs compile
  in milliseconds, so the environment's minimum compile time (0, which the job must not override) lets them in."""
  store = tmp_path / "store"

  def probe(setting, workdir):
    proc = subprocess.run([sys.executable, "-c", _PROBE, setting, workdir, str(store)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=_env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

  first = probe("auto", "gs://bucket/runs/a")
  assert first == {"path": "gs://bucket/runs/a/compilation_cache", "hits": 0}
  written = _entries(store / "bucket" / "runs" / "a" / "compilation_cache")   # the function, jnp.ones' two
  assert any(key.startswith("jit__lambda-") for key in written), written
  assert probe("auto", "gs://bucket/runs/a") == {"path": "gs://bucket/runs/a/compilation_cache",
                                                 "hits": len(written)}
  assert probe("none", "gs://bucket/runs/b") == {"path": None, "hits": 0}
  assert not (store / "bucket" / "runs" / "b").exists()
