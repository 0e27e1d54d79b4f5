"""MSES (mie.methods.mses) against hand computations and against a transcription of the only public
MSES code that produced published numbers (AGM's baseline, lihong2303/AGM_ICCV2023): the smoothed
score and the patience rule on given validation numbers (the loop's metrics, through
``on_validation``), which modality stops when, the restore of its best epoch's weights, the
learning-rate scale that follows, that a stopped modality's parameters, BatchNorm statistics and
optimizer state stay bit-identical while the other modality and the fused head move, the multitask
loss, the inference rules, the budget hooks (stops_early, trained_modalities, notices), m >= 3, resume
and the refused settings.

No code from the paper's authors was found and only the abstract of Fujimori et al. (ACPR 2019) was
reachable; its stated rule — "a model within the framework of multitask learning, which simultaneously
learns modality-specific classifiers as well as a multimodal classifier ... early stopping separately"
— is checked in ``test_multitask_loss_and_gradients_before_any_stop`` and
``test_stopped_modality_stays_bit_identical_while_the_others_move``."""
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
from mie.methods.mses import MSES, early_stopping_update, smoothed_score
from mie.models import ClassifierHead, MultiHeadModel
from mie.train import Optimizers

K = 3


def _model(mods=("a", "b")):
    torch.manual_seed(0)
    enc = {m: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU()) for m in mods}
    heads = {m: ClassifierHead(3, K, hidden=()) for m in mods}
    return MultiHeadModel(enc, heads, ClassifierHead(3 * len(mods), K, hidden=(5,)))


def _setup(method, model, optimizer="adamw", epochs=20):
    """Set ``method`` up with the loop's optimizer factory; returns it (``apply`` = the loop's lr update)."""
    train = {**default_config()["train"], "optimizer": optimizer}
    train.update({"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0} if optimizer == "sgd" else
                 {"lr": 0.05, "weight_decay": 0.1})
    optimizers = Optimizers(train)
    method.setup(model, make_context(model.modalities, make_optimizer=optimizers.make, epochs_per_modality=epochs))
    optimizers.apply(1.0, method)                     # as the loop does at the start of epoch 0
    return optimizers


def _metrics(values, t, key="loss"):
    """The loop's validation metrics of epoch t with values {m: [v_m(0), …]} of ``key`` per modality."""
    per = {m: {"loss": 0.0, "accuracy": 0.0, "macro_f1": 0.0} for m in values}
    for m, v in values.items():
        per[m][key] = v[t]
    return {"accuracy": 0.0, "loss": 0.0, "per_modality": per}


def _epochs(method, optimizers, values, epochs, key="loss"):
    """on_validation of ``epochs``, each followed by the loop's next epoch start (restore, lr update)."""
    rows = []
    for t in epochs:
        rows.append(method.on_validation(t, _metrics(values, t, key)))
        method.start_epoch(t + 1)
        optimizers.apply(1.0, method)
    return rows


def _batch(n=8, seed=5, mods=("a", "b")):
    g = torch.Generator().manual_seed(seed)
    return Batch({m: torch.randn(n, 4, generator=g) for m in mods}, torch.arange(n) % K)


def test_smoothed_score_and_patience_rule_by_hand():
    assert smoothed_score(1.0, None, 0.6) == 1.0                                  # s(0) = v(0)
    assert smoothed_score(0.5, 1.0, 0.6) == pytest.approx(0.6 * 1.0 + 0.4 * 0.5)  # previous RAW value
    assert smoothed_score(0.5, 1.0, 0.0) == 0.5
    # loss, P = 2: best 0.9 at t=1; t=2, 3 do not beat it (3 − 1 = 2, not > 2); the stop comes at t=4
    best, best_epoch, rows = math.inf, -1, []
    for t, s in enumerate([1.0, 0.9, 0.95, 0.91, 0.92]):
        best, best_epoch, stop = early_stopping_update(s, best, best_epoch, t, patience=2)
        rows.append((best, best_epoch, stop))
    assert rows == [(1.0, 0, False), (0.9, 1, False), (0.9, 1, False), (0.9, 1, False), (0.9, 1, True)]
    assert early_stopping_update(0.85, 0.9, 1, 2, patience=3, min_delta=0.1) == (0.9, 1, False)
    assert early_stopping_update(0.7, 0.6, 0, 5, patience=3, monitor="accuracy") == (0.7, 5, False)
    assert early_stopping_update(0.5, 0.6, 0, 4, patience=3, monitor="accuracy") == (0.6, 0, True)


# lihong2303/AGM_ICCV2023 run/CREMAD_main.py line 685  (smoothed validation loss, best epoch, stop, restore)
def _agm_mses(losses, patience, epochs):
    """AGM's MSES rule, transcribed, for per-modality validation losses {m: [v(1), v(2), …]} (AGM's
    1-based epochs, its patience 80 replaced by ``patience``): ({m: epoch whose validation stopped m},
    {m: the best epoch restored at the stop})."""
    mods = list(losses)
    min_loss, argmin, bre, stopped_after, restored = {}, {}, {}, {}, {}
    ratio = {m: 1.0 for m in mods}
    for epoch in range(1, epochs + 1):
        v = {m: losses[m][epoch - 1] for m in mods}
        if epoch == 1:
            min_loss = dict(v)
            argmin = {m: 1.0 for m in mods}
            batch_loss = dict(v)
        else:
            batch_loss = {m: 0.6 * bre[m] + 0.4 * v[m] for m in mods}
        bre = dict(v)
        for m in mods:
            if min_loss[m] > batch_loss[m]:
                min_loss[m] = batch_loss[m]
                argmin[m] = epoch
        for m in mods:
            if (epoch - argmin[m] > patience) and (ratio[m] != 0.0):
                ratio[m] = 0.0
                stopped_after[m] = epoch
                restored[m] = argmin[m]
    return stopped_after, restored


def test_stops_and_restores_match_agm_released_code_through_real_steps():
    """Parity: given validation losses for 9 epochs (patience 2), with real training steps between
    the validations: each modality stops after the epoch AGM's rule stops it, then trains no more, and
    its parameters are those it had at the end of the best epoch AGM restores; the other modality and
    the fused head keep their progress (AGM restores the whole model; we restore the modality only)."""
    # a's smoothed scores (1-based epochs): 1.0, .92, .84, .74, .68, .93, .88, .87, .9 → best at 5, stop after 8
    losses = {"a": [1.0, 0.8, 0.9, 0.5, 0.95, 0.9, 0.85, 0.9, 0.9],
              "b": [1.2, 1.1, 1.0, 0.9, 0.8, 0.7, 0.75, 0.6, 0.9]}
    stopped_after, restored = _agm_mses(losses, patience=2, epochs=9)
    assert stopped_after == {"a": 8} and restored == {"a": 5}             # (1-based) b never stops
    model = _model()
    method = create_method("mses", patience=2)                             # defaults: smoothing 0.6, restore
    optimizers = _setup(method, model, optimizer="sgd")
    weights, trained = [], []
    for t in range(9):                                                     # 0-based loop epochs
        method.start_epoch(t)
        optimizers.apply(1.0, method)
        model.train()
        for i in range(2):
            method.training_step(_batch(seed=10 * t + i), make_step(epoch=t, index=i, steps_per_epoch=2))
        trained.append(method.trained_modalities(t))
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        method.on_validation(t, _metrics(losses, t))
    stop_epoch = stopped_after["a"]                                        # first 0-based epoch without updates
    assert trained == [["a", "b"]] * stop_epoch + [["b"]] * (9 - stop_epoch)
    assert method.stopped_at == {"a": stop_epoch, "b": None}
    best = weights[restored["a"] - 1]                                      # end of AGM's best epoch
    state = model.state_dict()
    for k, v in state.items():
        if k.startswith(("encoders.a.", "heads.a.")):
            assert torch.equal(v, best[k]), k                              # restored, then frozen
    for part in ("encoders.b.0.weight", "heads.b.net.0.weight", "fused_head.net.0.weight"):
        assert not torch.equal(state[part], best[part]), part             # not rolled back


def test_each_modality_stops_on_its_own_validation_loss():
    # raw values (smoothing 0), P = 1: a improves at t=0,1 then not for 2 epochs → stopped after t=3;
    # b keeps improving; c stalls from t=1 → stopped after t=2.
    vals = {"a": [1.0, 0.8, 0.85, 0.81, 0.1], "b": [1.0, 0.9, 0.8, 0.7, 0.6], "c": [0.5, 0.6, 0.7, 0.4, 0.3]}
    model = _model(("a", "b", "c"))
    method = create_method("mses", patience=1, smoothing=0.0, restore="none")
    optimizers = _setup(method, model)
    rows = _epochs(method, optimizers, vals, range(5))
    assert [r["mses_stopped_a"] for r in rows] == [0, 0, 0, 1, 1]
    assert [r["mses_stopped_b"] for r in rows] == [0, 0, 0, 0, 0]
    assert [r["mses_stopped_c"] for r in rows] == [0, 0, 1, 1, 1]
    assert [r["mses_wait_a"] for r in rows] == [0, 0, 1, 2, 3]
    assert method.best == {"a": 0.8, "b": 0.6, "c": 0.5}                   # frozen once stopped (0.1 ignored)
    assert rows[3]["mses_lr_a"] == 0.0 and rows[3]["mses_lr_b"] == 0.05 and rows[2]["mses_lr_c"] == 0.0
    assert [g.get("name") for g in method.optimizer.param_groups] == ["a", "b", "c", None]   # last: fused head
    assert [g["lr"] for g in method.optimizer.param_groups] == [0.0, 0.05, 0.0, 0.05]
    assert [method.lr_scale(m) for m in ("a", "b", "c", None)] == [0.0, 1.0, 0.0, 1.0]
    assert rows[4]["mses_val_loss_a"] == 0.1 and "mses_score_a" not in rows[4]
    assert [method.trained_modalities(t) for t in (2, 3, 4)] == [["a", "b", "c"], ["a", "b"], ["b"]]


def test_accuracy_monitor():
    model = _model()
    method = create_method("mses", patience=0, monitor="accuracy", smoothing=0.0)
    optimizers = _setup(method, model)
    rows = _epochs(method, optimizers, {"a": [0.5, 0.6, 0.6], "b": [0.5, 0.4, 0.45]}, range(3), key="accuracy")
    assert [r["mses_stopped_a"] for r in rows] == [0, 0, 1]
    assert [r["mses_stopped_b"] for r in rows] == [0, 1, 1]
    assert rows[2]["mses_val_accuracy_b"] == 0.45


def test_stopped_modality_stays_bit_identical_while_the_others_move():
    model = _model()
    method = MSES(patience=0, aux_weight=0.7, smoothing=0.0)
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


def test_budget_hooks_and_notices():
    assert MSES.stops_early is True

    def notices(epochs, **params):
        method = create_method("mses", **params)
        method.setup(_model(), make_context(["a", "b"], epochs_per_modality=epochs))
        return method.notices()
    assert notices(8) == []                                   # P = 5: a stop after epoch 7 acts in epoch 8
    assert len(notices(7)) == 1 and "multitask joint training" in notices(7)[0]
    assert notices(3, patience=0) == [] and len(notices(2, patience=0)) == 1


def test_state_survives_a_restart():
    model = _model()
    method = create_method("mses", patience=0)
    _setup(method, model)
    method.on_validation(0, _metrics({"a": [1.0, 1.1], "b": [1.0, 0.5]}, 0))
    method.on_validation(1, _metrics({"a": [1.0, 1.1], "b": [1.0, 0.5]}, 1))   # a stops; restore pending
    other = create_method("mses", patience=0)
    other_model = _model()
    _setup(other, other_model)
    other.load_state_dict(method.state_dict())
    with torch.no_grad():
        for p in other_model.encoders["a"].parameters():
            p.add_(1.0)
    other.start_epoch(2)                                      # the resumed run restores a's best weights
    for k, v in model.encoders["a"].state_dict().items():
        assert torch.equal(other_model.encoders["a"].state_dict()[k], v)
    assert other.stopped_at == {"a": 2, "b": None} and other.pending == [] and other.best == method.best


def test_invalid_settings_are_refused():
    with pytest.raises(MieInputError, match="patience must be an integer >= 0"):
        create_method("mses", patience=-1)
    with pytest.raises(MieInputError, match="monitor must be one of"):
        create_method("mses", monitor="f1")
    with pytest.raises(MieInputError, match="min_delta must be a number >= 0"):
        create_method("mses", min_delta=-0.1)
    with pytest.raises(MieInputError, match="smoothing must be a number in"):
        create_method("mses", smoothing=1.0)
    with pytest.raises(MieInputError, match="restore must be one of"):
        create_method("mses", restore="model")
    with pytest.raises(MieInputError, match="fusion must be one of"):
        create_method("mses", fusion="concat")             # the old, unread value
    one = MultiHeadModel({"a": nn.Linear(2, 2)}, {"a": ClassifierHead(2, K, hidden=())},
                         ClassifierHead(2, K, hidden=()))
    with pytest.raises(MieInputError, match="unimodal"):
        create_method("mses").setup(one, make_context(["a"]))
