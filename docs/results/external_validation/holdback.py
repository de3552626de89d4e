"""Hold back every third usable test row of the PneumoniaMNIST manifest as a pseudo-external site.

Writes the training manifest (those rows excluded, so the internal test never sees them) and the
external manifest (the same rows, no split or fold: validate-external needs none).
"""

import csv
import sys
from pathlib import Path

REASON = "held back as the external set (docs/results/external_validation)"


def main(src: Path, out_dir: Path) -> None:
    """Split ``src`` into ``out_dir``/train_manifest.csv and ``out_dir``/external_manifest.csv."""
    with src.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = list(reader.fieldnames or []), list(reader)
    test = sorted((r for r in rows if r["split"] == "test" and not r["exclude_reason"]), key=lambda r: r["path"])
    held = {r["path"] for r in test[::3]}
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "train_manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fields)
        w.writeheader()
        w.writerows({**r, "exclude_reason": REASON} if r["path"] in held else r for r in rows)
    with (out_dir / "external_manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fields)
        w.writeheader()
        w.writerows({**r, "split": "", "fold": "", "source": "pneumoniamnist-heldback"}
                    for r in rows if r["path"] in held)
    print(f"held back {len(held)} of {len(test)} test rows")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
