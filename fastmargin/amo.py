"""All-layer margin optimisation (AMO, Wei & Ma, ICLR 2020, arXiv 1910.04284) on any nn.Module."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Dict, Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import (
    LayerSpec,
    check_tensor_output,
    default_layers,
    find_ddp,
    frozen_bn_stats,
    select_layers,
    unwrap,
)
from ._outputs import OutputAdapter, check_output_adapter
from .perturb import all_layer_perturb

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_example_norm(u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B,) ||u_b||_2 over the non-batch dims, accumulated in ``dtype``, without a copy."""
    if u.dim() == 1:
        return u.abs().to(dtype)
    return torch.linalg.vector_norm(u, dim=tuple(range(1, u.dim())), dtype=dtype)


def _check_rate(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: expected a finite value >= 0, got {value}")
    return float(value)


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

    Compiled models: ``torch.compile(model)`` and models with compiled submodules are
    accepted; the hooks run inside the compiled graphs. The first step's shortcut (gradients
    with respect to the layer outputs) cannot see through a compiled graph, so for layers that
    run in one the first step goes through the op with zero deltas made before the forward, as
    later steps do: the loss and deltas equal eager AMO. The deltas' shapes come from one
    probing forward per input shape (remembered), and a compiled model is compiled once per
    phase (probe, ascent, final forward).

    Layers: ``modules=None`` chooses every Conv and Linear layer the forward runs, in
    execution order, except the last one run (the classifier, wherever it is registered);
    the order is taken from one no-grad forward of the unwrapped model at the first call (or
    :meth:`trace`). ``"official"`` reproduces the official AMO code's choice on ResNets and
    WideResNets: the convolutions inside each residual block (not the stem, the shortcut
    convolutions or the classifier). ``repr(amo)`` and :attr:`layer_names` list the layers;
    names are those of the unwrapped model (no ``module.`` or ``_orig_mod.`` prefix).

    Args:
        model: any module returning logits (possibly wrapped in DDP or compiled).
        modules: the layers to perturb after: ``None`` (see above), ``"official"``, a list of
            submodules or names, or a predicate ``(name, module) -> bool``.
        inner_lr: ascent step size (>= 0).
        inner_steps: ascent steps (>= 0; 0 gives the clean loss).
        inner_wd: weight decay on the deltas (>= 0), as ``torch.optim.SGD(weight_decay=...)``
            in the official code: each step is
            :math:`\delta \leftarrow (1 - \text{lr}\cdot\text{wd})\,\delta + \text{lr}\,
            \partial L/\partial\delta` (no effect on the first step, from zero).
        loss_fn: ``loss_fn(logits, y) -> scalar``; default ``F.cross_entropy``.
        freeze_bn_stats: keep BatchNorm running statistics unchanged during the ascent.
        output: ``f(model_output) -> logits``; default: the output itself, its first element
            (tuple / list), its ``"logits"`` entry (dict) or its ``.logits`` attribute.

    Raises:
        RuntimeError when called with gradients disabled (``torch.no_grad()``,
        ``torch.inference_mode()``) and ``inner_steps > 0``.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: LayerSpec = None,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        inner_wd: float = 0.0,
        loss_fn: LossFn | None = None,
        freeze_bn_stats: bool = True,
        output: OutputAdapter = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.inner_lr = _check_rate(inner_lr, "inner_lr")
        self.inner_wd = _check_rate(inner_wd, "inner_wd")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int):
            raise TypeError(f"inner_steps: expected an int, got {type(inner_steps).__name__}")
        if inner_steps < 0:
            raise ValueError(f"inner_steps: expected a value >= 0, got {inner_steps}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        self.model = model
        self.inner_steps = inner_steps
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else F.cross_entropy
        self.freeze_bn_stats = bool(freeze_bn_stats)
        self._output = check_output_adapter(output)
        self._mode: str | None = None  # None (inactive) | "capture" | "ascent" | "final"
        self._deltas: Dict[Tuple[int, int], torch.Tensor] = {}
        self._captured: Dict[Tuple[int, int], Tuple[torch.Tensor, int | None]] = {}
        self._no_capture: set = set()  # layers whose output is modified in place downstream
        # Under torch.compile the first step runs through the op with zero deltas made in
        # advance; their shapes per input signature, learned from one probing forward.
        self._templates: Dict[tuple, Dict[Tuple[int, int], tuple]] = {}
        self._handles: list | None = []
        self.layers: List[Tuple[str, nn.Module]] | None = None
        self._calls: List[int] = []
        if modules is not None:
            self._install(select_layers(model, modules))

    def _install(self, layers: List[Tuple[str, nn.Module]]) -> None:
        self.layers = layers
        self._calls = [0] * len(layers)
        self._handles = [
            module.register_forward_hook(functools.partial(self._hook, index))
            for index, (_name, module) in enumerate(layers)
        ]

    def trace(self, x: torch.Tensor) -> List[str]:
        """Chooses the default layers (``modules=None``) from one forward of ``x``: every Conv
        and Linear layer in execution order except the last one run. Runs the unwrapped model
        (no compile, no collective) under ``torch.no_grad()`` with BatchNorm statistics
        frozen; called by the first ``amo(x, y)`` if not before. Returns :attr:`layer_names`."""
        self._check_open()
        if self.layers is None:
            base = unwrap(self.model)

            def run() -> None:
                with torch.no_grad(), frozen_bn_stats(base):
                    base(x)

            self._install(default_layers(self.model, run, arg="modules"))
        return self.layer_names

    @property
    def layer_names(self) -> List[str]:
        """Names (as in the unwrapped model's ``named_modules()``) of the perturbed layers."""
        if self.layers is None:
            raise RuntimeError(
                "AllLayerMargin: the default layers are chosen by execution order at the first "
                "call; call amo.trace(x) (or amo(x, y)) first"
            )
        return [name for name, _ in self.layers]

    def __repr__(self) -> str:
        layers = (
            "chosen by execution order at the first call"
            if self.layers is None
            else "[" + ", ".join(self.layer_names) + "]"
        )
        return (
            f"AllLayerMargin(inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, "
            f"inner_wd={self.inner_wd}, freeze_bn_stats={self.freeze_bn_stats}, "
            f"layers={layers})"
        )

    def _hook(self, index: int, module: nn.Module, inputs, output):
        if self._mode is None:
            return None
        assert self.layers is not None
        u = check_tensor_output(output, self.layers[index][0])
        # A layer called several times in one forward gets one delta per call.
        key = (index, self._calls[index])
        self._calls[index] += 1
        compiling = torch.compiler.is_compiling()
        if self._mode == "capture":
            if compiling:
                # Inside a compiled graph u is a graph output beside the logits, not on their
                # autograd path: dL/du would be None. Only its shape is kept; the step is
                # redone through the op (see _first_ascent_step).
                self._captured[key] = (u, None)
                return None
            if u.requires_grad and index not in self._no_capture:
                # First ascent step, delta = 0: u' = u, so the layer's output is left alone
                # and the delta gradient is recovered from dL/du (see _first_ascent_step).
                self._captured[key] = (u, u._version)
                return None
        delta = self._deltas.get(key)
        if delta is None:
            if self._mode == "final":  # no ascent ran (inner_steps == 0): delta is zero
                return None
            if compiling:
                raise RuntimeError(
                    f"layer {self.layers[index][0]!r}: call {key[1]} ran inside a compiled "
                    "graph without a delta prepared for it (the layers a forward calls must "
                    "not depend on the data); compile the model's submodules instead"
                )
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
            ddp = find_ddp(self.model)
            if ddp is not None:
                stack.enter_context(ddp.no_sync())
            stack.enter_context(frozen_bn_stats(self.model, self.freeze_bn_stats))
            yield

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._calls = [0] * len(self._calls)
        return self.loss_fn(self._output(self.model(x)), y)

    def _check_open(self) -> None:
        if self._handles is None:
            raise RuntimeError("AllLayerMargin: the hooks were removed; create a new instance")

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Runs the ascent and returns the loss of the perturbed network (see the class doc)."""
        self._check_open()
        if self.inner_steps > 0 and not torch.is_grad_enabled():
            raise RuntimeError(
                "AllLayerMargin: called with gradients disabled (torch.no_grad() or "
                "torch.inference_mode()); the ascent on the deltas needs autograd. Call it in "
                "the training step; to evaluate, call the model itself"
            )
        if self.layers is None:
            self.trace(x)
        self._deltas = {}
        try:
            if self.inner_steps > 0:
                with self._ascent_context():
                    self._first_ascent_step(x, y)
                    self._mode = "ascent"
                    for _ in range(self.inner_steps - 1):
                        loss = self._forward(x, y)
                        self._ascent_update(loss)
                for d in self._deltas.values():
                    d.requires_grad_(False)
            self._mode = "final"
            return self._forward(x, y)
        finally:
            self._mode = None
            self._deltas = {}
            self._captured = {}

    def _ascent_update(self, loss: torch.Tensor) -> None:
        """One SGD step on -loss for the deltas, with weight decay ``inner_wd`` on them."""
        deltas = list(self._deltas.values())
        grads = torch.autograd.grad(loss, deltas, allow_unused=True)
        with torch.no_grad():
            for d, g in zip(deltas, grads):
                if self.inner_wd:
                    d.mul_(1.0 - self.inner_lr * self.inner_wd)
                if g is not None:
                    d.add_(g, alpha=self.inner_lr)

    @staticmethod
    def _signature(x: object) -> tuple:
        if isinstance(x, torch.Tensor):
            return (tuple(x.shape), x.dtype, x.device)
        return (type(x).__name__,)

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

        Layers that run inside a ``torch.compile`` graph cannot be read that way (their
        outputs are not on the loss's autograd path in the compiled graph), so for them the
        step runs through the op with zero deltas made before the forward, as every later
        step does; the deltas' shapes come from one probing forward per input signature.
        """
        signature = self._signature(x)
        templates = self._templates.get(signature)
        if templates is None:
            while True:
                self._mode = "capture"
                self._deltas, self._captured = {}, {}
                loss = self._forward(x, y)
                if any(version is None for _u, version in self._captured.values()):
                    templates = self._remember_shapes(signature)
                    break
                changed = {
                    k[0] for k, (u, version) in self._captured.items() if u._version != version
                }
                if not changed:
                    self._step_from_captured(loss)
                    return
                self._no_capture |= changed  # remembered: later calls use the op at once
        self._deltas = {
            key: torch.zeros_like(meta, device=device).requires_grad_()
            for key, (meta, device) in templates.items()
        }
        self._captured = {}
        self._mode = "ascent"
        self._ascent_update(self._forward(x, y))

    def _remember_shapes(self, signature: tuple) -> Dict[Tuple[int, int], tuple]:
        """(meta tensor with the delta's shape, dtype and layout, device) per delta: no memory
        is held between calls."""
        templates = {}
        for key, (u, _v) in self._captured.items():
            dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
            # u's layout (e.g. channels_last), like the op's delta
            templates[key] = (torch.zeros_like(u, dtype=dtype, device="meta"), u.device)
        for key, d in self._deltas.items():
            templates[key] = (torch.zeros_like(d, device="meta"), d.device)
        self._templates[signature] = templates
        return templates

    def _step_from_captured(self, loss: torch.Tensor) -> None:
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
        self._templates = {}

    close = remove

    def __enter__(self) -> AllLayerMargin:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
