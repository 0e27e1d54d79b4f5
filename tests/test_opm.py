"""OPM and OPM+OGM (mie.methods.opm, mie.methods.opm_ogm) against hand computations: the drop
probability q and its clipping, the per-sample drop and its 1/(1−q) rescale, that only the dominant
modality is dropped, p_exe, the window, the combined gradient modulation, and the real loop."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie
import mie.methods
from conftest import make_context, make_step
from mie.errors import MieInputError
from mie.methods import Batch, create_method
from mie.methods.opm import OPM, drop_probabilities, drop_samples
from mie.methods.opm_ogm import OPMOGM
from mie.models import ClassifierHead, LateFusionModel

K = 3
D = 4


def _model(strong, mods=("a", "v"), seed=0):
    """Linear encoders (K → D) and one-Linear heads; ``strong`` reads the label off a one-hot input."""
    torch.manual_seed(seed)
    encoders, heads = {}, {}
    for m in mods:
        enc, head = nn.Linear(K, D), ClassifierHead(D, K, hidden=())
        with torch.no_grad():
            if m == strong:
                enc.weight.mul_(0.1)
                enc.weight[:K, :K] += torch.eye(K)
                head.net[0].weight.zero_()
                head.net[0].weight[:, :K] = 3.0 * torch.eye(K)
            else:
                enc.weight.mul_(0.3)
                head.net[0].weight.mul_(0.3)
        encoders[m], heads[m] = enc, head
    return LateFusionModel(encoders, heads).double()


def _batch(strong, mods=("a", "v"), n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    xs = {m: torch.randn(n, K, generator=g, dtype=torch.float64) for m in mods}
    xs[strong] = 0.1 * xs[strong] + F.one_hot(y, K).double()
    return xs, y


def _ctx(mods):
    return make_context(mods, lr=0.0, epochs_per_modality=4)     # lr 0: the gradients stay visible


def _setup(cls, model, seed=5, **kw):
    method = cls(**kw)
    method.setup(model, _ctx(model.modalities))
    method.generator.manual_seed(seed)
    return method


def _train(method, xs, y, epoch=0):
    """One training step in loop epoch ``epoch``; the logs as floats."""
    logs = method.training_step(Batch(xs, y), make_step(epoch))
    return {k: float(v) for k, v in logs.items()}


def _scores(model, xs, y):
    with torch.no_grad():
        return {m: F.softmax(model.heads[m](model.encoders[m](xs[m])), dim=-1)[torch.arange(len(y)), y].sum().item()
                for m in model.modalities}


def _record_head_inputs(model):
    seen = {m: [] for m in model.modalities}
    for m in model.modalities:
        model.heads[m].register_forward_pre_hook(lambda mod, args, m=m: seen[m].append(args[0].detach().clone()))
    return seen


def test_drop_probability_by_hand_and_clipped():
    q = drop_probabilities({"a": 2.0, "v": 0.5}, q_base=0.5, lam=0.5)
    assert q["a"] == pytest.approx(0.5 * (1 + 0.5 * math.tanh(1.0)))     # relu(ρ − 1) = 1
    assert q["a"] != pytest.approx(0.5 * (1 + 0.5 * math.tanh(2.0)))     # not relu(ρ)
    assert q["v"] == 0.0                                                 # the weaker modality is never dropped
    assert drop_probabilities({"a": 1.0, "v": 1.0}, 0.5, 0.5) == {"a": 0.0, "v": 0.0}
    assert drop_probabilities({"a": 5.0, "v": 0.2}, q_base=0.9, lam=1.0)["a"] == 1.0   # 0.9·(1+tanh 4) → 1
    assert drop_probabilities({"a": 1.2, "v": 0.8}, q_base=0.0, lam=1.0)["a"] == 0.0
    three = drop_probabilities({"a": 2.0, "b": 1.0, "c": 0.4}, 0.4, 0.5)
    assert three == {"a": pytest.approx(0.4 * (1 + 0.5 * math.tanh(1.0))), "b": 0.0, "c": 0.0}


def test_drop_samples_zeroes_whole_rows_with_probability_q():
    f = torch.arange(1, 3 * 2000 + 1, dtype=torch.float64).view(2000, 3)
    out, keep = drop_samples(f, 0.3, torch.Generator().manual_seed(0))
    expected_keep = (torch.rand(2000, generator=torch.Generator().manual_seed(0)) >= 0.3).double()
    assert torch.equal(keep, expected_keep)
    assert torch.equal(out, f * expected_keep[:, None])                   # whole rows, nothing rescaled here
    assert 1 - keep.mean().item() == pytest.approx(0.3, abs=0.035)


@pytest.mark.parametrize("strong", ["a", "v"])
def test_only_the_dominant_modality_is_dropped_and_rescaled(strong):
    model = _model(strong)
    xs, y = _batch(strong)
    weak = "v" if strong == "a" else "a"
    s = _scores(model, xs, y)
    rho = s[strong] / s[weak]
    q = 0.5 * (1 + 0.5 * math.tanh(rho - 1))
    assert rho > 1.5

    # hand: the execute draw, then one draw per sample for the dominant modality
    g = torch.Generator().manual_seed(5)
    torch.rand((), generator=g)
    keep = (torch.rand(len(y), generator=g) >= q).double()
    assert 0 < keep.sum() < len(y)
    with torch.no_grad():
        f = {m: model.encoders[m](xs[m]) for m in model.modalities}
    f_strong = f[strong] * keep[:, None] / (1 - q)
    ref = copy.deepcopy(model)
    z = ref.heads[strong](ref.encoders[strong](xs[strong]) * keep[:, None] / (1 - q)) + \
        ref.heads[weak](ref.encoders[weak](xs[weak]))
    loss = F.cross_entropy(z, y)
    loss.backward()

    seen = _record_head_inputs(model)
    method = _setup(OPM, model, p_exe=1.0)
    logs = _train(method, xs, y)

    assert logs["opm_executed"] == 1.0
    assert logs[f"opm_q_{strong}"] == pytest.approx(q) and logs[f"opm_q_{weak}"] == 0.0
    assert logs["loss"] == pytest.approx(loss.item())
    assert len(seen[weak]) == 1 and torch.equal(seen[weak][0], f[weak])            # weak: untouched
    assert len(seen[strong]) == 2                                                  # scores, then the drop
    torch.testing.assert_close(seen[strong][0], f[strong])
    torch.testing.assert_close(seen[strong][1], f_strong)                          # κ·f/(1−q)
    assert torch.all(seen[strong][1][keep == 0] == 0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[name].grad)


def test_shared_rescale_is_the_released_codes_theta():
    model = _model("a")
    xs, y = _batch("a")
    s = _scores(model, xs, y)
    q = 0.5 * (1 + 0.5 * math.tanh(s["a"] / s["v"] - 1))
    theta = q / 2                                                     # equal feature sizes: mean of (q, 0)
    g = torch.Generator().manual_seed(5)
    torch.rand((), generator=g)
    keep = (torch.rand(len(y), generator=g) >= q).double()
    with torch.no_grad():
        f = {m: model.encoders[m](xs[m]) for m in model.modalities}
    seen = _record_head_inputs(model)
    _train(_setup(OPM, model, p_exe=1.0, rescale="shared"), xs, y)
    torch.testing.assert_close(seen["a"][1], f["a"] * keep[:, None] / (1 - theta))
    torch.testing.assert_close(seen["v"][1], f["v"] / (1 - theta))


def test_no_drop_without_execution_or_outside_the_window():
    model = _model("a")
    xs, y = _batch("a")
    plain = F.cross_entropy(sum(model.heads[m](model.encoders[m](xs[m])) for m in model.modalities), y).item()
    seen = _record_head_inputs(model)
    logs = _train(_setup(OPM, model, p_exe=0.0), xs, y)
    assert logs["opm_executed"] == 0.0 and logs["loss"] == pytest.approx(plain)
    assert len(seen["a"]) == len(seen["v"]) == 1
    method = _setup(OPM, model, p_exe=1.0, modulation_starts=1)
    state = method.generator.get_state()
    logs = _train(method, xs, y)
    assert logs["opm_executed"] == 0.0 and logs["opm_q_a"] == 0.0 and logs["loss"] == pytest.approx(plain)
    assert torch.equal(method.generator.get_state(), state)            # outside the window: no draw at all


def test_p_exe_is_the_fraction_of_executed_steps():
    model = _model("a")
    xs, y = _batch("a", n=12)
    method = _setup(OPM, model, p_exe=0.7)
    executed = [_train(method, xs, y)["opm_executed"] for _ in range(300)]
    assert np.mean(executed) == pytest.approx(0.7, abs=0.08)


def test_opm_ogm_scales_the_dominant_encoder_of_the_dropped_loss():
    alpha = 0.8
    model = _model("a")
    xs, y = _batch("a")
    s = _scores(model, xs, y)
    rho = s["a"] / s["v"]
    q = 0.5 * (1 + 0.5 * math.tanh(rho - 1))
    k = 1 - math.tanh(alpha * (rho - 1))
    g = torch.Generator().manual_seed(5)
    torch.rand((), generator=g)
    keep = (torch.rand(len(y), generator=g) >= q).double()
    ref = copy.deepcopy(model)
    z = (ref.heads["a"](ref.encoders["a"](xs["a"]) * keep[:, None] / (1 - q))
         + ref.heads["v"](ref.encoders["v"](xs["v"])))
    F.cross_entropy(z, y).backward()
    raw = {n: p.grad for n, p in ref.named_parameters()}

    logs = _train(_setup(OPMOGM, model, p_exe=1.0, alpha=alpha, ge="off"), xs, y)
    assert logs["ogm_coeff_a"] == pytest.approx(k) and logs["ogm_coeff_v"] == 1.0
    assert logs["opm_q_a"] == pytest.approx(q)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, (k if name.startswith("encoders.a.") else 1.0) * raw[name])


def test_invalid_settings_are_refused():
    for kw, refused in (({"q_base": 1.5}, "q_base"), ({"p_exe": -0.1}, "p_exe"), ({"lam": -1}, "lam"),
                        ({"rescale": "none"}, "rescale"), ({"fusion": "max"}, "fusion"),
                        ({"modulation_starts": 2, "modulation_ends": 2}, "modulation_ends")):
        with pytest.raises(MieInputError, match=f"{refused} must be"):
            create_method("opm", **kw)
    with pytest.raises(MieInputError, match="ge must be one of"):
        create_method("opm_ogm", ge="maybe")
    with pytest.raises(MieInputError, match="unknown parameter"):
        create_method("opm", alpha=0.5)                                 # OGM's α belongs to opm_ogm


def test_inference_is_the_sum_of_undropped_logits():
    model = _model("a")
    xs, _ = _batch("a")
    with torch.no_grad():
        z = {m: model.heads[m](model.encoders[m](xs[m])) for m in model.modalities}
    model.eval()
    for cls in (OPM, OPMOGM):
        method = _setup(cls, model, p_exe=1.0)
        state = method.generator.get_state()
        fused, per = method.predict(xs)
        assert method.fusion == "model"
        torch.testing.assert_close(fused, F.softmax(z["a"] + z["v"], dim=-1).float())
        torch.testing.assert_close(per["a"], F.softmax(z["a"], dim=-1).float())
        assert torch.equal(method.generator.get_state(), state)        # nothing is dropped at inference


def _arrays(n=90, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    x = {"a": (rng.normal(size=(K, 6))[y] * 2 + rng.normal(size=(n, 6))).astype(np.float32),
         "b": (rng.normal(size=(K, 4))[y] * 0.5 + rng.normal(size=(n, 4))).astype(np.float32)}
    return mie.MultimodalArrays(x, y)


@pytest.mark.parametrize("name,cls", [("opm", OPM), ("opm_ogm", OPMOGM)])
def test_runs_through_the_loop(monkeypatch, tmp_path, name, cls):
    monkeypatch.setitem(mie.methods.METHODS, name, (cls, {}, name))
    rows = []
    config = {"model": {"dim": 8, "head_hidden": [8]}, "train": {"batch_size": 32, "device": "cpu"}}
    result = mie.fit(_arrays(), method=name, config=config, epochs=2, seed=0, progress=False,
                     out_dir=tmp_path / "run", callbacks=[lambda epoch, row: rows.append(row)])
    assert len(rows) == 2 and 0.0 <= rows[0]["opm_executed"] <= 1.0
    assert max(rows[0]["opm_q_a"], rows[0]["opm_q_b"]) > 0.0
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert set(result["test"]["per_modality"]) == {"a", "b"}


def test_state_dict_restores_optimizer_and_generator():
    model = _model("a")
    xs, y = _batch("a")
    method = _setup(OPM, model, p_exe=1.0)
    _train(method, xs, y)
    state = copy.deepcopy(method.state_dict())
    after = [_train(method, xs, y)["loss"] for _ in range(3)]
    other = _setup(OPM, model, seed=99, p_exe=1.0)
    other.load_state_dict(state)
    assert [_train(other, xs, y)["loss"] for _ in range(3)] == after      # same drops after a resume
