"""Filter-normalized landscapes: normalization, exact restore, quadratic ground truth, scale invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medgcsam.sharpness import compute_landscape, loss_landscape_1d, loss_landscape_2d, random_direction

F64 = torch.float64


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def batches(n: int = 16, shape=(1, 8, 8), dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))]


def test_direction_is_filter_normalized_and_ignores_1d():
    model = small_cnn()
    dirs = random_direction(model, seed=5)
    for p, d in zip(model.parameters(), dirs, strict=True):
        if p.ndim <= 1:
            assert torch.all(d == 0)
        else:
            dn = d.reshape(len(d), -1).norm(dim=1)
            wn = p.detach().reshape(len(p), -1).norm(dim=1)
            torch.testing.assert_close(dn, wn, rtol=1e-6, atol=0)
    again = random_direction(model, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(dirs, again, strict=True))
    assert not torch.equal(dirs[0], random_direction(model, seed=6)[0])
    with pytest.raises(ValueError, match="unknown normalization"):
        random_direction(model, 0, "layer")


def test_centre_equals_unperturbed_loss_and_weights_restored_bitwise():
    model = small_cnn()
    model.train()
    data = batches()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ls = loss_landscape_2d(model, data, alphas=np.linspace(-1, 1, 5), seed=0)
    model.eval()
    with torch.no_grad():
        base = float(F.cross_entropy(model(data[0][0]), data[0][1]))
    assert ls.loss[2, 2] == base
    assert ls.loss.shape == (5, 5) and np.isfinite(ls.loss).all()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_weights_restored_after_exception():
    model = small_cnn()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def failing(out, y):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        loss_landscape_1d(model, batches(), failing, alphas=np.linspace(-1, 1, 5))
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class Quadratic(nn.Module):
    """Outputs logits (L(theta), 0) with L = 1/2 (th - th*)^T A (th - th*); the criterion reads L."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(3, 4, generator=g, dtype=F64))
        self.w2 = nn.Parameter(torch.randn(2, 2, 2, generator=g, dtype=F64))
        self.bias = nn.Parameter(torch.randn(5, generator=g, dtype=F64))
        m = torch.randn(25, 25, generator=g, dtype=F64)
        self.register_buffer("a", m @ m.T)
        self.register_buffer("centre", self.flat().detach().clone())

    def flat(self) -> torch.Tensor:
        return torch.cat([self.w1.reshape(-1), self.w2.reshape(-1), self.bias])

    def forward(self, x):
        d = self.flat() - self.centre
        return torch.stack([0.5 * d @ self.a @ d, torch.zeros((), dtype=F64)]).unsqueeze(0)


def test_quadratic_surface_matches_formula():
    model = Quadratic()
    grid = np.linspace(-1, 1, 7)
    ls = loss_landscape_2d(model, [(torch.zeros(1), torch.zeros(1, dtype=torch.long))], lambda out, y: out[0, 0],
                           alphas=grid, seed=3)
    d1 = torch.cat([d.reshape(-1) for d in random_direction(model, 3)])
    d2 = torch.cat([d.reshape(-1) for d in random_direction(model, 4)])
    assert torch.all(d1[-5:] == 0)  # the 1-D bias is not moved
    a = model.a
    expected = 0.5 * (grid[:, None] ** 2 * float(d1 @ a @ d1) + 2 * grid[:, None] * grid[None, :] * float(d1 @ a @ d2)
                      + grid[None, :] ** 2 * float(d2 @ a @ d2))
    np.testing.assert_allclose(ls.loss, expected, rtol=1e-12, atol=1e-12)


def test_filter_normalization_is_scale_invariant():
    """ReLU MLP: layer 1 x c, layer 2 / c is the same function; filter-normalized curves coincide."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    scaled = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    scaled.load_state_dict(net.state_dict())
    with torch.no_grad():
        scaled[0].weight.mul_(10)
        scaled[0].bias.mul_(10)
        scaled[2].weight.div_(10)
    data = [(torch.randn(64, 6), torch.randint(0, 3, (64,)))]
    grid = np.linspace(-1, 1, 9)
    a = loss_landscape_1d(net, data, alphas=grid, seed=1)
    b = loss_landscape_1d(scaled, data, alphas=grid, seed=1)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    raw_a = loss_landscape_1d(net, data, alphas=grid, seed=1, normalization="none")
    raw_b = loss_landscape_1d(scaled, data, alphas=grid, seed=1, normalization="none")
    assert np.max(np.abs(raw_a.loss - raw_b.loss)) > 0.1


def test_compute_landscape_writes_arrays_and_plots(tmp_path):
    model = small_cnn()
    dataset = torch.utils.data.TensorDataset(*batches(12)[0])
    results = compute_landscape(model, dataset, tmp_path, n_samples=8, batch_size=4, points=5)
    assert [r.loss.ndim for r in results] == [1, 2]
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"landscape_1d.npz", "landscape_2d.npz", "landscape_1d.png", "landscape_2d_contour.png",
                     "landscape_2d_surface.png"}
    with np.load(tmp_path / "landscape_2d.npz") as z:
        assert z["loss"].shape == (5, 5) and np.isfinite(z["loss"]).all()
        np.testing.assert_array_equal(z["alphas"], np.linspace(-1, 1, 5))
    assert all((tmp_path / n).stat().st_size > 5000 for n in names if n.endswith(".png"))


def test_contour_labels_sit_inside_the_frame_and_levels_resolve_the_basin(tmp_path):
    from matplotlib.image import imread

    from medgcsam.sharpness.landscape import Landscape
    from medgcsam.sharpness.plots import contour_levels, label_spots, plot_landscape

    grid = np.linspace(-1, 1, 21)
    a, b = np.meshgrid(grid, grid, indexing="ij")
    loss = 0.2 + 3 * a**2 + 0.8 * b**2 + 0.02 * np.exp(4 * (a + b))  # a steep corner, as real surfaces have
    levels = contour_levels(loss)
    assert levels[0] == loss.min() and levels[-1] == pytest.approx(loss.max()) and (np.diff(levels) > 0).all()
    assert (levels < loss.min() + 0.1 * (loss.max() - loss.min())).sum() > len(levels) / 2  # most in the basin
    ls = Landscape(grid, grid, loss, np.ones_like(loss), 0, "filter")
    spots = label_spots(ls, levels[1::2])
    assert len(spots) >= 3
    assert all(0 < x == y <= 0.85 for _, (x, y) in spots)  # on the diagonal ray, away from the edges
    assert [lv for lv, _ in spots] == sorted(lv for lv, _ in spots)
    path = plot_landscape(ls, tmp_path)[0]
    assert imread(path).shape[1] > imread(path).shape[0]  # the colour bar widens the square plot
