"""train.amp=bf16: forward passes in bfloat16 autocast, every method still trains, gradient
arithmetic and GM covariances stay in full precision."""
import numpy as np
import pytest
import torch

import mie
from conftest import make_arrays
from mie.methods import METHODS
from mie.optim import InputCovariance, full_precision, modify_gradient

CONFIG = {"train": {"epochs": 2, "batch_size": 16, "amp": "bf16"}, "model": {"dim": 16, "head_hidden": [16, 8]}}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_under_bf16_autocast(method):
    shapes = {"unimodal": {"a": (8,)}}.get(method, {"a": (8,), "b": (5,)})
    x, y = make_arrays(n=90, shapes=shapes)
    result = mie.fit(mie.MultimodalArrays(x, y), method, config=CONFIG, seed=0, progress=False)
    assert np.isfinite(result["test"]["accuracy"]) and result["test"]["accuracy"] > 0


def test_forward_runs_in_bf16_and_gradient_arithmetic_does_not():
    layer = torch.nn.Linear(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with InputCovariance([layer]) as cov:
            out = layer(torch.randn(5, 4))
        out.float().sum().backward()
        before = layer.weight.grad.clone()
        T = torch.diag(torch.tensor([1.0, 0.5, 0.25, 1.0], dtype=torch.float64))
        modify_gradient(layer, T)
        with full_precision():
            product = torch.randn(3, 3) @ torch.randn(3, 3)
    assert out.dtype == torch.bfloat16 and cov.covariances[0].dtype == torch.float64
    assert layer.weight.grad.dtype == torch.float32 and product.dtype == torch.float32
    assert torch.allclose(layer.weight.grad, before @ T.float())


def test_unknown_amp_is_refused():
    with pytest.raises(mie.MieInputError, match="train.amp 'fp8' is not one of: off, bf16"):
        mie.config.build_config(None, ["train.amp=fp8"])
