"""DOMFN (mie.methods.domfn): parity tests against transcriptions of the authors' two released
training loops (Paddle, the paper's two-modality resume task; Torch, three modalities), one sample
per step as there; the defaults from the readable configs and the form picked by the number of
modalities; the penalty against the fused or the mean prediction; the strict margin p/τ < γ; a
mini-batch's loss as the mean of the per-sample losses with each rejected term's gradient routed to
its own modality; the prediction rule; pre-training; notices; and a run through the loop."""
import copy

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
IN = {"a": 5, "b": 6, "c": 4}


def _model(mods=("a", "b"), seed=0, scale=1.0):
    torch.manual_seed(seed)
    encoders = {m: nn.Linear(IN[m], D) for m in mods}
    heads = {m: ClassifierHead(D, K, hidden=()) for m in mods}
    model = MultiHeadModel(encoders, heads, ClassifierHead(D * len(mods), K, hidden=())).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def _batch(mods=("a", "b"), n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    return Batch({m: 2 * torch.randn(n, IN[m], generator=g, dtype=torch.float64) for m in mods}, y)


def _ctx(lr=0.0, mods=("a", "b"), epochs=3):
    return make_context(list(mods), lr=lr, epochs_per_modality=epochs)


def _weights(model):
    """The model's weights as plain leaf tensors: {m: [W_enc, b_enc, W_head, b_head]}, {"g": [W, b]}."""
    w = {m: [model.encoders[m].weight, model.encoders[m].bias,
             model.heads[m].net[0].weight, model.heads[m].net[0].bias] for m in model.modalities}
    w["fused"] = [model.fused_head.net[0].weight, model.fused_head.net[0].bias]
    return {k: [p.detach().clone().requires_grad_(True) for p in v] for k, v in w.items()}


def _sgd(params, loss, lr):
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g


def _assert_same_weights(model, w):
    for m in model.modalities:
        for p, q in zip((model.encoders[m].weight, model.encoders[m].bias,
                         model.heads[m].net[0].weight, model.heads[m].net[0].bias), w[m]):
            torch.testing.assert_close(p.detach(), q.detach())
    for p, q in zip((model.fused_head.net[0].weight, model.fused_head.net[0].bias), w["fused"]):
        torch.testing.assert_close(p.detach(), q.detach())


def _gamma_between(model, batch, tau, form):
    """A margin that fuses about half of the samples of ``batch`` at the model's current weights."""
    with torch.no_grad():
        uni, zf = model.outputs(batch.inputs)
        probs = {m: F.softmax(z, -1) for m, z in uni.items()}
        pen = divergence_penalties(probs, F.softmax(zf, -1) if form == "resume" else None)
        worst = (torch.stack(list(pen.values())).max(0).values / tau).sort().values
    n = len(worst)
    return ((worst[n // 2 - 1] + worst[n // 2]) / 2).item()


# ---- parity with the released code -----------------------------------------------------------
# The Paddle branch, the paper's resume task, transcribed in torch with one sample per step:
# njustkmg/MM22_DOMFN models/encoder.py line 121 (Paddle branch: multi_celoss; text_penalty =
# max((text_logit - multi_logit)**2); text_loss = 0.5 * text_celoss**2 - eta * text_penalty;
# multi_loss = text_celoss + image_celoss + multi_celoss) and engines/resume_trainer.py line 44
# (text_p = text_penalty / tau; if text_p < gamma and image_p < gamma: loss = text_loss +
# image_loss + multi_loss, one backward, every optimizer steps; else text_loss.backward(),
# text_optim.step(), then image_loss.backward(), image_optim.step()). Softmax probabilities stand
# in for the code's Sigmoid head outputs and the cross-entropy takes the logits (documented
# difference); one plain SGD for every parameter group.
def _paddle_resume_step(w, xt, xi, label, eta, tau, gamma, lr):
    t_feat = xt @ w["a"][0].T + w["a"][1]
    i_feat = xi @ w["b"][0].T + w["b"][1]
    t_z = t_feat @ w["a"][2].T + w["a"][3]
    i_z = i_feat @ w["b"][2].T + w["b"][3]
    m_z = torch.cat([t_feat, i_feat], dim=1) @ w["fused"][0].T + w["fused"][1]
    text_logit, image_logit, multi_logit = F.softmax(t_z, 1), F.softmax(i_z, 1), F.softmax(m_z, 1)
    text_celoss, image_celoss, multi_celoss = (F.cross_entropy(z, label) for z in (t_z, i_z, m_z))
    text_penalty = torch.max((text_logit - multi_logit) ** 2, dim=1).values
    image_penalty = torch.max((image_logit - multi_logit) ** 2, dim=1).values
    text_loss = 0.5 * text_celoss * text_celoss - eta * text_penalty
    image_loss = 0.5 * image_celoss * image_celoss - eta * image_penalty
    multi_loss = text_celoss + image_celoss + multi_celoss
    text_p, image_p = text_penalty / tau, image_penalty / tau
    if text_p.item() < gamma and image_p.item() < gamma:
        loss = output = text_loss + image_loss + multi_loss
        _sgd(w["a"] + w["b"] + w["fused"], loss.sum(), lr)
        return True, float(output.detach())
    grads_t = torch.autograd.grad(text_loss.sum(), w["a"], retain_graph=True)
    grads_i = torch.autograd.grad(image_loss.sum(), w["b"], retain_graph=True)
    with torch.no_grad():
        for p, g in zip(w["a"] + w["b"], grads_t + grads_i):
            p -= lr * g
    return False, float((text_loss + image_loss).detach())


def test_parity_with_the_paddle_code_of_the_resume_task():
    model = _model(scale=1.5)
    batch = _batch(n=8)
    method = create_method("domfn")                      # defaults: form auto → resume, η 0.5, τ 0.2
    method.setup(model, _ctx(lr=0.01))
    assert (method.resolved_form, method.eta, method.penalty_scale) == ("resume", 0.5, 0.2)
    method.gamma = _gamma_between(model, batch, 0.2, "resume")
    w = _weights(model)
    branches = []
    for i in range(len(batch.labels)):
        xs, y = {m: x[i:i + 1] for m, x in batch.inputs.items()}, batch.labels[i:i + 1]
        fused, loss = _paddle_resume_step(w, xs["a"], xs["b"], y, 0.5, 0.2, method.gamma, 0.01)
        logs = method.training_step(Batch(xs, y), make_step(0, i, len(batch.labels)))
        branches.append(fused)
        assert logs["domfn_fused_frac"] == float(fused)
        assert logs["loss"] == pytest.approx(loss, rel=1e-10)
        _assert_same_weights(model, w)
    assert any(branches) and not all(branches)            # both branches were exercised


# The Torch branch (three modalities, CMU-MOSI), transcribed with one sample per step:
# njustkmg/MM22_DOMFN models/encoder.py line 99 (Torch branch: average_logit = mean of the three
# uni-modal outputs; text_penalty = max((text_logit - average_logit)**2); text_loss, multi_loss as
# above) and engines/mosi_trainer.py line 67 (consistent: loss = text_loss + vision_loss +
# audio_loss + multi_loss, one backward, all optimizers step; else each modality steps on
# output['<m>_celoss'], its plain cross-entropy). Same stand-ins as above.
def _torch_mosi_step(w, xs, label, eta, tau, gamma, lr):
    mods = ("a", "b", "c")
    feat = {m: xs[m] @ w[m][0].T + w[m][1] for m in mods}
    z = {m: feat[m] @ w[m][2].T + w[m][3] for m in mods}
    logit = {m: F.softmax(z[m], 1) for m in mods}
    multi_z = torch.cat([feat[m] for m in mods], dim=1) @ w["fused"][0].T + w["fused"][1]
    celoss = {m: F.cross_entropy(z[m], label) for m in mods}
    multi_celoss = F.cross_entropy(multi_z, label)
    average_logit = torch.mean(torch.stack([logit[m] for m in mods], dim=1), dim=1)
    penalty = {m: torch.max((logit[m] - average_logit) ** 2, dim=1).values for m in mods}
    mod_loss = {m: 0.5 * celoss[m] * celoss[m] - eta * penalty[m] for m in mods}
    multi_loss = sum(celoss.values()) + multi_celoss
    loss = sum(mod_loss.values()) + multi_loss
    if all(penalty[m] / tau < gamma for m in mods):
        _sgd([p for k in w for p in w[k]], loss.sum(), lr)
        return True, float(loss.detach())
    grads = {m: torch.autograd.grad(celoss[m], w[m], retain_graph=True) for m in mods}
    with torch.no_grad():
        for m in mods:
            for p, g in zip(w[m], grads[m]):
                p -= lr * g
    return False, float(sum(celoss.values()).detach())


def test_parity_with_the_torch_code_for_three_modalities():
    mods = ("a", "b", "c")
    model = _model(mods, scale=1.5)
    batch = _batch(mods, n=8)
    method = create_method("domfn")                      # form auto → mosi for three, η 0.5, τ 0.5
    method.setup(model, _ctx(lr=0.01, mods=mods))
    assert (method.resolved_form, method.eta, method.penalty_scale) == ("mosi", 0.5, 0.5)
    method.gamma = _gamma_between(model, batch, 0.5, "mosi")
    w = _weights(model)
    branches = []
    for i in range(len(batch.labels)):
        xs, y = {m: x[i:i + 1] for m, x in batch.inputs.items()}, batch.labels[i:i + 1]
        fused, loss = _torch_mosi_step(w, xs, y, 0.5, 0.5, method.gamma, 0.01)
        logs = method.training_step(Batch(xs, y), make_step(0, i, len(batch.labels)))
        branches.append(fused)
        assert logs["domfn_fused_frac"] == float(fused)
        assert logs["loss"] == pytest.approx(loss, rel=1e-10)
        _assert_same_weights(model, w)
    assert any(branches) and not all(branches)


# ---- the two codes' rules, and the defaults --------------------------------------------------
def test_defaults_from_the_readable_configs_and_the_form_by_number_of_modalities():
    method = create_method("domfn")
    assert (method.form, method.eta, method.gamma, method.tau) == ("auto", 0.5, 0.8, None)
    assert (method.feature_fusion, method.pretrain_epochs, method.fusion) == ("concat", 0, "divergence")
    two, three = create_method("domfn"), create_method("domfn")
    two.setup(_model(), _ctx())
    three.setup(_model(("a", "b", "c")), _ctx(mods=("a", "b", "c")))
    assert (two.resolved_form, two.penalty_scale) == ("resume", 0.2)       # resume_config.py: tau 0.2
    assert (three.resolved_form, three.penalty_scale) == ("mosi", 0.5)     # mosi_config.py: tau 0.5
    either = create_method("domfn", form="mosi", tau=0.3)                   # either code's rules, any M
    either.setup(_model(), _ctx())
    assert (either.resolved_form, either.penalty_scale) == ("mosi", 0.3)


def test_penalty_against_the_mean_or_the_fused_prediction_by_hand():
    qa = torch.tensor([[0.7, 0.2, 0.1]])
    qb = torch.tensor([[0.1, 0.3, 0.6]])
    p = divergence_penalties({"a": qa, "b": qb})
    # mean = [0.4, 0.25, 0.35]; (q_a − mean)² = [0.09, 0.0025, 0.0625] → max 0.09; same for b
    assert p["a"].item() == pytest.approx(0.09) and p["b"].item() == pytest.approx(0.09)
    qf = torch.tensor([[0.5, 0.4, 0.1]])
    p = divergence_penalties({"a": qa, "b": qb}, qf)
    # (q_a − q_f)² = [0.04, 0.04, 0] → 0.04;  (q_b − q_f)² = [0.16, 0.01, 0.25] → 0.25
    assert p["a"].item() == pytest.approx(0.04) and p["b"].item() == pytest.approx(0.25)
    q = {"a": torch.tensor([[0.6, 0.3, 0.1]]), "b": torch.tensor([[0.2, 0.2, 0.6]]),
         "c": torch.tensor([[0.2, 0.5, 0.3]])}
    p3 = divergence_penalties(q)                       # mean = [1/3, 1/3, 1/3]
    assert p3["a"].item() == pytest.approx((0.6 - 1 / 3) ** 2)
    assert p3["c"].item() == pytest.approx((0.5 - 1 / 3) ** 2)


def test_fusion_margin_is_strict_scaled_by_tau_and_over_all_modalities():
    pen = {"a": torch.tensor([0.09, 0.0899, 0.01, 0.0]), "b": torch.tensor([0.0, 0.0, 0.2, 0.0])}
    c = consistent_mask(pen, tau=2.0, gamma=0.045)     # p/τ < γ for every modality
    assert c.tolist() == [False, True, False, True]
    assert consistent_mask(pen, tau=2.0, gamma=0.0).tolist() == [False] * 4
    assert consistent_mask(pen, tau=0.5, gamma=0.5).tolist() == [True, True, True, True]
    assert consistent_mask(pen, tau=0.5, gamma=0.4).tolist() == [True, True, False, True]


@pytest.mark.parametrize("form", ["resume", "mosi"])
def test_a_batch_is_the_mean_of_its_samples_with_rejected_terms_routed_to_their_modality(form):
    eta, tau = 0.7, 0.5
    model = _model(scale=1.5)
    batch = _batch()
    gamma = _gamma_between(model, batch, tau, form)
    ref = copy.deepcopy(model)
    method = DOMFN(form=form, eta=eta, tau=tau, gamma=gamma)
    method.setup(model, _ctx())
    logs = method.training_step(batch, make_step())
    assert logs["domfn_fused_frac"] == 0.5

    # by hand: the mean over samples; a consistent sample's loss reaches everything, a rejected
    # sample's term of modality m reaches m's encoder and head only
    xs, y = batch
    uni, zf = ref.outputs(xs)
    q = {m: F.softmax(z, 1) for m, z in uni.items()}
    qf = F.softmax(zf, 1)
    grads = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    total = 0.0
    for i in range(len(y)):
        ce = {m: F.cross_entropy(uni[m][i:i + 1], y[i:i + 1]) for m in uni}
        ce_f = F.cross_entropy(zf[i:i + 1], y[i:i + 1])
        r = qf[i] if form == "resume" else (q["a"][i] + q["b"][i]) / 2
        p = {m: ((q[m][i] - r) ** 2).max() for m in q}
        if all(p[m].item() / tau < gamma for m in p):
            term = sum(0.5 * ce[m] ** 2 - eta * p[m] for m in p) + sum(ce.values()) + ce_f
            pieces = [(term, dict(ref.named_parameters()))]
        else:
            own = {m: {n: v for n, v in ref.named_parameters() if n.startswith((f"encoders.{m}.", f"heads.{m}."))}
                   for m in p}
            pieces = [((0.5 * ce[m] ** 2 - eta * p[m]) if form == "resume" else ce[m], own[m]) for m in p]
        for term, params in pieces:
            total += term.item() / len(y)
            gs = torch.autograd.grad(term, list(params.values()), retain_graph=True, allow_unused=True)
            for n, g in zip(params, gs):
                if g is not None:
                    grads[n] += g / len(y)
    assert logs["loss"] == pytest.approx(total, rel=1e-10)
    for n, p in model.named_parameters():
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, grads[n], msg=n)


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
    out = domfn_predict({"a": za, "b": zb}, zf, tau, gamma, "mosi")
    torch.testing.assert_close(out[0], F.softmax(zf[0], -1))      # agree → fused head
    torch.testing.assert_close(out[1], qa[1])                     # disagree → the more confident, a
    torch.testing.assert_close(out[2], qb[2])                     # … and here b
    # against the fused prediction: sample 0's uni-modal predictions both differ from q_f
    out = domfn_predict({"a": za, "b": zb}, zf, tau, gamma, "resume")
    torch.testing.assert_close(out[0], qa[0])


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
    torch.testing.assert_close(fused, domfn_predict(uni, zf, 1.0, 0.05, "resume"))
    torch.testing.assert_close(per["b"], q["b"])
    method.fusion = "model"
    torch.testing.assert_close(method.predict(xs)[0], F.softmax(zf.float(), -1))
    method.fusion = "average"
    torch.testing.assert_close(method.predict(xs)[0], (q["a"] + q["b"]) / 2)


def test_notices_when_the_margin_or_the_amended_loss_cannot_act():
    mosi2 = create_method("domfn", form="mosi")          # two modalities: p ≤ ¼ < γτ = 0.4
    mosi2.setup(_model(), _ctx())
    assert len(mosi2.notices()) == 1 and "never rejects" in mosi2.notices()[0]
    default = create_method("domfn")
    default.setup(_model(), _ctx())
    assert default.notices() == []
    never = create_method("domfn", gamma=0)
    never.setup(_model(), _ctx())
    assert "no sample is ever fused" in never.notices()[0]
    pre = create_method("domfn", pretrain_epochs=3)
    pre.setup(_model(), _ctx(epochs=3))
    assert "pre-training" in pre.notices()[0]


def test_invalid_settings_and_one_modality_are_refused():
    with pytest.raises(MieInputError, match="tau must be None or a number > 0"):
        create_method("domfn", tau=0)
    with pytest.raises(MieInputError, match="eta must be a number >= 0"):
        create_method("domfn", eta=-1)
    with pytest.raises(MieInputError, match="form must be one of 'auto', 'resume', 'mosi'"):
        create_method("domfn", form="paddle")
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
