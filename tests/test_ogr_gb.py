"""OGR-GB (mie.methods.ogr_gb) against hand computations: ΔO, ΔG and the blend weights from given
loss histories, the warm-up and the re-estimation window (L^V from the loop's validation metrics,
L^T from ``ctx.evaluate("train")``), the weighted loss and its gradients, the sample-mean eval-mode
losses of checkpoint 0, m >= 3, and the refused settings."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie.train
from conftest import make_context, make_step
from mie.errors import MieInputError
from mie.methods import Batch, create_method
from mie.methods.ogr_gb import GradientBlending, blend_weights, overfitting_generalization
from mie.models import ClassifierHead, MultiHeadModel

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
    assert sum(w.values()) == pytest.approx(1.0)


def test_negative_generalization_is_clipped_or_absolute():
    d_o = {"a": 0.3, "v": 0.1, "fused": 0.2}
    d_g = {"a": 0.2, "v": -0.1, "fused": 0.1}                 # v's validation loss rose
    w = blend_weights(d_o, d_g)
    raw = {"a": 0.2 / 0.09, "fused": 0.1 / 0.04}
    assert w["v"] == 0.0
    assert w["a"] == pytest.approx(raw["a"] / (raw["a"] + raw["fused"]))
    w_abs = blend_weights(d_o, d_g, negative_gain="abs")      # BalanceBenchmark's |ΔG|
    raw["v"] = 0.1 / 0.01
    assert w_abs["v"] == pytest.approx(raw["v"] / sum(raw.values()))
    assert blend_weights({"a": 0.1, "v": 0.1}, {"a": -0.1, "v": 0.0}) is None   # nothing generalised


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


def test_warm_up_then_one_estimate_per_window():
    # checkpoints 0, 2, 4 (n = 2): uniform weights for epochs 0-1, then (0→2) for epochs 2-3, (2→4) after.
    c0, c2 = START, END
    c4 = {"train": {"a": 0.3, "v": 0.9, "fused": 0.35}, "val": {"a": 0.85, "v": 1.0, "fused": 0.8}}
    now, asked = {"checkpoint": c0}, []

    def evaluate(split):
        asked.append(split)
        return _metrics(now["checkpoint"][split])
    model = _model()
    method = create_method("ogr_gb", blend_every=2)
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
    raw = {k: d_g[k] / d_o[k] ** 2 for k in HAND}
    assert {k: rows[3][f"gb_w_{k}"] for k in HAND} == {k: pytest.approx(raw[k] / sum(raw.values())) for k in HAND}
    assert rows[3]["gb_dG_a"] == pytest.approx(0.05) and rows[3]["gb_dO_a"] == pytest.approx(0.15)
    assert rows[3]["gb_ogr_a"] == pytest.approx(0.15 / 0.05)
    assert method.window_epoch == 4


def test_weighted_loss_and_its_gradients():
    model = _model(("a", "v", "t"))                            # three modalities: four outputs
    method = GradientBlending()
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
    model = _model()
    model.encoders["a"] = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.9))       # eval mode: dropout is off
    g = torch.Generator().manual_seed(2)
    batches = [Batch({m: torch.randn(n, 4, generator=g) for m in ("a", "v")}, torch.arange(n) % K) for n in (5, 2)]
    method = create_method("ogr_gb")
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
    one = MultiHeadModel({"a": nn.Linear(2, 2)}, {"a": ClassifierHead(2, K, hidden=())},
                         ClassifierHead(2, K, hidden=()))
    with pytest.raises(MieInputError, match="unimodal"):
        create_method("ogr_gb").setup(one, make_context(["a"]))


def test_a_modality_may_not_take_the_fused_heads_name():
    from mie.methods import create_method
    from mie.models import ModelSpec
    spec = ModelSpec(["a", "fused"], {"a": (3,), "fused": (3,)}, {"a": "mlp", "fused": "mlp"}, 2, 4, (4,))
    with pytest.raises(MieInputError, match="may not be called 'fused'"):
        create_method("ogr_gb").build_model(spec)
