"""PNG figures for the spectral density and the loss landscapes (Agg backend, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm  # noqa: E402

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
    fig, ax = plt.subplots(figsize=(6, 5))
    levels = contour_levels(ls.loss)
    # one colour step per band, not per loss unit: the bands near the weights stay distinguishable
    filled = ax.contourf(a, b, ls.loss, levels=levels, cmap="viridis", norm=BoundaryNorm(levels, 256))
    fig.colorbar(filled, ax=ax, label="loss")
    lines = ax.contour(a, b, ls.loss, levels=levels, colors="white", linewidths=0.6)
    spots = label_spots(ls, levels[1::2])
    if spots:
        ax.clabel(lines, levels=[lv for lv, _ in spots], manual=[xy for _, xy in spots], inline=True,
                  inline_spacing=4, fontsize=7, fmt="%.3g")
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


def contour_levels(loss: np.ndarray, n: int = 12) -> np.ndarray:
    """Levels spaced geometrically above the minimum: a loss surface is flat near the weights and steep at the
    edges, and evenly spaced levels crowd the edges while leaving the basin, the part of interest, bare."""
    low, high = float(np.nanmin(loss)), float(np.nanmax(loss))
    if not high > low:
        return np.array([low, low + 1.0])
    return low + (high - low) * np.concatenate([[0.0], np.geomspace(1e-3, 1.0, n)])


def label_spots(ls: Landscape, levels: np.ndarray, reach: float = 0.85) -> list[tuple[float, tuple[float, float]]]:
    """Where each level first crosses the diagonal ray from the weights, within ``reach`` of the grid's edge:
    labels in a row through the basin, none in the frame's corners (matplotlib's own placement piled them
    there). Levels the ray does not reach stay unlabelled; the colour bar reads them."""
    from scipy.interpolate import RegularGridInterpolator

    surface = RegularGridInterpolator((ls.alphas, ls.betas), ls.loss)
    t = np.linspace(0.0, reach * min(ls.alphas.max(), ls.betas.max()), 200)
    along = surface(np.column_stack([t, t]))
    spots = []
    for level in levels:
        above = np.flatnonzero(along >= level)
        if len(above) and above[0] > 0:
            spots.append((float(level), (float(t[above[0]]), float(t[above[0]]))))
    return spots
