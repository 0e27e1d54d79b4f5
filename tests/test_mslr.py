"""MSLR (mie.methods.mslr) against hand computations: the per-modality learning-rate rules on given
validation accuracies (ratio, window, update epochs) driving ``lr_scale`` through ``on_validation``,
that each modality's parameter group really steps with its own rate, the additive (sum) aggregation
and the inference rules, m >= 3, and the refused settings."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_context, make_step
from mie.config import default_config
from mie.errors import MieInputError
from mie.methods import Batch, create_method
from mie.methods.mslr import MSLR, accuracy_ratio, mslr_update
from mie.models import ClassifierHead, LateFusionModel
from mie.train import Optimizers

K = 3


def _model(mods=("a", "b")):
    torch.manual_seed(0)
    return LateFusionModel({m: nn.Linear(4, 3) for m in mods}, {m: ClassifierHead(3, K, hidden=()) for m in mods})


def _optimizers(lr=0.1):
    """The loop's optimizer factory (plain SGD at ``lr``): group lr = lr × schedule × lr_scale(name)."""
    return Optimizers({**default_config()["train"], "optimizer": "sgd", "lr": lr, "momentum": 0.0,
                       "weight_decay": 0.0})


def _setup(method, model, lr=0.1):
    optimizers = _optimizers(lr)
    method.setup(model, make_context(model.modalities, make_optimizer=optimizers.make))
    optimizers.apply(1.0, method)                      # as the loop does at the start of epoch 0
    return optimizers


def _metrics(accs, t):
    """The loop's validation metrics of epoch t with per-modality accuracies accs {m: [a_m(0), …]}."""
    return {"accuracy": 0.0, "loss": 0.0,
            "per_modality": {m: {"accuracy": v[t], "loss": 0.0, "macro_f1": 0.0} for m, v in accs.items()}}


def _epochs(method, optimizers, accs, n, factor=1.0):
    """on_validation of epochs 0 … n−1, each followed by the loop's learning-rate update."""
    rows = []
    for t in range(n):
        rows.append(method.on_validation(t, _metrics(accs, t)))
        optimizers.apply(factor, method)
    return rows


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


def test_dynamic_learning_rates_from_given_validation_accuracies():
    # H = 3: the rate changes after epochs 2 and 5 only, by a(t) / mean(a(t-2..t)).
    accs = {"a": [0.5, 0.6, 0.4, 0.8, 0.9, 0.3], "b": [0.2, 0.3, 0.4, 0.4, 0.4, 0.4]}
    model = _model()
    method = create_method("mslr", strategy="dynamic", history=3, initial_scale={"a": 2.0})
    optimizers = _setup(method, model, lr=0.1)
    assert [g["name"] for g in method.optimizer.param_groups] == ["a", "b"]
    assert [g["lr"] for g in method.optimizer.param_groups] == pytest.approx([0.2, 0.1])   # keep: η · r_m
    lrs = _epochs(method, optimizers, accs, 6)
    expected_a = [0.2, 0.2, 0.2 * 0.4 / 0.5, 0.16, 0.16, 0.16 * 0.3 / ((0.8 + 0.9 + 0.3) / 3)]
    expected_b = [0.1, 0.1, 0.1 * 0.4 / 0.3, 0.4 / 3, 0.4 / 3, 0.4 / 3 * 0.4 / 0.4]
    assert [row["mslr_lr_a"] for row in lrs] == pytest.approx(expected_a)
    assert [row["mslr_lr_b"] for row in lrs] == pytest.approx(expected_b)
    assert [g["lr"] for g in method.optimizer.param_groups] == pytest.approx([expected_a[-1], expected_b[-1]])
    assert method.lr_scale("a") == pytest.approx(expected_a[-1] / 0.1) and method.lr_scale(None) == 1.0
    assert lrs[2]["mslr_ratio_a"] == pytest.approx(0.8) and lrs[1]["mslr_ratio_a"] == 1.0
    assert lrs[4]["mslr_val_acc_a"] == 0.9


def test_logged_rate_includes_the_schedule_factor():
    accs = {"a": [0.5, 1.0], "b": [0.5, 0.5]}
    model = _model()
    method = create_method("mslr", strategy="smooth", history=2)
    optimizers = _setup(method, model, lr=0.1)
    rows = _epochs(method, optimizers, accs, 2, factor=0.5)
    assert rows[1]["mslr_lr_a"] == pytest.approx(0.1 * 0.5 * 1.0 / 0.75)      # η · schedule · r_a(2)
    assert method.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 / 0.75)


def test_smooth_learning_rates_use_the_moving_window_every_epoch():
    accs = {"a": [0.5, 0.6, 0.4, 0.8], "b": [0.3, 0.3, 0.6, 0.6], "c": [0.4, 0.2, 0.2, 0.2]}
    model = _model(("a", "b", "c"))
    method = create_method("mslr", strategy="smooth", history=2)
    optimizers = _setup(method, model, lr=1.0)
    rows = _epochs(method, optimizers, accs, 4)
    r = {"a": 1.0, "b": 1.0, "c": 1.0}
    for t in range(4):          # window = the last two accuracies (one at t = 0)
        for m in r:
            w = accs[m][max(0, t - 1):t + 1]
            r[m] *= w[-1] / (sum(w) / len(w))
            assert rows[t][f"mslr_lr_{m}"] == pytest.approx(r[m])
    assert rows[1]["mslr_lr_a"] == pytest.approx(0.6 / 0.55)          # 2-epoch window, not the whole history
    assert rows[3]["mslr_lr_a"] == pytest.approx(0.6 / 0.55 * 0.4 / 0.5 * 0.8 / 0.6)
    assert {m: method.lr_scale(m) for m in r} == {m: pytest.approx(v) for m, v in r.items()}


def test_keep_never_changes_the_rates_nor_reads_accuracies():
    model = _model()
    method = create_method("mslr", strategy="keep", initial_scale={"b": 3.0})
    optimizers = _setup(method, model, lr=0.1)
    rows = [method.on_validation(t, {}) for t in range(3)]           # no metrics needed
    optimizers.apply(1.0, method)
    assert [row["mslr_lr_b"] for row in rows] == pytest.approx([0.3] * 3) and "mslr_ratio_a" not in rows[0]
    assert [g["lr"] for g in method.optimizer.param_groups] == pytest.approx([0.1, 0.3])


def test_each_modality_steps_with_its_own_rate_on_the_summed_logits():
    model = _model()
    method = MSLR(strategy="smooth", history=2)
    optimizers = _setup(method, model, lr=0.1)
    _epochs(method, optimizers, {"a": [0.5, 0.8], "b": [0.5, 0.25]}, 2)      # r_a = 0.8/0.65, r_b = 0.25/0.375
    lr = {"a": 0.1 * 0.8 / 0.65, "b": 0.1 * 0.25 / 0.375}
    g = torch.Generator().manual_seed(3)
    xs, y = {m: torch.randn(6, 4, generator=g) for m in ("a", "b")}, torch.tensor([0, 1, 2, 0, 1, 2])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    z = model.heads["a"](model.encoders["a"](xs["a"])) + model.heads["b"](model.encoders["b"](xs["b"]))
    hand = F.cross_entropy(z, y)
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(hand, list(model.parameters()))))
    logs = method.training_step(Batch(xs, y), make_step(epoch=2))
    assert float(logs["loss"]) == pytest.approx(hand.item())           # CE of the SUM of the logits
    for n, p in model.named_parameters():
        m = n.split(".")[1]
        torch.testing.assert_close(p.detach(), before[n] - lr[m] * grads[n])
    fused, per = method.predict(xs)
    za, zb = (model.heads[m](model.encoders[m](xs[m])) for m in ("a", "b"))
    torch.testing.assert_close(fused, F.softmax(za + zb, dim=-1))        # fusion "model": the training rule
    torch.testing.assert_close(per["a"], F.softmax(za, dim=-1))


def test_mean_aggregation_and_late_fusion_rules():
    model = _model()
    g = torch.Generator().manual_seed(4)
    xs, y = {m: torch.randn(5, 4, generator=g) for m in ("a", "b")}, torch.tensor([0, 1, 2, 0, 1])
    za, zb = (model.heads[m](model.encoders[m](xs[m])).detach() for m in ("a", "b"))
    mean = create_method("mslr", aggregation="mean")
    mean.setup(model, make_context(model.modalities))
    torch.testing.assert_close(mean.predict(xs)[0], F.softmax((za + zb) / 2, dim=-1))
    assert float(mean.training_step(Batch(xs, y), make_step())["loss"]) == pytest.approx(
        F.cross_entropy((za + zb) / 2, y).item())
    average = create_method("mslr", fusion="average")
    average.setup(model, make_context(model.modalities))
    fused, per = average.predict(xs)
    torch.testing.assert_close(fused, per["a"] / 2 + per["b"] / 2)


def test_invalid_settings_are_refused():
    with pytest.raises(MieInputError, match="strategy must be one of"):
        create_method("mslr", strategy="fast")
    with pytest.raises(MieInputError, match="history must be an integer >= 1"):
        create_method("mslr", history=0)
    with pytest.raises(MieInputError, match="initial_scale must be None or a mapping"):
        create_method("mslr", initial_scale={"a": -1.0})
    with pytest.raises(MieInputError, match="aggregation must be one of"):
        create_method("mslr", aggregation="max")
    with pytest.raises(MieInputError, match="fusion must be one of"):
        create_method("mslr", fusion="sum")                 # the old name of the aggregation
    model = _model()
    with pytest.raises(MieInputError, match="unknown modality"):
        create_method("mslr", initial_scale={"x": 2.0}).setup(model, make_context(model.modalities))
    one = LateFusionModel({"a": nn.Linear(2, 2)}, {"a": ClassifierHead(2, K, hidden=())})
    with pytest.raises(MieInputError, match="unimodal"):
        create_method("mslr").setup(one, make_context(["a"]))
