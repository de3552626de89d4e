"""Markdown table of the recipe runs (JSON lines of plain.py): mean test accuracy / balanced accuracy per tag.

    python benchmarks/recipe/summarize.py docs/results/recipe/bisect.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np


def main(paths: list[str]) -> None:
    runs: dict[str, list[dict]] = defaultdict(list)
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    runs[row["tag"]].append(row)
    print("| run | seeds | test accuracy | balanced accuracy | last-epoch test accuracy | best epoch | epochs run |")
    print("|---|---|---|---|---|---|---|")
    for tag, rows in runs.items():
        rows.sort(key=lambda r: r["seed"])

        def cell(key: str, rows: list[dict] = rows) -> str:
            x = np.array([r[key] for r in rows])
            return f"{x.mean():.3f}" + (f" ± {x.std(ddof=1):.3f}" if len(x) > 1 else "")

        epochs = ", ".join(str(r["best_epoch"]) for r in rows)
        run = ", ".join(str(r["epochs_run"]) for r in rows)
        print(f"| {tag} | {', '.join(str(r['seed']) for r in rows)} | {cell('test_acc')} | {cell('test_bacc')} | "
              f"{cell('last_test_acc')} | {epochs} | {run} |")


if __name__ == "__main__":
    main(sys.argv[1:])
