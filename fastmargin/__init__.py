"""fastmargin: fused kernels for margin-based and perturbation-robust training in PyTorch.

Drop-in losses for ``F.cross_entropy`` with worst-of-k augmentation (MaxUp), all-layer margin
perturbations (AMO), weight-perturbation robust cross-entropy and margin statistics, computed by
fused CUDA kernels (and the same function on the CPU). See DESIGN.md for the math.
"""

from __future__ import annotations

from . import reference
from ._validation import set_validation, validation_enabled
from .functional import worst_of_k_cross_entropy
from .modules import WorstOfKCrossEntropy
from .weight_noise import WeightNoiseWorstOfKCrossEntropy, weight_noise_worst_of_k_cross_entropy

__version__ = "0.1.0"

__all__ = [
    "WeightNoiseWorstOfKCrossEntropy",
    "WorstOfKCrossEntropy",
    "reference",
    "set_validation",
    "validation_enabled",
    "weight_noise_worst_of_k_cross_entropy",
    "worst_of_k_cross_entropy",
]
