"""What a run shows while it works, on stderr: a line as each start-up step ends, then one
progress bar in images (Ray Data's own bars are off, runner.configure_data).

Before the first image there can be a long wait with nothing else to show: Ray's start
(seconds), the model's load, a bucket's listing (minutes for millions of objects), an engine's
build and gate. A line per step says what is done and when, so a user can tell a slow listing
from a stuck run:

    label-images: model builtin:digits loaded (1.9 s)
    label-images: listed 40 shards under s3://bucket/shards/ (2.3 s)
    label-images: output s3://bucket/labels/: 40 shards to do, 0 resumed, 0 unchanged (2.4 s)
    label-images: Ray ready: local, 1 node, 2 CPUs, 0 GPUs (6.1 s)
    label-images: starting the read and model actors for 40 shards (6.3 s)
    label-images: 20000img [00:38, 524img/s, errors=0, ok=20000, shards=40/40]

The seconds are since the run started (the report's time to the first row counts from there
too). Nothing at all with `ray.progress: false` (`--no-progress`).
"""

from __future__ import annotations

import sys
import threading
import time

from tqdm import tqdm

from pipeline.config import JobSpec


class Progress:
    """A run's start-up lines and its bar. `step` is called from two threads (Ray starts in one,
    the model and the listing load in the other): a lock keeps their lines whole."""

    def __init__(self, spec: JobSpec, t0: float | None = None):
        self.name, self.on = spec.name, spec.ray.progress
        self.t0 = time.time() if t0 is None else t0
        self._lock = threading.Lock()

    def step(self, done: str) -> None:
        """`NAME: DONE (N.N s)`, N the seconds since the run started."""
        if not self.on:
            return
        with self._lock:
            sys.stderr.write(f"{self.name}: {done} ({time.time() - self.t0:.1f} s)\n")
            sys.stderr.flush()

    def starting(self, shards: int) -> None:
        """The last step before the bar: the dataset is built and Ray Data starts its actors."""
        self.step(f"starting the read and model actors for {plural(shards, 'shard')}")

    def bar(self) -> tqdm:
        """The one progress bar, in images."""
        return tqdm(desc=self.name, unit="img", disable=not self.on, file=sys.stderr, mininterval=1.0)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
