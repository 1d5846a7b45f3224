"""A Dask cluster on Slurm for LENS (dask-jobqueue): one GPU job per Dask worker, tagged GPU=1.

Run it on a login node and keep it running; a Prefect process worker beside it sends every
build-atlas run to the cluster through LENS_DASK_ADDRESS (flows.atlas.make_task_runner), and
LENS_GPU=1 pins the tensor stages to workers that have the `GPU` resource:

    python deploy/slurm_cluster.py --jobs 4 --partition gpu --account myproj \
        --address-file ~/.lens-dask
    LENS_DASK_ADDRESS=$(cat ~/.lens-dask) LENS_DASK_TLS_DIR=~/.lens-dask-tls LENS_GPU=1 \
        prefect worker start --pool lens-slurm

The cluster speaks mutual TLS only (tls://): certificates for the scheduler, the workers and the
flow side are generated into --tls-dir (default ~/.lens-dask-tls, mode 0700, files 0600, on the
shared filesystem the jobs read), so other users of the login node or the network cannot join it
or submit code. The scheduler's dashboard is off unless --dashboard (then on 127.0.0.1 only: reach
it through `ssh -L`), and workers start without one. Jobs inherit the launcher's environment
(sbatch exports it), AWS_* credentials included. Needs `pip install dask-jobqueue==0.9.0` where
this runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TLS_DIR = Path.home() / ".lens-dask-tls"
HEALTH_ONLY = ["distributed.http.health"]  # the scheduler's HTTP routes without the dashboard


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="start a dask-jobqueue SLURMCluster for LENS and print its address"
    )
    p.add_argument("--jobs", type=int, default=2, help="Slurm jobs = Dask workers = GPUs")
    p.add_argument(
        "--adapt",
        type=int,
        metavar="MAX",
        help="scale between 0 and MAX jobs with the load instead",
    )
    p.add_argument("--partition", help="#SBATCH -p")
    p.add_argument("--account", help="#SBATCH -A")
    p.add_argument("--cores", type=int, default=8, help="CPU cores per job (threads of its worker)")
    p.add_argument("--memory", default="64GB", help="memory per job")
    p.add_argument(
        "--gpus", type=int, default=1, help="GPUs per job (one worker per job uses them)"
    )
    p.add_argument("--walltime", default="08:00:00")
    p.add_argument(
        "--port", type=int, default=8786, help="scheduler port (a stable LENS_DASK_ADDRESS)"
    )
    p.add_argument(
        "--python",
        default=sys.executable,
        help="python of the LENS environment on the compute nodes",
    )
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        help="extra #SBATCH line, e.g. --sbatch='--constraint=a100'",
    )
    p.add_argument(
        "--prologue",
        action="append",
        default=[],
        help="shell line run before the worker, e.g. 'module load cuda'",
    )
    p.add_argument(
        "--log-directory", default=str(Path.home() / "lens-dask-logs"), help="job logs (shared FS)"
    )
    p.add_argument("--address-file", type=Path, help="write the scheduler address here")
    p.add_argument(
        "--tls-dir",
        type=Path,
        default=DEFAULT_TLS_DIR,
        help="the cluster's CA and certificates: reused when complete, else generated (0700/0600)",
    )
    p.add_argument(
        "--dashboard", action="store_true", help="serve the scheduler's dashboard on 127.0.0.1:8787"
    )
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
        "scheduler_options": {
            "port": args.port,
            "dashboard_address": "127.0.0.1:8787",
            "dashboard": args.dashboard,
        },
    }


def tls_kwargs(security: Any) -> dict[str, Any]:
    """SLURMCluster arguments for mutual TLS: tls:// for the scheduler and every worker, and the
    certificates."""
    return {"protocol": "tls://", "security": security}


def secure_cluster_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """cluster_kwargs with TLS from --tls-dir (generated when missing) and workers without
    dashboards."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # flows.tls, when run as a script from anywhere
    from flows.tls import ensure_tls_files, tls_security

    kw = cluster_kwargs(args) | tls_kwargs(tls_security(ensure_tls_files(args.tls_dir)))
    kw["worker_extra_args"] = [
        *kw["worker_extra_args"],
        "--no-dashboard",
        "--dashboard-address",
        "127.0.0.1:0",
    ]
    return kw


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import dask
    from dask_jobqueue import SLURMCluster

    kwargs = secure_cluster_kwargs(args)
    routes = {} if args.dashboard else {"distributed.scheduler.http.routes": HEALTH_ONLY}
    with dask.config.set(routes):  # read as the scheduler starts, inside SLURMCluster()
        cluster = SLURMCluster(**kwargs)
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
    dashboard = f"dashboard {cluster.dashboard_link}" if args.dashboard else "no dashboard"
    print(
        f"LENS_DASK_ADDRESS={address} LENS_DASK_TLS_DIR={args.tls_dir.expanduser()}  ({dashboard})",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
