r"""Worst-of-k cross-entropy over k random last-layer weight perturbations, in one sweep.

The noise is generated inside the kernels by a counter-based Philox4x32-10 RNG keyed by
(seed, offset, row, copy, class) (``csrc/include/fastmargin/philox.h``), so the k noisy copies of
the logits exist only in registers and the backward regenerates the forward's noise instead of
storing it. ``(seed, offset)`` travel as an int64 (2,) tensor on the logits' device, drawn from
that device's generator with ``torch.randint`` (or from ``generator=``), like dropout:

* every call draws a fresh state, so consecutive calls give different noise;
* a generator seeded the same gives the same noise, on the CPU and on CUDA (the same state gives
  the same Philox integers on both, and one float32 Box-Muller definition serves both, so the
  normals differ at most by FMA contraction; each is within 4 ulp of the exact transform);
* no host synchronisation: the kernels read the state from device memory when they run, so the
  call can be captured in a CUDA graph (``torch.randint`` on a CUDA generator is capture-safe:
  each replay draws a new state).

:func:`noise` returns the exact noise a state produces, for tests and references.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import nn

from . import _routes as routes
from . import _validation as v
from ._autocast import loss_dtype
from ._heads_check import check_head_features, warn_outside_ddp_forward
from ._ops import ops, stats_dtype
from ._reduce import reduce_cross_entropy
from .modules import LossModule

_INT64_MIN = -(2**63)
_STATE_HIGH = 2**62
MAX_COPIES = 2**20  # the noise layout addresses copies 0 .. 2^20 - 1 (philox.h)

__all__ = [
    "WeightNoiseWorstOfKCrossEntropy",
    "draw_philox_state",
    "noise",
    "noise_from_state",
    "philox_state",
    "weight_noise_worst_of_k_cross_entropy",
]


def philox_state(seed: int, offset: int, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """The int64 (2,) tensor [seed, offset] the kernels read (both taken modulo 2^64)."""
    words = [((int(x) - _INT64_MIN) % 2**64) + _INT64_MIN for x in (seed, offset)]
    return torch.tensor(words, dtype=torch.int64, device=device)


def draw_philox_state(
    device: Union[str, torch.device], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draws a fresh [seed, offset] from ``generator`` (default: ``device``'s default generator).

    One small ``torch.randint`` on ``device``: no host synchronisation, capture-safe on CUDA.
    Calling it with a generator in the same state as the one passed to
    :func:`weight_noise_worst_of_k_cross_entropy` reproduces the state that call used.
    """
    device = torch.device(device)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            kind = type(generator).__name__
            raise TypeError(f"generator: expected a torch.Generator, got {kind}")
        if generator.device.type != device.type:
            raise ValueError(
                f"generator: expected a generator for device type {device.type!r} (that of "
                f"logits), got one for {generator.device}"
            )
    # 62 random bits each (not the full int64 range, whose width 2^64 - 1 overflows int64 range
    # arithmetic in some randint lowerings, e.g. under torch.compile).
    return torch.randint(
        0, _STATE_HIGH, (2,), dtype=torch.int64, device=device, generator=generator
    )


def noise_from_state(philox: torch.Tensor, n: int, k: int, c: int) -> torch.Tensor:
    """The exact float32 noise xi (n, k, c) the kernels use for the state ``philox``.

    xi[n, j, :] depends only on (seed, offset, n, j): a larger (n, k, c) extends a smaller one.
    """
    return ops.weight_noise_normal(philox, n, k, c)


def noise(
    seed: int, offset: int, n: int, k: int, c: int, device: Union[str, torch.device] = "cpu"
) -> torch.Tensor:
    """The exact float32 noise xi (n, k, c) for the draw (seed, offset), computed on ``device``."""
    return noise_from_state(philox_state(seed, offset, device), n, k, c)


def _check_k(k: object) -> int:
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if not 1 <= k <= MAX_COPIES:
        raise ValueError(f"k: expected 1 <= k <= {MAX_COPIES} noisy copies, got {k}")
    return k


def _scale_tensor(scale: object, logits: torch.Tensor) -> torch.Tensor:
    """``scale`` as an (N,) tensor in the statistics dtype (differentiable when it was a tensor)."""
    N = logits.shape[0]
    f = stats_dtype(logits)
    if isinstance(scale, torch.Tensor):
        v.check_same_device(scale, logits, "scale")
        if not scale.dtype.is_floating_point:
            raise TypeError(f"scale: expected a floating tensor, got {scale.dtype}")
        if scale.dim() == 0:
            scale = scale.expand(N)
        elif scale.dim() != 1 or scale.shape[0] != N:
            raise ValueError(
                f"scale: expected a float, a 0-d tensor or shape ({N},), got {tuple(scale.shape)}"
            )
        if v.validation_enabled() and N > 0 and v.has_values(scale):
            ok = torch.isfinite(scale) & (scale >= 0)
            if not bool(ok.all()):
                bad = float(scale.detach()[~ok][0])
                raise ValueError(f"scale: expected finite values >= 0, got {bad}")
        return scale.to(f).contiguous()
    value = v.check_nonnegative(scale, "scale")
    return logits.new_full((N,), value, dtype=f)


def weight_noise_worst_of_k_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    scale: Union[float, torch.Tensor],
    *,
    k: int = 4,
    temperature: float = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_index: bool = False,
    generator: torch.Generator | None = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    r"""Worst-of-k cross-entropy over k random perturbations of the last layer's weights.

    For the last layer :math:`z = W h + b`, perturb the weights of each example by
    :math:`E` with :math:`E_{cd} \sim N(0, σ^2)` i.i.d. The perturbed logits are
    :math:`z + E h`, and :math:`(E h)_c = \sum_d E_{cd} h_d \sim N(0, σ^2 \lVert h\rVert_2^2)`,
    independent across classes (disjoint rows of E). So, exactly in distribution,

    .. math:: z + E h \;=\; z + s\,ξ, \qquad s = σ \lVert h \rVert_2,\quad ξ \sim N(0, I_C):

    k weight perturbations need no extra matrix product, only Gaussian noise on the logits scaled
    per row. Copy j of row n is :math:`\tilde z_{nj} = z_n + s_n ξ_{nj}` and, with
    :math:`\ell_{nj} = \mathrm{CE}_ε(\tilde z_{nj}, y_n)`, the loss is
    :math:`L_n = \max_j \ell_{nj}` (τ = 0, ties to the lowest j) or
    :math:`L_n = τ \log(\tfrac1k \sum_j e^{\ell_{nj}/τ})` (τ > 0), as in
    :func:`fastmargin.worst_of_k_cross_entropy`.

    Gradient into ``scale`` (reparameterisation):
    :math:`\partial L/\partial s = \sum_j w_j \sum_c g_{jc} ξ_{jc}` with
    :math:`g_j = \partial \ell_j / \partial \tilde z_j` and
    :math:`w_j = \partial L/\partial \ell_j`.
    This is an unbiased, lower-variance estimate of the true gradient of the weight-perturbed
    loss: write :math:`u = h/\lVert h\rVert`, so :math:`E u = σ ξ` and
    :math:`E = σ ξ u^\top + E (I - u u^\top)`. The true gradient into h through the noise is
    :math:`E^\top g = σ u (g \cdot ξ) + (I - u u^\top) E^\top g`. The second part has mean
    zero given ξ (:math:`E (I - u u^\top)` is Gaussian, mean zero and independent of
    :math:`E u`, while g depends on E only through ξ), so the reparameterised term
    :math:`σ u (g\cdot ξ) = (\partial s/\partial h)(g \cdot ξ)` is the conditional expectation
    of the true one given ξ: unbiased by the tower property, and of no larger variance
    (Rao-Blackwell). The same holds per copy for the worst-of-k selection, a function of the ξ's.
    The gradient into W (through z) is the same :math:`g h^\top` in both forms.

    The kernel reads each logits row once for all k copies and draws ξ in-kernel (Philox,
    keyed by (seed, offset, row, copy, class)); its extra memory is O(N·k), never N·k·C.
    The backward regenerates the same ξ from the (seed, offset) state.

    Args:
        logits: (N, C) clean logits, float32 / float16 / bfloat16 (or float64); the class dim
            must have stride 1 (otherwise it is copied once).
        target: (N,) integer class indices in [0, C), or ``ignore_index``.
        scale: s ≥ 0, a float or an (N,) (or 0-d) tensor, differentiable; typically
            ``σ * h.norm(dim=1)`` (``fm.weight_perturbation_radius(h, σ, p=2.0)``). Its values
            are checked while ``fm.set_validation`` is on, except inside ``torch.func``
            transforms (``vmap`` cannot read values on the host).
        k: number of noisy copies, 1 ≤ k ≤ 2^20.
        temperature: 0 for the hard max, > 0 for the smooth max.
        label_smoothing: ε in [0, 1], PyTorch's meaning.
        ignore_index: target value that marks a sample to skip.
        reduction: ``'mean'`` | ``'sum'`` | ``'none'`` (per-sample (N,) losses).
        return_index: also return the (N,) int64 index of each sample's worst copy.
        generator: the generator to draw (seed, offset) from; default: the default generator of
            the logits' device. A fresh state is drawn on every call.

    Returns:
        The loss in the logits' dtype (accumulated in float32; float32 for float16 / bfloat16
        logits inside ``torch.autocast``, as ``F.cross_entropy``), and with ``return_index`` the
        worst-copy indices.

    Raises:
        TypeError, ValueError, RuntimeError for malformed arguments (negative scale, k < 1,
        wrong shapes, dtypes or devices); IndexError for a target out of range (checked while
        ``fm.set_validation`` is on).

    Autograd: into ``logits`` and ``scale`` (for the drawn noise). First order runs the fused
    backward op; second and higher order (``create_graph=True``), forward mode
    (``torch.func.jvp``, ``torch.autograd.forward_ad``) and ``torch.func.grad`` are exact,
    computed from the same math in PyTorch ops on the regenerated noise (an (N, k, C)
    temporary). ``torch.func.vmap`` needs ``randomness="same"`` or ``"different"`` (the
    Philox state is drawn inside the call); with ``temperature == 0`` every derivative is the
    selected copy's (ties to the lowest j).
    """
    x = v.check_rows_of_logits(logits)
    N, C = x.shape
    k = _check_k(k)
    temperature = v.check_nonnegative(temperature, "temperature")
    label_smoothing = v.check_label_smoothing(label_smoothing)
    v.check_reduction(reduction)
    target = v.check_class_target(target, N, C, ignore_index, logits)
    s = _scale_tensor(scale, logits)
    philox = draw_philox_state(logits.device, generator)

    per_sample, _lse, _weight, index = routes.weight_noise_ce_fwd(
        x, target, s, philox, k, temperature, label_smoothing, ignore_index
    )
    loss = reduce_cross_entropy(per_sample, target, ignore_index, reduction).to(loss_dtype(logits))
    return (loss, index) if return_index else loss


class WeightNoiseWorstOfKCrossEntropy(LossModule):
    """Module form of :func:`weight_noise_worst_of_k_cross_entropy` (same keyword arguments).

    Two ways to use it, as :class:`fastmargin.WeightRobustCrossEntropy`:

    * wrapping the model's last ``nn.Linear`` (``linear=model.fc, eps=σ``), ``eps`` the
      standard deviation of each weight's noise: ``loss = loss_fn(features, target)`` computes
      the logits ``linear(features)`` and the scale ``s = eps * ||features||_2`` itself;
    * without a layer: ``loss = loss_fn(logits, target, scale)``.

    Under DistributedDataParallel or ``torch.compile``, wrap the whole model with
    :class:`fastmargin.HeadLoss` (the head then runs inside the model's own forward)::

        loss_fn = fm.HeadLoss(ddp_model, fm.WeightNoiseWorstOfKCrossEntropy(model.fc, eps=0.1))
        loss = loss_fn(x, y)
    """

    def __init__(
        self,
        linear: nn.Linear | None = None,
        eps: float = 0.0,
        *,
        k: int = 4,
        temperature: float = 0.0,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        if linear is not None and not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear or None, got {type(linear).__name__}")
        super().__init__(
            k=_check_k(k),
            temperature=temperature,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            reduction=reduction,
        )
        self.eps = v.check_nonnegative(eps, "eps")
        self.linear = linear

    def extra_repr(self) -> str:
        return f"eps={self.eps!r}, " + super().extra_repr()

    def head_loss(
        self,
        features: torch.Tensor,
        logits: torch.Tensor,
        target: torch.Tensor,
        *,
        return_index: bool = False,
        generator: torch.Generator | None = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """The loss of ``logits`` = head(``features``) with scale ``eps * ||features||_2``."""
        return weight_noise_worst_of_k_cross_entropy(
            logits,
            target,
            self.eps * torch.linalg.vector_norm(features.flatten(1), dim=1),
            return_index=return_index,
            generator=generator,
            **self.options(),
        )

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        scale: Union[float, torch.Tensor, None] = None,
        return_index: bool = False,
        generator: torch.Generator | None = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        if self.linear is not None:
            if scale is not None:
                raise ValueError(
                    "scale: not accepted when the module wraps an nn.Linear (the scale is "
                    "eps * ||features||_2); pass features and target only"
                )
            check_head_features(input, self.linear)
            warn_outside_ddp_forward(self)
            logits = self.linear(input)
            return self.head_loss(
                input, logits, target, return_index=return_index, generator=generator
            )
        if scale is None:
            raise ValueError(
                "scale: required when the module wraps no nn.Linear: call it as "
                "(logits, target, scale)"
            )
        return weight_noise_worst_of_k_cross_entropy(
            input,
            target,
            scale,
            return_index=return_index,
            generator=generator,
            **self.options(),
        )
