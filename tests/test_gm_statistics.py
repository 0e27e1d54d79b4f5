"""MIE's ``gm_statistics="steps"``: Ȳ of a stage from its training steps' own first passes, against
batch means of the head inputs taken by hand before each step; no pass over the training data."""
import numpy as np
import pytest
import torch
from torch import nn

import mie
from conftest import make_arrays, make_context, make_step
from mie.methods import create_method
from test_gm_diagnostics import _batches, _hand_T, _model


def _hand_means(model, xs, m):
    """[z̄ (d_in,) of each head Linear of m] on the batch ``xs`` at the current weights, numpy float64."""
    with torch.no_grad():
        h, means = model.encoders[m](xs[m]), []
        for layer in model.heads[m].net:
            if isinstance(layer, nn.Linear):
                means.append(h.double().mean(dim=0).numpy())
            h = layer(h)
    return means


@pytest.mark.parametrize("sam", [True, False])
def test_steps_statistics_are_the_stage_steps_first_pass_batch_means(sam):
    tau, batches = 2.0, _batches(4)
    model = _model()
    method = create_method("mie", tau=tau, sam=sam, gm_statistics="steps")
    ctx = make_context("ab", lr=0.1, epochs_per_modality=2)
    ctx.train_batches = _refuse                      # no pass over the training data may be made
    method.setup(model, ctx)
    method.num_epochs(2)
    method.start_epoch(0)
    expected = None
    for i, batch in enumerate(batches):
        outer = [np.outer(z, z) for z in _hand_means(model, batch.inputs, "a")]   # θ_a before this step
        expected = outer if expected is None else [e + o for e, o in zip(expected, outer)]
        method.training_step(batch, make_step(0, i, len(batches)))
    method.end_epoch(0)
    got = [(Z @ Z.T).numpy() for Z in method.means["a"]]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)
    for T, e in zip(method.T["a"], expected):
        np.testing.assert_allclose(T.numpy(), _hand_T(e, tau), rtol=1e-7, atol=1e-9)
    assert all(t is not None for t in method.gm_hooks["b"].matrices)     # b's stage reads T^(a)


def _refuse(shuffle=None):
    raise AssertionError("gm_statistics='steps' passed over the training data")


@pytest.mark.parametrize("alternation", ["stage", "iteration"])
def test_steps_statistics_make_no_pass_over_the_training_data(monkeypatch, alternation):
    calls = {"pass": 0}
    recompute = mie.methods.mie.MIE.recompute

    def counted(self, *args, **kwargs):
        calls["pass"] += 1
        return recompute(self, *args, **kwargs)
    monkeypatch.setattr(mie.methods.mie.MIE, "recompute", counted)
    data = mie.MultimodalArrays(*make_arrays(n=70))
    config = {"train": {"epochs": 3, "batch_size": 16}, "model": {"dim": 16, "head_hidden": [16, 8]}}
    passes = mie.fit(data, "mie", config=config, seed=0, progress=False, alternation=alternation)
    assert calls["pass"] > 0
    calls["pass"] = 0
    steps = mie.fit(data, "mie", config=config, seed=0, progress=False, alternation=alternation,
                    gm_statistics="steps")
    assert calls["pass"] == 0
    assert steps["method_params"]["gm_statistics"] == "steps"
    assert steps["test"]["accuracy"] != passes["test"]["accuracy"] or steps["val"] != passes["val"]
