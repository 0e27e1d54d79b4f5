"""OGM-GE (mie.methods.ogm_ge): parity of its real training_step with a transcription of the
authors' released step (GeWu-Lab/OGM-GE_CVPR2022 main.py), then hand computations of the scores,
ratio, coefficient, which tensors are modulated, the GE noise, the window, m >= 3, the notices,
and a run through the real loop."""
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


# ---- parity with the authors' released code -------------------------------------------------------
D = 4


def _conv_model(seed=0):
    """Two encoders shaped like the authors' ResNet18 in miniature — 4-D conv kernels (one with a
    bias), BatchNorm, global pooling, no Linear — and one-Linear heads: the per-modality parts
    out_a, out_v of their fusion layer."""
    torch.manual_seed(seed)

    def encoder():
        return nn.Sequential(nn.Conv2d(1, D, 3, padding=1), nn.BatchNorm2d(D), nn.ReLU(),
                             nn.Conv2d(D, D, 3, padding=1, bias=False), nn.BatchNorm2d(D), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return LateFusionModel({"a": encoder(), "v": encoder()}, {m: ClassifierHead(D, K, hidden=()) for m in "av"})


def _conv_batches(count=4, n=16, seed=2):
    """Mini-batches whose audio carries the label (a mean shift) and whose video is noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        y = torch.randint(0, K, (n,), generator=g)
        xs = {"a": torch.randn(n, 1, 5, 5, generator=g) + 1.5 * y.view(-1, 1, 1, 1).float(),
              "v": torch.randn(n, 1, 5, 5, generator=g)}
        out.append((xs, y))
    return out


def _sgd(params):
    # GeWu-Lab/OGM-GE_CVPR2022 main.py line 246: SGD, momentum 0.9, weight decay 1e-4 (a larger lr here)
    return torch.optim.SGD(list(params), lr=0.1, momentum=0.9, weight_decay=1e-4)


# GeWu-Lab/OGM-GE_CVPR2022 main.py line 77-153 (train_epoch, one mini-batch), transcribed for a model
# whose modalities are "a" (their audio_net) and "v" (their visual_net). The GE noise draws from
# ``gen`` (theirs: torch's global generator) so that it can be compared draw for draw.
def _released_ogm_step(model, optimizer, xs, y, epoch, alpha, modulation="OGM_GE", starts=0, ends=50, gen=None):
    softmax, relu, tanh = nn.Softmax(dim=1), nn.ReLU(inplace=True), nn.Tanh()
    optimizer.zero_grad()
    out_a = model.heads["a"](model.encoders["a"](xs["a"]))
    out_v = model.heads["v"](model.encoders["v"](xs["v"]))
    out = out_a + out_v
    loss = nn.CrossEntropyLoss()(out, y)
    loss.backward()
    score_v = sum([softmax(out_v)[i][y[i]] for i in range(out_v.size(0))])
    score_a = sum([softmax(out_a)[i][y[i]] for i in range(out_a.size(0))])
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        coeff_v = 1 - tanh(alpha * relu(ratio_v))
        coeff_a = 1
    else:
        coeff_a = 1 - tanh(alpha * relu(ratio_a))
        coeff_v = 1
    if starts <= epoch <= ends:
        for name, parms in model.named_parameters():
            layer = str(name).split('.')[1]
            for modality, coeff in (("a", coeff_a), ("v", coeff_v)):
                if name.startswith("encoders.") and layer == modality and len(parms.grad.size()) == 4:
                    if modulation == "OGM_GE":
                        parms.grad = parms.grad * coeff + \
                            torch.zeros_like(parms.grad).normal_(0, parms.grad.std().item() + 1e-8, generator=gen)
                    elif modulation == "OGM":
                        parms.grad *= coeff
    optimizer.step()
    return tuple(float(torch.as_tensor(c).detach()) for c in (coeff_a, coeff_v))


def _run_against_released(name, epochs=(0, 1, 50, 51), **params):
    """Train our ``name`` and the transcription side by side; returns the max |difference| of the
    model states after each step, and our logs."""
    ours, theirs = _conv_model(), _conv_model()
    method = create_method(name, alpha=ALPHA, **params)
    method.setup(ours, make_context(["a", "v"], make_optimizer=lambda p, lr=None: _sgd(p), epochs_per_modality=100))
    method.generator.manual_seed(7)
    gen = torch.Generator().manual_seed(7)
    optimizer = _sgd(theirs.parameters())
    modulation = "OGM_GE" if method.ge != "off" else "OGM"
    diffs, logs, coeffs = [], [], []
    for epoch, (xs, y) in zip(epochs, _conv_batches(len(epochs))):
        logs.append({k: float(v) for k, v in method.training_step(Batch(xs, y), make_step(epoch)).items()})
        coeffs.append(_released_ogm_step(theirs, optimizer, xs, y, epoch, ALPHA, modulation, gen=gen))
        a, b = ours.state_dict(), theirs.state_dict()
        diffs.append(max((a[k].double() - b[k].double()).abs().max().item() for k in a))
    return diffs, logs, coeffs


# GeWu-Lab/OGM-GE_CVPR2022 main.py line 95-153: the defaults of ogm_ge (--modulation OGM_GE, main.py
# line 23) and of ogm (--modulation OGM) against the released step: k = 1 − tanh(α·ρ) (main.py
# line 119-124), only the 4-D conv kernels (main.py line 136, 143), the noise's std that of the
# unscaled gradient (main.py line 138-139), the window 0 <= epoch <= 50 (main.py line 41-42, 132).
@pytest.mark.parametrize("name", ["ogm_ge", "ogm"])
def test_parity_with_the_released_ogm_ge_step(name):
    diffs, logs, coeffs = _run_against_released(name)
    assert max(diffs) < 1e-6, diffs
    first = logs[0]
    assert min(first["ogm_coeff_a"], first["ogm_coeff_v"]) < 0.5                 # the step did modulate
    assert (first["ogm_coeff_a"], first["ogm_coeff_v"]) == pytest.approx(coeffs[0], rel=1e-6)
    assert logs[2]["ogm_coeff_a"] < 1.0 or logs[2]["ogm_coeff_v"] < 1.0          # epoch 50: inside
    assert logs[3]["ogm_coeff_a"] == logs[3]["ogm_coeff_v"] == 1.0               # epoch 51: outside


# GeWu-Lab/OGM-GE_CVPR2022 main.py line 119-148: each former default of ours breaks the parity above —
# relu(ρ − 1) instead of ρ, BatchNorm and bias tensors modulated too, modulation past epoch 50.
@pytest.mark.parametrize("former", [{"ratio_offset": 1.0}, {"scope": "encoder"}, {"modulation_ends": None}])
def test_the_former_defaults_do_not_match_the_released_step(former):
    diffs, _, _ = _run_against_released("ogm_ge", **former)
    assert max(diffs) > 1e-3


# GeWu-Lab/OGM-GE_CVPR2022 main.py line 111-124 (eq. 10 quoted): paper and code agree on 1 − tanh(α·ρ)
# for ρ > 1; ratio_offset=1, 1 − tanh(α·(ρ − 1)), is ours and opt-in (at α = 0.8, ρ = 1.3: 0.77 vs 0.22).
def test_coefficient_is_eq_10_by_default_and_the_continuous_form_is_opt_in():
    assert OGMGE.params["ratio_offset"].default == 0.0
    k = ogm_coefficients({"a": 1.3, "v": 1 / 1.3}, alpha=0.8)
    assert k["a"] == pytest.approx(1 - math.tanh(0.8 * 1.3)) and k["a"] == pytest.approx(0.2222, abs=1e-4)
    assert k["v"] == 1.0
    ours = ogm_coefficients({"a": 1.3, "v": 1 / 1.3}, alpha=0.8, ratio_offset=1.0)
    assert ours["a"] == pytest.approx(1 - math.tanh(0.8 * 0.3)) and ours["a"] == pytest.approx(0.7645, abs=1e-4)


# GeWu-Lab/OGM-GE_CVPR2022 main.py line 119-124: at ρ = 1 exactly the code's else-branch scales the audio
# encoder by 1 − tanh(α); eq. 10 (main.py line 111-117) gives k = 1 for ρ <= 1, which we follow.
def test_a_tie_is_not_modulated_as_in_eq_10():
    assert ogm_coefficients({"a": 1.0, "v": 1.0}, alpha=0.8) == {"a": 1.0, "v": 1.0}


# ---- hand computations on Linear encoders ---------------------------------------------------------
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
def test_dominant_encoder_weight_gradient_is_scaled_by_hand_coefficient(strong):
    model = _model(strong)
    xs, y = _batch(strong)
    s = _hand_ratio(model, xs, y)
    weak = "v" if strong == "a" else "a"
    rho = s[strong] / s[weak]
    assert rho > 1.5                                            # the construction makes `strong` dominant
    k = 1 - math.tanh(ALPHA * rho)                              # eq. 10
    assert abs(k - (1 - math.tanh(ALPHA * (rho - 1)))) > 0.05  # relu(ρ − 1) would differ

    raw = _raw_grads(model, xs, y)
    method = _method(model, alpha=ALPHA, ge="off")
    logs = _train(method, xs, y)

    for name, p in model.named_parameters():
        if name == f"encoders.{strong}.weight":
            torch.testing.assert_close(p.grad, k * raw[name])   # the dominant encoder's WEIGHT is scaled by k
        else:
            torch.testing.assert_close(p.grad, raw[name])       # its bias, the weak encoder and the heads: not
    assert logs[f"ogm_coeff_{strong}"] == pytest.approx(k)
    assert logs[f"ogm_coeff_{weak}"] == 1.0
    assert logs[f"ogm_ratio_{strong}"] == pytest.approx(rho)
    assert logs[f"ogm_ratio_{weak}"] == pytest.approx(1 / rho)
    expected_loss = F.cross_entropy(sum(model.heads[m](model.encoders[m](xs[m])) for m in model.modalities), y)
    assert logs["loss"] == pytest.approx(expected_loss.item())


@pytest.mark.parametrize("scope,scaled", [("encoder_weights", {"encoders.a.weight"}),
                                          ("encoder", {"encoders.a.weight", "encoders.a.bias"}),
                                          ("encoder_4d", set())])
def test_scope_selects_the_tensors(scope, scaled):
    model = _model("a")
    xs, y = _batch("a")
    s = _hand_ratio(model, xs, y)
    k = 1 - math.tanh(ALPHA * s["a"] / s["v"])
    raw = _raw_grads(model, xs, y)
    method = _method(model, alpha=ALPHA, ge="off", scope=scope)
    _train(method, xs, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, (k if name in scaled else 1.0) * raw[name])
    notes = method.notices()
    assert any("selects no tensor of modality a's encoder" in n for n in notes) is (scope == "encoder_4d")


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
    assert k == {"a": pytest.approx(1 - math.tanh(1.6)), "v": 1.0}
    assert ogm_coefficients({"a": 2.0}, alpha=0.8, ratio_offset=1.0)["a"] == pytest.approx(1 - math.tanh(0.8))


def test_three_modalities_ratio_to_mean_of_the_others():
    s = {"a": torch.tensor(3.0), "b": torch.tensor(2.0), "c": torch.tensor(1.0)}
    r = discrepancy_ratios(s)
    assert r == {"a": pytest.approx(3 / 1.5), "b": pytest.approx(2 / 2), "c": pytest.approx(1 / 2.5)}
    k = ogm_coefficients(r, alpha=0.5)
    assert k == {"a": pytest.approx(1 - math.tanh(1.0)), "b": 1.0, "c": 1.0}

    mods = ("a", "b", "c")
    model = _model("b", mods)
    xs, y = _batch("b", mods)
    sc = _hand_ratio(model, xs, y)
    rho_b = sc["b"] / ((sc["a"] + sc["c"]) / 2)
    raw = _raw_grads(model, xs, y)
    logs = _train(_method(model, alpha=ALPHA, ge="off"), xs, y)
    kb = 1 - math.tanh(ALPHA * rho_b)
    assert logs["ogm_coeff_b"] == pytest.approx(kb)
    for name, p in model.named_parameters():
        scale = kb if name == "encoders.b.weight" else 1.0
        torch.testing.assert_close(p.grad, scale * raw[name])


def test_ge_noise_recomputed_with_the_same_seed():
    model = _model("a")
    xs, y = _batch("a")
    s = _hand_ratio(model, xs, y)
    k = {"a": 1 - math.tanh(ALPHA * s["a"] / s["v"]), "v": 1.0}
    raw = _raw_grads(model, xs, y)
    method = _method(model, alpha=ALPHA, ge="all")
    method.generator.manual_seed(123)
    _train(method, xs, y)

    g = torch.Generator().manual_seed(123)
    for m in ("a", "v"):                                   # noise on every encoder's weight, in model order
        r = raw[f"encoders.{m}.weight"]
        noise = torch.randn(r.shape, generator=g, dtype=torch.float32) * (r.float().std() + 1e-8)
        torch.testing.assert_close(model.encoders[m].weight.grad, k[m] * r + noise.double(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(model.encoders[m].bias.grad, raw[f"encoders.{m}.bias"])   # 1-D: untouched
    for name, p in model.heads.named_parameters():          # heads: no scaling, no noise
        torch.testing.assert_close(p.grad, raw[f"heads.{name}"])


@pytest.mark.parametrize("ge", ["all", "dominant"])
def test_ge_noise_std_matches_the_unscaled_gradient_std(ge):
    d_in, d = 40, 50                                        # a 50×40 weight: 2000 noise draws
    model = _model("a", d_in=d_in, d=d)
    xs, y = _batch("a", n=32, d_in=d_in)
    s = _hand_ratio(model, xs, y)
    assert s["a"] > s["v"]
    k = 1 - math.tanh(ALPHA * s["a"] / s["v"])
    raw = _raw_grads(model, xs, y)
    _train(_method(model, alpha=ALPHA, ge=ge), xs, y)

    r = raw["encoders.a.weight"]
    noise = model.encoders["a"].weight.grad - k * r
    assert noise.std().item() == pytest.approx(r.std().item(), rel=0.08)   # std of the UNSCALED gradient
    assert abs(noise.mean().item()) < 0.1 * r.std().item()
    assert abs(noise.std().item() - k * r.std().item()) > 0.08 * r.std().item()   # ≠ std of the scaled one
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


def test_default_window_is_the_released_codes_epochs_0_to_50():
    method = create_method("ogm_ge")
    assert (method.modulation_starts, method.modulation_ends) == (0, 51)
    assert [method.active(make_step(e)) for e in (0, 50, 51)] == [True, True, False]


def test_notices_say_when_the_window_misses_part_or_all_of_the_run():
    def notes(epochs, **kw):
        method = create_method("ogm_ge", **kw)
        method.setup(_model("a"), _ctx(["a", "v"], epochs=epochs))
        return method.notices()
    assert notes(10) == []                                             # epochs 0-9 lie inside 0-50
    assert notes(100) == ["OGM acts in loop epochs 0-50 only, of 0-99"]
    assert notes(5, modulation_starts=8, modulation_ends=None) == [
        "OGM never acts: its window starts at loop epoch 8, the run has epochs 0-4; this run is plain joint training"]


def test_invalid_settings_and_one_modality_are_refused():
    with pytest.raises(MieInputError, match="alpha must be a number >= 0"):
        create_method("ogm_ge", alpha=-1)
    with pytest.raises(MieInputError, match="ge must be one of"):
        create_method("ogm_ge", ge="sometimes")
    with pytest.raises(MieInputError, match="scope must be one of"):
        create_method("ogm_ge", scope="heads")
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


def test_setup_draws_nothing_from_the_global_generator():
    state = torch.get_rng_state()
    _method(_model("a"))
    assert torch.equal(torch.get_rng_state(), state)


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
    assert result["notices"] == ["ogm_ge: OGM acts in loop epochs 0-0 only, of 0-1"]
