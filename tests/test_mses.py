"""MSES (mie.methods.mses) against hand computations: the patience rule on given validation numbers
(the loop's metrics, through ``on_validation``), which modality stops when and the learning-rate
scale that follows, that a stopped modality's parameters, BatchNorm statistics and optimizer state
stay bit-identical while the other modality and the fused head move, the multitask loss, the
inference rules, m >= 3, and the refused settings."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_context, make_step
from mie.config import default_config
from mie.errors import MieInputError
from mie.methods import Batch, create_method
from mie.methods.mses import MSES, early_stopping_update
from mie.models import ClassifierHead, MultiHeadModel
from mie.train import Optimizers

K = 3


def _model(mods=("a", "b")):
    torch.manual_seed(0)
    enc = {m: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU()) for m in mods}
    heads = {m: ClassifierHead(3, K, hidden=()) for m in mods}
    return MultiHeadModel(enc, heads, ClassifierHead(3 * len(mods), K, hidden=(5,)))


def _setup(method, model, optimizer="adamw"):
    """Set ``method`` up with the loop's optimizer factory; returns it (``apply`` = the loop's lr update)."""
    train = {**default_config()["train"], "optimizer": optimizer}
    train.update({"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0} if optimizer == "sgd" else
                 {"lr": 0.05, "weight_decay": 0.1})
    optimizers = Optimizers(train)
    method.setup(model, make_context(model.modalities, make_optimizer=optimizers.make))
    optimizers.apply(1.0, method)                     # as the loop does at the start of epoch 0
    return optimizers


def _metrics(values, t, key="loss"):
    """The loop's validation metrics of epoch t with values {m: [v_m(0), …]} of ``key`` per modality."""
    per = {m: {"loss": 0.0, "accuracy": 0.0, "macro_f1": 0.0} for m in values}
    for m, v in values.items():
        per[m][key] = v[t]
    return {"accuracy": 0.0, "loss": 0.0, "per_modality": per}


def _epochs(method, optimizers, values, epochs, key="loss"):
    """on_validation of ``epochs``, each followed by the loop's learning-rate update."""
    rows = []
    for t in epochs:
        rows.append(method.on_validation(t, _metrics(values, t, key)))
        optimizers.apply(1.0, method)
    return rows


def _batch(n=8, seed=5, mods=("a", "b")):
    g = torch.Generator().manual_seed(seed)
    return Batch({m: torch.randn(n, 4, generator=g) for m in mods}, torch.arange(n) % K)


def test_patience_rule_by_hand():
    # loss: best 0.9 at t=1; t=2 and t=3 do not beat it → with patience 2 the stop comes at t=3
    best, wait, stops = math.inf, 0, []
    for v in [1.0, 0.9, 0.95, 0.91, 0.5]:
        best, wait, stop = early_stopping_update(v, best, wait, patience=2)
        stops.append((best, wait, stop))
    assert stops[:4] == [(1.0, 0, False), (0.9, 0, False), (0.9, 1, False), (0.9, 2, True)]
    # min_delta: 0.85 < 0.9 but not by more than 0.1 → no improvement
    assert early_stopping_update(0.85, 0.9, 0, patience=3, min_delta=0.1) == (0.9, 1, False)
    # accuracy: higher is better
    assert early_stopping_update(0.7, 0.6, 2, patience=3, monitor="accuracy") == (0.7, 0, False)
    assert early_stopping_update(0.5, 0.6, 2, patience=3, monitor="accuracy") == (0.6, 3, True)


def test_each_modality_stops_on_its_own_validation_loss():
    # a: improves at t=0,1 then not for 2 epochs → stopped after t=3; b keeps improving; c stalls from t=1.
    vals = {"a": [1.0, 0.8, 0.85, 0.81, 0.1], "b": [1.0, 0.9, 0.8, 0.7, 0.6], "c": [0.5, 0.6, 0.7, 0.4, 0.3]}
    model = _model(("a", "b", "c"))
    method = create_method("mses", patience=2)
    optimizers = _setup(method, model)
    rows = _epochs(method, optimizers, vals, range(5))
    assert [r["mses_stopped_a"] for r in rows] == [0, 0, 0, 1, 1]
    assert [r["mses_stopped_b"] for r in rows] == [0, 0, 0, 0, 0]
    assert [r["mses_stopped_c"] for r in rows] == [0, 0, 1, 1, 1]
    assert [r["mses_wait_a"] for r in rows] == [0, 0, 1, 2, 2]      # frozen once stopped (0.1 at t=4 ignored)
    assert method.best == {"a": 0.8, "b": 0.6, "c": 0.5}
    assert rows[3]["mses_lr_a"] == 0.0 and rows[3]["mses_lr_b"] == 0.05 and rows[2]["mses_lr_c"] == 0.0
    assert [g.get("name") for g in method.optimizer.param_groups] == ["a", "b", "c", None]   # last: fused head
    assert [g["lr"] for g in method.optimizer.param_groups] == [0.0, 0.05, 0.0, 0.05]
    assert [method.lr_scale(m) for m in ("a", "b", "c", None)] == [0.0, 1.0, 0.0, 1.0]
    assert rows[4]["mses_val_loss_a"] == 0.1


def test_accuracy_monitor():
    model = _model()
    method = create_method("mses", patience=1, monitor="accuracy")
    optimizers = _setup(method, model)
    rows = _epochs(method, optimizers, {"a": [0.5, 0.6, 0.6], "b": [0.5, 0.4, 0.45]}, range(3), key="accuracy")
    assert [r["mses_stopped_a"] for r in rows] == [0, 0, 1]
    assert [r["mses_stopped_b"] for r in rows] == [0, 1, 1]
    assert rows[2]["mses_val_accuracy_b"] == 0.45


def test_stopped_modality_stays_bit_identical_while_the_others_move():
    model = _model()
    method = MSES(patience=1, aux_weight=0.7)
    optimizers = _setup(method, model)
    batch = _batch()
    method.training_step(batch, make_step())  # both train: Adam state exists for a's parameters
    _epochs(method, optimizers, {"a": [1.0, 1.0], "b": [1.0, 0.5]}, range(2))   # a did not improve → stopped
    assert method.stopped == {"a": True, "b": False}
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("encoders.a.", "heads.a."))}
    moving = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("encoders.b.", "fused_head."))}
    a_params = [p for p in model.modality_parameters("a")]
    opt_state = {id(p): copy.deepcopy(method.optimizer.state[p]) for p in a_params}

    model.train()                             # as the loop does at the start of an epoch
    expected = _multitask_loss(model, *batch, active=["b"], aux_weight=0.7)
    logs = method.training_step(batch, make_step(epoch=2))
    assert float(logs["loss"]) == pytest.approx(expected)
    assert "loss_a" not in logs and "loss_b" in logs
    assert model.encoders["a"].training       # eval mode only for the stopped encoder's forward
    for i in range(3):
        model.train()
        method.training_step(_batch(seed=i + 10), make_step(epoch=2, index=i + 1, steps_per_epoch=4))
    for k, v in frozen.items():               # weights AND BatchNorm running statistics
        assert torch.equal(model.state_dict()[k], v), k
    for p in a_params:
        assert p.grad is None
        for name, s in opt_state[id(p)].items():
            assert torch.equal(method.optimizer.state[p][name], s)
    changed = [k for k, v in moving.items() if v.is_floating_point() and not torch.equal(model.state_dict()[k], v)]
    assert any(k.startswith("encoders.b.") for k in changed) and any(k.startswith("fused_head.") for k in changed)


def _multitask_loss(model, xs, y, active, aux_weight):
    """CE(g([f_a; f_b]), y) + λ Σ_{m active} CE(h_m(f_m), y), with a stopped encoder in eval mode."""
    with torch.no_grad():
        ref = copy.deepcopy(model)
        feats = {}
        for m in ref.modalities:
            if m not in active:
                ref.encoders[m].eval()
            feats[m] = ref.encoders[m](xs[m])
        loss = F.cross_entropy(ref.fused_head(torch.cat([feats[m] for m in ref.modalities], dim=-1)), y)
        for m in active:
            loss = loss + aux_weight * F.cross_entropy(ref.heads[m](feats[m]), y)
    return loss.item()


def test_multitask_loss_and_gradients_before_any_stop():
    model = _model()
    method = create_method("mses", aux_weight=0.5)
    _setup(method, model, optimizer="sgd")
    xs, y = batch = _batch()
    ref = copy.deepcopy(model)
    f = {m: ref.encoders[m](xs[m]) for m in ref.modalities}
    hand = (F.cross_entropy(ref.fused_head(torch.cat([f["a"], f["b"]], dim=-1)), y)
            + 0.5 * F.cross_entropy(ref.heads["a"](f["a"]), y) + 0.5 * F.cross_entropy(ref.heads["b"](f["b"]), y))
    hand.backward()
    logs = method.training_step(batch, make_step())
    assert float(logs["loss"]) == pytest.approx(hand.item())
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    fused, per = method.predict(xs)
    assert set(per) == {"a", "b"} and fused.shape == (8, K)


def test_inference_rules():
    model = _model()
    xs, _ = _batch()
    model.eval()
    with torch.no_grad():
        f = {m: model.encoders[m](xs[m]) for m in model.modalities}
        z = model.fused_head(torch.cat([f["a"], f["b"]], dim=-1))
        p = {m: F.softmax(model.heads[m](f[m]), dim=-1) for m in model.modalities}
    for fusion, expected in (("model", F.softmax(z, dim=-1)), ("average", (p["a"] + p["b"]) / 2)):
        method = create_method("mses", **({} if fusion == "model" else {"fusion": fusion}))
        method.setup(model, make_context(model.modalities))
        fused, per = method.predict(xs)
        torch.testing.assert_close(fused, expected)
        torch.testing.assert_close(per["b"], p["b"])


def test_invalid_settings_are_refused():
    with pytest.raises(MieInputError, match="patience must be an integer >= 1"):
        create_method("mses", patience=0)
    with pytest.raises(MieInputError, match="monitor must be one of"):
        create_method("mses", monitor="f1")
    with pytest.raises(MieInputError, match="min_delta must be a number >= 0"):
        create_method("mses", min_delta=-0.1)
    with pytest.raises(MieInputError, match="fusion must be one of"):
        create_method("mses", fusion="concat")             # the old, unread value
    one = MultiHeadModel({"a": nn.Linear(2, 2)}, {"a": ClassifierHead(2, K, hidden=())},
                         ClassifierHead(2, K, hidden=()))
    with pytest.raises(MieInputError, match="unimodal"):
        create_method("mses").setup(one, make_context(["a"]))
