"""Submitting training stages to a Ray cluster as Ray jobs, and following them.

    unilip submit gen-stage2 --preset unilip-1b --workers 16 --gpu --address http://HEAD:8265 --follow
    unilip jobs list --address http://HEAD:8265
    unilip jobs status|logs|stop JOB_ID --address http://HEAD:8265     # logs --follow streams

The job runs `python -m cli train ...` on the cluster with this checkout as its
working directory (uploaded by Ray), so the cluster runs exactly the code you submit. The
endpoints of S3 and MLflow are passed in the job's runtime_env from your environment;
credentials are not (they would be stored with the job and shown on the dashboard): the
cluster's nodes hold them (a Kubernetes secret, an instance profile).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from unilip.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# Where the job finds storage and tracking: endpoints and names, never keys or passwords.
FORWARDED_ENV = (
    "UNILIP_BUCKET",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_EXPERIMENT_NAME",
)
EXCLUDES = [".venv", ".git", "demo-results", "__pycache__", ".pytest_cache", "*.egg-info"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(UserError):
    """The cluster cannot be reached or refused a request."""


def dashboard_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise ClusterError("give --address http://HEAD:8265 (the Ray dashboard) or set RAY_API_SERVER_ADDRESS")
    if not address.startswith(("http://", "https://")):
        raise ClusterError(f"--address must be the dashboard's http(s):// URL, e.g. http://HEAD:8265; got {address!r}")
    return address


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address)
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError) as e:
        raise ClusterError(f"cannot reach the Ray dashboard at {url}: {e}") from None


def _call(what: str, fn, *args):
    try:
        return fn(*args)
    except RuntimeError as e:  # the client's HTTP errors, e.g. an unknown job id (404)
        raise ClusterError(f"{what}: {e}") from None


def train_entrypoint(recipe: str, train_args: list[str]) -> str:
    # `python -m` from the uploaded working directory: the submitted code, not an installed copy
    return shlex.join(["python", "-m", "cli", "train", recipe, *train_args])


def runtime_env(extra_env: list[str]) -> dict:
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    for item in extra_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ClusterError(f"--env takes KEY=VALUE, got {item!r}")
        env[key] = value
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # `unilip train` passes its environment on to its workers in its own ray.init runtime_env:
    # let Ray merge that with the job's (the working directory stays the job's).
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    return {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env}


def submit(
    recipe: str, train_args: list[str], address: str | None, extra_env: list[str] = (), job_id: str | None = None
) -> str:
    c = client(address)
    entrypoint = train_entrypoint(recipe, train_args)
    return _call(
        "submitting the job",
        lambda: c.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env(list(extra_env)),
            submission_id=job_id,
            metadata={"recipe": recipe, "submitted_by": "unilip submit"},
        ),
    )


def follow(address: str | None, job_id: str, out=sys.stdout) -> str:
    """Stream a job's log until it ends; returns its final status."""
    import asyncio

    c = client(address)

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    _call(f"job {job_id}", c.get_job_status, job_id)
    asyncio.run(tail())
    while (status := str(_call(f"job {job_id}", c.get_job_status, job_id))) not in TERMINAL:
        time.sleep(1)  # the log stream can close just before the status is final
    return status


def list_jobs(address: str | None) -> list[dict]:
    c = client(address)
    rows = []
    for job in _call("listing jobs", c.list_jobs):
        rows.append(
            {
                "id": job.submission_id or job.job_id,
                "status": str(job.status),
                "start": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000))
                if job.start_time
                else "",
                "recipe": (job.metadata or {}).get("recipe", ""),
                "entrypoint": job.entrypoint,
            }
        )
    return sorted(rows, key=lambda r: r["start"])


def job_status(address: str | None, job_id: str) -> dict:
    info = _call(f"job {job_id}", client(address).get_job_info, job_id)
    return {"id": job_id, "status": str(info.status), "message": info.message or "", "entrypoint": info.entrypoint}


def job_logs(address: str | None, job_id: str) -> str:
    return _call(f"job {job_id}", client(address).get_job_logs, job_id)


def stop_job(address: str | None, job_id: str) -> bool:
    return _call(f"job {job_id}", client(address).stop_job, job_id)
