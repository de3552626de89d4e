"""Hessian machinery against analytic ground truth (validation plan, hessian.md section 5 A-D)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from medgcsam.config import SharpnessConfig
from medgcsam.sharpness import (
    HessianOperator,
    certified,
    compute_sharpness,
    hutchinson_trace,
    lanczos,
    lanczos_top_eigs,
    measured_residuals,
    power_iteration,
    slq_density,
    start_vector,
)
from medgcsam.sharpness import memory as memory_module
from medgcsam.sharpness.memory import free_memory, graph_bytes

F64 = torch.float64


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q


def designed(eigs: np.ndarray, seed: int = 0) -> torch.Tensor:
    q = _orthogonal(len(eigs), seed)
    return q @ torch.diag(torch.as_tensor(eigs, dtype=F64)) @ q.T


class Quadratic(nn.Module):
    """Loss 1/2 th^T A th + b^T th over parameters of mixed shapes; ``forward`` returns the loss."""

    def __init__(self, a: torch.Tensor, dtype: torch.dtype = F64) -> None:
        super().__init__()
        self.register_buffer("a", a.to(dtype))
        self.b = nn.Parameter(torch.linspace(-1, 1, len(a), dtype=dtype).view(-1).clone(), requires_grad=False)
        self.w1 = nn.Parameter(torch.randn(4, 3, dtype=dtype))
        self.w2 = nn.Parameter(torch.randn(5, dtype=dtype))
        self.w3 = nn.Parameter(torch.randn(2, 2, 3, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        th = torch.cat([self.w1.reshape(-1), self.w2, self.w3.reshape(-1)])
        return 0.5 * th @ self.a @ th + self.b @ th


def identity_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out


def dense_hessian(model: nn.Module, batches, criterion=F.cross_entropy) -> torch.Tensor:
    op = HessianOperator(model, batches, criterion)
    total = sum(len(y) for _, y in batches)

    def loss(theta):
        params = dict(zip(op.names, op.split(theta), strict=True))
        return sum(criterion(functional_call(model, params, (x,)), y) * len(y) / total for x, y in batches)

    return torch.autograd.functional.hessian(loss, op.flatten(), vectorize=True)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).to(F64)


def conv_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).to(F64)


def data(n: int, shape: tuple[int, ...], seed: int = 0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


# --- A. HVP --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["rev", "fwd"])
def test_hvp_quadratic_exact(method):
    a = designed(np.linspace(-2, 3, 29))
    model = Quadratic(a)
    op = HessianOperator(model, [(torch.zeros(1), torch.zeros(1))], identity_loss, method=method)
    assert op.dim == 29
    v = torch.randn(29, dtype=F64)
    assert torch.linalg.norm(op(v) - a @ v) / torch.linalg.norm(a @ v) < 1e-12
    model32 = Quadratic(a, torch.float32)
    op32 = HessianOperator(model32, [(torch.zeros(1), torch.zeros(1))], identity_loss, method=method)
    hv = op32(v.float()).double()
    assert torch.linalg.norm(hv - a @ v) / torch.linalg.norm(a @ v) < 1e-5


@pytest.mark.parametrize("make,shape", [(mlp, (10,)), (conv_bn, (2, 6, 6))])
def test_hvp_matches_dense_hessian(make, shape):
    model = make().eval()
    batches = [data(24, shape)]
    h = dense_hessian(model, batches)
    assert torch.allclose(h, h.T, atol=1e-12)
    v = torch.randn(len(h), dtype=F64)
    for method in ("rev", "fwd"):
        hv = HessianOperator(model, batches, method=method)(v)
        assert torch.linalg.norm(hv - h @ v) / torch.linalg.norm(h @ v) < 1e-10, method


def test_dataset_operator_weights_unequal_batches():
    model = mlp().eval()
    x, y = data(71, (10,))
    split = [(x[:32], y[:32]), (x[32:64], y[32:64]), (x[64:], y[64:])]
    v = torch.randn(HessianOperator(model, [(x, y)]).dim, dtype=F64)
    for method in ("rev", "fwd"):
        whole = HessianOperator(model, [(x, y)], method=method)(v)
        parts = HessianOperator(model, split, method=method)(v)
        assert torch.linalg.norm(parts - whole) / torch.linalg.norm(whole) < 1e-12


def test_hvp_attention_under_math_kernel():
    """Fused SDPA has no double-backward / forward-AD; the operator must still work and agree."""
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.mha(x, x, x, need_weights=False)[0].mean(dim=1))

    model = Attn().eval()
    batches = [data(6, (5, 8), dtype=torch.float32)]
    v = torch.randn(HessianOperator(model, batches).dim)
    rev = HessianOperator(model, batches, method="rev")(v)
    fwd = HessianOperator(model, batches, method="fwd")(v)
    assert torch.isfinite(rev).all()
    assert torch.linalg.norm(rev - fwd) / torch.linalg.norm(rev) < 1e-4


def test_unused_parameters_give_zero_curvature():
    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()
            self.unused = nn.Linear(3, 2).to(F64)  # a frozen-branch stand-in: never called

        def forward(self, x):
            return self.net(x)

    op = HessianOperator(WithUnused().eval(), [data(8, (10,))])
    hv = op(torch.ones(op.dim, dtype=F64))
    assert torch.all(hv[-8:] == 0) and torch.any(hv[:-8] != 0)


# --- B. top eigenvalues --------------------------------------------------------------------------

SPECTRUM = np.r_[10.0, 5.0, 4.0, np.random.default_rng(0).uniform(-1, 1, 197)]


def test_lanczos_designed_spectrum_certified():
    a = designed(SPECTRUM)
    res = lanczos_top_eigs(lambda v: a @ v, 200, k=3, max_steps=80, tol=1e-10, dtype=F64, return_vectors=True)
    np.testing.assert_allclose(res.values, [10, 5, 4], rtol=1e-8)
    assert res.converged and all(r <= 1e-10 * abs(v) for r, v in zip(res.residuals, res.values, strict=True))
    evecs = torch.linalg.eigh(a).eigenvectors[:, [-1, -2, -3]]
    cos = torch.abs(torch.sum(evecs * res.vectors.T, dim=0))
    assert torch.all(cos >= 1 - 1e-6)
    # the residual really is ||A u - theta u||
    u = res.vectors[0]
    assert float(torch.linalg.norm(a @ u - res.values[0] * u)) == pytest.approx(res.residuals[0], abs=1e-9)


def test_lanczos_basis_stays_orthonormal_in_float32_after_convergence():
    """Once the top Ritz value converges, plain Lanczos loses orthogonality and repeats it (ghosts);
    the recurrence plus one reorthogonalising pass must keep Q^T Q = I to float32 working precision."""
    a = designed(np.r_[1000.0, 900.0, np.linspace(-1, 1, 398)], seed=4).float()
    run = lanczos(lambda v: a @ v, torch.ones(400), 60)
    q = run.basis.double()
    assert float(torch.max(torch.abs(q @ q.T - torch.eye(len(q), dtype=F64)))) < 1e-5
    theta, _ = run.ritz()
    assert np.sum(np.abs(theta - 1000.0) < 1e-2) == 1  # no ghost copy of the top eigenvalue
    assert theta[-1] == pytest.approx(1000.0, rel=1e-6)


def test_measured_residual_is_what_the_vector_satisfies_not_exact_arithmetic():
    """Lanczos's estimate |beta_m s_m| kept shrinking to ~1e-11 on a float32 operator whose products carry
    ~1e-4 of rounding; the measured residual reports the latter, and needs the Ritz vectors."""
    a = designed(np.r_[1000.0, 10.0, np.linspace(-1, 1, 198)], seed=5).float()
    res = lanczos_top_eigs(lambda v: a @ v, 200, k=1, max_steps=40, tol=1e-12, return_vectors=True)
    measured = measured_residuals(lambda v: a @ v, res)
    u = res.vectors[0].double() / torch.linalg.norm(res.vectors[0].double())
    direct = float(torch.linalg.norm(a.double() @ u - res.values[0] * u))  # float64 product, same vector
    assert measured[0] == pytest.approx(direct, rel=0.5)
    assert res.converged and res.residuals[0] < 1e-5 * measured[0]
    with pytest.raises(ValueError, match="return_vectors=True"):
        measured_residuals(lambda v: a @ v, lanczos_top_eigs(lambda v: a @ v, 200, k=1, max_steps=40))


def test_an_eigenvalue_at_zero_can_be_certified():
    """A relative test alone can never pass at theta ~ 0 once residuals are measured in float32 (1e-7 against
    theta = 1e-8); ARPACK's floor eps**(2/3) lets it, and still refuses a residual above tol times that floor."""
    d = torch.tensor([0.0, -1.0, -2.0, -3.0, -5.0])
    res = lanczos_top_eigs(lambda v: v * d, 5, k=1, max_steps=5, tol=1e-2, return_vectors=True)
    measured = measured_residuals(lambda v: v * d, res)
    assert abs(res.values[0]) < 1e-6 and measured[0] > 1e-2 * abs(res.values[0])  # relative test fails
    assert certified(measured, res.values, 1e-2, torch.float32)
    assert not certified([1e-3], [0.0], 1e-2, torch.float32)
    assert certified([9e-3], [1.0], 1e-2, torch.float32) and not certified([2e-2], [1.0], 1e-2, torch.float32)


def test_top_k_beyond_the_lanczos_steps_is_refused_by_the_config():
    with pytest.raises(ValueError, match="top_k=5 needs lanczos_steps >= 5"):
        SharpnessConfig(top_k=5, lanczos_steps=3)
    assert SharpnessConfig(top_k=5, lanczos_steps=3, method="power").top_k == 5  # power iterates per eigenvalue


def test_lanczos_float32_at_network_size_is_accurate():
    """At millions of float32 entries a plain BLAS norm is off by ~1e-4, which put the top Ritz value *above*
    the top eigenvalue (1000.45 for 1000) and the next ones off by 2e-3; chunked float64 sums fix it."""
    n = 4_000_000
    d = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 2 + 1.0
    d[:3] = torch.tensor([1000.0, 400.0, 150.0])
    res = lanczos_top_eigs(lambda v: v * d, n, k=3, max_steps=30, tol=1e-9, seed=0)
    np.testing.assert_allclose(res.values, [1000.0, 400.0, 150.0], rtol=2e-5)
    assert res.values[0] <= 1000.0 * (1 + 1e-6)  # a Ritz value never exceeds the largest eigenvalue
    trace = hutchinson_trace(lambda v: v * d, n, n_probes=2, seed=0)
    assert trace.mean == pytest.approx(float(d.double().sum()), rel=1e-6)  # exact for a diagonal operator


def test_power_iteration_tight_and_pyhessian_mode():
    a = designed(SPECTRUM)
    tight = power_iteration(lambda v: a @ v, 200, k=1, max_iter=1000, tol=1e-8, dtype=F64)
    assert tight.values[0] == pytest.approx(10.0, rel=1e-5)
    compat = power_iteration(lambda v: a @ v, 200, k=3, dtype=F64)  # PyHessian defaults: 100 iters, tol 1e-3
    np.testing.assert_allclose(compat.values, [10, 5, 4], rtol=1e-2)
    assert compat.hvps <= 300


def test_negative_dominant_spectrum_semantics():
    a = designed(np.r_[-8.0, 5.0, np.linspace(-1, 1, 48)])
    power = power_iteration(lambda v: a @ v, 50, max_iter=1000, tol=1e-10, dtype=F64)
    assert power.values[0] == pytest.approx(-8.0, rel=1e-6)  # largest |lambda|, as PyHessian
    lz = lanczos_top_eigs(lambda v: a @ v, 50, max_steps=50, tol=1e-10, dtype=F64)
    assert lz.values[0] == pytest.approx(5.0, rel=1e-8)  # algebraically largest
    assert lz.min_value == pytest.approx(-8.0, rel=1e-8)


def test_lanczos_on_mlp_matches_eigvalsh():
    model = mlp().eval()
    batches = [data(40, (10,))]
    exact = torch.linalg.eigvalsh(dense_hessian(model, batches)).flip(0)[:3].numpy()
    op = HessianOperator(model, batches)
    res = lanczos_top_eigs(op, op.dim, k=3, max_steps=100, tol=1e-9, dtype=F64)
    np.testing.assert_allclose(res.values, exact, rtol=1e-6)
    assert op.hvp_count == res.hvps


def test_operator_gradient_is_the_weighted_mean_gradient():
    model = conv_bn().eval()
    batches = [data(3, (2, 6, 6), seed=1), data(5, (2, 6, 6), seed=2)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    expected = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    expected = torch.cat([g.reshape(-1) for g in expected])
    torch.testing.assert_close(HessianOperator(model, batches).gradient(), expected)
    single = HessianOperator(model, [(x, y)])
    torch.testing.assert_close(single.gradient(), expected)  # read off the graph the products keep
    assert single.hvp_count == 0 and single.graphs_kept
    fwd = HessianOperator(model, batches, method="fwd")
    torch.testing.assert_close(fwd.gradient(), expected)
    assert fwd.graphs_kept is None


def test_several_batches_keep_their_graphs_when_they_fit_and_rebuild_them_when_not():
    model = conv_bn().eval()
    batches = [data(16, (2, 6, 6), seed=s) for s in range(3)]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    v = torch.randn(HessianOperator(model, batches).dim, dtype=F64)
    whole = HessianOperator(model, [(x, y)])(v)
    first = HessianOperator(model, batches)._first_order(*batches[0])
    need = 2 * graph_bytes(first, exclude=[*model.parameters(), *batches[0]])  # the two other graphs
    assert 0 < need < 2 * graph_bytes(first)  # parameters and inputs exist anyway: not counted
    for memory, kept in [(None, True), (need, True), (need - 1, False), (0, False)]:
        op = HessianOperator(model, batches, graph_memory=memory)
        first, second = op(v), op(v)  # the second product runs on kept graphs, or on rebuilt ones
        assert op.graphs_kept is kept, memory
        assert sum(g is not None for g in op._graphs) == (3 if kept else 0)
        assert torch.linalg.norm(first - whole) / torch.linalg.norm(whole) < 1e-12
        assert torch.equal(first, second)


def test_the_estimate_scales_a_small_first_batch_to_the_others():
    model = conv_bn().eval()
    batches = [data(2, (2, 6, 6), seed=0), data(48, (2, 6, 6), seed=1), data(48, (2, 6, 6), seed=2)]
    big = graph_bytes(HessianOperator(model, batches)._first_order(*batches[1]), exclude=[*model.parameters(),
                                                                                         *batches[1]])
    op = HessianOperator(model, batches, graph_memory=int(1.8 * big))  # less than the two big graphs need
    op(torch.ones(op.dim, dtype=F64))
    assert op.graphs_kept is False


def test_kept_graphs_follow_the_weights():
    model = conv_bn().eval()
    batches = [data(8, (2, 6, 6), seed=s) for s in range(2)]
    op = HessianOperator(model, batches)
    v = torch.randn(op.dim, dtype=F64)
    op(v)
    assert op.graphs_kept
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # in place: bumps the version
    torch.testing.assert_close(op(v), HessianOperator(model, batches, graph_memory=0)(v), rtol=1e-12, atol=0)
    vector = torch.nn.utils.parameters_to_vector(model.parameters())
    torch.nn.utils.vector_to_parameters(vector * 0.7, model.parameters())  # .data assignment: new storage
    torch.testing.assert_close(op(v), HessianOperator(model, batches, graph_memory=0)(v), rtol=1e-12, atol=0)


def test_a_saved_sparse_tensor_neither_breaks_the_estimate_nor_the_products():
    class Graph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3).to(F64)
            self.register_buffer("adj", torch.eye(6, dtype=F64).to_sparse())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sparse.mm(self.adj, torch.tanh(self.lin(x)))

    model = Graph().eval()
    batches = [data(6, (4,), seed=s) for s in range(2)]
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    kept, rebuilt = HessianOperator(model, batches), HessianOperator(model, batches, graph_memory=0)
    torch.testing.assert_close(kept(v), rebuilt(v), rtol=1e-12, atol=0)
    assert kept.graphs_kept and graph_bytes([model.adj]) > 0


def test_graph_bytes_grow_with_the_batch_and_count_shared_storage_once():
    model = conv_bn().eval()
    op = HessianOperator(model, [data(1, (2, 6, 6))])
    sizes = [graph_bytes(op._first_order(*data(n, (2, 6, 6)))) for n in (16, 32, 64)]
    assert sizes[0] < sizes[1] < sizes[2]
    assert sizes[2] - sizes[1] == pytest.approx(2 * (sizes[1] - sizes[0]), rel=0.05)  # linear in the batch
    t = torch.ones(1000, dtype=F64)
    assert graph_bytes([t, t[:10]]) == 8000  # one storage; no graph
    assert graph_bytes([t, t[:10]], exclude=[t[5:]]) == 0


def fake_cgroups(tmp: Path, monkeypatch, proc_cgroup: str, mountinfo: str) -> None:
    (tmp / "self").mkdir()
    (tmp / "self" / "cgroup").write_text(proc_cgroup)
    (tmp / "self" / "mountinfo").write_text(mountinfo)
    (tmp / "meminfo").write_text("MemTotal: 99999999 kB\nMemAvailable: 8388608 kB\n")  # 8 GiB
    monkeypatch.setattr(memory_module, "PROC_SELF", tmp / "self")
    monkeypatch.setattr(memory_module, "MEMINFO", tmp / "meminfo")


def write_cgroup(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_free_memory_takes_the_tightest_cgroup_limit_of_the_process_and_its_ancestors(tmp_path, monkeypatch):
    cpu, gib = torch.device("cpu"), 2**30
    root = tmp_path / "cg2"
    fake_cgroups(tmp_path, monkeypatch, "0::/slurm/job7/step0\n",
                 f"30 20 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw\n")
    write_cgroup(root / "slurm" / "job7" / "step0", {"memory.max": "max\n", "memory.current": "1\n"})
    write_cgroup(root / "slurm" / "job7", {"memory.max": f"{4 * gib}\n", "memory.current": f"{3 * gib}\n",
                                           "memory.stat": f"anon 5\ninactive_file {gib // 2}\n"})
    write_cgroup(root / "slurm", {"memory.max": f"{64 * gib}\n", "memory.current": f"{10 * gib}\n"})
    assert free_memory(cpu) == 4 * gib - (3 * gib - gib // 2)  # the job's limit, page cache reclaimable
    write_cgroup(root / "slurm" / "job7", {"memory.max": "max\n"})
    assert free_memory(cpu) == 8 * gib  # MemAvailable is then the tightest
    assert free_memory(torch.device("meta")) == 0


def test_free_memory_reads_a_cgroup_v1_memory_mount_with_its_own_root(tmp_path, monkeypatch):
    gib, mount = 2**30, tmp_path / "memory"
    fake_cgroups(tmp_path, monkeypatch, "5:cpu:/\n4:memory:/docker/abc\n0::/\n",
                 f"40 20 0:30 /docker/abc {mount} rw - cgroup cgroup rw,memory\n")
    write_cgroup(mount, {"memory.limit_in_bytes": f"{2 * gib}\n", "memory.usage_in_bytes": f"{gib}\n",
                         "memory.stat": f"total_inactive_file {gib // 4}\n"})
    assert free_memory(torch.device("cpu")) == 2 * gib - (gib - gib // 4)
    write_cgroup(mount, {"memory.limit_in_bytes": "9223372036854771712\n"})  # v1's "no limit"
    assert free_memory(torch.device("cpu")) == 8 * gib


def test_gradient_start_finds_the_top_eigenvalue_in_fewer_products():
    model = mlp(3).eval()
    batches = [data(60, (10,), seed=3)]
    exact = float(torch.linalg.eigvalsh(dense_hessian(model, batches))[-1])
    runs = {}
    for start in ("random", "gradient"):
        op = HessianOperator(model, batches)
        direction = op.gradient() if start == "gradient" else None
        runs[start] = lanczos_top_eigs(op, op.dim, max_steps=100, tol=1e-4, dtype=F64, start=direction)
        assert runs[start].converged and runs[start].values[0] == pytest.approx(exact, rel=1e-6)
    assert runs["gradient"].hvps < runs["random"].hvps


def test_start_direction_orthogonal_to_the_top_eigenvector_still_finds_it():
    a = designed(SPECTRUM)
    second = torch.linalg.eigh(a).eigenvectors[:, -2]  # the worst start: exactly the second eigenvector
    res = lanczos_top_eigs(lambda v: a @ v, 200, max_steps=80, tol=1e-10, dtype=F64, start=second)
    assert res.values[0] == pytest.approx(10.0, rel=1e-8)
    v = start_vector(200, 0, F64, "cpu", direction=torch.zeros(200, dtype=F64))
    torch.testing.assert_close(v, start_vector(200, 0, F64, "cpu"))  # zero gradient: the Gaussian start
    assert float(v.norm()) == pytest.approx(1.0)


# --- C. trace ------------------------------------------------------------------------------------

def test_hutchinson_diagonal_exact_with_one_probe():
    d = torch.linspace(-3, 7, 100, dtype=F64)
    t = hutchinson_trace(lambda v: d * v, 100, n_probes=1, dtype=F64)
    assert t.mean == pytest.approx(float(d.sum()), abs=1e-12)


def test_hutchinson_dense_within_four_sigma_and_standard_error():
    a = designed(np.random.default_rng(1).normal(1.0, 2.0, 150), seed=1)
    n = 400
    t = hutchinson_trace(lambda v: a @ v, 150, n_probes=n, seed=3, dtype=F64)
    sigma = float(torch.sqrt(2 * (torch.sum(a**2) - torch.sum(torch.diag(a) ** 2)) / n))
    assert abs(t.mean - float(torch.trace(a))) <= 4 * sigma
    assert t.std_err == pytest.approx(sigma, rel=0.3)


def test_hutchinson_mlp_exact_trace():
    model = mlp().eval()
    batches = [data(40, (10,))]
    h = dense_hessian(model, batches)
    op = HessianOperator(model, batches)
    t = hutchinson_trace(op, op.dim, n_probes=300, seed=0, dtype=F64)
    sigma = float(torch.sqrt(2 * (torch.sum(h**2) - torch.sum(torch.diag(h) ** 2)) / 300))
    assert abs(t.mean - float(torch.trace(h))) <= 4 * sigma


# --- D. SLQ --------------------------------------------------------------------------------------

def test_slq_full_dimension_recovers_spectrum():
    eigs = np.linspace(-2, 6, 40)
    a = designed(eigs)
    d = slq_density(lambda v: a @ v, 40, steps=60, n_runs=1, dtype=F64)
    nodes, w = d.nodes[0], d.weights[0]
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    kept = nodes[w > 1e-10]
    assert np.max(np.min(np.abs(kept[:, None] - eigs[None, :]), axis=1)) < 1e-8


def test_slq_moment_identities():
    a = designed(np.random.default_rng(2).normal(size=60), seed=2)
    v = torch.randn(60, dtype=F64)
    run = lanczos(lambda u: a @ u, v, 20)
    theta, s = run.ritz()
    w = s[0] ** 2
    u = v / torch.linalg.norm(v)
    assert np.sum(w * theta) == pytest.approx(float(u @ a @ u), abs=1e-10)
    assert np.sum(w * theta**2) == pytest.approx(float(torch.sum((a @ u) ** 2)), abs=1e-10)


def test_slq_mean_and_std_estimates():
    eigs = np.random.default_rng(3).normal(0.5, 1.5, 1000)
    a = designed(eigs, seed=3)
    d = slq_density(lambda v: a @ v, 1000, steps=60, n_runs=10, seed=1, dtype=F64)
    a_np = a.numpy()
    sigma = np.sqrt(2 * (np.sum(a_np**2) - np.sum(np.diag(a_np) ** 2)) / 10) / 1000
    assert abs(d.mean - eigs.mean()) <= 4 * sigma
    assert d.std == pytest.approx(eigs.std(), rel=0.1)
    assert d.hvps == 600


def test_slq_median_between_clusters_and_invariant_subspace():
    rng = np.random.default_rng(4)
    eigs = np.r_[rng.uniform(-0.01, 0.01, 140), rng.uniform(4.99, 5.01, 60)]
    d = slq_density(lambda v, a=designed(eigs): a @ v, 200, steps=40, n_runs=10, dtype=F64)
    theta, w = np.concatenate(d.nodes), np.concatenate(d.weights) / 10
    assert np.sum(w[theta < 2.5]) == pytest.approx(0.70, abs=0.05)
    assert abs(d.median) < 0.5
    two = designed(np.r_[np.full(30, 1.0), np.full(20, 3.0)])
    run = lanczos(lambda v: two @ v, torch.randn(50, dtype=F64), 30)
    assert len(run.alphas) == 2 and run.betas[-1] < 1e-9


def test_smoothed_density_normalised_with_right_mean():
    d = slq_density(lambda v, a=designed(np.linspace(-1, 4, 80)): a @ v, 80, steps=30, n_runs=3, dtype=F64)
    grid, dens = d.curve()
    step = grid[1] - grid[0]
    assert np.sum(dens) * step == pytest.approx(1.0, abs=1e-3)
    assert np.sum(grid * dens) * step == pytest.approx(d.mean, abs=step)


# --- compute_sharpness on real timm models -----------------------------------------------------

@pytest.mark.parametrize("backbone,size", [("test_resnet", 16), ("test_vit", 32)])
def test_compute_sharpness_restores_model_and_logs_counts(backbone, size, tmp_path):
    from medgcsam.models.factory import create_model

    torch.manual_seed(0)
    model = create_model(backbone, 3, image_size=size)
    model.train()
    dataset = torch.utils.data.TensorDataset(torch.randn(6, 3, size, size), torch.randint(0, 3, (6,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SharpnessConfig(n_samples=4, batch_size=2, top_k=2, lanczos_steps=6, trace_probes=2, density_probes=1,
                          density_steps=4)
    m = compute_sharpness(model, dataset, cfg, "cpu", tmp_path)
    assert model.training and all(mod.training for mod in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert m["hessian_n_samples"] == 4 and m["hessian_n_params"] == sum(p.numel() for p in model.parameters())
    assert m["hessian_top_eig"] >= m["hessian_top_eig_2"]
    assert 2 + 2 + 2 + 1 <= m["hessian_hvp_count"] <= 6 + 2 + 2 + 4  # Lanczos, measured residuals, trace, SLQ
    assert np.isfinite([m["hessian_trace"], m["hessian_esd_std"], m["hessian_wall_s"]]).all()
    assert {p.name for p in tmp_path.iterdir()} >= {"sharpness.json", "esd.npz", "esd_density.png"}
    assert json.loads((tmp_path / "sharpness.json").read_text())["first_order_graphs_kept"] is True  # 2 small batches


def test_top_eigenvalue_only_skips_trace_and_density(tmp_path):
    """trace_probes=0 and density_probes=0: the same certified top eigenvalue from the Lanczos products alone,
    no trace or density metrics, no density files."""
    model = conv_bn()
    x, y = data(10, (2, 6, 6))
    dataset = torch.utils.data.TensorDataset(x, y)
    full_cfg = SharpnessConfig(n_samples=10, batch_size=4, lanczos_steps=40, tol=1e-8, trace_probes=3,
                               density_probes=1, density_steps=5)
    full = compute_sharpness(model, dataset, full_cfg)
    only = compute_sharpness(model, dataset, full_cfg.model_copy(update={"trace_probes": 0, "density_probes": 0}),
                             out_dir=tmp_path)
    assert only["hessian_top_eig"] == full["hessian_top_eig"]
    assert only["hessian_hvp_count"] == full["hessian_hvp_count"] - 3 - 5
    record = json.loads((tmp_path / "sharpness.json").read_text())
    # a float64 model: the residual measured with one more product agrees with Lanczos's estimate
    assert record["residuals"][0] == only["hessian_top_eig_residual"]
    assert record["residuals"][0] == pytest.approx(record["lanczos_residual_estimates"][0], rel=1e-4, abs=1e-12)
    assert only["hessian_top_eig_converged"] == 1.0
    assert record["precision"]["dtype"] == "float64"  # the operator's, not a fixed label
    assert not any(k.startswith(("hessian_trace", "hessian_esd")) for k in only)
    assert {p.name for p in tmp_path.iterdir()} == {"sharpness.json"}


def test_a_tolerance_below_float32_rounding_is_not_reported_as_converged(tmp_path):
    model = conv_bn().float()
    x, y = data(10, (2, 6, 6), dtype=torch.float32)
    cfg = SharpnessConfig(n_samples=10, batch_size=10, top_k=1, lanczos_steps=60, tol=1e-12, trace_probes=0,
                          density_probes=0)
    m = compute_sharpness(model, torch.utils.data.TensorDataset(x, y), cfg, out_dir=tmp_path)
    estimate = json.loads((tmp_path / "sharpness.json").read_text())["lanczos_residual_estimates"][0]
    assert estimate <= 1e-12 * m["hessian_top_eig"] < m["hessian_top_eig_residual"]
    assert m["hessian_top_eig_converged"] == 0.0


def test_compute_sharpness_seeded_and_matches_solvers():
    model = conv_bn()
    x, y = data(10, (2, 6, 6))
    dataset = torch.utils.data.TensorDataset(x, y)
    cfg = SharpnessConfig(n_samples=10, batch_size=4, top_k=1, lanczos_steps=40, tol=1e-8, trace_probes=4,
                          density_probes=2, density_steps=5)
    first = compute_sharpness(model, dataset, cfg)
    again = compute_sharpness(model, dataset, cfg)
    for key in ("hessian_top_eig", "hessian_trace", "hessian_esd_mean", "hessian_esd_median"):
        assert again[key] == first[key], key
    exact = torch.linalg.eigvalsh(dense_hessian(model.eval(), [(x, y)]))
    assert first["hessian_top_eig"] == pytest.approx(float(exact[-1]), rel=1e-6)
    # the smallest Ritz value is an upper bound of the smallest eigenvalue (not certified by the stop rule)
    assert float(exact[0]) - 1e-10 <= first["hessian_min_eig"] <= float(exact[0]) * (1 - 1e-2)
    power = compute_sharpness(model, dataset, cfg.model_copy(update={"method": "power", "tol": 1e-3, "trace_probes": 1,
                                                                     "density_probes": 1, "density_steps": 2}))
    assert power["hessian_top_eig"] == pytest.approx(float(exact[-1]), rel=1e-2)


# --- HVP captured in a CUDA graph ------------------------------------------------------------------

def test_cuda_graph_setting_leaves_cpu_products_identical_and_checks_its_value():
    """Off CUDA the product is never captured: auto, on and off give bitwise the same products and counts."""
    model = conv_bn().eval()
    batches = [data(8, (2, 6, 6), seed=s) for s in range(2)]
    v = torch.randn(HessianOperator(model, batches).dim, dtype=F64)
    results = {}
    for mode in ("auto", "on", "off"):
        op = HessianOperator(model, batches, cuda_graph=mode)
        results[mode] = (op(v), op(2 * v), op.gradient())
        assert op.hvp_count == 2 and op.replays == 0 and op.graph_fallback is None
    for mode in ("auto", "on"):
        assert all(torch.equal(a, b) for a, b in zip(results[mode], results["off"], strict=True))
    with pytest.raises(ValueError, match="cuda_graph must be"):
        HessianOperator(model, batches, cuda_graph="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs in the GPU check)")
def test_graphed_hvp_equals_eager_and_follows_the_weights(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    model = conv_bn().float().cuda().eval()
    batches = [tuple(t.cuda() for t in data(8, (2, 6, 6), seed=s, dtype=torch.float32)) for s in range(2)]
    graphed, eager = HessianOperator(model, batches, cuda_graph="on"), HessianOperator(model, batches,
                                                                                       cuda_graph="off")
    v = torch.randn(graphed.dim, device="cuda")
    for scale in (1.0, -3.0):
        torch.testing.assert_close(graphed(scale * v), eager(scale * v), rtol=1e-5, atol=1e-7)
    assert graphed.replays == 2 and graphed.graph_fallback is None
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # the captured product read the old weights' activations: recaptured
    torch.testing.assert_close(graphed(v), HessianOperator(model, batches, cuda_graph="off")(v), rtol=1e-5,
                               atol=1e-7)
    assert graphed.replays == 3
