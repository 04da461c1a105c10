"""Margin statistics over a data set (Banburski et al. 2021, arXiv 2107.10199).

``margin_distribution`` streams a loader through a model without gradients and returns the
per-sample multiclass margins m = z_y - max_{c != y} z_c, optionally normalised (by the product
of the layers' weight norms, which makes margins of differently scaled networks comparable);
``margin_auc`` summarises a distribution as the area under its empirical CDF on [lo, hi];
``plot_margin_cdf`` draws the CDFs.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Sequence, Union

import torch
from torch import nn

from ._layers import unwrap_parallel
from ._outputs import OutputAdapter, check_output_adapter
from .margin_op import multiclass_margin

Normalizer = Union[None, str, Callable[[nn.Module], Union[float, torch.Tensor]]]


def weight_norm_product(model: nn.Module) -> torch.Tensor:
    """Product of the Frobenius norms of the weights of every Linear and Conv layer in ``model``.

    Raises ValueError when the model has no such layer.
    """
    norms = [
        m.weight.detach().float().norm()
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.weight is not None
    ]
    if not norms:
        raise ValueError("normalize: 'weights' needs a model with nn.Linear or nn.Conv layers")
    return torch.stack(norms).prod()


def _normalizer_value(model: nn.Module, normalize: Normalizer) -> float | None:
    if normalize is None:
        return None
    if isinstance(normalize, str):
        if normalize != "weights":
            raise ValueError(
                f"normalize: expected None, 'weights' or a callable, got {normalize!r}"
            )
        value = weight_norm_product(model)
    elif callable(normalize):
        value = normalize(model)
    else:
        raise TypeError(
            f"normalize: expected None, 'weights' or a callable, got {type(normalize).__name__}"
        )
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"normalize: the normaliser must be finite and > 0, got {value}")
    return value


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def margin_distribution(
    model: nn.Module,
    loader: Iterable,
    *,
    normalize: Normalizer = None,
    device: Union[str, torch.device] | None = None,
    eval_mode: bool = True,
    output: OutputAdapter = None,
) -> torch.Tensor:
    r"""Per-sample margins :math:`m_n = z_{n,y_n} - \max_{c\ne y_n} z_{n,c}` over a data set.

    Streams ``loader`` through ``model`` under ``torch.no_grad()`` (no logits are kept: each
    batch is reduced to its margins by the fused :func:`multiclass_margin`). A DDP or
    DataParallel model runs as the module it wraps (a compiled model stays compiled), so no
    collective is touched and one rank may call this alone.

    Args:
        model: maps a batch of inputs to (B, C) logits (or a tuple, dict or object holding
            them, see ``output``).
        loader: iterable of ``(inputs, target)`` batches (extra items are ignored), e.g. a
            ``DataLoader``; use ``shuffle=False`` to get margins in data-set order.
        normalize: ``None``; ``"weights"`` to divide by the product of the Frobenius norms of the
            model's Linear / Conv weights (:func:`weight_norm_product`); or a callable
            ``f(model) -> float`` giving the divisor.
        device: where to run the model; default: the device of its parameters.
        eval_mode: run in ``model.eval()`` (dropout off, batch-norm running stats), restoring
            every module's training flag afterwards.
        output: ``f(model_output) -> logits``; default: the output itself, its first element
            (tuple / list), its ``"logits"`` entry (dict) or its ``.logits`` attribute.

    Returns:
        (N,) float32 margins on the CPU, in loader order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    to_logits = check_output_adapter(output)
    dev = torch.device(device) if device is not None else _model_device(model)
    divisor = _normalizer_value(model, normalize)
    runner = unwrap_parallel(model)
    flags = {m: m.training for m in runner.modules()}
    if eval_mode:
        runner.eval()
    chunks = []
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise TypeError(
                        f"loader: expected (inputs, target) batches, got {type(batch).__name__} "
                        f"at batch {i}"
                    )
                x, y = batch[0].to(dev), batch[1].to(dev)
                logits = to_logits(runner(x))
                if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                    raise ValueError(
                        f"model: expected (B, C) logits, got "
                        f"{getattr(logits, 'shape', type(logits).__name__)} at batch {i}"
                    )
                chunks.append(multiclass_margin(logits, y).float().cpu())
    finally:
        for m, training in flags.items():
            m.training = training
    margins = torch.cat(chunks) if chunks else torch.empty(0)
    return margins / divisor if divisor is not None else margins


def margin_auc(margins: torch.Tensor, lo: float, hi: float) -> float:
    r"""Area under the empirical CDF of the margins on [lo, hi], divided by (hi - lo).

    :math:`\frac{1}{hi-lo}\int_{lo}^{hi} \hat F(t)\,dt = \frac{1}{n}\sum_n
    \frac{hi - \mathrm{clamp}(m_n, lo, hi)}{hi - lo} \in [0, 1]`: 1 when every margin is
    <= lo, 0 when every margin is >= hi (lower is better: more of the data has a large margin).
    A NaN margin makes the result NaN.
    """
    if not isinstance(margins, torch.Tensor):
        margins = torch.as_tensor(margins)
    if margins.numel() == 0:
        raise ValueError("margins: expected at least one margin, got an empty tensor")
    if not margins.dtype.is_floating_point:
        margins = margins.float()
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"lo, hi: expected finite lo < hi, got lo={lo}, hi={hi}")
    m = margins.detach().double().flatten()
    return float((hi - m.clamp(lo, hi)).mean() / (hi - lo))


def plot_margin_cdf(
    margins: Union[torch.Tensor, Sequence[torch.Tensor], Dict[str, torch.Tensor]],
    *,
    labels: Sequence[str] | None = None,
    ax=None,
    lo: float | None = None,
    hi: float | None = None,
    **plot_kwargs,
):
    """Draws the empirical CDF of one or several margin distributions (needs matplotlib).

    Args:
        margins: a tensor, a sequence of tensors, or a ``{label: tensor}`` dict.
        labels: legend labels for a sequence (a dict brings its own).
        ax: a matplotlib Axes to draw on; default: a new figure.
        lo, hi: optional x-axis limits (e.g. the ``margin_auc`` range).
        plot_kwargs: passed to ``ax.step`` for every curve.

    Returns:
        The matplotlib Axes.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError("plot_margin_cdf needs matplotlib (pip install matplotlib)") from exc
    if isinstance(margins, dict):
        if labels is not None:
            raise ValueError("labels: not accepted with a dict of margins (its keys are labels)")
        labels, series = list(margins.keys()), list(margins.values())
    elif isinstance(margins, torch.Tensor):
        series = [margins]
    else:
        series = list(margins)
    if labels is not None and len(labels) != len(series):
        raise ValueError(f"labels: expected {len(series)} labels, got {len(labels)}")
    if ax is None:
        import matplotlib.pyplot as plt

        _fig, ax = plt.subplots()
    for i, m in enumerate(series):
        x = torch.as_tensor(m).detach().double().flatten().sort().values.cpu()
        y = torch.arange(1, x.numel() + 1, dtype=torch.float64) / max(x.numel(), 1)
        label = labels[i] if labels is not None else None
        ax.step(x.numpy(), y.numpy(), where="post", label=label, **plot_kwargs)
    ax.set_xlabel("margin")
    ax.set_ylabel("fraction of samples with margin <= x")
    ax.set_ylim(0.0, 1.0)
    if lo is not None or hi is not None:
        ax.set_xlim(lo, hi)
    if labels is not None:
        ax.legend()
    return ax
