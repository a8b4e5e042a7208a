"""Where the driver's CPU goes: `vitpipe run` under py-spy, its samples sorted into a few roles.

The data-plane benchmark measures the driver's CPU per additional image from two run sizes;
this says what that CPU is: Python imports, Ray's start, Ray Data's scheduling loop (a
per-second cost, not a per-row one), the part records and the sink, the commit. py-spy samples
the driver process only (not its Ray workers), without stopping it (--nonblocking).

    python -m benchmarks.driver_profile SHARDS_DIR OUT_DIR      # needs py-spy (pip install py-spy)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

RATE = 50  # samples per second of CPU

# (role, a pattern any frame of the stack matches), first match wins: an import is an import
# wherever it happens, and Ray Data's loop includes the Ray calls it makes.
ROLES: list[tuple[str, re.Pattern]] = [
    ("Python imports", re.compile(r"_find_and_load")),
    ("Ray Data's scheduling loop", re.compile(r"ray/data/_internal/execution/streaming_executor")),
    ("Ray's start and shutdown", re.compile(r"ray/_private/(worker|node|services)\.py")),
    ("part records and the sink", re.compile(r"pipeline/(sink|ledger|write)\.py|iter_batches|_process \(pipeline")),
    ("model load, listing, labels", re.compile(r"pipeline/(model|sources|labels)/?")),
    ("report page", re.compile(r"pipeline/page\.py|matplotlib")),
]


def role_of(stack: str) -> str:
    for role, pattern in ROLES:
        if pattern.search(stack):
            return role
    return "other"


def roles(raw: list[str], rate: int = RATE) -> dict[str, float]:
    """py-spy's raw (collapsed) output, a line per distinct stack and its count -> CPU-s by role."""
    by_role: Counter[str] = Counter()
    for line in raw:
        stack, _, count = line.rstrip().rpartition(" ")
        if count.isdigit():  # a sample without Python frames: a thread of Ray's C++ core worker
            by_role[role_of(stack) if stack else "native threads (Ray's core worker)"] += int(count)
    return {role: round(n / rate, 2) for role, n in by_role.most_common()}


def profile(cmd: list[str], cwd: Path | None = None) -> dict[str, float]:
    """Run `cmd` (a Python process) under py-spy; its CPU-s by role. Raises if py-spy is missing."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise RuntimeError("py-spy is not installed: pip install py-spy (the driver profile needs it)")
    with tempfile.TemporaryDirectory(prefix="vitpipe-spy-") as tmp:
        raw = Path(tmp) / "driver.txt"
        subprocess.run([spy, "record", "--nonblocking", "-r", str(RATE), "-f", "raw", "-o", str(raw), "--", *cmd],
                       check=True, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return roles(raw.read_text().splitlines())


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="a folder of tar shards")
    p.add_argument("out", help="the output folder (replaced)")
    args = p.parse_args(argv)
    from benchmarks.dataplane import ROOT, vitpipe_cmd

    for role, s in profile(vitpipe_cmd(Path(args.shards), Path(args.out)), cwd=ROOT).items():
        print(f"{s:8.2f} CPU-s  {role}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
