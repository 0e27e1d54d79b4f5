"""MIE's ``ensemble_heads`` (``mie_recipe_heads``): a second head g_m per modality. In j's stage the
encoder φ_j feeds its own head h_j, trained on CE(h_j, y), and its ensemble head g_j, trained on
CE(g_j + Σ_{k≠j} g_k, y) with the others' g_k from an eval-mode pass without gradient; the fused
prediction is softmax(Σ_m g_m), each modality's own prediction softmax(h_m). Checked against autograd
on a hand-built copy, and end to end through a checkpoint."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie
from conftest import make_arrays, make_context, make_step
from mie.errors import MieInputError
from mie.evaluate import evaluate_checkpoint, evaluate_robustness
from mie.methods import create_method
from mie.methods.mie import MIE
from mie.models import EnsembleHeadsModel, ModelSpec

MODS = ["a", "b", "c"]
SHAPES = {"a": (5,), "b": (6,), "c": (7,)}
K, LR = 3, 0.5


def _model():
    torch.manual_seed(0)
    spec = ModelSpec(modalities=list(MODS), input_shapes=dict(SHAPES), encoders={m: "mlp" for m in MODS},
                     num_classes=K, dim=8, head_hidden=(6, 4))
    model = EnsembleHeadsModel.build(spec).double().train()
    for module in model.modules():            # deterministic forward passes (BatchNorm stays active)
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _batch(seed=1, size=6):
    g = torch.Generator().manual_seed(seed)
    return ({m: torch.randn(size, *SHAPES[m], generator=g, dtype=torch.float64) for m in MODS},
            torch.randint(0, K, (size,), generator=g))


def _method(model, **kw):
    method = MIE(sam=False, gm=False, ensemble_weight=kw.pop("lam", 0.5), ensemble_heads=True,
                 fusion=kw.pop("fusion", "model"), **kw)
    method.setup(model, make_context(MODS, lr=LR, train_batches=[_batch()], epochs_per_modality=2))
    return method


@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_a_step_matches_autograd_on_the_two_heads_loss(lam):
    model = _model()
    method = _method(model, lam=lam)
    xs, y = _batch()
    j = method.stage(0)[0]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.eval()
        others = sum(ref.ensemble_heads[k](ref.encoders[k](xs[k])) for k in MODS if k != j)
        ref.train()
    features = ref.encoders[j](xs[j])
    loss = (1 - lam) * F.cross_entropy(ref.heads[j](features), y) + \
        lam * F.cross_entropy(ref.ensemble_heads[j](features) + others, y)
    params = list(ref.encoders[j].parameters()) + list(ref.heads[j].parameters()) + \
        list(ref.ensemble_heads[j].parameters())
    grads = torch.autograd.grad(loss, params)
    old = [p.detach().clone() for p in model.modality_parameters(j)]
    others_before = {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[1] != j}
    logs = method.training_step((xs, y), make_step(0))
    assert logs[f"loss_{j}"] == pytest.approx(loss.item(), rel=1e-10)
    assert len(old) == len(grads)                    # θ_j holds the encoder and both heads
    for p, o, g in zip(model.modality_parameters(j), old, grads):
        torch.testing.assert_close(p.detach() - o, -LR * g, rtol=1e-6, atol=1e-12)
    for k, v in model.state_dict().items():
        if k.split(".")[1] != j:
            assert torch.equal(v, others_before[k]), k
    assert all(m.training for m in model.modules())


def test_fused_prediction_is_the_ensemble_heads_sum_and_each_modality_its_own_head():
    model = _model().eval()
    method = _method(model)
    xs, _ = _batch(seed=3)
    fused, per = method.predict(xs)
    with torch.no_grad():
        g = {m: model.ensemble_heads[m](model.encoders[m](xs[m])) for m in MODS}
        h = {m: model.heads[m](model.encoders[m](xs[m])) for m in MODS}
    torch.testing.assert_close(fused, F.softmax(sum(g.values()).float(), dim=-1))
    for m in MODS:
        torch.testing.assert_close(per[m], F.softmax(h[m].float(), dim=-1))
    told = method.predict_present(xs, ["a", "c"])
    torch.testing.assert_close(told, F.softmax((g["a"] + g["c"]).float(), dim=-1))


def test_with_a_late_fusion_rule_the_prediction_fuses_the_own_heads():
    model = _model().eval()
    method = _method(model, fusion="log")
    xs, _ = _batch(seed=3)
    fused, per = method.predict(xs)
    with torch.no_grad():
        h = {m: model.heads[m](model.encoders[m](xs[m])).float() for m in MODS}
    torch.testing.assert_close(fused, F.softmax(sum(F.log_softmax(z, -1) for z in h.values()) / 3, dim=-1))
    told = method.predict_present(xs, ["a", "c"])
    torch.testing.assert_close(told, F.softmax((F.log_softmax(h["a"], -1) + F.log_softmax(h["c"], -1)) / 2, dim=-1))


@pytest.mark.parametrize("params, message", [
    ({"ensemble_heads": True, "fusion": "model"}, "needs method.ensemble_weight > 0"),
    ({"fusion": "model"}, "fusion 'model'"),
])
def test_inconsistent_settings_are_refused(params, message):
    with pytest.raises(MieInputError, match=message):
        create_method("mie", **params)


@pytest.mark.parametrize("fusion", ["model", "average"])
def test_a_run_s_checkpoint_gives_back_its_test_metrics_and_robustness(tmp_path, fusion):
    x, y = make_arrays(n=150)
    path = tmp_path / "toy.npz"
    np.savez(path, y=y, **{f"x_{m}": a for m, a in x.items()})
    cfg = mie.config.build_config(None, ["train.epochs=2", "train.batch_size=32", "model.dim=8",
                                         "model.head_hidden=[8]", "train.threads=1", f"method.fusion={fusion}"],
                                  data={"path": str(path)}, method={"name": "mie_recipe_heads"})
    result = mie.fit(config=cfg, out_dir=tmp_path / "run", progress=False)
    again = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert again["accuracy"] == pytest.approx(result["test"]["accuracy"], abs=1e-12)
    assert again["per_modality"]["b"]["accuracy"] == pytest.approx(result["test"]["per_modality"]["b"]["accuracy"],
                                                                   abs=1e-12)
    # validation reused the untrained modalities' cached (h_m, g_m) outputs; a fresh pass of the checkpoint agrees
    val = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", split="val")
    for key in ("accuracy", "loss"):
        assert val[key] == pytest.approx(result["val"][key], abs=1e-6)
    for m in result["val"]["per_modality"]:
        assert val["per_modality"][m]["loss"] == pytest.approx(result["val"]["per_modality"][m]["loss"], abs=1e-6)
    rows, _, _ = evaluate_robustness(tmp_path / "run" / "checkpoints" / "best.pt", drops=[("a",)])
    dropped = [r for r in rows if r["kind"] == "drop"]
    assert len(dropped) == 1 and 0 <= dropped[0]["told_accuracy"] <= 1      # fused over b alone: g_b or h_b


@pytest.mark.parametrize("name", ["mie_recipe", "mie_recipe_heads"])
def test_the_stages_keep_the_other_modalities_shares_and_train_exactly_as_if_computed_per_step(name, monkeypatch):
    """The untrained modalities' shares of the ensemble term come from one pass over the training set after
    each stage, looked up by sample index; the run is the one that computes them at every step."""
    x, y = make_arrays(n=150, shapes={"a": (6,), "b": (5,), "c": (4,)})
    cfg = mie.config.build_config(None, ["train.epochs=2", "train.batch_size=32", "model.dim=8",
                                         "model.head_hidden=[8]", "train.threads=1"], method={"name": name})
    passes, kept, per_step = [], [], []
    keep = MIE._training_shares
    monkeypatch.setattr(MIE, "_training_shares", lambda self, k: passes.append(k) or keep(self, k))
    mie.fit(mie.MultimodalArrays(x, y), config=cfg, progress=False, callbacks=[lambda e, row: kept.append(row)])
    assert passes == ["b", "c", "a", "b", "c", "a", "b"]       # after each stage, the modality it trained
    monkeypatch.setattr(MIE, "_keeps_shares", property(lambda self: False))
    mie.fit(mie.MultimodalArrays(x, y), config=cfg, progress=False, callbacks=[lambda e, row: per_step.append(row)])
    assert len(passes) == 7 and len(kept) == len(per_step) == 6
    for a, b in zip(kept, per_step):
        for key in [k for k in a if k.startswith(("loss", "val_acc", "val_loss"))]:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
