"""AGM (mie.methods.agm): Shapley responses by hand (M = 2 and 3), the coefficients by hand, that
a step scales each response's gradient by its coefficient, the running scores, and resume."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie
from conftest import make_context, make_step
from mie.methods import Batch, create_method
from mie.methods.agm import AGM, agm_coefficients, agm_score, coalition_outputs, shapley_responses
from mie.models import ClassifierHead, SharedHeadModel


def _t(v):
    return torch.tensor([[float(v)]])


# ---- Shapley responses -----------------------------------------------------------------------
def test_shapley_two_modalities_by_hand():
    # f(∅)=1, f(a)=3, f(v)=2, f(av)=7: o_a = ½(f(av) − f(v) + f(a)) = 4, o_v = ½(7 − 3 + 2) = 3
    f = {frozenset(): _t(1), frozenset("a"): _t(3), frozenset("v"): _t(2), frozenset("av"): _t(7)}
    o = shapley_responses(f, ["a", "v"])
    assert o["a"].item() == pytest.approx(4.0) and o["v"].item() == pytest.approx(3.0)
    assert (o["a"] + o["v"]).item() == pytest.approx(7.0)          # efficiency: Σ o = f(N)


def test_shapley_three_modalities_by_hand_and_authors_formula():
    v = {"": 0.3, "a": 1, "b": 2, "c": 4, "ab": 3, "ac": 6, "bc": 5, "abc": 10}
    f = {frozenset(k): _t(x) for k, x in v.items()}
    o = shapley_responses(f, ["a", "b", "c"])
    # by hand, weights 1/3 (empty / full coalition of the others) and 1/6 (one other):
    # φ_a = (1−.3)/3 + (3−2)/6 + (6−4)/6 + (10−5)/3 = 2.4, o_a = φ_a + .3/3 = 2.5; likewise 2.5 and 5.0
    assert [o[m].item() for m in "abc"] == pytest.approx([2.5, 2.5, 5.0])
    # the authors' UR-Funny expression for audio, with pad_X = f(N ∖ X)
    for i, (j, k) in (("a", "bc"), ("b", "ac"), ("c", "ab")):
        authors = ((v["abc"] - v[j + k] + v[i]) / 3
                   + (v["".join(sorted(i + k))] - v[k] + v["".join(sorted(i + j))] - v[j]) / 6)
        assert o[i].item() == pytest.approx(authors)


def _tiny_model():
    """φ_m(x) = x (1-d), g = Linear(2 → 2) with W = [[1, 2], [0, 0]], b = [.5, 0]: f(S)_0 = x_a[a∈S] + 2x_v[v∈S] + .5."""
    enc = {}
    for m in ("a", "v"):
        enc[m] = nn.Linear(1, 1, bias=False)
        nn.init.ones_(enc[m].weight)
    head = ClassifierHead(2, 2, hidden=())
    with torch.no_grad():
        head.linears[0].weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
        head.linears[0].bias.copy_(torch.tensor([0.5, 0.0]))
    return SharedHeadModel(enc, head, "concat")


def test_coalitions_and_responses_of_a_known_model():
    model = _tiny_model()
    xs = {"a": torch.tensor([[1.0], [2.0]]), "v": torch.tensor([[-1.0], [0.5]])}
    f = coalition_outputs(model, xs)
    assert torch.allclose(f[frozenset()][:, 0], torch.tensor([0.5, 0.5]))
    assert torch.allclose(f[frozenset("a")][:, 0], torch.tensor([1.5, 2.5]))
    assert torch.allclose(f[frozenset(["a", "v"])][:, 0], torch.tensor([-0.5, 3.5]))
    o = shapley_responses(f, ["a", "v"])
    # o_a = x_a + .25, o_v = 2 x_v + .25 in class 0, 0 in class 1
    assert torch.allclose(o["a"], torch.tensor([[1.25, 0.0], [2.25, 0.0]]))
    assert torch.allclose(o["v"], torch.tensor([[-1.75, 0.0], [1.25, 0.0]]))
    method = AGM()
    method.setup(model, _ctx(model))
    fused, per = method.predict(xs)
    assert torch.allclose(per["a"], F.softmax(o["a"], dim=-1))
    assert torch.allclose(fused, F.softmax(f[frozenset(["a", "v"])], dim=-1))
    method = AGM(fusion="average")
    method.setup(model, _ctx(model))
    fused, _ = method.predict(xs)
    assert torch.allclose(fused, (F.softmax(o["a"], dim=-1) + F.softmax(o["v"], dim=-1)) / 2)


# ---- coefficients ------------------------------------------------------------------------------
def test_coefficients_by_hand():
    # M = 2: r_a = exp(s_v − s_a) = e^.5, r̃_a = exp(s̃_v − s̃_a) = e^.2, c_a = exp(α(r̃_a − r_a))
    c = agm_coefficients({"a": 0.5, "v": 1.0}, {"a": 0.7, "v": 0.9}, alpha=1.0, cap=10.0)
    assert c["a"] == pytest.approx(math.exp(math.exp(0.2) - math.exp(0.5)))     # 0.652…: a is ahead
    assert c["v"] == pytest.approx(math.exp(math.exp(-0.2) - math.exp(-0.5)))   # 1.236…: v is behind
    c = agm_coefficients({"a": 0.5, "v": 1.0}, {"a": 0.7, "v": 0.9}, alpha=2.0, cap=0.1)
    assert c["v"] == pytest.approx(math.exp(2.0 * 0.1))                       # min(·, cap)
    # M = 3, the authors' UR-Funny rule: exp((mean − s_i)·3/2)
    s, run = {"a": 0.4, "b": 0.9, "c": 1.4}, {"a": 0.6, "b": 0.8, "c": 1.0}
    c = agm_coefficients(s, run, alpha=0.5)
    for m in "abc":
        r = math.exp((0.9 - s[m]) * 1.5)
        r_opt = math.exp((0.8 - run[m]) * 1.5)
        assert c[m] == pytest.approx(math.exp(0.5 * min(r_opt - r, 10.0)))


def test_score_clamps_probability():
    logits = torch.tensor([[0.0, 0.0], [100.0, -100.0]])
    y = torch.tensor([0, 1])
    assert agm_score(logits, y) == pytest.approx((math.log(2) - math.log(1e-8)) / 2)


# ---- a step: gradients through o_i scaled by c_i --------------------------------------------
def _ctx(model, lr=0.1):
    return make_context(model.modalities, lr=lr, epochs_per_modality=1)


def _train(method, xs, y, epoch=0):
    """One training step in loop epoch ``epoch``; the logs as floats."""
    logs = method.training_step(Batch(xs, y), make_step(epoch))
    return {k: float(v) for k, v in logs.items()}


def test_step_scales_each_response_gradient_by_its_coefficient():
    torch.manual_seed(0)
    model = SharedHeadModel({"a": nn.Linear(3, 2), "v": nn.Linear(4, 2)}, ClassifierHead(4, 3, hidden=(5,)), "concat")
    method = AGM(alpha=1.0, grad_clip=0)
    method.setup(model, _ctx(model, lr=0.1))
    xs = {"a": torch.randn(6, 3), "v": 2 * torch.randn(6, 4)}
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ref = copy.deepcopy(model)

    o = shapley_responses(coalition_outputs(ref, xs), ["a", "v"])
    s = {m: float(-F.log_softmax(o[m].detach(), dim=-1)[torch.arange(6), y].mean()) for m in o}
    c = {"a": math.exp(1.0 - math.exp(s["v"] - s["a"])),       # first step: s̃ = 0, so r̃ = 1
         "v": math.exp(1.0 - math.exp(s["a"] - s["v"]))}
    out = o["a"] + o["v"]
    g = torch.autograd.grad(F.cross_entropy(out, y), out, retain_graph=True)[0]
    params = list(ref.parameters())
    grads = torch.autograd.grad(sum(c[m] * (o[m] * g).sum() for m in o), params, retain_graph=True)

    logs = _train(method, xs, y)
    assert logs["agm_coeff_a"] == pytest.approx(c["a"]) and logs["agm_coeff_v"] == pytest.approx(c["v"])
    assert c["a"] != pytest.approx(1.0, abs=1e-3)                 # the check has power
    for p, q, gq in zip(model.parameters(), ref.parameters(), grads):
        assert torch.allclose(p, q - 0.1 * gq, atol=1e-6)
    unscaled = torch.autograd.grad(F.cross_entropy(out, y), params)
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, unscaled))
    assert method.running == pytest.approx(s)                      # t = 1: running mean = scores

    xs2 = {"a": torch.randn(6, 3), "v": torch.randn(6, 4)}
    with torch.no_grad():
        o2 = shapley_responses(coalition_outputs(model, xs2), ["a", "v"])
    s2 = {m: agm_score(o2[m], y) for m in o2}
    _train(method, xs2, y)
    assert method.running == pytest.approx({m: (s[m] + s2[m]) / 2 for m in s})


def test_no_modulation_outside_the_window():
    torch.manual_seed(0)
    model = SharedHeadModel({"a": nn.Linear(3, 2), "v": nn.Linear(4, 2)}, ClassifierHead(4, 3, hidden=()), "concat")
    method = AGM(modulation_starts=1)
    method.setup(model, _ctx(model))
    logs = _train(method, {"a": torch.randn(4, 3), "v": torch.randn(4, 4)}, torch.tensor([0, 1, 2, 0]), epoch=0)
    assert logs["agm_coeff_a"] == 1.0 and logs["agm_coeff_v"] == 1.0
    assert method.iteration == 1                                 # scores still tracked


def test_state_dict_restores_running_scores():
    torch.manual_seed(0)
    model = SharedHeadModel({"a": nn.Linear(3, 2), "v": nn.Linear(4, 2)}, ClassifierHead(4, 3, hidden=()), "concat")
    method = AGM()
    method.setup(model, _ctx(model, lr=0.0))                     # lr 0: every step sees the same model
    xs, y = {"a": torch.randn(4, 3), "v": torch.randn(4, 4)}, torch.tensor([0, 1, 2, 0])
    xs2 = {"a": torch.randn(4, 3), "v": torch.randn(4, 4)}
    _train(method, xs, y)
    state = copy.deepcopy(method.state_dict())
    assert set(state) == {"optimizer", "running", "iteration"}
    after = _train(method, xs2, y)
    other = AGM()
    other.setup(model, _ctx(model, lr=0.0))
    fresh = _train(copy.deepcopy(other), xs2, y)
    other.load_state_dict(state)
    assert other.running == pytest.approx(state["running"]) and other.iteration == 1
    assert _train(other, xs2, y) == after                         # the same coefficients after a resume
    assert fresh["agm_coeff_a"] != pytest.approx(after["agm_coeff_a"])


def test_rejects_bad_setup():
    with pytest.raises(mie.MieInputError, match="fusion must be one of"):
        create_method("agm", fusion="max")
    with pytest.raises(mie.MieInputError, match="alpha must be a number >= 0"):
        create_method("agm", alpha=-1)
    with pytest.raises(mie.MieInputError, match="grad_clip must be"):
        create_method("agm", grad_clip=-1)
    with pytest.raises(mie.MieInputError, match="modulation_ends must be"):
        create_method("agm", modulation_starts=2, modulation_ends=1)
    one = SharedHeadModel({"a": nn.Linear(3, 2)}, ClassifierHead(2, 3, hidden=()), "concat")
    with pytest.raises(mie.MieInputError):
        AGM().setup(one, _ctx(one))
    many = SharedHeadModel({str(i): nn.Linear(1, 1) for i in range(9)}, ClassifierHead(9, 2, hidden=()), "concat")
    with pytest.raises(mie.MieInputError, match="2\\^M"):
        AGM().setup(many, _ctx(many))
