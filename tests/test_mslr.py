"""MSLR (mie.methods.mslr) against hand computations: the per-modality learning-rate rules on given
validation accuracies (ratio, window, update epochs), that each modality's parameter group really steps
with its own rate, the additive (sum) fusion, m >= 3, and a crash-and-resume run through the loop."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie.methods.mslr as mslr_mod
from mie.errors import MieInputError
from mie.methods.mslr import MSLR, accuracy_ratio, mslr_update
from mie.models import ClassifierHead, LateFusionModel
from mie.train import TrainContext

K = 3


def _model(mods=("a", "b")):
    torch.manual_seed(0)
    return LateFusionModel({m: nn.Linear(4, 3) for m in mods}, {m: ClassifierHead(3, K, hidden=()) for m in mods})


def _ctx(mods, lr=0.1):
    return TrainContext(modalities=list(mods), device=torch.device("cpu"),
                        make_optimizer=lambda params: torch.optim.SGD(list(params), lr=lr),
                        train_batches=lambda: iter(()), val_batches=lambda: iter(()),
                        epochs_per_modality=6, steps_per_epoch=1)


def _fake_val(monkeypatch, accs):
    """Make the validation pass return the given accuracies, epoch by epoch: accs {m: [a_m(0), …]}."""
    calls = iter(range(10**6))

    def fake(model, batches):
        t = next(calls)
        return {m: {"loss": 0.0, "accuracy": v[t]} for m, v in accs.items()}
    monkeypatch.setattr(mslr_mod, "output_metrics", fake)


def test_ratio_and_update_rules_by_hand():
    assert accuracy_ratio([0.5, 0.6, 0.4]) == pytest.approx(0.4 / 0.5)
    assert accuracy_ratio([0.9]) == 1.0
    assert accuracy_ratio([0.0, 0.0]) == 1.0                      # a zero mean leaves the rate alone
    scales, windows = {"a": 2.0, "b": 1.0}, {"a": [0.5, 0.6, 0.4], "b": [0.2, 0.3, 0.4]}
    new, ratios = mslr_update(scales, windows, "dynamic", epoch=2, history=3)       # (2+1) % 3 == 0
    assert new == {"a": pytest.approx(2.0 * 0.8), "b": pytest.approx(1.0 * 0.4 / 0.3)}
    assert ratios == {"a": pytest.approx(0.8), "b": pytest.approx(4 / 3)}
    assert mslr_update(scales, windows, "dynamic", epoch=3, history=3) == (scales, {"a": 1.0, "b": 1.0})
    assert mslr_update(scales, windows, "smooth", epoch=3, history=3)[0] == new      # smooth: every epoch
    assert mslr_update(scales, windows, "keep", epoch=2, history=3) == (scales, {"a": 1.0, "b": 1.0})


def test_dynamic_learning_rates_from_given_validation_accuracies(monkeypatch):
    # H = 3: the rate changes after epochs 2 and 5 only, by a(t) / mean(a(t-2..t)).
    accs = {"a": [0.5, 0.6, 0.4, 0.8, 0.9, 0.3], "b": [0.2, 0.3, 0.4, 0.4, 0.4, 0.4]}
    _fake_val(monkeypatch, accs)
    model = _model()
    method = MSLR(strategy="dynamic", history=3, lr_scale={"a": 2.0})
    method.setup(model, _ctx(model.modalities, lr=0.1))
    assert [g["lr"] for g in method.optimizer.param_groups] == pytest.approx([0.2, 0.1])   # keep: η · r_m
    lrs = [method.end_epoch(t) for t in range(6)]
    expected_a = [0.2, 0.2, 0.2 * 0.4 / 0.5, 0.16, 0.16, 0.16 * 0.3 / ((0.8 + 0.9 + 0.3) / 3)]
    expected_b = [0.1, 0.1, 0.1 * 0.4 / 0.3, 0.4 / 3, 0.4 / 3, 0.4 / 3 * 0.4 / 0.4]
    assert [row["mslr_lr_a"] for row in lrs] == pytest.approx(expected_a)
    assert [row["mslr_lr_b"] for row in lrs] == pytest.approx(expected_b)
    assert lrs[2]["mslr_ratio_a"] == pytest.approx(0.8) and lrs[1]["mslr_ratio_a"] == 1.0
    assert lrs[4]["mslr_val_acc_a"] == 0.9


def test_smooth_learning_rates_use_the_moving_window_every_epoch(monkeypatch):
    accs = {"a": [0.5, 0.6, 0.4, 0.8], "b": [0.3, 0.3, 0.6, 0.6], "c": [0.4, 0.2, 0.2, 0.2]}
    _fake_val(monkeypatch, accs)
    model = _model(("a", "b", "c"))
    method = MSLR(strategy="smooth", history=2)
    method.setup(model, _ctx(model.modalities, lr=1.0))
    rows = [method.end_epoch(t) for t in range(4)]
    r = {"a": 1.0, "b": 1.0, "c": 1.0}
    for t in range(4):          # window = the last two accuracies (one at t = 0)
        for m in r:
            w = accs[m][max(0, t - 1):t + 1]
            r[m] *= w[-1] / (sum(w) / len(w))
            assert rows[t][f"mslr_lr_{m}"] == pytest.approx(r[m])
    assert rows[1]["mslr_lr_a"] == pytest.approx(0.6 / 0.55)          # 2-epoch window, not the whole history
    assert rows[3]["mslr_lr_a"] == pytest.approx(0.6 / 0.55 * 0.4 / 0.5 * 0.8 / 0.6)


def test_each_modality_steps_with_its_own_rate_on_the_summed_logits(monkeypatch):
    _fake_val(monkeypatch, {"a": [0.5, 0.8], "b": [0.5, 0.25]})
    model = _model()
    method = MSLR(strategy="smooth", history=2)
    method.setup(model, _ctx(model.modalities, lr=0.1))
    method.end_epoch(0)
    method.end_epoch(1)                       # r_a = 0.8/0.65, r_b = 0.25/0.375
    lr = {"a": 0.1 * 0.8 / 0.65, "b": 0.1 * 0.25 / 0.375}
    g = torch.Generator().manual_seed(3)
    xs, y = {m: torch.randn(6, 4, generator=g) for m in ("a", "b")}, torch.tensor([0, 1, 2, 0, 1, 2])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    z = model.heads["a"](model.encoders["a"](xs["a"])) + model.heads["b"](model.encoders["b"](xs["b"]))
    hand = F.cross_entropy(z, y)
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(hand, list(model.parameters()))))
    logs = method.train_step(xs, y)
    assert logs["loss"] == pytest.approx(hand.item())                  # CE of the SUM of the logits
    for n, p in model.named_parameters():
        m = n.split(".")[1]
        torch.testing.assert_close(p.detach(), before[n] - lr[m] * grads[n])
    fused, per = method.predict(xs)
    torch.testing.assert_close(fused, F.softmax(model.heads["a"](model.encoders["a"](xs["a"]))
                                                + model.heads["b"](model.encoders["b"](xs["b"])), dim=-1))


def test_invalid_settings_are_refused():
    with pytest.raises(MieInputError):
        MSLR(strategy="fast")
    with pytest.raises(MieInputError):
        MSLR(history=0)
    with pytest.raises(MieInputError):
        MSLR(lr_scale={"a": -1.0})
    model = _model()
    with pytest.raises(MieInputError, match="unknown modality"):
        MSLR(lr_scale={"x": 2.0}).setup(model, _ctx(model.modalities))
    one = LateFusionModel({"a": nn.Linear(2, 2)}, {"a": ClassifierHead(2, K, hidden=())})
    with pytest.raises(MieInputError, match="unimodal"):
        MSLR().setup(one, _ctx(["a"]))
