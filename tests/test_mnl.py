"""MNL (mie.methods.mnl): parity with a transcription of the authors' released training loss (and its
paper form); the guidance masks and the direction of the negative-learning gradient on a hand-built
case; λ = 0 and the warm-up reduce a step to the base loss; the fused prediction; parameter
checks; the two-modality restriction; notices; and a run through the CLI."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie
import mie.cli
from conftest import TINY, make_context, make_step
from mie.errors import MieInputError
from mie.methods import Batch
from mie.methods.mnl import MNL, guidance_loss, guidance_masks
from mie.models import ClassifierHead, LateFusionModel


def _model(mods=("a", "b")):
    torch.manual_seed(0)
    enc = {m: nn.Linear(4 + i, 6) for i, m in enumerate(mods)}
    return LateFusionModel(enc, {m: ClassifierHead(6, 3, hidden=(5,)) for m in mods})


def _batches(n_batches=3, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        xs = {"a": torch.randn(n, 4, generator=g), "b": torch.randn(n, 5, generator=g)}
        out.append(Batch(xs, torch.randint(0, 3, (n,), generator=g)))
    return out


def _method(model, lr=0.1, epochs=3, **params):
    method = MNL(**params)
    method.setup(model, make_context(model.modalities, lr=lr, epochs_per_modality=epochs))
    return method


# ---- parity with the authors' released code ---------------------------------------------------
# A transcription, in plain torch, of the released training loss: BaoquanGong/Multimodal-Negative-Learning
# @64cea56, src/models/latefusion.py line 28 (txt_img_out = 0.5*txt_out + 0.5*img_out) and
# train_latefusion.py lines 126-169 (j_idx from the fused softmax with the target set to -1; xi_t, xi_v
# margins; label_probs_*; clf_loss = CE(txt) + CE(img) + CE(out); "txt guides img" where
# xi_t > xi_v and p_t > p_v, "img guides txt" where xi_t <= xi_v and p_t <= p_v; boosting_loss
# averaged by torch.mean), with weight1 = 0.7 (line 63); one zero_grad/backward/step per batch
# (lines 217-220). txt is modality a, img modality b. ``paper=True`` drops the code's first
# boosting term (-label * log_softmax * valid_mask): the paper's λ·MNL on non-target classes only.
def _code_loss(txt_logits, img_logits, tgt, n_classes, weight1=0.7, paper=False):
    out = 0.5 * txt_logits + 0.5 * img_logits
    label = F.one_hot(tgt, num_classes=n_classes)
    prob_out = F.softmax(out, dim=1)
    prob_out_masked = prob_out.clone()
    prob_out_masked[torch.arange(prob_out.size(0)), tgt] = -1
    _, j_idx = prob_out_masked.max(dim=1)
    txt_tgt_logits = txt_logits[torch.arange(txt_logits.size(0)), tgt]
    txt_j_logits = txt_logits[torch.arange(txt_logits.size(0)), j_idx]
    xi_t = txt_tgt_logits - txt_j_logits
    img_tgt_logits = img_logits[torch.arange(img_logits.size(0)), tgt]
    img_j_logits = img_logits[torch.arange(img_logits.size(0)), j_idx]
    xi_v = img_tgt_logits - img_j_logits
    prob_txt = F.softmax(txt_logits, dim=1)
    prob_v = F.softmax(img_logits, dim=1)
    label_probs_txt = prob_txt[torch.arange(prob_txt.size(0)), tgt]
    label_probs_v = prob_v[torch.arange(prob_v.size(0)), tgt]
    txt_clf_loss = nn.CrossEntropyLoss()(txt_logits, tgt)
    img_clf_loss = nn.CrossEntropyLoss()(img_logits, tgt)
    clf_loss = txt_clf_loss + img_clf_loss + nn.CrossEntropyLoss()(out, tgt)
    loss = torch.mean(clf_loss)
    keep = 0.0 if paper else 1.0
    masks = []
    valid_mask = (xi_t > xi_v) & (label_probs_txt > label_probs_v)
    masks.append(valid_mask)
    if valid_mask.any():
        valid_mask = valid_mask.float().unsqueeze(1)
        boosting_loss = - keep * (label * img_logits.log_softmax(1) * valid_mask) \
                        - (weight1) * (txt_logits.detach().softmax(1) * img_logits.log_softmax(1) * valid_mask) \
                        + (weight1) * (label * txt_logits.detach().softmax(1) * img_logits.log_softmax(1) * valid_mask)
        loss += torch.mean(boosting_loss)
    valid_mask = (xi_t <= xi_v) & (label_probs_txt <= label_probs_v)
    masks.append(valid_mask)
    if valid_mask.any():
        valid_mask = valid_mask.float().unsqueeze(1)
        boosting_loss = - keep * (label * txt_logits.log_softmax(1) * valid_mask) \
                        - (weight1) * (img_logits.detach().softmax(1) * txt_logits.log_softmax(1) * valid_mask) \
                        + (weight1) * (label * img_logits.detach().softmax(1) * txt_logits.log_softmax(1) * valid_mask)
        loss += torch.mean(boosting_loss)
    return loss, masks


@pytest.mark.parametrize("objective", ["released", "paper"])
def test_parity_with_the_released_loss(objective):
    batches = _batches()
    model = _model()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    method = _method(model, objective=objective)
    guided = set()
    for i, (xs, y) in enumerate(batches):
        z = reference(xs)
        loss, masks = _code_loss(z["a"], z["b"], y, 3, paper=objective == "paper")
        guided |= {k for k, mask in zip("ba", masks) if mask.any()}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        logs = method.training_step(Batch(xs, y), make_step(0, i, len(batches)))
        torch.testing.assert_close(logs["loss"], loss.detach())
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, msg=name)
    assert guided == {"a", "b"}          # both directions of guidance acted in these steps


# ---- the guidance mechanism -------------------------------------------------------------------
# Hand-built logits (C = 3). Row 0: y = 0, fused j = 2, ξ_a = 2 > ξ_b = −1 and π_a > π_b: a guides b.
# Row 1: y = 1, fused j = 0, ξ_a = −1 < ξ_b = 2 and π_a < π_b: b guides a. Row 2: y = 0, fused j = 1,
# ξ_a = 3 > ξ_b = 0.5 but π_a ≈ 0.51 < π_b ≈ 0.62: no guidance. Row 3: a and b equal: the code's
# tie rule, b guides a.
Z_A = torch.tensor([[3.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, -2.0, 0.9], [0.5, 0.2, -0.3]])
Z_B = torch.tensor([[1.0, 0.0, 2.0], [0.0, 2.0, 0.0], [2.0, 1.5, -5.0], [0.5, 0.2, -0.3]])
Y = torch.tensor([0, 1, 0, 2])


def test_guidance_masks_by_hand():
    a_guides_b, b_guides_a = guidance_masks(Z_A, Z_B, (Z_A + Z_B) / 2, Y)
    assert a_guides_b.tolist() == [True, False, False, False]
    assert b_guides_a.tolist() == [False, True, False, True]


def _nl_gradient(guide, guided, y, mask, lam):
    """∂/∂z_w of (λ/(B·C)) Σ_i mask_i Σ_{c≠y} −p^g_c log q_c
    = (λ/(B·C)) mask_i (s_i q_i − ȳ_i ⊙ p^g_i),  s_i = Σ_{c≠y} p^g_{i,c}."""
    B, C = guided.shape
    p_g, q = F.softmax(guide, dim=1), F.softmax(guided, dim=1)
    not_y = 1.0 - F.one_hot(y, C).float()
    s = (not_y * p_g).sum(1, keepdim=True)
    return lam / (B * C) * mask.float()[:, None] * (s * q - not_y * p_g)


def test_negative_learning_pushes_only_the_guided_modality_on_non_target_classes():
    z_a, z_b = Z_A.clone().requires_grad_(), Z_B.clone().requires_grad_()
    a_guides_b, b_guides_a = guidance_masks(z_a, z_b, (z_a + z_b) / 2, Y)
    loss = guidance_loss(z_a, z_b, Y, a_guides_b, 0.7) + guidance_loss(z_b, z_a, Y, b_guides_a, 0.7)
    loss.backward()
    torch.testing.assert_close(z_b.grad, _nl_gradient(Z_A, Z_B, Y, a_guides_b, 0.7))
    torch.testing.assert_close(z_a.grad, _nl_gradient(Z_B, Z_A, Y, b_guides_a, 0.7))
    assert z_b.grad[[1, 2, 3]].abs().sum() == 0 and z_a.grad[[0, 2]].abs().sum() == 0   # guides and row 2 untouched
    # Direction: a step on the term brings the guided modality's distribution over the wrong classes
    # closer to its guide's (row 0: b towards a; row 1: a towards b).
    def wrong_classes(z):
        p = F.softmax(z, dim=1) * (1.0 - F.one_hot(Y, 3))
        return p / p.sum(1, keepdim=True)

    def kl(p, q):
        return (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(1)
    assert kl(wrong_classes(Z_A), wrong_classes(Z_B - 10 * z_b.grad))[0] < kl(wrong_classes(Z_A), wrong_classes(Z_B))[0]
    assert kl(wrong_classes(Z_B), wrong_classes(Z_A - 10 * z_a.grad))[1] < kl(wrong_classes(Z_B), wrong_classes(Z_A))[1]


def _identity_model():
    """Encoders = identity, heads = identity Linear(3, 3): the logits are the inputs."""
    model = LateFusionModel({m: nn.Identity() for m in "ab"}, {m: ClassifierHead(3, 3, hidden=()) for m in "ab"})
    with torch.no_grad():
        for head in model.heads.values():
            head.linears[0].weight.copy_(torch.eye(3))
            head.linears[0].bias.zero_()
    return model


def test_the_mask_changes_the_update_by_the_guided_gradient_and_lambda_0_is_the_base_loss():
    batch = Batch({"a": Z_A, "b": Z_B}, Y)
    updates = {}
    for lam in (0.7, 0.0):
        model = _identity_model()
        _method(model, lr=1.0, lam=lam).training_step(batch, make_step())
        updates[lam] = {m: model.heads[m].linears[0].weight - torch.eye(3) for m in "ab"}
    z = {m: Z_A.clone().requires_grad_() if m == "a" else Z_B.clone().requires_grad_() for m in "ab"}
    (F.cross_entropy((z["a"] + z["b"]) / 2, Y) + F.cross_entropy(z["a"], Y) + F.cross_entropy(z["b"], Y)).backward()
    for m in "ab":                                           # λ = 0: W ← W − ∂L_base/∂z^T x
        x = Z_A if m == "a" else Z_B
        torch.testing.assert_close(updates[0.0][m], -(z[m].grad.T @ x))
    a_guides_b, b_guides_a = guidance_masks(Z_A, Z_B, (Z_A + Z_B) / 2, Y)
    extra = {"b": _nl_gradient(Z_A, Z_B, Y, a_guides_b, 0.7), "a": _nl_gradient(Z_B, Z_A, Y, b_guides_a, 0.7)}
    for m in "ab":                                           # λ > 0: plus exactly the masked NL gradient
        x = Z_A if m == "a" else Z_B
        torch.testing.assert_close(updates[0.7][m] - updates[0.0][m], -(extra[m].T @ x))
        assert not torch.equal(updates[0.7][m], updates[0.0][m])


def test_lambda_0_paper_objective_is_exactly_the_base_loss():
    batch = _batches(1)[0]
    model = _model()
    z = model(batch.inputs)
    base = F.cross_entropy((z["a"] + z["b"]) / 2, batch.labels) + sum(F.cross_entropy(z[m], batch.labels) for m in "ab")
    logs = _method(model, lam=0.0).training_step(batch, make_step())
    torch.testing.assert_close(logs["loss"], base.detach())


def test_warmup_epochs_train_on_the_base_loss_then_guidance_starts():
    batch = _batches(1)[0]
    after = {}
    for name, params, epoch in (("warm", {"warmup_epochs": 2}, 1), ("base", {"lam": 0.0}, 1),
                                ("started", {"warmup_epochs": 2}, 2), ("guided", {}, 2)):
        model = _model()
        logs = _method(model, **params).training_step(batch, make_step(epoch))
        after[name] = (logs, [p.detach().clone() for p in model.parameters()])
    for p, q in zip(after["warm"][1], after["base"][1]):
        torch.testing.assert_close(p, q)
    for p, q in zip(after["started"][1], after["guided"][1]):
        torch.testing.assert_close(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(after["warm"][1], after["started"][1]))
    assert after["warm"][0]["mnl_guided_a"] == 0.0 and after["warm"][0]["mnl_guided_b"] == 0.0
    assert float(after["started"][0]["mnl_guided_a"]) + float(after["started"][0]["mnl_guided_b"]) > 0


# ---- prediction, settings, edge cases ----------------------------------------------------------
def test_the_default_prediction_is_the_softmax_of_the_mean_logits():
    model = _model()
    method = _method(model)
    xs = _batches(1)[0].inputs
    fused, per = method.predict(xs)
    z = model(xs)
    torch.testing.assert_close(fused, F.softmax((z["a"] + z["b"]) / 2, dim=1))
    torch.testing.assert_close(per["b"], F.softmax(z["b"], dim=1))
    fused_avg, _ = _method(_model(), fusion="average").predict(xs)
    torch.testing.assert_close(fused_avg, (F.softmax(z["a"], 1) + F.softmax(z["b"], 1)) / 2)


def test_defaults_and_bad_parameters():
    method = MNL()
    assert (method.lam, method.objective, method.warmup_epochs, method.fusion) == (0.7, "paper", 0, "model")
    with pytest.raises(MieInputError, match="lam must be a number >= 0"):
        MNL(lam=-0.1)
    with pytest.raises(MieInputError, match="objective must be one of 'paper', 'released'"):
        MNL(objective="code")
    with pytest.raises(MieInputError, match="warmup_epochs must be an integer >= 0"):
        MNL(warmup_epochs=1.5)
    with pytest.raises(MieInputError, match="fusion must be one of"):
        MNL(fusion="concat")
    with pytest.raises(MieInputError, match="unknown parameter"):
        MNL(alpha=1.0)


def test_three_modalities_and_one_modality_are_refused():
    with pytest.raises(MieInputError, match="exactly 2 modalities, got 3"):
        _method(_model(("a", "b", "c")))
    with pytest.raises(MieInputError, match="unimodal"):
        _method(_model(("a",)))


def test_notices_when_the_guidance_cannot_act():
    assert _method(_model(), epochs=3).notices() == []
    notices = _method(_model(), epochs=3, warmup_epochs=3).notices()
    assert len(notices) == 1 and "never acts" in notices[0]
    assert "lam=0" in _method(_model(), lam=0.0).notices()[0]
    assert _method(_model(), lam=0.0, objective="released").notices() == []


def test_train_through_the_cli(monkeypatch, npz_file, tmp_path):
    monkeypatch.setitem(mie.methods.METHODS, "mnl", (MNL, {}, "MNL"))
    out = tmp_path / "run"
    code = mie.cli.main(["train", "--data", str(npz_file), "--method", "mnl", "--out", str(out), *TINY,
                         "method.objective=released"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "mnl" and metrics["method_params"]["objective"] == "released"
    assert set(metrics["test"]["per_modality"]) == {"a", "b"} and 0 <= metrics["test"]["accuracy"] <= 1
    history = (out / "history.csv").read_text().splitlines()
    assert "mnl_guided_a" in history[0] and len(history) == 3
