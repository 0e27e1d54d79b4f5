"""OGR-GB (mie.methods.ogr_gb) against hand computations and against a transcription of the paper's
weight estimate (Wang et al. CVPR 2020, Algorithm 1) with BalanceBenchmark's rules where the paper is
silent: ΔO, ΔG and the blend weights from given loss histories; the copies estimate through the real
``training_step`` (parity), its schedule (epochs 0, n, 2n, …), that it leaves the model alone and never
reads test; the paper-vs-code choices (|ΔG| vs clip, Σw = 1, measurement at the checkpoints); the
own-heads estimate (ours) with its warm-up and windows; the weighted loss and its gradients; the
notices; the copy under bf16 autocast; m >= 3; and the refused settings."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie.train
from conftest import make_context, make_step
from mie.errors import MieInputError
from mie.methods import Batch, create_method
from mie.methods.ogr_gb import GradientBlending, _copy_of, blend_weights, overfitting_generalization
from mie.models import ClassifierHead, MultiHeadModel
from mie.optim import autocast_forwards

K = 3

# Loss histories at checkpoints N and N + n (train / validation mean cross-entropy per output).
START = {"train": {"a": 1.0, "v": 1.2, "fused": 0.9}, "val": {"a": 1.1, "v": 1.25, "fused": 1.0}}
END = {"train": {"a": 0.5, "v": 1.0, "fused": 0.4}, "val": {"a": 0.9, "v": 1.15, "fused": 0.95}}
# by hand: O(N) = val − train:   a 0.1, v 0.05, fused 0.1;   O(N+n): a 0.4, v 0.15, fused 0.55
#          ΔO = O(N+n) − O(N):   a 0.3, v 0.1,  fused 0.45;  ΔG = L^V(N) − L^V(N+n): a 0.2, v 0.1, fused 0.05
#          ΔG/ΔO²:               a 0.2/0.09 = 2.2222, v 0.1/0.01 = 10, fused 0.05/0.2025 = 0.24691
RAW = {"a": 0.2 / 0.09, "v": 0.1 / 0.01, "fused": 0.05 / 0.2025}
HAND = {k: v / sum(RAW.values()) for k, v in RAW.items()}


def test_overfitting_generalization_and_weights_by_hand():
    d_o, d_g = overfitting_generalization(START, END)
    assert d_o == {"a": pytest.approx(0.3), "v": pytest.approx(0.1), "fused": pytest.approx(0.45)}
    assert d_g == {"a": pytest.approx(0.2), "v": pytest.approx(0.1), "fused": pytest.approx(0.05)}
    w = blend_weights(d_o, d_g)
    assert w == {k: pytest.approx(v) for k, v in HAND.items()}
    assert w["v"] == pytest.approx(10 / (10 + 2.2222222 + 0.2469136))        # ≈ 0.802
    # Proposition 1's constraint Σ_k w_k = 1 (BalanceBenchmark line 368), not the printed Z's Σ = 2
    assert sum(w.values()) == pytest.approx(1.0)


def test_negative_generalization_is_absolute_by_default_or_clipped():
    d_o = {"a": 0.3, "v": 0.1, "fused": 0.2}
    d_g = {"a": 0.2, "v": -0.1, "fused": 0.1}                 # v's validation loss rose
    raw = {"a": 0.2 / 0.09, "v": 0.1 / 0.01, "fused": 0.1 / 0.04}
    w = blend_weights(d_o, d_g)                               # BalanceBenchmark's |ΔG/ΔO²| (line 366)
    assert w["v"] == pytest.approx(raw["v"] / sum(raw.values()))
    w_zero = blend_weights(d_o, d_g, negative_gain="zero")    # ours: weight 0
    assert w_zero["v"] == 0.0
    assert w_zero["a"] == pytest.approx(raw["a"] / (raw["a"] + raw["fused"]))
    assert blend_weights({"a": 0.1, "v": 0.1}, {"a": -0.1, "v": 0.0}, "zero") is None   # nothing generalised
    assert blend_weights({"a": 0.0, "v": 0.1}, {"a": 0.1, "v": 0.1}) == {"a": pytest.approx(1.0),
                                                                          "v": pytest.approx(1e-10)}  # ΔO = 0: floored


def _model(mods=("a", "v")):
    torch.manual_seed(0)
    enc = {m: nn.Linear(4, 3) for m in mods}
    return MultiHeadModel(enc, {m: ClassifierHead(3, K, hidden=()) for m in mods},
                          ClassifierHead(3 * len(mods), K, hidden=(5,)))


def _metrics(losses):
    """A metrics dict whose losses are {k: L_k} (the fused prediction's as "loss")."""
    return {"accuracy": 0.0, "loss": losses["fused"],
            "per_modality": {m: {"loss": v, "accuracy": 0.0, "macro_f1": 0.0}
                             for m, v in losses.items() if m != "fused"}}


def _loop_context(method, model, splits):
    """A context whose ``evaluate(split)`` is the loop's own evaluation of ``method`` on the batches of
    ``splits[split]``."""
    evaluate = lambda split: mie.train.evaluate(method, splits[split], torch.device("cpu"), model.modalities)
    return make_context(model.modalities, evaluate=evaluate)


def _data(mods=("a", "v"), seed=7):
    """Two training batches and one validation batch whose inputs carry the label."""
    g = torch.Generator().manual_seed(seed)

    def batch(n):
        y = torch.arange(n) % K
        return Batch({m: torch.randn(n, 4, generator=g) + (i + 1) * F.one_hot(y, 4).float()
                      for i, m in enumerate(mods)}, y)
    return [batch(6), batch(6)], [batch(5)]


def _copies_context(model, train, val, lr=0.5, epochs=6, asked=None):
    """The loop's context for the copies estimate: SGD at ``lr``, the training batches, and the loop's
    own evaluation (``mie.train.evaluate``) of train or val — of the model, or of a copy the method
    passes; every request is recorded in ``asked``."""
    from mie.methods.ogr_gb import probabilities
    splits = {"train": train, "val": val}

    def evaluate(split, model_=None, predict=None, **kw):
        model_, predict = kw.get("model", model_), kw.get("predict", predict)
        if asked is not None:
            asked.append((split, "model" if model_ is None else "copy"))
        net = model if model_ is None else model_
        return mie.train.evaluate(create_method("ogr_gb"), splits[split], torch.device("cpu"), model.modalities,
                                  net, predict or (lambda xs: probabilities(net, xs)))
    return make_context(model.modalities, lr=lr, train_batches=train, epochs_per_modality=epochs, evaluate=evaluate)


# Wang et al. CVPR 2020, Algorithm 1 (GB_Estimate): for each output, the uni-modal network (or the naive
# multi-modal one) initialised from the current weights, trained n epochs, O and G by Eq. 3 between the
# checkpoints N and N + n, eval-mode average losses over T and V.
# GeWu-Lab/BalanceBenchmark balancemm/trainer/GBlending_trainer.py line 361 (g, o, |g / o²|; Σ = 1 at line 368)
# GeWu-Lab/BalanceBenchmark balancemm/trainer/GBlending_trainer.py line 314 (copy optimizer from its initial state)
def _gb_estimate(model, train, val, n, lr):
    def z(net, k, xs):
        if k == "fused":
            return net.fused_head(torch.cat([net.encoders[m](xs[m]) for m in net.modalities], dim=-1))
        return net.heads[k](net.encoders[k](xs[k]))

    def loss(net, k, batches):
        net.eval()
        with torch.no_grad():
            total = sum(F.cross_entropy(z(net, k, xs), y, reduction="sum").item() for xs, y in batches)
        return total / sum(len(y) for _, y in batches)

    weights = {}
    for k in list(model.modalities) + ["fused"]:
        pre_train_loss, pre_validation_loss = loss(model, k, train), loss(model, k, val)
        net = copy.deepcopy(model)
        if k == "fused":
            params = list(net.encoders.parameters()) + list(net.fused_head.parameters())
        else:
            params = list(net.encoders[k].parameters()) + list(net.heads[k].parameters())
        optimizer = torch.optim.SGD(params, lr=lr)
        for _ in range(n):
            net.train()
            for xs, y in train:
                optimizer.zero_grad()
                F.cross_entropy(z(net, k, xs), y).backward()
                optimizer.step()
        now_train_loss, now_validation_loss = loss(net, k, train), loss(net, k, val)
        g = now_validation_loss - pre_validation_loss
        o_pre = pre_validation_loss - pre_train_loss
        o_now = now_validation_loss - now_train_loss
        o = o_now - o_pre
        weights[k] = abs(g / (o ** 2))
    sums = sum(weights.values())
    return {k: w / sums for k, w in weights.items()}


def test_copies_estimate_matches_algorithm_1_through_the_real_step():
    """Parity: the first step of epoch 0 estimates the weights from copies trained n epochs on one output
    each (never from uniform weights), the model itself is untouched by the estimate, and the step then
    descends Σ_k w_k CE_k with those weights."""
    model = _model()
    train, val = _data()
    expected = _gb_estimate(model, train, val, n=2, lr=0.5)
    method = create_method("ogr_gb", blend_every=2)          # defaults: copies, |ΔG|
    method.setup(model, _copies_context(model, train, val))
    assert method.estimate == "copies" and method.weights == {k: pytest.approx(1 / 3) for k in expected}
    ref = copy.deepcopy(model)                                # the model as the estimate must leave it
    xs, y = train[0]
    method.training_step(train[0], make_step(epoch=0, index=0, steps_per_epoch=2))
    assert method.weights == {k: pytest.approx(w, rel=1e-4) for k, w in expected.items()}
    assert sum(method.weights.values()) == pytest.approx(1.0)
    per, fused = ref.outputs(xs)
    out = {**per, "fused": fused}
    hand = sum(method.weights[k] * F.cross_entropy(out[k], y) for k in method.weights)
    grads = torch.autograd.grad(hand, list(ref.parameters()))
    for (name, p), q, g in zip(model.named_parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p.detach(), q.detach() - 0.5 * g, msg=name)
    logs = method.on_validation(0, {})
    assert set(logs) == {f"gb_{s}_{k}" for s in ("w", "dG", "dO", "ogr") for k in ("a", "v", "fused")}
    assert method.on_validation(1, {}).keys() == {"gb_w_a", "gb_w_v", "gb_w_fused"}


def test_copies_are_estimated_before_epochs_0_n_2n_only(monkeypatch):
    model = _model()
    train, val = _data()
    method = create_method("ogr_gb", blend_every=2)
    method.setup(model, _copies_context(model, train, val))
    calls = []

    def fake_estimate():
        calls.append(len(calls))
        d_g = {"a": 0.1, "v": 0.2, "fused": 0.3}
        return {"a": 1.0, "v": 1.0, "fused": 1.0}, {k: v * (len(calls)) for k, v in d_g.items()}
    monkeypatch.setattr(method, "estimate_with_copies", fake_estimate)
    estimated_in = []
    for epoch in range(5):
        before = len(calls)
        for index in range(2):
            method.training_step(train[index], make_step(epoch=epoch, index=index, steps_per_epoch=2))
        estimated_in += [epoch] * (len(calls) - before)
        assert ("gb_dG_a" in method.on_validation(epoch, {})) == (len(calls) > before)
    assert estimated_in == [0, 2, 4]
    assert method.weights == {"a": pytest.approx(1 / 6), "v": pytest.approx(2 / 6), "fused": pytest.approx(3 / 6)}


def test_copies_train_on_one_output_and_are_measured_by_the_loop():
    """Each copy moves only the parameters of its output (Algorithm 1's uni-modal network), the main
    model's weights are untouched, every loss comes from the loop's evaluation of train or val (of the
    model at the start, of each copy at its end), and each copy starts from the model's current weights
    with a fresh optimizer."""
    model = _model(("a", "v", "t"))
    train, val = _data(("a", "v", "t"))
    method = create_method("ogr_gb", blend_every=1)
    asked = []
    ctx = _copies_context(model, train, val, asked=asked)
    ctx.make_optimizer = lambda params, lr=None: torch.optim.SGD(list(params), lr=0.1, momentum=0.9)
    method.setup(model, ctx)
    seen, original = {}, method.twin_optimizers["a"].step

    def spy(*args, **kwargs):
        if not seen:                                          # the first step of copy "a": a fresh optimizer
            assert method.twin_optimizers["a"].state == {}
        seen.setdefault("a", set()).update(n for n, p in method.twin.named_parameters() if p.grad is not None)
        return original(*args, **kwargs)
    method.twin_optimizers["a"].step = spy
    method.twin_optimizers["a"].state[next(iter(method.twin.parameters()))] = {"stale": torch.ones(1)}
    before = copy.deepcopy(model.state_dict())
    d_o, d_g = method.estimate_with_copies()
    assert set(d_o) == {"a", "v", "t", "fused"}
    assert seen["a"] == {"encoders.a.weight", "encoders.a.bias", "heads.a.net.0.weight", "heads.a.net.0.bias"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(opt.state == {} for opt in method.twin_optimizers.values())          # reset after use
    assert sorted(set(asked)) == [("train", "copy"), ("train", "model"), ("val", "copy"), ("val", "model")]
    assert asked.count(("val", "copy")) == 4                  # one per output: a, v, t, fused


def test_notices():
    model = _model()
    train, val = _data()

    def notices(epochs, **params):
        method = create_method("ogr_gb", **params)
        ctx = _copies_context(model, train, val, epochs=epochs)
        if params.get("estimate") == "heads":
            ctx.evaluate = lambda split: _metrics(START[split])
        method.setup(model, ctx)
        return method.notices()
    assert len(notices(20)) == 1 and "3 copies" in notices(20)[0]
    assert "estimated once" in notices(10)[1] and "offline" in notices(10)[1]
    assert notices(11, estimate="heads") == []
    assert len(notices(10, estimate="heads")) == 1 and "never re-estimated" in notices(10, estimate="heads")[0]


def test_heads_warm_up_then_one_estimate_per_window():
    # ours: checkpoints 0, 2, 4 (n = 2): uniform weights for epochs 0-1, then (0→2) for epochs 2-3, (2→4) after.
    c0, c2 = START, END
    c4 = {"train": {"a": 0.3, "v": 0.9, "fused": 0.35}, "val": {"a": 0.85, "v": 1.0, "fused": 0.8}}
    now, asked = {"checkpoint": c0}, []

    def evaluate(split):
        asked.append(split)
        return _metrics(now["checkpoint"][split])
    model = _model()
    method = create_method("ogr_gb", blend_every=2, estimate="heads")
    method.setup(model, make_context(model.modalities, evaluate=evaluate))     # measures checkpoint 0
    assert sorted(asked) == ["train", "val"]
    assert method.window_start == c0
    assert method.weights == {k: pytest.approx(1 / 3) for k in ("a", "v", "fused")}
    rows = []
    for t, checkpoint in enumerate([c0, c2, c4, c4]):
        now["checkpoint"] = checkpoint
        asked.clear()
        rows.append(method.on_validation(t, _metrics(checkpoint["val"])))
        assert asked == (["train"] if t % 2 == 1 else [])                     # L^T at re-estimation epochs only
    assert rows[0]["gb_w_a"] == pytest.approx(1 / 3) and "gb_dG_a" not in rows[0]
    assert {k: rows[1][f"gb_w_{k}"] for k in HAND} == {k: pytest.approx(v) for k, v in HAND.items()}
    assert rows[2]["gb_w_v"] == pytest.approx(HAND["v"]) and "gb_dG_v" not in rows[2]
    # second window: from checkpoint 2 (not 0) to 4
    d_o = {k: (c4["val"][k] - c4["train"][k]) - (c2["val"][k] - c2["train"][k]) for k in HAND}
    d_g = {k: c2["val"][k] - c4["val"][k] for k in HAND}
    raw = {k: abs(d_g[k]) / d_o[k] ** 2 for k in HAND}
    assert {k: rows[3][f"gb_w_{k}"] for k in HAND} == {k: pytest.approx(raw[k] / sum(raw.values())) for k in HAND}
    assert rows[3]["gb_dG_a"] == pytest.approx(0.05) and rows[3]["gb_dO_a"] == pytest.approx(0.15)
    assert rows[3]["gb_ogr_a"] == pytest.approx(0.15 / 0.05)
    state = method.state_dict()
    other = create_method("ogr_gb", blend_every=2, estimate="heads")
    other.setup(_model(), make_context(model.modalities, evaluate=evaluate))
    other.load_state_dict(state)
    assert other.weights == method.weights and other.window_start == method.window_start


def test_weighted_loss_and_its_gradients():
    model = _model(("a", "v", "t"))                            # three modalities: four outputs
    method = GradientBlending(estimate="heads")
    g = torch.Generator().manual_seed(1)
    batch = Batch({m: torch.randn(6, 4, generator=g) for m in ("a", "v", "t")}, torch.tensor([0, 1, 2, 2, 1, 0]))
    method.setup(model, _loop_context(method, model, {"train": [batch], "val": [batch]}))
    assert method.outputs == ["a", "v", "t", "fused"] and method.weights["t"] == pytest.approx(0.25)
    method.weights = {"a": 0.1, "v": 0.0, "t": 0.3, "fused": 0.6}
    xs, y = batch
    ref = copy.deepcopy(model)
    per, fused = ref.outputs(xs)
    out = {**per, "fused": fused}
    hand = sum(w * F.cross_entropy(out[k], y) for k, w in method.weights.items())
    hand.backward()
    logs = method.training_step(batch, make_step())
    assert float(logs["loss"]) == pytest.approx(hand.item())
    assert float(logs["loss_v"]) == pytest.approx(F.cross_entropy(out["v"], y).item())
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert torch.count_nonzero(model.heads["v"].net[0].weight.grad) == 0        # w_v = 0: v's head learns nothing
    fused_p, per_p = method.predict(xs)                        # inference: the fused head
    with torch.no_grad():
        torch.testing.assert_close(fused_p, F.softmax(model.outputs(xs)[1], dim=-1))
        torch.testing.assert_close(per_p["t"], F.softmax(model.outputs(xs)[0]["t"], dim=-1))


def test_measured_losses_are_sample_means_in_eval_mode():
    # The paper's L^T_N: "the model's average loss over the fixed train set" (§2.2), in eval mode.
    model = _model()
    model.encoders["a"] = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.9))       # eval mode: dropout is off
    g = torch.Generator().manual_seed(2)
    batches = [Batch({m: torch.randn(n, 4, generator=g) for m in ("a", "v")}, torch.arange(n) % K) for n in (5, 2)]
    method = create_method("ogr_gb", estimate="heads")
    model.train()
    method.setup(model, _loop_context(method, model, {"train": batches, "val": batches[::-1]}))
    assert model.training                                      # mode restored
    model.eval()
    with torch.no_grad():
        outs = [model.outputs(xs) for xs, _ in batches]
    ys = torch.cat([y for _, y in batches])
    for k in ("a", "v", "fused"):
        z = torch.cat([o[1] if k == "fused" else o[0][k] for o in outs])
        for split in ("train", "val"):                         # Σ CE_i / 7, whatever the batches' sizes
            assert method.window_start[split][k] == pytest.approx(F.cross_entropy(z, ys).item(), rel=1e-6)


def test_copy_under_bf16_autocast_runs_its_own_weights():
    model = autocast_forwards(_model(), torch.device("cpu"))
    twin = _copy_of(model, torch.device("cpu"))
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    xs = {m: torch.randn(2, 4) for m in ("a", "v")}
    per, _ = twin.outputs(xs)
    assert torch.count_nonzero(per["a"]) == 0                  # the copy's zeros, not the original's weights
    assert torch.count_nonzero(model.outputs(xs)[0]["a"]) > 0


def test_fusion_is_fixed_to_the_fused_head():
    assert GradientBlending.fusion == "model" and "fusion" not in GradientBlending.params
    assert "fusion" not in create_method("ogr_gb").hparams()
    with pytest.raises(MieInputError, match="unknown parameter"):
        create_method("ogr_gb", fusion="average")


def test_invalid_settings_are_refused():
    with pytest.raises(MieInputError, match="blend_every must be an integer >= 1"):
        create_method("ogr_gb", blend_every=0)
    with pytest.raises(MieInputError, match="negative_gain must be one of"):
        create_method("ogr_gb", negative_gain="square")
    with pytest.raises(MieInputError, match="estimate must be one of"):
        create_method("ogr_gb", estimate="offline")
    one = MultiHeadModel({"a": nn.Linear(2, 2)}, {"a": ClassifierHead(2, K, hidden=())},
                         ClassifierHead(2, K, hidden=()))
    with pytest.raises(MieInputError, match="unimodal"):
        create_method("ogr_gb").setup(one, make_context(["a"]))


def test_a_modality_may_not_take_the_fused_heads_name():
    from mie.models import ModelSpec
    spec = ModelSpec(["a", "fused"], {"a": (3,), "fused": (3,)}, {"a": "mlp", "fused": "mlp"}, 2, 4, (4,))
    with pytest.raises(MieInputError, match="may not be called 'fused'"):
        create_method("ogr_gb").build_model(spec)
