"""fastmargin: fused kernels for margin-based and perturbation-robust training in PyTorch.

Drop-in losses for ``F.cross_entropy`` with worst-of-k augmentation (MaxUp), all-layer margin
perturbations (AMO), weight-perturbation robust cross-entropy and margin statistics, computed by
fused CUDA kernels (and the same function on the CPU). The math: docs/design.md.
"""

from __future__ import annotations

from . import augment, reference
from ._validation import set_validation, validation_enabled
from .amo import AllLayerMargin
from .functional import worst_of_k_cross_entropy
from .heads import HeadLoss
from .linear_ce import LinearWorstOfKCrossEntropy, linear_worst_of_k_cross_entropy
from .margin_op import multiclass_margin
from .margins import margin_auc, margin_distribution, plot_margin_cdf, weight_norm_product
from .maxup import MaxUp
from .modules import WorstOfKCrossEntropy
from .perturb import all_layer_perturb
from .pruning import MarginPruner
from .stability import NoiseStability, noise_stability
from .weight_noise import WeightNoiseWorstOfKCrossEntropy, weight_noise_worst_of_k_cross_entropy
from .weight_robust import (
    WeightRobustCrossEntropy,
    weight_perturbation_radius,
    weight_robust_cross_entropy,
)

__version__ = "0.1.0"

__all__ = [
    "AllLayerMargin",
    "HeadLoss",
    "LinearWorstOfKCrossEntropy",
    "MarginPruner",
    "MaxUp",
    "NoiseStability",
    "WeightNoiseWorstOfKCrossEntropy",
    "WeightRobustCrossEntropy",
    "WorstOfKCrossEntropy",
    "all_layer_perturb",
    "augment",
    "linear_worst_of_k_cross_entropy",
    "margin_auc",
    "margin_distribution",
    "multiclass_margin",
    "noise_stability",
    "plot_margin_cdf",
    "reference",
    "set_validation",
    "validation_enabled",
    "weight_noise_worst_of_k_cross_entropy",
    "weight_norm_product",
    "weight_perturbation_radius",
    "weight_robust_cross_entropy",
    "worst_of_k_cross_entropy",
]
