"""Sharpness-aware methods with two or three passes: SAM, ASAM, GCSAM, GSAM, WSAM, CR-SAM.

All share one skeleton (``SharpnessAware``): after pass 1, ``ascent()`` turns the gradient into the
perturbation ``e`` in place, backs up the weights into persistent buffers and moves to ``w + e``; after the
last pass, ``descent()`` copies the weights back (only the tensors that were perturbed), forms the descent
gradient and hands it to the base optimizer. Norms stay on device; the math is multi-tensor (foreach).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .core import Bucket, WrappedOptimizer, all_reduce_mean_, axpy_, sq_norm
from .gc import GC_TARGETS, SliceMeanEMA, centralize_, gc_mask, slice_dims
from .registry import register


class SharpnessAware(WrappedOptimizer):
    """SAM skeleton. Subclasses override the direction (``_direction_norms``/``_direction``) or the descent."""

    passes = 2
    pass_names = ("ascent", "descent")
    group_hyperparameters = frozenset({"rho"})
    keeps_g0 = False  # True when the descent reuses the first-pass gradient (copied, DDP-averaged)

    def __init__(self, base: torch.optim.Optimizer, **kwargs: Any) -> None:
        super().__init__(base, **kwargs)
        self._perturbed: list[tuple[Bucket, list[int]]] = []

    def group_rho(self, group: dict[str, Any]) -> float | Tensor:
        """The group's rho as stored: a float, or a device tensor once graph-safe (read without a host sync)."""
        return group["rho"]

    # ------------------------------------------------------------------ passes
    @torch.no_grad()
    def ascent(self) -> None:
        """After pass 1: build e from g0, move to w + e, clear gradients for pass 2."""
        if self._perturbed:
            raise RuntimeError(f"{self.name}: ascent() called twice without descent()")
        if self.bn is not None:
            self.bn.snapshot()
        active = self.active()
        if self.keeps_g0:
            for _, idx in active:
                g0 = self.buffers("g0", idx)
                torch._foreach_copy_(g0, self.grads(idx))
                if self.ddp_mode == "local":
                    all_reduce_mean_(g0)
        sq_raw, sq_dir = self._direction_norms(active)
        self.flag_overflow(sq_raw)
        self._record_stats(sq_raw)
        norm = sq_dir.sqrt()
        inv = torch.where(torch.isfinite(norm), (norm + self.hp["eps"]).reciprocal(), 0.0)
        for bucket, idx in active:
            w = self.tensors(idx)
            direction = self._direction(idx)
            torch._foreach_copy_(self.buffers("backup", idx), w)
            axpy_(w, direction, inv * self.group_rho(self.param_groups[bucket.group]))
        self._perturbed = active
        self._drop_grads()

    @torch.no_grad()
    def descent(self) -> None:
        """After the last pass: restore w exactly, form the descent gradient, step the base optimizer."""
        if not self._perturbed:
            raise RuntimeError(f"{self.name}: descent() called without ascent()")
        self._restore()
        self._descent_gradient(self._perturbed)
        self._perturbed = []
        self._end_micro_batch()

    def _restore(self) -> None:
        if self.bn is not None:
            self.bn.restore()
        for _, idx in self._perturbed:
            torch._foreach_copy_(self.tensors(idx), self.buffers("backup", idx))

    # ------------------------------------------------------------------ hooks
    def _direction_norms(self, active: list[tuple[Bucket, list[int]]]) -> tuple[Tensor, Tensor]:
        """(||g0||^2, ||normalizer||^2); may rewrite the gradients in place. SAM: both are ||g0||^2."""
        sq = self._sum_sq(active)
        return sq, sq

    def _direction(self, idx: list[int]) -> list[Tensor]:
        """Tensors d with e = rho_group * d / ||normalizer||; SAM: the gradients."""
        return self.grads(idx)

    def _descent_gradient(self, active: list[tuple[Bucket, list[int]]]) -> None:
        """Leave the descent gradient in ``.grad``; SAM uses g+ as is."""

    # ------------------------------------------------------------------ helpers
    def _sum_sq(self, active: list[tuple[Bucket, list[int]]], source: str | None = None) -> Tensor:
        total = self._scalar(0.0)
        for _, idx in active:
            ts = self.grads(idx) if source is None else self.buffers(source, idx)
            total = total + sq_norm(ts, self.acc_dtype, self.device)
        return total

    def _record_stats(self, sq_raw: Tensor) -> None:
        inv = self.inv_grad_scale()
        raw = sq_raw.sqrt() if inv is None else sq_raw.sqrt() * inv
        self.stats["grad_norm"].copy_(raw)

    def _grads_or_zeros(self, idx: list[int]) -> list[Tensor]:
        """Gradients of a later pass; a tensor that got none there counts as zero (descent combinations)."""
        for i in idx:
            p = self.params[i]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return self.grads(idx)


class SAM(SharpnessAware):
    """SAM (Foret et al., ICLR 2021): e = rho g0 / ||g0||, descend with g(w + e)."""

    name = "sam"
    hyperparameters = {"rho": 0.05, "eps": 1e-12}


class ASAM(SharpnessAware):
    """ASAM (Kwon et al., ICML 2021), official semantics: T = |w| + eta on weight tensors, 1 elsewhere.

    e = rho T^2 g0 / ||T g0||. "Weight tensors" are parameters whose name contains ``weight`` when ``model``
    is given (conv/linear/norm weights, as the official code), otherwise tensors with ndim > 1.
    """

    name = "asam"
    hyperparameters = {"rho": 0.5, "eta": 0.01, "eps": 1e-16}

    def __init__(self, base: torch.optim.Optimizer, **kwargs: Any) -> None:
        super().__init__(base, **kwargs)
        if self.model is not None:
            named = {id(p): n for n, p in self.model.named_parameters()}
            self.scaled = [("weight" in named.get(id(p), "")) for p in self.params]
        else:
            self.scaled = [p.ndim > 1 for p in self.params]

    @classmethod
    def validate(cls, hp: dict[str, Any]) -> None:
        super().validate(hp)
        if hp["eta"] < 0:
            raise ValueError(f"asam: eta must be >= 0, got {hp['eta']}")

    def _direction_norms(self, active: list[tuple[Bucket, list[int]]]) -> tuple[Tensor, Tensor]:
        sq_raw = self._sum_sq(active)
        for _, idx in active:  # T is built in the backup buffers, which are overwritten after use
            w_idx = [i for i in idx if self.scaled[i]]
            if w_idx:
                t = self.buffers("backup", w_idx)
                torch._foreach_copy_(t, self.tensors(w_idx))
                torch._foreach_abs_(t)
                torch._foreach_add_(t, self.hp["eta"])
                torch._foreach_mul_(self.grads(w_idx), t)
        return sq_raw, self._sum_sq(active)

    def _direction(self, idx: list[int]) -> list[Tensor]:
        w_idx = [i for i in idx if self.scaled[i]]
        if w_idx:  # T g -> T^2 g
            torch._foreach_mul_(self.grads(w_idx), self.buffers("backup", w_idx))
        return self.grads(idx)


class GCSAM(SharpnessAware):
    """GCSAM (Hassan et al., IEEE Access 2025): perturb along the centralized gradient.

    e = rho GC(g0) / ||GC(g0)|| (``perturbation_norm="gc"``, the paper) or rho GC(g0) / ||g0|| (``"raw"``,
    the authors' script); descend with g(w + e), centralized too if ``gc_placement`` is "descent"/"both"
    (then the ascent is plain SAM for "descent"). ``gc_ema_beta`` subtracts an EMA of slice means (GC-EMA).
    The centralization is done in place on the first-pass gradient, which is not needed afterwards.
    """

    name = "gcsam"
    hyperparameters = {"rho": 0.05, "eps": 1e-12, "perturbation_norm": "gc", "gc_placement": "ascent",
                       "gc_targets": "ndim>1", "gc_ema_beta": None}

    def __init__(self, base: torch.optim.Optimizer, **kwargs: Any) -> None:
        super().__init__(base, **kwargs)
        self.gc = gc_mask(self.params, self.hp["gc_targets"], self.model)
        beta = self.hp["gc_ema_beta"]
        self.ema = {site: SliceMeanEMA(beta) for site in ("ascent", "descent")} if beta is not None else None
        self.stats["grad_norm_gc"] = self._scalar(0.0)
        self._slice_size_cache: dict[tuple[int, ...], Tensor] = {}

    @classmethod
    def validate(cls, hp: dict[str, Any]) -> None:
        super().validate(hp)
        choices = {"perturbation_norm": ("gc", "raw"), "gc_placement": ("ascent", "descent", "both"),
                   "gc_targets": GC_TARGETS}
        for key, allowed in choices.items():
            if hp[key] not in allowed:
                raise ValueError(f"gcsam: {key} must be one of {list(allowed)}, got {hp[key]!r}")
        beta = hp["gc_ema_beta"]
        if beta is not None and not (isinstance(beta, int | float) and 0.0 <= beta < 1.0):
            raise ValueError(f"gcsam: gc_ema_beta must be None or in [0, 1), got {beta!r}")

    def _center(self, site: str, i: int, mean: Tensor) -> Tensor:
        return mean if self.ema is None else self.ema[site].update(i, mean, self.inv_grad_scale())

    def _direction_norms(self, active: list[tuple[Bucket, list[int]]]) -> tuple[Tensor, Tensor]:
        if self.hp["gc_placement"] == "descent":
            self._sq_gc = self._sum_sq(active)  # no GC on the first pass: the ascent is SAM's
            return self._sq_gc, self._sq_gc
        # ||GC(g)|| is measured on the centred tensors, and ||g||^2 = ||GC(g)||^2 + n ||m||^2 per tensor (n elements
        # per output slice) is a sum of non-negative parts. The old shortcut ||g||^2 - n ||m||^2 cancelled in float32
        # when GC removes nearly all of g, and e = rho GC(g) / ~0 reached 1e7. With GC-EMA the centre is not the
        # mean, so ||g|| is measured before centring instead.
        sq_raw = self._sum_sq(active) if self.ema is not None else None
        means, centred = [], []
        for _, idx in active:
            for i in idx:
                if self.gc[i]:
                    g = self.params[i].grad
                    mean = g.mean(dim=slice_dims(g), keepdim=True)
                    g.sub_(self._center("ascent", i, mean))
                    means.append(mean)
                    centred.append(i)
        self._sq_gc = self._sum_sq(active)
        if sq_raw is None:
            removed = (torch.stack(torch._foreach_norm(means)).to(self.acc_dtype).square()
                       * self._slice_sizes(tuple(centred))).sum() if means else 0.0
            sq_raw = self._sq_gc + removed
        return sq_raw, (self._sq_gc if self.hp["perturbation_norm"] == "gc" else sq_raw)

    def _slice_sizes(self, centred: tuple[int, ...]) -> Tensor:
        """Elements per output slice of the centralized tensors, kept on device (built once per tensor set)."""
        sizes = self._slice_size_cache.get(centred)
        if sizes is None:
            sizes = torch.tensor([self.params[i][0].numel() for i in centred], dtype=self.acc_dtype,
                                 device=self.device)
            self._slice_size_cache[centred] = sizes
        return sizes

    def _record_stats(self, sq_raw: Tensor) -> None:
        super()._record_stats(sq_raw)
        inv = self.inv_grad_scale()
        gc_norm = self._sq_gc.sqrt()
        self.stats["grad_norm_gc"].copy_(gc_norm if inv is None else gc_norm * inv)

    def _descent_gradient(self, active: list[tuple[Bucket, list[int]]]) -> None:
        if self.hp["gc_placement"] == "ascent":
            return
        for i, p in enumerate(self.params):
            if self.gc[i] and p.grad is not None:
                g = p.grad
                centralize_(g, self._center("descent", i, g.mean(dim=slice_dims(g), keepdim=True)))

    def _extra_state(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        return {"gc_ema": {site: ema.state_dict() for site, ema in self.ema.items()}}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        if self.ema is None:
            return
        for site, means in extra.get("gc_ema", {}).items():
            self.ema[site].load_state_dict({int(i): m.to(self.params[int(i)].device) for i, m in means.items()})


class GSAM(SharpnessAware):
    """GSAM (Zhuang et al., ICLR 2022): d = g+ - alpha * (component of g0 orthogonal to g+).

    rho follows the LR schedule per group: rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min),
    with lr_max the group's LR when the optimizer was built (stored in the group, so it is checkpointed).
    ``rho_min=None`` keeps rho constant. ``alpha=0`` is SAM.
    """

    name = "gsam"
    hyperparameters = {"rho": 0.05, "rho_min": None, "alpha": 0.4, "lr_min": 0.0, "eps": 1e-12}
    group_hyperparameters = frozenset({"rho", "rho_min"})
    keeps_g0 = True

    def __init__(self, base: torch.optim.Optimizer, **kwargs: Any) -> None:
        super().__init__(base, **kwargs)
        for group in self.param_groups:
            group.setdefault("gsam_lr_max", float(group.get("initial_lr", group["lr"])))

    @classmethod
    def validate(cls, hp: dict[str, Any]) -> None:
        super().validate(hp)
        if not 0.0 <= hp["alpha"] <= 1.0:
            raise ValueError(f"gsam: alpha must be in [0, 1], got {hp['alpha']}")
        if hp["rho_min"] is not None and not 0.0 <= hp["rho_min"] <= hp["rho"]:
            raise ValueError(f"gsam: rho_min must be in [0, rho={hp['rho']}], got {hp['rho_min']}")

    def group_rho(self, group: dict[str, Any]) -> float | Tensor:
        """rho_t from the group's current LR; a device tensor when the LR is one (graph-safe), else a float."""
        rho, rho_min = group["rho"], group["rho_min"]
        lr_max, lr_min = group["gsam_lr_max"], self.hp["lr_min"]
        if rho_min is None or lr_max <= lr_min:
            return rho
        return rho_min + (rho - rho_min) * (group["lr"] - lr_min) / (lr_max - lr_min)

    def _descent_gradient(self, active: list[tuple[Bucket, list[int]]]) -> None:
        eps, alpha = self.hp["eps"], self.hp["alpha"]
        sq0 = self._sum_sq(active, "g0")
        inner = self._scalar(0.0)
        for _, idx in active:
            gp = self._grads_or_zeros(idx)
            dots = [torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(self.buffers("g0", idx), gp, strict=True)]
            inner = inner + torch.stack(dots).to(self.acc_dtype).sum()
        sqp = self._sum_sq(active)
        n0, npl = sq0.sqrt(), sqp.sqrt()
        # g0_par = cos * ||g0|| * g+ / ||g+||, so d = (1 + alpha * k) g+ - alpha g0 with k = cos ||g0|| / ||g+||
        k = inner / (n0 * npl + eps) * n0 / (npl + eps)
        coef = 1.0 + alpha * k
        for _, idx in active:
            gp = self.grads(idx)
            torch._foreach_mul_(gp, coef)
            torch._foreach_add_(gp, self.buffers("g0", idx), alpha=-alpha)


class WSAM(SharpnessAware):
    """WSAM (Yue et al., KDD 2023): loss + a (L(w + e) - L(w)), a = gamma / (1 - gamma).

    Coupled (``decouple=False``): d = a g+ + (1 - a) g0. Decoupled (default): the base steps with g0, then
    w -= lr * a * (g+ - g0), an SGD-like step with the group LR whatever the base. Coupled gamma=0.5 is SAM.
    """

    name = "wsam"
    hyperparameters = {"rho": 0.05, "gamma": 0.9, "decouple": True, "eps": 1e-12}
    keeps_g0 = True

    @classmethod
    def validate(cls, hp: dict[str, Any]) -> None:
        super().validate(hp)
        if not 0.0 <= hp["gamma"] < 1.0:
            raise ValueError(f"wsam: gamma must be in [0, 1), got {hp['gamma']}")

    @property
    def weight(self) -> float:
        return self.hp["gamma"] / (1.0 - self.hp["gamma"])

    def _descent_gradient(self, active: list[tuple[Bucket, list[int]]]) -> None:
        a = self.weight
        if self.hp["decouple"] and self._micro == 0:
            torch._foreach_zero_(self.buffers("sharpness", range(len(self.params))))
        for _, idx in active:
            gp, g0 = self._grads_or_zeros(idx), self.buffers("g0", idx)
            if not self.hp["decouple"]:
                torch._foreach_mul_(gp, a)
                torch._foreach_add_(gp, g0, alpha=1.0 - a)
                continue
            delta = self.buffers("sharpness", idx)
            torch._foreach_sub_(gp, g0)
            torch._foreach_add_(delta, gp)
            torch._foreach_copy_(gp, g0)
        if self.hp["decouple"]:
            self._sharpness_active = active
            self.flag_overflow(self._sum_sq(active, "sharpness"))

    def _after_base_step(self) -> None:
        if not self.hp["decouple"]:
            return
        inv = self.inv_grad_scale()
        for bucket, idx in self._sharpness_active:
            # the LR may be a device tensor (graph-safe): then it scales on the device, never read on the host
            factor = -self.param_groups[bucket.group]["lr"] * self.weight / self.accumulation_steps
            delta = self.buffers("sharpness", idx)
            if inv is None and isinstance(factor, Tensor):
                axpy_(self.tensors(idx), delta, factor)
            elif inv is None:
                torch._foreach_add_(self.tensors(idx), delta, alpha=factor)
            else:  # unscale, and skip with the base step when any pass overflowed
                for d in delta:
                    d.masked_fill_(self._overflow, 0.0)
                torch._foreach_mul_(delta, inv * factor)
                torch._foreach_add_(self.tensors(idx), delta)


class CRSAM(SharpnessAware):
    """CR-SAM (Wu et al., AAAI 2024), three passes: g0 at w, g+ at w + e, g- at w - e.

    d = g+ + gamma (g+ + g- - 2 g0) + beta (g+ - g-). The third pass is driven by ``ascent_minus()``.
    BatchNorm statistics come from pass 1 only. ``gamma = beta = 0`` is SAM (with one wasted pass).
    """

    name = "crsam"
    passes = 3
    pass_names = ("ascent", "ascent_minus", "descent")
    hyperparameters = {"rho": 0.1, "gamma": 0.1, "beta": 0.01, "eps": 1e-12}
    keeps_g0 = True

    @classmethod
    def validate(cls, hp: dict[str, Any]) -> None:
        super().validate(hp)
        for key in ("gamma", "beta"):
            if hp[key] < 0:
                raise ValueError(f"crsam: {key} must be >= 0, got {hp[key]}")

    @torch.no_grad()
    def ascent_minus(self) -> None:
        """After pass 2: keep g+, move from w + e to w - e (= 2w - (w + e), symmetric to the applied e)."""
        if not self._perturbed:
            raise RuntimeError("crsam: ascent_minus() called without ascent()")
        for _, idx in self._perturbed:
            torch._foreach_copy_(self.buffers("g_plus", idx), self._grads_or_zeros(idx))
            w = self.tensors(idx)
            torch._foreach_mul_(w, -1.0)
            torch._foreach_add_(w, self.buffers("backup", idx), alpha=2.0)
        self._drop_grads()

    def _descent_gradient(self, active: list[tuple[Bucket, list[int]]]) -> None:
        gamma, beta = self.hp["gamma"], self.hp["beta"]
        for _, idx in active:
            gm = self._grads_or_zeros(idx)
            torch._foreach_mul_(gm, gamma - beta)
            torch._foreach_add_(gm, self.buffers("g_plus", idx), alpha=1.0 + gamma + beta)
            torch._foreach_add_(gm, self.buffers("g0", idx), alpha=-2.0 * gamma)


register("sam", SAM, memory="N (weight backup)", preset={"rho": 0.05},
         description="Foret et al.; the davda54/sam default radius")
register("asam", ASAM, memory="N", preset={"rho": 0.5, "eta": 0.01},
         description="SamsungLabs/ASAM class defaults (rho about 10x SAM's)")
register("gsam", GSAM, memory="2N (backup, g0)", preset={"rho": 0.05, "alpha": 0.4},
         description="constant radius 0.05 (SAM's; the port's 2.0 is for adaptive mode) and the PyTorch ports' "
         "surrogate-gap weight alpha 0.4")
register("wsam", WSAM, memory="3N decoupled (backup, g0, sharpness term), 2N coupled",
         preset={"rho": 0.05, "gamma": 0.9},
         description="the official class radius and the WSAM README's gamma")
register("crsam", CRSAM, memory="3N (backup, g0, g+)", preset={"rho": 0.1, "gamma": 0.1, "beta": 0.01},
         description="the official CR-SAM training script's values")
register("gcsam", GCSAM, memory="N", preset={"rho": 0.05},
         description="the GCSAM paper / authors' script (Adam, lr 1e-4, rho 0.05); GC on the ascent only")
