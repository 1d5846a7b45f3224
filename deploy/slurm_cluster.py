"""A Dask cluster on Slurm for LENS (dask-jobqueue): one GPU job per Dask worker, tagged GPU=1.

Run it on a login node and keep it running; a Prefect process worker beside it sends every
build-atlas run to the cluster through LENS_DASK_ADDRESS (flows.atlas.make_task_runner), and
LENS_GPU=1 pins the tensor stages to workers that have the `GPU` resource:

    python deploy/slurm_cluster.py --jobs 4 --partition gpu --account myproj --address-file ~/.lens-dask
    LENS_DASK_ADDRESS=$(cat ~/.lens-dask) LENS_GPU=1 prefect worker start --pool lens-slurm

Jobs inherit the launcher's environment (sbatch exports it), AWS_* credentials included.
Needs `pip install dask-jobqueue==0.9.0` where this runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="start a dask-jobqueue SLURMCluster for LENS and print its address")
    p.add_argument("--jobs", type=int, default=2, help="Slurm jobs = Dask workers = GPUs")
    p.add_argument("--adapt", type=int, metavar="MAX", help="scale between 0 and MAX jobs with the load instead")
    p.add_argument("--partition", help="#SBATCH -p")
    p.add_argument("--account", help="#SBATCH -A")
    p.add_argument("--cores", type=int, default=8, help="CPU cores per job (threads of its worker)")
    p.add_argument("--memory", default="64GB", help="memory per job")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per job (one worker per job uses them)")
    p.add_argument("--walltime", default="08:00:00")
    p.add_argument("--port", type=int, default=8786, help="scheduler port (a stable LENS_DASK_ADDRESS)")
    p.add_argument("--python", default=sys.executable, help="python of the LENS environment on the compute nodes")
    p.add_argument("--sbatch", action="append", default=[], help="extra #SBATCH line, e.g. --sbatch='--constraint=a100'")
    p.add_argument("--prologue", action="append", default=[], help="shell line run before the worker, e.g. 'module load cuda'")
    p.add_argument("--log-directory", default=str(Path.home() / "lens-dask-logs"), help="job logs (shared FS)")
    p.add_argument("--address-file", type=Path, help="write the scheduler address here")
    p.add_argument("--dry-run", action="store_true", help="print the job script and exit")
    return p.parse_args(argv)


def cluster_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """SLURMCluster arguments: one worker process per job, advertising `GPU=<gpus>` to Dask."""
    return {
        "queue": args.partition,
        "account": args.account,
        "cores": args.cores,
        "processes": 1,
        "memory": args.memory,
        "walltime": args.walltime,
        "python": args.python,
        "job_extra_directives": [f"--gres=gpu:{args.gpus}", *args.sbatch],
        "worker_extra_args": ["--resources", f"GPU={args.gpus}"],
        "job_script_prologue": list(args.prologue),
        "log_directory": args.log_directory,
        "scheduler_options": {"port": args.port, "dashboard_address": ":8787"},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster(**cluster_kwargs(args))
    if args.dry_run:
        print(cluster.job_script())
        cluster.close()
        return 0
    if args.adapt:
        cluster.adapt(minimum_jobs=0, maximum_jobs=args.adapt)
    else:
        cluster.scale(jobs=args.jobs)
    address = cluster.scheduler_address
    if args.address_file:
        args.address_file.write_text(address + "\n")
    print(f"LENS_DASK_ADDRESS={address}  (dashboard {cluster.dashboard_link})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
