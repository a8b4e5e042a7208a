"""How many actors of each stage a job gets, and what each reserves: from the cluster's
resources (Ray's view of the alive nodes), never from constants."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import JobSpec

CPU_CALL, GPU_CALL = 32, 256  # default engine call sizes (engine.batch_size); see below


@dataclass(frozen=True)
class Plan:
    """The actor pools of one run."""

    actors: int  # model actors
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int  # torch threads (CPU) and CPU-decode threads of each model actor
    read_cpus: float
    decoders: int = 0  # CPU decode actors of 1 CPU; 0: decoding runs inside the model actors
    readers: int = 1  # read actors (each reads one shard at a time)
    call_size: int = CPU_CALL  # images per engine call
    decode: str = "cpu"  # where the model actors decode: "cpu" (their threads) or "gpu" (nvJPEG)

    @property
    def gpu(self) -> bool:
        return self.gpus_per_actor > 0

    def read_actors(self, shards: int) -> int:
        return min(self.readers, shards)

    def buffer_mb(self, per_actor: int) -> int:
        """Object-store memory the run may hold in flight: per model actor and, where decode actors
        feed a GPU, for every four of them too (each holds decoded parts)."""
        return int((self.actors + self.decoders / 4) * per_actor)


def call_size(spec: JobSpec, gpu: bool) -> int:
    """engine.batch_size, else 32 on a CPU and 256 on a GPU. Measured: ViT-Ti on the 2-core CPU
    box ran 47.8 images/s at 32 per call and 38.1 at 64 (activations fall out of cache); a GPU
    wants the largest call it can hold, and 256 keeps an H200 busy with ViT-B fp16."""
    return spec.engine.batch_size or (GPU_CALL if gpu else CPU_CALL)


def plan_resources(spec: JobSpec, nodes: list[dict]) -> Plan:
    """Size the actor pools from the alive nodes' resources.

    CPU-only: one model actor per node, reserving the node's CPUs less its two read actors'
    shares, with as many torch threads as that rounds up to (the readers mostly wait on
    I/O); each actor decodes its own parts on those threads.

    With GPUs: one model actor per GPU. With engine.decode gpu (auto's choice there) the
    actor decodes on its GPU and needs no decode actors: a few readers per GPU, and the
    actor keeps up to 4 CPUs for the records the GPU cannot take. With decode cpu, every CPU
    that the model and read actors leave goes to decode actors, since decoding, not the GPU,
    is then the work. `resources.*` fields override each of these.
    """
    r, e = spec.resources, spec.engine
    cpus = [n.get("CPU", 0.0) for n in nodes]
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    read = r.read_cpus
    if r.gpus_per_actor > 0 or (gpus and e.device != "cpu"):
        per_gpu = r.gpus_per_actor or 1.0
        actors = r.actors or max(1, int(gpus // per_gpu))
        if e.decode != "cpu" and not r.decode_actors:
            readers = r.readers or 4 * actors
            left = (sum(cpus) - readers * read) / actors
            per = r.cpus_per_actor if "cpus_per_actor" in r.model_fields_set else max(1.0, min(4.0, left // 1))
            return Plan(actors, per, per_gpu, max(1, math.ceil(per)), read, 0, readers, call_size(spec, True), "gpu")

        # one read actor per 3 decoders: on the first GPU run, 2 readers for 14 decoders kept the
        # decoders ~45% busy (a reader spent ~1 ms of CPU per image, a decoder ~6)
        def readers_for(d: int) -> int:
            return r.readers or max(2 * actors, math.ceil(d / 3))

        free = sum(cpus) - actors * r.cpus_per_actor
        decoders = int(free) if r.decode_actors is None else r.decode_actors
        while r.decode_actors is None and decoders > 1 and decoders + readers_for(decoders) * read > free:
            decoders -= 1  # every actor must fit at once, or one waits for CPUs that never come
        return Plan(actors, r.cpus_per_actor, per_gpu, max(1, math.ceil(r.cpus_per_actor)), read, decoders,
                    readers_for(decoders), call_size(spec, True), "cpu")
    if e.decode == "gpu":
        raise ValueError("engine.decode gpu: the cluster has no GPU for the model actors; use decode auto or cpu")
    decoders = r.decode_actors or 0  # asked for on CPUs only: they take their CPUs off the model actors
    per_node = max(1, math.ceil((r.readers or 2 * max(1, len(cpus))) / max(1, sum(1 for c in cpus if c))))
    if "cpus_per_actor" in r.model_fields_set:
        per = r.cpus_per_actor
        actors = r.actors or max(1, int((sum(cpus) - per_node * read - decoders) // per))
    else:
        # every actor must fit at once (a model actor waiting for a reader's CPU share starts late):
        # each node keeps its readers' share, and the model actor takes the rest
        share = decoders / max(1, sum(1 for c in cpus if c)) + per_node * read
        usable = [c - share for c in cpus if c - share >= 0.5]
        if not usable:
            raise RuntimeError(f"the cluster has too few CPUs ({sum(cpus)}) for a model actor and its read actors")
        per = min(usable)
        actors = r.actors or len(usable)
    return Plan(actors, per, 0.0, max(1, math.ceil(per)), read, decoders, r.readers or 2 * actors,
                call_size(spec, False), "cpu")
