"""Histogram of OOD scores on the three sets and the separation figures quoted in README.md.

Reads the predictions CSVs written by `medgcsam predict` / `validate-external` (column ``ood_score``)
and the threshold from the model's MLflow run; writes ood_scores.png beside this script.
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402


def main(threshold: float, sets: dict[str, Path]) -> None:
    """Flag rates, AUROC of each set's scores against the internal test's, and the histogram (``threshold``
    only draws the line)."""
    tables = {name: pd.read_csv(path) for name, path in sets.items()}
    scores = {name: t["ood_score"].to_numpy() for name, t in tables.items()}
    inside = scores["internal test"]
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, max(s.max() for s in scores.values()), 40)
    for name, s in scores.items():
        flags = tables[name]["ood_flag"].astype(str).eq("True")  # as predict wrote them, not re-thresholded
        flagged = flags.mean()
        auroc = roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(s))], np.r_[inside, s])
        print(f"{name}: n={len(s)} flagged {int(flags.sum())} ({100 * flagged:.1f}%), median score "
              f"{np.median(s):.1f}, AUROC vs internal test {auroc:.3f}")
        ax.hist(s, bins=bins, alpha=0.5, density=True, label=f"{name} (n={len(s)}, {100 * flagged:.0f}% flagged)")
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.1f} (5% of validation)")
    ax.set_xlabel("OOD score (Mahalanobis distance to the nearest class mean)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(__file__).with_name("ood_scores.png"), dpi=110)


if __name__ == "__main__":
    main(float(sys.argv[1]), {"internal test": Path(sys.argv[2]), "held-back test ('external')": Path(sys.argv[3]),
                              "BUSI ultrasound": Path(sys.argv[4])})
