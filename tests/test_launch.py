"""Launchers: the exact gcloud commands of launch.tpu (single- and multi-host), its preemption recovery against a
scripted gcloud, the filled SLURM script run with stand-ins for scontrol/srun, and launch.local running the main
job as two jax.distributed processes."""

import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from launch import local, slurm, tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_ARGS = ["--config=configs/shapes.py", "--workdir=gs://bucket/runs/a b", "--config.train.steps=100",
             "--config.data.path=it's here"]


def _remote(cmd):
  """The shell string that gcloud ssh runs on the workers, and the worker flag."""
  (command,) = [a[len("--command="):] for a in cmd if a.startswith("--command=")]
  (worker,) = [a[len("--worker="):] for a in cmd if a.startswith("--worker=")]
  return command, worker


def _job_argv(start_cmd):
  """The argv the worker runs: unquote the ssh command, then the `bash -c` script inside it."""
  command, _ = _remote(start_cmd)
  words = shlex.split(command)
  inner = words[words.index("-c") + 1]
  job = inner.split(" && ", 1)[1].split(" > ")[0]
  return shlex.split(job)


@pytest.mark.parametrize("accel, workers", [("v5litepod-8", 1), ("v4-8", 1), ("v5litepod-16", 4), ("v4-32", 4),
                                            ("v5p-128", 16), ("v6e-256", 64)])
def test_tpu_worker_count(accel, workers):
  assert tpu.hosts_of(accel) == workers


def test_tpu_unknown_accelerator_is_one_clear_error():
  with pytest.raises(ValueError, match="not a known TPU type"):
    tpu.hosts_of("v9-8")


@pytest.mark.parametrize("accel, workers", [("v5litepod-8", 1), ("v4-32", 4)])
def test_tpu_run_commands_quote_args_and_pass_env_to_every_worker(accel, workers):
  s = tpu.Slice("unimm", "us-central2-b", accel, "tpu-ubuntu2204-base", project="proj")
  cmds = tpu.run_commands(s, MAIN_ARGS, {"WANDB_MODE": "off", "MSG": "a 'quoted' value"})
  start, stream, *status = cmds
  for cmd in cmds:
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and cmd[5] == "unimm"
    assert "--zone=us-central2-b" in cmd and "--project=proj" in cmd
  # Started on every worker, in the background, exit status kept.
  command, worker = _remote(start)
  assert worker == "all" and command.endswith("&") and "nohup bash -c" in command
  argv = _job_argv(start)
  assert argv[:4] == ["env", "PYTHONUNBUFFERED=1", "WANDB_MODE=off", "MSG=a 'quoted' value"]
  main = argv[4:]
  assert main[:3] == ["python3", "-m", "unimm_jax.main"]
  assert main[3:3 + len(MAIN_ARGS)] == MAIN_ARGS                # every argument arrives intact
  assert ("--distributed" in main) == (workers > 1)             # pods: jax.distributed from the TPU runtime
  assert f"echo $? > {tpu.EXIT_FILE}" in shlex.split(command)[shlex.split(command).index("-c") + 1]
  # Log followed on worker 0; one status read per worker.
  assert _remote(stream)[1] == "0" and f"exit $(cat {tpu.EXIT_FILE})" in _remote(stream)[0]
  assert [_remote(c)[1] for c in status] == [str(w) for w in range(workers)]


def test_tpu_create_setup_delete_commands():
  s = tpu.Slice("unimm", "europe-west4-a", "v5litepod-16", "v2-alpha-tpuv5-lite", spot=True)
  (create,) = tpu.create_commands(s)
  assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "unimm", "--node-id=unimm",
                    "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
                    "--zone=europe-west4-a", "--spot"]
  assert "--spot" not in tpu.create_commands(tpu.Slice("unimm", "z"))[0]
  scp, install = tpu.setup_commands(s, "/tmp/a.tar.gz")
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert scp[5:7] == ["/tmp/a.tar.gz", "unimm:~/unimm_jax.tar.gz"]
  command, worker = _remote(install)
  assert worker == "all" and "tar -xzf ~/unimm_jax.tar.gz" in command and "pip install -q -e" in command
  assert tpu.delete_commands(s) == [["gcloud", "compute", "tpus", "queued-resources", "delete", "unimm",
                                     "--force", "--quiet", "--zone=europe-west4-a"]]


def test_tpu_run_needs_a_gs_workdir():
  with pytest.raises(ValueError, match="gs://"):
    tpu.check_workdir(["--config=configs/shapes.py", "--workdir=/tmp/run"])
  assert tpu.check_workdir(MAIN_ARGS) == "gs://bucket/runs/a b"


def _tpu_dry_run(*flags):
  proc = subprocess.run([sys.executable, "-m", "launch.tpu", "run", "--name=unimm", "--zone=us-west4-a",
                         "--accelerator_type=v4-16", *flags, "--dry_run", "--", *MAIN_ARGS],
                        capture_output=True, text=True, timeout=60, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.strip().splitlines()


def _job_env(start_cmd):
  """KEY -> VALUE of the `env` in front of the job on the workers."""
  argv = _job_argv(start_cmd)
  assert argv[0] == "env"
  return dict(a.split("=", 1) for a in argv[1:argv.index("python3")])


def test_tpu_dry_run_prints_the_commands_and_runs_nothing():
  lines = _tpu_dry_run("--env=A=1")
  assert len(lines) == 1 + 1 + 2                                 # start, stream, one status per worker
  start = shlex.split(lines[0])
  assert start == tpu.start_command(tpu.Slice("unimm", "us-west4-a", "v4-16"), MAIN_ARGS,
                                    tpu.job_env("v4-16", {"A": "1"}))
  assert _job_env(start)["A"] == "1"


def test_tpu_job_runs_with_maxtexts_libtpu_flags_and_the_users_flags_win():
  flags_of = lambda value: value.split()   # noqa: E731
  common = [f for f, families, _ in tpu.LIBTPU_FLAGS if families is None]
  megacore = [f for f, families, _ in tpu.LIBTPU_FLAGS if families is not None]
  assert "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true" in common and megacore
  # The table's rows for the slice's family: v5e/v6e get the common rows, megacore chips (v4, v5p) all of them.
  assert flags_of(tpu.job_env("v5litepod-8", {})["LIBTPU_INIT_ARGS"]) == common
  assert flags_of(tpu.job_env("v6e-16", {})["LIBTPU_INIT_ARGS"]) == common
  assert flags_of(tpu.job_env("v5p-128", {})["LIBTPU_INIT_ARGS"]) == common + megacore
  # On the workers: the default set is in the start command's environment (through the CLI, as `run` sends it).
  assert flags_of(_job_env(shlex.split(_tpu_dry_run()[0]))["LIBTPU_INIT_ARGS"]) == common + megacore
  # --env=LIBTPU_INIT_ARGS: added after the defaults; a flag named there is the user's value only.
  user = "--xla_enable_async_all_gather=false --xla_tpu_scoped_vmem_limit_kib=98304"
  env = _job_env(shlex.split(_tpu_dry_run(f"--env=LIBTPU_INIT_ARGS={user}", "--env=B=2")[0]))
  assert env["B"] == "2"
  got = flags_of(env["LIBTPU_INIT_ARGS"])
  assert got[-2:] == user.split()
  assert "--xla_enable_async_all_gather=true" not in got and got.count("--xla_enable_async_all_gather=false") == 1
  assert got[:-2] == [f for f in common + megacore if f != "--xla_enable_async_all_gather=true"]
  # --libtpu_init_args replaces the defaults; '' sends none (and no variable at all when the user sets none).
  env = _job_env(shlex.split(_tpu_dry_run("--libtpu_init_args=--xla_tpu_enable_async_collective_fusion=false",
                                          f"--env=LIBTPU_INIT_ARGS={user}")[0]))
  assert flags_of(env["LIBTPU_INIT_ARGS"]) == ["--xla_tpu_enable_async_collective_fusion=false", *user.split()]
  assert "LIBTPU_INIT_ARGS" not in _job_env(shlex.split(_tpu_dry_run("--libtpu_init_args=")[0]))
  assert tpu.job_env("v4-8", {"LIBTPU_INIT_ARGS": "--a=1"}, "") == {"LIBTPU_INIT_ARGS": "--a=1"}


class FakeGcloud:
  """Scripted gcloud: the slice is preempted during the first run, then the rerun finishes."""

  def __init__(self):
    self.calls, self.state, self.runs = [], "ACTIVE", 0

  def __call__(self, argv):
    self.calls.append(argv)
    verb = argv[3:5]
    if verb == ["queued-resources", "describe"]:
      return (0, self.state + "\n") if self.state != "NOT_FOUND" else (1, "ERROR: NOT_FOUND: resource")
    if verb == ["queued-resources", "delete"]:
      self.state = "NOT_FOUND"
    elif verb == ["queued-resources", "create"]:
      self.state = "ACTIVE"
    elif verb[1] == "ssh":
      command, worker = _remote(argv)
      if "nohup" in command:
        self.runs += 1
      elif command.startswith("tail"):
        if self.runs == 1:
          self.state = "SUSPENDED"      # spot capacity reclaimed under the job
          return 255, ""
        return 0, ""
      elif command.startswith("cat"):
        return (255, "") if self.state != "ACTIVE" else (0, "0\n")
    return 0, ""


def test_tpu_watch_recreates_a_preempted_slice_and_reruns_the_same_command():
  s = tpu.Slice("unimm", "z", "v4-16", spot=True)
  gcloud = FakeGcloud()
  status = tpu.watch(s, MAIN_ARGS, {}, "/tmp/a.tar.gz", gcloud, gcloud, poll_s=0, sleep=lambda _: None)
  assert status == 0 and gcloud.runs == 2
  verbs = [" ".join(c[3:5]) for c in gcloud.calls if c[4] != "describe"]
  # setup, run (preempted), delete + create + setup, run again.
  assert verbs.index("queued-resources delete") < verbs.index("queued-resources create")
  assert verbs.count("tpu-vm scp") == 2
  starts = [c for c in gcloud.calls if c[4] == "ssh" and "nohup" in _remote(c)[0]]
  assert starts[0] == starts[1]                                  # the same command: it resumes
  assert [c for c in gcloud.calls if c[3:5] == ["queued-resources", "create"]][0][-1] == "--spot"


def test_tpu_watch_does_not_retry_a_job_that_fails_on_a_healthy_slice():
  calls = []

  def gcloud(argv):
    calls.append(argv)
    if argv[4] == "describe":
      return 0, "ACTIVE\n"
    if argv[4] == "ssh" and _remote(argv)[0].startswith("tail"):
      return 1, ""
    if argv[4] == "ssh" and _remote(argv)[0].startswith("cat"):
      return 0, "1\n"
    return 0, ""
  assert tpu.watch(tpu.Slice("unimm", "z"), MAIN_ARGS, {}, "/tmp/a.tar.gz", gcloud, gcloud, sleep=None) == 1
  assert sum("nohup" in _remote(c)[0] for c in calls if c[4] == "ssh") == 1


def _run_sbatch(tmp_path, script, **env_vars):
  """Runs a filled script with stand-ins: scontrol names two nodes, srun starts the 8 tasks with SLURM's
  variables, and the "python" (``tmp_path/fake_python``) records each process's environment and arguments in
  tasks.txt and its XLA_FLAGS in xla_flags.txt. Returns both files' lines."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  (bin_dir / "scontrol").write_text("#!/bin/bash\necho gpu-node-17\necho gpu-node-18\n")
  (bin_dir / "srun").write_text(
      "#!/bin/bash\nshift  # --kill-on-bad-exit\n"
      "for i in $(seq 0 $((SLURM_NTASKS - 1))); do SLURM_PROCID=$i SLURM_LOCALID=$((i % 4)) \"$@\"; done\n")
  (tmp_path / "fake_python").write_text(
      "#!/bin/bash\necho \"$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID $CUDA_VISIBLE_DEVICES"
      " $#:$*\" >> tasks.txt\necho \"${XLA_FLAGS-unset}\" >> xla_flags.txt\n")
  for f in ("scontrol", "srun"):
    os.chmod(bin_dir / f, 0o755)
  os.chmod(tmp_path / "fake_python", 0o755)
  for f in ("tasks.txt", "xla_flags.txt"):
    (tmp_path / f).unlink(missing_ok=True)
  (tmp_path / "job.sbatch").write_text(script)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[17-18]",
              "SLURM_JOB_ID": "123456", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2", **env_vars})
  proc = subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return [(tmp_path / f).read_text().splitlines() for f in ("tasks.txt", "xla_flags.txt")]


def test_slurm_script_gives_each_task_its_coordinator_count_and_id(tmp_path):
  script = slurm.fill(["--config=configs/shapes.py", "--workdir=/shared/runs/a b"], nodes=2, gpus_per_node=4,
                      per="gpu", repo=str(tmp_path), python=str(tmp_path / "fake_python"))
  assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=4" in script
  assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --signal=TERM@120" in script
  tasks, _ = _run_sbatch(tmp_path, script)
  port = 20000 + 123456 % 20000
  assert tasks == [f"gpu-node-17:{port} 8 {i} {i % 4} 4:-m unimm_jax.main --config=configs/shapes.py "
                   "--workdir=/shared/runs/a b" for i in range(8)]
  per_node = slurm.fill(["--workdir=/w"], nodes=3, gpus_per_node=8, per="node")
  assert "#SBATCH --ntasks-per-node=1" in per_node and "CUDA_VISIBLE_DEVICES" not in per_node


def test_slurm_job_runs_with_latency_hiding_xla_flags_and_the_users_flags_win(tmp_path):
  defaults = [flag for flag, _ in slurm.GPU_XLA_FLAGS]
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in defaults
  fill = lambda **kw: slurm.fill(["--workdir=/w"], nodes=2, gpus_per_node=4, repo=str(tmp_path),  # noqa: E731
                                 python=str(tmp_path / "fake_python"), **kw)
  # Every task gets the defaults; with nothing else set, only them.
  _, xla = _run_sbatch(tmp_path, fill())
  assert len(xla) == 8 and all(line.split() == defaults for line in xla)
  # The submitting shell's XLA_FLAGS (sbatch passes it on) and --setup's come after them: XLA keeps the last value.
  user = "--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/a b"
  _, xla = _run_sbatch(tmp_path, fill(), XLA_FLAGS=user)
  assert all(line == " ".join(defaults) + " " + user for line in xla)
  _, xla = _run_sbatch(tmp_path, fill(setup="export XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION"))
  assert all(line.split() == defaults + ["--xla_gpu_enable_command_buffer=FUSION"] for line in xla)
  # --xla_flags replaces the defaults; '' exports none of them.
  _, xla = _run_sbatch(tmp_path, fill(xla_flags="--xla_gpu_enable_latency_hiding_scheduler=false"), XLA_FLAGS=user)
  assert all(line == "--xla_gpu_enable_latency_hiding_scheduler=false " + user for line in xla)
  _, xla = _run_sbatch(tmp_path, fill(xla_flags=""))
  assert all(line == "" for line in xla)


def test_slurm_default_xla_flags_are_known_to_this_jaxlib_and_the_last_value_wins(tmp_path):
  """An unknown flag in XLA_FLAGS aborts the process; the GPU flags are parsed by the same parser on CPU. The
  user's flag after the defaults is the one XLA keeps (seen here through --xla_dump_to, which CPU obeys)."""
  code = "import jax; (jax.numpy.zeros(2) + 1).block_until_ready()"
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"{slurm.DEFAULT_XLA_FLAGS} --xla_dump_to={tmp_path / 'first'} --xla_dump_to={tmp_path / 'last'}"}
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "last").is_dir() and not (tmp_path / "first").exists()
  # The check can fail: a misspelt flag is fatal.
  env["XLA_FLAGS"] = slurm.DEFAULT_XLA_FLAGS + " --xla_gpu_enable_latency_hiding_schedular=true"
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "Unknown flag" in proc.stderr


@pytest.mark.exclusive
def test_local_launcher_stops_the_others_when_one_process_fails():
  start = time.monotonic()
  code = ("import os, sys, time\n"
          "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
          "time.sleep(120)\n")
  assert local.launch([sys.executable, "-c", code], 2, timeout_s=60, grace_s=5) == 3
  assert time.monotonic() - start < 30


def test_local_launcher_times_out():
  assert local.launch([sys.executable, "-c", "import time; time.sleep(60)"], 2, timeout_s=1, grace_s=5) == 124


@pytest.mark.exclusive
def test_local_launcher_runs_the_main_job_as_two_distributed_processes(tmp_path):
  workdir = tmp_path / "run"
  overrides = {"model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2, "model.head_dim": 16,
               "model.mlp_dim": 64, "train.steps": 4, "train.batch_size": 16, "optim.warmup_steps": 1,
               "eval.batch_size": 32, "data.val_size": 64, "data.train_size": 2000, "data.fit_examples": 500,
               "train.log_every": 2, "ckpt.every_steps": 2}
  proc = subprocess.run([sys.executable, "-m", "launch.local", "--processes=2", "--cpu_devices=2", "--timeout_s=300",
                         "--", sys.executable, "-m", "unimm_jax.main", "--config=configs/shapes.py",
                         f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())],
                        capture_output=True, text=True, timeout=360, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "over 4 devices (2 processes)" in proc.stdout           # one mesh over both processes' devices
  assert any(line.startswith("[p1] ") for line in proc.stdout.splitlines())
  report = json.loads((workdir / "report.json").read_text())
  assert report["step"] == 4 and sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
