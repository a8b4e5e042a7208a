"""The batch size per engine call, measured on the job's own first batches.

Why measured: no constant is right everywhere. On the benchmark's 2-core CPU, ViT-Ti
fp32 ran 53 images/s at 16 images per call and 41 at 64 (the activations of a big batch
fall out of cache), bf16 was fastest at 64, and a GPU wants the largest batch it can
hold. Why on the job's batches: a separate warm-up would cost start-up time on every
run; here the first few batches of real work are the warm-up, and none of it is wasted.

The actor receives batches of engine.batch_size images (Ray's transport unit, and the
largest a TensorRT profile accepts) and runs them in sub-batches of the chosen size.
A batch rarely holds exactly that many images (each shard's end marker and error rows
travel with the records), so a call counts towards its size's timing when it holds at
least 3/4 of it; on a GPU a short sub-batch is padded to the full size instead, so that
every call has one of a few shapes (kernel selection, torch.compile and TensorRT profiles
all work per shape) and every call is timed. The first GPU run timed no call of 256,
because no batch of 256 rows ever held 256 images.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from pipeline.engines.base import Engine

MAX_RETRIES = 20  # short batches in a row before the tuner chooses from what it measured


def candidate_sizes(max_batch: int) -> list[int]:
    """A quarter, a half and all of max_batch (64 -> [16, 32, 64]); sizes below 4 are not tried."""
    sizes = sorted({max(1, max_batch // 4), max(1, max_batch // 2), max_batch})
    return [s for s in sizes if s >= 4 or s == max_batch]


class TunedEngine:
    """Runs an engine in sub-batches; the size is chosen after timing each candidate.

    The first `settle` calls run whole batches and are not timed: they run while the job's
    other processes (read tasks, the gate) start, which would slow whichever size came first.
    Then each candidate size runs `rounds` + 1 calls, round-robin (so a drift of the host's
    speed hits every candidate alike); the first call of each size is not counted either,
    because a new input shape pays one-off costs (kernel selection, memory planning). The
    size whose best call ran the most images per second is kept for the rest of the job.
    """

    def __init__(self, engine: Engine, max_batch: int, tune: bool = True, rounds: int = 2, settle: int = 2):
        self.engine = engine
        self.candidates = candidate_sizes(max_batch) if tune else [max_batch]
        self.chosen: int | None = self.candidates[0] if len(self.candidates) == 1 else None
        # the calls still to make before choosing: (size, counted)
        self.trials = [(max_batch, False)] * settle + [
            (c, r > 0) for r in range(rounds + 1) for c in self.candidates]
        self.best = {c: 0.0 for c in self.candidates}  # the most images/s one counted call reached
        self.retries = 0
        self.info, self.embed_dim, self.num_classes = engine.info, engine.embed_dim, engine.num_classes
        self.pad = engine.info.device.startswith("cuda")  # fixed shapes on a GPU; on a CPU, padding is waste

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, S, S, 3) uint8 -> (B, D), (B, C), like Engine.run, in sub-batches."""
        size, counted = (self.chosen, False) if self.chosen else self.trials[0]
        embs, logits = [], []
        t0, timed = time.perf_counter(), 0
        for i in range(0, len(images), size):
            chunk = images[i : i + size]  # (b, S, S, 3), b <= size
            n = len(chunk)
            if n < size and self.pad:
                chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), chunk.dtype)])  # (size, S, S, 3)
            e, lg = self.engine.run(chunk)
            if len(chunk) * 4 >= size * 3:  # a short tail is not timed
                timed, t1 = timed + n, time.perf_counter()
            embs.append(e[:n])
            logits.append(lg[:n])
        if self.chosen is None:
            if counted and timed:
                self.best[size] = max(self.best[size], timed / (t1 - t0))
            if counted and not timed and self.retries < MAX_RETRIES:
                self.retries += 1  # a short batch (a shard's tail, errors): try this size on the next one
            else:
                self.trials.pop(0)
            if not self.trials:
                self.chosen = max(self.best, key=lambda c: self.best[c]) if any(self.best.values()) \
                    else self.candidates[-1]
                print(self.describe(), file=sys.stderr, flush=True)  # in an actor, Ray forwards it to the driver
        if len(embs) == 1:  # the common case once chosen == batch size: no copy
            return embs[0], logits[0]
        return np.concatenate(embs), np.concatenate(logits)

    def rates(self) -> dict[int, float]:
        """The best images/s of a counted call, per size (0.0: not measured). The best, not the mean:
        a busy neighbour (the gate's check, a read task starting) only ever makes a call slower."""
        return dict(self.best)

    def describe(self) -> str:
        rates = ", ".join(f"{c}: {r:.1f}" for c, r in self.rates().items())
        return f"engine batch {self.chosen} chosen by images/s per call size ({rates})"
