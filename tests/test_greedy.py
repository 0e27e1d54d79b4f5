"""Greedy (mie.methods.greedy) against hand computations: the conditional learning speed from the
gradients, the conditional utilisation rate from the loop's metrics (fused ŷ, per modality the
uni-modal DNN), the fusion rules, the re-balancing trigger at the threshold α, the re-balancing
step touching only the slower branch, the warm-up, and three modalities through the real loop
(resume: tests/test_resume.py)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie
import mie.methods
from conftest import make_arrays, make_context, make_step
from mie.errors import MieInputError
from mie.methods import Batch, create_method
from mie.methods.greedy import (Greedy, GreedyModel, conditional_speeds, rebalance_target, speed_imbalance,
                                utilization_rates)
from mie.metrics import classification_metrics
from mie.models import ClassifierHead

K, D = 3, 3
IN = {"a": 4, "b": 5}


def _model(mods=("a", "b"), seed=0):
    torch.manual_seed(seed)
    encoders = {m: nn.Linear(IN.get(m, 4), D) for m in mods}
    heads = {m: ClassifierHead(D, K, hidden=()) for m in mods}
    return GreedyModel(encoders, heads, D, ratio=4).double()


def _batch(mods=("a", "b"), n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    return Batch({m: torch.randn(n, IN.get(m, 4), generator=g, dtype=torch.float64) for m in mods}, y)


def _ctx(train=(), lr=0.0, evaluate=None):
    return make_context(["a", "b"], lr=lr, train_batches=train, evaluate=evaluate, epochs_per_modality=3)


def _method(model, ctx, epoch=0, **kw):
    method = Greedy(**kw)
    method.setup(model, ctx)
    method.start_epoch(epoch)
    return method


def _metrics(method, batch):
    """The loop's metrics dict of ``method``'s predictions on ``batch``."""
    fused, per = method.predict(batch.inputs)
    return classification_metrics(fused.numpy(), {m: p.numpy() for m, p in per.items()}, batch.labels.numpy())


# ---- the model written out by hand ------------------------------------------------------------
def _hand_parts(model, xs, squeeze_override=None):
    """u_k, E_k and ŷ_k from the weights, without calling the model's modules."""
    mods = model.modalities
    u = {m: xs[m] @ model.encoders[m].weight.T + model.encoders[m].bias for m in mods}
    s_in = {m: (squeeze_override or {}).get(m, u[m]) for m in mods}
    S = torch.cat([s_in[m] for m in mods], dim=1)
    Z = torch.relu(S @ model.squeeze.weight.T + model.squeeze.bias)
    E = {m: torch.sigmoid(Z @ model.excite[m].weight.T + model.excite[m].bias) for m in mods}
    lin = {m: model.heads[m].net[0] for m in mods}
    y_hat = {m: (u[m] * E[m]) @ lin[m].weight.T + lin[m].bias for m in mods}
    return u, E, y_hat


def _hand_mu(model, prefixes):
    g = w = 0.0
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            w += float((p.detach() ** 2).sum())
            g += float((p.grad ** 2).sum())
    return g / w


def test_conditional_learning_speed_accumulates_gradient_ratios_by_hand():
    model = _model()
    method = _method(model, _ctx(), alpha=1e9, warmup_epochs=0)      # lr 0: weights fixed, grads visible
    mu_main = {"a": [], "b": []}
    mu_bypass = {"a": [], "b": []}
    batch_means = []
    for seed in (1, 2):
        xs, y = _batch(seed=seed)
        logs = method.training_step(Batch(xs, y), make_step(0, seed - 1, 2))
        _, E, y_hat = _hand_parts(model, xs)
        loss = sum(F.cross_entropy(y_hat[m], y) for m in ("a", "b"))
        assert logs["loss"] == pytest.approx(loss.item())                # L = Σ_k CE(ŷ_k, y)
        batch_means.append(torch.stack([E["a"].mean(0), E["b"].mean(0)]).detach())
        for m in ("a", "b"):
            mu_main[m].append(_hand_mu(model, (f"encoders.{m}.", f"heads.{m}.")))
            mu_bypass[m].append(_hand_mu(model, ("squeeze.", f"excite.{m}.")))
    for m in ("a", "b"):
        assert method.m_main[m] == pytest.approx(sum(mu_main[m]), rel=1e-12)
        assert method.m_bypass[m] == pytest.approx(sum(mu_bypass[m]), rel=1e-12)
    s = {m: math.log10(sum(mu_bypass[m]) / sum(mu_main[m])) for m in ("a", "b")}
    assert method.speeds() == {"a": pytest.approx(s["a"]), "b": pytest.approx(s["b"])}
    assert logs["greedy_d_speed"] == pytest.approx(s["a"] - s["b"])      # d = s(b|a) − s(a|b)
    # the formula's distinctions are visible on this data: last step only ≠ cumulative, a ≠ b
    last = math.log10(mu_bypass["a"][-1] / mu_main["a"][-1])
    assert abs(last - s["a"]) > 1e-3
    assert abs(s["a"] - s["b"]) > 1e-3
    # Ē_k: the running mean of the batch-mean excitations of the normal steps
    torch.testing.assert_close(model.excite_mean, (batch_means[0] + batch_means[1]) / 2)
    assert model.excite_count.item() == 2


def test_rebalance_decision_at_the_threshold_and_its_direction():
    assert conditional_speeds({"a": 10.0, "b": 1.0}, {"a": 1.0, "b": 10.0}) == {"a": 1.0, "b": -1.0}
    assert speed_imbalance({"a": 0.5, "b": 0.25}) == 0.25               # s(b|a) − s(a|b)
    assert speed_imbalance({"a": 0.25, "b": 0.5}) == -0.25
    assert rebalance_target({"a": 0.5, "b": 0.25}, alpha=0.25) is None  # |d| = α: no re-balancing
    assert rebalance_target({"a": 0.5, "b": 0.25}, alpha=0.2499) == "a"  # d > α: m_0 is slower
    assert rebalance_target({"a": 0.25, "b": 0.5}, alpha=0.2499) == "b"  # d < −α: m_1 is slower
    assert rebalance_target({"a": -0.25, "b": -0.5}, alpha=0.0) == "a"
    # three modalities: the branch that learns most from the others, when the spread exceeds α
    assert rebalance_target({"a": 0.0, "b": 1.0, "c": 0.5}, alpha=0.9) == "b"
    assert rebalance_target({"a": 0.0, "b": 1.0, "c": 0.5}, alpha=1.0) is None
    assert speed_imbalance({"a": 0.0, "b": 1.0, "c": 0.5}) == 1.0
    assert rebalance_target({"a": math.nan, "b": 0.0}, alpha=0.0) is None


def test_utilization_rate_from_accuracies_and_from_the_unimodal_dnn():
    u = utilization_rates(0.8, {"a": 0.6, "b": 0.78})
    assert u == {"a": pytest.approx(0.25), "b": pytest.approx(0.025)}  # u(b|a), u(a|b)
    assert math.isnan(utilization_rates(0.0, {"a": 0.0})["a"])

    model = _model()
    train = [_batch(seed=3, n=10), _batch(seed=4, n=7)]
    val = _batch(seed=5, n=30)
    method = _method(model, _ctx(train=train), warmup_epochs=0)
    assert set(method.end_epoch(0)) == {"greedy_speed_b_given_a", "greedy_speed_a_given_b"}
    # ū: mean training feature of each modality over all 17 samples
    for i, m in enumerate(("a", "b")):
        feats = torch.cat([xs[m] @ model.encoders[m].weight.T + model.encoders[m].bias for xs, _ in train])
        torch.testing.assert_close(model.squeeze_mean[i], feats.mean(0))
    xs, y = val
    mean = {m: model.squeeze_mean[i].double().expand(len(y), -1) for i, m in enumerate(("a", "b"))}
    _, _, full = _hand_parts(model, xs)
    _, _, cut_a = _hand_parts(model, xs, {"b": mean["b"]})              # branch a, b's squeeze → ū_b
    _, _, cut_b = _hand_parts(model, xs, {"a": mean["a"]})
    feats = model.features(xs)
    torch.testing.assert_close(model.cut_logits(feats, "a"), cut_a["a"])
    torch.testing.assert_close(model.cut_logits(feats, "b"), cut_b["b"])
    torch.testing.assert_close(model.forward_modality("a", xs["a"]), cut_a["a"])   # the uni-modal DNN f'_a
    _, _, zero_cut = _hand_parts(model, xs, {"b": torch.zeros_like(mean["b"])})
    assert (zero_cut["a"] - cut_a["a"]).abs().max() > 1e-3              # the mean matters

    acc = lambda z: (z.argmax(1) == y).double().mean().item()
    a_f = acc((full["a"] + full["b"]) / 2)
    a_u = {"a": acc(cut_a["a"]), "b": acc(cut_b["b"])}
    metrics = _metrics(method, val)                                      # what the loop validates
    assert metrics["accuracy"] == pytest.approx(a_f)
    assert metrics["per_modality"]["a"]["accuracy"] == pytest.approx(a_u["a"])
    assert metrics["per_modality"]["b"]["accuracy"] == pytest.approx(a_u["b"])
    logs = method.on_validation(0, metrics)
    assert logs["greedy_util_b_given_a"] == pytest.approx((a_f - a_u["a"]) / a_f)
    assert logs["greedy_util_a_given_b"] == pytest.approx((a_f - a_u["b"]) / a_f)
    assert logs["greedy_d_util"] == pytest.approx((a_u["b"] - a_u["a"]) / a_f)
    # predictions: fused = softmax of the mean branch logits, per modality = the uni-modal DNN
    fused, per = method.predict(xs)
    torch.testing.assert_close(fused, F.softmax((full["a"] + full["b"]) / 2, dim=-1).float())
    torch.testing.assert_close(per["a"], F.softmax(cut_a["a"], dim=-1).float())
    # "average" / "weight" fuse the BRANCH predictions softmax(ŷ_k), not the cut ones
    pa, pb = F.softmax(full["a"], dim=-1).float(), F.softmax(full["b"], dim=-1).float()
    method.fusion = "average"
    torch.testing.assert_close(method.predict(xs)[0], (pa + pb) / 2)
    method.fusion = "weight"
    ha, hb = (-(p * p.log()).sum(1) for p in (pa, pb))
    wa = (torch.exp(-ha) / (torch.exp(-ha) + torch.exp(-hb)))[:, None]
    torch.testing.assert_close(method.predict(xs)[0], wa * pa + (1 - wa) * pb)


def test_utilization_on_train_reads_the_loops_train_metrics_and_none_measures_nothing():
    model = _model()
    asked = []
    train_metrics = {"accuracy": 0.8, "per_modality": {"a": {"accuracy": 0.6}, "b": {"accuracy": 0.78}}}
    val_metrics = {"accuracy": 0.5, "per_modality": {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.5}}}

    def evaluate(split):
        asked.append(split)
        return train_metrics
    method = _method(model, _ctx(evaluate=evaluate), utilization="train")
    logs = method.on_validation(0, val_metrics)
    assert asked == ["train"]
    assert logs == {"greedy_util_b_given_a": pytest.approx(0.25), "greedy_util_a_given_b": pytest.approx(0.025),
                    "greedy_d_util": pytest.approx(0.25 - 0.025)}      # u(b|a) − u(a|b)
    val = _method(model, _ctx(), utilization="val").on_validation(0, train_metrics)   # no evaluation asked
    assert val["greedy_util_b_given_a"] == pytest.approx(0.25)
    assert _method(model, _ctx(), utilization=None).on_validation(0, val_metrics) == {}


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def test_rebalancing_steps_train_only_the_slower_branch_for_window_steps():
    model = _model()
    method = _method(model, _ctx(lr=0.1), alpha=0.0, window=2, warmup_epochs=0)
    xs, y = _batch(seed=1)
    _, E, _ = _hand_parts(model, xs)
    logs = method.training_step(Batch(xs, y), make_step(0, 0, 4))        # normal step, then the trigger
    s = {m: math.log10(method.m_bypass[m] / method.m_main[m]) for m in ("a", "b")}
    k = max(s, key=s.get)                                                # the slower modality
    assert method.rebalance_modality == k and method.rebalance_left == 2
    assert logs["greedy_rebalancing"] == 0.0
    e_bar = E[k].mean(0).detach()
    torch.testing.assert_close(model.excite_mean[model.index(k)], e_bar)

    main_before = dict(method.m_main)
    for step in range(2):                                                # exactly Q = 2 re-balancing steps
        xs2, y2 = _batch(seed=10 + step)
        before = _snapshot(model)
        lin = model.heads[k].net[0]
        u = xs2[k] @ model.encoders[k].weight.T + model.encoders[k].bias
        hand = F.cross_entropy((u * model.excite_mean[model.index(k)].double()) @ lin.weight.T + lin.bias, y2)
        logs = method.training_step(Batch(xs2, y2), make_step(0, 1 + step, 4))
        assert logs["greedy_rebalancing"] == 1.0 and logs[f"greedy_rebalance_{k}"] == 1.0
        assert logs["greedy_rebalance_loss"] == pytest.approx(hand.item())
        changed = _changed(model, before)
        assert changed == {f"encoders.{k}.weight", f"encoders.{k}.bias", f"heads.{k}.net.0.weight",
                           f"heads.{k}.net.0.bias"}                      # the slower branch only
        assert method.m_main == main_before                             # no speed update meanwhile
    before = _snapshot(model)
    logs = method.training_step(_batch(seed=20), make_step(0, 3, 4))     # back to a normal step
    assert logs["greedy_rebalancing"] == 0.0
    assert _changed(model, before) == set(before)
    assert method.m_main != main_before


def test_no_rebalancing_during_warmup_nor_below_the_threshold():
    model = _model()
    method = _method(model, _ctx(lr=0.05), alpha=0.0, window=3, warmup_epochs=1)
    for seed in range(3):
        assert method.training_step(_batch(seed=seed), make_step(0, seed, 3))["greedy_rebalancing"] == 0.0
    assert method.rebalance_left == 0
    method.start_epoch(1)
    method.training_step(_batch(seed=5), make_step(1, 0, 3))
    assert method.rebalance_left == 3
    quiet = _method(_model(), _ctx(lr=0.05), alpha=1e6, warmup_epochs=0)
    for seed in range(3):
        quiet.training_step(_batch(seed=seed), make_step(0, seed, 3))
    assert quiet.rebalance_left == 0 and quiet.rebalance_modality is None


def test_invalid_settings_and_one_modality_are_refused():
    with pytest.raises(MieInputError, match="alpha must be a number >= 0"):
        create_method("greedy", alpha=-1)
    with pytest.raises(MieInputError, match="window must be an integer >= 0"):
        create_method("greedy", window=1.5)
    with pytest.raises(MieInputError, match="fusion must be one of 'model', 'average', 'weight'"):
        create_method("greedy", fusion="concat")
    with pytest.raises(MieInputError, match="utilization must be one of"):
        create_method("greedy", utilization="test")
    with pytest.raises(MieInputError, match="unimodal"):
        Greedy().setup(_model(mods=("a",)), _ctx())


CONFIG = {"train": {"epochs": 3, "batch_size": 16}, "model": {"dim": 8, "head_hidden": [8]}}



def test_three_modalities_run_through_the_loop(monkeypatch):
    monkeypatch.setitem(mie.methods.METHODS, "greedy", (Greedy, {}, "Greedy"))
    x, y = make_arrays(n=60, shapes={"a": (6,), "b": (4,), "c": (5,)})
    rows = []
    result = mie.fit(mie.MultimodalArrays(x, y), "greedy", config=CONFIG, epochs=2, seed=0, progress=False,
                     callbacks=[lambda e, row: rows.append(row)], alpha=0.0, warmup_epochs=0)
    assert set(result["test"]["per_modality"]) == {"a", "b", "c"}
    assert {f"greedy_speed_others_given_{m}" for m in "abc"} <= set(rows[-1])
    assert rows[-1]["greedy_rebalancing"] > 0.0
    assert np.isfinite(rows[-1]["greedy_util_others_given_a"])
