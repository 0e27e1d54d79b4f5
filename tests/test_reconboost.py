"""ReconBoost (mie.methods.reconboost): parity with a transcription of the authors' released training
loop (both phases, fresh optimizers per phase, the consolidation term without gradient); the
reconcilement weights (w1 − w2·q_y)/C by hand and their effect on a step and on training; the stage
plan that gives every modality exactly the budget; inference; M ≥ 3; refusals; the CLI."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie
from conftest import TINY, make_arrays, make_context, make_step
from mie.cli import main as cli_main
from mie.errors import MieInputError
from mie.methods import Batch, METHODS
from mie.methods.reconboost import BOOST, RECTIFY, ReconBoost, ReconBoostModel, reconcilement_weights, stage_plan
from mie.models import ClassifierHead

C = 3


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    monkeypatch.setitem(METHODS, "reconboost", (ReconBoost, {}, "ReconBoost"))


def _model(mods=("a", "v"), beta=1.0):
    torch.manual_seed(0)
    enc = {m: nn.Sequential(nn.Linear(3 + i, 2), nn.ReLU()) for i, m in enumerate(mods)}
    return ReconBoostModel(enc, ClassifierHead(2, C, hidden=(4,)), beta)


def _batches(mods=("a", "v"), n=10, at=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = {m: torch.randn(n, 3 + i, generator=g) for i, m in enumerate(mods)}
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 0])[:n]
    return [Batch({m: x[:at] for m, x in xs.items()}, y[:at]), Batch({m: x[at:] for m, x in xs.items()}, y[at:])]


def _sgd(lr=0.05, momentum=0.9, weight_decay=5e-4):
    return lambda params, lr_=None: torch.optim.SGD(list(params), lr=lr_ or lr, momentum=momentum,
                                                    weight_decay=weight_decay)


def _drive(method, model, batches, epochs, make_optimizer=None):
    """Run the method by hand over every loop epoch; returns each step's logs."""
    ctx = make_context(model.modalities, train_batches=batches, epochs_per_modality=epochs,
                       make_optimizer=make_optimizer or _sgd())
    method.setup(model, ctx)
    model.train()
    logs = []
    for epoch in range(method.num_epochs(epochs)):
        method.start_epoch(epoch)
        for i, batch in enumerate(batches):
            logs.append(method.training_step(batch, make_step(epoch, i, len(batches))))
        method.end_epoch(epoch)
    return logs


# ---- parity with the authors' released code ---------------------------------------------------------
# A transcription, in plain torch, of huacong/ReconBoost @14ab57a train.py lines 259-402: per stage,
# model_name = schedule_model(stage) (schedule.py lines 50-55: round robin), phase 1 with a NEW
# optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=5e-4) (line 296) where model.fc is the
# shared head (lines 287-288), out_join = boost_rate * Σ of the other learners under no_grad
# (dynamic_net.py lines 122-135), the boosting loss (lines 337-340)
#     - weight1 * (target * out_obj.log_softmax(1)).mean(-1)
#     + weight2 * (target * out_join.detach().softmax(1) * out_obj.log_softmax(1)).mean(-1)
# plus alpha * mse(out_obj.detach().softmax(1), pre_out_obj.detach().softmax(1)) from stage 1 on
# (lines 344-352), loss.mean().backward(); then phase 2 with a NEW optim.SGD(net_ensemble.parameters())
# (line 371: encoders without fc, the head, boost_rate; dynamic_net.py lines 59-73) on
# CrossEntropyLoss(boost_rate * Σ_m f_m, lbl) (lines 397-402, dynamic_net.py lines 137-170).
def _released_loop(model, batches, stages, epochs_per_stage, correct_epoch, weight1=5.0, weight2=1.0,
                   alpha=0.5, lr=0.05):
    mods = list(model.modalities)
    encoders = {m: copy.deepcopy(model.encoders[m]) for m in mods}
    head = copy.deepcopy(model.head)
    boost_rate = nn.Parameter(model.boost_rate.detach().clone())

    def f(m, x):                                  # the encoder with model.fc = net_ensemble.head
        return head(encoders[m](x))

    logged = []
    for stage in range(stages):
        model_name = mods[stage % len(mods)]
        pre_model_name = mods[stage % len(mods) - 1]
        optimizer = torch.optim.SGD(list(encoders[model_name].parameters()) + list(head.parameters()), lr,
                                    momentum=0.9, weight_decay=5e-4)
        for _ in range(epochs_per_stage):
            for (xs, lbl) in batches:
                with torch.no_grad():
                    prediction = None
                    for m in mods:
                        if m == model_name:
                            continue
                        pred = f(m, xs[m])
                        prediction = pred if prediction is None else prediction + pred
                    out_join = boost_rate * prediction
                out_obj = f(model_name, xs[model_name])
                target = torch.zeros(len(lbl), C).scatter_(1, lbl.view(-1, 1), 1)
                boosting_loss = - weight1 * (target * out_obj.log_softmax(1)).mean(-1) \
                    + weight2 * (target * out_join.detach().softmax(1) * out_obj.log_softmax(1)).mean(-1)
                for p in list(encoders[model_name].parameters()) + list(head.parameters()):
                    p.grad = None
                if stage == 0:
                    loss = boosting_loss
                else:
                    pre_out_obj = f(pre_model_name, xs[pre_model_name])
                    ga_loss = F.mse_loss(out_obj.detach().softmax(1), pre_out_obj.detach().softmax(1))
                    loss = boosting_loss + alpha * ga_loss
                loss.mean().backward()
                optimizer.step()
                logged.append(boosting_loss.mean().item())
        ensemble_params = [p for m in mods for p in encoders[m].parameters()] + list(head.parameters()) + [boost_rate]
        optimizer_correct = torch.optim.SGD(ensemble_params, lr, momentum=0.9, weight_decay=5e-4)
        for _ in range(correct_epoch):
            for (xs, lbl) in batches:
                prediction = None
                for m in mods:
                    pred = f(m, xs[m])
                    prediction = pred if prediction is None else prediction + pred
                out = boost_rate * prediction
                loss = F.cross_entropy(out, lbl)
                optimizer_correct.zero_grad()
                loss.backward()
                optimizer_correct.step()
    state = {f"encoders.{m}.{k}": v for m in mods for k, v in encoders[m].state_dict().items()}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    state["boost_rate"] = boost_rate.detach()
    return state, logged


@pytest.mark.parametrize("mods", [("a", "v"), ("a", "v", "t")])
def test_parity_with_the_released_training_loop(mods):
    model, batches = _model(mods), _batches(mods)
    P, R = 2, 1
    E = P + len(mods) * R                        # one whole cycle: stages 0..M-1, two steps per epoch
    expected, expected_logged = _released_loop(model, batches, len(mods), P, R)
    logs = _drive(ReconBoost(epochs_per_stage=P, rectify_epochs=R), model, batches, E)
    got = model.state_dict()
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    boosted = [v for row in logs for k, v in row.items() if k.startswith("boost_loss_")]
    torch.testing.assert_close(torch.tensor([float(v) for v in boosted]), torch.tensor(expected_logged))


def test_the_consolidation_term_has_no_gradient_and_moves_only_the_logged_loss():
    runs = {}
    for alpha in (0.0, 0.5, 50.0):
        model, batches = _model(), _batches()
        logs = _drive(ReconBoost(epochs_per_stage=1, rectify_epochs=1, alpha=alpha), model, batches, 3)
        runs[alpha] = (model.state_dict(), logs)
    for alpha in (0.5, 50.0):
        for k, v in runs[0.0][0].items():
            assert torch.equal(runs[alpha][0][k], v), k
    late = [row for row in runs[50.0][1] if "consolidation" in row]
    assert late and all(float(r["loss"]) == pytest.approx(float(r["boost_loss_v"]) + 50 * float(r["consolidation"]))
                        for r in late)
    assert not any("consolidation" in row for row in runs[50.0][1][:2])      # stage 0: absent, as the code


def test_restarting_the_optimizer_at_each_phase_matters_with_momentum():
    states = []
    for restart in (True, False):
        model, batches = _model(), _batches()
        _drive(ReconBoost(epochs_per_stage=1, rectify_epochs=1, restart_optimizer=restart), model, batches, 3)
        states.append(model.state_dict())
    assert any(not torch.allclose(states[0][k], states[1][k]) for k in states[0])


# ---- the reconcilement weights (w1 − w2·q_y)/C --------------------------------------------------------
def test_reconcilement_weights_by_hand():
    y = torch.tensor([0, 2, 1])
    others = torch.tensor([[math.log(2.0), 0.0, 0.0],      # q = (1/2, 1/4, 1/4): q_y = 1/2
                           [0.0, 0.0, 0.0],                # q_y = 1/3
                           [0.0, 30.0, 0.0]])              # q_y ≈ 1
    want = torch.tensor([(5 - 0.5) / 3, (5 - 1 / 3) / 3, (5 - 1.0) / 3])
    torch.testing.assert_close(reconcilement_weights(others, y, 5.0, 1.0), want)
    torch.testing.assert_close(reconcilement_weights(others, y, 5.0, 0.0), torch.full((3,), 5 / 3))


def _one_boost_step(w2, mods=("a", "v")):
    """Parameters before and after one phase-1 step of modality a (plain SGD, lr 1), and the batch."""
    model, batches = _model(mods), _batches(mods)
    method = ReconBoost(epochs_per_stage=1, rectify_epochs=1, w2=w2)
    method.setup(model, make_context(model.modalities, train_batches=batches, epochs_per_modality=3,
                                     make_optimizer=_sgd(lr=1.0, momentum=0.0, weight_decay=0.0)))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method.start_epoch(0)
    method.training_step(batches[0], make_step(0, 0, 2))
    return model, before, batches[0]


def _grad_of(model, before, loss_fn):
    """Gradient over φ_a and h of ``loss_fn(f_a, f_others)`` at the parameters ``before``."""
    twin = copy.deepcopy(model)
    twin.load_state_dict(before)
    params = list(twin.encoders["a"].parameters()) + list(twin.head.parameters())
    loss = loss_fn(twin)
    return torch.autograd.grad(loss, params)


def test_a_boosting_step_follows_the_hand_weighted_loss_and_not_plain_cross_entropy():
    model, before, (xs, y) = _one_boost_step(w2=1.0)
    step = [before[k] - v for k, v in model.state_dict().items() if k.startswith(("encoders.a.", "head."))]

    def weighted(twin):
        with torch.no_grad():
            q = F.softmax(twin.boost_rate * twin.head(twin.encoders["v"](xs["v"])), dim=-1)
        w = (5.0 - 1.0 * q[torch.arange(len(y)), y]) / C
        return (w * F.cross_entropy(twin.head(twin.encoders["a"](xs["a"])), y, reduction="none")).mean()

    def plain(twin):
        return F.cross_entropy(twin.head(twin.encoders["a"](xs["a"])), y)

    names = [k for k in before if k.startswith(("encoders.a.", "head."))]
    for k, d, g in zip(names, step, _grad_of(model, before, weighted)):
        torch.testing.assert_close(d, g, msg=k)
    flat = lambda ts: torch.cat([t.flatten() for t in ts])
    cosine = F.cosine_similarity(flat(step), flat(_grad_of(model, before, plain)), dim=0)
    assert cosine < 0.9999                          # not plain CE, not a rescaled plain CE either
    # With w2 = 0 the weights are the constant w1/C: exactly plain CE scaled by 5/3.
    model0, before0, _ = _one_boost_step(w2=0.0)
    step0 = [before0[k] - v for k, v in model0.state_dict().items() if k.startswith(("encoders.a.", "head."))]
    for d, g in zip(step0, _grad_of(model0, before0, plain)):
        torch.testing.assert_close(d, 5 / 3 * g)


def test_a_boosting_step_leaves_the_other_learners_and_beta_alone():
    model, before, _ = _one_boost_step(w2=1.0)
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]) != k.startswith(("encoders.a.", "head.")), k


def test_reweighting_changes_training():
    x, y = make_arrays(n=90)
    cfg = {"train": {"epochs": 3, "batch_size": 16}, "model": {"dim": 8, "head_hidden": [8]}}
    runs = [mie.fit(mie.MultimodalArrays(x, y), "reconboost", config=cfg, seed=0, progress=False, w2=w2,
                    epochs_per_stage=1, rectify_epochs=1) for w2 in (1.0, 0.0)]
    assert runs[0]["val"] != runs[1]["val"] or runs[0]["test"] != runs[1]["test"]


# ---- the budget -------------------------------------------------------------------------------------
@pytest.mark.parametrize("M", [2, 3, 4])
@pytest.mark.parametrize("P, R", [(4, 4), (1, 1), (3, 0), (1, 5)])
def test_every_modality_gets_exactly_the_budget(M, P, R):
    cycle = [f"m{i}" for i in range(M)]
    for E in range(1, 40):
        plan = stage_plan(cycle, P, R, E)
        rectify = sum(phase == RECTIFY for _, _, phase in plan)
        for m in cycle:
            assert sum(phase == BOOST and k == m for _, k, phase in plan) + rectify == E
            assert sum(phase == BOOST and k == m for _, k, phase in plan) >= 1
        stages = [s for s, _, _ in plan]
        assert stages == sorted(stages) and [plan[i][1] for i in range(len(plan))] == \
            [cycle[s % M] for s in stages]                      # round robin, stage by stage


def test_the_papers_four_plus_four_cycle():
    plan = stage_plan(["audio", "visual"], 4, 4, 12)
    assert plan == [(0, "audio", BOOST)] * 4 + [(0, "audio", RECTIFY)] * 4 + \
                   [(1, "visual", BOOST)] * 4 + [(1, "visual", RECTIFY)] * 4
    long = stage_plan(["audio", "visual"], 4, 4, 100)
    assert len(long) == 8 * 16 + 5 and long[128:] == [(16, "audio", BOOST)] + [(16, "audio", RECTIFY)] * 2 + \
        [(17, "visual", BOOST), (17, "visual", RECTIFY)]


def test_three_modalities_through_the_loop_with_a_short_budget_notice():
    x, y = make_arrays(n=60, shapes={"a": (6,), "b": (4,), "c": (5,)})
    cfg = {"train": {"epochs": 3, "batch_size": 16}, "model": {"dim": 8, "head_hidden": [8]}}
    rows = []
    result = mie.fit(mie.MultimodalArrays(x, y), "reconboost", config=cfg, seed=0, progress=False,
                     callbacks=[lambda e, row: rows.append(row)])
    assert result["budget"]["modality_epochs"] == {"a": 3, "b": 3, "c": 3}
    assert result["loop_epochs"] == 5 and len(rows) == 5
    assert set(result["test"]["per_modality"]) == {"a", "b", "c"}
    assert len(result["notices"]) == 1 and "fewer than one cycle" in result["notices"][0]
    assert [r["stage"] for r in rows] == [0, 0, 1, 1, 2]
    assert "boost_loss_a" in rows[0] and "rectify_loss" in rows[1] and "consolidation" in rows[2]


def test_no_notice_when_a_whole_cycle_fits():
    method = ReconBoost(epochs_per_stage=1, rectify_epochs=1)
    _drive(method, _model(), _batches(), 3)
    assert method.notices() == []


def test_inference_is_the_ensemble_softmax():
    model, (batch, _) = _model(beta=0.7), _batches()
    method = ReconBoost()
    method.setup(model, make_context(model.modalities, epochs_per_modality=16))
    model.eval()
    per, fused = method.logits(batch.inputs)
    f = {m: model.head(model.encoders[m](batch.inputs[m])) for m in ("a", "v")}
    torch.testing.assert_close(fused, 0.7 * (f["a"] + f["v"]))
    probs, per_probs = method.predict(batch.inputs)
    torch.testing.assert_close(probs, F.softmax(0.7 * (f["a"] + f["v"]), dim=-1))
    torch.testing.assert_close(per_probs["v"], F.softmax(f["v"], dim=-1))


# ---- refusals ---------------------------------------------------------------------------------------
def test_refusals():
    with pytest.raises(MieInputError, match="unimodal"):
        ReconBoost().setup(_model(mods=("a",)), make_context(["a"]))
    with pytest.raises(MieInputError, match="order"):
        ReconBoost(order=["a", "x"]).setup(_model(), make_context(["a", "v"]))
    for bad, match in [({"epochs_per_stage": 0}, "epochs_per_stage must be an integer >= 1"),
                       ({"rectify_epochs": -1}, "rectify_epochs must be an integer >= 0"),
                       ({"rectify_epochs": 1.5}, "rectify_epochs must be an integer"),
                       ({"w1": 0}, "w1 must be a number > 0"), ({"w2": -1}, "w2 must be a number >= 0"),
                       ({"fusion": "concat"}, "fusion must be one of"), ({"restart_optimizer": 1}, "true or false")]:
        with pytest.raises(MieInputError, match=match):
            mie.methods.create_method("reconboost", **bad)


def test_defaults_are_the_released_codes():
    m = ReconBoost()
    assert (m.epochs_per_stage, m.rectify_epochs, m.w1, m.w2, m.alpha, m.boost_rate, m.fusion,
            m.restart_optimizer) == (4, 4, 5.0, 1.0, 0.5, 1.0, "model", True)


# ---- the CLI ----------------------------------------------------------------------------------------
def test_cli_train(npz_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["train", "--data", str(npz_file), "--method", "reconboost", "--out", str(out), *TINY,
                     "method.epochs_per_stage=1", "method.rectify_epochs=1"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["budget"]["modality_epochs"] == {"a": 2, "b": 2}
    assert metrics["loop_epochs"] == 3 and 0 <= metrics["test"]["accuracy"] <= 1
