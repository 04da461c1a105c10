"""MaxUp (Gong et al. 2020): train on the worst of k augmented copies of every sample."""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, List, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _validation as v
from ._layers import unwrap_parallel
from ._outputs import OutputAdapter, check_output_adapter
from .augment import takes_target
from .functional import worst_of_k_cross_entropy

_MODES = ("joint", "select")


@contextlib.contextmanager
def _selection_norm_mode(model: nn.Module, eval_running_stats: bool) -> Iterator[None]:
    """Normalisation layers for the no-grad selection pass of ``mode="select"``.

    ``eval_running_stats=False``: layers in training mode keep normalising with the batch
    statistics (of all copies, as the joint forward would) but do not update their running
    statistics, so one training step still moves them once. ``True``: they normalise with their
    running statistics (evaluation mode). Everything is restored afterwards, even on error.
    """
    changed: List[Tuple[nn.Module, str, bool]] = []
    try:
        for m in model.modules() if isinstance(model, nn.Module) else ():
            if not isinstance(m, nn.modules.batchnorm._NormBase) or not m.training:
                continue
            if not m.track_running_stats or m.running_mean is None:
                continue  # always batch statistics, nothing to update
            if eval_running_stats:
                changed.append((m, "training", True))
                m.training = False
            else:
                changed.append((m, "track_running_stats", True))
                m.track_running_stats = False
        yield
    finally:
        for m, attr, old in changed:
            setattr(m, attr, old)


class MaxUp(nn.Module):
    r"""A MaxUp training step: the loss of each sample's worst augmented copy.

    For a batch (x, y), draws k augmented copies :math:`x^{(j)} = \mathrm{aug}(x)` (plus the
    clean x as one more candidate with ``include_clean=True``), and returns

    .. math:: L = \frac1B \sum_b \max_j \ell\big(f(x^{(j)}_b), y^{(j)}_b\big)

    (or the smooth max :math:`\tau\log\frac1K\sum_j e^{\ell_{bj}/\tau}` for ``temperature``
    τ > 0), with ℓ the cross-entropy with label smoothing; the gradient flows through each
    sample's worst copy only (τ = 0). Call it with (x, y) and ``.backward()`` the result::

        step = fm.MaxUp(model, fm.augment.random_crop_flip(padding=4), k=4)
        loss = step(x, y); loss.backward(); opt.step()

    Modes:

    * ``"joint"`` (the paper): one forward of the K·B copies as a single batch, laid out
      copy-major (row j·B + b is copy j of sample b), so the (K·B, C) logits are viewed
      (K, B, C) without a copy and reduced by ``worst_of_k_cross_entropy(..., dim=0)``.
      BatchNorm normalises with statistics over all K·B copies and updates its running
      statistics once. Activation memory grows with K.
    * ``"select"`` (memory-efficient): forward the copies under ``torch.no_grad()``, pick
      each sample's worst copy with the fused kernel (``return_index=True``), then forward only
      those B copies with gradients. The parameter gradient equals training on the selected
      copies directly. BatchNorm: the selection pass normalises with batch statistics over the
      K·B copies (the same selection as joint mode) without touching the running statistics,
      or, with ``eval_bn_for_selection=True``, with the running statistics (evaluation mode);
      the training pass normalises over the B selected copies and updates the running
      statistics once. Dropout draws independent masks in the two passes. Needs τ = 0.

    Augmentations (see :mod:`fastmargin.augment`): ``augment(x) -> x_aug``, random per call;
    one marked ``takes_target`` (CutMix, MixUp, :func:`fastmargin.augment.with_target`) is
    called ``augment(x, y)`` and may return per-copy soft targets ``(x_aug, y_soft)`` with
    y_soft (B, C) probabilities. Every call gets its own copy of x, so an augmentation that
    writes into its input can neither make the copies identical nor change the caller's x.

    Args:
        model: maps a (N, ...) batch to (N, C) logits.
        augment: the random augmentation (see above).
        k: number of augmented copies (K = k, or k + 1 with ``include_clean``).
        mode: ``"joint"`` or ``"select"``.
        temperature: τ ≥ 0 (τ > 0 only in joint mode).
        label_smoothing: ε in [0, 1], PyTorch's meaning.
        include_clean: also consider the un-augmented x (candidate index 0; the augmented
            copies are then 1..k).
        eval_bn_for_selection: select mode only; use running statistics in the selection pass.
        ignore_index: a target value whose sample is skipped, as in ``F.cross_entropy``.
        output: ``f(model_output) -> logits``; default: the output itself, its first element
            (a ``(logits, aux)`` tuple or list), its ``"logits"`` entry (dict) or its
            ``.logits`` attribute.

    Distributed and compiled models: a ``DistributedDataParallel`` model (or a
    ``torch.compile``'d one) is passed as is. The training forward goes through it, so the
    backward syncs gradients as in plain DDP training; the no-grad selection pass of
    ``"select"`` runs the module DDP wraps, so it starts no collective.
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        augment: Callable,
        k: int = 4,
        *,
        mode: str = "joint",
        temperature: float = 0.0,
        label_smoothing: float = 0.0,
        include_clean: bool = False,
        eval_bn_for_selection: bool = False,
        ignore_index: int = -100,
        output: OutputAdapter = None,
    ) -> None:
        super().__init__()
        if not callable(model):
            raise TypeError(f"model: expected a callable (nn.Module), got {type(model).__name__}")
        if not callable(augment):
            raise TypeError(f"augment: expected a callable, got {type(augment).__name__}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k: expected an int >= 1, got {k!r}")
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
        self.temperature = v.check_nonnegative(temperature, "temperature")
        if mode == "select" and self.temperature > 0:
            raise ValueError(
                "temperature: mode='select' trains on one copy per sample, so it needs "
                "temperature=0 (the smooth max weights every copy: use mode='joint')"
            )
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
        self.model = model
        self.augment = augment
        self.k = k
        self.mode = mode
        self.label_smoothing = v.check_label_smoothing(label_smoothing)
        self.include_clean = bool(include_clean)
        self.eval_bn_for_selection = bool(eval_bn_for_selection)
        self.ignore_index = ignore_index
        self._output = check_output_adapter(output)
        self._checked_randomness = False

    @property
    def num_candidates(self) -> int:
        """K: the augmented copies plus the clean sample when ``include_clean``."""
        return self.k + int(self.include_clean)

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, mode={self.mode!r}, temperature={self.temperature}, "
            f"label_smoothing={self.label_smoothing}, include_clean={self.include_clean}, "
            f"eval_bn_for_selection={self.eval_bn_for_selection}"
        )

    # -- copies -------------------------------------------------------------------------------

    def make_copies(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> Tuple[torch.Tensor, List[torch.Tensor | None]]:
        """The (K·B, ...) copy-major batch of candidates and each copy's returned target.

        Each copy is written into one preallocated (K, B, ...) buffer as soon as it is made, so
        an augmentation that reuses an output buffer cannot alias two copies either. A target
        entry is None where the copy keeps y, else what the augmentation returned.
        """
        B = x.shape[0]
        K = self.num_candidates
        buf: torch.Tensor | None = None
        targets: List[torch.Tensor | None] = []
        if self.include_clean:
            buf = torch.empty((K, *x.shape), dtype=x.dtype, device=x.device)
            buf[0].copy_(x)
            targets.append(None)
        mixes = takes_target(self.augment)
        for _ in range(self.k):
            # A private copy per call: in-place augmentations must not touch x or other copies.
            out = self.augment(x.clone(), y) if mixes else self.augment(x.clone())
            xa, ta = self._unpack(out, y, B)
            if buf is None:
                buf = torch.empty((K, *xa.shape), dtype=xa.dtype, device=xa.device)
            j = len(targets)
            if xa.shape != buf.shape[1:] or xa.dtype != buf.dtype:
                raise ValueError(
                    f"augment: copy {j} is {xa.dtype} of shape {tuple(xa.shape)}, expected "
                    f"{buf.dtype} of shape {tuple(buf.shape[1:])} like the "
                    f"{'input' if self.include_clean else 'first copy'}"
                )
            buf[j].copy_(xa)
            targets.append(ta)
        assert buf is not None
        self._check_randomness(buf)
        return buf.view(K * B, *buf.shape[2:]), targets

    def _check_randomness(self, buf: torch.Tensor) -> None:
        """Warns once if the first two augmented copies are identical: a deterministic
        augmentation makes MaxUp k times the work of plain training for nothing. Checked on
        the first call only (one host synchronisation), never while compiling."""
        if self._checked_randomness or self.k < 2 or torch.compiler.is_compiling():
            return
        self._checked_randomness = True
        j = int(self.include_clean)
        if torch.equal(buf[j], buf[j + 1]):
            warnings.warn(
                "augment: the first two augmented copies are identical; MaxUp needs an "
                "augmentation that draws new randomness on every call",
                RuntimeWarning,
                stacklevel=6,  # the caller of MaxUp(...) (through nn.Module.__call__)
            )

    @staticmethod
    def _unpack(out: object, y: torch.Tensor, B: int) -> Tuple[torch.Tensor, torch.Tensor | None]:
        ta: torch.Tensor | None = None
        if isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise TypeError(
                    f"augment: expected x_aug or (x_aug, y_aug), got a sequence of {len(out)}"
                )
            out, ta = out
            if not isinstance(ta, torch.Tensor):
                raise TypeError(f"augment: returned targets of type {type(ta).__name__}")
            if ta is y:
                ta = None
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"augment: expected to return a tensor, got {type(out).__name__}")
        if out.dim() == 0 or out.shape[0] != B:
            raise ValueError(
                f"augment: returned shape {tuple(out.shape)}, expected a batch of {B} first"
            )
        if ta is not None and ta.shape[0] != B:
            raise ValueError(
                f"augment: returned targets of shape {tuple(ta.shape)}, expected {B} rows"
            )
        return out, ta

    def _soft_targets(
        self, targets: List[torch.Tensor | None], y: torch.Tensor, C: int, like: torch.Tensor
    ) -> torch.Tensor | None:
        """(K, B, C) float32 probability targets, or None when every copy keeps the labels y."""
        if all(t is None for t in targets):
            return None
        rows = []
        for j, t in enumerate(targets):
            t = y if t is None else t
            if t.dtype.is_floating_point:
                if t.shape != (y.shape[0], C):
                    raise ValueError(
                        f"augment: soft targets of copy {j} have shape {tuple(t.shape)}, "
                        f"expected ({y.shape[0]}, {C}) to match the logits"
                    )
                rows.append(t.to(device=like.device, dtype=torch.float32))
            else:
                if t.dim() != 1:
                    raise ValueError(f"augment: labels of copy {j} have shape {tuple(t.shape)}")
                if (t == self.ignore_index).any():
                    raise ValueError("y: ignore_index cannot be combined with soft targets")
                rows.append(F.one_hot(t.long(), C).to(like.device, torch.float32))
        return torch.stack(rows)

    # -- the step -----------------------------------------------------------------------------

    def _logits(self, xs: torch.Tensor, K: int, B: int, model=None) -> torch.Tensor:
        logits = self._output((self.model if model is None else model)(xs))
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != K * B:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise RuntimeError(
                f"model: expected ({K * B}, C) logits for {K * B} inputs, got {shape}"
            )
        return logits.view(K, B, logits.shape[1])  # copy-major: row j*B + b is (j, b)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, *, return_index: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """The MaxUp loss of the batch (a scalar), and with ``return_index`` the (B,) index of
        each sample's worst candidate (0..K-1; 0 is the clean sample with ``include_clean``)."""
        v.check_tensor(x, "x")
        v.check_tensor(y, "y")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"x: expected a non-empty batch, got shape {tuple(x.shape)}")
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y: expected shape ({x.shape[0]},), got {tuple(y.shape)}")
        if y.dtype.is_floating_point:
            raise TypeError(
                f"y: expected integer class indices, got {y.dtype} (per-copy soft targets "
                "come from a label-mixing augmentation)"
            )
        B, K = x.shape[0], self.num_candidates
        xs, targets = self.make_copies(x, y)
        if self.mode == "joint":
            loss, index = self._joint(xs, y, targets, K, B)
        else:
            loss, index = self._select(xs, y, targets, K, B)
        return (loss, index) if return_index else loss

    def _worst_of_k(self, logits, target, **kw):
        """The fused loss on copy-major (K, B, C) logits; ``target`` is the (B,) class index or
        the per-copy (K, B, C) probabilities of a mixing augmentation."""
        return worst_of_k_cross_entropy(
            logits,
            target,
            dim=0,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
            **kw,
        )

    def _joint(self, xs, y, targets, K, B):
        logits = self._logits(xs, K, B)
        soft = self._soft_targets(targets, y, logits.shape[2], logits)
        target = y if soft is None else soft
        return self._worst_of_k(logits, target, temperature=self.temperature, return_index=True)

    def _select(self, xs, y, targets, K, B):
        # The module DDP wraps: a no-grad pass needs no buffer broadcast or reducer state.
        local = unwrap_parallel(self.model) if isinstance(self.model, nn.Module) else self.model
        with torch.no_grad(), _selection_norm_mode(local, self.eval_bn_for_selection):
            logits = self._logits(xs, K, B, local)
            soft = self._soft_targets(targets, y, logits.shape[2], logits)
            _, index = self._worst_of_k(
                logits, y if soft is None else soft, reduction="none", return_index=True
            )
            del logits
        rows = torch.arange(B, device=index.device)
        x_sel = xs.view(K, B, *xs.shape[1:])[index, rows]
        logits = self._logits(x_sel, 1, B)  # (1, B, C): k = 1 is F.cross_entropy
        target = y if soft is None else soft[index, rows].unsqueeze(0)
        return self._worst_of_k(logits, target), index
