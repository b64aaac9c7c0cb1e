"""Cloud TPU VM slices from one command: ``python -m launch.tpu {create,setup,run,watch,delete} [flags] [-- MAIN ARGS]``.

    python -m launch.tpu create --name=unimm --zone=us-west4-a --accelerator_type=v5litepod-8 --spot
    python -m launch.tpu setup  --name=unimm --zone=us-west4-a --accelerator_type=v5litepod-8
    python -m launch.tpu run    --name=unimm --zone=us-west4-a --accelerator_type=v5litepod-8 -- \\
        --config=configs/shapes.py --workdir=gs://BUCKET/runs/shapes
    python -m launch.tpu watch  ...same flags as run...     # recreate a preempted slice, rerun, resume
    python -m launch.tpu delete --name=unimm --zone=us-west4-a

Everything after ``--`` is passed to ``python -m unimm_jax.main`` on every worker. ``--dry_run`` prints the exact
``gcloud`` commands (one per line, shell-quoted, ready to paste) and runs nothing.

Why these pieces:

* **Queued resources** (``gcloud compute tpus queued-resources create``) rather than ``tpu-vm create``: capacity,
  spot capacity above all, is granted when available instead of failing, and one ``delete --force`` removes the
  request and its node together.
* **One command for all workers** (``--worker=all``): a multi-host slice runs the same program on every host;
  JAX's TPU runtime tells each process its id and the coordinator, so the main job only needs ``--distributed``
  (added when the slice has more than one host).
* **Background job, streamed log, exit file**: the job runs under ``nohup`` on each worker, so a dropped SSH
  connection does not kill it. Its exit status is written to ``~/unimm_run/exit`` when it ends; ``run`` follows
  worker 0's log until that file appears, then reads every worker's status and exits non-zero if any failed.
* **A gs:// workdir**: a worker's disk disappears with a preempted slice; checkpoints, TensorBoard events and the
  report must outlive it. ``watch`` relies on this: after a preemption it recreates the slice and runs the
  *same* command, which resumes from the newest checkpoint (the lifecycle issue makes the resumed run continue
  exactly).
* **Collective-overlap flags for libtpu** (:data:`LIBTPU_FLAGS`): the job's ``LIBTPU_INIT_ARGS`` is MaxText's set
  that overlaps the data-parallel all-reduce and the FSDP all-gathers with compute. ``--libtpu_init_args=...``
  replaces the set (``--libtpu_init_args=`` sends none); ``--env=LIBTPU_INIT_ARGS=...`` is added to it, and a flag
  named there replaces the table's value of that flag (:func:`job_env`).

The command builders are pure functions of a :class:`Slice` (tests/test_launch.py checks them for single- and
multi-host slices); :func:`watch` takes the function that runs a command, so its recovery logic is tested with
a scripted stand-in for gcloud.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Sequence

REMOTE_DIR = "~/unimm_jax"          # where setup unpacks the tree on every worker
RUN_DIR = "~/unimm_run"             # log and exit status of the job on every worker
LOG_FILE = f"{RUN_DIR}/log"
EXIT_FILE = f"{RUN_DIR}/exit"
ARCHIVE = "unimm_jax.tar.gz"
# Queued-resource states (``state.state``) after which the slice will not run the job again.
GONE_STATES = ("SUSPENDED", "SUSPENDING", "FAILED", "DELETING", "NOT_FOUND")
ACTIVE_STATE = "ACTIVE"

# LIBTPU_INIT_ARGS of the job: MaxText's collective-overlap flags (AI-Hypercomputer/maxtext at e591f30, 2026-08-22:
# benchmarks/xla_flags_library.py DATA_PARALLEL_OVERLAP + CF_FOR_ALL_GATHER, exported as one line by every
# src/maxtext/configs/tpu/v5e/*.sh; its v5p/*.sh add the megacore rows). Descriptions are MaxText's
# (src/maxtext/configs/README.md, "XLA flags used by MaxText"). Rows: (flag=value, TPU families (None: every one),
# why). libtpu is not installed here, so these names are checked against MaxText's current use, not a parser.
LIBTPU_FLAGS: tuple[tuple[str, tuple[str, ...] | None, str], ...] = (
    # DATA_PARALLEL_OVERLAP: the gradient all-reduce of data parallelism (over DCN on multi-slice) overlaps the
    # backward pass instead of following it.
    ("--xla_tpu_enable_data_parallel_all_reduce_opt=true", None, "more overlap for data-parallel all-reduces"),
    ("--xla_tpu_data_parallel_opt_different_sized_ops=true", None,
     "pipeline data-parallel ops across iterations even when their output sizes differ (more memory pressure)"),
    # CF_FOR_ALL_GATHER (continuation fusion): FSDP's parameter all-gathers run inside the compute fusions
    # scheduled between their start and done, so the next layer's weights arrive while this one computes.
    ("--xla_tpu_enable_async_collective_fusion=true", None,
     "fuse async collectives with the compute scheduled between their -start and -done"),
    ("--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true", None, "all-gathers included in that fusion"),
    ("--xla_tpu_enable_async_collective_fusion_multiple_steps=true", None,
     "one collective continued over several fusions"),
    ("--xla_tpu_overlap_compute_collective_tc=true", None, "compute and communication overlap on one TensorCore"),
    ("--xla_enable_async_all_gather=true", None, "all-gathers asynchronous (the implementation chosen by the rows "
     "above)"),
    # Megacore chips (v4, v5p: two TensorCores acting as one): two more rows that every MaxText v5p config sets
    # next to the rows above.
    ("--xla_tpu_megacore_fusion_allow_ags=false", ("v4", "v5p"),
     "no all-gathers fused with convolutions/all-reduces in megacore fusions"),
    ("--xla_enable_async_collective_permute=true", ("v4", "v5p"), "collective-permutes asynchronous"),
)


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU VM slice, as gcloud names it."""

  name: str
  zone: str
  accelerator_type: str = "v5litepod-8"
  runtime_version: str = "v2-alpha-tpuv5-lite"
  project: str | None = None
  spot: bool = False

  @property
  def workers(self) -> int:
    return hosts_of(self.accelerator_type)


def _family_and_size(accelerator_type: str) -> tuple[str, int]:
  m = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator_type)
  if not m:
    raise ValueError(f"--accelerator_type={accelerator_type!r} is not a known TPU type (e.g. v4-8, v5p-16, "
                     "v5litepod-8, v6e-16)")
  return m.group(1), int(m.group(2))


def hosts_of(accelerator_type: str) -> int:
  """Number of TPU VM hosts (workers) of an accelerator type.

  v2/v3/v4/v5p count TensorCores (8 per host: 4 chips of 2 cores on v4/v5p, 4 chips of 2 on v2/v3); v5e
  (``v5litepod``) and v6e count chips, with single-host slices up to 8 chips and 4 chips per host beyond.
  """
  family, n = _family_and_size(accelerator_type)
  if family in ("v5litepod", "v5e", "v6e"):
    return 1 if n <= 8 else n // 4
  return max(1, n // 8)


def default_libtpu_init_args(accelerator_type: str) -> str:
  """The rows of :data:`LIBTPU_FLAGS` for this accelerator type's family, space-separated."""
  family, _ = _family_and_size(accelerator_type)
  return " ".join(flag for flag, families, _ in LIBTPU_FLAGS if families is None or family in families)


def _flag_name(flag: str) -> str:
  return flag.split("=", 1)[0]


def job_env(accelerator_type: str, env: dict[str, str], libtpu_init_args: str | None = None) -> dict[str, str]:
  """The job's environment on every worker: ``env`` (the ``--env`` flags) with ``LIBTPU_INIT_ARGS`` composed.

  ``LIBTPU_INIT_ARGS`` = the defaults (``libtpu_init_args``, or :data:`LIBTPU_FLAGS` for this family when None;
  ``""`` for none) followed by the user's ``env["LIBTPU_INIT_ARGS"]``; a default whose flag the user names is
  dropped, so the user's value is the only one libtpu sees (whichever occurrence libtpu would keep).
  """
  defaults = default_libtpu_init_args(accelerator_type) if libtpu_init_args is None else libtpu_init_args
  user = env.get("LIBTPU_INIT_ARGS", "")
  named = {_flag_name(f) for f in user.split()}
  flags_ = [f for f in defaults.split() if _flag_name(f) not in named] + user.split()
  out = {k: v for k, v in env.items() if k != "LIBTPU_INIT_ARGS"}
  if flags_:
    out["LIBTPU_INIT_ARGS"] = " ".join(flags_)
  return out


def _gcloud(s: Slice, *args: str) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", *args, f"--zone={s.zone}"]
  return cmd + ([f"--project={s.project}"] if s.project else [])


def ssh(s: Slice, command: str, worker: str | int = "all") -> list[str]:
  """``gcloud ... tpu-vm ssh`` running ``command`` (one shell string) on ``worker`` ('all' or an index)."""
  return _gcloud(s, "tpu-vm", "ssh", s.name, f"--worker={worker}", f"--command={command}")


# ---------------------------------------------------------------------------------------------------------------
# Command builders (pure)
# ---------------------------------------------------------------------------------------------------------------
def create_commands(s: Slice) -> list[list[str]]:
  cmd = _gcloud(s, "queued-resources", "create", s.name, f"--node-id={s.name}",
                f"--accelerator-type={s.accelerator_type}", f"--runtime-version={s.runtime_version}")
  return [cmd + (["--spot"] if s.spot else [])]


def state_command(s: Slice) -> list[str]:
  """Prints the queued resource's state: WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, SUSPENDED, FAILED, ..."""
  return _gcloud(s, "queued-resources", "describe", s.name, "--format=value(state.state)")


def delete_commands(s: Slice) -> list[list[str]]:
  # --force deletes the node with the request; --quiet: no prompt (watch runs unattended).
  return [_gcloud(s, "queued-resources", "delete", s.name, "--force", "--quiet")]


def archive_command(repo: str, archive: str) -> list[str]:
  """The local tree (uncommitted changes included) without git history, runs and caches."""
  excludes = [f"--exclude={p}" for p in (".git", "runs", "__pycache__", "*.egg-info", ".venv", "venv")]
  return ["tar", "-czf", archive, *excludes, "-C", repo, "."]


def setup_commands(s: Slice, archive: str, pip_packages: Sequence[str] = ("jax[tpu]",)) -> list[list[str]]:
  """Copy the packed tree to every worker, unpack it and install the package there (the same on each)."""
  install = " ".join(shlex.quote(p) for p in (".[gcp]", *pip_packages))
  remote = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf ~/{ARCHIVE} -C {REMOTE_DIR} && "
            f"cd {REMOTE_DIR} && python3 -m pip install -q -U pip && python3 -m pip install -q -e {install}")
  scp = _gcloud(s, "tpu-vm", "scp", archive, f"{s.name}:~/{ARCHIVE}", "--worker=all")
  return [scp, ssh(s, remote)]


def main_command(s: Slice, main_args: Sequence[str]) -> list[str]:
  """``python3 -m unimm_jax.main ARGS`` (+ ``--distributed`` on a multi-host slice)."""
  args = list(main_args)
  if s.workers > 1 and "--distributed" not in args:
    args.append("--distributed")   # the TPU runtime gives jax.distributed the coordinator and process ids
  return ["python3", "-m", "unimm_jax.main", *args]


def check_workdir(main_args: Sequence[str], allow_local: bool = False) -> str:
  """The ``--workdir`` of the main args; a ValueError unless it is a ``gs://`` path (or ``allow_local``)."""
  workdirs = [a.split("=", 1)[1] for a in main_args if a.startswith("--workdir=")]
  if not workdirs:
    raise ValueError("the main job needs --workdir=gs://BUCKET/PATH after `--`")
  if not workdirs[-1].startswith("gs://") and not allow_local:
    raise ValueError(f"--workdir={workdirs[-1]} is on the worker's disk, which a preempted slice loses (and "
                     "each host would have its own); use gs://BUCKET/PATH, or --allow_local_workdir")
  return workdirs[-1]


def start_command(s: Slice, main_args: Sequence[str], env: dict[str, str]) -> list[str]:
  """Starts the job on every worker in the background; its exit status lands in EXIT_FILE when it ends.

  The environment (``env``) is set by ``env K=V`` in front of the job on each worker. PYTHONUNBUFFERED makes
  the log stream line by line.
  """
  variables = {"PYTHONUNBUFFERED": "1", **env}
  job = shlex.join(["env", *(f"{k}={v}" for k, v in variables.items()), *main_command(s, main_args)])
  inner = f"cd {REMOTE_DIR} && {job} > {LOG_FILE} 2>&1; echo $? > {EXIT_FILE}"
  return ssh(s, f"mkdir -p {RUN_DIR} && rm -f {EXIT_FILE} && nohup bash -c {shlex.quote(inner)} "
                "> /dev/null 2>&1 &")


def stream_command(s: Slice) -> list[str]:
  """Follows worker 0's log until the job has ended there, then exits with the job's status."""
  follow = (f"tail -n +1 -F {LOG_FILE} & T=$!; while [ ! -f {EXIT_FILE} ]; do sleep 5; done; sleep 2; "
            f"kill $T; exit $(cat {EXIT_FILE})")
  return ssh(s, follow, worker=0)


def status_commands(s: Slice) -> list[list[str]]:
  """One per worker: prints the job's exit status there, or 'running'."""
  return [ssh(s, f"cat {EXIT_FILE} 2>/dev/null || echo running", worker=w) for w in range(s.workers)]


def run_commands(s: Slice, main_args: Sequence[str], env: dict[str, str]) -> list[list[str]]:
  return [start_command(s, main_args, env), stream_command(s), *status_commands(s)]


# ---------------------------------------------------------------------------------------------------------------
# Running them
# ---------------------------------------------------------------------------------------------------------------
Runner = Callable[[list[str]], "tuple[int, str]"]   # argv -> (exit status, stdout)


def subprocess_runner(capture: bool) -> Runner:
  def run(argv: list[str]) -> tuple[int, str]:
    if capture:   # stdout; on failure stderr too (it says why, e.g. NOT_FOUND)
      proc = subprocess.run(argv, capture_output=True, text=True, check=False)
      return proc.returncode, proc.stdout if proc.returncode == 0 else proc.stdout + proc.stderr
    return subprocess.run(argv, check=False).returncode, ""   # streamed to this terminal
  return run


def print_runner(argv: list[str]) -> tuple[int, str]:
  print(shlex.join(argv))
  return 0, ""


def run_job(s: Slice, main_args, env, run: Runner, capture: Runner) -> int:
  """Starts the job, streams worker 0's log, returns 0 if every worker's job exited 0 (else the first failure)."""
  rc, _ = run(start_command(s, main_args, env))
  if rc:
    print(f"could not start the job on {s.name} (gcloud exit {rc})", file=sys.stderr)
    return rc
  streamed, _ = run(stream_command(s))
  statuses = []
  for w, cmd in enumerate(status_commands(s)):
    rc, out = capture(cmd)
    status = out.strip() if rc == 0 else f"unreachable (gcloud exit {rc})"
    statuses.append(status)
    print(f"worker {w}: {'exit ' + status if status.isdigit() else status}")
  codes = [int(x) for x in statuses if x.isdigit()]
  if len(codes) == len(statuses):
    return next((c for c in codes if c), 0)
  return streamed or 1   # a worker unreachable or still running: the slice is gone or the stream broke


def slice_state(s: Slice, capture: Runner) -> str:
  """The queued resource's state; NOT_FOUND if gcloud says it does not exist; UNKNOWN on other gcloud errors."""
  rc, out = capture(state_command(s))
  if rc == 0:
    return out.strip() or "UNKNOWN"
  return "NOT_FOUND" if re.search(r"NOT_FOUND|not found", out, re.IGNORECASE) else "UNKNOWN"


def wait_active(s: Slice, capture: Runner, poll_s: float, timeout_s: float, sleep=time.sleep) -> None:
  deadline = time.monotonic() + timeout_s
  while (state := slice_state(s, capture)) != ACTIVE_STATE:
    if state in ("FAILED", "NOT_FOUND") or time.monotonic() > deadline:
      raise RuntimeError(f"TPU slice {s.name} is {state}, not ACTIVE; see `gcloud compute tpus queued-resources "
                         f"describe {s.name} --zone={s.zone}`")
    print(f"{s.name}: {state}, waiting")
    sleep(poll_s)


def watch(s: Slice, main_args, env, archive: str, run: Runner, capture: Runner, *, poll_s: float = 60,
          provision_timeout_s: float = 3600, max_restarts: int = 20, sleep=time.sleep) -> int:
  """Keeps the job going until it finishes, through preemptions.

  Each cycle: if the slice is gone (preempted spot capacity leaves the queued resource SUSPENDED; deleted: not
  found), delete what is left and create it again; wait until ACTIVE; set it up (first cycle and every new
  slice); run the job. If the slice is still ACTIVE when the job ends, that is the answer: 0, or the job's
  failure (a bug, not a preemption: no retry). Otherwise the slice was lost under the job: next cycle. The rerun
  is the same command, so it resumes from the newest checkpoint in the gs:// workdir.
  """
  restarts, needs_setup = 0, True
  while True:
    state = slice_state(s, capture)
    if state in GONE_STATES:
      if state != "NOT_FOUND":
        print(f"{s.name} is {state}: deleting it to recreate")
        for cmd in delete_commands(s):
          run(cmd)
      for cmd in create_commands(s):
        run(cmd)
      needs_setup = True
    if state != ACTIVE_STATE:
      wait_active(s, capture, poll_s, provision_timeout_s, sleep)
    if needs_setup:
      failed = next((rc for rc in (run(cmd)[0] for cmd in setup_commands(s, archive)) if rc), 0)
      if failed and slice_state(s, capture) == ACTIVE_STATE:
        print(f"setup of {s.name} failed (gcloud exit {failed}) on a healthy slice; stopping", file=sys.stderr)
        return failed
      needs_setup = bool(failed)
    status = 1 if needs_setup else run_job(s, main_args, env, run, capture)
    after = slice_state(s, capture)
    if after == ACTIVE_STATE and not needs_setup:
      if status == 0:
        print(f"job finished on {s.name}")
      else:
        print(f"job failed on {s.name} with exit {status}; not retrying (the slice is healthy)", file=sys.stderr)
      return status
    restarts += 1
    if restarts > max_restarts:
      print(f"{s.name} lost {restarts} times; giving up", file=sys.stderr)
      return 1
    print(f"{s.name} is {after} (preempted or deleted): recreating it and resuming, restart {restarts}")


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def _cli():
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  name = flags.DEFINE_string("name", None, "Name of the TPU VM slice (and of its queued resource).")
  zone = flags.DEFINE_string("zone", None, "Zone, e.g. us-west4-a.")
  project = flags.DEFINE_string("project", None, "GCP project (default: gcloud's configured one).")
  accel = flags.DEFINE_string("accelerator_type", "v5litepod-8", "TPU type, e.g. v4-8, v5litepod-16, v6e-8.")
  runtime = flags.DEFINE_string("runtime_version", "v2-alpha-tpuv5-lite", "TPU VM software version.")
  spot = flags.DEFINE_bool("spot", False, "Spot capacity (cheaper, preemptible; use watch).")
  env = flags.DEFINE_multi_string("env", [], "KEY=VALUE set for the job on every worker (repeatable); "
                                  "LIBTPU_INIT_ARGS=... is added to the default libtpu flags, its flags winning.")
  libtpu_args = flags.DEFINE_string("libtpu_init_args", None, "Replaces the default LIBTPU_INIT_ARGS of the job "
                                    "(MaxText's collective-overlap flags, LIBTPU_FLAGS in launch/tpu.py); '' for "
                                    "none.")
  allow_local = flags.DEFINE_bool("allow_local_workdir", False, "Allow a workdir on the workers' disks.")
  dry_run = flags.DEFINE_bool("dry_run", False, "Print the gcloud commands; run nothing.")
  poll = flags.DEFINE_float("poll_s", 60.0, "watch: seconds between state checks while provisioning.")
  flags.mark_flags_as_required(["name", "zone"])

  def main(argv):
    if len(argv) < 2 or argv[1] not in ("create", "setup", "run", "watch", "delete"):
      raise app.UsageError("usage: python -m launch.tpu {create,setup,run,watch,delete} [flags] [-- main args]")
    command, main_args = argv[1], argv[2:]
    if main_args[:1] == ["--"]:
      main_args = main_args[1:]
    s = Slice(name.value, zone.value, accel.value, runtime.value, project.value, spot.value)
    try:
      bad = [e for e in env.value if "=" not in e]
      if bad:
        raise ValueError(f"--env={bad[0]} must be KEY=VALUE")
      variables = job_env(accel.value, dict(e.split("=", 1) for e in env.value), libtpu_args.value)
      if command in ("run", "watch"):
        check_workdir(main_args, allow_local.value)
      s.workers   # pylint: disable=pointless-statement  (validates the accelerator type)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    archive = os.path.join("/tmp", f"{s.name}-{ARCHIVE}")
    run = print_runner if dry_run.value else subprocess_runner(capture=False)
    capture = print_runner if dry_run.value else subprocess_runner(capture=True)
    if command == "create":
      cmds = create_commands(s)
    elif command == "delete":
      cmds = delete_commands(s)
    elif command == "setup":
      cmds = [archive_command(os.getcwd(), archive), *setup_commands(s, archive)]
    elif command == "run":
      if dry_run.value:
        cmds = run_commands(s, main_args, variables)
      else:
        sys.exit(run_job(s, main_args, variables, run, capture))
    else:   # watch
      if dry_run.value:
        print(f"# watch: every cycle checks the state; if the slice is {'/'.join(GONE_STATES)}, it runs "
              "delete (if present), create, setup and run again (the job resumes from its checkpoint)")
        cmds = [state_command(s), *delete_commands(s), *create_commands(s), archive_command(os.getcwd(), archive),
                *setup_commands(s, archive), *run_commands(s, main_args, variables)]
      else:
        rc, _ = run(archive_command(os.getcwd(), archive))
        sys.exit(rc or watch(s, main_args, variables, archive, run, capture, poll_s=poll.value))
    for cmd in cmds:
      rc, _ = run(cmd)
      if rc:
        sys.exit(rc)

  app.run(main)


if __name__ == "__main__":
  _cli()
