"""fastmargin: fused kernels for margin-based and perturbation-robust training in PyTorch.

Drop-in losses for ``F.cross_entropy`` with worst-of-k augmentation (MaxUp), all-layer margin
perturbations (AMO), weight-perturbation robust cross-entropy and margin statistics, computed by
fused CUDA kernels (and the same function on the CPU). See DESIGN.md for the math.
"""

from __future__ import annotations

from . import reference
from ._validation import set_validation, validation_enabled
from .amo import AllLayerMargin
from .functional import worst_of_k_cross_entropy
from .modules import WorstOfKCrossEntropy
from .perturb import all_layer_perturb
from .stability import NoiseStability, noise_stability

__version__ = "0.1.0"

__all__ = [
    "AllLayerMargin",
    "NoiseStability",
    "WorstOfKCrossEntropy",
    "all_layer_perturb",
    "noise_stability",
    "reference",
    "set_validation",
    "validation_enabled",
    "worst_of_k_cross_entropy",
]
