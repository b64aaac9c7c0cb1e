"""N processes of one job on this machine: ``python -m launch.local --processes=2 -- python -m unimm_jax.main ...``.

The same multi-host code path as a TPU pod or a SLURM cluster (``jax.distributed``, each process reading its
rows of every global batch, collective checkpoints), on a laptop. Each process gets what the main job reads to
start ``jax.distributed``: ``JAX_COORDINATOR_ADDRESS`` (127.0.0.1 and a free port), ``JAX_NUM_PROCESSES`` and its
own ``JAX_PROCESS_ID``; with ``--cpu_devices=K`` also K fake CPU devices of its own
(``--xla_force_host_platform_device_count``), so a 2-process run has a real multi-device mesh per process.

Every output line is prefixed with ``[pI]``. The launcher exits with the first non-zero status of a process,
and then stops the others (a process whose peer died would wait for it in a collective until the distributed
runtime's timeout); after ``--timeout_s`` it stops them all and exits 124. SIGINT/SIGTERM to the launcher are
passed on, so the job checkpoints and stops as it would on a preempted host.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

TIMEOUT_STATUS = 124


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(index: int, count: int, port: int, cpu_devices: int = 0, base: dict | None = None) -> dict:
  """The environment of process ``index`` of ``count``: the jax.distributed variables, fake CPU devices."""
  env = dict(os.environ if base is None else base)
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
             JAX_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")
  if cpu_devices:
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
  return env


def _pump(index: int, stream, lock: threading.Lock) -> None:
  for line in iter(stream.readline, ""):
    with lock:
      sys.stdout.write(f"[p{index}] {line}")
      sys.stdout.flush()
  stream.close()


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
  """SIGTERM to each running process group (ours: each process leads its own), SIGKILL after ``grace_s``."""
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGTERM)
      except ProcessLookupError:
        pass
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()


def launch(command: Sequence[str], processes: int, *, timeout_s: float = 0, cpu_devices: int = 0,
           grace_s: float = 30.0, port: int | None = None) -> int:
  """Runs ``command`` as ``processes`` jax.distributed processes; returns 0, the first failure, or 124."""
  if processes < 1 or not command:
    raise ValueError(f"need a command and processes >= 1, got {list(command)!r} and {processes}")
  port = port or free_port()
  print(f"launch.local: {processes} processes, coordinator 127.0.0.1:{port}: {' '.join(command)}", flush=True)
  lock = threading.Lock()
  procs, pumps = [], []
  for i in range(processes):
    p = subprocess.Popen(list(command), env=process_env(i, processes, port, cpu_devices), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    procs.append(p)
    pumps.append(threading.Thread(target=_pump, args=(i, p.stdout, lock), daemon=True))
    pumps[-1].start()

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signum)
  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  deadline = time.monotonic() + timeout_s if timeout_s else None
  status = None
  try:
    while status is None:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, status = failed[0]
        print(f"launch.local: process {i} exited with status {status}; stopping the others", flush=True)
      elif all(c == 0 for c in codes):
        status = 0
      elif deadline is not None and time.monotonic() > deadline:
        print(f"launch.local: timeout after {timeout_s:.0f} s; stopping all processes", flush=True)
        status = TIMEOUT_STATUS
      else:
        time.sleep(0.2)
  finally:
    _stop(procs, grace_s)
    for t in pumps:
      t.join(timeout=5)
    for s, handler in previous.items():
      signal.signal(s, handler)
  return status


def _cli():
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  processes = flags.DEFINE_integer("processes", 2, "Number of processes.")
  timeout = flags.DEFINE_float("timeout_s", 0, "Stop everything after this many seconds (0: no limit).")
  cpu_devices = flags.DEFINE_integer("cpu_devices", 0, "Fake CPU devices per process (0: leave XLA_FLAGS).")
  port = flags.DEFINE_integer("port", 0, "Coordinator port (0: a free one).")

  def main(argv):
    command = argv[1:]
    if command[:1] == ["--"]:
      command = command[1:]
    if not command:
      raise app.UsageError("usage: python -m launch.local --processes=N -- python -m unimm_jax.main --config=... "
                           "--workdir=...")
    sys.exit(launch(command, processes.value, timeout_s=timeout.value, cpu_devices=cpu_devices.value,
                    port=port.value or None))

  app.run(main)


if __name__ == "__main__":
  _cli()
