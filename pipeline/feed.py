"""The shards to do, handed to a dataset that is already running: the model actors start while
the driver still lists the source and reads the output's ledger.

Ray Data starts a dataset's actor pools when the dataset starts, and a dataset needs its input
to exist. `from_items` needs the shard list itself; a ShardFeed is a placeholder for it: a small
actor that the driver fills once the listing and the output check are done (or tells why they
failed). The dataset reads it through FeedDatasource, one read task that waits for the list and
yields one block per shard, so the read actors take them one at a time as before.

Exactly once stays the sink's business (sink.py): the feed hands over the list the sink planned,
in that order. A retried read task (its worker lost) asks again and yields the same list, and
Ray's streaming generator skips what it already returned. Feed and read task live on the
driver's node, which a run cannot outlive anyway.
"""

from __future__ import annotations

import asyncio
import json

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.sources import Shard


@ray.remote(num_cpus=0, max_restarts=0)
class ShardFeed:
    """Holds the shards to do (as `Shard.to_dict` JSON) and the reader's label map, once known.
    A listing or output check that fails hands over no shard: the dataset ends with nothing
    written, and the driver raises that failure itself (runner.Early.stop)."""

    def __init__(self) -> None:
        self._ready = asyncio.Event()
        self._shards: list[str] = []
        self._labels: dict[str, int] | None = None

    async def fill(self, shards: list[str], labels: dict[str, int] | None) -> None:
        self._shards, self._labels = shards, labels
        self._ready.set()

    async def shards(self) -> list[str]:
        await self._ready.wait()
        return self._shards

    async def labels(self) -> dict[str, int] | None:
        await self._ready.wait()
        return self._labels


def on_this_node() -> NodeAffinitySchedulingStrategy:
    """Pinned to the driver's node: a feed lost with another node would lose the run's input."""
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def new_feed() -> ray.actor.ActorHandle:
    return ShardFeed.options(scheduling_strategy=on_this_node()).remote()


def fill(feed: ray.actor.ActorHandle, shards: list[Shard], labels: dict[str, int] | None) -> None:
    """Hand the sink's planned shards to the running dataset (waits until the feed holds them)."""
    ray.get(feed.fill.remote([json.dumps(s.to_dict()) for s in shards], labels))


class FeedDatasource(Datasource):
    """One read task that waits for the feed and yields a one-row block per shard."""

    def __init__(self, feed: ray.actor.ActorHandle) -> None:
        super().__init__()
        self.feed = feed

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # not known until the listing ends

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        feed = self.feed

        def shards():
            for item in ray.get(feed.shards.remote()):
                yield pa.table({"shard": [item]})

        return [ReadTask(shards, BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None))]


def read_feed(feed: ray.actor.ActorHandle) -> ray.data.Dataset:
    """The dataset of shards (one row each, column `shard`), fed as FeedDatasource says. Each shard
    leaves the read task as a block of its own: the dataset's block-size target is set to one byte
    (runner.configure_data), else Ray Data would gather the rows into one block for one reader."""
    return ray.data.read_datasource(FeedDatasource(feed), override_num_blocks=1, num_cpus=0,
                                    ray_remote_args={"scheduling_strategy": on_this_node()})
