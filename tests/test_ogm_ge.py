"""OGM-GE (mie.methods.ogm_ge) against hand computations: scores, ratio, coefficient, which encoder is
scaled, the GE noise, the modulation window, m >= 3, and a run through the real loop."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie
import mie.methods
from conftest import make_context, make_step
from mie.errors import MieInputError
from mie.methods import Batch, create_method
from mie.methods.ogm_ge import OGMGE, discrepancy_ratios, modality_scores, ogm_coefficients
from mie.models import ClassifierHead, LateFusionModel

K = 3
ALPHA = 0.8


def _model(strong, mods=("a", "v"), d_in=K, d=K, seed=0):
    """Linear encoders and one-Linear heads; modality ``strong`` is built to predict the label
    (its first K features pass through the encoder, its head is 3·I on them), the others are
    random and near-uniform."""
    torch.manual_seed(seed)
    encoders, heads = {}, {}
    for m in mods:
        enc, head = nn.Linear(d_in, d), ClassifierHead(d, K, hidden=())
        with torch.no_grad():
            if m == strong:
                enc.weight.mul_(0.1)
                enc.weight[:K, :K] += torch.eye(K)
                enc.bias.zero_()
                head.net[0].weight.zero_()
                head.net[0].weight[:, :K] = 3.0 * torch.eye(K)
                head.net[0].bias.zero_()
            else:
                enc.weight.mul_(0.3)
                head.net[0].weight.mul_(0.3)
        encoders[m], heads[m] = enc, head
    return LateFusionModel(encoders, heads).double()


def _batch(strong, mods=("a", "v"), n=12, d_in=K, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    xs = {m: torch.randn(n, d_in, generator=g, dtype=torch.float64) for m in mods}
    if strong in xs:
        xs[strong] = 0.1 * xs[strong]
        xs[strong][:, :K] += F.one_hot(y, K).double()
    return xs, y


def _ctx(mods, epochs=4):
    return make_context(mods, lr=0.0, epochs_per_modality=epochs)     # lr 0: the gradients stay visible


def _method(model, **kw):
    method = OGMGE(**kw)
    method.setup(model, _ctx(model.modalities))
    return method


def _train(method, xs, y, epoch=0):
    """One training step in loop epoch ``epoch``; the logs as floats."""
    logs = method.training_step(Batch(xs, y), make_step(epoch))
    return {k: float(v) for k, v in logs.items()}


def _raw_grads(model, xs, y):
    """∇ of CE(Σ_m z_m, y), computed here without the method."""
    ref = copy.deepcopy(model)
    F.cross_entropy(sum(ref.heads[m](ref.encoders[m](xs[m])) for m in ref.modalities), y).backward()
    return {name: p.grad.clone() for name, p in ref.named_parameters()}


def _hand_ratio(model, xs, y):
    with torch.no_grad():
        s = {m: F.softmax(model.heads[m](model.encoders[m](xs[m])), dim=-1)[torch.arange(len(y)), y].sum().item()
             for m in model.modalities}
    return s


@pytest.mark.parametrize("strong", ["a", "v"])
def test_dominant_encoder_gradient_is_scaled_by_hand_coefficient(strong):
    model = _model(strong)
    xs, y = _batch(strong)
    s = _hand_ratio(model, xs, y)
    weak = "v" if strong == "a" else "a"
    rho = s[strong] / s[weak]
    assert rho > 1.5                                            # the construction makes `strong` dominant
    k = 1 - math.tanh(ALPHA * (rho - 1))
    assert abs(k - (1 - math.tanh(ALPHA * rho))) > 0.05        # relu(ρ) instead of relu(ρ−1) would differ
    assert abs(k - (1 + math.tanh(ALPHA * (rho - 1)))) > 0.05  # and so would a flipped sign

    raw = _raw_grads(model, xs, y)
    method = _method(model, alpha=ALPHA, ge="off")
    logs = _train(method, xs, y)

    grads = {name: p.grad for name, p in model.named_parameters()}
    for name, g in grads.items():
        if name.startswith(f"encoders.{strong}."):
            torch.testing.assert_close(g, k * raw[name])        # the dominant ENCODER is scaled by k
        else:
            torch.testing.assert_close(g, raw[name])            # weak encoder and both heads untouched
    assert logs[f"ogm_coeff_{strong}"] == pytest.approx(k)
    assert logs[f"ogm_coeff_{weak}"] == 1.0
    assert logs[f"ogm_ratio_{strong}"] == pytest.approx(rho)
    assert logs[f"ogm_ratio_{weak}"] == pytest.approx(1 / rho)
    expected_loss = F.cross_entropy(sum(model.heads[m](model.encoders[m](xs[m])) for m in model.modalities), y)
    assert logs["loss"] == pytest.approx(expected_loss.item())


def test_ratio_offset_zero_is_the_released_codes_relu_rho():
    model = _model("a")
    xs, y = _batch("a")
    s = _hand_ratio(model, xs, y)
    rho = s["a"] / s["v"]
    raw = _raw_grads(model, xs, y)
    method = _method(model, alpha=ALPHA, ge="off", ratio_offset=0.0)
    logs = _train(method, xs, y)
    k = 1 - math.tanh(ALPHA * rho)
    assert logs["ogm_coeff_a"] == pytest.approx(k)
    torch.testing.assert_close(model.encoders["a"].weight.grad, k * raw["encoders.a.weight"])


def test_scores_ratios_coefficients_by_hand():
    z = {"a": torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), "v": torch.zeros(2, 3)}
    y = torch.tensor([0, 2])
    s = modality_scores(z, y)
    ea = math.e ** 2 / (math.e ** 2 + 2) + 1 / (math.e + 2)
    assert s["a"].item() == pytest.approx(ea)
    assert s["v"].item() == pytest.approx(2 / 3)
    r = discrepancy_ratios(s)
    assert r["a"] == pytest.approx(ea / (2 / 3)) and r["v"] == pytest.approx((2 / 3) / ea)
    k = ogm_coefficients({"a": 2.0, "v": 0.5}, alpha=0.8)
    assert k == {"a": pytest.approx(1 - math.tanh(0.8)), "v": 1.0}
    assert ogm_coefficients({"a": 1.0, "v": 1.0}, alpha=0.8) == {"a": 1.0, "v": 1.0}   # balanced: no change
    assert ogm_coefficients({"a": 2.0}, alpha=0.8, ratio_offset=0.0)["a"] == pytest.approx(1 - math.tanh(1.6))


def test_three_modalities_ratio_to_mean_of_the_others():
    s = {"a": torch.tensor(3.0), "b": torch.tensor(2.0), "c": torch.tensor(1.0)}
    r = discrepancy_ratios(s)
    assert r == {"a": pytest.approx(3 / 1.5), "b": pytest.approx(2 / 2), "c": pytest.approx(1 / 2.5)}
    k = ogm_coefficients(r, alpha=0.5)
    assert k == {"a": pytest.approx(1 - math.tanh(0.5)), "b": 1.0, "c": 1.0}

    mods = ("a", "b", "c")
    model = _model("b", mods)
    xs, y = _batch("b", mods)
    sc = _hand_ratio(model, xs, y)
    rho_b = sc["b"] / ((sc["a"] + sc["c"]) / 2)
    raw = _raw_grads(model, xs, y)
    logs = _train(_method(model, alpha=ALPHA, ge="off"), xs, y)
    kb = 1 - math.tanh(ALPHA * (rho_b - 1))
    assert logs["ogm_coeff_b"] == pytest.approx(kb)
    for name, p in model.named_parameters():
        scale = kb if name.startswith("encoders.b.") else 1.0
        torch.testing.assert_close(p.grad, scale * raw[name])


def test_ge_noise_recomputed_with_the_same_seed():
    model = _model("a")
    xs, y = _batch("a")
    s = _hand_ratio(model, xs, y)
    k = {"a": 1 - math.tanh(ALPHA * (s["a"] / s["v"] - 1)), "v": 1.0}
    raw = _raw_grads(model, xs, y)
    method = _method(model, alpha=ALPHA, ge="all")
    method.generator.manual_seed(123)
    _train(method, xs, y)

    g = torch.Generator().manual_seed(123)
    for m in ("a", "v"):                                   # noise on every encoder, in model order
        for pname, p in model.encoders[m].named_parameters():
            r = raw[f"encoders.{m}.{pname}"]
            noise = torch.randn(r.shape, generator=g, dtype=torch.float32) * (r.float().std() + 1e-8)
            torch.testing.assert_close(p.grad, k[m] * r + noise.double(), rtol=1e-5, atol=1e-7)
    for name, p in model.heads.named_parameters():          # heads: no scaling, no noise
        torch.testing.assert_close(p.grad, raw[f"heads.{name}"])


@pytest.mark.parametrize("ge", ["all", "dominant"])
def test_ge_noise_std_matches_the_unscaled_gradient_std(ge):
    d_in, d = 40, 50                                        # a 50×40 weight: 2000 noise draws
    model = _model("a", d_in=d_in, d=d)
    xs, y = _batch("a", n=32, d_in=d_in)
    s = _hand_ratio(model, xs, y)
    assert s["a"] > s["v"]
    k = 1 - math.tanh(ALPHA * (s["a"] / s["v"] - 1))
    raw = _raw_grads(model, xs, y)
    _train(_method(model, alpha=ALPHA, ge=ge), xs, y)

    r = raw["encoders.a.weight"]
    noise = model.encoders["a"].weight.grad - k * r
    assert noise.std().item() == pytest.approx(r.std().item(), rel=0.08)   # std of the UNSCALED gradient
    assert abs(noise.mean().item()) < 0.1 * r.std().item()
    if k < 0.9:                                             # ≠ std of the scaled gradient
        assert abs(noise.std().item() - k * r.std().item()) > 0.08 * r.std().item()
    weak = model.encoders["v"].weight.grad - raw["encoders.v.weight"]
    if ge == "all":
        assert weak.std().item() == pytest.approx(raw["encoders.v.weight"].std().item(), rel=0.08)
    else:
        assert torch.equal(weak, torch.zeros_like(weak))


def test_modulation_only_inside_the_window():
    model = _model("a")
    xs, y = _batch("a")
    raw = _raw_grads(model, xs, y)
    method = _method(model, alpha=ALPHA, ge="all", modulation_starts=1, modulation_ends=2)
    for epoch, inside in [(0, False), (1, True), (2, False), (3, False)]:
        logs = _train(method, xs, y, epoch=epoch)
        same = all(torch.equal(p.grad, raw[n]) for n, p in model.named_parameters())
        assert same is (not inside)
        assert (logs["ogm_coeff_a"] < 1.0) is inside


def test_invalid_settings_and_one_modality_are_refused():
    with pytest.raises(MieInputError, match="alpha must be a number >= 0"):
        create_method("ogm_ge", alpha=-1)
    with pytest.raises(MieInputError, match="ge must be one of"):
        create_method("ogm_ge", ge="sometimes")
    with pytest.raises(MieInputError, match="fusion must be one of"):
        create_method("ogm_ge", fusion="max")
    with pytest.raises(MieInputError, match="modulation_ends must be"):
        create_method("ogm_ge", modulation_starts=3, modulation_ends=2)
    with pytest.raises(MieInputError, match="unknown parameter"):
        create_method("ogm", ge="all")                                  # ogm fixes ge="off"
    assert create_method("ogm").ge == "off"
    model = LateFusionModel({"a": nn.Linear(2, 2)}, {"a": ClassifierHead(2, K, hidden=())})
    with pytest.raises(MieInputError, match="unimodal"):
        OGMGE().setup(model, _ctx(["a"]))


def test_inference_fusion_rules():
    model = _model("a")
    xs, _ = _batch("a")
    with torch.no_grad():
        z = {m: model.heads[m](model.encoders[m](xs[m])) for m in model.modalities}
    p = {m: F.softmax(v, dim=-1) for m, v in z.items()}
    method = _method(model)
    assert method.fusion == "model"
    model.eval()
    fused, per = method.predict(xs)
    torch.testing.assert_close(fused, F.softmax(z["a"] + z["v"], dim=-1).float())   # the training rule: Σ_u z_u
    for m in ("a", "v"):
        torch.testing.assert_close(per[m], p[m].float())
    fused, _ = _method(model, fusion="average").predict(xs)
    torch.testing.assert_close(fused, ((p["a"] + p["v"]) / 2).float())


def test_state_dict_restores_optimizer_and_generator():
    model = _model("a")
    xs, y = _batch("a")
    method = _method(model, alpha=ALPHA, ge="all")
    _train(method, xs, y)
    state = copy.deepcopy(method.state_dict())
    _train(method, xs, y)
    after = model.encoders["a"].weight.grad.clone()
    other = _method(model, alpha=ALPHA, ge="all")
    other.generator.manual_seed(99)
    other.load_state_dict(state)
    _train(other, xs, y)                                                # lr 0: the same model, the same batch
    assert torch.equal(model.encoders["a"].weight.grad, after)         # the same GE noise after a resume
    assert set(state) == {"optimizer", "generator"}


def _arrays(n=90, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    x = {"a": (rng.normal(size=(K, 6))[y] * 2 + rng.normal(size=(n, 6))).astype(np.float32),
         "b": (rng.normal(size=(K, 4))[y] * 0.5 + rng.normal(size=(n, 4))).astype(np.float32)}
    return mie.MultimodalArrays(x, y)


def test_runs_through_the_loop_and_logs_coefficients(monkeypatch):
    monkeypatch.setitem(mie.methods.METHODS, "ogm_ge", (OGMGE, {}, "OGM-GE"))
    rows = []
    config = {"model": {"dim": 8, "head_hidden": [8]}, "train": {"batch_size": 32, "device": "cpu"}}
    result = mie.fit(_arrays(), method="ogm_ge", config=config, epochs=2, seed=0, progress=False,
                     callbacks=[lambda epoch, row: rows.append(row)], modulation_ends=1)
    assert len(rows) == 2 and result["method"] == "ogm_ge"
    assert 0.0 < rows[0]["ogm_coeff_a"] <= 1.0 and 0.0 < rows[0]["ogm_coeff_b"] <= 1.0
    assert min(rows[0]["ogm_coeff_a"], rows[0]["ogm_coeff_b"]) < 1.0
    assert rows[1]["ogm_coeff_a"] == rows[1]["ogm_coeff_b"] == 1.0          # epoch 1 is past modulation_ends
    assert set(result["test"]["per_modality"]) == {"a", "b"}
