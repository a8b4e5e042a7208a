"""What a run reports: counts that add up (records read = ok rows + error rows), where the time
went (to the first row, to full speed) and what ran (engine, gate, decoder, actors)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class RunReport:
    run_id: str
    job: str
    output_uri: str
    mode: str
    records_read: int
    ok_rows: int
    error_rows: int
    errors_by_type: dict[str, int]
    skipped_members: dict[str, int]
    duplicates_dropped: int
    shards: int
    shards_processed: int
    shards_resumed: int
    shards_unchanged: int
    wall_s: float
    images_per_s: float
    time_to_first_row_s: float | None
    model_id: str
    model_source: str
    engine: str
    engine_reason: str
    gate: dict | None
    actors: int
    threads_per_actor: int
    decode_actors: int
    embedding_dim: int
    labeled: int
    top1_accuracy: float | None
    model_family: str = "vit"  # vit, deit, clip, siglip, dinov2 (vit.ViTConfig.family)
    normalized: bool = False  # outputs.normalize as resolved for the family: embeddings of unit length
    # the top-k scores: softmax, or sigmoid (SigLIP's zero-shot labels: per class, not summing to 1)
    scores: str = "softmax"
    zero_shot: bool = False  # labels from class names through the text tower (zeroshot.py)
    started_at: float = 0.0  # unix time the run began (run_job's call); the times above count from it
    time_to_start_s: float | None = None  # to the dataset's start: model, listing, lease, Ray, the gate
    time_to_full_speed_s: float | None = None
    time_to_listed_s: float | None = None  # to the shards to do: the listing and the output check done
    time_to_model_ready_s: float | None = None  # to the first model actor with its engine loaded
    started_early: bool = False  # the model actors started before the listing ended (runner.Early)
    decoder: str = ""  # where images were decoded
    decoded_gpu: int = 0
    fallback_cpu: int = 0  # records the GPU decoder handed to the CPU path
    bad_shards: dict[str, int] = field(default_factory=dict)  # shards cut short by a fault, by type
    parts_by_node: dict[str, int] = field(default_factory=dict)  # part files written, by node
    labels: dict | None = None  # ground truth from names (folders, ClassLabel): what mapped, what did not
    lease: str | None = None  # whose lease this run took over, and why
    ledger: dict = field(default_factory=dict)  # the ledger at the start: {"entries", "from_snapshot"}
    timeline: list[list[float]] = field(default_factory=list)  # [s from start, records so far], for the page

    def to_dict(self) -> dict:
        return dict(vars(self))

    def summary(self) -> str:
        lines = [
            f"run {self.run_id} ({self.job}) -> {self.output_uri}",
            f"  records read   {self.records_read}  = ok {self.ok_rows} + errors {self.error_rows}",
        ]
        for t, n in sorted(self.errors_by_type.items()):
            lines.append(f"    error {t}: {n}")
        for t, n in sorted(self.skipped_members.items()):
            lines.append(f"  skipped ({t}): {n}")
        for t, n in sorted(self.bad_shards.items()):
            lines.append(f"  bad shards     {n} cut short ({t}): their rows up to the fault are kept; "
                         "`vitpipe errors OUT` names them")
        first = "" if self.time_to_first_row_s is None else f", first row at {self.time_to_first_row_s:.1f} s"
        full = "" if self.time_to_full_speed_s is None else f", full speed at {self.time_to_full_speed_s:.1f} s"
        lines += [
            *([f"  lease          {self.lease}"] if self.lease else []),
            f"  shards         {self.shards} listed: {self.shards_processed} processed, {self.shards_resumed} resumed "
            f"from an interrupted run, {self.shards_unchanged} unchanged (mode {self.mode})",
            *([f"  ledger         {self.ledger['entries']} entries at the start: {self.ledger['from_snapshot']} from "
               f"its snapshot, {self.ledger['entries'] - self.ledger['from_snapshot']} read one by one"]
              if self.ledger.get("entries") else []),
            f"  throughput     {self.images_per_s:.1f} images/s over {self.wall_s:.1f} s wall{first}{full}",
            *([self._start_line()] if self.time_to_listed_s is not None and self.time_to_model_ready_s else []),
            f"  model          {self.model_source} ({self.model_family}, id {self.model_id[:12]}), embedding dim "
            f"{self.embedding_dim}{', L2-normalized' if self.normalized else ''}"
            f"{f'; zero-shot labels from class names, {self.scores} scores' if self.zero_shot else ''}",
            f"  engine         {self.engine} x {self.actors} actor(s), {self.threads_per_actor} thread(s) each"
            f" ({self.engine_reason})",
        ]
        if self.decoder:
            fell = f", {self.fallback_cpu} fell back to the CPU" if self.decoded_gpu or self.fallback_cpu else ""
            lines.append(f"  decode         {self.decoder}{fell}")
        if self.gate:
            g = self.gate
            lines.append(f"  accuracy gate  cosine {g['cosine_mean']:.5f} (min {g['cosine_min']:.5f}), "
                         f"top-1 agreement {g['top1_agreement']} on {g['samples']} images vs torch fp32")
        if self.labels:
            lb = self.labels
            missing = ", ".join(f"{n!r}" + (f" ({k} files)" if k else "") for n, k in lb["unmapped"].items())
            lines.append(f"  labels         from {lb['from']} names: {lb['mapped']} of {lb['names']} mapped to the "
                         f"model's classes" + (f"; not mapped (no label, not guessed): {missing}" if missing else ""))
        if self.top1_accuracy is not None:
            lines.append(f"  top-1 accuracy {self.top1_accuracy:.4f} on {self.labeled} labeled images")
        return "\n".join(lines)

    def _start_line(self) -> str:
        """Which of the two start-up paths the first row waited for: the listing or the model actors."""
        how = "started while the listing ran" if self.started_early else "started after it"
        return (f"  start          shards to do known at {self.time_to_listed_s:.1f} s; model actors ready at "
                f"{self.time_to_model_ready_s:.1f} s, {how}")


def full_speed_at(timeline: list[tuple[float, int]], t0: float, within: float = 0.9) -> float | None:
    """When the run reached full speed, in seconds from t0: the first moment at which the rate over
    the window before it (a tenth of the run's output span) came within `within` of the rate over the
    run's second half. None for runs too short to tell (under 4 parts)."""
    if len(timeline) < 4:
        return None
    ts = [t - t0 for t, _ in timeline]
    ns = [n for _, n in timeline]
    first, end = ts[0], ts[-1]
    if end <= first:
        return None

    def done_by(t: float) -> int:  # records reported by time t (parts arrive in steps)
        i = bisect.bisect_right(ts, t)
        return ns[i - 1] if i else 0

    mid = first + (end - first) / 2
    steady = (ns[-1] - done_by(mid)) / (end - mid)
    window = (end - first) / 10
    for t in ts:
        if t < first + window:  # the first part's rate is unknown (when did it start?): count after it
            continue
        if (done_by(t) - done_by(t - window)) / window >= within * steady:
            return round(t, 3)
    return round(end, 3)


def timeline_points(timeline: list[tuple[float, int]], t0: float, most: int = 240) -> list[list[float]]:
    """The run's (when, records) steps, one per part, as [s from start, records], thinned to `most`."""
    step = max(1, -(-len(timeline) // most))
    points = timeline[::step] + ([timeline[-1]] if timeline and (len(timeline) - 1) % step else [])
    return [[round(t - t0, 3), n] for t, n in points]
