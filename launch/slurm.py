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
"""

from __future__ import annotations

import os
import shlex
import string
import subprocess
import sys
from typing import Sequence

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm.sbatch")


class _Template(string.Template):
  delimiter = "@"   # bash owns "$"


def fill(main_args: Sequence[str], *, nodes: int = 1, gpus_per_node: int = 8, per: str = "gpu",
         job_name: str = "unimm_jax", time: str = "24:00:00", cpus_per_task: int | None = None,
         partition: str | None = None, account: str | None = None, log_dir: str = "slurm_logs",
         repo: str | None = None, setup: str = "", python: str = "python3") -> str:
  """The batch script for ``python -m unimm_jax.main MAIN_ARGS`` on ``nodes`` nodes of ``gpus_per_node`` GPUs."""
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
                  log_dir=log_dir.value)
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
