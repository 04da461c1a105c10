"""Weight-perturbation robust cross-entropy (exact worst case for the last linear layer).

If every row w_c of the last layer z = W h + b may move by ||dw_c||_p <= eps, Hoelder's
inequality bounds the move of each logit by |dw_c . h| <= eps ||h||_q = r (1/p + 1/q = 1), and
the bound is attained. CE rises with every off-target logit and falls with the target's, so the
worst case over the whole ball is CE(z~) with z~_c = z_c + r (c != y), z~_y = z_y - r, reached by
pushing every row at once. The fused CE kernel (``worst_of_k_ce_fwd`` with k = 1 and a radius)
computes it in one read of the logits, and its gradient into r.
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch
from torch import nn

from . import _fast_path as fast_path
from . import _routes as routes
from . import _validation as v
from ._autocast import loss_dtype
from ._heads_check import check_head_features, warn_outside_ddp_forward
from ._ops import stats_dtype
from ._reduce import reduce_cross_entropy
from .modules import LossModule

Radius = Union[float, torch.Tensor]


def _radius_tensor(radius: Radius, batch: int, logits: torch.Tensor) -> torch.Tensor:
    """The radius as a (N,) tensor of the kernels' statistics dtype (differentiable)."""
    f = stats_dtype(logits)
    if not isinstance(radius, torch.Tensor):
        r = v.check_nonnegative(radius, "radius")
        return torch.full((batch,), r, dtype=f, device=logits.device)
    v.check_float_dtype(radius, "radius")
    v.check_same_device(radius, logits, "radius")
    if radius.dim() == 0:
        radius = radius.expand(batch)
    elif radius.dim() != 1 or radius.shape[0] != batch:
        raise ValueError(
            f"radius: expected a float, a 0-d tensor or shape ({batch},), "
            f"got shape {tuple(radius.shape)}"
        )
    radius = radius.to(f)
    if v.validation_enabled() and radius.numel() > 0 and v.has_values(radius):
        first = _first_negative_or_nonfinite(radius)
        if first is not None:
            raise ValueError(
                f"radius: expected finite values >= 0, got {float(radius[first])} "
                f"(at index {first})"
            )
    return radius


def _first_negative_or_nonfinite(radius: torch.Tensor) -> int | None:
    """The index of the first radius that is negative, NaN or infinite, or None."""
    if radius.device.type == "cpu" and fast_path.available(radius):
        return fast_path.first_negative_or_nonfinite(radius)
    bad = ~(torch.isfinite(radius) & (radius >= 0))  # one reduction and one host sync
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def weight_robust_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    radius: Radius,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Exact worst-case cross-entropy under norm-bounded last-layer weight perturbations.

    With per-sample radius :math:`r_n \ge 0` (``weight_perturbation_radius`` gives
    :math:`r = \varepsilon\lVert h\rVert_q`), the loss of sample n is ``F.cross_entropy`` of the
    robust row :math:`\tilde z_c = z_c + r_n\ (c \ne y_n)`, :math:`\tilde z_{y_n} = z_{y_n} - r_n`,
    i.e. :math:`\mathrm{lse}(\tilde z) - (1-\varepsilon_{ls})\tilde z_y
    - \tfrac{\varepsilon_{ls}}{C}\sum_c \tilde z_c`. Its gradient flows into the logits and into
    the radius (:math:`\partial L/\partial r = 2(q_y - \tilde p_y)`,
    :math:`q_y = 1 - \varepsilon_{ls} + \varepsilon_{ls}/C`), so a radius computed from features
    trains them too. ``radius = 0`` is exactly ``F.cross_entropy``; the certified margin is
    :math:`m - 2r`.

    Args:
        logits: (N, C) floating logits (float32, float16, bfloat16 or float64).
        target: (N,) integer class indices in [0, C), or ``ignore_index`` (that sample
            contributes 0, and ``'mean'`` divides by the number of samples not ignored).
        radius: a float >= 0 for every sample, or a 0-d / (N,) floating tensor >= 0
            (differentiable; converted to float32, float64 for float64 logits). Its values are
            checked (one host sync) while ``fm.set_validation`` is on, except inside
            ``torch.func`` transforms (``vmap`` cannot read values on the host).
        label_smoothing: in [0, 1], PyTorch's meaning (applied to the robust row).
        ignore_index: target value that marks a sample to skip.
        reduction: ``'mean'`` | ``'sum'`` | ``'none'``.

    Returns:
        The loss in the logits' dtype (accumulated in float32; float32 for float16 / bfloat16
        logits inside ``torch.autocast``, as ``F.cross_entropy``).

    Autograd: into ``logits`` and ``radius``. First order runs the fused backward op; second
    and higher order (``create_graph=True``), forward mode (``torch.func.jvp``,
    ``torch.autograd.forward_ad``) and ``torch.func.grad`` / ``vmap`` are exact, computed from
    the same math in PyTorch ops.
    """
    x = v.check_rows_of_logits(logits)
    N, C = x.shape
    label_smoothing = v.check_label_smoothing(label_smoothing)
    v.check_reduction(reduction)
    target = v.check_class_target(target, N, C, ignore_index, logits)
    r = _radius_tensor(radius, N, logits)
    if fast_path.available(x, target, r):
        loss, _index = fast_path.worst_of_k_ce_loss(
            x, target, r, 0.0, label_smoothing, ignore_index, None, reduction,
            loss_dtype(logits), fast_path.ONE_COPY,
        )  # fmt: skip
        return loss
    per_sample, _lse, _weight, _index, _dr = routes.worst_of_k_ce_fwd(
        x.unsqueeze(1), target, r, 0.0, label_smoothing, ignore_index
    )
    return reduce_cross_entropy(per_sample, target, ignore_index, reduction).to(loss_dtype(logits))


def dual_exponent(p: float) -> float:
    """q with 1/p + 1/q = 1 (p = 1 -> inf, p = inf -> 1), for p >= 1."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"p: expected a float >= 1 (or math.inf), got {type(p).__name__}")
    p = float(p)
    if not p >= 1.0:  # also rejects NaN
        raise ValueError(f"p: expected p >= 1 (or math.inf), got {p}")
    if p == 1.0:
        return math.inf
    if p == math.inf:
        return 1.0
    return p / (p - 1.0)


def weight_perturbation_radius(features: torch.Tensor, eps: float, p: float = 2.0) -> torch.Tensor:
    r"""Per-sample radius :math:`r_n = \varepsilon \lVert h_n \rVert_q` (1/p + 1/q = 1).

    If each row of the last layer's weight may move by :math:`\lVert \Delta w_c\rVert_p \le
    \varepsilon`, logit c moves by at most :math:`r_n` (Hoelder, attained). The bias is not
    perturbed. Differentiable in ``features``.

    Args:
        features: (N, D) inputs of the last linear layer (more dims are flattened per sample).
        eps: perturbation budget, a float >= 0.
        p: the weight norm, >= 1 (1, 2 and ``math.inf`` are the usual choices).

    Returns:
        (N,) radii in the features' dtype.
    """
    v.check_tensor(features, "features")
    v.check_float_dtype(features, "features")
    if features.dim() < 2:
        raise ValueError(
            f"features: expected a (N, D) tensor, got {features.dim()}-D of shape "
            f"{tuple(features.shape)}"
        )
    eps = v.check_nonnegative(eps, "eps")
    q = dual_exponent(p)
    return eps * torch.linalg.vector_norm(features.flatten(1), ord=q, dim=1)


class WeightRobustCrossEntropy(LossModule):
    """Module form of :func:`weight_robust_cross_entropy`.

    Two ways to use it:

    * wrapping the model's last ``nn.Linear`` (``linear=model.fc, eps=..., p=...``), ``eps``
      the bound on each row's move ``||dw_c||_p``: ``loss = loss_fn(features, target)``
      computes the logits ``linear(features)`` and the radius ``eps * ||features||_q`` and
      returns the robust loss (gradients reach the layer and the features through both);
      ``return_logits=True`` also returns the clean logits;
    * without a layer: ``loss = loss_fn(logits, target, radius)``.

    Under DistributedDataParallel (or whenever the head should run inside the model's own
    forward, e.g. a ``torch.compile``'d model) wrap the whole model with
    :class:`fastmargin.HeadLoss`, which runs the model's forward and applies this loss to the
    head's input and output: calling the head outside the DDP forward leaves the replicas'
    parameters to drift apart::

        loss_fn = fm.HeadLoss(ddp_model, fm.WeightRobustCrossEntropy(model.fc, eps=0.05))
        loss = loss_fn(x, y)
    """

    def __init__(
        self,
        linear: nn.Linear | None = None,
        eps: float = 0.0,
        p: float = 2.0,
        *,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        if linear is not None and not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear or None, got {type(linear).__name__}")
        dual_exponent(p)  # validates p now rather than at the first call
        super().__init__(
            eps=v.check_nonnegative(eps, "eps"),
            p=p,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            reduction=reduction,
        )
        self.linear = linear

    def head_loss(
        self, features: torch.Tensor, logits: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """The robust loss of ``logits`` = head(``features``), radius ``eps * ||features||_q``."""
        radius = weight_perturbation_radius(features, self.eps, self.p)
        return weight_robust_cross_entropy(
            logits,
            target,
            radius,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        radius: Radius | None = None,
        *,
        return_logits: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        if self.linear is not None:
            if radius is not None:
                raise ValueError(
                    "radius: not accepted when the module wraps an nn.Linear (the radius is "
                    "eps * ||features||_q); pass features and target only"
                )
            check_head_features(input, self.linear)
            warn_outside_ddp_forward(self)
            logits = self.linear(input)
            loss = self.head_loss(input, logits, target)
            return (loss, logits) if return_logits else loss
        if radius is None:
            raise ValueError(
                "radius: required when the module wraps no nn.Linear: call it as "
                "(logits, target, radius)"
            )
        loss = weight_robust_cross_entropy(
            input,
            target,
            radius,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )
        return (loss, input) if return_logits else loss
