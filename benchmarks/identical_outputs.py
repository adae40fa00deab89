"""Whether two output trees of cilkit runs hold the same numbers: every results.json (wall-clock
figures and provenance left out) and every array of every stored ``.npz`` (scores, logits,
features). What a change that must keep every number is checked with (benchmarks/RESULTS.md,
sections 14 and 16):

    python benchmarks/identical_outputs.py BEFORE_DIR AFTER_DIR [--ignore KEY ...]

``--ignore KEY`` leaves out every results.json entry named KEY, for a change that moves a
diagnostic (not a result) on purpose, and says so: e.g. ``--ignore loss_terms``, the per-state
loss terms of LUCIR, PODNet and SS-IL, which moved to every epoch's line of history.jsonl.
Prints the counts compared and each difference; exits 1 when any.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

TIMING = {"time_s", "train_seconds", "images_per_second", "wall_time_s", "state0_cached", "provenance"}


def without_timings(obj: Any, ignore: frozenset[str] = frozenset()) -> Any:
    if isinstance(obj, dict):
        return {k: without_timings(v, ignore) for k, v in obj.items()
                if k not in TIMING and k not in ignore and not k.endswith("_seconds")}
    if isinstance(obj, list):
        return [without_timings(v, ignore) for v in obj]
    return obj


def differences(before: Path, after: Path, ignore: frozenset[str] = frozenset()) -> tuple[int, int, list[str]]:
    """(results files, arrays, differences) between the trees ``before`` and ``after``."""
    found: list[str] = []
    results = arrays = 0
    for path in sorted(before.rglob("results.json")):
        other = after / path.relative_to(before)
        results += 1
        if not other.is_file() or (without_timings(json.loads(path.read_text()), ignore)
                                   != without_timings(json.loads(other.read_text()), ignore)):
            found.append(str(path.relative_to(before)))
    for path in sorted(before.rglob("*.npz")):
        other = after / path.relative_to(before)
        with np.load(path) as a:
            if not other.is_file():
                found.append(str(path.relative_to(before)))
                continue
            with np.load(other) as b:
                for key in a.files:
                    arrays += 1
                    if key not in b.files or not np.array_equal(a[key], b[key]):
                        found.append(f"{path.relative_to(before)}:{key}")
    return results, arrays, found


def main(argv: list[str]) -> int:
    ignore = frozenset(argv[i + 1] for i, a in enumerate(argv) if a == "--ignore")
    paths = [a for i, a in enumerate(argv) if a != "--ignore" and (i == 0 or argv[i - 1] != "--ignore")]
    results, arrays, found = differences(Path(paths[0]), Path(paths[1]), ignore)
    if ignore:
        print("left out of results.json:", ", ".join(sorted(ignore)))
    for line in found:
        print("differs:", line)
    print(f"{results} results.json, {arrays} arrays, {len(found)} differences")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
