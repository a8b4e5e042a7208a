"""How many actors of each stage a job gets, and what each reserves: from the cluster's
resources (Ray's view of the alive nodes), never from constants."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.config import JobSpec

if TYPE_CHECKING:
    from pipeline.model.vit import ViTConfig

GPU_CALL = 256  # the default engine call size on a GPU (engine.batch_size); see call_size
READER_CPU = 0.25  # what a read actor uses while decode actors are sized (it reserves resources.read_cpus)
CPU_CALL_FLOATS = 10_000_000  # activations a CPU engine call may hold (~40 MB fp32); see call_size


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
    call_size: int = 32  # images per engine call
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


def call_size(spec: JobSpec, gpu: bool, model: ViTConfig | None = None) -> int:
    """engine.batch_size, else 256 on a GPU (the largest call it holds keeps it busy; 256 kept an
    H200 busy with ViT-B fp16) and on a CPU as many images as keep one call's activations near
    40 MB, a power of two from 16 to 512. A CPU is fastest while a call's activations stay in its
    caches, and their size per image grows with the tokens, the width and the heads. Measured
    on the 2-core box: ViT-Ti/16 at 224 px (~0.3 M floats per image) ran 47.8 images/s at 32 per
    call and 38.1 at 64 -> 32; the bundled digits model (65 tokens of width 96, ~36 k floats)
    ran 447 images/s at 32, 643 at 64, 817 at 256, 768 at 512 -> 256."""
    if spec.engine.batch_size:
        return spec.engine.batch_size
    if gpu or model is None:
        return GPU_CALL if gpu else 32
    tokens = (model.image_size // model.patch_size) ** 2 + 1
    per_image = tokens * (model.dim + model.mlp_dim) + model.heads * tokens * tokens  # floats
    fits = max(1, CPU_CALL_FLOATS // per_image)
    return min(512, max(16, 1 << (fits.bit_length() - 1)))


def plan_resources(spec: JobSpec, nodes: list[dict], model: ViTConfig | None = None) -> Plan:
    """Size the actor pools from the alive nodes' resources.

    CPU-only: one model actor per node and one read actor beside it (reading a part costs a
    small fraction of decoding and running it, and every process is a Python interpreter
    with its imports to start), the model actor reserving the node's CPUs less the readers'
    reservations (none by default), with as many torch threads as that rounds up to; it
    decodes its own parts on those threads.

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
            return Plan(actors, per, per_gpu, max(1, math.ceil(per)), read, 0, readers, call_size(spec, True, model), "gpu")

        # one read actor per 3 decoders: on the first GPU run, 2 readers for 14 decoders kept the
        # decoders ~45% busy (a reader spent ~1 ms of CPU per image, a decoder ~6)
        def readers_for(d: int) -> int:
            return r.readers or max(2 * actors, math.ceil(d / 3))

        free = sum(cpus) - actors * r.cpus_per_actor
        decoders = int(free) if r.decode_actors is None else r.decode_actors
        use = max(read, READER_CPU)
        while r.decode_actors is None and decoders > 1 and decoders + readers_for(decoders) * use > free:
            decoders -= 1  # every actor must fit at once (and the readers' work beside them)
        return Plan(actors, r.cpus_per_actor, per_gpu, max(1, math.ceil(r.cpus_per_actor)), read, decoders,
                    readers_for(decoders), call_size(spec, True, model), "cpu")
    if e.decode == "gpu":
        raise ValueError("engine.decode gpu: the cluster has no GPU for the model actors; use decode auto or cpu")
    decoders = r.decode_actors or 0  # asked for on CPUs only: they take their CPUs off the model actors
    per_node = max(1, math.ceil((r.readers or max(1, len(cpus))) / max(1, sum(1 for c in cpus if c))))
    if "cpus_per_actor" in r.model_fields_set:
        per = r.cpus_per_actor
        actors = r.actors or max(1, int((sum(cpus) - per_node * read - decoders) // per))
    else:
        # every actor must fit at once (a model actor waiting for a reader's reservation starts late):
        # each node keeps its readers' reservations, and the model actor takes the rest
        share = decoders / max(1, sum(1 for c in cpus if c)) + per_node * read
        usable = [c - share for c in cpus if c - share >= 0.5]
        if not usable:
            raise RuntimeError(f"the cluster has too few CPUs ({sum(cpus)}) for a model actor and its read actors")
        per = min(usable)
        actors = r.actors or len(usable)
    return Plan(actors, per, 0.0, max(1, math.ceil(per)), read, decoders, r.readers or actors,
                call_size(spec, False, model), "cpu")
