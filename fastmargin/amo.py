"""All-layer margin optimisation (AMO, Wei & Ma, ICLR 2020, arXiv 1910.04284) on any nn.Module."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Dict, Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._layers import LayerSpec, check_tensor_output, select_layers, unwrap
from .perturb import all_layer_perturb

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_example_norm(u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B,) ||u_b||_2 over the non-batch dims, accumulated in ``dtype``, without a copy."""
    if u.dim() == 1:
        return u.abs().to(dtype)
    return torch.linalg.vector_norm(u, dim=tuple(range(1, u.dim())), dtype=dtype)


class AllLayerMargin:
    r"""AMO training loss: the loss of the network perturbed after every chosen layer.

    After each chosen layer i the output u_i is replaced (by a forward hook) with
    :math:`u_i + \lVert u_{i,b}\rVert_2\,\delta_{i,b}` (:func:`fastmargin.all_layer_perturb`,
    the norm per example b and not detached). Calling ``amo(x, y)``:

    1. starts every :math:`\delta_i` at zero (float32, float64 for float64 activations; one
       per example, the shape of the layer's output);
    2. takes ``inner_steps`` steps of gradient *ascent* on the loss
       :math:`L = \text{loss\_fn}(\text{model}(x), y)` with respect to the deltas only,
       :math:`\delta_i \leftarrow \delta_i + \text{inner\_lr}\,\partial L/\partial\delta_i`
       (SGD with learning rate ``inner_lr`` on :math:`-L`), each gradient from
       ``torch.autograd.grad(L, deltas)``, so no parameter gradient is computed or
       accumulated and ``param.grad`` is left untouched. The first step starts at
       :math:`\delta = 0`, where the perturbed network is the clean one and
       :math:`\partial L/\partial\delta_{i,b} = \lVert u_{i,b}\rVert\,
       \partial L/\partial u_{i,b}`; it is computed that way (a clean forward and
       ``autograd.grad`` with respect to the layer outputs), which gives the same deltas
       without running the perturbation op (layers whose output is modified in place later
       in the forward, or needs no gradient, go through the op instead);
    3. runs the perturbed forward with the deltas fixed (detached) and returns its loss, ready
       for ``.backward()`` (gradients flow into the parameters through the activations and
       through the norms :math:`\lVert u_{i,b}\rVert`).

    The ascent uses the same loss as the one returned (with the default
    ``F.cross_entropy``, the batch *mean*, so each example's ascent gradient carries a 1/B).

    Batch normalisation: in training mode every forward of the ascent would update the running
    statistics (``inner_steps`` extra momentum updates per call, on perturbed activations).
    With ``freeze_bn_stats=True`` (the default) the BatchNorm layers that are training and
    track running statistics use batch statistics during the ascent, as in any training
    forward, but leave ``running_mean``, ``running_var`` and ``num_batches_tracked``
    unchanged; only the final perturbed forward updates them, once per call, as a plain
    training step does. Dropout and other random layers draw fresh randomness in each forward.

    Distributed: a ``DistributedDataParallel`` model is accepted as is. Its ascent forwards
    run under ``model.no_sync()`` and the ascent's ``autograd.grad`` reaches no parameter,
    so no gradient is all-reduced until the returned loss's ``.backward()``, which syncs once
    as in plain DDP training. Each process perturbs its own examples.

    Autocast, devices: nothing is hard-coded; under ``torch.autocast`` the perturbation keeps
    the activation's dtype (bfloat16 activations, float32 deltas).

    The hooks stay installed until :meth:`remove` (or the end of a ``with`` block); outside a
    call they do nothing, so the model can be evaluated normally meanwhile. After
    :meth:`remove` the model is exactly as before (no hooks, no state).

    Args:
        model: any module returning logits (possibly wrapped in DDP).
        modules: the layers to perturb after: ``None`` for every Conv and Linear layer except
            the last one registered (the final classifier), a list of submodules or names, or
            a predicate ``(name, module) -> bool``.
        inner_lr: ascent step size (>= 0).
        inner_steps: ascent steps (>= 0; 0 gives the clean loss).
        loss_fn: ``loss_fn(logits, y) -> scalar``; default ``F.cross_entropy``.
        freeze_bn_stats: keep BatchNorm running statistics unchanged during the ascent.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: LayerSpec = None,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        loss_fn: LossFn | None = None,
        freeze_bn_stats: bool = True,
    ) -> None:
        if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)):
            raise TypeError(f"inner_lr: expected a float, got {type(inner_lr).__name__}")
        if not (math.isfinite(inner_lr) and inner_lr >= 0):
            raise ValueError(f"inner_lr: expected a finite value >= 0, got {inner_lr}")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int):
            raise TypeError(f"inner_steps: expected an int, got {type(inner_steps).__name__}")
        if inner_steps < 0:
            raise ValueError(f"inner_steps: expected a value >= 0, got {inner_steps}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else F.cross_entropy
        self.freeze_bn_stats = bool(freeze_bn_stats)
        self.layers: List[Tuple[str, nn.Module]] = select_layers(unwrap(model), modules)
        self._mode: str | None = None  # None (inactive) | "capture" | "ascent" | "final"
        self._deltas: Dict[Tuple[int, int], torch.Tensor] = {}
        self._captured: Dict[Tuple[int, int], Tuple[torch.Tensor, int]] = {}
        self._no_capture: set = set()  # layers whose output is modified in place downstream
        self._calls: List[int] = [0] * len(self.layers)
        self._handles = [
            module.register_forward_hook(functools.partial(self._hook, index))
            for index, (_name, module) in enumerate(self.layers)
        ]

    @property
    def layer_names(self) -> List[str]:
        """Names (as in ``named_modules()``) of the perturbed layers, in registration order."""
        return [name for name, _ in self.layers]

    def _hook(self, index: int, module: nn.Module, inputs, output):
        if self._mode is None:
            return None
        u = check_tensor_output(output, self.layers[index][0])
        # A layer called several times in one forward gets one delta per call.
        key = (index, self._calls[index])
        self._calls[index] += 1
        if self._mode == "capture" and u.requires_grad and index not in self._no_capture:
            # First ascent step, delta = 0: u' = u, so the layer's output is left alone and
            # the delta gradient is recovered from dL/du (see _first_ascent_step).
            self._captured[key] = (u, u._version)
            return None
        delta = self._deltas.get(key)
        if delta is None:
            if self._mode == "final":  # no ascent ran (inner_steps == 0): delta is zero
                return None
            dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
            # zeros_like keeps u's memory layout (e.g. channels_last), so the op reads both
            # in place without copying delta.
            delta = torch.zeros_like(u, dtype=dtype).requires_grad_()
            self._deltas[key] = delta
        elif delta.shape != u.shape:
            raise RuntimeError(
                f"layer {self.layers[index][0]!r}: output shape changed from "
                f"{tuple(delta.shape)} to {tuple(u.shape)} between forwards of one AMO call"
            )
        return all_layer_perturb(u, delta)

    @contextlib.contextmanager
    def _ascent_context(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if isinstance(self.model, nn.parallel.DistributedDataParallel):
                stack.enter_context(self.model.no_sync())
            frozen = []
            if self.freeze_bn_stats:
                for m in unwrap(self.model).modules():
                    if isinstance(m, _BatchNorm) and m.training and m.track_running_stats:
                        # Training BN with track_running_stats False normalises with batch
                        # statistics and passes no running buffers: nothing is updated.
                        m.track_running_stats = False
                        frozen.append(m)
            try:
                yield
            finally:
                for m in frozen:
                    m.track_running_stats = True

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._calls = [0] * len(self.layers)
        return self.loss_fn(self.model(x), y)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Runs the ascent and returns the loss of the perturbed network (see the class doc)."""
        if self._handles is None:
            raise RuntimeError("AllLayerMargin: the hooks were removed; create a new instance")
        self._deltas = {}
        try:
            if self.inner_steps > 0:
                with self._ascent_context():
                    self._first_ascent_step(x, y)
                    self._mode = "ascent"
                    for _ in range(self.inner_steps - 1):
                        loss = self._forward(x, y)
                        deltas = list(self._deltas.values())
                        grads = torch.autograd.grad(loss, deltas, allow_unused=True)
                        with torch.no_grad():
                            for d, g in zip(deltas, grads):
                                if g is not None:
                                    d.add_(g, alpha=self.inner_lr)
                for d in self._deltas.values():
                    d.requires_grad_(False)
            self._mode = "final"
            return self._forward(x, y)
        finally:
            self._mode = None
            self._deltas = {}
            self._captured = {}

    def _first_ascent_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The first ascent step, from delta = 0, without running the perturbation op.

        At delta = 0 the perturbed output u' = u + ||u|| * 0 equals u and dL/du' = dL/du, so
        dL/d(delta) = ||u_b|| * dL/du_b: the forward is the clean one (the hooks only keep a
        reference to each output u) and ``autograd.grad`` is taken with respect to the
        outputs u themselves, still reaching no parameter. This saves the op's passes over
        u, delta and the gradient in the (default) one-step AMO. A layer whose output does
        not require grad, or is modified in place later in the forward (then dL/du would be
        taken after the in-place op: detected with the tensor's version counter, and the
        step is redone), gets a zero delta through the op instead.
        """
        while True:
            self._mode = "capture"
            self._deltas, self._captured = {}, {}
            loss = self._forward(x, y)
            changed = {k[0] for k, (u, version) in self._captured.items() if u._version != version}
            if not changed:
                break
            self._no_capture |= changed  # remembered: later calls use the op at once
        captured = list(self._captured.items())
        deltas = list(self._deltas.items())
        inputs = [u for _, (u, _v) in captured] + [d for _, d in deltas]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        with torch.no_grad():
            for (key, (u, _v)), g in zip(captured, grads):
                dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
                delta = torch.zeros_like(u, dtype=dtype)  # u's layout, like the op's delta
                if g is not None:
                    norm = _per_example_norm(u, dtype)
                    scale = (self.inner_lr * norm).view((-1,) + (1,) * (u.dim() - 1))
                    torch.mul(g, scale, out=delta)
                self._deltas[key] = delta.requires_grad_()
            for (_key, d), g in zip(deltas, grads[len(captured) :]):
                if g is not None:
                    d.add_(g, alpha=self.inner_lr)
        self._captured = {}

    def remove(self) -> None:
        """Removes the hooks: the model is left exactly as it was before."""
        if self._handles is not None:
            for h in self._handles:
                h.remove()
            self._handles = None

    close = remove

    def __enter__(self) -> AllLayerMargin:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
