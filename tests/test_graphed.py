"""The graphed step: fallback logic and host-state rollback on CPU; capture and eager equivalence on CUDA.

Tests marked ``cuda`` run only where CUDA is present (the GPU check) and are not CPU CI evidence.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from medgcsam.engine.graphed import (
    EagerStep,
    GraphCaptureError,
    GraphedForward,
    graph_blockers,
    make_step,
    python_state,
    set_python_state,
)
from medgcsam.engine.metrics import StepRecord, TrainMeter
from medgcsam.engine.step import autocast_factory
from medgcsam.models import create_model
from medgcsam.optim import OPTIMIZERS, create_optimizer
from tests.test_optim import Net  # noqa: E402 - the conv+BN+linear net every optimizer test uses

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs in the GPU check)")


def test_auto_on_cpu_runs_eagerly_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    model = Net()
    opt = create_optimizer("gcsam", model.parameters(), model=model)
    with caplog.at_level(logging.INFO, logger="medgcsam.engine.graphed"):
        step = make_step(model, opt, nn.CrossEntropyLoss(), autocast=torch.enable_grad, mode="auto",
                         device="cpu")
    assert type(step) is EagerStep and not step.graphed
    assert "CUDA graphs off" in caplog.text and "CUDA device" in caplog.text
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, float)  # eager CPU runs keep the optimizer exactly as before (results unchanged)
    meter = TrainMeter(torch.device("cpu"), 4)
    step.meter = meter
    step(torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,)))
    assert int(meter.count) == 4


def test_on_refuses_with_every_reason_and_the_fix() -> None:
    model = Net()
    opt = create_optimizer("sam", model.parameters(), model=model)
    with pytest.raises(GraphCaptureError, match=r"cuda_graph=on.*CUDA device.*auto"):
        make_step(model, opt, nn.CrossEntropyLoss(), autocast=torch.enable_grad, mode="on", device="cpu")
    with pytest.raises(ValueError, match="must be one of"):
        make_step(model, opt, nn.CrossEntropyLoss(), autocast=torch.enable_grad, mode="yes", device="cpu")
    scaler = torch.amp.GradScaler("cpu")
    reasons = graph_blockers(model, opt, device=torch.device("cuda"), scaler=scaler, no_sync=frozenset({0}))
    text = "; ".join(reasons)
    assert "GradScaler" in text and "DDP" in text
    if not torch.cuda.is_available():
        assert "CUDA is not available" in text


def test_step_record_gives_the_eager_meter_sums_bitwise() -> None:
    g = torch.Generator().manual_seed(0)
    eager, graphed = TrainMeter(torch.device("cpu"), 1), TrainMeter(torch.device("cpu"), 1)
    record = StepRecord(torch.device("cpu"))
    for _ in range(5):
        logits, labels = torch.randn(7, 3, generator=g), torch.randint(0, 3, (7,), generator=g)
        loss = nn.functional.cross_entropy(logits, labels)
        eager.update(loss, logits, labels)
        record.update(loss, logits, labels)
        graphed.add(record)
    assert torch.equal(eager.loss_sum, graphed.loss_sum) and torch.equal(eager.correct, graphed.correct)
    assert int(eager.count) == int(graphed.count) == 35


@pytest.mark.parametrize("name", ["sam", "crsam", "msam", "gcsam"])
def test_a_failed_capture_leaves_the_optimizer_as_before(name: str) -> None:
    """On the meta device nothing executes, as in a capture: a step that fails halfway changed only host-side
    bookkeeping (perturbed tensors, gradient references, accumulation position), which the rollback undoes."""
    with torch.device("meta"):
        model = Net()
        images, labels = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    opt = create_optimizer(name, model.parameters(), model=model, base="sgd", momentum=0.9, accumulation_steps=2)
    step = EagerStep(model, opt, nn.CrossEntropyLoss(), autocast=torch.enable_grad)
    for _ in range(4):
        step(images, labels)
    step(images, labels)  # mid-accumulation: position 1, gradients held
    before = python_state(opt)
    calls = []

    def failing(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == opt.passes_per_step:
            raise RuntimeError("operation not permitted when stream is capturing")
        return nn.functional.cross_entropy(logits, target)

    with pytest.raises(RuntimeError, match="capturing"):
        EagerStep(model, opt, failing, autocast=torch.enable_grad)(images, labels)
    assert python_state(opt) != before or name == "msam"  # the failure left bookkeeping half-way
    set_python_state(opt, before)
    state, grads = python_state(opt)
    assert opt._micro == 1 and all(a is b for a, b in zip(grads, before[1], strict=True))
    assert state.get("_perturbed", []) == before[0].get("_perturbed", [])
    step(images, labels)  # and the optimizer completes the cycle as if nothing happened
    assert opt._micro == 0 and all(p.grad is None for p in model.parameters())


def test_host_sync_detector_records_without_cutting_the_step_short() -> None:
    """The graphed step checks its last warm-up with ``record=True, device="cuda"``: the step must complete with
    the same values, report every capture-breaking op on that device once, and ignore the same op on another."""
    from medgcsam.optim import forbid_host_sync

    x = torch.arange(6.0)
    with forbid_host_sync(device="cuda", record=True) as other:  # CPU tensors: not what a CUDA capture sees
        assert float(x.sum()) == 15.0 and torch.tensor([1.0, 2.0]).sum() == 3
    assert other.found == []
    with forbid_host_sync(device="cpu", record=True) as same:
        value = float(x.sum())
        picked = x[x > 2]
        value += float(x.max())
    assert value == 20.0 and picked.tolist() == [3.0, 4.0, 5.0]  # ran to the end, same results
    assert any("_local_scalar_dense" in r for r in same.found) and any("boolean mask" in r for r in same.found)
    assert len(same.found) == len(set(same.found))


def test_graphed_forward_is_eager_off_cuda() -> None:
    model = Net().eval()
    forward = GraphedForward(model, autocast=torch.enable_grad)
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(forward(x), model(x))
    assert not forward.graphs


# ----------------------------------------------------------------------------------------------- CUDA
def _run(name: str, model_name: str, mode: str, steps: int, amp: str, accumulation: int = 1) -> tuple[list, list]:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = create_model(model_name, 3, in_chans=3, image_size=32).to(device)
    kwargs = {"momentum": 0.9} if name in ("sgd", "msam") else {}
    base = "sgd" if name in ("sgd", "msam") else "adam"
    opt = create_optimizer(name, model.parameters(), model=model, base=base, lr=1e-3, max_grad_norm=5.0,
                           accumulation_steps=accumulation, **kwargs)
    if mode == "eager":  # the same graph-safe optimizer, never captured
        from medgcsam.optim import make_graph_safe_
        make_graph_safe_(opt)
    meter = TrainMeter(device, steps)
    step = make_step(model, opt, nn.CrossEntropyLoss(), autocast=autocast_factory(device, amp), meter=meter,
                     mode="on" if mode == "graph" else "off", device=device)
    g = torch.Generator(device=device).manual_seed(1)
    for i in range(steps):
        x = torch.randn(8, 3, 32, 32, device=device, generator=g)
        y = torch.randint(0, 3, (8,), device=device, generator=g)
        step(x, y)
        if opt._micro == 0:
            meter.record_grad_norms(i, opt.stats, centralized=True)
    if mode == "graph":
        assert step.replays > 0
    with opt.unperturbed():
        weights = [p.detach().float().clone() for p in model.parameters()]
    return weights, [meter.trace[: len(meter.trace_steps)].cpu(), meter.loss_sum.cpu()]


@cuda
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_graphed_equals_eager_fp32(name: str) -> None:
    """fp32, TF32 off: the graphed run replays the eager kernels, weights agree to 1e-6 relative after 12 steps."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    eager, (trace_e, loss_e) = _run(name, "resnet18", "eager", 12, "none")
    graph, (trace_g, loss_g) = _run(name, "resnet18", "graph", 12, "none")
    for a, b in zip(eager, graph, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(trace_g, trace_e, rtol=1e-5, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(loss_g, loss_e, rtol=1e-6, atol=0)


@cuda
@pytest.mark.parametrize(("name", "model_name", "accumulation"),
                         [("gcsam", "vit_tiny_patch16_224", 1), ("gsam", "resnet18", 2), ("adam", "resnet18", 2)])
def test_graphed_equals_eager_bf16_and_accumulation(name: str, model_name: str, accumulation: int) -> None:
    """bf16 autocast: same kernels, so the same weights to 1e-3 relative (rounding of bf16 reductions)."""
    eager, _ = _run(name, model_name, "eager", 8, "bf16", accumulation)
    graph, _ = _run(name, model_name, "graph", 8, "bf16", accumulation)
    for a, b in zip(eager, graph, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


@cuda
def test_auto_falls_back_when_capture_fails_and_on_raises(caplog: pytest.LogCaptureFixture) -> None:
    device = torch.device("cuda")

    def syncing(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(logits, target)
        return loss * (1.0 if float(loss) > -1 else 0.0)  # a host sync: not capturable

    for mode in ("auto", "on"):
        torch.manual_seed(0)
        model = Net().to(device)
        opt = create_optimizer("gcsam", model.parameters(), model=model)
        step = make_step(model, opt, syncing, autocast=torch.enable_grad, mode=mode, device=device)
        x, y = torch.randn(4, 3, 6, 6, device=device), torch.randint(0, 3, (4,), device=device)
        for _ in range(2):
            step(x, y)
        if mode == "on":
            with pytest.raises(GraphCaptureError, match="capturing the gcsam step failed"):
                step(x, y)
            continue
        reference = copy.deepcopy((model, opt))
        with caplog.at_level(logging.WARNING):
            step(x, y)
        assert step.fallback_reason and "continues with the eager step" in caplog.text
        ref_model, ref_opt = reference
        EagerStep(ref_model, ref_opt, syncing, autocast=torch.enable_grad)(x, y)
        for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
            assert torch.equal(a, b)  # the failed capture changed nothing; the eager step ran in its place
        assert "capture not attempted" in step.fallback_reason  # the warm-up check caught it before capture
        assert not any(g.get("capturable") for g in opt.base.param_groups)  # eager from now on
        torch.randn(3, device=device)  # CUDA and its generator still usable


@cuda
@pytest.mark.parametrize("mode", ["auto", "on"])
def test_a_capture_that_fails_inside_cuda_leaves_cuda_usable(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    """A sync the warm-up check cannot see (a stream synchronize is no tensor op) fails the capture itself:
    capture ended, current stream, allocator and the default generator's capture mode restored."""
    device = torch.device("cuda")

    def stream_sync(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        torch.cuda.current_stream().synchronize()  # illegal while capturing
        return nn.functional.cross_entropy(logits, target)

    torch.manual_seed(0)
    model = Net().to(device)
    opt = create_optimizer("gcsam", model.parameters(), model=model)
    step = make_step(model, opt, stream_sync, autocast=torch.enable_grad, mode=mode, device=device)
    x, y = torch.randn(4, 3, 6, 6, device=device), torch.randint(0, 3, (4,), device=device)
    for _ in range(2):
        step(x, y)
    reference = copy.deepcopy((model, opt))
    main, rng = torch.cuda.current_stream(), torch.cuda.get_rng_state()
    with caplog.at_level(logging.WARNING):
        if mode == "on":
            with pytest.raises(GraphCaptureError, match="capturing the gcsam step failed"):
                step(x, y)
        else:
            step(x, y)
            assert "continues with the eager step" in caplog.text and "capture not attempted" not in caplog.text
    assert torch.cuda.current_stream() == main and not torch.cuda.is_current_stream_capturing()
    assert torch.equal(torch.cuda.get_rng_state(), rng)  # same random position as before the capture
    torch.cuda.manual_seed(3)
    a = torch.rand(5, device=device)  # raised "Offset increment outside graph capture" before the fix
    torch.cuda.manual_seed(3)
    assert torch.equal(a, torch.rand(5, device=device))
    if mode == "auto":
        ref_model, ref_opt = reference
        EagerStep(ref_model, ref_opt, stream_sync, autocast=torch.enable_grad)(x, y)
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            assert torch.equal(p, q)
        step(x, y)  # and it keeps training eagerly
