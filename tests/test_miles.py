"""MILES (mie.methods.miles) against the paper (Guerra-Manzanares & Shamout, IJCNN 2025, arXiv
2510.17394v1): Algorithm 1 transcribed here and driven with given validation metrics, the learning
rate the optimizer really trains each group with through the loop (and that this changes training),
the loss of Eq. 3 with both fusion heads, the refused settings and a CLI run.

The authors' code (github.com/nyuad-cai/MILES) could not be reached, so the reference is the
paper's own Algorithm 1, transcribed in ``_algorithm_1`` independently of the method's code."""
import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie
from conftest import TINY, make_arrays, make_context, make_step, setup_with_loop_optimizers, sgd_loop_optimizers
from mie.cli import main
from mie.errors import MieInputError
from mie.methods import Batch, create_method
from mie.methods.miles import MILES, miles_scales, utilization_rates
from mie.models import ClassifierHead, MultiHeadModel

K = 3


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """Register the method for these tests only (the lead registers it in mie.methods)."""
    monkeypatch.setitem(mie.methods.METHODS, "miles", (MILES, {}, "MILES"))


def _model(mods=("a", "b"), feature_fusion="concat"):
    torch.manual_seed(0)
    width = 3 * len(mods) if feature_fusion == "concat" else 3
    return MultiHeadModel({m: nn.Linear(4, 3) for m in mods}, {m: ClassifierHead(3, K, hidden=()) for m in mods},
                      ClassifierHead(width, K, hidden=()), feature_fusion)


def _metrics(fused, acc_a, acc_b):
    """The loop's validation metrics with fused and per-modality accuracies (macro F1 set apart)."""
    return {"accuracy": fused, "macro_f1": fused / 2, "loss": 0.0,
            "per_modality": {"a": {"accuracy": acc_a, "macro_f1": acc_a / 2, "loss": 0.0},
                             "b": {"accuracy": acc_b, "macro_f1": acc_b / 2, "loss": 0.0}}}


def _batch(seed, mods=("a", "b"), n=6):
    g = torch.Generator().manual_seed(seed)
    return Batch({m: torch.randn(n, 4, generator=g) for m in mods}, torch.arange(n) % K)


# Guerra-Manzanares & Shamout 2025, arXiv 2510.17394v1, Algorithm 1 (lines 1-24) with Eq. 4 and 5.
def _algorithm_1(history, tau, mu, alpha):
    """The learning rates (α_AB, α_A, α_B) each epoch 1..N+1 trains with, for validation metrics
    ``history`` [(M(ŷ_AB), M(ŷ_A), M(ŷ_B)) of epoch 1, …]."""
    alpha_ab = alpha_a = alpha_b = alpha                                    # line 1
    rates = [(alpha_ab, alpha_a, alpha_b)]
    for m_ab, m_a, m_b in history:                                          # lines 2-4
        u_a = (m_ab - m_b) / m_ab                                           # line 5, Eq. 4
        u_b = (m_ab - m_a) / m_ab                                           # line 6, Eq. 4
        delta_ab = abs(u_a - u_b)                                           # line 7, Eq. 5
        if delta_ab <= tau or (u_a < 0 and u_b < 0):                        # line 8
            alpha_a = alpha_ab                                              # line 9
            alpha_b = alpha_ab                                              # line 10
        elif u_a > 0 and u_b < 0:                                           # line 12
            alpha_a = mu * alpha_ab                                         # line 13
        elif u_a < 0 and u_b > 0:                                           # line 14
            alpha_b = mu * alpha_ab                                         # line 15
        elif u_a < u_b:                                                     # line 17
            alpha_b = mu * alpha_ab                                         # line 18
        else:
            alpha_a = mu * alpha_ab                                         # line 20
        rates.append((alpha_ab, alpha_a, alpha_b))
    return rates


def test_rates_follow_algorithm_1_over_random_metrics():
    """Parity with the paper's Algorithm 1: 300 epochs of random validation accuracies, every branch
    taken, the group learning rates the loop sets after each on_validation equal Algorithm 1's."""
    rng = np.random.default_rng(0)
    history = [tuple(float(v) for v in rng.choice(np.linspace(0.05, 1.0, 20), size=3)) for _ in range(300)]
    tau, mu, alpha = 0.2, 0.5, 0.1
    expected = _algorithm_1(history, tau, mu, alpha)
    model = _model()
    method = create_method("miles", tau=tau, mu=mu)
    optimizers = setup_with_loop_optimizers(method, model, lr=alpha, epochs=300)
    branches = set()
    for t, (m_ab, m_a, m_b) in enumerate(history):
        lrs = [g["lr"] for g in method.optimizer.param_groups]               # groups a, b, fused head
        assert lrs == pytest.approx([expected[t][1], expected[t][2], expected[t][0]])
        row = method.on_validation(t, _metrics(m_ab, m_a, m_b))
        optimizers.apply(1.0, method)
        u_a, u_b = (m_ab - m_b) / m_ab, (m_ab - m_a) / m_ab
        assert row["miles_u_a"] == pytest.approx(u_a) and row["miles_delta"] == pytest.approx(abs(u_a - u_b))
        assert row["miles_scale_a"] == pytest.approx(expected[t + 1][1] / alpha)
        branches.add("none" if abs(u_a - u_b) <= tau or (u_a < 0 and u_b < 0) else
                     "a>0>b" if u_a > 0 > u_b else "b>0>a" if u_b > 0 > u_a else "both>0")
    assert branches == {"none", "a>0>b", "b>0>a", "both>0"}
    # Algorithm 1 leaves the other modality's rate alone when it lowers one: both can be at μα
    assert any(e[1] == e[2] == mu * alpha for e in expected)


def test_rule_by_hand():
    assert utilization_rates(0.8, {"a": 0.7, "b": 0.5}) == pytest.approx({"a": 0.375, "b": 0.125})
    assert utilization_rates(0.0, {"a": 0.7, "b": 0.5}) is None
    one = {"a": 1.0, "b": 1.0}
    assert miles_scales(one, {"a": 0.5, "b": 0.25}, tau=0.25, mu=0.5) == one             # δ = τ: no action
    assert miles_scales(one, {"a": 0.5, "b": 0.25}, tau=0.24, mu=0.5) == {"a": 0.5, "b": 1.0}
    assert miles_scales(one, {"a": -0.5, "b": -0.1}, tau=0.0, mu=0.5) == one             # both < 0
    assert miles_scales(one, {"a": 0.0, "b": -0.5}, tau=0.2, mu=0.5) == {"a": 0.5, "b": 1.0}
    assert miles_scales(one, {"a": -0.5, "b": 0.0}, tau=0.2, mu=0.5) == {"a": 1.0, "b": 0.5}
    assert miles_scales({"a": 0.5, "b": 1.0}, {"a": 0.1, "b": 0.5}, tau=0.2, mu=0.25) == {"a": 0.5, "b": 0.25}
    assert miles_scales({"a": 0.5, "b": 1.0}, None, tau=0.2, mu=0.5) == one              # M(ŷ_AB) = 0


# (M(ŷ_AB), M(ŷ_A), M(ŷ_B)) per epoch and the scales (r_a, r_b) each epoch trains with (τ = 0.2, μ = 0.5)
SCRIPT = [(0.8, 0.7, 0.5),      # u = (0.375, 0.125), δ = 0.25 > τ, both > 0, u_a larger → a at μ
          (0.8, 0.62, 0.5),     # u = (0.375, 0.225), δ = 0.15 ≤ τ → both back to 1
          (0.5, 0.3, 0.6),      # u = (−0.2, 0.4), δ = 0.6 → b at μ
          (0.3, 0.6, 0.4),      # u = (−0.33, −1.0), δ = 0.67 > τ but both < 0 → both back to 1
          (0.9, 0.8, 0.8)]
SCALES = [(1.0, 1.0), (0.5, 1.0), (1.0, 1.0), (1.0, 0.5), (1.0, 1.0)]
CONFIG = {"train": {"epochs": 5, "batch_size": 16, "optimizer": "sgd", "lr": 0.05, "momentum": 0.0,
                    "weight_decay": 0.0},
          "model": {"dim": 8, "head_hidden": [8]}}


def _scripted_run(monkeypatch, **params):
    """A real run whose rule reads the SCRIPT's metrics instead of the validation pass; returns the
    learning rate of each group at every step, and the history rows."""
    seen = []

    class Scripted(MILES):
        def training_step(self, batch, step):
            seen.append((step.epoch, {g.get("name"): g["lr"] for g in self.optimizer.param_groups}))
            return super().training_step(batch, step)

        def on_validation(self, epoch, metrics):
            return super().on_validation(epoch, _metrics(*SCRIPT[epoch]))

    monkeypatch.setitem(mie.methods.METHODS, "miles", (Scripted, {}, "MILES"))
    x, y = make_arrays(n=90)
    rows = []
    mie.fit(mie.MultimodalArrays(x, y), "miles", config=CONFIG, seed=0, progress=False,
            callbacks=[lambda e, row: rows.append(row)], **params)
    return seen, rows


def test_rate_changes_exactly_when_the_gap_exceeds_tau_through_the_loop(monkeypatch):
    seen, rows = _scripted_run(monkeypatch)
    assert {e for e, _ in seen} == set(range(5))
    for epoch, lrs in seen:                                  # the optimizer's own learning rates, every step
        r_a, r_b = SCALES[epoch]
        assert lrs == pytest.approx({"a": 0.05 * r_a, "b": 0.05 * r_b, None: 0.05})
    assert [(r["miles_scale_a"], r["miles_scale_b"]) for r in rows] == SCALES[1:] + [(1.0, 1.0)]
    assert rows[0]["miles_delta"] == pytest.approx(0.25) and rows[3]["miles_u_b"] == pytest.approx(-1.0)


def test_the_rate_change_changes_training(monkeypatch):
    _, acting = _scripted_run(monkeypatch)
    _, idle = _scripted_run(monkeypatch, mu=1.0)                 # same runs, the rule never lowers a rate
    assert acting[0]["loss"] == idle[0]["loss"]                   # epoch 1: both at the global rate
    assert acting[1]["loss"] != idle[1]["loss"]                   # epoch 2: a at μ·α in one run only
    assert acting[-1]["val_accuracy"] != idle[-1]["val_accuracy"] or acting[-1]["loss"] != idle[-1]["loss"]


@pytest.mark.parametrize("feature_fusion", ["concat", "sum"])
def test_loss_of_eq_3_and_each_group_steps_at_its_rate(feature_fusion):
    """L = CE(g(fuse(f_a, f_b))) + γ Σ_m CE(h_m(f_m)); after a lowered rate for a, every parameter
    moves by −α·r·∂L/∂θ with r = μ for a's encoder and head, 1 for b's and for the fusion head."""
    model = _model(feature_fusion=feature_fusion)
    method = create_method("miles", gamma=0.7, mu=0.25, feature_fusion=feature_fusion)
    optimizers = setup_with_loop_optimizers(method, model, lr=0.1)
    method.on_validation(0, _metrics(0.8, 0.7, 0.5))            # a dominant
    optimizers.apply(1.0, method)
    xs, y = _batch(seed=1)
    f = {m: model.encoders[m](xs[m]) for m in ("a", "b")}
    joint = torch.cat([f["a"], f["b"]], dim=-1) if feature_fusion == "concat" else f["a"] + f["b"]
    hand = F.cross_entropy(model.fused_head(joint), y) + 0.7 * sum(F.cross_entropy(model.heads[m](f[m]), y)
                                                                   for m in ("a", "b"))
    names = [n for n, _ in model.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(hand, list(model.parameters()))))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logs = method.training_step(Batch(xs, y), make_step(epoch=1))
    assert float(logs["loss"]) == pytest.approx(hand.item())
    for n, p in model.named_parameters():
        rate = 0.1 * (0.25 if n.split(".")[1] == "a" and not n.startswith("fused_head") else 1.0)
        torch.testing.assert_close(p.detach(), before[n] - rate * grads[n])
    fused, per = method.predict(xs)                                  # with the weights after the step
    with torch.no_grad():
        f = {m: model.encoders[m](xs[m]) for m in ("a", "b")}
        joint = torch.cat([f["a"], f["b"]], dim=-1) if feature_fusion == "concat" else f["a"] + f["b"]
        torch.testing.assert_close(fused, F.softmax(model.fused_head(joint), dim=-1))
        torch.testing.assert_close(per["b"], F.softmax(model.heads["b"](f["b"]), dim=-1))


def test_train_split_and_macro_f1_metric():
    model = _model()
    asked = []
    method = create_method("miles", split="train", metric="macro_f1")
    optimizers = sgd_loop_optimizers()
    method.setup(model, make_context(model.modalities, make_optimizer=optimizers.make,
                                     evaluate=lambda split: asked.append(split) or _metrics(0.8, 0.7, 0.5)))
    row = method.on_validation(0, _metrics(0.5, 0.3, 0.6))       # the validation metrics are not read
    assert asked == ["train"]
    assert row["miles_u_a"] == pytest.approx(0.375) and method.lr_scale("a") == 0.5   # F1 = acc/2: same u
    assert method.lr_scale(None) == 1.0


def test_average_fusion_and_undefined_utilisation():
    model = _model()
    method = create_method("miles", fusion="average")
    setup_with_loop_optimizers(method, model)
    xs, _ = _batch(seed=2)
    fused, per = method.predict(xs)
    torch.testing.assert_close(fused, (per["a"] + per["b"]) / 2)
    method.scales = {"a": 0.5, "b": 1.0}
    row = method.on_validation(0, _metrics(0.0, 0.3, 0.6))       # M(ŷ_AB) = 0: lines 8-10
    assert method.scales == {"a": 1.0, "b": 1.0} and math.isnan(row["miles_delta"])


def test_notices():
    def notices(epochs, **params):
        method = create_method("miles", **params)
        method.setup(_model(), make_context(["a", "b"], epochs_per_modality=epochs))
        return method.notices()
    assert notices(2) == []
    assert len(notices(1)) == 1 and "epoch 2" in notices(1)[0]
    assert len(notices(5, mu=1.0)) == 1 and "mu=1" in notices(5, mu=1.0)[0]


def test_state_survives_a_restart():
    model = _model()
    method = create_method("miles")
    setup_with_loop_optimizers(method, model)
    method.on_validation(0, _metrics(0.5, 0.3, 0.6))
    other = create_method("miles")
    setup_with_loop_optimizers(other, _model())
    other.load_state_dict(method.state_dict())
    assert other.scales == method.scales == {"a": 1.0, "b": 0.5}


def test_invalid_settings_are_refused():
    for params, message in [({"tau": 1.5}, "tau must be a number in"), ({"mu": 0.0}, "mu must be a number in"),
                            ({"mu": 2.0}, "mu must be a number in"), ({"gamma": -1.0}, "gamma must be a number"),
                            ({"feature_fusion": "mean"}, "feature_fusion must be one of"),
                            ({"split": "test"}, "split must be one of"), ({"metric": "loss"}, "metric must be one of")]:
        with pytest.raises(MieInputError, match=message):
            create_method("miles", **params)
    with pytest.raises(MieInputError, match="exactly 2 modalities, got 3"):
        create_method("miles").setup(_model(("a", "b", "c")), make_context(["a", "b", "c"]))
    with pytest.raises(MieInputError, match="unimodal"):
        create_method("miles").setup(_model(("a",)), make_context(["a"]))


def test_three_modalities_are_refused_through_the_loop():
    x, y = make_arrays(n=60, shapes={"a": (6,), "b": (4,), "c": (5,)})
    with pytest.raises(MieInputError, match="exactly 2 modalities"):
        mie.fit(mie.MultimodalArrays(x, y), "miles", config=CONFIG, epochs=1, progress=False)


@pytest.mark.parametrize("variant", [{}, {"feature_fusion": "sum"}])
def test_trains_through_the_cli(monkeypatch, capsys, npz_file, tmp_path, variant):
    monkeypatch.setitem(mie.methods.METHODS, "miles", (MILES, variant, "MILES"))
    out = tmp_path / "run"
    code = main(["train", "--data", str(npz_file), "--method", "miles", "--out", str(out), *TINY,
                 "method.tau=0.0"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "miles" and set(metrics["test"]["per_modality"]) == {"a", "b"}
    assert metrics["method_params"]["tau"] == 0.0 and 0 <= metrics["test"]["accuracy"] <= 1
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert len(rows) == 2 and {"miles_delta", "miles_u_a", "miles_scale_b", "loss_fused", "loss_a"} <= set(rows[0])
