"""SLURM batch scripts for the main job: ``python -m launch.slurm [flags] -- MAIN ARGS``.

    python -m launch.slurm --nodes=2 --gpus_per_node=8 --per=gpu --time=24:00:00 --out=job.sbatch -- \\
        --config=configs/shapes.py --workdir=/shared/runs/shapes
    sbatch job.sbatch            # or add --submit

fills ``launch/slurm.sbatch`` and prints it (and writes ``--out``); ``--submit`` also runs ``sbatch``. The
script starts one ``jax.distributed`` process per GPU (``--per=gpu``: each task sees only its GPU through
``CUDA_VISIBLE_DEVICES=$SLURM_LOCALID``) or per node (``--per=node``: each sees its node's GPUs), and gives every
process what ``jax.distributed`` needs through the variables the main job reads: ``JAX_COORDINATOR_ADDRESS``
(the first node of the allocation, a port derived from the job id), ``JAX_NUM_PROCESSES`` (``$SLURM_NTASKS``)
and ``JAX_PROCESS_ID`` (``$SLURM_PROCID``). Explicit rather than JAX's own SLURM detection so the script says
what each process gets and works for both layouts alike.

Near the time limit SLURM sends SIGTERM (``--signal``): the job checkpoints and exits 0, and the same script
submitted again resumes it (as does SLURM's own requeue after a node failure, ``--requeue``).

The script exports ``XLA_FLAGS`` for the GPU compiler's latency-hiding scheduler and its companions
(:data:`GPU_XLA_FLAGS`). ``--xla_flags=...`` replaces that set (``--xla_flags=`` exports none); an ``XLA_FLAGS``
the job already has (from the submitting shell, which ``sbatch`` passes on, or from ``--setup``) comes after the
set, and XLA keeps the last value of a flag given twice, so the user's wins.
"""

from __future__ import annotations

import os
import shlex
import string
import subprocess
import sys
from typing import Sequence

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm.sbatch")


# XLA_FLAGS of the job: the flags that MaxText's GPU training configs set for compute/communication overlap
# (AI-Hypercomputer/maxtext at e591f30, src/maxtext/configs/gpu/a3/llama_2_7b/1vm.sh, the same in the other a3
# configs and in docs/run_maxtext/run_maxtext_single_host_gpu.md); the first is also recommended by JAX's GPU
# performance tips (docs.jax.dev gpu_performance_tips) and set in NVIDIA's JAX containers. Each name was checked
# against jaxlib 0.10.2's XLA (an unknown flag aborts the process; tests/test_launch.py parses the set). Left
# out: MaxText's --xla_gpu_pipeline_* (unknown to this XLA), --xla_disable_hlo_passes=rematerialization (more
# memory, a per-model choice) and the while-loop/combine-by-dim tuning of its Llama runs.
GPU_XLA_FLAGS: tuple[tuple[str, str], ...] = (
    ("--xla_gpu_enable_latency_hiding_scheduler=true",
     "schedule collectives early and their waits late, so NCCL transfers overlap compute"),
    ("--xla_gpu_enable_highest_priority_async_stream=true",
     "the collectives' stream at the highest priority: compute kernels do not hold communication back"),
    ("--xla_gpu_enable_triton_gemm=false", "matmuls on cuBLAS, not Triton GEMM (MaxText's choice with the rest)"),
    ("--xla_gpu_enable_command_buffer=", "no CUDA-graph capture ('' in MaxText; an empty list here)"),
    # Combine small collectives (one per parameter of FSDP) into few large ones: fewer, fuller transfers.
    ("--xla_gpu_all_reduce_combine_threshold_bytes=134217728", "all-reduces combined up to 128 MiB"),
    ("--xla_gpu_all_gather_combine_threshold_bytes=134217728", "all-gathers combined up to 128 MiB"),
    ("--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864", "reduce-scatters combined up to 64 MiB"),
)
DEFAULT_XLA_FLAGS = " ".join(flag for flag, _ in GPU_XLA_FLAGS)


class _Template(string.Template):
  delimiter = "@"   # bash owns "$"


def fill(main_args: Sequence[str], *, nodes: int = 1, gpus_per_node: int = 8, per: str = "gpu",
         job_name: str = "unimm_jax", time: str = "24:00:00", cpus_per_task: int | None = None,
         partition: str | None = None, account: str | None = None, log_dir: str = "slurm_logs",
         repo: str | None = None, setup: str = "", python: str = "python3",
         xla_flags: str = DEFAULT_XLA_FLAGS) -> str:
  """The batch script for ``python -m unimm_jax.main MAIN_ARGS`` on ``nodes`` nodes of ``gpus_per_node`` GPUs.

  ``xla_flags``: the job's XLA_FLAGS before any the job's environment already holds (those come after and win).
  """
  if per not in ("gpu", "node"):
    raise ValueError(f"per={per!r} must be 'gpu' (one process per GPU) or 'node' (one per node)")
  if nodes < 1 or gpus_per_node < 1:
    raise ValueError(f"nodes={nodes} and gpus_per_node={gpus_per_node} must be >= 1")
  tasks = gpus_per_node if per == "gpu" else 1
  extra = [f"#SBATCH --partition={partition}"] if partition else []
  extra += [f"#SBATCH --account={account}"] if account else []
  with open(TEMPLATE) as f:
    template = _Template(f.read())
  return template.substitute(
      job_name=job_name, nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpus_per_node,
      cpus_per_task=cpus_per_task or (8 if per == "gpu" else 8 * gpus_per_node), time=time, log_dir=log_dir,
      sbatch_extra="\n".join(extra), repo=shlex.quote(repo or os.getcwd()), setup=setup,
      xla_flags=shlex.quote(xla_flags),
      gpu_binding="export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID; " if per == "gpu" else "",
      command=shlex.join([python, "-m", "unimm_jax.main", *main_args]))


def _cli():
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  nodes = flags.DEFINE_integer("nodes", 1, "Nodes to allocate.")
  gpus = flags.DEFINE_integer("gpus_per_node", 8, "GPUs per node.")
  per = flags.DEFINE_enum("per", "gpu", ["gpu", "node"], "One process per GPU or per node.")
  job_name = flags.DEFINE_string("job_name", "unimm_jax", "SLURM job name.")
  time_limit = flags.DEFINE_string("time", "24:00:00", "SLURM time limit.")
  partition = flags.DEFINE_string("partition", None, "SLURM partition.")
  account = flags.DEFINE_string("account", None, "SLURM account.")
  setup = flags.DEFINE_string("setup", "", "Shell lines run before srun, e.g. 'source .venv/bin/activate'.")
  xla_flags = flags.DEFINE_string("xla_flags", DEFAULT_XLA_FLAGS, "The job's default XLA_FLAGS (GPU_XLA_FLAGS in "
                                  "launch/slurm.py); '' for none. An XLA_FLAGS in the job's environment comes "
                                  "after them and wins.")
  log_dir = flags.DEFINE_string("slurm_log_dir", "slurm_logs", "Directory of the job's output file.")
  out = flags.DEFINE_string("out", None, "Write the script here (default: print only).")
  submit = flags.DEFINE_bool("submit", False, "Run sbatch on the script (needs --out).")

  def main(argv):
    main_args = argv[1:]
    if main_args[:1] == ["--"]:
      main_args = main_args[1:]
    if not any(a.startswith("--workdir=") for a in main_args):
      raise app.UsageError("give the main job's flags after `--`, e.g. -- --config=configs/shapes.py --workdir=DIR")
    script = fill(main_args, nodes=nodes.value, gpus_per_node=gpus.value, per=per.value, job_name=job_name.value,
                  time=time_limit.value, partition=partition.value, account=account.value, setup=setup.value,
                  log_dir=log_dir.value, xla_flags=xla_flags.value)
    print(script)
    if out.value:
      with open(out.value, "w") as f:
        f.write(script)
      os.makedirs(log_dir.value, exist_ok=True)
    if submit.value:
      if not out.value:
        raise app.UsageError("--submit needs --out")
      sys.exit(subprocess.run(["sbatch", out.value], check=False).returncode)

  app.run(main)


if __name__ == "__main__":
  _cli()
