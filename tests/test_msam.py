"""M-SAM (mie.methods.msam). No authors' code exists, so no parity test. Checked: the Shapley values
of coalition accuracies against hand-computed ones (M = 2 and M = 3) and against the average
marginal contribution over all orderings; the weights ν (negative values clipped, uniform when
none is positive); the coalition logits against full forwards with the absent modalities removed
(both ``mask`` rules, late fusion and a shared head, in eval mode); that the weights change training:
one step equals the closed form θ − η[ν_d ∇ℓ(θ + ε) + (1 − ν_d) ∇ℓ(θ)] with ε = ρ∇ℓ/‖∇ℓ‖ for the
batch's own ν_d and for forced ones, and differs from plain SAM and plain SGD (which it becomes at
ν_d = 1 and ρ = 0); BatchNorm statistics; M = 3 and a shared head through the loop; refusals; the CLI."""
import copy
import csv
import json
from itertools import combinations, permutations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie
from conftest import TINY, make_arrays, make_context, make_step
from mie.cli import main
from mie.errors import MieInputError
from mie.methods import Batch
from mie.methods.msam import MSAM, coalition_accuracy, coalition_logits, shapley_values, shapley_weights
from mie.models import ClassifierHead, LateFusionModel, SharedHeadModel


def _model(mods=("a", "b"), shared=None, bn=False, dropout=False, seed=0):
    torch.manual_seed(seed)

    def enc(i):
        layers = [nn.Linear(3 + i, 4)] + ([nn.BatchNorm1d(4)] if bn else []) + [nn.Tanh()]
        return nn.Sequential(*layers, *([nn.Dropout(0.5)] if dropout else []))
    encoders = {m: enc(i) for i, m in enumerate(mods)}
    if shared:
        width = 4 * len(mods) if shared == "concat" else 4
        return SharedHeadModel(encoders, ClassifierHead(width, 3, hidden=(5,)), shared)
    return LateFusionModel(encoders, {m: ClassifierHead(4, 3, hidden=()) for m in mods})


def _data(mods=("a", "b"), n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = {m: torch.randn(n, 3 + i, generator=g) for i, m in enumerate(mods)}
    return xs, torch.arange(n) % 3


def _value(table):
    """{"ab": 0.8, …} → {frozenset("ab"): 0.8, …, frozenset(): 0}."""
    return {frozenset(k): v for k, v in table.items()} | {frozenset(): 0.0}


# ---- Shapley values and weights ---------------------------------------------------------------
def test_shapley_values_by_hand_two_modalities():
    # φ_a = ½[v(a) − v(∅)] + ½[v(ab) − v(b)] = ½·0.6 + ½·0.6,  φ_b = ½·0.2 + ½·(0.8 − 0.6)
    phi = shapley_values(_value({"a": 0.6, "b": 0.2, "ab": 0.8}), ["a", "b"])
    assert phi == pytest.approx({"a": 0.6, "b": 0.2})
    assert shapley_weights(phi) == pytest.approx({"a": 0.75, "b": 0.25})


def test_shapley_values_by_hand_three_modalities():
    # weights 1/3 (|S| = 0), 1/6, 1/6 (|S| = 1), 1/3 (|S| = 2):
    # φ_a = ⅓·0.5 + ⅙·(0.6 − 0.2) + ⅙·(0.55 − 0.1) + ⅓·(0.7 − 0.3)  = 53/120
    # φ_b = ⅓·0.2 + ⅙·(0.6 − 0.5) + ⅙·(0.3 − 0.1)  + ⅓·(0.7 − 0.55) = 20/120
    # φ_c = ⅓·0.1 + ⅙·(0.55 − 0.5) + ⅙·(0.3 − 0.2) + ⅓·(0.7 − 0.6)  = 11/120   (Σ = v(abc) = 0.7)
    v = _value({"a": 0.5, "b": 0.2, "c": 0.1, "ab": 0.6, "ac": 0.55, "bc": 0.3, "abc": 0.7})
    phi = shapley_values(v, ["a", "b", "c"])
    assert phi == pytest.approx({"a": 53 / 120, "b": 20 / 120, "c": 11 / 120})
    assert shapley_weights(phi) == pytest.approx({"a": 53 / 84, "b": 20 / 84, "c": 11 / 84})


@pytest.mark.parametrize("mods", ["abc", "abcd"])
def test_shapley_values_are_the_mean_marginal_contribution_over_orderings(mods):
    g = torch.Generator().manual_seed(len(mods))
    v = {frozenset(S): float(torch.rand(1, generator=g)) for k in range(1, len(mods) + 1)
         for S in combinations(mods, k)} | {frozenset(): 0.0}
    orders = list(permutations(mods))
    expected = {i: sum(v[frozenset(o[:o.index(i) + 1])] - v[frozenset(o[:o.index(i)])] for o in orders) / len(orders)
                for i in mods}
    assert shapley_values(v, list(mods)) == pytest.approx(expected)


def test_weights_clip_negative_values_and_fall_back_to_uniform():
    phi = shapley_values(_value({"a": 0.5, "b": 0.0, "ab": 0.4}), ["a", "b"])   # φ_b = ½·0 + ½·(0.4 − 0.5)
    assert phi == pytest.approx({"a": 0.45, "b": -0.05})
    assert shapley_weights(phi) == pytest.approx({"a": 1.0, "b": 0.0})
    assert shapley_weights({"a": 0.0, "b": -0.1, "c": 0.0}) == pytest.approx({m: 1 / 3 for m in "abc"})


@pytest.mark.parametrize("mask", ["input", "output"])
def test_weights_of_a_constructed_batch_with_three_modalities(mask):
    # Identity branches: a modality's input is its logits (a zero input gives zero logits, so both masks
    # agree). Label 0 for both samples; by hand, v(a) = v(b) = ½, v(c) = 0, v(ab) = 1, v(ac) = ½,
    # v(bc) = 0, v(abc) = ½, so φ = (½, ¼, −¼) and ν = (⅔, ⅓, 0).
    model = LateFusionModel({m: nn.Identity() for m in "abc"}, {m: nn.Identity() for m in "abc"})
    xs = {"a": torch.tensor([[3.0, 0.0], [0.0, 1.0]]), "b": torch.tensor([[0.0, 1.0], [2.0, 0.0]]),
          "c": torch.tensor([[0.0, 1.0], [0.0, 3.0]])}
    value = coalition_accuracy(coalition_logits(model, xs, mask), torch.tensor([0, 0]))
    assert value == pytest.approx(_value({"a": 0.5, "b": 0.5, "c": 0.0, "ab": 1.0, "ac": 0.5, "bc": 0.0,
                                          "abc": 0.5}))
    phi = shapley_values(value, ["a", "b", "c"])
    assert phi == pytest.approx({"a": 0.5, "b": 0.25, "c": -0.25})
    assert shapley_weights(phi) == pytest.approx({"a": 2 / 3, "b": 1 / 3, "c": 0.0})


# ---- coalitions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [None, "concat", "sum"])
@pytest.mark.parametrize("mask", ["input", "output"])
def test_coalition_logits_are_full_forwards_with_the_absent_modalities_removed(shared, mask):
    mods = ("a", "b", "c")
    model = _model(mods, shared=shared, bn=True, dropout=True)
    xs, _ = _data(mods)
    model.train()
    model(xs)                                                   # BatchNorm running statistics ≠ init
    out = coalition_logits(model, xs, mask)
    assert model.training and all(m.training for m in model.modules())      # modes restored
    assert set(out) == {frozenset(S) for k in (1, 2, 3) for S in combinations(mods, k)}
    model.eval()
    with torch.no_grad():
        feats = model.features(xs)
        for S, z in out.items():
            if mask == "input":
                kept = {m: x if m in S else torch.zeros_like(x) for m, x in xs.items()}
                expected = model(kept) if shared else sum(model(kept).values())
            elif shared:
                kept = {m: f if m in S else torch.zeros_like(f) for m, f in feats.items()}
                expected = model.head(model.combine(kept))
            else:
                expected = sum(z_m for m, z_m in model(xs).items() if m in S)
            torch.testing.assert_close(z, expected, msg=str(sorted(S)))


# ---- the step: the weights change training -------------------------------------------------------
LR, RHO = 0.5, 0.3


def _grads(model, xs, y):
    model.zero_grad()
    F.cross_entropy(sum(model(xs).values()), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def _closed_form(model, xs, y, nu_d, rho=RHO):
    """θ − η[ν_d ∇ℓ(θ + ε) + (1 − ν_d) ∇ℓ(θ)], ε = ρ ∇ℓ(θ)/‖∇ℓ(θ)‖₂ (∇L_d ∝ ∇ℓ: same direction), on a copy."""
    twin = copy.deepcopy(model)
    theta = [p.detach().clone() for p in twin.parameters()]
    g = _grads(twin, xs, y)
    norm = torch.cat([t.flatten() for t in g]).norm()
    with torch.no_grad():
        for p, t in zip(twin.parameters(), g):
            p.add_(rho * t / norm)
    g_sam = _grads(twin, xs, y)
    return [w - LR * (nu_d * gs + (1 - nu_d) * gp) for w, gs, gp in zip(theta, g_sam, g)]


def _step(model, xs, y, **params):
    method = MSAM(**params)
    method.setup(model, make_context(model.modalities, lr=LR))
    logs = method.training_step(Batch(xs, y), make_step())
    return [p.detach() for p in model.parameters()], logs


def test_step_is_the_closed_form_mix_for_the_batch_weights():
    mods = ("a", "b", "c")
    model, (xs, y) = _model(mods, seed=3), _data(mods, n=30, seed=4)
    method = MSAM(rho=RHO)
    method.setup(model, make_context(mods, lr=LR))
    nu = method.weights(xs, y)
    d = max(nu, key=nu.get)
    assert 1 / 3 + 0.05 < nu[d] < 0.95                          # a real mix, neither SGD nor SAM
    expected = _closed_form(model, xs, y, nu[d])
    sam, sgd = _closed_form(model, xs, y, 1.0), _closed_form(model, xs, y, 0.0)
    logs = method.training_step(Batch(xs, y), make_step())
    got = [p.detach() for p in model.parameters()]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert logs[f"msam_nu_{d}"] == nu[d] and logs[f"msam_dominant_{d}"] == 1.0
    assert sum(logs[f"msam_dominant_{m}"] for m in mods) == 1.0
    gap = lambda u, v: max(float((s - t).abs().max()) for s, t in zip(u, v))
    assert gap(got, sam) > 1e-3 and gap(got, sgd) > 1e-3         # differs from plain SAM and plain SGD


@pytest.mark.parametrize("nu_d", [1.0, 0.7, 0.5])
def test_the_weight_sets_the_share_of_the_sam_gradient(monkeypatch, nu_d):
    """Forcing ν_d moves the step along the closed form; ν_d = 1 is SAM's step (mie.optim.SAM)."""
    model, (xs, y) = _model(seed=5), _data(n=12, seed=6)
    expected = _closed_form(model, xs, y, nu_d)
    monkeypatch.setattr(MSAM, "weights", lambda self, xs, y: {"a": 1 - nu_d, "b": nu_d})
    got, logs = _step(copy.deepcopy(model), xs, y, rho=RHO)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert logs["msam_dominant_a" if nu_d == 0.5 else "msam_dominant_b"] == 1.0     # a tie: the first
    if nu_d == 1.0:
        twin = copy.deepcopy(model)
        sam = mie.optim.SAM(torch.optim.SGD(twin.parameters(), lr=LR), rho=RHO, model=twin)
        sam.step(lambda: F.cross_entropy(sum(twin(xs).values()), y).backward())
        for a, b in zip(got, twin.parameters()):
            torch.testing.assert_close(a, b.detach())


def test_rho_zero_is_plain_sgd():
    model, (xs, y) = _model(seed=7), _data(seed=8)
    twin = copy.deepcopy(model)
    got, _ = _step(model, xs, y, rho=0.0)
    g = _grads(twin, xs, y)
    for a, w, t in zip(got, twin.parameters(), g):
        torch.testing.assert_close(a, w.detach() - LR * t)
    assert MSAM(rho=0.0).notices() and not MSAM().notices()


def test_batchnorm_statistics_come_from_the_pass_at_theta_only():
    model, (xs, y) = _model(bn=True, seed=9), _data(seed=10)
    twin = copy.deepcopy(model).train()
    twin(xs)                                                    # one train-mode pass at θ
    _step(model, xs, y)
    for a, b in zip(model.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b)


# ---- edge cases -----------------------------------------------------------------------------
def test_refusals():
    with pytest.raises(MieInputError, match="rho must be a number >= 0"):
        MSAM(rho=-0.1)
    with pytest.raises(MieInputError, match="mask must be one of 'input', 'output'"):
        MSAM(mask="zero")
    with pytest.raises(MieInputError, match="unimodal"):
        MSAM().setup(_model(mods=("a",)), make_context(["a"]))
    mods = [f"m{i}" for i in range(11)]
    many = LateFusionModel({m: nn.Linear(2, 2) for m in mods}, {m: nn.Identity() for m in mods})
    with pytest.raises(MieInputError, match="2\\^11"):
        MSAM().setup(many, make_context(mods))


CONFIG = {"train": {"epochs": 2, "batch_size": 16}, "model": {"dim": 8, "head_hidden": [8]}}


@pytest.mark.parametrize("params", [{}, {"feature_fusion": "concat", "mask": "output"}])
def test_three_modalities_run_through_the_loop(monkeypatch, params):
    monkeypatch.setitem(mie.methods.METHODS, "msam", (MSAM, {}, "M-SAM"))
    x, y = make_arrays(n=60, shapes={"a": (6,), "b": (4,), "c": (5,)})
    rows = []
    result = mie.fit(mie.MultimodalArrays(x, y), "msam", config=CONFIG, seed=0, progress=False,
                     callbacks=[lambda e, row: rows.append(row)], **params)
    assert set(result["test"]["per_modality"]) == {"a", "b", "c"}
    assert sum(rows[-1][f"msam_nu_{m}"] for m in "abc") == pytest.approx(1.0)
    assert sum(rows[-1][f"msam_dominant_{m}"] for m in "abc") == pytest.approx(1.0)


def test_cli_train(monkeypatch, npz_file, tmp_path):
    monkeypatch.setitem(mie.methods.METHODS, "msam", (MSAM, {}, "M-SAM"))
    out = tmp_path / "run"
    assert main(["train", "--data", str(npz_file), "--method", "msam", "--out", str(out), *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "msam" and set(metrics["test"]["per_modality"]) == {"a", "b"}
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert len(rows) == 2 and {"msam_nu_a", "msam_nu_b", "msam_dominant_a"} <= set(rows[0])
