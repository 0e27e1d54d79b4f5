"""Optimisation pieces usable in any training loop: SAM and MIE's flat gradient modification."""
from .flat import (GM_LAYERS, GradientModification, InputCovariance, LowRankModification,
                   flat_modification_from_means, flat_modification_matrix, input_dim, matrix_stats, modify_gradient)
from .precision import autocast_forwards
from .sam import SAM, frozen_batchnorm_stats

__all__ = ["SAM", "frozen_batchnorm_stats", "flat_modification_matrix", "flat_modification_from_means",
           "InputCovariance", "LowRankModification", "modify_gradient", "GradientModification", "input_dim",
           "GM_LAYERS", "matrix_stats", "autocast_forwards"]
