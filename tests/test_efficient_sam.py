"""Efficient SAM (``SAM(every=k)``, ``SAM(reuse="looksam")``, MIE's ``sam_every`` / ``sam_reuse``)
against iterates written out with numpy on L(θ) = ½ θᵀAθ − bᵀθ, counted closure calls, and resume."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import mie
from conftest import make_arrays
from mie.optim import SAM, GradientModification
from test_sam import _closure, _flat, _grad, _params, _problem


def _counting(closure):
    """closure that also records how many times it ran (``.calls``)."""
    def run():
        run.calls += 1
        return closure()
    run.calls = 0
    return run


def _sam_grad(A, b, th, rho):
    g = _grad(A, b, th)
    return _grad(A, b, th + rho * g / np.linalg.norm(g))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_every_1_without_reuse_is_bit_identical_to_plain_sam(momentum):
    A, b, theta = _problem(5)
    p_ref, p_new = _params(theta), _params(theta)
    ref = SAM(torch.optim.SGD(p_ref, lr=0.05, momentum=momentum), rho=0.3)
    new = SAM(torch.optim.SGD(p_new, lr=0.05, momentum=momentum), rho=0.3, every=1, reuse=None)
    for _ in range(6):
        l_ref, l_new = ref.step(_closure(p_ref, A, b)), new.step(_closure(p_new, A, b))
        assert torch.equal(l_ref, l_new)
        for x, y in zip(p_ref, p_new):
            assert torch.equal(x.detach(), y.detach())


@pytest.mark.parametrize("k", [2, 3])
def test_every_k_runs_sam_on_steps_0_k_2k_and_plain_steps_between(k):
    A, b, theta = _problem(4)
    rho, lr, mu = 0.3, 0.05, 0.9
    params = _params(theta)
    sam = SAM(torch.optim.SGD(params, lr=lr, momentum=mu), rho=rho, every=k)
    closure = _counting(_closure(params, A, b))
    th, v = theta.copy(), np.zeros_like(theta)
    for t in range(2 * k + 2):
        before = closure.calls
        loss = sam.step(closure)
        assert closure.calls - before == (2 if t % k == 0 else 1)
        assert loss.item() == pytest.approx(0.5 * th @ A @ th - b @ th, rel=1e-12)
        grad = _sam_grad(A, b, th, rho) if t % k == 0 else _grad(A, b, th)
        v = mu * v + grad
        th = th - lr * v
        np.testing.assert_allclose(_flat(params), th, rtol=0, atol=1e-11)
    assert sam.steps == 2 * k + 2


def test_looksam_in_between_gradient_matches_numpy():
    """On SAM steps g_v = g_s − (g_s·g/‖g‖²) g is kept; between them the base step sees
    g + α ‖g‖/‖g_v‖ g_v (read by a pre-hook on the base optimizer) and θ moves by −η times it."""
    A, b, theta = _problem(9)
    rho, lr, alpha, k = 0.4, 0.05, 0.7, 3
    params = _params(theta)
    base = torch.optim.SGD(params, lr=lr)
    seen = []
    base.register_step_pre_hook(lambda o, a, kw: seen.append(torch.cat([p.grad.reshape(-1) for p in params]).numpy().copy()))
    sam = SAM(base, rho=rho, every=k, reuse="looksam", alpha=alpha)
    closure = _counting(_closure(params, A, b))
    th = theta.copy()
    for t in range(2 * k + 1):
        g = _grad(A, b, th)
        if t % k == 0:
            g_s = _sam_grad(A, b, th, rho)
            g_v = g_s - (g_s @ g) / (g @ g) * g
            assert abs(g_v @ g) < 1e-9 * np.linalg.norm(g_s) * np.linalg.norm(g)
            expected = g_s
        else:
            expected = g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
            assert np.abs(expected - g).max() > 1e-3          # the reused part is not negligible
        sam.step(closure)
        np.testing.assert_allclose(seen[-1], expected, rtol=0, atol=1e-11)
        th = th - lr * expected
        np.testing.assert_allclose(_flat(params), th, rtol=0, atol=1e-11)
    assert closure.calls == 2 * 3 + 4


def test_looksam_with_every_1_is_plain_sam():
    A, b, theta = _problem(2)
    p_ref, p_new = _params(theta), _params(theta)
    ref = SAM(torch.optim.SGD(p_ref, lr=0.1), rho=0.2)
    new = SAM(torch.optim.SGD(p_new, lr=0.1), rho=0.2, reuse="looksam")
    for _ in range(4):
        ref.step(_closure(p_ref, A, b))
        new.step(_closure(p_new, A, b))
    for x, y in zip(p_ref, p_new):
        assert torch.equal(x.detach(), y.detach())


@pytest.mark.parametrize("reuse", [None, "looksam"])
def test_state_dict_resumes_exactly_mid_cycle(reuse):
    A, b, theta = _problem(6)
    kw = dict(rho=0.3, every=4, reuse=reuse)
    p_ref = _params(theta)
    ref = SAM(torch.optim.Adam(p_ref, lr=0.05), **kw)
    for _ in range(10):
        ref.step(_closure(p_ref, A, b))

    p_a = _params(theta)
    first = SAM(torch.optim.Adam(p_a, lr=0.05), **kw)
    for _ in range(6):                                 # stop at step 6: inside the cycle 4..7
        first.step(_closure(p_a, A, b))
    saved = copy.deepcopy(first.state_dict())
    assert saved["sam_steps"] == 6
    assert ("looksam_gv" in saved) == (reuse == "looksam")

    p_b = [t.detach().clone().requires_grad_() for t in p_a]
    second = SAM(torch.optim.Adam(p_b, lr=0.05), **kw)
    second.load_state_dict(saved)
    closure = _counting(_closure(p_b, A, b))
    for _ in range(4):
        second.step(closure)
    assert closure.calls == 1 + 1 + 2 + 1           # steps 6, 7 plain, 8 SAM, 9 plain
    for x, y in zip(p_ref, p_b):
        assert torch.equal(x.detach(), y.detach())


def test_plain_steps_go_through_gm():
    """Between SAM steps GM (a pre-hook on the base optimizer) still rewrites the stepped gradient:
    the head weight moves by −η (g · T) with g the plain gradient at θ."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    T = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    T = T @ torch.diag(torch.tensor([1.0, 0.5, 0.25, 0.9], dtype=torch.float64)) @ T.T
    lr = 0.1
    base = torch.optim.SGD(model.parameters(), lr=lr)
    gm = GradientModification([model], [T])
    gm.attach(base)
    sam = SAM(base, rho=0.05, model=model, every=2)

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    sam.step(closure)                                  # step 0: SAM
    w, bias = model.weight.detach().clone(), model.bias.detach().clone()
    g_w, g_b = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), [model.weight, model.bias])
    sam.step(closure)                                  # step 1: plain
    assert torch.allclose(model.weight, w - lr * (g_w @ T.float()), atol=1e-6)
    assert torch.allclose(model.bias, bias - lr * g_b, atol=1e-6)
    assert not torch.allclose(model.weight, w - lr * g_w, atol=1e-4)
    assert len(gm.changes) == 2


def test_bad_options_are_refused():
    p = torch.zeros(2, requires_grad=True)
    for kw in ({"every": 0}, {"every": 1.5}, {"every": True}, {"reuse": "esam"}, {"alpha": -1.0}):
        with pytest.raises(ValueError):
            SAM(torch.optim.SGD([p], lr=0.1), **kw)


CONFIG = {"train": {"epochs": 2, "batch_size": 16}, "model": {"dim": 16, "head_hidden": [16, 8]}}


def _fit_counting_backwards(monkeypatch, **params):
    calls = {"n": 0}
    backward = torch.Tensor.backward

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return backward(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "backward", counted)
    x, y = make_arrays(n=96)
    result = mie.fit(mie.MultimodalArrays(x, y), "mie", config=CONFIG, seed=0, progress=False, **params)
    monkeypatch.setattr(torch.Tensor, "backward", backward)
    return result, calls["n"]


def test_mie_sam_every_2_trains_with_fewer_passes(monkeypatch):
    full, n_full = _fit_counting_backwards(monkeypatch)
    half, n_half = _fit_counting_backwards(monkeypatch, sam_every=2)
    look, n_look = _fit_counting_backwards(monkeypatch, sam_every=2, sam_reuse="looksam")
    assert half["method_params"]["sam_every"] == 2
    steps = n_full // 2                                # full SAM: two backward passes per step
    assert n_full == 2 * steps
    # each modality's optimizer counts its own steps: SAM on its steps 0, 2, 4, …
    assert n_half == n_look < n_full
    # two modalities in stages of one epoch: each optimizer takes half of the steps
    assert n_half == steps + 2 * ((steps // 2 + 1) // 2)
    for r in (half, look):
        assert np.isfinite(r["test"]["accuracy"]) and r["test"]["accuracy"] > 0


def test_mie_refuses_bad_sam_every():
    with pytest.raises(mie.MieInputError):
        mie.fit(mie.MultimodalArrays(*make_arrays(n=60)), "mie", config=CONFIG, seed=0, progress=False, sam_every=0)


def test_mie_resumed_mid_cycle_matches_the_uninterrupted_run(tmp_path):
    """sam_every=3 with LookSAM and gm_refresh=2: each optimizer's step count and g_v, and the batch means
    of the T kept since a's first stage, travel in the checkpoint, so a run stopped after loop epoch 2
    (mid-cycle for modality a, after its second stage, which keeps T^(a)) and resumed equals the
    uninterrupted one."""
    class Crash(Exception):
        pass

    def crash(epoch, row):
        if epoch == 2:
            raise Crash
    data = mie.MultimodalArrays(*make_arrays(n=70))
    kw = dict(config=CONFIG, seed=3, progress=False, sam_every=3, sam_reuse="looksam", gm_refresh=2)
    whole = mie.fit(data, "mie", out_dir=tmp_path / "whole", **kw)
    with pytest.raises(Crash):
        mie.fit(data, "mie", out_dir=tmp_path / "cut", callbacks=[crash], **kw)
    resumed = mie.fit(data, "mie", out_dir=tmp_path / "cut", resume=True, **kw)
    assert resumed["val"] == whole["val"] and resumed["test"] == whole["test"]
    assert _history(tmp_path / "cut") == _history(tmp_path / "whole")


def _history(run):
    """history.csv's rows without the wall-time column."""
    rows = [line.split(",") for line in (run / "history.csv").read_text().splitlines()]
    i = rows[0].index("seconds")
    return [r[:i] + r[i + 1:] for r in rows]
