"""DOMFN (mie.methods.domfn) against hand computations: the penalty score against the mean
uni-modal prediction (2 and 3 modalities), the strict fusion margin p/τ < γ, the amended loss and
its gradients (sign of η, which samples reach the fusion head, which modality a rejected sample's
divergence term trains), the per-sample prediction rule, pre-training, and a crash-and-resume run."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie
import mie.methods
from conftest import make_arrays, make_context, make_step
from mie.errors import MieInputError
from mie.methods import Batch, create_method
from mie.methods.domfn import DOMFN, consistent_mask, divergence_penalties, domfn_predict
from mie.models import ClassifierHead, MultiHeadModel

K, D = 3, 4
IN = {"a": 5, "b": 6}


def test_penalty_against_the_mean_prediction_by_hand():
    qa = torch.tensor([[0.7, 0.2, 0.1]])
    qb = torch.tensor([[0.1, 0.3, 0.6]])
    p = divergence_penalties({"a": qa, "b": qb})
    # mean = [0.4, 0.25, 0.35]; (q_a − mean)² = [0.09, 0.0025, 0.0625] → max 0.09; same for b
    assert p["a"].item() == pytest.approx(0.09) and p["b"].item() == pytest.approx(0.09)
    assert p["a"].item() == pytest.approx(0.25 * ((qa - qb) ** 2).max().item())   # ¼ max (q_a − q_b)²
    q = {"a": torch.tensor([[0.6, 0.3, 0.1]]), "b": torch.tensor([[0.2, 0.2, 0.6]]),
         "c": torch.tensor([[0.2, 0.5, 0.3]])}
    p3 = divergence_penalties(q)                       # mean = [1/3, 1/3, 1/3]
    assert p3["a"].item() == pytest.approx((0.6 - 1 / 3) ** 2)
    assert p3["b"].item() == pytest.approx((0.6 - 1 / 3) ** 2)
    assert p3["c"].item() == pytest.approx((0.5 - 1 / 3) ** 2)


def test_fusion_margin_is_strict_scaled_by_tau_and_over_all_modalities():
    pen = {"a": torch.tensor([0.09, 0.0899, 0.01, 0.0]), "b": torch.tensor([0.0, 0.0, 0.2, 0.0])}
    c = consistent_mask(pen, tau=2.0, gamma=0.045)     # p/τ < γ for every modality
    assert c.tolist() == [False, True, False, True]
    assert consistent_mask(pen, tau=2.0, gamma=0.0).tolist() == [False] * 4
    assert consistent_mask(pen, tau=0.5, gamma=0.5).tolist() == [True, True, True, True]
    assert consistent_mask(pen, tau=0.5, gamma=0.4).tolist() == [True, True, False, True]


def _model(mods=("a", "b"), seed=0):
    torch.manual_seed(seed)
    encoders = {m: nn.Linear(IN.get(m, 5), D) for m in mods}
    heads = {m: ClassifierHead(D, K, hidden=()) for m in mods}
    return MultiHeadModel(encoders, heads, ClassifierHead(D * len(mods), K, hidden=())).double()


def _batch(mods=("a", "b"), n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    return Batch({m: 2 * torch.randn(n, IN.get(m, 5), generator=g, dtype=torch.float64) for m in mods}, y)


def _ctx(lr=0.0):
    return make_context(["a", "b"], lr=lr, epochs_per_modality=3)


def _hand_loss(model, xs, y, eta, tau, gamma):
    """The amended loss written out per sample, from the weights; returns (loss, consistent list)."""
    mods = model.modalities
    u = {m: xs[m] @ model.encoders[m].weight.T + model.encoders[m].bias for m in mods}
    z = {m: u[m] @ model.heads[m].net[0].weight.T + model.heads[m].net[0].bias for m in mods}
    g = model.fused_head.net[0]
    zf = torch.cat([u[m] for m in mods], dim=1) @ g.weight.T + g.bias
    q = {m: torch.softmax(z[m], dim=1) for m in mods}
    total, flags = 0.0, []
    for i in range(len(y)):
        ce = {m: -torch.log_softmax(z[m][i], 0)[y[i]] for m in mods}
        ce_f = -torch.log_softmax(zf[i], 0)[y[i]]
        mean = sum(q[m][i] for m in mods) / len(mods)
        p = {m: ((q[m][i] - mean) ** 2).max() for m in mods}
        consistent = all(p[m].item() / tau < gamma for m in mods)
        flags.append(consistent)
        if consistent:
            total = total + sum(0.5 * ce[m] ** 2 - eta * p[m] + ce[m] for m in mods) + ce_f
        else:      # each modality on its own amended loss: the others' predictions are constants
            for m in mods:
                mean_own = (q[m][i] + sum(q[j][i].detach() for j in mods if j != m)) / len(mods)
                total = total + 0.5 * ce[m] ** 2 - eta * ((q[m][i] - mean_own) ** 2).max()
    return total / len(y), flags


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")])
def test_amended_loss_and_its_gradients_by_hand(mods):
    eta, tau = 0.7, 2.0
    model = _model(mods)
    xs, y = _batch(mods)
    with torch.no_grad():
        uni, _ = model.outputs(xs)
        pen = divergence_penalties({m: F.softmax(z, -1) for m, z in uni.items()})
        worst = torch.stack(list(pen.values())).max(0).values / tau
    w = worst.sort().values
    gamma = ((w[len(w) // 2 - 1] + w[len(w) // 2]) / 2).item()    # half the samples fused, half rejected
    ref = _model(mods)
    hand, flags = _hand_loss(ref, xs, y, eta, tau, gamma)
    assert 0 < sum(flags) < len(flags)
    hand.backward()

    method = DOMFN(eta=eta, tau=tau, gamma=gamma)
    method.setup(model, _ctx())
    logs = method.training_step(Batch(xs, y), make_step())
    assert logs["loss"] == pytest.approx(hand.item())
    assert logs["domfn_fused_frac"] == pytest.approx(sum(flags) / len(flags))
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)
    # the sign of η is visible: the divergence term's gradient is not negligible here
    flipped, _ = _hand_loss(_model(mods), xs, y, -eta, tau, gamma)
    assert abs(flipped.item() - hand.item()) > 1e-3


def test_rejected_samples_never_reach_the_fusion_head_and_pretraining_is_cross_entropy_only():
    model = _model()
    xs, y = _batch()
    method = DOMFN(eta=0.5, tau=1.0, gamma=0.0)    # γ = 0: p/τ < 0 never holds, every sample rejected
    method.setup(model, _ctx(lr=0.1))
    head_before = {n: p.detach().clone() for n, p in model.fused_head.named_parameters()}
    enc_before = model.encoders["a"].weight.detach().clone()
    logs = method.training_step(Batch(xs, y), make_step())
    assert logs["domfn_fused_frac"] == 0.0
    for n, p in model.fused_head.named_parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
        assert torch.equal(p, head_before[n])
    assert not torch.equal(model.encoders["a"].weight, enc_before)

    pre = DOMFN(pretrain_epochs=1)
    model = _model()
    pre.setup(model, _ctx())
    pre.start_epoch(0)
    logs = pre.training_step(Batch(xs, y), make_step(0))
    uni, _ = model.outputs(xs)
    assert logs["loss"] == pytest.approx(sum(F.cross_entropy(z, y) for z in uni.values()).item())
    assert all(p.grad is None for p in model.fused_head.parameters())
    assert "domfn_penalty_a" not in logs
    pre.start_epoch(1)                                # after pre-training: the amended loss
    assert "domfn_penalty_a" in pre.training_step(Batch(xs, y), make_step(1))


def test_prediction_rule_per_sample_by_hand():
    za = torch.tensor([[2.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    zb = torch.tensor([[2.0, 0.1, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 4.0]])
    zf = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    qa, qb = F.softmax(za, -1), F.softmax(zb, -1)
    p = (0.25 * (qa - qb) ** 2).max(dim=1).values
    tau, gamma = 1.0, 0.01
    assert p[0] / tau < gamma and p[1] / tau >= gamma and p[2] / tau >= gamma
    assert qa[1].max() > qb[1].max() and qb[2].max() > qa[2].max()
    out = domfn_predict({"a": za, "b": zb}, zf, tau, gamma)
    torch.testing.assert_close(out[0], F.softmax(zf[0], -1))      # agree → fused head
    torch.testing.assert_close(out[1], qa[1])                     # disagree → the more confident, a
    torch.testing.assert_close(out[2], qb[2])                     # … and here b


def test_method_predict_under_each_fusion_rule():
    model = _model()
    xs, _ = _batch()
    model.eval()
    with torch.no_grad():
        uni, zf = model.outputs(xs)
    q = {m: F.softmax(z.float(), -1) for m, z in uni.items()}
    method = DOMFN(tau=1.0, gamma=0.05)
    method.setup(model, _ctx())
    fused, per = method.predict(xs)
    torch.testing.assert_close(fused, domfn_predict(uni, zf, 1.0, 0.05))
    torch.testing.assert_close(per["b"], q["b"])
    method.fusion = "model"
    torch.testing.assert_close(method.predict(xs)[0], F.softmax(zf.float(), -1))
    method.fusion = "average"
    torch.testing.assert_close(method.predict(xs)[0], (q["a"] + q["b"]) / 2)


def test_invalid_settings_and_one_modality_are_refused():
    with pytest.raises(MieInputError, match="tau must be a number > 0"):
        create_method("domfn", tau=0)
    with pytest.raises(MieInputError, match="eta must be a number >= 0"):
        create_method("domfn", eta=-1)
    with pytest.raises(MieInputError, match="feature_fusion must be one of 'concat', 'mean', 'max'"):
        create_method("domfn", feature_fusion="attention")
    with pytest.raises(MieInputError, match="fusion must be one of 'divergence', 'model', 'average', 'weight'"):
        create_method("domfn", fusion="concat")
    with pytest.raises(MieInputError, match="pretrain_epochs must be an integer >= 0"):
        create_method("domfn", pretrain_epochs=1.5)
    with pytest.raises(MieInputError, match="unimodal"):
        DOMFN().setup(_model(mods=("a",)), _ctx())


CONFIG = {"train": {"epochs": 3, "batch_size": 16}, "model": {"dim": 8, "head_hidden": [8]}}



def test_three_modalities_run_through_the_loop(monkeypatch):
    monkeypatch.setitem(mie.methods.METHODS, "domfn", (DOMFN, {}, "DOMFN"))
    x, y = make_arrays(n=60, shapes={"a": (6,), "b": (4,), "c": (5,)})
    rows = []
    result = mie.fit(mie.MultimodalArrays(x, y), "domfn", config=CONFIG, epochs=2, seed=0, progress=False,
                     callbacks=[lambda e, row: rows.append(row)], feature_fusion="mean")
    assert set(result["test"]["per_modality"]) == {"a", "b", "c"}
    assert {f"domfn_penalty_{m}" for m in "abc"} <= set(rows[-1])
    assert 0.0 <= rows[-1]["domfn_fused_frac"] <= 1.0
