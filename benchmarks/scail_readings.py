"""ScaIL's readings on a finished fine-tuning run, from its stored test features and classifiers:
the mean incremental top-1 (excluding state 1) and the per-state top-1 of ``reading`` code / rank
with ``top_rewinded`` 10 and 1 (``benchmarks/RESULTS.md``, section 17).

    python benchmarks/scail_readings.py RUN_DIR
"""
import json
import sys

import numpy as np
import torch

from cilkit.cil.rectify import scail_classifier, scail_scores


def main(run: str) -> None:
    with open(f"{run}/results.json") as f:
        ends = json.load(f)["state_ends"]
    z = [np.load(f"{run}/scores/state_{b:02d}.npz") for b in range(len(ends))]
    heads = [(torch.from_numpy(a["head_weight"]), torch.from_numpy(a["head_bias"])) for a in z]
    for reading in ("code", "rank"):
        for top in (10, 1):
            accs = []
            for b in range(1, len(ends)):
                w, bias = heads[b]
                scaled = scail_classifier(w, bias, heads[:b], ends[: b + 1], reading)
                s = scail_scores(torch.from_numpy(z[b]["features"]), w, bias, scaled, ends[b - 1], top)
                accs.append(float((s.argmax(1).numpy() == z[b]["labels"]).mean() * 100))
            print(reading, top, round(np.mean(accs), 2), [round(a, 1) for a in accs])


if __name__ == "__main__":
    main(sys.argv[1])
