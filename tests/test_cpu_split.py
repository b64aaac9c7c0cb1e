"""The CPU split (``mesh.cpu_devices=2``) survives a host loop that runs far ahead, on a machine that is busy.

XLA's CPU client deadlocks N fake devices when its thread pool has fewer than 2N threads and a device has 32 steps
in flight; ``configuration.reserve_cpu_client_threads`` sizes the pool (BENCHMARKS.md, "CPU split under load").
Each run is a fresh process (the split must be set before JAX starts) with ``NPROC=2``, XLA's pool size on a
2-core machine, whatever this machine has.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from unimm_jax import configuration

HERE = os.path.dirname(os.path.abspath(__file__))
CORES = configuration.usable_cores()
STEPS = 120   # dispatched without a host sync: more than the 32 a device admits in flight

SPLIT_STEPS = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
from unimm_jax import configuration
configuration.split_cpu_devices(2)              # what main does for mesh.cpu_devices=2
import jax
import numpy as np
from test_train import tiny_config
from unimm_jax import sharding as sharding_lib, train_state
from unimm_jax.sequence import SequenceLayout
config = tiny_config(**{"model.head_dim": 8, "model.num_heads": 4, "model.mlp_dim": 64, "train.batch_size": 32})
layout = SequenceLayout.two_segment(text_vocab=40, image_vocab=64, text_len=8, image_grid=(4, 4))
method = train_state.make_step_inputs(config, layout)
mesh, rules = sharding_lib.make_mesh(config.mesh.shape), sharding_lib.rules_of(config)
_, shardings = train_state.state_shardings(method, mesh, rules)
state = train_state.init_state(method, config.seed, mesh, rules)
step_fn, _ = train_state.compile_steps(method, mesh, rules, shardings)
rng = np.random.default_rng(0)
tokens = layout.pack({"text": rng.integers(0, 40, (32, 8)), "image": rng.integers(0, 64, (32, 16))}).astype(np.int32)
batch = {"tokens": sharding_lib.global_array(tokens, sharding_lib.batch_sharding(mesh))}
state, metrics = step_fn(state, batch)
float(metrics["loss"])                          # compiled, one step done
print("ready", flush=True)
sys.stdin.readline()                            # the test has loaded the cores
losses = []
for _ in range(int(sys.argv[2])):
  state, metrics = step_fn(state, batch)        # no sync: the host runs ahead, as between two log lines
  losses.append(metrics["loss"])
losses = [float(x) for x in jax.device_get(losses)]
print(json.dumps({"steps": len(losses), "finite": all(np.isfinite(losses)), "devices": jax.device_count(),
                  "nproc": os.environ.get("NPROC")}), flush=True)
'''


ALL_REDUCE = r'''
import os, sys
from unimm_jax import configuration
os.environ["XLA_FLAGS"] = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=1 "
                           "--xla_cpu_collective_call_terminate_timeout_seconds=4")   # a deadlock ends in 5 s
if sys.argv[1] == "split":
  configuration.split_cpu_devices(2)   # the two devices and the threads they need
else:                                  # the same two devices on XLA's own pool
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false"
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((2,), ("data",))
w = jax.device_put(jnp.eye(256) * 0.5, NamedSharding(mesh, P()))
x = jax.device_put(jnp.ones((64, 256)), NamedSharding(mesh, P("data")))
step = jax.jit(lambda w, x: w - 0.01 * jax.grad(lambda w: jnp.mean(jnp.tanh(jnp.tanh(x @ w) @ w) ** 2))(w))
for _ in range(int(sys.argv[2])):
  w = step(w, x)   # a replicated weight's gradient over a split batch: one all-reduce a step, no host sync
print(float(w.sum()), flush=True)
'''


def _env():
  """This environment for a fresh JAX process on 2 devices, with XLA's pool size of a 2-core machine."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "NPROC": "2"}
  env.pop("XLA_FLAGS", None)
  return env


@pytest.mark.exclusive
def test_the_split_step_runs_far_ahead_on_two_loaded_cores_and_finishes():
  """The real train step on ``mesh.cpu_devices=2``, STEPS dispatched at once while 4 processes spin on the 2 cores
  (started once it has compiled: the compile is not what is tested)."""
  proc = subprocess.Popen([sys.executable, "-c", SPLIT_STEPS, HERE, str(STEPS)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
  load, deadline = [], time.monotonic() + 150
  try:
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read()[-3000:] if proc.poll() is not None else "")
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(4)]
    out, err = proc.communicate("go\n", timeout=max(1.0, deadline - time.monotonic()))
  finally:
    for p in load:
      p.kill()
      p.wait()
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == 0, f"exit {proc.returncode}:\n{err[-3000:]}"
  got = json.loads(out.strip().splitlines()[-1])
  assert got == {"steps": STEPS, "finite": True, "devices": 2, "nproc": str(max(4, CORES))}


@pytest.mark.exclusive
@pytest.mark.parametrize("mode", ["xla_pool", "split"])
def test_two_devices_on_two_pool_threads_deadlock_and_the_split_reserves_enough(mode):
  """The reason for the reservation, kept as a canary: the smallest all-reduce step, 200 dispatched at once, aborts
  on XLA's 2-thread pool and finishes on the split's. When ``xla_pool`` fails, XLA no longer deadlocks there and
  ``reserve_cpu_client_threads`` can go."""
  proc = subprocess.run([sys.executable, "-c", ALL_REDUCE, mode, "200"], capture_output=True, text=True,
                        timeout=120, env=_env())
  if mode == "split":
    assert proc.returncode == 0, proc.stderr[-3000:]
  else:
    assert proc.returncode == -6 and "Termination timeout" in proc.stderr, (proc.returncode, proc.stderr[-3000:])
    assert "only 1 of them arrived on time" in proc.stderr


@pytest.mark.parametrize("flags, nproc, want", [
    ("--xla_force_host_platform_device_count=2", None, max(4, CORES)),
    ("--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false", "2", max(16, CORES)),
    ("--xla_force_host_platform_device_count=2", "64", 64),        # a larger NPROC is the user's
    ("--xla_force_host_platform_device_count=1", None, None),      # one device needs no reservation
    ("", None, None),
])
def test_the_reservation_is_two_threads_per_device_at_least(monkeypatch, flags, nproc, want):
  monkeypatch.setenv("XLA_FLAGS", flags)
  if nproc is None:
    monkeypatch.delenv("NPROC", raising=False)
  else:
    monkeypatch.setenv("NPROC", nproc)
  assert configuration.reserve_cpu_client_threads() == (want or 0)
  assert os.environ.get("NPROC") == (str(want) if want else nproc)


def test_the_split_reserves_the_threads_also_when_a_launcher_set_the_devices(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")   # launch.local --cpu_devices=2
  monkeypatch.setenv("NPROC", "2")
  configuration.split_cpu_devices(2)
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"   # left as it was
  assert int(os.environ["NPROC"]) >= 4
