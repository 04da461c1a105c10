"""Choosing the layers of a model that the training helpers hook (AMO, noise stability)."""

from __future__ import annotations

from typing import Callable, Iterable, List, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

LayerSpec = Union[None, Iterable[Union[nn.Module, str]], Callable[[str, nn.Module], bool]]
NamedModule = Tuple[str, nn.Module]


def unwrap(model: nn.Module) -> nn.Module:
    """The wrapped module of DistributedDataParallel / DataParallel, else the model itself."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def select_layers(
    model: nn.Module, layers: LayerSpec, *, arg: str = "modules"
) -> List[NamedModule]:
    """The (name, module) pairs chosen by ``layers``, in registration order.

    * ``None``: every convolution (``nn.Conv1d/2d/3d`` and transposed) and ``nn.Linear``
      except the last one registered, which is taken to be the final classifier layer;
    * a callable ``(name, module) -> bool``: the submodules it accepts;
    * an iterable of submodules or of their names (as in ``model.named_modules()``).

    Raises ValueError (naming ``arg``) when nothing is selected or a module is not part of
    ``model``, and TypeError for an entry that is neither a module nor a name.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    named = [(n, m) for n, m in model.named_modules() if n != ""]  # not the model itself
    if layers is None:
        chosen = [(n, m) for n, m in named if isinstance(m, (_ConvNd, nn.Linear))][:-1]
        if not chosen:
            raise ValueError(
                f"{arg}: the model has no Conv or Linear layer besides its final classifier; "
                "pass the modules to perturb explicitly"
            )
        return chosen
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
                if item not in by_name:
                    raise ValueError(f"{arg}: the model has no submodule named {item!r}")
                chosen.append((item, by_name[item]))
            elif isinstance(item, nn.Module):
                if id(item) not in by_id:
                    raise ValueError(
                        f"{arg}: {type(item).__name__} module is not a submodule of the model"
                    )
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
