"""Optimizers: each property of issue #2 against an independent per-tensor reference (float64, CPU)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medgcsam.optim import OPTIMIZERS, centralize_, centralized, check_hyperparameters, create_optimizer, gc_mask

F64 = torch.float64


class Net(nn.Module):
    """Conv + BatchNorm + Linear: every kind of tensor GC and ASAM treat differently."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net().to(F64)
    with torch.no_grad():
        net.fc.bias.add_(0.3)  # non-zero bias so ASAM's unscaled tensors matter
    return net


def batch(seed: int = 1, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def groups(model: Net) -> list[dict]:
    """Two groups with different lr / weight decay / rho."""
    first = [p for n, p in model.named_parameters() if not n.startswith("fc")]
    return [{"params": first, "lr": 1e-2, "weight_decay": 0.1, "rho": 0.05},
            {"params": list(model.fc.parameters()), "lr": 5e-3, "weight_decay": 0.0, "rho": 0.2}]


def run_steps(opt, model: nn.Module, batches, scale: float = 1.0) -> None:
    for x, y in batches:
        for i in range(opt.passes_per_step):
            (loss_fn(model, x, y) * scale).backward()
            opt.after_backward(i)


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], exact: bool = False) -> None:
    for s, t in zip(a, b, strict=True):
        if exact:
            assert torch.equal(s, t)
        else:
            torch.testing.assert_close(s, t, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- per-tensor reference
def ref_grads(model: nn.Module, ws: list[torch.Tensor], x, y) -> list[torch.Tensor]:
    """Gradient of the loss at weights ``ws`` (a copy of the model, so BN buffers are not touched)."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p, w in zip(clone.parameters(), ws, strict=True):
            p.copy_(w)
    return list(torch.autograd.grad(loss_fn(clone, x, y), list(clone.parameters())))


def norm(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t * t).sum() for t in ts))


def reference_step(method: str, hp: dict, model: Net, x, y) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One step of ``method`` written tensor by tensor from the update rules; returns (weights, e)."""
    names = [n for n, _ in model.named_parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    rho = [0.2 if n.startswith("fc") else 0.05 for n in names]
    g0 = ref_grads(model, w, x, y)
    direction = g0
    if method == "gcsam" and hp.get("gc_placement", "ascent") != "descent":
        beta = hp.get("gc_ema_beta")
        if beta is None:
            direction = [centralized(g) for g in g0]
        else:  # GC-EMA after one step from m_0 = 0: m_1 = (1 - beta) * mean(g)
            direction = [g - (1 - beta) * g.mean(dim=tuple(range(1, g.ndim)), keepdim=True) if g.ndim > 1 else g
                         for g in g0]
    if method == "asam":
        t = [w_.abs() + hp.get("eta", 0.01) if "weight" in n else torch.ones_like(w_) for n, w_ in zip(names, w,
                                                                                                      strict=True)]
        denom = norm([ti * g for ti, g in zip(t, g0, strict=True)])
        e = [r * ti * ti * g / (denom + 1e-16) for r, ti, g in zip(rho, t, g0, strict=True)]
    else:
        denom = norm(g0 if method == "gcsam" and hp.get("perturbation_norm") == "raw" else direction)
        e = [r * d / (denom + 1e-12) for r, d in zip(rho, direction, strict=True)]
    gp = ref_grads(model, [a + b for a, b in zip(w, e, strict=True)], x, y)
    d = gp
    if method == "gcsam" and hp.get("gc_placement", "ascent") != "ascent":
        d = [centralized(g) for g in gp]
    if method == "gsam":
        a = hp["alpha"]
        n0, n_p = norm(g0), norm(gp)
        inner = sum((u * v).sum() for u, v in zip(g0, gp, strict=True))
        par = [inner / (n0 * n_p + 1e-12) * n0 * v / (n_p + 1e-12) for v in gp]
        d = [v - a * (u - q) for u, v, q in zip(g0, gp, par, strict=True)]
    if method == "wsam":
        a = hp["gamma"] / (1 - hp["gamma"])
        d = g0 if hp["decouple"] else [a * v + (1 - a) * u for u, v in zip(g0, gp, strict=True)]
    if method == "crsam":
        gm = ref_grads(model, [a - b for a, b in zip(w, e, strict=True)], x, y)
        gam, bet = hp["gamma"], hp["beta"]
        d = [v + gam * (v + m - 2 * u) + bet * (v - m) for u, v, m in zip(g0, gp, gm, strict=True)]
    clone = copy.deepcopy(model)
    base = torch.optim.Adam(groups(clone))
    for p, di in zip(clone.parameters(), d, strict=True):
        p.grad = di.clone()
    base.step()
    if method == "wsam" and hp["decouple"]:
        with torch.no_grad():
            for n, p, u, v in zip(names, clone.parameters(), g0, gp, strict=True):
                lr = 5e-3 if n.startswith("fc") else 1e-2
                p.sub_(lr * hp["gamma"] / (1 - hp["gamma"]) * (v - u))
    return [p.detach() for p in clone.parameters()], torch.cat([t.flatten() for t in e])


CASES = [
    ("sam", {}),
    ("asam", {"eta": 0.01}),
    ("gcsam", {}),
    ("gcsam", {"perturbation_norm": "raw"}),
    ("gcsam", {"gc_placement": "descent"}),
    ("gcsam", {"gc_placement": "both"}),
    ("gcsam", {"gc_ema_beta": 0.9}),
    ("gsam", {"alpha": 0.4}),
    ("wsam", {"gamma": 0.9, "decouple": True}),
    ("wsam", {"gamma": 0.8, "decouple": False}),
    ("crsam", {"gamma": 0.1, "beta": 0.01}),
]


@pytest.mark.parametrize(("method", "hp"), CASES, ids=[f"{m}-{'-'.join(map(str, h.values()))}" for m, h in CASES])
def test_matches_per_tensor_reference_with_two_groups(method: str, hp: dict) -> None:
    x, y = batch()
    model = make_net()
    expected, expected_e = reference_step(method, hp, model, x, y)
    opt = create_optimizer(method, groups(model), model=model, **hp)
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn(model, x, y).backward()
    opt.ascent()
    e = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    torch.testing.assert_close(e, expected_e, rtol=1e-9, atol=1e-12)
    for i in range(1, opt.passes_per_step):
        loss_fn(model, x, y).backward()
        opt.after_backward(i)
    assert_same([p.detach() for p in model.parameters()], expected)


# --------------------------------------------------------------------------- gradient centralization
def test_gc_zero_slice_mean_idempotent_and_shrinks() -> None:
    g = torch.randn(5, 3, 2, 2, dtype=F64) + 0.7
    c = centralized(g)
    assert c.mean(dim=(1, 2, 3)).abs().max() < 1e-14
    torch.testing.assert_close(centralized(c), c)
    assert c.norm() < g.norm()
    v = torch.randn(7, dtype=F64) + 1.0
    assert torch.equal(centralized(v), v)
    inplace = g.clone()
    centralize_(inplace)
    torch.testing.assert_close(inplace, c)


def test_gc_targets() -> None:
    net = make_net()
    params = list(net.parameters())  # conv.w, conv.b, bn.w, bn.b, fc.w, fc.b
    assert gc_mask(params, "ndim>1", None) == [True, False, False, False, True, False]
    assert gc_mask(params, "conv", None) == [True, False, False, False, False, False]
    assert gc_mask(params, "conv_linear", net) == [True, False, False, False, True, False]
    with pytest.raises(ValueError, match="needs model"):
        gc_mask(params, "conv_linear", None)


@pytest.mark.parametrize("mode", ["gc", "raw"])
def test_perturbation_radius(mode: str) -> None:
    x, y = batch()
    model = make_net()
    opt = create_optimizer("gcsam", model.parameters(), rho=0.07, perturbation_norm=mode)
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn(model, x, y).backward()
    g = [p.grad.clone() for p in model.parameters()]
    opt.ascent()
    e_norm = norm([p.detach() - b for p, b in zip(model.parameters(), before, strict=True)])
    gc_norm = norm([centralized(t) for t in g])
    expected = 0.07 if mode == "gc" else 0.07 * gc_norm / norm(g)
    assert expected < 0.07 or mode == "gc"
    torch.testing.assert_close(e_norm, torch.as_tensor(expected, dtype=F64), rtol=1e-9, atol=0)
    torch.testing.assert_close(opt.stats["grad_norm"], norm(g))
    torch.testing.assert_close(opt.stats["grad_norm_gc"], gc_norm)


@pytest.mark.parametrize("method", ["sam", "gcsam", "asam"])
def test_loss_scale_leaves_perturbation_unchanged(method: str) -> None:
    x, y = batch()
    es = []
    for scale in (1.0, 1024.0):
        model = make_net()
        opt = create_optimizer(method, model.parameters())
        before = [p.detach().clone() for p in model.parameters()]
        (loss_fn(model, x, y) * scale).backward()
        opt.ascent()
        es.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]))
    torch.testing.assert_close(es[0], es[1], rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- exactness oracles
@pytest.mark.parametrize("method", ["sam", "gcsam", "asam", "gsam", "crsam"])
def test_rho_zero_with_bn_restore_is_one_base_step(method: str) -> None:
    x, y = batch()
    plain_model, model = make_net(), make_net()
    run_steps(create_optimizer("adam", groups(plain_model)), plain_model, [(x, y)])
    kwargs = {"alpha": 0.0} if method == "gsam" else {}
    opt = create_optimizer(method, groups(model), model=model, **kwargs)
    for g in opt.param_groups:
        g["rho"] = 0.0
    run_steps(opt, model, [(x, y)])
    # parameters and BN buffers; CR-SAM's combination (1+g+b) g + (g-b) g - 2g g equals g up to rounding
    assert_same(weights(model), weights(plain_model), exact=method != "crsam")


def test_bn_statistics_come_from_first_pass_only() -> None:
    x, y = batch()
    model, probe = make_net(), make_net()
    probe(x)  # one forward at w: what pass 1 does to the running statistics
    opt = create_optimizer("crsam", model.parameters(), model=model)
    run_steps(opt, model, [(x, y)])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model.bn, name), getattr(probe.bn, name))


@pytest.mark.parametrize("method", ["sam", "gcsam", "asam", "crsam", "gsam", "wsam"])
def test_weights_restored_bit_exactly_when_base_step_is_zero(method: str) -> None:
    x, y = batch()
    model = make_net()
    opt = create_optimizer(method, model.parameters(), lr=0.0, rho=0.5)
    run_steps(opt, model, [(x, y)])
    assert_same([p.detach() for p in model.parameters()], [p.detach() for p in make_net().parameters()], exact=True)


def test_tensor_without_second_pass_gradient_is_restored() -> None:
    x, y = batch()
    model = make_net()
    opt = create_optimizer("sam", model.parameters(), lr=0.0)
    loss_fn(model, x, y).backward()
    opt.ascent()  # pass 2 below only reaches the conv part
    torch.relu(model.bn(model.conv(x))).sum().backward()
    opt.descent()
    assert torch.equal(model.fc.weight, make_net().fc.weight)


@pytest.mark.parametrize(("method", "kwargs"), [("gsam", {"alpha": 0.0}), ("wsam", {"gamma": 0.5, "decouple": False}),
                                                ("crsam", {"gamma": 0.0, "beta": 0.0, "rho": 0.05})])
def test_reductions_to_sam(method: str, kwargs: dict) -> None:
    bs = [batch(1), batch(2)]
    sam_model, model = make_net(), make_net()
    run_steps(create_optimizer("sam", sam_model.parameters(), model=sam_model, lr=1e-2), sam_model, bs)
    run_steps(create_optimizer(method, model.parameters(), model=model, lr=1e-2, **kwargs), model, bs)
    assert_same(weights(model), weights(sam_model))


# --------------------------------------------------------------------------- checkpoints
def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize(("method", "kwargs"), [("gcsam", {"gc_ema_beta": 0.8}), ("gsam", {"rho_min": 0.01}),
                                                ("wsam", {}), ("crsam", {}), ("msam", {"base": "sgd", "momentum": 0.9}),
                                                ("msam", {}), ("gc_adam", {})])
def test_state_dict_round_trip_next_step_identical(method: str, kwargs: dict) -> None:
    bs = [batch(s) for s in range(1, 5)]
    model = make_net()
    opt = create_optimizer(method, groups(model), model=model, **kwargs)
    run_steps(opt, model, bs[:2])
    with opt.unperturbed():
        saved_model, saved_opt = _roundtrip(model.state_dict()), _roundtrip(opt.state_dict())
    assert "base" in saved_opt and saved_opt["base"]["state"]  # Adam moments / momentum travel along
    run_steps(opt, model, bs[2:])
    resumed = make_net(seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = create_optimizer(method, groups(resumed), model=resumed, **kwargs)
    opt2.load_state_dict(saved_opt)
    run_steps(opt2, resumed, bs[2:])
    assert_same(weights(resumed), weights(model), exact=True)


def test_load_refuses_other_method() -> None:
    model = make_net()
    state = create_optimizer("sam", model.parameters()).state_dict()
    with pytest.raises(ValueError, match="'sam'.*'gcsam'"):
        create_optimizer("gcsam", model.parameters()).load_state_dict(state)


# --------------------------------------------------------------------------- MSAM
def test_msam_unperturbed_is_exact_and_rho_zero_is_base() -> None:
    bs = [batch(s) for s in range(1, 4)]
    model, plain = make_net(), make_net()
    opt = create_optimizer("msam", model.parameters(), base="sgd", lr=0.05, momentum=0.9)
    run_steps(opt, model, bs)
    perturbed = weights(model)
    with opt.unperturbed():
        clean = weights(model)
        # the clean weights are w~ + f m: the perturbation is against the momentum
        assert not torch.equal(clean[0], perturbed[0])
    assert_same(weights(model), perturbed, exact=True)
    with pytest.raises(RuntimeError, match="unperturbed"):
        opt.state_dict()
    zero = create_optimizer("msam", plain.parameters(), base="sgd", lr=0.05, momentum=0.9, rho=0.0)
    reference = make_net()
    run_steps(zero, plain, bs)
    run_steps(create_optimizer("sgd", reference.parameters(), lr=0.05, momentum=0.9), reference, bs)
    assert_same(weights(plain), weights(reference), exact=True)


def test_msam_needs_momentum() -> None:
    with pytest.raises(ValueError, match="momentum > 0"):
        create_optimizer("msam", make_net().parameters(), base="sgd")


# --------------------------------------------------------------------------- GC-Adam
def test_gc_adam_placements() -> None:
    x, y = batch()
    model = make_net()
    opt = create_optimizer("gc_adam", model.parameters(), lr=1e-2, gc_placement="update")
    means = model.conv.weight.detach().mean(dim=(1, 2, 3)).clone()
    run_steps(opt, model, [(x, y)])
    torch.testing.assert_close(model.conv.weight.detach().mean(dim=(1, 2, 3)), means)  # GC'd update keeps slice means
    assert not torch.equal(model.conv.bias.detach(), make_net().conv.bias.detach())
    model, reference = make_net(), make_net()
    run_steps(create_optimizer("gc_adam", model.parameters(), lr=1e-2, gc_placement="grad"), model, [(x, y)])
    loss_fn(reference, x, y).backward()
    for p in reference.parameters():
        centralize_(p.grad)
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2)
    adam.step()
    assert_same(weights(model), weights(reference))


# --------------------------------------------------------------------------- loop features
def test_base_only_is_the_base_optimizer_then_continues() -> None:
    bs = [batch(s) for s in range(1, 4)]
    model, plain = make_net(), make_net()
    opt = create_optimizer("gcsam", model.parameters(), model=model, lr=1e-2)
    opt.base_only = True
    assert opt.passes_per_step == 1 and opt.no_sync_passes("local") == frozenset()
    run_steps(opt, model, bs[:2])
    adam = create_optimizer("adam", plain.parameters(), lr=1e-2)
    run_steps(adam, plain, bs[:2])
    assert_same(weights(model), weights(plain), exact=True)
    opt.base_only = False
    assert opt.passes_per_step == 2 and opt.no_sync_passes("local") == frozenset({0})
    run_steps(opt, model, bs[2:])
    assert opt.base.state[model.conv.weight]["step"] == 3  # same Adam moments continued


@pytest.mark.parametrize("method", ["adam", "gcsam", "crsam", "gsam"])
def test_gradient_accumulation_averages_micro_batches(method: str) -> None:
    x, y = batch(n=8)
    micro = [(x[:4], y[:4]), (x[4:], y[4:])]
    model = make_net()
    opt = create_optimizer(method, groups(model), model=model, accumulation_steps=2)
    run_steps(opt, model, micro)
    assert opt.base.state[model.conv.weight]["step"] == 1
    # reference: each micro-batch's descent gradient d, read off a plain SGD step w - 1.0 * d, averaged
    ds = []
    for xb, yb in micro:
        probe = make_net()
        probe_groups = [{**g, "lr": 1.0, "weight_decay": 0.0} for g in groups(probe)]
        probe_opt = create_optimizer("sgd" if method == "adam" else method, probe_groups, base="sgd", model=probe)
        run_steps(probe_opt, probe, [(xb, yb)])
        ds.append([w0 - w1.detach() for w0, w1 in zip(make_net().parameters(), probe.parameters(), strict=True)])
    reference = make_net()
    base = torch.optim.Adam(groups(reference))
    for p, a, b in zip(reference.parameters(), *ds, strict=True):
        p.grad = (a.detach() + b) / 2
    base.step()
    assert_same([p.detach() for p in model.parameters()], [p.detach() for p in reference.parameters()])


def test_grad_scaler_one_scale_and_skip_on_overflow() -> None:
    x, y = batch()
    model, reference = make_net(), make_net()
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    opt = create_optimizer("gcsam", model.parameters(), model=model, grad_scaler=scaler, max_grad_norm=10.0)
    for i in range(2):
        scaler.scale(loss_fn(model, x, y)).backward()
        opt.after_backward(i)
    ref_opt = create_optimizer("gcsam", reference.parameters(), model=reference, max_grad_norm=10.0)
    run_steps(ref_opt, reference, [(x, y)])
    assert_same(weights(model), weights(reference))
    torch.testing.assert_close(opt.stats["grad_norm"], ref_opt.stats["grad_norm"])
    before = [p.detach().clone() for p in model.parameters()]
    state_step = opt.base.state[model.conv.weight]["step"].clone()
    for i in range(2):  # pass 1 overflows, pass 2 is finite: the step must still be skipped
        loss = loss_fn(model, x, y) * (float("inf") if i == 0 else 1.0)
        scaler.scale(loss).backward()
        opt.after_backward(i)
    assert_same([p.detach() for p in model.parameters()], before, exact=True)
    assert torch.equal(opt.base.state[model.conv.weight]["step"], state_step)
    assert scaler.get_scale() < 256.0


def test_bf16_autocast_step_restores_and_updates() -> None:
    x, y = batch()
    torch.manual_seed(0)
    model = Net()
    opt = create_optimizer("gcsam", model.parameters(), model=model, lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    for i in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, x.float(), y)
        loss.backward()
        opt.after_backward(i)
    after = [p.detach() for p in model.parameters()]
    assert all(torch.isfinite(a).all() for a in after)
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert torch.isfinite(opt.stats["grad_norm_gc"]) and opt.stats["grad_norm_gc"] > 0


def test_step_with_closure_equals_after_backward_driver() -> None:
    x, y = batch()
    model, reference = make_net(), make_net()
    opt = create_optimizer("crsam", model.parameters(), model=model)

    def closure():
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    run_steps(create_optimizer("crsam", reference.parameters(), model=reference), reference, [(x, y)])
    assert loss.ndim == 0
    assert_same(weights(model), weights(reference), exact=True)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()


def test_gsam_rho_follows_learning_rate() -> None:
    x, y = batch()
    model = make_net()
    opt = create_optimizer("gsam", model.parameters(), lr=1e-2, rho=0.08, rho_min=0.02)
    opt.param_groups[0]["lr"] = 5e-3  # half-way down a schedule to lr_min=0: rho_t = 0.02 + 0.06 * 0.5
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn(model, x, y).backward()
    opt.ascent()
    e_norm = norm([p.detach() - b for p, b in zip(model.parameters(), before, strict=True)])
    torch.testing.assert_close(e_norm, torch.as_tensor(0.05, dtype=F64))


# --------------------------------------------------------------------------- configuration errors
def test_registry_and_hyperparameter_validation() -> None:
    check_hyperparameters("gcsam", "adam", {"rho": 0.1, "betas": (0.9, 0.99), "gc_ema_beta": 0.9})
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['rh0'\].*'rho'"):
        check_hyperparameters("gcsam", "adam", {"rh0": 0.1})
    with pytest.raises(ValueError, match="perturbation_norm must be one of"):
        check_hyperparameters("gcsam", "adam", {"perturbation_norm": "l1"})
    with pytest.raises(ValueError, match="gamma must be in"):
        check_hyperparameters("wsam", "sgd", {"gamma": 1.0})
    with pytest.raises(ValueError, match="unknown optimizer 'adan'"):
        check_hyperparameters("adan", "adam", {})
    with pytest.raises(ValueError, match="unknown base optimizer 'lamb'"):
        check_hyperparameters("sam", "lamb", {})
    with pytest.raises(ValueError, match="momentum"):
        check_hyperparameters("sam", "adam", {"momentum": 0.9})  # an SGD keyword on an Adam base


def test_base_as_class_or_instance() -> None:
    model = make_net()
    by_class = create_optimizer("sam", model.parameters(), base=torch.optim.AdamW, lr=1e-3)
    assert isinstance(by_class.base, torch.optim.AdamW) and by_class.param_groups[0]["lr"] == 1e-3
    instance = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    by_instance = create_optimizer("gcsam", None, base=instance)
    assert by_instance.base is instance and by_instance.param_groups is instance.param_groups
    assert by_instance.param_groups[0]["rho"] == 0.05
    with pytest.raises(ValueError, match="instance"):
        create_optimizer("gcsam", None, base=instance, lr=0.1)


def test_gcsam_radius_holds_when_centralization_removes_almost_everything() -> None:
    """Nearly constant non-negative features make GC(g) ~1e-4 of g: the perturbation must still be rho
    (a norm taken as ||g||^2 - n||mean||^2 cancelled in float32 and gave ||e|| ~ 1e7)."""
    for seed in range(3):
        torch.manual_seed(seed)
        layer = nn.Linear(512, 10, bias=False)
        x = 1 + 1e-4 * torch.randn(64, 512)
        y = torch.randint(0, 10, (64,))
        w0 = layer.weight.detach().clone()
        opt = create_optimizer("gcsam", layer.parameters(), base="adam", lr=0.0, rho=0.05)
        F.cross_entropy(layer(x), y).backward()
        g = layer.weight.grad.clone()
        opt.after_backward(0)
        assert float((layer.weight - w0).norm()) == pytest.approx(0.05, rel=1e-3)
        assert float(opt.stats["grad_norm_gc"]) == pytest.approx(float(centralized(g).norm()), rel=1e-3)


def test_gc_ema_survives_an_overflow_and_a_changing_loss_scale() -> None:
    """GC-EMA under a GradScaler: one overflowing pass is skipped and training goes on, and a growing scale
    gives the same weights as no scaler (the EMA is kept in unscaled units)."""
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))

    def run(scaler: torch.amp.GradScaler | None, overflow: bool) -> tuple[list[torch.Tensor], list[float]]:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        opt = create_optimizer("gcsam", model.parameters(), base="sgd", lr=0.1, grad_scaler=scaler,
                               gc_placement="both", gc_ema_beta=0.5)
        moved = []
        for step in range(6):
            before = [p.detach().clone() for p in model.parameters()]
            for i in range(2):
                loss = F.cross_entropy(model(x), y) * (1e308 if overflow and step == 1 and i == 0 else 1.0)
                (loss if scaler is None else scaler.scale(loss)).backward()
                opt.after_backward(i)
            moved.append(max(float((a - b).abs().max()) for a, b in zip(before, model.parameters(), strict=True)))
        return [p.detach().clone() for p in model.parameters()], moved

    _, moved = run(torch.amp.GradScaler("cpu", init_scale=2.0**10), overflow=True)
    assert moved[1] == 0.0 and all(m > 1e-3 for m in moved[2:])  # skipped once, then trains again
    plain, _ = run(None, overflow=False)
    scaled, _ = run(torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2), overflow=False)
    assert max(float((a - b).abs().max()) for a, b in zip(plain, scaled, strict=True)) < 1e-12


SYNC_FREE_CASES = [(name, {"momentum": 0.9} if name == "msam" else {}) for name in OPTIMIZERS] + [
    ("gcsam", {"gc_placement": "both", "gc_ema_beta": 0.9}),
    ("gcsam", {"perturbation_norm": "raw", "accumulation_steps": 2}),
]


@pytest.mark.parametrize(("name", "kwargs"), SYNC_FREE_CASES)
def test_a_whole_step_runs_without_host_synchronization(name: str, kwargs: dict) -> None:
    """Meta tensors have no values, so .item(), float(t) and `if t:` raise on them: a step that runs to the
    end on the meta device has no host synchronization and can be captured in a CUDA graph later."""
    from medgcsam.engine.metrics import TrainMeter
    from medgcsam.engine.step import train_step

    with pytest.raises(RuntimeError):  # the detector works
        bool(torch.ones((), device="meta"))
    with torch.device("meta"):
        model = Net()
        images, labels = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    base = "sgd" if name == "msam" else "adam"
    opt = create_optimizer(name, model.parameters(), model=model, base=base, max_grad_norm=1.0, **kwargs)
    micro_batches = 2 * opt.accumulation_steps  # two optimizer steps: some paths start at the second (MSAM)
    meter = TrainMeter(torch.device("meta"), max_steps=micro_batches)
    for step in range(micro_batches):
        train_step(model, opt, nn.CrossEntropyLoss(), images, labels, autocast=torch.enable_grad, meter=meter)
        meter.record_grad_norms(step, opt.stats, centralized=True)
    assert meter.trace_steps == list(range(micro_batches))
    assert all(p.grad is None for p in model.parameters())  # the base step ran and cleared the gradients


GRAPH_SAFE_CASES = [(name, {"momentum": 0.9} if name == "msam" else {}) for name in OPTIMIZERS] + [
    ("msam", {}),  # Adam base: the perturbation follows exp_avg
    ("gcsam", {"gc_placement": "both", "gc_ema_beta": 0.9, "accumulation_steps": 2}),
    ("gsam", {"rho_min": 0.01}),  # rho follows the (device-tensor) LR
    ("wsam", {"decouple": False}),
    ("sam", {"accumulation_steps": 3}),
    ("gc_adam", {"gc_placement": "grad", "accumulation_steps": 2}),
]


def _graph_safe_run(name: str, kwargs: dict) -> tuple[Net, object, torch.Tensor, torch.Tensor]:
    from medgcsam.optim import make_graph_safe_

    torch.manual_seed(0)
    model = Net()
    images, labels = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    base = "sgd" if "momentum" in kwargs else "adam"
    opt = create_optimizer(name, model.parameters(), model=model, base=base, lr=0.05, max_grad_norm=1.0, **kwargs)
    return model, make_graph_safe_(opt), images, labels


@pytest.mark.parametrize(("name", "kwargs"), GRAPH_SAFE_CASES)
def test_graph_safety_contract_of_every_optimizer_step(name: str, kwargs: dict) -> None:
    """The CUDA-graph contract emulated on CPU: after warm-up (lazy state), a whole step (every pass, GC, BN
    restore, accumulation, clipping, fused base step, on-device meters) runs no op a capture refuses, and the
    LR and rho are read from device tensors: changing their values changes the next step with nothing rebuilt."""
    from medgcsam.engine.metrics import TrainMeter
    from medgcsam.engine.step import train_step
    from medgcsam.optim import HostSyncError, forbid_host_sync, is_graph_safe

    with pytest.raises(HostSyncError), forbid_host_sync():  # the detector works
        float(torch.ones(()) * 2)
    model, opt, images, labels = _graph_safe_run(name, kwargs)
    assert is_graph_safe(opt)
    meter = TrainMeter(torch.device("cpu"), max_steps=16)

    def cycle(m: nn.Module, o: object, record: bool) -> None:
        for _ in range(o.accumulation_steps):
            train_step(m, o, nn.CrossEntropyLoss(), images, labels, autocast=torch.enable_grad,
                       meter=meter if record else None)
        if record:
            meter.record_grad_norms(len(meter.trace_steps), o.stats, centralized=True)

    for _ in range(2):  # warm-up: optimizer state and persistent buffers are created here, as before a capture
        cycle(model, opt, record=False)
    with forbid_host_sync():
        for _ in range(2):
            cycle(model, opt, record=True)
    assert len(meter.trace_steps) == 2 and bool(torch.isfinite(meter.trace[:2, 0]).all())

    def clean_weights(m: nn.Module, o: object) -> list[torch.Tensor]:
        with o.unperturbed():
            return [p.detach().clone() for p in m.parameters()]

    start = clean_weights(model, opt)
    variants = {}
    for label, scale in (("same", None), ("lr0", ("lr", 0.0)), ("rho0", ("rho", 0.0))):
        m, o = copy.deepcopy((model, opt))
        if scale is not None:
            key, value = scale
            for group in o.param_groups:
                if key in group:
                    group[key].fill_(value)  # in place: what a scheduler does to a captured graph's input
        with forbid_host_sync():  # two steps: MSAM applies a new rho in the perturbation of the step after
            cycle(m, o, record=False)
            cycle(m, o, record=False)
        variants[label] = clean_weights(m, o)
    moved = max(float((a - b).abs().max()) for a, b in zip(start, variants["same"], strict=True))
    assert moved > 1e-5
    assert all(torch.equal(a, b) for a, b in zip(start, variants["lr0"], strict=True))  # LR 0: no step at all
    if "rho" in opt.param_groups[0]:
        assert any(not torch.equal(a, b) for a, b in zip(variants["same"], variants["rho0"], strict=True))


def test_scheduler_writes_the_graph_safe_lr_in_place() -> None:
    """A captured step reads the LR tensor it recorded: the schedule must refill that tensor, never replace it."""
    from medgcsam.config import TrainConfig
    from medgcsam.engine.schedule import build_scheduler
    from medgcsam.engine.schedule import lr_factor as factor
    from medgcsam.optim import make_graph_safe_

    model = Net()
    opt = create_optimizer("gsam", model.parameters(), model=model, lr=0.1, rho_min=0.01)
    cfg = TrainConfig(epochs=2, warmup_epochs=0.5, scheduler="cosine", min_lr_ratio=0.1)
    scheduler = build_scheduler(opt.base, cfg, steps_per_epoch=4)
    make_graph_safe_(opt)
    lr = opt.param_groups[0]["lr"]
    for step in range(1, 6):
        scheduler.step()
        assert opt.param_groups[0]["lr"] is lr
        expected = 0.1 * factor(step, total_steps=8, warmup_steps=2, kind="cosine", min_ratio=0.1)
        assert float(lr) == pytest.approx(expected, rel=1e-6)
        assert scheduler.get_last_lr() == [pytest.approx(expected, rel=1e-6)]
        assert isinstance(scheduler.get_last_lr()[0], float)
    rho = opt.group_rho(opt.param_groups[0])  # GSAM's rho follows the device LR, as a device tensor
    assert isinstance(rho, torch.Tensor) and float(rho) == pytest.approx(0.01 + 0.04 * float(lr) / 0.1, rel=1e-6)
    state = opt.state_dict()  # checkpoints hold plain numbers, so they load into an eager or CPU run
    assert isinstance(state["base"]["param_groups"][0]["lr"], float)
    fresh = create_optimizer("gsam", Net().parameters(), lr=0.1, rho_min=0.01)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["lr"] == pytest.approx(float(lr), rel=1e-6)


def test_graph_safe_refuses_a_grad_scaler_with_the_reason() -> None:
    from medgcsam.optim import graph_safe_blocker, make_graph_safe_

    model = Net()
    opt = create_optimizer("gcsam", model.parameters(), grad_scaler=torch.amp.GradScaler("cpu"))
    assert "GradScaler" in graph_safe_blocker(opt)
    with pytest.raises(ValueError, match="GradScaler"):
        make_graph_safe_(opt)
