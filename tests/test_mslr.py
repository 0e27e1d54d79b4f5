"""MSLR (mie.methods.mslr) against hand computations and against a transcription of the only public
MSLR code that produced published numbers (AGM's baseline, lihong2303/AGM_ICCV2023): the
per-modality learning-rate rules on given validation accuracies driving ``lr_scale`` through
``on_validation``, that each modality's parameter group really steps with its own rate, the additive
(sum) aggregation and the inference rules, m >= 3, the notices, and the refused settings.

No code from the paper's authors was found and only the abstract of the paper was reachable; the
abstract's stated rules (additive late fusion = sum of unimodal predictions, one learning rate per
modality) are checked in ``test_each_modality_steps_with_its_own_rate_on_the_summed_logits``."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_context, make_step, setup_with_loop_optimizers
from mie.errors import MieInputError
from mie.methods import Batch, create_method
from mie.methods.mslr import MSLR, accuracy_ratio, mslr_update
from mie.models import ClassifierHead, LateFusionModel

K = 3


def _model(mods=("a", "b")):
    torch.manual_seed(0)
    return LateFusionModel({m: nn.Linear(4, 3) for m in mods}, {m: ClassifierHead(3, K, hidden=()) for m in mods})


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


def _batch(seed, mods=("a", "b"), n=6):
    g = torch.Generator().manual_seed(seed)
    return Batch({m: torch.randn(n, 4, generator=g) for m in mods}, torch.arange(n) % K)


def test_ratio_and_update_rules_by_hand():
    assert accuracy_ratio(0.4, [0.5, 0.6, 0.4]) == pytest.approx(0.4 / 0.5)
    assert accuracy_ratio(0.9, [0.0, 0.0]) == 1.0                 # a zero mean leaves the rate alone
    # dynamic: fill the memory (rate unchanged), then s · a(t) / mean(the H accuracies before t)
    assert mslr_update("dynamic", 2.0, 2.0, [0.5, 0.6], 0.4, epoch=1, history=3) == (2.0, [0.5, 0.6, 0.4])
    r, q = mslr_update("dynamic", 2.0, 2.0, [0.5, 0.6, 0.4], 0.8, epoch=3, history=3)
    assert r == pytest.approx(2.0 * 0.8 / 0.5) and q == [0.6, 0.4, 0.8]
    r, q = mslr_update("dynamic", 3.2, 2.0, [0.6, 0.4, 0.8], 0.3, epoch=4, history=3)
    assert r == pytest.approx(2.0 * 0.3 / 0.6)                    # s_m × ratio, NOT r(t) × ratio
    # cumulative (the previous default): every H epochs, window including a(t), compounding
    assert mslr_update("cumulative", 2.0, 2.0, [0.5, 0.6], 0.4, epoch=2, history=3)[0] == pytest.approx(2.0 * 0.8)
    assert mslr_update("cumulative", 2.0, 2.0, [0.5, 0.6], 0.4, epoch=3, history=3)[0] == 2.0
    assert mslr_update("keep", 2.0, 2.0, [], 0.4, epoch=2, history=3) == (2.0, [])


# lihong2303/AGM_ICCV2023 run/CREMAD_main.py line 671  (the memory and the ratio, after each validation)
# lihong2303/AGM_ICCV2023 run/CREMAD_main.py line 194  (coefficient = init × ratio on the modality's gradients)
def _agm_mslr_coefficients(accs, init, epochs):
    """AGM's MSLR, transcribed: the coefficient each modality trains with in epochs 1 … ``epochs``
    (1-based, as in AGM's loop) for validation accuracies accs {m: [a(1), a(2), …]}."""
    ratio = {m: 1.0 for m in accs}
    memory = {m: [] for m in accs}
    coeffs = []
    for epoch in range(1, epochs + 1):
        coeffs.append({m: init[m] * ratio[m] for m in accs})           # train(...) with the current ratios
        for m in accs:                                                  # then validation → adjust
            a = accs[m][epoch - 1]
            if len(memory[m]) < 5:
                memory[m].append(a)
            else:
                ratio[m] = a / np.mean(memory[m])
                memory[m] = memory[m][1:]
                memory[m].append(a)
                assert len(memory[m]) == 5
    return coeffs


def test_dynamic_rule_matches_agm_released_code_through_real_steps():
    """Parity: eight epochs of given validation accuracies, then one real training step per epoch
    with plain SGD (where AGM's gradient coefficient and our learning-rate scale give the same
    update): every parameter moves by −η · coeff_m · ∂L/∂θ with AGM's coeff_m of that epoch."""
    accs = {"a": [0.30, 0.40, 0.45, 0.50, 0.52, 0.60, 0.55, 0.70],
            "b": [0.50, 0.50, 0.55, 0.60, 0.58, 0.40, 0.62, 0.61]}
    init = {"a": 0.9, "b": 1.1}                                         # AGM's CREMA-D starting coefficients
    expected = _agm_mslr_coefficients(accs, init, 8)
    model = _model()
    method = create_method("mslr", initial_scale=init)                  # the defaults: dynamic, H = 5, sum
    optimizers = setup_with_loop_optimizers(method, model, lr=0.1, epochs=8)
    for t in range(8):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        xs, y = batch = _batch(seed=t)
        z = sum(model.heads[m](model.encoders[m](xs[m])) for m in ("a", "b"))
        names = [n for n, _ in model.named_parameters()]
        grads = dict(zip(names, torch.autograd.grad(F.cross_entropy(z, y), list(model.parameters()))))
        method.training_step(batch, make_step(epoch=t))
        for n, p in model.named_parameters():
            m = n.split(".")[1]
            torch.testing.assert_close(p.detach(), before[n] - 0.1 * expected[t][m] * grads[n])
        method.on_validation(t, _metrics(accs, t))
        optimizers.apply(1.0, method)
    assert expected[6]["a"] == pytest.approx(0.9 * 0.60 / np.mean(accs["a"][:5]))    # the first change: epoch 7
    assert expected[5] == init


def test_dynamic_learning_rates_and_logs_from_given_validation_accuracies():
    # H = 2: memory filled after epochs 0, 1; rates change after every epoch from epoch 2 on.
    accs = {"a": [0.5, 0.6, 0.4, 0.8, 0.9], "b": [0.2, 0.3, 0.4, 0.4, 0.2], "c": [0.4, 0.4, 0.4, 0.4, 0.4]}
    model = _model(("a", "b", "c"))
    method = create_method("mslr", history=2, initial_scale={"a": 2.0})
    optimizers = setup_with_loop_optimizers(method, model, lr=0.1)
    assert [g["name"] for g in method.optimizer.param_groups] == ["a", "b", "c"]
    assert [g["lr"] for g in method.optimizer.param_groups] == pytest.approx([0.2, 0.1, 0.1])   # η · s_m
    rows = _epochs(method, optimizers, accs, 5)
    expected_a = [0.2, 0.2, 0.2 * 0.4 / 0.55, 0.2 * 0.8 / 0.5, 0.2 * 0.9 / 0.6]
    expected_b = [0.1, 0.1, 0.1 * 0.4 / 0.25, 0.1 * 0.4 / 0.35, 0.1 * 0.2 / 0.4]
    assert [row["mslr_lr_a"] for row in rows] == pytest.approx(expected_a)
    assert [row["mslr_lr_b"] for row in rows] == pytest.approx(expected_b)
    assert [row["mslr_lr_c"] for row in rows] == pytest.approx([0.1] * 5)
    assert [g["lr"] for g in method.optimizer.param_groups] == pytest.approx([expected_a[-1], expected_b[-1], 0.1])
    assert method.lr_scale("a") == pytest.approx(expected_a[-1] / 0.1) and method.lr_scale(None) == 1.0
    assert rows[1]["mslr_ratio_a"] == 1.0
    assert rows[3]["mslr_ratio_a"] == pytest.approx((0.8 / 0.5) / (0.4 / 0.55))
    assert rows[4]["mslr_val_acc_a"] == 0.9


def test_logged_rate_includes_the_schedule_factor():
    accs = {"a": [0.5, 1.0], "b": [0.5, 0.5]}
    model = _model()
    method = create_method("mslr", history=1)
    optimizers = setup_with_loop_optimizers(method, model, lr=0.1)
    rows = _epochs(method, optimizers, accs, 2, factor=0.5)
    assert rows[1]["mslr_lr_a"] == pytest.approx(0.1 * 0.5 * 1.0 / 0.5)       # η · schedule · r_a(2)
    assert method.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * 2.0)


def test_cumulative_rule_is_the_previous_default():
    # H = 3: the rate changes after epochs 2 and 5 only, by a(t) / mean(a(t-2..t)), compounding.
    accs = {"a": [0.5, 0.6, 0.4, 0.8, 0.9, 0.3], "b": [0.2, 0.3, 0.4, 0.4, 0.4, 0.4]}
    model = _model()
    method = create_method("mslr", strategy="cumulative", history=3, initial_scale={"a": 2.0})
    optimizers = setup_with_loop_optimizers(method, model, lr=0.1)
    rows = _epochs(method, optimizers, accs, 6)
    expected_a = [0.2, 0.2, 0.2 * 0.4 / 0.5, 0.16, 0.16, 0.16 * 0.3 / ((0.8 + 0.9 + 0.3) / 3)]
    expected_b = [0.1, 0.1, 0.1 * 0.4 / 0.3, 0.4 / 3, 0.4 / 3, 0.4 / 3 * 0.4 / 0.4]
    assert [row["mslr_lr_a"] for row in rows] == pytest.approx(expected_a)
    assert [row["mslr_lr_b"] for row in rows] == pytest.approx(expected_b)
    assert rows[2]["mslr_ratio_a"] == pytest.approx(0.8) and rows[1]["mslr_ratio_a"] == 1.0


def test_keep_never_changes_the_rates_nor_reads_accuracies():
    model = _model()
    method = create_method("mslr", strategy="keep", initial_scale={"b": 3.0})
    optimizers = setup_with_loop_optimizers(method, model, lr=0.1)
    rows = [method.on_validation(t, {}) for t in range(3)]           # no metrics needed
    optimizers.apply(1.0, method)
    assert [row["mslr_lr_b"] for row in rows] == pytest.approx([0.3] * 3) and "mslr_ratio_a" not in rows[0]
    assert [g["lr"] for g in method.optimizer.param_groups] == pytest.approx([0.1, 0.3])
    assert method.notices() == []


def test_each_modality_steps_with_its_own_rate_on_the_summed_logits():
    # Yao & Mihalcea 2022, abstract: "the final prediction can be formulated as the sum of unimodal
    # predictions", one learning rate per modality.
    model = _model()
    method = MSLR(history=1)
    optimizers = setup_with_loop_optimizers(method, model, lr=0.1)
    _epochs(method, optimizers, {"a": [0.5, 0.8], "b": [0.5, 0.25]}, 2)      # r_a = 0.8/0.5, r_b = 0.25/0.5
    lr = {"a": 0.1 * 0.8 / 0.5, "b": 0.1 * 0.25 / 0.5}
    xs, y = _batch(seed=3)
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
    xs, y = _batch(seed=4, n=5)
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


def test_notices_when_the_rule_cannot_act_within_the_budget():
    def notices(epochs, **params):
        method = create_method("mslr", **params)
        method.setup(_model(), make_context(["a", "b"], epochs_per_modality=epochs))
        return method.notices()
    assert notices(7) == []                                           # dynamic, H = 5: first change in epoch 7
    assert len(notices(6)) == 1 and "from epoch 7 on" in notices(6)[0] and "6 epochs" in notices(6)[0]
    assert notices(6, strategy="cumulative") == [] and len(notices(5, strategy="cumulative")) == 1
    assert notices(2, strategy="keep") == []


def test_state_survives_a_restart():
    model = _model()
    method = create_method("mslr", history=2)
    optimizers = setup_with_loop_optimizers(method, model)
    _epochs(method, optimizers, {"a": [0.5, 0.6, 0.7], "b": [0.4, 0.4, 0.2]}, 3)
    other = create_method("mslr", history=2)
    setup_with_loop_optimizers(other, _model())
    other.load_state_dict(method.state_dict())
    assert other.scales == method.scales and other.memory == method.memory == {"a": [0.6, 0.7], "b": [0.4, 0.2]}


def test_invalid_settings_are_refused():
    with pytest.raises(MieInputError, match="strategy must be one of"):
        create_method("mslr", strategy="smooth")             # ours, removed: its name suggested the paper's rule
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
