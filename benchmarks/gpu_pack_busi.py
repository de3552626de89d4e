"""Copy BUSI for the GPU machine in fewer bytes, pixel for pixel: an RGB PNG whose three channels are equal is
saved as a 1-channel PNG (BUSI's RGB files are grey but for a few annotated ones, which are copied as they are).

The working tree that travels to the GPU machine is limited to 64 MiB with the wheels; this takes BUSI from about
40 MB to about 28. Every converted file is read back with the product's reader (``medgcsam.data.io.read_image``)
and compared with the original's first channel, so an RGB (``channels: 3``) pipeline gets identical input.

    python benchmarks/gpu_pack_busi.py ../shared/data/busi .gpu_data/busi
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from medgcsam.data.io import read_image


def pack(src: Path, dst: Path) -> tuple[int, int, int]:
    """Files converted, files copied as they are, bytes written; raises if a converted file reads differently."""
    converted = copied = size = 0
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        grey = None
        if path.suffix.lower() == ".png":
            with Image.open(path) as img:
                pixels = np.asarray(img)
            if img.mode == "RGB" and (pixels == pixels[..., :1]).all():
                grey = pixels[..., 0]
        if grey is None:
            shutil.copyfile(path, out)
            copied += 1
        else:
            Image.fromarray(grey).save(out, optimize=True)
            if not np.array_equal(read_image(out)[0], read_image(path)[0]):
                raise RuntimeError(f"{out}: reads differently from {path} after conversion")
            converted += 1
        size += out.stat().st_size
    return converted, copied, size


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    if not (src / "benign").is_dir():
        sys.exit(f"{src}: not the BUSI folder (no benign/); pass the folder that holds benign/, malignant/, normal/")
    converted, copied, size = pack(src, dst)
    print(f"{dst}: {converted} grey PNGs converted (checked pixel for pixel), {copied} files copied, "
          f"{size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
