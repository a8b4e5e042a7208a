"""The accuracy gate: a fast engine must agree with torch fp32 before it labels a million images.

Run on a fixed calibration batch taken from the job's own inputs. Pass when the
mean embedding cosine >= min_cosine and top-1 agreement >= min_top1 (both
configurable); the minimum cosine is reported too. A miss stops the job before
the bulk run and says by how much.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pipeline.engines.base import Engine

FIX = "Use a higher precision, another backend, or lower engine.gate thresholds if this is expected"


class GateError(RuntimeError):
    """The engine disagrees with torch fp32 beyond the job's thresholds."""


@dataclass
class GateResult:
    engine: str
    samples: int
    cosine_mean: float
    cosine_min: float
    top1_agreement: float | None
    min_cosine: float
    min_top1: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        top1 = "n/a (no head)" if self.top1_agreement is None else f"{self.top1_agreement:.4f}"
        verdict = "passed" if self.passed else "FAILED"
        return (f"accuracy gate {verdict} for {self.engine} on {self.samples} images: embedding cosine mean "
                f"{self.cosine_mean:.5f} (min {self.cosine_min:.5f}, need >= {self.min_cosine}), top-1 agreement "
                f"{top1} (need >= {self.min_top1})")

    def refusal(self, consequence: str) -> GateError:
        """The error that stops a job on a miss: the figures, what happened, and the way out."""
        return GateError(f"{self.describe()}; {consequence}. {FIX}")


def compare(reference: Engine, candidate: Engine, images: np.ndarray, min_cosine: float = 0.999,
            min_top1: float = 0.99) -> GateResult:
    """Run both engines on the same uint8 batch (N, S, S, 3) and measure their agreement."""
    ref_emb, ref_logits = reference.run(images)
    emb, logits = candidate.run(images)
    cos = np.sum(ref_emb * emb, axis=1) / (np.linalg.norm(ref_emb, axis=1) * np.linalg.norm(emb, axis=1) + 1e-12)
    top1 = float(np.mean(ref_logits.argmax(1) == logits.argmax(1))) if candidate.num_classes else None
    passed = float(cos.mean()) >= min_cosine and (top1 is None or top1 >= min_top1)
    return GateResult(candidate.info.name, len(images), round(float(cos.mean()), 6), round(float(cos.min()), 6),
                      None if top1 is None else round(top1, 4), min_cosine, min_top1, passed)
