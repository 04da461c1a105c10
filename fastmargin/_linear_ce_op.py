"""The fused linear + worst-of-k cross-entropy ops: the logits of a head ``hidden @ weight.T +
bias`` are never held for the whole batch, only for a chunk of samples at a time.

Both ops are Python ``torch.library.custom_op``s composed of ATen matmuls and the fused CE
kernels (``fastmargin::worst_of_k_ce_fwd`` and ``worst_of_k_ce_bwd_inplace``), so they run on
every device those run on, and ``torch.compile`` sees each as one opaque node.

``hidden`` arrives 3-D with the copies along axis 0 (``copies_first``: (k, B, H)) or axis 1
((B, k, H)). A chunk holds every copy of ``n`` consecutive samples, so the worst-of-k selection
is local to it. Per chunk:

1. ``logits = F.linear(hidden_chunk, weight, bias)`` (one GEMM; n * k * V elements);
2. the CE forward kernel on the chunk's (n, k, V) view (no copy for either layout);
3. the CE backward kernel writes d loss / d logits over the same buffer;
4. ``grad_hidden_chunk = grad_logits @ weight``, ``grad_weight += grad_logits.T @ hidden_chunk``
   and ``grad_bias += grad_logits.sum(0)`` (accumulated in float32 for half inputs).

For ``'mean'`` and ``'sum'`` the gradient (for an upstream gradient of 1) is computed in the
forward, and the backward only scales it by the upstream gradient (no host synchronisation,
no second pass). ``'mean'`` divides by the normaliser of the whole batch (the number of samples
not ignored, or the sum of their class weights), computed before the first chunk. For
``'none'`` the gradient depends on each sample's upstream gradient, so the forward saves the
per-row statistics (lse and copy weights, (B, k)) and the backward op recomputes each chunk's
logits (one more GEMM per chunk).

Weight-robust option (k = 1 only): with ``radius_eps > 0`` the CE is taken on the robust rows
z~ = z + r (1 - 2 e_y), r = radius_eps * ||h||_q, through the kernel's radius path; the
gradient into ``hidden`` then includes the term through r.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ._ops import ops, stats_dtype

_REDUCTION_CODES = ("none", "mean", "sum")


def default_chunk_size(batch: int, copies: int, hidden_size: int, vocab: int) -> int:
    """Samples per chunk when the caller gives none: chunk logits of about the size of the
    hidden states (rows * H elements, so memory stays O(N * H)), but at least 2^24 elements
    (64 MiB in float32) so the GEMMs run near peak, and at least one sample."""
    rows = batch * copies
    elements = max(rows * hidden_size, 1 << 24)
    return max(1, min(batch, elements // max(1, copies * vocab)))


def _sample_axis(copies_first: bool) -> int:
    return 1 if copies_first else 0


def _rows_2d(t: torch.Tensor) -> torch.Tensor:
    """A (rows, last) 2-D view (or, for a strided chunk of a copy-major tensor, a copy)."""
    return t.reshape(-1, t.shape[-1])


def _mean_normaliser(
    target: torch.Tensor, class_weight: Optional[torch.Tensor], ignore_index: int, f: torch.dtype
) -> torch.Tensor:
    """F.cross_entropy's 'mean' denominator over the whole batch, as a 0-d tensor of dtype f
    (no sync): the number of samples not ignored, or the sum of their classes' weights
    (``fastmargin::index_target_normaliser``, the divisor the other losses use)."""
    return ops.index_target_normaliser(target, ignore_index, class_weight).to(f)


def _norm_grad(h: torch.Tensor, norm: torch.Tensor, q: float) -> torch.Tensor:
    """d ||h||_q / d h per row (h (n, H) in the statistics dtype, norm (n, 1)), with
    torch.linalg.vector_norm's conventions: 0 at h = 0, ties of the max share the gradient."""
    if q == 1.0:
        return h.sign()
    if q == math.inf:
        a = h.abs()
        at_max = (a == norm).to(h.dtype)
        return h.sign() * at_max / at_max.sum(dim=1, keepdim=True).clamp_min(1)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    if q == 2.0:
        g = h / safe
    else:
        g = h.sign() * (h.abs() / safe).pow(q - 1)
    return torch.where(norm > 0, g, torch.zeros_like(g))


class _Sweep:
    """One pass over the chunks: the forward statistics and/or the gradients."""

    def __init__(
        self,
        hidden,
        weight,
        bias,
        target,
        class_weight,
        copies_first,
        chunk_size,
        label_smoothing,
        ignore_index,
        radius_eps,
        radius_q,
    ):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.target, self.class_weight = target, class_weight
        self.copies_first = copies_first
        self.axis = _sample_axis(copies_first)
        self.B = hidden.shape[self.axis]
        self.k = hidden.shape[1 - self.axis]
        self.V = weight.shape[0]
        self.chunk = max(1, int(chunk_size))
        self.eps = label_smoothing
        self.ignore_index = ignore_index
        self.radius_eps, self.radius_q = radius_eps, radius_q
        self.f = stats_dtype(hidden)

    def chunks(self):
        for start in range(0, self.B, self.chunk):
            yield start, min(self.chunk, self.B - start)

    def logits(self, start: int, n: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden chunk in the given layout, its logits (contiguous), their (n, k, V) view)."""
        hc = self.hidden.narrow(self.axis, start, n)
        z = F.linear(hc, self.weight, self.bias)
        x = z.transpose(0, 1) if self.copies_first else z
        return hc, z, x

    def radius(self, hc: torch.Tensor) -> Optional[torch.Tensor]:
        """r = eps * ||h||_q per sample (k = 1: hc is (n, 1, H)), in the statistics dtype."""
        if self.radius_eps <= 0.0:
            return None
        h = hc.reshape(hc.shape[0] * hc.shape[1], -1)
        r = self.radius_eps * torch.linalg.vector_norm(h, ord=self.radius_q, dim=1)
        return r.to(self.f)

    def allocate_outputs(self):
        """(loss, index, lse, copy weights, dloss/dradius) of the whole batch, to fill."""
        B, k, f, dev = self.B, self.k, self.f, self.hidden.device
        loss = torch.empty((B,), dtype=f, device=dev)
        index = torch.empty((B,), dtype=torch.long, device=dev)
        lse = torch.empty((B, k), dtype=f, device=dev)
        wsel = torch.empty((B, k), dtype=f, device=dev)
        dradius = torch.empty((B if self.radius_eps > 0 else 0,), dtype=f, device=dev)
        return loss, index, lse, wsel, dradius

    def run(
        self,
        temperature: float,
        outputs,
        grad_loss: Optional[torch.Tensor],
        saved,
        need: Tuple[bool, bool, bool],
    ):
        """Walks the chunks. ``outputs`` (from :meth:`allocate_outputs`) are filled when
        ``saved`` is None (the CE forward runs per chunk); otherwise ``saved`` holds
        (lse, wsel, dradius) from an earlier forward. With ``grad_loss`` ((B,) per-sample
        upstream gradients) the gradients are accumulated and returned as (grad_hidden,
        grad_weight, grad_bias), each an empty (0,) tensor where ``need`` does not ask."""
        need_h, need_w, need_b = need
        want_grad = grad_loss is not None and any(need)
        hidden, weight, bias = self.hidden, self.weight, self.bias
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        # Gradients not computed are distinct empty tensors (op outputs must not alias).
        grad_hidden = grad_hidden if want_grad and need_h else hidden.new_empty((0,))
        grad_weight = (
            torch.zeros(weight.shape, dtype=acc, device=weight.device)
            if want_grad and need_w
            else hidden.new_empty((0,))
        )
        grad_bias = (
            torch.zeros((self.V,), dtype=acc, device=weight.device)
            if want_grad and need_b and bias is not None
            else hidden.new_empty((0,))
        )
        for start, n in self.chunks():
            hc, z, x = self.logits(start, n)
            r = self.radius(hc)
            tgt = self.target.narrow(0, start, n)
            if saved is None:
                loss, index, lse_all, w_all, dr_all = outputs
                per, lse, w, idx, dr = ops.worst_of_k_ce_fwd(
                    x, tgt, r, temperature, self.eps, self.ignore_index, self.class_weight
                )
                loss.narrow(0, start, n).copy_(per)
                index.narrow(0, start, n).copy_(idx)
                lse_all.narrow(0, start, n).copy_(lse)
                w_all.narrow(0, start, n).copy_(w)
                if r is not None:
                    dr_all.narrow(0, start, n).copy_(dr)
            else:
                lse_all, w_all, dr_all = saved
                lse, w = lse_all.narrow(0, start, n), w_all.narrow(0, start, n)
                dr = dr_all.narrow(0, start, n) if r is not None else None
            if not want_grad:
                continue
            g = grad_loss.narrow(0, start, n).contiguous()
            ops.worst_of_k_ce_bwd_inplace(
                g,
                x,
                tgt,
                r,
                lse.contiguous(),
                w.contiguous(),
                self.eps,
                self.ignore_index,
                self.class_weight,
            )
            # z now holds d loss / d logits of the chunk (its own layout, contiguous).
            if need_h:
                gh = grad_hidden.narrow(self.axis, start, n)
                gh.copy_(torch.matmul(z, weight))
                if r is not None:
                    gh.add_(self._radius_grad(hc, g * dr).view(gh.shape).to(gh.dtype))
            z2 = _rows_2d(z)
            if need_w:
                h2 = _rows_2d(hc)
                if grad_weight.dtype == z2.dtype:  # accumulate in place, no temporary
                    grad_weight.addmm_(z2.t(), h2)
                else:  # half inputs: the chunk's product in its dtype, summed in float32
                    grad_weight.add_(z2.t().mm(h2))
            if need_b and bias is not None:
                # a column sum as a GEMV (much faster than sum(dim=0) on the CPU)
                ones = z2.new_ones((z2.shape[0],))
                if grad_bias.dtype == z2.dtype:
                    grad_bias.addmv_(z2.t(), ones)
                else:
                    grad_bias.add_(z2.t().mv(ones))
        if want_grad:
            if need_w:
                grad_weight = grad_weight.to(weight.dtype)
            if need_b and bias is not None:
                grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias

    def _radius_grad(self, hc: torch.Tensor, g_radius: torch.Tensor) -> torch.Tensor:
        """d/dh of sum_b g_radius[b] * r_b, r_b = eps * ||h_b||_q (k = 1)."""
        h = hc.reshape(hc.shape[0] * hc.shape[1], -1).to(self.f)
        norm = torch.linalg.vector_norm(h, ord=self.radius_q, dim=1, keepdim=True)
        return (self.radius_eps * g_radius)[:, None] * _norm_grad(h, norm, self.radius_q)


@torch.library.custom_op("fastmargin::linear_worst_of_k_ce", mutates_args=())
def linear_worst_of_k_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    class_weight: Optional[torch.Tensor],
    copies_first: bool,
    temperature: float,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    chunk_size: int,
    radius_eps: float,
    radius_q: float,
    need_grad: List[bool],
) -> Tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """Returns (loss, index, lse, copy weights, dloss/dradius, grad_hidden, grad_weight,
    grad_bias). loss: 0-d for 'mean' / 'sum' (statistics dtype), (B,) for 'none'. The three
    gradients (for an upstream gradient of 1) are computed for 'mean' / 'sum' where
    ``need_grad`` = [hidden, weight, bias] asks for them, else they are empty (0,) tensors."""
    s = _Sweep(
        hidden,
        weight,
        bias,
        target,
        class_weight,
        copies_first,
        chunk_size,
        label_smoothing,
        ignore_index,
        radius_eps,
        radius_q,
    )
    outputs = s.allocate_outputs()
    per_sample = outputs[0]
    # 'mean' divides by one normaliser over the whole batch (not per chunk): computed once, for
    # the loss and for the gradient written chunk by chunk.
    norm = None
    if reduction == "mean":
        norm = _mean_normaliser(target, class_weight, ignore_index, s.f)
    grad_loss = None
    if reduction != "none" and any(need_grad):
        if norm is None:
            grad_loss = torch.ones((s.B,), dtype=s.f, device=hidden.device)
        else:
            grad_loss = (1.0 / norm).expand(s.B).contiguous()
    gh, gw, gb = s.run(temperature, outputs, grad_loss, None, tuple(need_grad))
    _, index, lse, wsel, dradius = outputs
    if reduction == "none":
        loss = per_sample
    elif norm is None:
        loss = per_sample.sum()
    else:
        loss = per_sample.sum() / norm
    return loss, index, lse, wsel, dradius, gh, gw, gb


@torch.library.custom_op("fastmargin::linear_worst_of_k_ce_backward", mutates_args=())
def linear_worst_of_k_ce_backward(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    class_weight: Optional[torch.Tensor],
    lse: torch.Tensor,
    wsel: torch.Tensor,
    dradius: torch.Tensor,
    copies_first: bool,
    label_smoothing: float,
    ignore_index: int,
    chunk_size: int,
    radius_eps: float,
    radius_q: float,
    need_grad: List[bool],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_b grad_loss[b] * loss[b] ('none'), recomputing each chunk's logits
    from the saved per-row statistics. Returns (grad_hidden, grad_weight, grad_bias), empty
    (0,) tensors where ``need_grad`` does not ask for them."""
    s = _Sweep(
        hidden,
        weight,
        bias,
        target,
        class_weight,
        copies_first,
        chunk_size,
        label_smoothing,
        ignore_index,
        radius_eps,
        radius_q,
    )
    g = grad_loss.to(s.f).contiguous()
    return s.run(0.0, None, g, (lse, wsel, dradius), tuple(need_grad))


def _grad_shapes(hidden, weight, bias, need_grad, computed: bool):
    need_h, need_w, need_b = need_grad
    gh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    gh = gh if computed and need_h else hidden.new_empty((0,))
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format)
    gw = gw if computed and need_w else hidden.new_empty((0,))
    has_b = computed and need_b and bias is not None
    gb = bias.new_empty(bias.shape) if has_b else hidden.new_empty((0,))
    return gh, gw, gb


@linear_worst_of_k_ce.register_fake
def _linear_ce_fake(
    hidden,
    weight,
    bias,
    target,
    class_weight,
    copies_first,
    temperature,
    label_smoothing,
    ignore_index,
    reduction,
    chunk_size,
    radius_eps,
    radius_q,
    need_grad,
):
    axis = _sample_axis(copies_first)
    B, k = hidden.shape[axis], hidden.shape[1 - axis]
    f = stats_dtype(hidden)
    loss = hidden.new_empty((B,) if reduction == "none" else (), dtype=f)
    computed = reduction != "none" and any(need_grad)
    return (
        loss,
        hidden.new_empty((B,), dtype=torch.long),
        hidden.new_empty((B, k), dtype=f),
        hidden.new_empty((B, k), dtype=f),
        hidden.new_empty((B if radius_eps > 0 else 0,), dtype=f),
        *_grad_shapes(hidden, weight, bias, need_grad, computed),
    )


@linear_worst_of_k_ce_backward.register_fake
def _linear_ce_backward_fake(
    grad_loss,
    hidden,
    weight,
    bias,
    target,
    class_weight,
    lse,
    wsel,
    dradius,
    copies_first,
    label_smoothing,
    ignore_index,
    chunk_size,
    radius_eps,
    radius_q,
    need_grad,
):
    return _grad_shapes(hidden, weight, bias, need_grad, True)


_OPTION_NAMES = (
    "copies_first",
    "temperature",
    "label_smoothing",
    "ignore_index",
    "reduction",
    "chunk_size",
    "radius_eps",
    "radius_q",
    "need_grad",
)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, class_weight = inputs[:5]
    for name, value in zip(_OPTION_NAMES, inputs[5:]):
        setattr(ctx, name, value)
    _loss, index, lse, wsel, dradius, gh, gw, gb = output
    ctx.mark_non_differentiable(index, lse, wsel, dradius, gh, gw, gb)
    if ctx.reduction == "none":  # the backward recomputes the logits chunk by chunk
        ctx.save_for_backward(hidden, weight, bias, target, class_weight, lse, wsel, dradius)
    else:  # the gradient is already there: the backward scales it
        ctx.save_for_backward(gh, gw, gb)


_DOUBLE_BACKWARD = (
    "linear_worst_of_k_cross_entropy: second derivatives (create_graph=True) are not "
    "supported: the gradient is computed in the forward, chunk by chunk, and is not itself "
    "differentiable. Use the unfused worst_of_k_cross_entropy(F.linear(...)) for "
    "higher-order gradients."
)


def _backward(ctx, grad_loss, *_unused):
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD)
    need = tuple(bool(n) for n in ctx.needs_input_grad[:3])
    if grad_loss is None or not any(need):
        return (None,) * 14
    if ctx.reduction == "none":
        hidden, weight, bias, target, class_weight, lse, wsel, dradius = ctx.saved_tensors
        grads = linear_worst_of_k_ce_backward(
            grad_loss,
            hidden,
            weight,
            bias,
            target,
            class_weight,
            lse,
            wsel,
            dradius,
            ctx.copies_first,
            ctx.label_smoothing,
            ctx.ignore_index,
            ctx.chunk_size,
            ctx.radius_eps,
            ctx.radius_q,
            list(need),
        )
        computed = need
    else:
        grads = tuple(t * grad_loss.to(t.dtype) for t in ctx.saved_tensors)
        computed = tuple(bool(n) for n in ctx.need_grad)
    for name, wanted, done in zip(("hidden", "weight", "bias"), need, computed):
        if wanted and not done:
            raise RuntimeError(
                f"linear_worst_of_k_ce: a gradient for {name} is needed but need_grad did not "
                "ask the forward to compute it"
            )
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 11


torch.library.register_autograd(
    "fastmargin::linear_worst_of_k_ce", _backward, setup_context=_setup_context
)
