"""Feature standardisation with statistics from the training split only."""
import numpy as np


def fit_standardizer(x_train):
    """Mean and std of (N, D) arrays per feature, of (N, C, ...) arrays per channel.

    Returns (mean, std) shaped to broadcast against one batch; constant features get std 1.
    """
    axes = (0,) if x_train.ndim == 2 else (0, *range(2, x_train.ndim))
    mean = x_train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x_train.std(axis=axes, keepdims=True, dtype=np.float64)
    std[std < 1e-8] = 1.0
    return mean.astype(np.float32)[0], std.astype(np.float32)[0]


def apply_standardizer(x, stats):
    mean, std = stats
    return ((x - mean) / std).astype(np.float32)
