"""Running it like a service: incremental nightly runs, the lease, resume after a killed driver,
node loss, Ray Jobs submission, schedules, run history and error retries. Real S3, real Ray."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import yaml

from pipeline.config import JobSpec
from pipeline.demo import digit_jpegs, write_shards
from pipeline.ledger import Lease, LeaseHeld
from pipeline.runner import run_job

from helpers import bad_input_members, image_bytes, tar_bytes

pytestmark = pytest.mark.heavy
ROOT = Path(__file__).resolve().parents[1]


def _spec(src, out, **sections) -> JobSpec:
    data = {"name": "nightly", "source": {"uri": src}, "model": {"checkpoint": "builtin:digits"},
            "engine": {"batch_size": 32}, "outputs": {"top_k": 1}, "output": {"uri": out, "mode": "incremental"},
            "ray": {"progress": False}}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return JobSpec.model_validate(data)


def _keys(s3, out: str) -> list[str]:
    s3.invalidate_cache()
    con = duckdb.connect()
    con.register_filesystem(s3)
    manifest = json.loads(s3.cat(f"{out}/_manifest.json"))
    files = [f"'s3://{out}/{f['path']}'" for f in manifest["files"] if f["kind"] == "ok"]
    return [r[0] for r in con.sql(f"SELECT key FROM read_parquet([{', '.join(files)}])").fetchall()]


def _visible_parts(s3, out: str) -> set[str]:
    s3.invalidate_cache()
    return {p.split(f"{out}/", 1)[1] for p in s3.find(out) if p.endswith(".parquet")}


def test_incremental_runs_only_new_changed_or_remodelled_shards(ray_cluster, s3):
    bucket = "vitpipe-nightly"
    s3.mkdir(bucket)
    digits = digit_jpegs("test")[:200]
    write_shards(digits[:120], f"s3://{bucket}/in", n_shards=4, prefix="day1")
    out = f"{bucket}/out"
    first = run_job(_spec(f"s3://{bucket}/in", f"s3://{out}"))
    assert (first.shards_processed, first.shards_unchanged, first.records_read) == (4, 0, 120)
    assert first.ledger == {"entries": 0, "from_snapshot": 0}

    write_shards(digits[120:], f"s3://{bucket}/in", n_shards=2, prefix="day2")  # 80 more images
    s3.invalidate_cache()
    second = run_job(_spec(f"s3://{bucket}/in", f"s3://{out}"))
    assert (second.shards_processed, second.shards_unchanged, second.records_read) == (2, 4, 80)
    assert second.ledger == {"entries": 4, "from_snapshot": 4}  # the first commit's snapshot: no GET per entry
    keys = _keys(s3, out)
    assert len(keys) == 200 and len(set(keys)) == 200  # the union, exactly once

    # One shard changes (new bytes, new ETag): only it is redone, its old rows replaced.
    s3.pipe(f"{bucket}/in/day1-00000.tar", tar_bytes([("replaced-0.jpg", image_bytes(40, 40, seed=7))]))
    s3.invalidate_cache()
    third = run_job(_spec(f"s3://{bucket}/in", f"s3://{out}"))
    assert (third.shards_processed, third.shards_unchanged) == (1, 5)
    assert third.ledger == {"entries": 6, "from_snapshot": 6}
    keys = _keys(s3, out)
    assert "replaced-0" in keys and len(keys) == 200 - 30 + 1 and len(set(keys)) == len(keys)

    # Another model (gap pooling changes the model id): everything is redone.
    fourth = run_job(_spec(f"s3://{bucket}/in", f"s3://{out}", model={"pooling": "gap"}))
    assert (fourth.shards_processed, fourth.shards_unchanged) == (6, 0)
    manifest = json.loads(s3.cat(f"{out}/_manifest.json"))
    assert manifest["totals"]["records"] == 171 and manifest["model"]["id"] == fourth.model_id
    assert _visible_parts(s3, out) == {f["path"] for f in manifest["files"] + manifest["samples"]}  # no stray files


def test_a_held_lease_makes_a_second_run_refuse(ray_cluster, tmp_path):
    import fsspec

    write_shards(digit_jpegs("test")[:20], str(tmp_path / "in"), n_shards=1)
    out = tmp_path / "out"
    out.mkdir()
    other = Lease(fsspec.filesystem("file"), str(out), "other-run", ttl_s=60)
    other.acquire()
    try:
        with pytest.raises(LeaseHeld, match="being written by run other-run"):
            run_job(_spec(str(tmp_path / "in"), str(out)))
        assert not list(out.glob("*.parquet")) and not (out / "_ledger").exists()
    finally:
        other.release()
    assert run_job(_spec(str(tmp_path / "in"), str(out))).ok_rows == 20  # free again


def _vitpipe(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or os.environ.copy(), **kw)


def _write_job(tmp_path: Path, spec: JobSpec, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return p


def test_two_concurrent_runs_one_runs_one_refuses(s3, tmp_path):
    bucket = "vitpipe-concurrent"
    s3.mkdir(bucket)
    write_shards(digit_jpegs("test")[:64], f"s3://{bucket}/in", n_shards=2)
    job = _write_job(tmp_path, _spec(f"s3://{bucket}/in", f"s3://{bucket}/out"))
    procs = [_vitpipe(["run", str(job), "--no-progress"]) for _ in range(2)]
    results = [(p.wait(300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], [r[2][-2000:] for r in results]
    loser = next(r for r in results if r[0] == 2)
    assert "being written by run" in loser[2]
    assert len(_keys(s3, f"{bucket}/out")) == 64


KILL_AFTER = """
import os, signal, sys
import pipeline.sink as sink
orig = sink.ParquetSink._finish_shard
def finish_then_maybe_die(self, key):
    orig(self, key)
    if len(self.done) == int(os.environ["KILL_AFTER_SHARDS"]):
        self.ledger.flush()  # their ledger entries written (the driver does not wait for them)
        os.kill(os.getpid(), signal.SIGKILL)  # the driver dies mid-run, as on a lost head node
sink.ParquetSink._finish_shard = finish_then_maybe_die
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_driver_killed_mid_run_then_resumed_exactly_once(s3, tmp_path):
    bucket = "vitpipe-resume"
    s3.mkdir(bucket)
    digits = digit_jpegs("test")[:240]
    write_shards(digits, f"s3://{bucket}/in", n_shards=6)
    out = f"{bucket}/out"
    job = _write_job(tmp_path, _spec(f"s3://{bucket}/in", f"s3://{out}"))  # lease_ttl_s 120
    killer = tmp_path / "kill_after.py"
    killer.write_text(KILL_AFTER)
    env = os.environ | {"KILL_AFTER_SHARDS": "2", "PYTHONPATH": str(ROOT)}
    dead = subprocess.run([sys.executable, str(killer), "run", str(job), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert dead.returncode == -signal.SIGKILL
    s3.invalidate_cache()
    assert not s3.exists(f"{out}/_SUCCESS") and not s3.exists(f"{out}/_manifest.json")
    assert not {p for p in _visible_parts(s3, out) if not p.startswith("_pending/")}  # readers see nothing

    # The dead run's lease has ~2 minutes left, but its process on this host is provably gone: the
    # rerun takes the lease over at once, and says so.
    again = _vitpipe(["run", str(job), "--no-progress"])
    code, stdout, stderr = again.wait(300), *again.communicate()
    assert code == 0, stderr[-3000:]
    assert "took over the lease of run" in stderr and "is gone" in stdout
    assert "2 resumed from an interrupted run" in stdout  # at most the in-flight shards were redone
    keys = _keys(s3, out)
    assert len(keys) == 240 and len(set(keys)) == 240
    manifest = json.loads(s3.cat(f"{out}/_manifest.json"))
    assert _visible_parts(s3, out) == {f["path"] for f in manifest["files"] + manifest["samples"]}  # nothing stray, nothing pending
    runs = [json.loads(s3.cat(p)) for p in s3.glob(f"{out}/_runs/*.json")]
    assert sorted(r["status"] for r in runs) == ["succeeded"]  # the killed run could not even record itself


NODE_LOSS = """
import json, sys, threading, time
import ray
from ray.cluster_utils import Cluster
from pipeline.config import JobSpec
from pipeline.runner import run_job
import pipeline.sink as sink

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
victim = cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, logging_level="WARNING")
cluster.wait_for_nodes()
spec = JobSpec.model_validate(json.loads(sys.argv[1]))
orig = sink.ParquetSink._finish_shard
def finish(self, key):
    orig(self, key)
    if len(self.done) == 1:
        cluster.remove_node(victim, allow_graceful=False)  # a worker node dies mid-run
        print("killed a node", file=sys.stderr, flush=True)
sink.ParquetSink._finish_shard = finish
report = run_job(spec)
print(json.dumps({"records": report.records_read, "ok": report.ok_rows, "dups": report.duplicates_dropped,
                  "victim_alive": victim.any_processes_alive()}), flush=True)
import os
os._exit(0)  # skip teardown of a cluster that just lost a node (its noise is not the test)
"""


def _cluster_script(tmp_path: Path, source: str, spec: JobSpec) -> tuple[dict, str]:
    """Run a script that starts its own ray.cluster_utils.Cluster and a job on it; -> (the JSON it
    printed last, its stderr)."""
    script = tmp_path / "cluster_job.py"
    script.write_text(source)
    r = subprocess.run([sys.executable, str(script), spec.model_dump_json()], capture_output=True, text=True,
                       timeout=420, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_worker_node_lost_mid_run_output_still_exact(s3_server, tmp_path):
    """Three nodes, one worker killed after the first shard: retried tasks and a restarted actor finish it."""
    write_shards(digit_jpegs("test")[:240], str(tmp_path / "in"), n_shards=6)
    spec = _spec(str(tmp_path / "in"), str(tmp_path / "out"), engine={"batch_size": 8})
    result, stderr = _cluster_script(tmp_path, NODE_LOSS, spec)
    assert "killed a node" in stderr
    assert result["records"] == result["ok"] == 240 and result["victim_alive"] is False
    keys = duckdb.sql(f"SELECT key FROM '{tmp_path / 'out'}/part-*.parquet'").fetchall()
    assert len(keys) == 240 and len({k[0] for k in keys}) == 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submit_to_a_ray_start_cluster_and_follow_it(s3, tmp_path):
    """`ray start --head` + a worker on loopback; credentials reach the job through the cluster's env only."""
    bucket = "vitpipe-submit"
    s3.mkdir(bucket)
    write_shards(digit_jpegs("test")[:40], f"s3://{bucket}/in", n_shards=2)
    gcs, dash, head_agent, worker_agent = _free_port(), _free_port(), _free_port(), _free_port()
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short: Ray's unix sockets live under it
    ray_bin = str(Path(sys.executable).parent / "ray")
    # Token authentication on (Ray's default for new clusters): nodes and the client find the token in
    # ~/.ray/auth_token; nothing about it goes into the job spec.
    env = os.environ | {"RAY_AUTH_MODE": "token"}  # secure, as deploy/ runs it: every node and client
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # the cluster has vitpipe installed
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                             "--num-cpus=1", f"--temp-dir={temp_dir}",
                             f"--dashboard-agent-listen-port={head_agent}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    worker = None
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while not _dashboard_up(dash):
            assert time.time() < deadline and head.poll() is None, "the Ray head did not start"
            time.sleep(1)
        worker = subprocess.Popen([ray_bin, "start", "--block", f"--address=127.0.0.1:{gcs}",
                                   "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                   # two nodes on one machine: each node's agent needs its own port
                                   f"--dashboard-agent-listen-port={worker_agent}"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        job = _write_job(tmp_path, _spec(f"s3://{bucket}/in", f"s3://{bucket}/out"))
        sub = _vitpipe(["submit", str(job), "--address", address, "--wait"], env=env)
        code, stdout, stderr = sub.wait(400), *sub.communicate()
        assert stdout.strip(), f"submit printed no job id; stderr: {stderr[-3000:]}"
        job_id = stdout.strip().splitlines()[0]
        logs = _vitpipe(["logs", job_id, "--address", address], env=env).communicate()[0]
        s3.invalidate_cache()
        runs = [s3.cat(p).decode() for p in s3.glob(f"{bucket}/out/_runs/*.json")]
        assert code == 0, stderr[-2000:] + logs[-3000:] + "\n".join(runs)
        assert "records read   40" in logs
        status = json.loads(_vitpipe(["status", job_id, "--address", address], env=env).communicate()[0])
        assert status["status"] == "SUCCEEDED"
        assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(status) and s3_secret_not_in(logs)
        assert len(_keys(s3, f"{bucket}/out")) == 40
    finally:
        for p in (worker, head):
            if p is not None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)


def s3_secret_not_in(text: str) -> bool:
    return os.environ["AWS_SECRET_ACCESS_KEY"] not in text


def _dashboard_up(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=1) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:
        return e.code == 401  # up, and token authentication is on (Ray's default): good
    except OSError:
        return False


def test_schedule_prints_a_cron_line_and_rejects_bad_cron(tmp_path):
    job = ROOT / "jobs" / "nightly.yaml"
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "schedule", str(job), "--cron", "0 2 * * *"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    line = r.stdout.strip()
    assert line.startswith("0 2 * * * ") and f"run {job}" in line and "flock -n" in line and "--no-progress" in line
    assert "next runs" in r.stderr
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "schedule", str(job), "--cron", "every night"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "5 fields" in bad.stderr


def test_cron_schedules_are_checked_by_croniter_and_show_their_next_runs():
    import datetime

    from pipeline.service import check_cron, next_runs

    for bad in ("61 2 * * *", "0 25 * * *", "0 2 * * 9", "every night", "* * * * * *", ""):
        with pytest.raises(ValueError, match="not a crontab schedule"):
            check_cron(bad)
    for good in ("0 2 * * mon", "@daily", "*/15 * * * *", "0 2 1-7 * sun"):
        check_cron(good)
    tuesday_23h = datetime.datetime(2026, 12, 1, 23, 0)
    assert next_runs("0 2 * * mon", 2, after=tuesday_23h) == [datetime.datetime(2026, 12, 7, 2, 0),
                                                              datetime.datetime(2026, 12, 14, 2, 0)]
    assert next_runs("@daily", 1, after=tuesday_23h) == [datetime.datetime(2026, 12, 2, 0, 0)]


def test_runs_history_errors_summary_and_retry_spec(ray_cluster, tmp_path):
    members, expected_errors, _ = bad_input_members()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad-00000.tar").write_bytes(tar_bytes(members))
    out = tmp_path / "out"
    report = run_job(_spec(str(tmp_path / "in"), str(out), output={"mode": "full"}))
    runs = subprocess.run([sys.executable, "-m", "pipeline.cli", "runs", str(out)], capture_output=True, text=True)
    assert report.run_id in runs.stdout and "succeeded" in runs.stdout
    retry = tmp_path / "retry.yaml"
    # faulthandler: one CI run saw this process abort at exit (SIGABRT) after its output; if it
    # happens again, stderr names the native thread (the assertion below prints it)
    errs = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "pipeline.cli", "errors", str(out),
                           "--retry-spec", str(retry)], capture_output=True, text=True)
    assert errs.returncode == 0, errs.stderr
    assert f"{report.error_rows} error rows" in errs.stdout and "decode/DecompressionBomb" in errs.stdout
    spec = yaml.safe_load(retry.read_text())
    assert spec["source"]["only_keys"] and spec["output"]["uri"].endswith("out-retry")
    again = run_job(JobSpec.model_validate(spec | {"ray": {"progress": False}}))
    # Only the failed records' keys were read again; they fail again (the inputs are still bad).
    retried = [r[0] for r in duckdb.sql(f"SELECT key FROM '{tmp_path}/out-retry/errors/*.parquet'").fetchall()]
    assert sorted(retried) == sorted(expected_errors)
    assert again.ok_rows == 1  # 'dup': the kept first sample shares its key with the failed duplicate


THREE_NODES = """
import json, os, sys
import ray
from ray.cluster_utils import Cluster
from pipeline.config import JobSpec
from pipeline.runner import run_job

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
for _ in range(2):
    cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, logging_level="WARNING")
cluster.wait_for_nodes()
report = run_job(JobSpec.model_validate(json.loads(sys.argv[1])))
node_ids = [n["NodeID"][:8] for n in ray.nodes()]
print(json.dumps({"records": report.records_read, "ok": report.ok_rows, "nodes": report.parts_by_node,
                  "actors": report.actors, "node_ids": node_ids}), flush=True)
os._exit(0)
"""


def test_on_three_nodes_the_model_actors_write_the_part_files(s3_server, tmp_path):
    """A 3-node ray.cluster_utils.Cluster: a model actor per node, each writing the part files of the
    rows it made (the report counts them by the node that wrote them: cluster nodes, not the
    driver's process); the output is exact. Whether the actors that start last get a part before
    a job this short ends depends on this host's speed (on a slow day one actor did all 12), so
    which nodes wrote is not asked here; the benchmark's 3-node run (benchmarks/dataplane.py,
    10,000 images) showed all three writing (6, 7 and 7 parts)."""
    write_shards(digit_jpegs("test")[:240], str(tmp_path / "in"), n_shards=4)
    spec = _spec(str(tmp_path / "in"), str(tmp_path / "out"), source={"records_per_part": 20})
    result, _ = _cluster_script(tmp_path, THREE_NODES, spec)
    assert result["records"] == result["ok"] == 240 and result["actors"] == 3
    assert sum(result["nodes"].values()) == 12, result["nodes"]  # 4 shards x 3 parts
    assert {n.split(":")[1] for n in result["nodes"]} <= set(result["node_ids"])  # written on cluster nodes
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert len([f for f in manifest["files"] if f["kind"] == "ok"]) == 12
    keys = duckdb.sql(f"SELECT key FROM '{tmp_path / 'out'}/part-*.parquet'").fetchall()
    assert len(keys) == 240 and len({k[0] for k in keys}) == 240


def _listening(pids: set[int]) -> set[tuple[str, int, str]]:
    import psutil

    out = set()
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.add((c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()))
    return out


def test_a_local_run_listens_on_loopback_only_and_shows_only_its_own_lines(tmp_path):
    """`vitpipe run` on a laptop: every socket of every Ray process it starts (GCS, raylet, agents,
    workers, the driver) is bound to loopback, sampled while the job runs; and stderr holds our
    progress and report, none of Ray's own lines: a line as each start-up step ends (what it found,
    seconds since the run started), then the bar."""
    import psutil

    write_shards(digit_jpegs("test")[:300], str(tmp_path / "in"), n_shards=3)
    job = _write_job(tmp_path, _spec(str(tmp_path / "in"), str(tmp_path / "out"), output={"mode": "full"},
                                     ray={"progress": True}))
    run = _vitpipe(["run", str(job)])
    seen: set[tuple[str, int, str]] = set()
    root = psutil.Process(run.pid)
    while run.poll() is None:
        with contextlib.suppress(psutil.Error):
            seen |= _listening({root.pid, *(p.pid for p in root.children(recursive=True))})
        time.sleep(0.3)
    stdout, stderr = run.communicate()
    assert run.returncode == 0, stderr[-3000:]
    names = {name for _, _, name in seen}
    assert {"gcs_server", "raylet"} <= names, seen  # it did see Ray's servers listening
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for ip, _, _ in seen), sorted(seen)
    assert "records read   300" in stdout
    for noise in ("Token authentication", "core_worker", "Progress bars disabled", "INFO", "WARNING"):
        assert noise not in stderr, stderr[-2000:]
    assert "img" in stderr and "shards=3/3" in stderr  # our progress bar
    steps = [re.fullmatch(r"nightly: (.+) \((\d+\.\d) s\)", line) for line in stderr.splitlines()]
    said = {re.sub(r"\d+ CPUs", "N CPUs", m[1]): float(m[2]) for m in steps if m}  # N: what Ray found here
    assert set(said) == {"model builtin:digits loaded", f"listed 3 shards under {tmp_path / 'in'}",
                         f"output {tmp_path / 'out'}: 3 shards to do, 0 resumed, 0 unchanged",
                         "Ray ready: local, 1 node, N CPUs, 0 GPUs",
                         "starting the read and model actors for 3 shards"}, stderr[-2000:]
    assert list(said)[-1].startswith("starting")  # after Ray and the output check, whichever thread ended first
    report = json.loads((tmp_path / "out" / "_report.json").read_text())
    assert said["model builtin:digits loaded"] <= said[f"listed 3 shards under {tmp_path / 'in'}"]
    assert max(said.values()) <= report["time_to_start_s"] + 0.5 < report["time_to_first_row_s"]  # .1f rounding, a thread switch


def test_a_lease_is_taken_over_at_once_only_when_its_holder_is_provably_gone(tmp_path):
    """Same host: a holder whose process has exited (or whose pid now belongs to another process, or
    that held it before a reboot) is gone, and its lease is taken over at once; a holder on another
    host, or still running here, keeps it until it expires."""
    import fsspec

    from pipeline.ledger import boot_id, process_started

    fs = fsspec.filesystem("file")
    out = tmp_path / "out"
    out.mkdir()
    exited = subprocess.Popen(["true"])
    exited.wait()

    def held_by(**who) -> None:
        body = {"run_id": "dead-run", "host": socket.gethostname(), "pid": exited.pid, "boot_id": boot_id(),
                "expires_at": time.time() + 120} | who
        (out / "_lease.json").write_text(json.dumps(body))

    held_by()
    lease = Lease(fs, str(out), "new-run", ttl_s=60)
    lease.acquire()
    assert "dead-run" in lease.took_over and f"process {exited.pid} on this host is gone" in lease.took_over
    lease.release()
    held_by(pid=os.getpid(), pid_started="1")  # our pid, but started at another time: reused
    lease = Lease(fs, str(out), "new-run", ttl_s=60)
    lease.acquire()
    assert "belongs to another process" in lease.took_over
    lease.release()
    held_by(pid=os.getpid(), boot_id="another-boot")
    lease = Lease(fs, str(out), "new-run", ttl_s=60)
    lease.acquire()
    assert "rebooted" in lease.took_over
    lease.release()
    for alive in ({"host": "another-host"}, {"pid": os.getpid(), "pid_started": process_started(os.getpid())}):
        held_by(**alive)
        with pytest.raises(LeaseHeld, match="being written by run dead-run"):
            Lease(fs, str(out), "new-run", ttl_s=60).acquire()


def test_a_lease_whose_create_answer_was_lost_is_recognized_as_our_own(tmp_path):
    """The conditional create succeeded but its answer never came back (a dropped connection); the
    client's retry then meets the object and is refused. The run must see its own run id there and
    go on, not refuse itself as if another run held the output."""
    import fsspec

    import pipeline.ledger as ledger

    fs = fsspec.filesystem("file")
    lease = Lease(fs, str(tmp_path), "run-1", ttl_s=60)
    real = ledger.put_if_absent

    def created_but_answer_lost(fs_, path, data):
        real(fs_, path, data)  # it reached the store ...
        return real(fs_, path, data)  # ... and the retry is refused: False

    ledger.put_if_absent = created_but_answer_lost
    try:
        lease.acquire()
    finally:
        ledger.put_if_absent = real
    assert lease.took_over is None and json.loads((tmp_path / "_lease.json").read_text())["run_id"] == "run-1"
    lease.release()
    assert not (tmp_path / "_lease.json").exists()


def test_a_job_through_a_store_that_throttles_and_drops_connections_is_exact(s3, tmp_path):
    """Reads, part-file writes and the commit through a loopback proxy in front of SeaweedFS that
    answers 503 SlowDown, drops connections before they reach the store, and loses answers after
    they did; and the lease's conditional create whose answer is lost (the retry then meets the
    run's own lease). The job succeeds and its output is exact."""
    from faultproxy import FaultProxy

    bucket = "vitpipe-faulty"
    s3.mkdir(bucket)
    write_shards(digit_jpegs("test")[:120], f"s3://{bucket}/in", n_shards=4)
    job = _write_job(tmp_path, _spec(f"s3://{bucket}/in", f"s3://{bucket}/out"))
    proxy = FaultProxy()
    try:
        env = os.environ | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        run = _vitpipe(["run", str(job), "--no-progress"], env=env)
        code, _, stderr = run.wait(300), *run.communicate()
    finally:
        proxy.stop()
    assert code == 0, stderr[-3000:]
    done = {(kind, fault) for kind, fault, _ in proxy.faults}
    for kind in ("read", "part", "commit"):
        assert {(kind, f) for f in ("slowdown", "drop", "lose")} <= done, (kind, proxy.faults)
    assert ("lease", "lose") in done and "took over" not in stderr  # its own lease, recognized
    keys = _keys(s3, f"{bucket}/out")
    assert len(keys) == 120 and len(set(keys)) == 120
    manifest = json.loads(s3.cat(f"{bucket}/out/_manifest.json"))
    assert manifest["totals"] == {"shards": 4, "records": 120, "ok": 120, "errors": 0, "skipped": 0}
    assert _visible_parts(s3, f"{bucket}/out") == {f["path"] for f in manifest["files"] + manifest["samples"]}  # no stray copies


def test_a_shard_the_credentials_may_not_read_or_that_went_away_is_retried_next_night(s3, tmp_path):
    """Through the proxy, one shard's GET is refused (403 AccessDenied) and another's finds nothing (404:
    deleted after the listing). Each is one error row and a bad shard in the report; the job goes on.
    The next incremental run reads both again, though their ETags are the same: the fault was not in
    their bytes."""
    from faultproxy import FaultProxy

    bucket = "vitpipe-denied"
    s3.mkdir(bucket)
    write_shards(digit_jpegs("test")[:90], f"s3://{bucket}/in", n_shards=3)  # digits-00000..2.tar
    job = _write_job(tmp_path, _spec(f"s3://{bucket}/in", f"s3://{bucket}/out"))
    proxy = FaultProxy(faults=False)
    proxy.denied.add(f"/{bucket}/in/digits-00001.tar")
    proxy.gone.add(f"/{bucket}/in/digits-00002.tar")
    env = os.environ | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    try:
        first = _vitpipe(["run", str(job), "--no-progress"], env=env)
        code, stdout, stderr = first.wait(300), *first.communicate()
        assert code == 0, stderr[-3000:]
        report = json.loads(s3.cat(f"{bucket}/out/_report.json"))
        assert report["bad_shards"] == {"ShardAccessDenied": 1, "ShardGone": 1}
        assert report["ok_rows"] == 30 and report["error_rows"] == 2
        assert "bad shards" in stdout
        proxy.denied.clear()  # access granted; the shard turns out to be there after all
        proxy.gone.clear()
        again = _vitpipe(["run", str(job), "--no-progress"], env=env)
        code, _, stderr = again.wait(300), *again.communicate()
        assert code == 0, stderr[-3000:]
    finally:
        proxy.stop()
    report = json.loads(s3.cat(f"{bucket}/out/_report.json"))
    assert (report["shards_processed"], report["shards_unchanged"], report["bad_shards"]) == (2, 1, {})
    keys = _keys(s3, f"{bucket}/out")
    assert len(keys) == 90 and len(set(keys)) == 90
