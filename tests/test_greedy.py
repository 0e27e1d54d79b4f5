"""Greedy (mie.methods.greedy) against hand computations: the conditional learning speed from the
gradients, the conditional utilisation rate from the loop's metrics (fused ŷ, per modality the
uni-modal DNN), the fusion rules, the re-balancing trigger at the threshold α, parity of whole runs
of steps with a transcription of the authors' released callback and MMTM module, the opt-in
branch-only re-balancing step, the warm-up, the notices, and three modalities through the real
loop (resume: tests/test_resume.py)."""
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


def test_branch_only_rebalancing_steps_train_only_the_slower_branch_for_window_steps():
    # ours, opt-in (rebalance="branch_only"); the default is the released step, tested below
    model = _model()
    method = _method(model, _ctx(lr=0.1), alpha=0.0, window=2, warmup_epochs=0, rebalance="branch_only")
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


# ---- parity with the authors' released code ---------------------------------------------------
class _ReleasedGreedy:
    """A transcription, in plain torch, of the released training step for two vector branches:
    ``MMTM_mitigate.forward`` with one MMTM on the encoder outputs, ``blend_loss``, ``Bias_Mitigation_
    Strong`` (``compute_BDR`` and ``on_backward_end``) and plain SGD on every parameter. Parameter names
    follow the released model: ``net_view_<i>`` (encoder ``enc`` and head ``fc``) and ``mmtm``
    (``fc_squeeze``, ``fc_visual``, ``fc_skeleton``)."""

    def __init__(self, params, lr, epsilon, window, starting_epoch):
        self.p = {n: t.detach().clone() for n, t in params.items()}
        self.lr, self.epsilon, self.window, self.starting_epoch = lr, epsilon, window, starting_epoch
        d = self.p["net_view_0.enc.weight"].shape[0]
        # nyukat/greedy_multimodal_learning src/balanced_mmtm.py line 30 (running means, step counter)
        self.ra = [torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)]
        self.step = 0
        # nyukat/greedy_multimodal_learning src/callbacks.py line 190 (on_train_begin)
        self.M_bypass, self.M_main = [0.0, 0.0], [0.0, 0.0]
        self.curation_mode, self.caring_modality, self.unlock = False, None, False

    def on_epoch_begin(self, epoch):
        # nyukat/greedy_multimodal_learning src/callbacks.py line 265 (epoch is 1-based: framework.py line 293)
        if epoch >= self.starting_epoch:
            self.unlock = True

    def forward(self, p, x0, x1):
        u = [x0 @ p["net_view_0.enc.weight"].T + p["net_view_0.enc.bias"],
             x1 @ p["net_view_1.enc.weight"].T + p["net_view_1.enc.bias"]]
        # nyukat/greedy_multimodal_learning src/balanced_mmtm.py line 94 (squeeze, excitation)
        z = torch.relu(torch.cat(u, 1) @ p["mmtm.fc_squeeze.weight"].T + p["mmtm.fc_squeeze.bias"])
        out = [torch.sigmoid(z @ p["mmtm.fc_visual.weight"].T + p["mmtm.fc_visual.bias"]),
               torch.sigmoid(z @ p["mmtm.fc_skeleton.weight"].T + p["mmtm.fc_skeleton.bias"])]
        # nyukat/greedy_multimodal_learning src/balanced_mmtm.py line 113: running means in every forward,
        # before they are used; line 114 feeds the second one with vis_out, a bug mie does not reproduce
        for i in range(2):
            self.ra[i] = (out[i].mean(0) + self.ra[i] * self.step).detach() / (self.step + 1)
        self.step += 1
        # nyukat/greedy_multimodal_learning src/balanced_mmtm.py line 136: the caring branch's excitation ← its mean
        if self.curation_mode:
            k = self.caring_modality
            out[k] = torch.stack(out[k].shape[0] * [self.ra[k]])
        return [(u[i] * out[i]) @ p[f"net_view_{i}.fc.weight"].T + p[f"net_view_{i}.fc.bias"] for i in range(2)]

    def compute_BDR(self, grads):
        # nyukat/greedy_multimodal_learning src/callbacks.py line 199
        wn_main, wn_bypass, gn_main, gn_bypass = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
        for name, parameter in self.p.items():
            wn, gn = float((parameter ** 2).sum()), float((grads[name] ** 2).sum())
            if "mmtm" in name:
                shared = True
                for ind, modal in enumerate(["visual", "skeleton"]):
                    if modal in name:
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
                        shared = False
                if shared:
                    for ind in range(2):
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
            else:
                for ind, modal in enumerate(["net_view_0", "net_view_1"]):
                    if modal in name:
                        wn_main[ind] += wn
                        gn_main[ind] += gn
        for i in range(2):
            self.M_bypass[i] += gn_bypass[i] / wn_bypass[i]
            self.M_main[i] += gn_main[i] / wn_main[i]
        return math.log10(self.M_bypass[0] / self.M_main[0]) - math.log10(self.M_bypass[1] / self.M_main[1])

    def on_backward_end(self, grads):
        # nyukat/greedy_multimodal_learning src/callbacks.py line 240
        if self.unlock:
            if not self.curation_mode:
                d = self.compute_BDR(grads)
                if abs(d) > self.epsilon:
                    self.curation_mode, self.curation_step = True, 0
                    self.caring_modality = 1 if d < 0 else 0
                else:
                    self.curation_mode, self.caring_modality = False, 0
            else:
                self.curation_step += 1
                if self.curation_step == self.window:
                    self.curation_mode = False
        else:
            self.compute_BDR(grads)
            self.curation_mode, self.caring_modality = False, 0

    def train_step(self, x0, x1, y):
        # nyukat/greedy_multimodal_learning src/framework.py line 310: zero_grad, loss, backward, callback, step
        leaves = {n: t.clone().requires_grad_(True) for n, t in self.p.items()}
        outs = self.forward(leaves, x0, x1)
        loss = sum(F.cross_entropy(o, y) for o in outs)              # train.py line 22, blend_loss
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        grads = {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(leaves.items(), grads)}
        self.on_backward_end(grads)
        self.p = {n: t - self.lr * grads[n] for n, t in self.p.items()}   # SGD, momentum 0, wd 0
        return float(loss.detach())


_RELEASED_NAMES = {"encoders.a.weight": "net_view_0.enc.weight", "encoders.a.bias": "net_view_0.enc.bias",
                   "encoders.b.weight": "net_view_1.enc.weight", "encoders.b.bias": "net_view_1.enc.bias",
                   "heads.a.net.0.weight": "net_view_0.fc.weight", "heads.a.net.0.bias": "net_view_0.fc.bias",
                   "heads.b.net.0.weight": "net_view_1.fc.weight", "heads.b.net.0.bias": "net_view_1.fc.bias",
                   "squeeze.weight": "mmtm.fc_squeeze.weight", "squeeze.bias": "mmtm.fc_squeeze.bias",
                   "excite.a.weight": "mmtm.fc_visual.weight", "excite.a.bias": "mmtm.fc_visual.bias",
                   "excite.b.weight": "mmtm.fc_skeleton.weight", "excite.b.bias": "mmtm.fc_skeleton.bias"}


# nyukat/greedy_multimodal_learning src/balanced_mmtm.py line 128 (curation mode: the caring branch's
# excitation replaced by its running mean, line 141/150) with src/callbacks.py line 240 (the trigger,
# the window, M_main/M_bypass in normal steps only) and src/framework.py line 310 (every parameter steps
# on the summed loss): the default re-balancing step, step for step, through two epochs.
def test_parity_with_the_released_callback_and_mmtm_over_two_epochs():
    model = _model(seed=3)
    lr, window = 0.1, 2
    ref = _ReleasedGreedy({_RELEASED_NAMES[n]: p for n, p in model.named_parameters()}, lr=lr, epsilon=0.0,
                          window=window, starting_epoch=2)
    method = Greedy(alpha=0.0, window=window)             # defaults: warmup_epochs 1, rebalance mean_excitation
    method.setup(model, _ctx(lr=lr))
    steps_per_epoch, seen_rebalancing = 5, set()
    for epoch in range(2):
        ref.on_epoch_begin(epoch + 1)
        method.start_epoch(epoch)
        for index in range(steps_per_epoch):
            xs, y = _batch(seed=100 + 10 * epoch + index)
            curating = ref.curation_mode
            caring = ref.caring_modality
            ref_loss = ref.train_step(xs["a"], xs["b"], y)
            logs = method.training_step(Batch(xs, y), make_step(epoch, index, steps_per_epoch))
            assert logs["greedy_rebalancing"] == float(curating)
            if curating:
                k = "ab"[caring]
                seen_rebalancing.add(k)
                assert logs[f"greedy_rebalance_{k}"] == 1.0
                assert logs["greedy_rebalance_loss"] == pytest.approx(ref_loss, rel=1e-12)
            else:
                assert logs["loss"] == pytest.approx(ref_loss, rel=1e-12)
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.detach(), ref.p[_RELEASED_NAMES[name]], rtol=1e-10, atol=1e-12,
                                           msg=f"{name} after epoch {epoch} step {index}")
            torch.testing.assert_close(model.excite_mean, torch.stack(ref.ra), rtol=1e-10, atol=1e-12)
            assert [method.m_main[m] for m in "ab"] == pytest.approx(ref.M_main, rel=1e-10)
            assert [method.m_bypass[m] for m in "ab"] == pytest.approx(ref.M_bypass, rel=1e-10)
            assert (method.rebalance_left > 0) == ref.curation_mode
    assert seen_rebalancing                                   # the check covered re-balancing steps
    assert model.excite_count.item() == ref.step == 2 * steps_per_epoch


def test_rebalancing_step_keeps_the_summed_loss_and_steps_every_parameter_but_the_cut_excitation():
    model = _model()
    method = _method(model, _ctx(lr=0.1), alpha=0.0, window=1, warmup_epochs=0)
    method.training_step(_batch(seed=1), make_step(0, 0, 3))
    k = method.rebalance_modality
    assert method.rebalance_left == 1
    main_before = dict(method.m_main)
    xs, y = _batch(seed=2)
    with torch.no_grad():
        _, E, _ = _hand_parts(model, xs)
    n = model.excite_count.item()
    e_bar = (model.excite_mean[model.index(k)] * n + E[k].mean(0)) / (n + 1)   # this batch folded in first
    u, _, _ = _hand_parts(model, xs)
    lin = {m: model.heads[m].net[0] for m in "ab"}
    with torch.no_grad():
        hand = sum(F.cross_entropy((u[m] * (e_bar if m == k else E[m])) @ lin[m].weight.T + lin[m].bias, y)
                   for m in "ab")
    before = _snapshot(model)
    logs = method.training_step(Batch(xs, y), make_step(0, 1, 3))
    assert logs["greedy_rebalance_loss"] == pytest.approx(hand.item())
    assert _changed(model, before) == set(before) - {f"excite.{k}.weight", f"excite.{k}.bias"}
    assert method.m_main == main_before and method.rebalance_left == 0


def test_second_modalitys_running_mean_is_its_own_excitation():
    # nyukat/greedy_multimodal_learning src/balanced_mmtm.py line 114 feeds running_avg_weight_skeleton with
    # vis_out (the first modality's excitation); mie averages each modality's own excitation
    model = _model()
    method = _method(model, _ctx(lr=0.0), alpha=1e9)
    xs, y = _batch(seed=4)
    _, E, _ = _hand_parts(model, xs)
    method.training_step(Batch(xs, y), make_step(0, 0, 1))
    torch.testing.assert_close(model.excite_mean[1], E["b"].mean(0).detach())
    assert (model.excite_mean[1] - E["a"].mean(0).detach()).abs().max() > 1e-3


def test_notices_when_no_rebalancing_can_happen():
    model = _model()
    assert _method(model, _ctx()).notices() == []                        # 3 epochs, warm-up 1
    assert "never starts" in _method(model, _ctx(), warmup_epochs=3).notices()[0]
    assert "window=0" in _method(model, _ctx(), window=0).notices()[0]


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
