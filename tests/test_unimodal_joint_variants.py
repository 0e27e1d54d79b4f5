"""Unimodal training (mie.methods.unimodal) and joint training's fusion variants (mie.methods.joint):
losses, gradients and predictions against hand computations, the one-modality check, the loop, and
the one joint baseline: OGM-GE, OGM, OPM and OPM+OGM with their modulation off train exactly like
``joint`` (its late fusion is the sum of the per-modality logits)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie
import mie.methods
from mie.errors import MieInputError
from conftest import make_context, make_step
from mie.methods.joint import Joint
from mie.models import SharedHeadModel
from mie.methods.unimodal import Unimodal
from mie.models import LateFusionModel, ModelSpec

K = 3
SHAPES = {"a": (5,), "b": (4,)}
DIM = 6


def _spec(mods=("a", "b")):
    return ModelSpec(modalities=list(mods), input_shapes={m: SHAPES[m] for m in mods},
                     encoders={m: "mlp" for m in mods}, num_classes=K, dim=DIM, head_hidden=(7,))


def _deterministic(model):
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.double().train()


def _batch(mods=("a", "b"), n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return ({m: torch.randn(n, *SHAPES[m], generator=g, dtype=torch.float64) for m in mods},
            torch.arange(n) % K)


def _ctx(mods):
    return make_context(mods, lr=0.0, epochs_per_modality=1)      # lr 0: gradients stay visible


def _grads_of(model, loss_fn):
    ref = copy.deepcopy(model)
    loss = loss_fn(ref)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in ref.named_parameters()}


def _assert_grads(model, grads):
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name])


# ---- unimodal -----------------------------------------------------------------------------------
def test_unimodal_refuses_two_modalities_with_a_clear_message():
    with pytest.raises(MieInputError, match="--modalities NAME"):
        Unimodal().build_model(_spec())
    model = LateFusionModel.build(_spec())
    with pytest.raises(MieInputError, match="exactly one|one modality alone"):
        Unimodal().setup(model, _ctx(["a", "b"]))


def test_unimodal_step_and_prediction_by_hand():
    method = Unimodal()
    model = _deterministic(method.build_model(_spec(("b",))))
    method.setup(model, _ctx(["b"]))
    xs, y = _batch(("b",))
    loss, grads = _grads_of(model, lambda m: F.cross_entropy(m.heads["b"](m.encoders["b"](xs["b"])), y))
    assert method.training_step((xs, y), make_step())["loss"] == pytest.approx(loss)
    _assert_grads(model, grads)
    model.eval()
    fused, per = method.predict(xs)
    expected = F.softmax(model.heads["b"](model.encoders["b"](xs["b"])), dim=-1)
    torch.testing.assert_close(per["b"].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused, per["b"])


# ---- joint: late fusion is the SUM of the per-modality logits -----------------------------------
# GeWu-Lab/OGM-GE_CVPR2022 main.py line 88-93: the authors' concatenation layer decomposes as
# out = out_a + out_v (models/fusion_modules.py line 12: their sum fusion is fc_x(x) + fc_y(y)).
def test_joint_default_is_late_fusion_of_summed_logits():
    method = Joint()
    model = method.build_model(_spec())
    assert isinstance(model, LateFusionModel) and method.fusion == "model" and method.feature_fusion == "late"
    model = _deterministic(model)
    method.setup(model, _ctx(["a", "b"]))
    xs, y = _batch()

    def sum_loss(m):
        return F.cross_entropy(m.heads["a"](m.encoders["a"](xs["a"])) + m.heads["b"](m.encoders["b"](xs["b"])), y)
    loss, grads = _grads_of(model, sum_loss)
    assert method.training_step((xs, y), make_step())["loss"] == pytest.approx(loss)
    _assert_grads(model, grads)
    model.eval()
    fused, _ = method.predict(xs)
    with torch.no_grad():
        z = model.heads["a"](model.encoders["a"](xs["a"])) + model.heads["b"](model.encoders["b"](xs["b"]))
    torch.testing.assert_close(fused.double(), F.softmax(z, dim=-1), rtol=1e-5, atol=1e-6)


# ---- one joint baseline: the modulation methods with their modulation off ARE joint --------------
OFF = {"ogm_ge": {"alpha": 0.0, "ge": "off"}, "ogm": {"alpha": 0.0},
       "opm": {"p_exe": 0.0, "modulation_starts": 0},
       "opm_ogm": {"p_exe": 0.0, "alpha": 0.0, "ge": "off", "modulation_starts": 0}}


def _sgd(params, lr=None):
    return torch.optim.SGD(list(params), lr=0.05, momentum=0.9, weight_decay=1e-4)


@pytest.mark.parametrize("name", sorted(OFF))
def test_modulation_off_trains_exactly_like_joint(name):
    """Same initial model, same seed, a few real training steps (dropout on): the same parameters."""
    mods = ("a", "b")
    states = {}
    for which in ("joint", name):
        method = mie.methods.create_method(which, **(OFF[name] if which == name else {}))
        torch.manual_seed(0)
        model = method.build_model(_spec()).double().train()
        method.setup(model, make_context(mods, make_optimizer=_sgd, epochs_per_modality=3))
        torch.manual_seed(1)                                   # the dropout masks of the steps below
        for step in range(4):
            xs, y = _batch(seed=10 + step)
            method.training_step(mie.methods.Batch(xs, y), make_step(epoch=step))
        states[which] = copy.deepcopy(model.state_dict())
    assert states["joint"].keys() == states[name].keys()
    for key, value in states["joint"].items():
        assert torch.equal(value, states[name][key]), key
    first = states["joint"]["heads.a.net.0.weight"]
    torch.manual_seed(0)
    assert not torch.equal(first, Joint().build_model(_spec()).double().state_dict()["heads.a.net.0.weight"])


@pytest.mark.parametrize("name", sorted(OFF))
def test_modulation_off_runs_exactly_like_joint_through_the_loop(name, tmp_path):
    """The loop's whole run (shuffling, dropout, evaluation, model selection): the same history and result."""
    runs = {}
    for which in ("joint", name):
        rows = []
        result = mie.fit(_arrays(), method=which, config=CONFIG, epochs=3, seed=0, progress=False,
                         out_dir=tmp_path / which, callbacks=[lambda epoch, row: rows.append(row)],
                         **(OFF[name] if which == name else {}))
        last = torch.load(tmp_path / which / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
        runs[which] = (result, rows, last["model"])
    (joint, joint_rows, joint_model), (other, other_rows, other_model) = runs["joint"], runs[name]
    assert other["test"] == joint["test"] and other["val"] == joint["val"]
    assert [r["loss"] for r in other_rows] == [r["loss"] for r in joint_rows]
    for key, value in joint_model.items():
        assert torch.equal(value, other_model[key]), key


# ---- joint: concat / sum with one shared head -----------------------------------------------------
@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_feature_fusion_step_and_predictions_by_hand(fusion):
    method = Joint(feature_fusion=fusion)
    model = method.build_model(_spec())
    assert isinstance(model, SharedHeadModel)
    assert model.head.linears[0].in_features == (2 * DIM if fusion == "concat" else DIM)
    model = _deterministic(model)
    method.setup(model, _ctx(["a", "b"]))
    xs, y = _batch()

    def combine(fa, fb):
        return torch.cat([fa, fb], dim=-1) if fusion == "concat" else fa + fb

    def fused_logits(m):
        return m.head(combine(m.encoders["a"](xs["a"]), m.encoders["b"](xs["b"])))

    loss, grads = _grads_of(model, lambda m: F.cross_entropy(fused_logits(m), y))
    assert method.training_step((xs, y), make_step())["loss"] == pytest.approx(loss)
    _assert_grads(model, grads)

    model.eval()
    with torch.no_grad():
        fa, fb = model.encoders["a"](xs["a"]), model.encoders["b"](xs["b"])
        expected = F.softmax(model.head(combine(fa, fb)), dim=-1)
        own_a = F.softmax(model.head(combine(fa, torch.zeros_like(fb))), dim=-1)   # the others zeroed
        own_b = F.softmax(model.head(combine(torch.zeros_like(fa), fb)), dim=-1)
    fused, per = method.predict(xs)
    torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per["a"].double(), own_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per["b"].double(), own_b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(per["a"], per["b"])


def test_unknown_fusion_is_refused_at_construction():
    with pytest.raises(MieInputError, match="fusion must be one of 'model', 'average', 'weight', 'log', 'fitted', got 'gated'"):
        mie.methods.create_method("joint", fusion="gated")
    with pytest.raises(MieInputError, match="feature_fusion must be one of 'late', 'concat', 'sum'"):
        Joint(feature_fusion="gated")
    with pytest.raises(MieInputError, match="fusion must be one of 'average', 'weight', 'log', 'fitted', 'model', got 'bogus'"):
        mie.methods.create_method("mie", fusion="bogus")


# ---- through the loop -----------------------------------------------------------------------------
def _arrays(n=90, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    x = {"a": (rng.normal(size=(K, 5))[y] * 2 + rng.normal(size=(n, 5))).astype(np.float32),
         "b": (rng.normal(size=(K, 4))[y] * 0.5 + rng.normal(size=(n, 4))).astype(np.float32)}
    return mie.MultimodalArrays(x, y)


CONFIG = {"model": {"dim": 8, "head_hidden": [8]}, "train": {"batch_size": 32, "device": "cpu"}}


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_joint_feature_fusion_runs_through_the_loop(fusion):
    result = mie.fit(_arrays(), method="joint", config=CONFIG, epochs=2, seed=0, progress=False, feature_fusion=fusion)
    assert result["method_params"]["feature_fusion"] == fusion
    assert set(result["test"]["per_modality"]) == {"a", "b"}
    assert 0.0 <= result["test"]["accuracy"] <= 1.0


def test_unimodal_runs_through_the_loop_on_one_modality(monkeypatch):
    monkeypatch.setitem(mie.methods.METHODS, "unimodal", (Unimodal, {}, "one modality alone"))
    data = _arrays()
    result = mie.fit(data.select(["a"]), method="unimodal", config=CONFIG, epochs=2, seed=0, progress=False)
    assert set(result["test"]["per_modality"]) == {"a"}
    assert result["test"]["accuracy"] == result["test"]["per_modality"]["a"]["accuracy"]
    with pytest.raises(MieInputError, match="--modalities"):
        mie.fit(data, method="unimodal", config=CONFIG, epochs=1, seed=0, progress=False)
