"""Running vitpipe like a service: Ray Jobs submission, cron schedules, run history, error summaries.

The job spec travels with a submitted job (in its working_dir); credentials never do:
the cluster's workers read them from their own environment (a Kubernetes Secret in
deploy/), so nothing secret lands in the Ray runtime_env, the job's metadata or logs.
"""

from __future__ import annotations

import datetime
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import fsspec
import yaml

from pipeline.config import JobSpec

SECRET_HINTS = re.compile(r"(secret|password|token|access[_-]?key|credential)", re.IGNORECASE)


def check_no_secrets(spec: JobSpec) -> None:
    """Refuse specs that carry credentials (user:pass@ in a URI, or secret-looking values)."""
    for name, uri in [("source.uri", u) for u in spec.source.uris] + [
            ("output.uri", spec.output.uri), ("model.checkpoint", spec.model.checkpoint or ""),
            ("engine.cache_uri", spec.engine.cache_uri or "")]:
        if re.match(r"^[a-z0-9+.-]+://[^/@]+:[^/@]+@", uri):
            raise ValueError(f"{name} carries credentials (user:secret@); remove them and set them in the "
                             "cluster's environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) instead")


def jobs_client(address: str):
    """A Ray Jobs client that authenticates with the cluster's token (Ray's token auth, on by default).

    The token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, never from a job spec.
    """
    import os

    has_token = os.environ.get("RAY_AUTH_TOKEN") or Path(
        os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser().exists()
    if has_token:
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # read by Ray when it is first imported, below
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # AuthenticationError, ConnectionError: say what to do, not a traceback
        if type(e).__name__ == "AuthenticationError":
            raise RuntimeError(f"{address}: the cluster wants a token: put it in ~/.ray/auth_token or "
                               "RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it)") from None
        raise RuntimeError(f"{address}: cannot reach the Ray Jobs API ({type(e).__name__}: {e})") from None


def submit(spec: JobSpec, address: str, wait: bool = False) -> str:
    """Submit `vitpipe run` with this spec through the Ray Jobs API; returns the submission id."""
    check_no_secrets(spec)
    client = jobs_client(address)
    workdir = Path(tempfile.mkdtemp(prefix="vitpipe-submit-"))
    try:
        (workdir / "job.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        job_id = _with_retries(lambda: client.submit_job(
            entrypoint="vitpipe run job.yaml --address auto --no-progress",
            runtime_env={"working_dir": str(workdir)},  # the spec only; no env_vars, no secrets
            metadata={"vitpipe.job": spec.name, "vitpipe.output": spec.output.uri},
        ))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return job_id


def _with_retries(call, attempts: int = 30, wait_s: float = 2.0):
    """A cluster that just started answers before its job agent is up ("No available agent"): retry that."""
    import time

    for i in range(attempts):
        try:
            return call()
        except RuntimeError as e:
            if "No available agent" not in str(e) or i == attempts - 1:
                raise
            time.sleep(wait_s)


def job_status(address: str, job_id: str) -> dict:
    info = jobs_client(address).get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message, "entrypoint": info.entrypoint, "start_time": info.start_time,
            "end_time": info.end_time, "metadata": info.metadata}


def job_logs(address: str, job_id: str, follow: bool = False) -> None:
    client = jobs_client(address)
    if not follow:
        sys.stdout.write(client.get_job_logs(job_id))
        return
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


def job_stop(address: str, job_id: str) -> bool:
    return jobs_client(address).stop_job(job_id)


def wait_for(address: str, job_id: str, timeout_s: float = 1800.0) -> str:
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = job_status(address, job_id)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1.0)
    raise TimeoutError(f"job {job_id} still running after {timeout_s:.0f} s")


# --- schedules ---------------------------------------------------------------------------------

def check_cron(cron: str) -> None:
    """A crontab schedule: five fields (names like `mon` and ranges allowed) or an @nickname, with
    every value in range; checked by croniter, which also computes the next run times."""
    from croniter import croniter

    five_fields_or_nickname = cron.strip().startswith("@") or len(cron.split()) == 5  # crontab has no seconds
    if not five_fields_or_nickname or not croniter.is_valid(cron):
        raise ValueError(f"--cron {cron!r}: not a crontab schedule; expected 5 fields (minute 0-59, hour 0-23, "
                         "day 1-31, month 1-12 or jan-dec, weekday 0-7 or sun-sat), e.g. '0 2 * * *' or "
                         "'0 2 * * mon', or @hourly / @daily / @weekly / @monthly")


def next_runs(cron: str, n: int = 3, after: datetime.datetime | None = None) -> list[datetime.datetime]:
    """The next n times the schedule fires (local time), so the user sees what they asked for."""
    from croniter import croniter

    it = croniter(cron, after or datetime.datetime.now())
    return [it.get_next(datetime.datetime) for _ in range(n)]


def cron_line(job_path: str, cron: str, log_dir: str, vitpipe: str | None = None) -> str:
    """The crontab line that runs a job on a schedule, logging to a file; validated first."""
    check_cron(cron)
    exe = vitpipe or shutil.which("vitpipe") or f"{sys.executable} -m pipeline.cli"
    job = str(Path(job_path).resolve())
    log = str(Path(log_dir).expanduser() / (Path(job_path).stem + ".log"))
    # flock: a run still going when the next one is due makes the next one exit, like concurrencyPolicy: Forbid
    # (the output lease refuses a second writer anyway, on any number of machines).
    return (f"{cron} mkdir -p {shlex.quote(str(Path(log).parent))} && flock -n /tmp/vitpipe-{Path(job).stem}.lock "
            f"{exe} run {shlex.quote(job)} --no-progress >> {shlex.quote(log)} 2>&1")


def install_cron(line: str) -> None:
    if not shutil.which("crontab"):
        raise RuntimeError("crontab is not installed here; add the printed line to your scheduler instead")
    current = subprocess.run(["crontab", "-l"], capture_output=True, text=True).stdout
    if line in current:
        return
    subprocess.run(["crontab", "-"], input=current + ("" if current.endswith("\n") or not current else "\n")
                   + line + "\n", text=True, check=True)


# --- history and errors --------------------------------------------------------------------------

def list_runs(uri: str) -> list[dict]:
    fs, root = fsspec.core.url_to_fs(uri)
    runs = []
    for path in sorted(fs.glob(f"{root.rstrip('/')}/_runs/*.json")):
        try:
            runs.append(json.loads(fs.cat_file(path)))
        except (OSError, ValueError):
            continue
    return runs


def error_summary(uri: str, examples: int = 2) -> dict:
    """Error rows by stage and type, with example keys and messages."""
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(uri)
    manifest = json.loads(fs.cat_file(f"{root.rstrip('/')}/_manifest.json"))
    by_type: Counter = Counter()
    samples: dict[str, list] = {}
    failed: list[dict] = []
    for f in manifest["files"]:
        if f["kind"] != "errors":
            continue
        with fs.open(f"{root.rstrip('/')}/{f['path']}", "rb") as fh:
            # no Arrow thread pools in a short CLI process: one `vitpipe errors` in CI died at exit
            # (SIGABRT, "terminate called without an active exception") after finishing its work
            rows = pq.read_table(fh, columns=["key", "source_uri", "member", "error_stage", "error_type",
                                              "error_message"], use_threads=False, pre_buffer=False).to_pylist()
        for r in rows:
            kind = f"{r['error_stage']}/{r['error_type']}"
            by_type[kind] += 1
            if len(samples.setdefault(kind, [])) < examples:
                samples[kind].append(f"{r['key']} ({r['member']}): {r['error_message']}")
            failed.append(r)
    return {"total": sum(by_type.values()), "by_type": dict(by_type.most_common()), "examples": samples,
            "failed": failed, "job": manifest["job"]}


def retry_spec(summary: dict, keys_uri: str, output_uri: str) -> dict:
    """A job spec that re-reads only the failed records' shards and only those keys."""
    keys = sorted({r["key"] for r in summary["failed"]})
    with fsspec.open(keys_uri, "w") as f:
        f.write("\n".join(keys) + "\n")
    job = dict(summary["job"])
    shards = sorted({r["source_uri"] for r in summary["failed"]})
    job["name"] = f"{job.get('name', 'job')}-retry"
    job["source"] = dict(job["source"]) | {"uri": shards if job["source"]["format"] == "webdataset"
                                           else job["source"]["uri"], "only_keys": keys_uri}
    job["output"] = dict(job["output"]) | {"uri": output_uri, "mode": "full"}
    return job
