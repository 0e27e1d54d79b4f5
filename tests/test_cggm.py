"""CGGM (mie.methods.cggm): parity with a transcription of the authors' released training loop
(two and three modalities); the balancing coefficients B_i scale each encoder's gradient as computed
by hand (including a sign flip, and the opt-in clamp); the direction term L_gm and its gradient by
hand; the auxiliary classifiers train on detached features at their own learning rate and are not
used by the fused prediction; parameter checks; one modality refused; three modalities, resume and
the CLI through the loop."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score
from torch import nn

import mie
from conftest import TINY, make_arrays, make_context, make_step
from mie.cli import main
from mie.errors import MieInputError
from mie.methods import Batch
from mie.methods.cggm import CGGM, balancing_coefficients, direction_term
from mie.models import ClassifierHead, MultiHeadModel
from mie.train import Optimizers


def _model(mods=("a", "b"), hidden=(4,), seed=0):
    torch.manual_seed(seed)
    enc = {m: nn.Linear(3 + i, 2) for i, m in enumerate(mods)}
    heads = {m: ClassifierHead(2, 3, hidden=hidden) for m in mods}
    return MultiHeadModel(enc, heads, ClassifierHead(2 * len(mods), 3, hidden=hidden), "concat")


def _batches(mods=("a", "b"), n=15, size=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = {m: torch.randn(n, 3 + i, generator=g) for i, m in enumerate(mods)}
    y = torch.randint(0, 3, (n,), generator=g)
    return [Batch({m: x[i:i + size] for m, x in xs.items()}, y[i:i + size]) for i in range(0, n, size)]


def _method(model, optimizer="sgd", lr=0.1, **params):
    """A CGGM set up on ``model`` with the loop's optimizer factory, learning rates applied as the loop
    does at an epoch start (so the auxiliary group runs at cls_lr_ratio × lr)."""
    opts = Optimizers({"optimizer": optimizer, "lr": lr, "momentum": 0.0, "weight_decay": 0.0,
                       "betas": (0.9, 0.999)})
    method = CGGM(**params)
    method.setup(model, make_context(model.modalities, make_optimizer=opts.make))
    opts.apply(1.0, method)
    return method


# ---- parity with the authors' released code ---------------------------------------------------
# A transcription of zrguo/CGGM @21e428c src/msatrain.py lines 46-47 and 56-127 (three modalities;
# src/foodtrain.py lines 54-55 and 64-135 is the same loop for two, with the modulation spelled
# out per encoder name at lines 125-129), with src/eval_metrics.py lines 165-173 (cal_cos) and
# lines 56-73 (train accuracy: argmax, accuracy_score), models/msamodel.py lines 53-74 and 97-131
# (the model returns detached copies of the encoder outputs; one classifier per modality, each with
# an ``out_layer``). The models are small MLP stand-ins with the code's parameter names; Adam for
# both optimizers (iemo_run.py line 51), classifier lr = 0.5 × lr (lines 47-49). L_gm is carried
# to the next step as an autograd graph, as the code does.
class _CodeModel(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.encoders = nn.ModuleList(copy.deepcopy(model.encoders[m]) for m in model.modalities)
        self.fusion = copy.deepcopy(model.fused_head.net[:-1])
        self.out_layer = copy.deepcopy(model.fused_head.net[-1])

    def forward(self, x):
        hs, hs_detach = [], []
        for i in range(len(x)):
            h_tmp = self.encoders[i](x[i])
            hs.append(h_tmp)
            hs_detach.append(h_tmp.clone().detach())
        return self.out_layer(self.fusion(torch.cat(hs, dim=1))), hs_detach


class _CodeClassifier(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.bone = copy.deepcopy(head.net[:-1])
        self.out_layer = copy.deepcopy(head.net[-1])

    def forward(self, x):
        return self.out_layer(self.bone(x))


class _CodeClassifierGuided(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.classifers = nn.ModuleList(_CodeClassifier(model.heads[m]) for m in model.modalities)

    def cal_coeff(self, y, cls_res):
        return [accuracy_score(y.numpy(), np.argmax(r.detach().numpy(), axis=1)) for r in cls_res]

    def forward(self, x):
        return [self.classifers[i](x[i]) for i in range(len(x))]


def _code_cal_cos(cls_grad, fusion_grad):
    fgn = fusion_grad.clone().view(-1)
    loss = list()
    for i in range(len(cls_grad)):
        tmp = cls_grad[i].clone().view(-1)
        loss.append(F.cosine_similarity(tmp, fgn, dim=0))
    return loss


def _code_train(model, classifier, batches, epochs, lr, cls_lr, rou, lamda, clip):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    cls_optimizer = torch.optim.Adam(classifier.parameters(), lr=cls_lr)
    criterion = nn.CrossEntropyLoss()
    num_mod = len(model.encoders)
    acc1 = [0] * num_mod
    l_gm = None
    coeffs = []
    for _ in range(epochs):
        for xs, eval_attr in batches:
            model.zero_grad()
            preds, hs = model(list(xs.values()))
            raw_loss = criterion(preds, eval_attr)
            if l_gm is not None:
                raw_loss += lamda * l_gm
            raw_loss.backward()

            cls_optimizer.zero_grad()
            cls_res = classifier(hs)
            for name, para in model.named_parameters():
                if 'out_layer.weight' in name:
                    fusion_grad = para
            cls_loss = criterion(cls_res[0], eval_attr)
            for i in range(1, num_mod):
                cls_loss += criterion(cls_res[i], eval_attr)
            cls_loss.backward()
            cls_grad = []
            for name, para in classifier.named_parameters():
                if 'out_layer.weight' in name:
                    cls_grad.append(para)
            llist = _code_cal_cos(cls_grad, fusion_grad)

            acc2 = classifier.cal_coeff(eval_attr, cls_res)
            diff = [acc2[i] - acc1[i] for i in range(num_mod)]
            diff_sum = sum(diff) + 1e-8
            coeff = list()
            for d in diff:
                coeff.append((diff_sum - d) / diff_sum)
            acc1 = acc2
            l_gm = np.sum(np.abs(coeff)) - sum(coeff[i] * llist[i] for i in range(num_mod))
            l_gm /= num_mod

            for i in range(num_mod):
                for name, params in model.named_parameters():
                    if f'encoders.{i}' in name:
                        params.grad *= (coeff[i] * rou)
            cls_optimizer.step()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            coeffs.append(coeff)
    return coeffs


@pytest.mark.parametrize("mods", [("a", "b"), ("a", "b", "c")], ids=["food-2", "msa-3"])
def test_parity_with_the_released_training_loop(mods):
    model = _model(mods)
    code_model, code_classifier = _CodeModel(model), _CodeClassifierGuided(model)
    batches = _batches(mods, n=24, size=6)
    code_coeffs = _code_train(code_model, code_classifier, batches, epochs=3, lr=0.05, cls_lr=0.025,
                              rou=1.3, lamda=0.2, clip=0.8)

    method = _method(model, optimizer="adam", lr=0.05)
    coeffs = []
    for epoch in range(3):
        for index, batch in enumerate(batches):
            logs = method.training_step(batch, make_step(epoch, index, len(batches)))
            coeffs.append([logs[f"cggm_coeff_{m}"] for m in mods])

    assert coeffs == code_coeffs
    assert any(min(c) < 0 or max(c) > 1 for c in coeffs)         # the unbounded B_i occur in this run
    assert len({tuple(c) for c in coeffs}) > 3
    for i, m in enumerate(mods):
        for p, q in zip(model.encoders[m].parameters(), code_model.encoders[i].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for p, q in zip(model.heads[m].parameters(), code_classifier.classifers[i].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    fused = list(model.fused_head.parameters())
    code_fused = list(code_model.fusion.parameters()) + list(code_model.out_layer.parameters())
    for p, q in zip(fused, code_fused):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ---- the balancing coefficients B_i scale the encoders' gradients ------------------------------
def _by_hand(model, batch):
    """Per-encoder gradients of CE(fused logits) and the auxiliary classifiers' batch accuracies."""
    twin = copy.deepcopy(model)
    xs, y = batch
    F.cross_entropy(twin.fused_logits(twin.features(xs)), y).backward()
    grads = {m: [p.grad.clone() for p in twin.encoders[m].parameters()] for m in model.modalities}
    with torch.no_grad():
        acc = {m: (twin.heads[m](twin.encoders[m](xs[m])).argmax(1) == y).float().mean().item()
               for m in model.modalities}
    return grads, acc


@pytest.mark.parametrize("deltas, coeff_clip, expected", [
    ((0.3, 0.1), None, ((0.1 + 1e-8) / (0.4 + 1e-8), (0.3 + 1e-8) / (0.4 + 1e-8))),
    ((0.3, -0.1), None, ((-0.1 + 1e-8) / (0.2 + 1e-8), (0.3 + 1e-8) / (0.2 + 1e-8))),   # B_a < 0: ascent
    ((0.3, -0.1), 1.0, (0.0, 1.0)),                                                        # clamped (ours)
], ids=["both-improve", "sign-flip", "clamped"])
def test_encoder_updates_are_the_joint_gradients_times_rho_B(deltas, coeff_clip, expected):
    model = _model()
    batch = _batches()[0]
    grads, acc = _by_hand(model, batch)
    before = {m: [p.detach().clone() for p in model.encoders[m].parameters()] for m in model.modalities}
    method = _method(model, lr=0.1, clip=None, lam=0.0, coeff_clip=coeff_clip)
    method.prev_acc = {m: acc[m] - d for m, d in zip(model.modalities, deltas)}

    logs = method.training_step(batch, make_step())

    for m, b in zip(model.modalities, expected):
        assert logs[f"cggm_coeff_{m}"] == pytest.approx(b, rel=1e-6)
        for p, p0, g in zip(model.encoders[m].parameters(), before[m], grads[m]):
            torch.testing.assert_close(p.detach(), p0 - 0.1 * 1.3 * b * g)
    if expected[0] < 0:   # encoder a stepped up its gradient
        assert all(float(((p.detach() - p0) * g).sum()) > 0
                   for p, p0, g in zip(model.encoders["a"].parameters(), before["a"], grads["a"]))


def test_balancing_coefficients_follow_the_code_including_the_degenerate_cases():
    assert balancing_coefficients({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == {"a": 1.0, "b": 1.0}
    b = balancing_coefficients({"a": 0.6, "b": 0.4}, {"a": 0.5, "b": 0.5})       # Δ = (0.1, −0.1): S = 1e-8
    assert b["a"] < -1e6 and b["b"] > 1e6
    assert balancing_coefficients({"a": 0.6, "b": 0.4}, {"a": 0.5, "b": 0.5}, coeff_clip=2.0) == {"a": 0.0, "b": 2.0}
    three = balancing_coefficients({"a": 0.2, "b": 0.3, "c": 0.5}, {"a": 0.0, "b": 0.0, "c": 0.0})
    assert three == pytest.approx({"a": 0.8, "b": 0.7, "c": 0.5})
    assert sum(three.values()) == pytest.approx(2.0)                            # Σ B_i = M − 1


def test_clipping_bounds_the_fused_models_gradient_norm_only():
    model = _model()
    batch = _batches()[0]
    method = _method(model, lr=1.0, clip=0.8, lam=0.0)
    method.prev_acc = {"a": 0.6, "b": 0.4}       # whatever the accuracies, B is of order 1e7
    before = [p.detach().clone() for p in method.parameter_groups(model)]
    method.training_step(batch, make_step())
    step = torch.cat([(p.detach() - p0).reshape(-1) for p, p0 in zip(method.parameter_groups(model), before)])
    assert float(step.norm()) == pytest.approx(0.8, rel=1e-4)       # SGD lr 1: the update is the clipped gradient


# ---- the direction term L_gm ------------------------------------------------------------------
def _dcos(U, W):
    """∂cos(U, W)/∂W = U/(|U||W|) − cos(U, W)·W/|W|²."""
    c = (U * W).sum() / (U.norm() * W.norm())
    return U / (U.norm() * W.norm()) - c * W / W.norm() ** 2


def test_direction_term_and_its_gradient_by_hand():
    g = torch.Generator().manual_seed(0)
    Wa, Wb, W = (torch.randn(3, 4, generator=g) for _ in range(3))
    coeffs = {"a": 0.7, "b": -0.4}
    gm, grad, cos = direction_term({"a": Wa, "b": Wb}, W, coeffs)
    cos_a = float((Wa * W).sum() / (Wa.norm() * W.norm()))
    cos_b = float((Wb * W).sum() / (Wb.norm() * W.norm()))
    assert float(cos["a"]) == pytest.approx(cos_a, rel=1e-5) and float(cos["b"]) == pytest.approx(cos_b, rel=1e-5)
    assert float(gm) == pytest.approx((0.7 + 0.4 - 0.7 * cos_a + 0.4 * cos_b) / 2, rel=1e-5)
    torch.testing.assert_close(grad, -(0.7 * _dcos(Wa, W) - 0.4 * _dcos(Wb, W)) / 2)


def test_direction_term_uses_each_modalitys_block_when_the_fused_layer_is_wider():
    g = torch.Generator().manual_seed(0)
    Wa, Wb, W = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g), torch.randn(3, 4, generator=g)
    gm, grad, cos = direction_term({"a": Wa, "b": Wb}, W, {"a": 1.0, "b": 1.0})
    assert float(cos["a"]) == pytest.approx(float(F.cosine_similarity(Wa.reshape(-1), W[:, :2].reshape(-1), dim=0)))
    assert float(cos["b"]) == pytest.approx(float(F.cosine_similarity(Wb.reshape(-1), W[:, 2:].reshape(-1), dim=0)))
    assert grad.shape == W.shape


def test_the_previous_steps_direction_term_reaches_the_fused_output_layer_only():
    """Step 2's update = the plain step-2 update, + λ·∂L_gm^(1)/∂W (by hand, at the weights step 1
    started from) on the fused output layer W; nothing else changes, the auxiliary classifiers included."""
    model = _model()
    b1, b2 = _batches()[:2]
    method = _method(model, lr=0.1, lam=0.5, clip=None)
    W0 = model.fused_head.linears[-1].weight.detach().clone()
    W0_aux = {m: model.heads[m].linears[-1].weight.detach().clone() for m in model.modalities}
    logs = method.training_step(b1, make_step(0, 0, 2))
    B = {m: logs[f"cggm_coeff_{m}"] for m in model.modalities}
    expected = -sum(B[m] * _dcos(W0_aux[m], W0) for m in model.modalities) / 2

    twin = copy.deepcopy(model)
    plain = _method(twin, lr=0.1, lam=0.0, clip=None)
    plain.prev_acc = dict(method.prev_acc)
    method.training_step(b2, make_step(0, 1, 2))
    plain.training_step(b2, make_step(0, 1, 2))

    W, W_twin = model.fused_head.linears[-1].weight, twin.fused_head.linears[-1].weight
    assert float(expected.abs().sum()) > 0
    torch.testing.assert_close(W.detach(), W_twin.detach() - 0.1 * 0.5 * expected)
    for p, q in zip(model.parameters(), twin.parameters()):
        if p is not W:
            torch.testing.assert_close(p, q)


def test_auxiliary_classifiers_train_on_detached_features_at_the_ratio_of_the_learning_rate():
    model = _model()
    batch = _batches()[0]
    xs, y = batch
    twin = copy.deepcopy(model)
    feats = {m: twin.encoders[m](xs[m]).detach() for m in model.modalities}
    sum(F.cross_entropy(twin.heads[m](feats[m]), y) for m in model.modalities).backward()
    method = _method(model, lr=0.2, cls_lr_ratio=0.25)
    method.training_step(batch, make_step())
    for m in model.modalities:
        for p, q in zip(model.heads[m].parameters(), twin.heads[m].parameters()):
            torch.testing.assert_close(p.detach(), q.detach() - 0.2 * 0.25 * q.grad)
    assert [g["lr"] for g in method.aux_optimizer.param_groups] == [pytest.approx(0.05)]
    assert [g["lr"] for g in method.optimizer.param_groups] == [pytest.approx(0.2)]


def test_fused_prediction_is_the_fused_head_and_per_modality_predictions_the_auxiliary_classifiers():
    model = _model()
    method = _method(model)
    xs, _ = _batches()[0]
    fused, per = method.predict(xs)
    feats = model.features(xs)
    torch.testing.assert_close(fused, F.softmax(model.fused_logits(feats), dim=-1))
    for m in model.modalities:
        torch.testing.assert_close(per[m], F.softmax(model.heads[m](feats[m]), dim=-1))
    with torch.no_grad():
        for m in model.modalities:
            model.heads[m].linears[-1].weight.add_(1.0)
    torch.testing.assert_close(method.predict(xs)[0], fused)      # the auxiliary classifiers are not used


# ---- edge cases ---------------------------------------------------------------------------------
def test_bad_parameters_and_one_modality_are_refused():
    for params, message in [({"rho": -1}, "rho must be a number >= 0"), ({"lam": -0.1}, "lam must be a number >= 0"),
                            ({"clip": 0}, "clip must be None or a number > 0"),
                            ({"cls_lr_ratio": 0}, "cls_lr_ratio must be a number > 0"),
                            ({"coeff_clip": -1}, "coeff_clip must be None or a number > 0"),
                            ({"fusion": "concat"}, "fusion must be one of"), ({"beta": 1}, "unknown parameter")]:
        with pytest.raises(MieInputError, match=message):
            CGGM(**params)
    with pytest.raises(MieInputError, match="unimodal"):
        _method(_model(mods=("a",)))


CONFIG = {"train": {"epochs": 3, "batch_size": 16}, "model": {"dim": 8, "head_hidden": [8]}}


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(mie.methods.METHODS, "cggm", (CGGM, {}, "CGGM"))


def test_three_modalities_run_through_the_loop(registered):
    x, y = make_arrays(n=60, shapes={"a": (6,), "b": (4,), "c": (5,)})
    rows = []
    result = mie.fit(mie.MultimodalArrays(x, y), "cggm", config=CONFIG, epochs=2, seed=0, progress=False,
                     callbacks=[lambda e, row: rows.append(row)])
    assert set(result["test"]["per_modality"]) == {"a", "b", "c"}
    assert {f"cggm_coeff_{m}" for m in "abc"} | {"cggm_gm", "cggm_aux_loss"} <= set(rows[-1])
    assert result["budget"]["modality_epochs"] == {"a": 2, "b": 2, "c": 2}


def test_resumed_run_matches_the_uninterrupted_run(registered, tmp_path):
    class Crash(Exception):
        pass

    def crash(epoch, row):
        if epoch == 1:
            raise Crash
    data = mie.MultimodalArrays(*make_arrays(n=60))
    whole = mie.fit(data, "cggm", config=CONFIG, out_dir=tmp_path / "whole", seed=3, progress=False)
    with pytest.raises(Crash):
        mie.fit(data, "cggm", config=CONFIG, out_dir=tmp_path / "cut", seed=3, progress=False, callbacks=[crash])
    resumed = mie.fit(data, "cggm", config=CONFIG, out_dir=tmp_path / "cut", seed=3, progress=False, resume=True)
    assert resumed["val"] == whole["val"] and resumed["test"] == whole["test"]
    assert (tmp_path / "cut" / "history.csv").read_text().count("\n") == 4
    drop = lambda text: [line.rsplit(",", 1)[0] for line in text.splitlines()]     # "seconds" is last
    assert drop((tmp_path / "cut" / "history.csv").read_text()) == drop((tmp_path / "whole" / "history.csv").read_text())


def test_cli_trains_and_writes_metrics(registered, npz_file, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", str(npz_file), "--method", "cggm", "--out", str(out), *TINY,
                 "method.coeff_clip=1.0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "cggm" and metrics["method_params"]["coeff_clip"] == 1.0
    assert set(metrics["test"]["per_modality"]) == {"a", "b"} and 0 <= metrics["test"]["accuracy"] <= 1
