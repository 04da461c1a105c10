"""Batch augmentations for :class:`fastmargin.MaxUp` (random on every call, vectorised).

The protocol MaxUp relies on (plain functions and torchvision-v2 transforms fit it too):

* an augmentation is a callable applied to a whole batch; it draws fresh randomness on every
  call, so k calls give k different copies;
* by default it is called as ``augment(x)`` and returns ``x_aug`` (same batch size);
* an augmentation that mixes labels (CutMix, MixUp) carries ``takes_target = True``; it is
  called as ``augment(x, y)`` with class indices ``y`` and returns ``(x_aug, y_soft)``, where
  ``y_soft`` is (B, C) class probabilities (or, for a transform that leaves the labels alone,
  ``y`` itself). :func:`with_target` marks any such callable, e.g.
  ``with_target(torchvision.transforms.v2.CutMix(num_classes=10))``.

None of the built-ins modifies its input; MaxUp nevertheless hands every call its own copy of
the batch, so a user augmentation that works in place cannot make the k copies identical.

All randomness comes from PyTorch's global generator of the batch's device (and the CPU one for
the Beta draws of CutMix / MixUp), so ``torch.manual_seed`` makes runs reproducible.
"""

from __future__ import annotations

import math
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "Gaussian",
    "RandomCropFlip",
    "CutMix",
    "MixUp",
    "compose",
    "cutmix",
    "gaussian",
    "mixup",
    "random_crop_flip",
    "takes_target",
    "with_target",
]


def takes_target(augment: Callable) -> bool:
    """Whether ``augment`` is called as ``augment(x, y) -> (x_aug, y_aug)`` (see the module doc)."""
    return bool(getattr(augment, "takes_target", False))


class _WithTarget:
    """Wraps a callable of (x, y) so MaxUp passes it the labels (see :func:`with_target`)."""

    takes_target = True

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        return self.fn(x, y)

    def __repr__(self) -> str:
        return f"with_target({self.fn!r})"


def with_target(fn: Callable) -> Callable:
    """Marks ``fn`` as an augmentation of (x, y) returning (x_aug, y_aug), such as torchvision's
    ``v2.CutMix`` / ``v2.MixUp``; MaxUp then passes the labels and uses the returned targets."""
    return _WithTarget(fn)


class _Compose:
    def __init__(self, fns: Tuple[Callable, ...]) -> None:
        if any(takes_target(f) for f in fns):
            raise ValueError(
                "compose: label-mixing augmentations (takes_target) cannot be composed; "
                "compose the input-only ones and apply the mixing one in a with_target wrapper"
            )
        self.fns = fns

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for f in self.fns:
            x = f(x)
        return x

    def __repr__(self) -> str:
        return "compose(" + ", ".join(repr(f) for f in self.fns) + ")"


def compose(*fns: Callable) -> Callable:
    """Applies input-only augmentations left to right: ``compose(f, g)(x) == g(f(x))``."""
    return _Compose(tuple(fns))


def _check_batch(x: object, name: str, min_dim: int = 1) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
    return x


class Gaussian:
    r"""Additive Gaussian noise, :math:`x' = x + \sigma\,s_b\,\xi`, :math:`\xi \sim N(0, I)`.

    With ``relative=True`` the scale is per example, :math:`s_b = \lVert x_b\rVert_2/\sqrt{d}`
    (d = elements per example), so the noise has expected squared norm
    :math:`\sigma^2\lVert x_b\rVert^2`: a signal-to-noise ratio of 1/σ whatever the input
    scale. With ``relative=False``, :math:`s_b = 1` (plain ``x + sigma * randn``).
    """

    def __init__(self, sigma: float, relative: bool = True) -> None:
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool):
            raise TypeError(f"sigma: expected a float, got {type(sigma).__name__}")
        if not (0.0 <= float(sigma) < math.inf):
            raise ValueError(f"sigma: expected a finite value >= 0, got {sigma}")
        self.sigma = float(sigma)
        self.relative = bool(relative)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_batch(x, "x")
        noise = torch.randn_like(x)
        if self.relative and x.dim() > 1 and x[0].numel() > 0:
            d = x[0].numel()
            # Norm in float32 at least: a half-precision sum of squares overflows easily.
            norm = x.reshape(x.shape[0], -1).float().norm(dim=1) / math.sqrt(d)
            scale = (self.sigma * norm).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        elif self.relative:  # 1-D batch of scalars: each example's norm is |x_b|
            scale = self.sigma * x.abs()
        else:
            scale = self.sigma
        return x + noise * scale

    def __repr__(self) -> str:
        return f"gaussian(sigma={self.sigma}, relative={self.relative})"


def gaussian(sigma: float, relative: bool = True) -> Gaussian:
    """Gaussian noise of relative (per-example norm) or absolute size σ; see :class:`Gaussian`."""
    return Gaussian(sigma, relative)


class RandomCropFlip:
    """Random crop after padding, plus a random horizontal flip, for (B, C, H, W) images.

    Each example gets its own offsets (dy, dx) uniform in [0, 2·padding] into the padded image
    (zero padding, or ``padding_mode`` as in ``F.pad``) and, with ``flip=True``, a fair coin for
    mirroring the width axis. The whole batch is one gather (index arithmetic), no Python loop
    over examples; the output has the input's shape.
    """

    def __init__(self, padding: int = 4, flip: bool = True, padding_mode: str = "constant"):
        if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
            raise ValueError(f"padding: expected an int >= 0, got {padding!r}")
        if padding_mode not in ("constant", "reflect", "replicate", "circular"):
            raise ValueError(
                "padding_mode: expected 'constant', 'reflect', 'replicate' or 'circular', "
                f"got {padding_mode!r}"
            )
        self.padding = padding
        self.flip = bool(flip)
        self.padding_mode = padding_mode

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_batch(x, "x")
        if x.dim() != 4:
            raise ValueError(f"x: expected (B, C, H, W) images, got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        p = self.padding
        dev = x.device
        xp = F.pad(x, (p, p, p, p), mode=self.padding_mode) if p > 0 else x
        dy = torch.randint(0, 2 * p + 1, (B, 1), device=dev)
        dx = torch.randint(0, 2 * p + 1, (B, 1), device=dev)
        rows = dy + torch.arange(H, device=dev)  # (B, H) rows of the padded image
        cols = torch.arange(W, device=dev).expand(B, W)
        if self.flip:
            flip = torch.rand(B, 1, device=dev) < 0.5
            cols = torch.where(flip, (W - 1) - cols, cols)
        cols = dx + cols  # (B, W)
        b = torch.arange(B, device=dev).view(B, 1, 1, 1)
        c = torch.arange(C, device=dev).view(1, C, 1, 1)
        return xp[b, c, rows.view(B, 1, H, 1), cols.view(B, 1, 1, W)]

    def __repr__(self) -> str:
        return (
            f"random_crop_flip(padding={self.padding}, flip={self.flip}, "
            f"padding_mode={self.padding_mode!r})"
        )


def random_crop_flip(
    padding: int = 4, flip: bool = True, padding_mode: str = "constant"
) -> RandomCropFlip:
    """Per-example random crop with ``padding`` and horizontal flip; see :class:`RandomCropFlip`."""
    return RandomCropFlip(padding, flip, padding_mode)


class _Mixing:
    """Shared part of CutMix and MixUp: argument checks, partner permutation, soft labels."""

    takes_target = True

    def __init__(self, alpha: float, num_classes: int) -> None:
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise TypeError(f"alpha: expected a float, got {type(alpha).__name__}")
        if not (0.0 < float(alpha) < math.inf):
            raise ValueError(f"alpha: expected a finite value > 0, got {alpha}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
        self.alpha = float(alpha)
        self.num_classes = num_classes
        self._beta = torch.distributions.Beta(
            torch.tensor(self.alpha, dtype=torch.float64),
            torch.tensor(self.alpha, dtype=torch.float64),
        )

    def _draw(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, float]:
        x = _check_batch(x, "x")
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y: expected a torch.Tensor, got {type(y).__name__}")
        if y.dtype.is_floating_point or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"y: expected ({x.shape[0]},) integer class indices, got {y.dtype} of shape "
                f"{tuple(y.shape)}"
            )
        if y.numel() and not torch.compiler.is_compiling():
            # F.one_hot would fail later with a message that names neither argument.
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= self.num_classes:
                raise ValueError(
                    f"num_classes: {self.num_classes} classes, but the labels y hold "
                    f"{high if high >= self.num_classes else low}; expected labels in "
                    f"[0, {self.num_classes}) (is num_classes smaller than the data set's?)"
                )
        perm = torch.randperm(x.shape[0], device=x.device)
        lam = float(self._beta.sample())  # a CPU draw: no device synchronisation
        return perm, lam

    def _soft(self, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam: float):
        one_hot = F.one_hot(y.long(), self.num_classes).to(x.dtype)
        return lam * one_hot + (1.0 - lam) * one_hot[perm]


class CutMix(_Mixing):
    r"""CutMix (Yun et al. 2019): paste a random box of a partner image.

    Per call: a fresh partner permutation π of the batch and a ratio λ ~ Beta(α, α); a box of
    area ≈ (1 − λ)·H·W at a uniform centre (clipped to the image) is copied from x_{π(b)} into
    x_b, and λ is then set to the exact kept area so the soft target
    :math:`\lambda\,\mathrm{onehot}(y_b) + (1-\lambda)\,\mathrm{onehot}(y_{\pi(b)})` matches the
    pixels. Input (B, C, H, W) images and (B,) labels; returns ``(x_aug, y_soft)``.
    """

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        perm, lam = self._draw(x, y)
        if x.dim() != 4:
            raise ValueError(f"x: expected (B, C, H, W) images, got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = torch.randint(0, H, ()).item(), torch.randint(0, W, ()).item()
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2 + ch % 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2 + cw % 2, W)
        out = x.clone()
        out[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)
        return out, self._soft(x, y, perm, lam)

    def __repr__(self) -> str:
        return f"cutmix(alpha={self.alpha}, num_classes={self.num_classes})"


class MixUp(_Mixing):
    r"""MixUp (Zhang et al. 2018): :math:`x' = \lambda x + (1-\lambda) x_{\pi}` with the same
    mix of one-hot labels; a fresh permutation π and λ ~ Beta(α, α) per call. Any (B, ...) input
    and (B,) labels; returns ``(x_aug, y_soft)``."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        perm, lam = self._draw(x, y)
        return lam * x + (1.0 - lam) * x[perm], self._soft(x, y, perm, lam)

    def __repr__(self) -> str:
        return f"mixup(alpha={self.alpha}, num_classes={self.num_classes})"


def cutmix(alpha: float = 1.0, *, num_classes: int) -> CutMix:
    """CutMix with Beta(α, α) box ratios, soft targets over ``num_classes`` (:class:`CutMix`)."""
    return CutMix(alpha, num_classes)


def mixup(alpha: float = 0.2, *, num_classes: int) -> MixUp:
    """MixUp with Beta(α, α) ratios and soft targets over ``num_classes``; see :class:`MixUp`."""
    return MixUp(alpha, num_classes)
