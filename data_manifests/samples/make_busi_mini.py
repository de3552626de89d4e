"""Recreate ``busi_mini/``: a seeded random 32 images per BUSI class, grey, 96 x 96 PNG.

Run from the repository root with the BUSI copy at ../shared/data/busi (or pass another path):

    python data_manifests/samples/make_busi_mini.py ../shared/data/busi
    python -m medgcsam manifest build --format busi data_manifests/samples/busi_mini \
        -o data_manifests/samples/busi_mini.csv
    python -m medgcsam manifest split data_manifests/samples/busi_mini.csv --seed 0

``malignant (145).png`` is skipped: it is byte-identical to ``benign (433).png`` (label leakage).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image

PER_CLASS = 32
SIZE = 96
SKIP = {"malignant (145).png", "benign (433).png"}


def main(src: Path, dst: Path) -> None:
    rng = random.Random(0)
    for cls in ("benign", "malignant", "normal"):
        files = sorted(p for p in (src / cls).glob("*.png") if "_mask" not in p.stem and p.name not in SKIP)
        out = dst / cls
        out.mkdir(parents=True, exist_ok=True)
        for file in rng.sample(files, PER_CLASS):
            with Image.open(file) as img:
                grey = img.convert("L")
                grey.thumbnail((SIZE, SIZE), Image.Resampling.LANCZOS)
                grey.save(out / file.name, optimize=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/busi"), Path(__file__).parent / "busi_mini")
