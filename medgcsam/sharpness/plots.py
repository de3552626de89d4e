"""PNG figures for the spectral density and the loss landscapes (Agg backend, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medgcsam.sharpness.landscape import Landscape  # noqa: E402
from medgcsam.sharpness.spectrum import Density  # noqa: E402
from medgcsam.tracking.figures import save_png  # noqa: E402


def plot_density(density: Density, path: Path) -> Path:
    """Smoothed eigenvalue density on a log axis (the form PyHessian papers print)."""
    grid, dens = density.curve()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(grid, dens + 1e-7)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log)")
    ax.set_title(f"Hessian spectral density (SLQ, {len(density.nodes)} run(s))")
    return save_png(fig, path)


def plot_landscape(ls: Landscape, out_dir: Path, stem: str = "landscape") -> list[Path]:
    """1-D: loss and accuracy curves. 2-D: contour and 3-D surface (``projection='3d'``)."""
    paths = []
    if ls.betas is None:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(ls.alphas, ls.loss, "b-", label="loss")
        ax.set_xlabel("alpha (filter-normalized direction)" if ls.normalization == "filter" else "alpha")
        ax.set_ylabel("loss", color="b")
        ax2 = ax.twinx()
        ax2.plot(ls.alphas, 100 * ls.accuracy, "r--", label="accuracy")
        ax2.set_ylabel("accuracy (%)", color="r")
        ax2.set_ylim(0, 100)
        paths.append(save_png(fig, out_dir / f"{stem}_1d.png"))
        return paths
    a, b = np.meshgrid(ls.alphas, ls.betas, indexing="ij")
    fig, ax = plt.subplots(figsize=(5, 5))
    cs = ax.contour(a, b, ls.loss, levels=20, cmap="summer")
    ax.clabel(cs, inline=True, fontsize=7)
    ax.plot(0, 0, "k+")
    ax.set_xlabel("alpha")
    ax.set_ylabel("beta")
    paths.append(save_png(fig, out_dir / f"{stem}_2d_contour.png"))
    fig = plt.figure(figsize=(6, 5))
    ax3 = fig.add_subplot(projection="3d")
    ax3.plot_surface(a, b, ls.loss, cmap="coolwarm", linewidth=0, antialiased=True)
    ax3.set_xlabel("alpha")
    ax3.set_ylabel("beta")
    ax3.set_zlabel("loss")
    paths.append(save_png(fig, out_dir / f"{stem}_2d_surface.png"))
    return paths
