"""Layer-wise noise stability (Arora, Ge, Neyshabur, Zhang, ICML 2018, arXiv 1802.05296)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import nn

from ._layers import LayerSpec, check_tensor_output, default_layers, select_layers, unwrap
from .perturb import all_layer_perturb


@dataclass
class NoiseStability:
    """Result of :func:`noise_stability`.

    Attributes:
        layers: names of the injection layers i (rows), in the order the forward runs them.
        targets: names of the measured layers j (columns): the same layers, then ``"output"``.
        mean: (len(layers), len(targets)) float64 tensor, the mean over trials and examples of
            ||x~_j - x_j|| / ||x_j||; NaN where layer j does not run after layer i.
        std: same shape, the standard deviation of the same samples (Bessel-corrected).
        sigma: the relative size of the injected noise.
        trials: noise draws per layer.
        examples: examples in the batch.
    """

    layers: List[str]
    targets: List[str]
    mean: torch.Tensor
    std: torch.Tensor
    sigma: float
    trials: int
    examples: int

    def __str__(self) -> str:
        head = (
            f"noise stability: mean ± std of ||x~_j - x_j|| / ||x_j|| after noise of relative "
            f"size sigma={self.sigma:g} at layer i ({self.trials} trials x {self.examples} "
            f"examples)"
        )
        cells = [
            [
                "-"
                if math.isnan(self.mean[i, j])
                else f"{self.mean[i, j].item():.4g}±{self.std[i, j].item():.2g}"
                for j in range(len(self.targets))
            ]
            for i in range(len(self.layers))
        ]
        first = max([len("inject at \\ measure at")] + [len(n) for n in self.layers])
        widths = [
            max([len(t)] + [len(row[j]) for row in cells]) for j, t in enumerate(self.targets)
        ]
        lines = [
            head,
            "  ".join(
                ["inject at \\ measure at".ljust(first)]
                + [t.rjust(w) for t, w in zip(self.targets, widths)]
            ),
        ]
        for name, row in zip(self.layers, cells):
            lines.append("  ".join([name.ljust(first)] + [c.rjust(w) for c, w in zip(row, widths)]))
        return "\n".join(lines)


def _relative_change(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """(B,) ||noisy_b - clean_b|| / ||clean_b|| in float64; NaN where ||clean_b|| = 0."""
    B = clean.shape[0]
    c = clean.detach().to(torch.float64).reshape(B, -1)
    n = noisy.detach().to(torch.float64).reshape(B, -1)
    num = torch.linalg.vector_norm(n - c, dim=1)
    den = torch.linalg.vector_norm(c, dim=1)
    return torch.where(den > 0, num / den, torch.full_like(den, math.nan))


def _eval_forward(model: nn.Module, x: torch.Tensor) -> None:
    """One forward in eval mode (training flags restored), to find the layers' order."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(x)
    finally:
        for m, training in modes.items():
            m.training = training


@torch.no_grad()
def noise_stability(
    model: nn.Module,
    x: torch.Tensor,
    *,
    layers: LayerSpec = None,
    sigma: float = 0.1,
    trials: int = 8,
    generator: torch.Generator | None = None,
) -> NoiseStability:
    r"""How much noise injected at one layer grows or shrinks by later layers.

    Let :math:`x_j` be the output of chosen layer j on the batch ``x`` (the first call of the
    layer in a forward), and the model's output be the last "layer". For each chosen layer i
    and each of ``trials`` draws, the output of layer i is replaced by

    .. math:: \tilde x_{i,b} = x_{i,b} + \sigma \lVert x_{i,b} \rVert_2 \,
              \xi_b / \lVert \xi_b \rVert_2, \qquad \xi_b \sim \mathcal N(0, I),

    i.e. Gaussian noise rescaled per example b so that its norm is exactly
    :math:`\sigma\lVert x_{i,b}\rVert` (a uniformly random direction), injected with
    :func:`fastmargin.all_layer_perturb` (``delta`` = :math:`\sigma\xi_b/\lVert\xi_b\rVert`).
    The forward then continues, and at every chosen layer j that runs after i, and at the
    output, the relative change :math:`\lVert\tilde x_{j,b} - x_{j,b}\rVert /
    \lVert x_{j,b}\rVert` is recorded. The result holds its mean and standard deviation over
    the trials and examples per (i, j); examples with :math:`x_{j,b} = 0` are left out of
    column j. Arora et al. call a network noise-stable when these ratios stay small (the
    injected noise is attenuated).

    The model runs in eval mode (BatchNorm uses running statistics, dropout is off) under
    ``torch.no_grad()``; the training flags are restored afterwards and no hook is left. A
    wrapped model (DDP, DataParallel, FSDP, ``torch.compile``) is measured through the module
    it wraps, run eagerly: no collective is touched, so one rank may call this alone.

    Args:
        model: a module (possibly wrapped) whose output is a tensor (B, ...).
        x: one input batch.
        layers: ``None`` (every Conv and Linear layer the forward runs, in execution order,
            except the last one run), ``"official"`` (the convolutions inside each residual
            block), a list of submodules or names, or a predicate ``(name, module) -> bool``.
        sigma: relative noise size (> 0).
        trials: noise draws per layer (>= 1).
        generator: optional ``torch.Generator`` (on x's device) for the noise.
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"sigma: expected a float, got {type(sigma).__name__}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma: expected a finite value > 0, got {sigma}")
    if isinstance(trials, bool) or not isinstance(trials, int):
        raise TypeError(f"trials: expected an int, got {type(trials).__name__}")
    if trials < 1:
        raise ValueError(f"trials: expected a value >= 1, got {trials}")
    base = unwrap(model)
    if layers is None:
        chosen = default_layers(base, lambda: _eval_forward(base, x), arg="layers")
    else:
        chosen = select_layers(base, layers, arg="layers")
    state: Dict[str, object] = {"seen": set(), "acts": {}, "inject": None, "delta": None}

    def hook(index: int, module: nn.Module, inputs, output):
        if index in state["seen"]:
            return None  # only a layer's first call in a forward is measured
        state["seen"].add(index)
        u = check_tensor_output(output, chosen[index][0])
        if state["inject"] == index:
            u = all_layer_perturb(u, state["delta"](u))
        state["acts"][index] = u
        return u if state["inject"] == index else None

    def run(inject: int | None, make_delta=None):
        state.update(seen=set(), acts={}, inject=inject, delta=make_delta)
        out = base(x)
        return dict(state["acts"]), check_tensor_output(out, "output")

    def unit_noise(u: torch.Tensor) -> torch.Tensor:
        # In u's memory layout (empty_like), so the op reads u and delta in place.
        xi = torch.empty_like(u, dtype=torch.float32).normal_(generator=generator)
        norm = torch.linalg.vector_norm(xi.reshape(u.shape[0], -1), dim=1)
        scale = sigma / norm.clamp_min(torch.finfo(torch.float32).tiny)
        return xi * scale.reshape((-1,) + (1,) * (u.dim() - 1))

    handles = []
    modes = {m: m.training for m in base.modules()}
    try:
        for index, (_name, module) in enumerate(chosen):
            handles.append(module.register_forward_hook(lambda m, i, o, k=index: hook(k, m, i, o)))
        base.eval()
        clean, clean_out = run(None)
        missing = [chosen[k][0] for k in range(len(chosen)) if k not in clean]
        if missing:
            raise ValueError(f"layers: {missing} did not run in the model's forward")
        order = list(clean)  # insertion order: the execution order of first calls
        B = clean_out.shape[0]
        L = len(order)
        mean = torch.full((L, L + 1), math.nan, dtype=torch.float64)
        std = torch.full((L, L + 1), math.nan, dtype=torch.float64)
        for row, i in enumerate(order):
            samples: List[List[torch.Tensor]] = [[] for _ in range(L + 1)]
            for _ in range(trials):
                acts, out = run(i, unit_noise)
                for col in range(row + 1, L):
                    samples[col].append(_relative_change(acts[order[col]], clean[order[col]]))
                samples[L].append(_relative_change(out, clean_out))
            for col in range(row + 1, L + 1):
                s = torch.cat(samples[col]).cpu()
                s = s[~torch.isnan(s)]
                if s.numel() > 0:
                    mean[row, col] = s.mean()
                    std[row, col] = s.std() if s.numel() > 1 else 0.0
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    names = [chosen[k][0] for k in order]
    return NoiseStability(names, names + ["output"], mean, std, float(sigma), trials, B)
