"""Ground truth the dataset names rather than numbers: ImageFolder trees (`CLASS/NAME.JPEG`) and
Hugging Face `datasets` ClassLabel columns. Their names are mapped to the model's class indices
once, on the driver, so that accuracy is measured as it is for `.cls` labels. A name that maps
to nothing is counted and named in the report, never guessed: its records have no label.

A name maps to the model's class whose label name is the same (ignoring case, and spaces,
underscores and hyphens between words), else to the index it spells (a folder named `3`),
when the model has that many classes.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


@dataclass
class LabelMap:
    """Dataset class names -> model class indices, with what did not map."""

    source: str  # "folder" | "classlabel"
    to_index: dict[str, int] = field(default_factory=dict)
    unmapped: dict[str, int] = field(default_factory=dict)  # name -> records (files) carrying it, where known

    def summary(self) -> dict:
        return {"from": self.source, "names": len(self.to_index) + len(self.unmapped),
                "mapped": len(self.to_index), "unmapped": dict(sorted(self.unmapped.items()))}


def map_names(names: list[str] | Counter, model_labels: list[str], num_classes: int, source: str) -> LabelMap:
    """Each dataset name to a model class index (see the module's docstring)."""
    by_name = {_norm(label): i for i, label in enumerate(model_labels)}
    counts = names if isinstance(names, Counter) else Counter({n: 0 for n in names})
    out = LabelMap(source)
    for name, n in counts.items():
        key = _norm(name)
        if key in by_name:
            out.to_index[name] = by_name[key]
        elif name.isdigit() and int(name) < num_classes:
            out.to_index[name] = int(name)
        else:
            out.unmapped[name] = n
    return out


def folder_of(rel_path: str) -> str | None:
    """The class folder of a file in an ImageFolder tree: the first directory of its path under the
    source root (`n01440764/img.JPEG` -> `n01440764`); None for a file at the root."""
    parts = rel_path.split("/")
    return parts[0] if len(parts) > 1 else None


def classlabel_names(schema: pa.Schema, column: str) -> list[str] | None:
    """A Hugging Face `datasets` ClassLabel's names, from the Parquet schema's `huggingface` metadata."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feature = json.loads(meta)["info"]["features"][column]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
        return [str(n) for n in feature["names"]]
    return None


def plan_labels(source, shards: list, ckpt) -> LabelMap | None:
    """The label map a job needs, worked out on the driver before any read: folder names from the
    listing (images with label_from folder), ClassLabel names from the first Parquet file's schema.
    A model without label names takes the ClassLabel's (so top-k labels have names)."""
    from pipeline.sources import relative_path, source_roots

    if source.format == "images" and source.label_from == "folder":
        roots = source_roots(source)
        # strip_protocol, not url_to_fs: ~5 against ~35 us a file, which on a million-file folder is
        # half a minute of the driver's start-up
        names = Counter(folder_of(relative_path(fsspec.core.strip_protocol(u), roots)) for s in shards for u in s.files)
        names.pop(None, None)
        return map_names(names, ckpt.labels, ckpt.config.num_classes, "folder")
    if source.format == "parquet" and source.label_column:
        import pyarrow.parquet as pq

        fs, path = fsspec.core.url_to_fs(shards[0].uri)
        with fs.open(path, "rb") as f:
            names = classlabel_names(pq.read_schema(f), source.label_column)
        if names is None:
            return None
        if not ckpt.labels:
            ckpt.labels = list(names)
        return map_names(names, ckpt.labels, ckpt.config.num_classes, "classlabel")
    return None
