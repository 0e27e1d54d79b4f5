"""train.amp=bf16: the model's forward passes run in bfloat16 autocast and nothing else does, so every
method still trains and gradient arithmetic (GM, MLA's projection) and GM covariances stay in full
precision without any method opting out."""
import numpy as np
import pytest
import torch
from torch import nn

import mie
from conftest import make_arrays
from mie.methods import METHODS, create_method
from mie.models import ModelSpec
from mie.optim import InputCovariance, autocast_forwards

CONFIG = {"train": {"epochs": 2, "batch_size": 16, "amp": "bf16"}, "model": {"dim": 16, "head_hidden": [16, 8]}}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_under_bf16_autocast(method):
    shapes = {"unimodal": {"a": (8,)}}.get(method, {"a": (8,), "b": (5,)})
    x, y = make_arrays(n=90, shapes=shapes)
    result = mie.fit(mie.MultimodalArrays(x, y), method, config=CONFIG, seed=0, progress=False)
    assert np.isfinite(result["test"]["accuracy"]) and result["test"]["accuracy"] > 0


def _model():
    spec = ModelSpec(["a", "b"], {"a": (8,), "b": (5,)}, {"a": "mlp", "b": "mlp"}, 3, 16, (16, 8))
    torch.manual_seed(0)
    return create_method("mie").build_model(spec)


def test_forwards_run_in_bf16_and_return_float32_while_the_rest_is_full_precision():
    model = autocast_forwards(_model(), torch.device("cpu"))
    inner = []
    first = model.heads["a"].linears[0]
    first.register_forward_hook(lambda mod, inp, out: inner.append(out.dtype))
    with InputCovariance([first]) as cov:
        out = model.forward_modality("a", torch.randn(6, 8))
    assert inner == [torch.bfloat16]                  # inside the forward: autocast
    assert out.dtype == torch.float32                 # what a method receives: float32
    assert cov.covariances[0].dtype == torch.float64
    out.sum().backward()
    grad = first.weight.grad
    product = grad @ torch.eye(grad.shape[1])         # gradient arithmetic outside any forward
    assert grad.dtype == torch.float32 and product.dtype == torch.float32 and torch.equal(product, grad)
    assert not torch.is_autocast_enabled("cpu")


def test_a_methods_step_is_not_autocast_outside_the_model(monkeypatch):
    """What a method does between backward and step sees no autocast: record the autocast state
    GM's hook finds while MIE trains under train.amp=bf16."""
    from mie.optim import flat
    seen = []
    original = flat.rewrite_gradient

    def recording(layer, T):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(layer, T)
    monkeypatch.setattr(flat, "rewrite_gradient", recording)
    x, y = make_arrays(n=60)
    mie.fit(mie.MultimodalArrays(x, y), "mie", config=CONFIG, seed=0, epochs=1, progress=False)
    assert seen and not any(seen)


def test_autocast_wraps_the_parts_a_method_calls():
    model = autocast_forwards(nn.ModuleDict({"a": nn.Linear(3, 2)}), torch.device("cpu"))
    with torch.no_grad():
        assert model["a"](torch.randn(4, 3)).dtype == torch.float32


def test_unknown_amp_is_refused():
    with pytest.raises(mie.MieInputError, match="train.amp 'fp8' is not one of: off, bf16"):
        mie.config.build_config(None, ["train.amp=fp8"])
