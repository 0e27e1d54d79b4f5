"""Optimisation pieces usable in any training loop: SAM and MIE's flat gradient modification."""
from .flat import InputCovariance, flat_modification_matrix, matrix_stats, modify_linear_gradient
from .precision import full_precision
from .sam import SAM, frozen_batchnorm_stats

__all__ = ["SAM", "frozen_batchnorm_stats", "flat_modification_matrix", "InputCovariance",
           "modify_linear_gradient", "matrix_stats", "full_precision"]
