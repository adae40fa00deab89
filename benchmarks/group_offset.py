"""Where a class-incremental run's errors come from, old group against new group, from its stored
test logits (``scores/state_XX.npz``): per state from 2 on, top-1; top-1 within the true class's
group (the old classes, or the state's new ones: the decision the separated softmax of SS-IL
trains); the share of images whose top class is in the right group (the decision it leaves to
the offset between the groups' logits); the share of predictions in the new group; and that
offset (mean over the test images of the new group's largest logit minus the old group's).
Mean over the runs found under the RUN_DIRs (runs, or comparisons' parents), per method and
protocol (the classes seen after each state: one method's runs on two protocols are two
groups); a group's last line is the mean over its states (benchmarks/RESULTS.md, section 26):

    python benchmarks/group_offset.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from cilkit.rundir.readers import read_state_scores


def state_figures(logits: np.ndarray, labels: np.ndarray, n_old: int) -> dict[str, float]:
    """The figures of one state (``n_old`` classes before the state's new ones)."""
    old, new = logits[:, :n_old], logits[:, n_old:]
    is_new = labels >= n_old
    pred = logits.argmax(1)
    within = np.where(is_new, new.argmax(1) + n_old, old.argmax(1))
    return {
        "top1": 100 * float((pred == labels).mean()),
        "within group": 100 * float((within == labels).mean()),
        "right group": 100 * float(((pred >= n_old) == is_new).mean()),
        "new share": 100 * float((pred >= n_old).mean()),
        "offset": float((new.max(1) - old.max(1)).mean()),
    }


def run_figures(run: Path) -> tuple[str, tuple[int, ...], list[dict[str, float]]]:
    """(method, classes seen after each state, each incremental state's figures) of one run."""
    results = json.loads((run / "results.json").read_text())
    ends = results["state_ends"]
    rows = []
    for b in range(1, len(ends)):
        logits, labels = read_state_scores(run / "scores" / f"state_{b:02d}.npz", ends[b])
        rows.append(state_figures(logits[:, :ends[b]], labels, ends[b - 1]))
    return results["method"], tuple(ends), rows


def main(dirs: list[str]) -> None:
    groups: dict[tuple[str, tuple[int, ...]], list[list[dict[str, float]]]] = defaultdict(list)
    for d in dirs:
        for res in sorted(Path(d).glob("**/results.json")):
            if (res.parent / "scores").is_dir():
                method, ends, rows = run_figures(res.parent)
                groups[method, ends].append(rows)
    for (method, ends), runs in groups.items():
        seen = ", ".join(map(str, ends))
        print(f"{method}, classes seen {seen} ({len(runs)} runs): state | " + " | ".join(runs[0][0]))
        per_state = [{k: np.mean([r[b][k] for r in runs]) for k in runs[0][b]} for b in range(len(runs[0]))]
        for b, means in enumerate(per_state):
            print(f"  {b + 2} | " + " | ".join(f"{v:.2f}" for v in means.values()))
        print("  mean | " + " | ".join(f"{np.mean([m[k] for m in per_state]):.2f}" for k in per_state[0]))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
