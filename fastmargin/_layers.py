"""Choosing the layers of a model that the training helpers hook (AMO, noise stability), and
seeing through the wrappers a model may come in (torch.compile, DDP, DataParallel, FSDP)."""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterable, Iterator, List, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

LayerSpec = Union[None, str, Iterable[Union[nn.Module, str]], Callable[[str, nn.Module], bool]]
NamedModule = Tuple[str, nn.Module]

# The preset that reproduces the official AMO code's choice on ResNets and WideResNets.
OFFICIAL = "official"

# Name components that wrappers insert between a model and its submodules.
_WRAPPER_NAMES = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def _is_compiled(model: nn.Module) -> bool:
    # torch.compile(module) returns an OptimizedModule holding the module as ``_orig_mod``.
    return type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod")


def _is_fsdp(model: nn.Module) -> bool:
    return type(model).__name__ == "FullyShardedDataParallel" and hasattr(model, "module")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's own module inside any torch.compile / DDP / DataParallel / FSDP wrappers."""
    while True:
        if _is_compiled(model):
            model = model._orig_mod
        elif isinstance(model, _PARALLEL) or _is_fsdp(model):
            model = model.module
        else:
            return model


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model without its DDP / DataParallel wrapper, for forwards that must not run a
    collective (no-grad passes that one rank may make alone). A compiled model stays compiled
    unless the compiled module is itself the DDP wrapper (then its plain inner module)."""
    if isinstance(model, _PARALLEL):
        return model.module
    if _is_compiled(model) and isinstance(model._orig_mod, _PARALLEL):
        return model._orig_mod.module
    return model


def find_ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel wrapper in ``model``'s wrapper chain, if any."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model
        if _is_compiled(model):
            model = model._orig_mod
        elif isinstance(model, nn.DataParallel) or _is_fsdp(model):
            model = model.module
        else:
            return None


def clean_name(name: str) -> str:
    """A submodule's name without the components that wrappers insert (``_orig_mod`` of a
    compiled submodule, FSDP's and activation checkpointing's wrapped-module names)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


def named_layers(model: nn.Module) -> List[NamedModule]:
    """``named_modules()`` of the unwrapped model, names as the user wrote the model (wrapper
    components removed), the model itself and wrapper modules left out."""
    out = []
    for name, module in unwrap(model).named_modules():
        if name == "" or _is_compiled(module) or _is_fsdp(module):
            continue
        out.append((clean_name(name), module))
    return out


def is_weight_layer(module: nn.Module) -> bool:
    return isinstance(module, (_ConvNd, nn.Linear))


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """BatchNorm layers that are training and track running statistics keep normalising with
    batch statistics but leave their buffers unchanged (restored afterwards, even on error)."""
    frozen = []
    try:
        if enabled:
            for m in unwrap(model).modules():
                if isinstance(m, _BatchNorm) and m.training and m.track_running_stats:
                    # Training BN with track_running_stats False normalises with batch
                    # statistics and passes no running buffers: nothing is updated.
                    m.track_running_stats = False
                    frozen.append(m)
        yield
    finally:
        for m in frozen:
            m.track_running_stats = True


def execution_order(candidates: List[NamedModule], run: Callable[[], object]) -> List[NamedModule]:
    """The candidates that ``run()`` calls, in the order of their first call."""
    order: List[int] = []

    def hook(index: int) -> Callable:
        def record(module, inputs, output):
            if index not in order:
                order.append(index)

        return record

    handles = [m.register_forward_hook(hook(i)) for i, (_n, m) in enumerate(candidates)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return [candidates[i] for i in order]


def default_layers(model: nn.Module, run: Callable[[], object], *, arg: str) -> List[NamedModule]:
    """Every Conv and Linear layer that one forward (``run()``) calls, in execution order,
    except the last one called (the final classifier)."""
    executed = execution_order([(n, m) for n, m in named_layers(model) if is_weight_layer(m)], run)
    if len(executed) < 2:
        raise ValueError(
            f"{arg}: the model's forward runs no Conv or Linear layer besides its final "
            "classifier; pass the modules to perturb explicitly"
        )
    return executed[:-1]


def official_layers(model: nn.Module, *, arg: str) -> List[NamedModule]:
    """The official AMO code's choice on ResNets and WideResNets: the convolutions inside each
    residual block (``conv1``, ``conv2``, and ``conv3`` of a bottleneck), not the stem, the
    shortcut / downsample convolutions or the classifier. A residual block is any module with
    ``conv1`` and ``conv2`` children that are convolutions (torchvision's BasicBlock and
    Bottleneck, the WideResNet code's BasicBlock)."""
    chosen = []
    for name, module in named_layers(model):
        children = dict(module.named_children())
        if not all(isinstance(children.get(c), _ConvNd) for c in ("conv1", "conv2")):
            continue
        convs = [
            (int(m.group(1)), c)
            for c in children
            if (m := re.fullmatch(r"conv(\d+)", c)) and isinstance(children[c], _ConvNd)
        ]
        for _, c in sorted(convs):
            chosen.append((f"{name}.{c}", children[c]))
    if not chosen:
        raise ValueError(
            f"{arg}: {OFFICIAL!r} needs residual blocks (modules with conv1 and conv2 "
            "convolution children, as in torchvision's ResNet and the WideResNet code); "
            f"{type(unwrap(model)).__name__} has none"
        )
    return chosen


def select_layers(
    model: nn.Module, layers: LayerSpec, *, arg: str = "modules"
) -> List[NamedModule]:
    """The (name, module) pairs chosen by an explicit ``layers`` spec (not ``None``).

    * ``"official"``: :func:`official_layers`;
    * a callable ``(name, module) -> bool``: the submodules it accepts, in registration order;
    * an iterable of submodules or of their names (as in ``model.named_modules()`` of the
      unwrapped model), in the given order.

    Names are those of the unwrapped model (no ``module.`` or ``_orig_mod.`` prefix). Raises
    ValueError (naming ``arg``) when nothing is selected or a module is not part of ``model``,
    and TypeError for an entry that is neither a module nor a name.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if layers is None:
        raise ValueError(f"{arg}: None is resolved by a traced forward (default_layers)")
    if isinstance(layers, str) and layers == OFFICIAL:
        return official_layers(model, arg=arg)
    named = named_layers(model)
    if callable(layers) and not isinstance(layers, nn.Module):
        chosen = [(n, m) for n, m in named if layers(n, m)]
    else:
        if isinstance(layers, (nn.Module, str)):
            layers = [layers]
        by_id = {id(m): n for n, m in named}
        by_name = dict(named)
        chosen = []
        for item in layers:
            if isinstance(item, str):
                key = clean_name(item)
                if key not in by_name:
                    raise ValueError(f"{arg}: the model has no submodule named {item!r}")
                chosen.append((key, by_name[key]))
            elif isinstance(item, nn.Module):
                if id(unwrap(item)) not in by_id:
                    raise ValueError(
                        f"{arg}: {type(item).__name__} module is not a submodule of the model"
                    )
                item = unwrap(item)
                chosen.append((by_id[id(item)], item))
            else:
                raise TypeError(
                    f"{arg}: expected modules or module names, got {type(item).__name__}"
                )
    if not chosen:
        raise ValueError(f"{arg}: no layers were selected")
    return chosen


def check_tensor_output(output: object, name: str) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"layer {name!r} returned {type(output).__name__}, not a tensor; choose layers "
            "whose output is a single tensor"
        )
    if not output.dtype.is_floating_point or output.dim() == 0:
        raise TypeError(
            f"layer {name!r} returned a {output.dim()}-D {output.dtype} tensor; expected a "
            "floating (B, ...) batch of activations"
        )
    return output
