"""Starting Ray for a run: a local Ray that listens on loopback only and runs none of the
services a one-machine run has no use for, or an existing cluster (`ray.address`).

A local run (no address) starts Ray with:

- Ray's single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, what Ray does by default on
  macOS and Windows): the node's address is 127.0.0.1, so every Ray process (GCS, raylet,
  dashboard and runtime-env agents, workers, the driver) listens on loopback only. Without
  it, `ss -ltnp` during a run showed raylet, GCS, driver and workers on every interface and
  the agents on the machine's address (Ray replaces 127.0.0.1 with a reachable address, so
  that other nodes could join).
- no dashboard;
- no usage statistics (RAY_USAGE_STATS_ENABLED=0): no report to Ray's servers, and no
  Prometheus queries from Ray Data to a server that is not there;
- no metrics collection (RAY_enable_metrics_collection=0), and the dashboard agent's sweep of
  the node's processes once a minute instead of every 5 s: both only feed a dashboard or a
  Prometheus, which a local run has neither of;
- quiet: Ray's own log lines (its token-auth notice, Ray Data's progress and summary lines,
  worker output) only with `ray.verbose` (`vitpipe run --verbose`). What Ray's C++ core
  writes to this process's stderr (a line about actor restarts on every run) goes to
  SESSION/logs/vitpipe-driver-native.err instead, while Python's own stderr (progress bar,
  report, errors) stays where it was. Failures still raise, with their messages.

These are Ray's settings, read from the environment when Ray and its processes start, so a
process that will run local jobs calls `local_environment()` before it imports ray (the CLI
does); `connect` calls it again, harmlessly, for library use. An existing cluster keeps its
own settings: see README "Security" for what listens where there.
"""

from __future__ import annotations

import logging
import os
import sys

LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # the node is 127.0.0.1; everything binds to loopback
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_enable_metrics_collection": "0",
    "REPORTER_UPDATE_INTERVAL_MS": "60000",
}


def local_environment() -> None:
    """Set the environment a local Ray starts with (a value already set by the user wins)."""
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    if "ray" in sys.modules:  # imported already (library use): Ray reads this one at import
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false")


def connect(address: str | None, verbose: bool = False) -> None:
    """Join the cluster at `address`, or start a local Ray as described above."""
    import ray

    if ray.is_initialized():
        return
    level = logging.INFO if verbose else logging.ERROR
    if address:
        ray.init(address=address, logging_level=level, log_to_driver=True)
    else:
        local_environment()
        # address="local": always a new local Ray, never silently joining one started by `ray start`.
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=level,
                 log_to_driver=verbose)
        if not verbose:
            native_stderr_to_log()
    quiet_ray_data(verbose)


def native_stderr_to_log() -> None:
    """Send what native code writes to file descriptor 2 to the session's log folder; keep
    Python's sys.stderr on the original stream (a duplicate of it)."""
    from ray._private.worker import _global_node

    if _global_node is None:
        return
    path = os.path.join(_global_node.get_session_dir_path(), "logs", "vitpipe-driver-native.err")
    sys.stderr.flush()
    original = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    os.close(log)
    sys.stderr = os.fdopen(original, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's INFO lines (execution plan, "finished in") and warnings about progress bars.
    Ray Data configures its loggers when it is first imported, so import it, then set them."""
    import ray.data  # noqa: F401

    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        logging.getLogger("ray").setLevel(logging.ERROR)
