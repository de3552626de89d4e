"""Paired comparison over seeds: the product's runs (``medgcsam train`` output folders, one per seed, named
``<prefix>-s<seed>``) against plain.py's JSON lines with the same seeds; test accuracy and balanced accuracy.

    python benchmarks/recipe/compare.py --runs /tmp/recipe/prod --prefix fixed --plain plain.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medgcsam.experiments.stats import paired_comparison, summarize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, required=True, help="output_dir of the medgcsam train runs")
    ap.add_argument("--prefix", default="fixed")
    ap.add_argument("--plain", type=Path, required=True)
    ap.add_argument("--tag", default="plain")
    a = ap.parse_args()
    plain = {}
    for line in a.plain.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["tag"] == a.tag:
            plain[row["seed"]] = {"accuracy": row["test_acc"], "balanced_accuracy": row["test_bacc"]}
    product = {}
    for seed in sorted(plain):
        path = a.runs / f"{a.prefix}-s{seed}" / "evaluation" / "evaluation.json"
        if path.is_file():
            head = json.loads(path.read_text(encoding="utf-8"))["splits"]["test"]["headline"]
            product[seed] = {k: head[k] for k in ("accuracy", "balanced_accuracy")}
    seeds = sorted(set(plain) & set(product))
    print(f"seeds {seeds}")
    for key in ("accuracy", "balanced_accuracy"):
        p, q = [product[s][key] for s in seeds], [plain[s][key] for s in seeds]
        sp, sq, d = summarize(p), summarize(q), paired_comparison(p, q)
        print(f"test {key}: product {sp.mean:.3f} (per seed {', '.join(f'{v:.3f}' for v in p)}), plain {sq.mean:.3f} "
              f"(per seed {', '.join(f'{v:.3f}' for v in q)}); product - plain {d.mean_diff:+.3f}, 95% t-interval "
              f"[{d.low:+.3f}, {d.high:+.3f}], {d.wins} better / {d.losses} worse, sign-flip p {d.p_sign_flip:.2f}")


if __name__ == "__main__":
    main()
