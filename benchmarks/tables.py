"""Where a benchmark's rows go: --out/--name .json (the rows) and .md (the table), and stdout."""

from __future__ import annotations

import json
from pathlib import Path


def write_table(out: str | Path, name: str, rows: list[dict], lines: list[str]) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
