"""AGM (mie.methods.agm): Shapley responses by hand (M = 2 and 3), the coefficients by hand, that
a step scales each response's gradient by its coefficient, the running scores, resume, and parity of
whole steps with a transcription of the authors' released CREMA-D (two modalities) and UR-Funny
(three) code: coalitions with the whole net in eval mode, scores, coefficients, clipping."""
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
from mie.models import ClassifierHead, SharedHeadModel, eval_mode


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


# ---- parity with the authors' released code ---------------------------------------------------
def _bn_encoder(n_in, d):
    return nn.Sequential(nn.Linear(n_in, d), nn.BatchNorm1d(d), nn.ReLU())


def _bn_model(mods, seed=0, d=3, k=3):
    """Encoders Linear → BatchNorm → ReLU (train and eval mode differ), one Linear head (the authors'
    ``fc_out``) on the concatenation."""
    torch.manual_seed(seed)
    enc = {m: _bn_encoder(2 + i, d) for i, m in enumerate(mods)}
    with torch.no_grad():
        for e in enc.values():                                   # running statistics far from a batch's
            e[1].running_mean.uniform_(-1.0, 1.0)
            e[1].running_var.uniform_(0.5, 2.0)
            e[1].weight.uniform_(0.5, 1.5)
            e[1].bias.uniform_(-0.5, 0.5)
    return SharedHeadModel(enc, ClassifierHead(d * len(mods), k, hidden=()), "concat").double()


class _ReleasedAGM:
    """A transcription, in plain torch, of the authors' training step: ``GradMod.forward`` (f(N) in train
    mode, then the whole net in eval mode for the padded passes, nothing detached), the mono-modal
    responses, the scores, coefficients and running scores of ``train``, the backward hooks, the
    gradient clipping and an SGD step, on a copy of the weights and BatchNorm buffers of a
    ``_bn_model``."""

    def __init__(self, model, lr, alpha, cap, clip):
        self.mods = list(model.modalities)
        self.p = {n: t.detach().clone() for n, t in model.named_parameters()}
        self.buf = {n: t.detach().clone() for n, t in model.named_buffers() if "running" in n}
        self.lr, self.alpha, self.cap, self.clip = lr, alpha, cap, clip
        self.train_score = {m: 0.0 for m in self.mods}
        self.iteration = 0

    def encode(self, p, m, x, training):
        h = x @ p[f"encoders.{m}.0.weight"].T + p[f"encoders.{m}.0.bias"]
        rm, rv = self.buf[f"encoders.{m}.1.running_mean"], self.buf[f"encoders.{m}.1.running_var"]
        if training:                                              # batch statistics; running ones updated
            mean, var = h.mean(0), h.var(0, unbiased=False)
            self.buf[f"encoders.{m}.1.running_mean"] = 0.9 * rm + 0.1 * mean.detach()
            self.buf[f"encoders.{m}.1.running_var"] = 0.9 * rv + 0.1 * h.var(0, unbiased=True).detach()
        else:
            mean, var = rm, rv
        z = (h - mean) / torch.sqrt(var + 1e-5) * p[f"encoders.{m}.1.weight"] + p[f"encoders.{m}.1.bias"]
        return torch.relu(z)

    def net(self, p, xs, pad, training):
        u = [self.encode(p, m, torch.zeros_like(xs[m]) if m in pad else xs[m], training) for m in self.mods]
        return torch.cat(u, 1) @ p["head.net.0.weight"].T + p["head.net.0.bias"]

    def responses(self, p, xs):
        total = self.net(p, xs, (), training=True)
        f = lambda *pad: self.net(p, xs, pad, training=False)
        if len(self.mods) == 2:
            # lihong2303/AGM model/CREMAD_net.py line 57 (GradMod.forward), lines 7-17 (Modality_Visual/Audio)
            a, v = self.mods
            pad_visual_out, pad_audio_out = f(v), f(a)
            return {a: 0.5 * (total - pad_audio_out + pad_visual_out),
                    v: 0.5 * (total - pad_visual_out + pad_audio_out)}
        # lihong2303/AGM model/URFunny_net.py line 80 (GradMod.forward), lines 6-31 (Modality_Text/Audio/Visual)
        v, a, t = self.mods
        pad_audio_out, pad_visual_out, pad_text_out = f(a), f(v), f(t)
        pad_visual_audio_out, pad_visual_text_out, pad_audio_text_out = f(v, a), f(v, t), f(a, t)
        return {t: (total - pad_text_out + pad_visual_audio_out) / 3
                + (pad_visual_out - pad_audio_text_out + pad_audio_out - pad_visual_text_out) / 6,
                a: (total - pad_audio_out + pad_visual_text_out) / 3
                + (pad_visual_out - pad_audio_text_out + pad_text_out - pad_visual_audio_out) / 6,
                v: (total - pad_visual_out + pad_audio_text_out) / 3
                + (pad_audio_out - pad_visual_text_out + pad_text_out - pad_visual_audio_out) / 6}

    def step(self, xs, y):
        self.iteration += 1                                       # run/CREMAD_main.py line 48 (1-based)
        t, M = self.iteration, len(self.mods)
        leaves = {n: q.clone().requires_grad_(True) for n, q in self.p.items()}
        out = self.responses(leaves, xs)
        # lihong2303/AGM run/CREMAD_main.py line 130: s = mean_k −log softmax(out)[k][y_k], floor 1e-8
        score = {}
        for m, o in out.items():
            p_true = F.softmax(o.detach(), dim=1)[torch.arange(len(y)), y]
            score[m] = float(torch.where(p_true < 1e-8, torch.full_like(p_true, 1e-8), p_true).log().neg().mean())
        # lihong2303/AGM run/CREMAD_main.py line 145 (M = 2) and run/URFunny_main.py line 117 (M = 3)
        mean, opt_mean = sum(score.values()) / M, sum(self.train_score.values()) / M
        coeff = {}
        for m in self.mods:
            ratio = math.exp((mean - score[m]) * M / (M - 1))
            optimal_ratio = math.exp((opt_mean - self.train_score[m]) * M / (M - 1))
            coeff[m] = math.exp(self.alpha * min(optimal_ratio - ratio, self.cap))
        # lihong2303/AGM run/CREMAD_main.py line 154: running scores after the coefficients
        for m in self.mods:
            self.train_score[m] = self.train_score[m] * (t - 1) / t + score[m] / t
        # lihong2303/AGM model/CREMAD_net.py line 45: the hooks multiply the gradient through each response
        scaled = sum(coeff[m] * o + (1 - coeff[m]) * o.detach() for m, o in out.items())
        loss = F.cross_entropy(scaled, y)
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        # lihong2303/AGM run/CREMAD_main.py line 235: clip when the fusion layer's gradient leaves [−clip, clip]
        g = grads["head.net.0.weight"]
        clipped = bool(g.max() > self.clip or g.min() < -self.clip)
        if clipped:
            norm = torch.sqrt(sum((q ** 2).sum() for q in grads.values()))
            factor = min(1.0, float(self.clip / (norm + 1e-6)))
            grads = {n: q * factor for n, q in grads.items()}
        self.p = {n: q - self.lr * grads[n] for n, q in self.p.items()}
        return coeff, score, clipped


def _check_parity(mods, steps, seed, lr=0.1, **params):
    """Run ``steps`` steps of AGM(**params) and of the transcription side by side; compare the logged
    scores and coefficients, every weight and BatchNorm buffer, and the running scores (to 1e-6: the
    method reads its scores in float32, as the authors' float32 model does). Returns whether each
    step clipped."""
    model = _bn_model(mods, seed=seed)
    ref = _ReleasedAGM(model, lr=lr, alpha=params.get("alpha", 1.0), cap=params.get("cap", 10.0),
                       clip=params.get("grad_clip", 1.0))
    method = AGM(**params)
    method.setup(model, _ctx(model, lr=lr))
    g = torch.Generator().manual_seed(seed + 1)
    clips = []
    for i in range(steps):
        xs = {m: 1.5 * torch.randn(8, 2 + j, generator=g, dtype=torch.float64) + j for j, m in enumerate(mods)}
        y = torch.arange(8) % 3
        coeff, score, clipped = ref.step(xs, y)
        clips.append(clipped)
        logs = method.training_step(Batch(xs, y), make_step(0, i, steps))
        assert model.training and all(mod.training for mod in model.modules())   # modes given back
        for m in mods:
            assert float(logs[f"agm_score_{m}"]) == pytest.approx(score[m], rel=1e-6)
            assert float(logs[f"agm_coeff_{m}"]) == pytest.approx(coeff[m], rel=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), ref.p[name], rtol=1e-6, atol=1e-8, msg=f"{name}, step {i}")
        for name, b in ref.buf.items():
            torch.testing.assert_close(dict(model.named_buffers())[name], b, rtol=1e-6, atol=1e-8)
        assert method.running == pytest.approx(ref.train_score, rel=1e-6)
    return clips


# lihong2303/AGM model/CREMAD_net.py line 61: the padded passes run with the whole net in eval mode (BatchNorm
# running statistics for the PRESENT modality too), gradients flowing through them; run/CREMAD_main.py line 130
# (scores), line 145 (coefficients, cap 10), line 154 (running scores), line 233 (clipping): two-modality AGM,
# step for step; fails if the present modalities' train-mode features are reused in the coalitions.
def test_parity_with_the_released_cremad_step():
    clips = _check_parity(("a", "v"), steps=4, seed=0, grad_clip=0.3)
    assert any(clips) and not all(clips)                         # both branches of the clipping rule ran
    assert _check_parity(("a", "v"), steps=2, seed=1) is not None  # the defaults (α 1, cap 10, clip 1)


# lihong2303/AGM model/URFunny_net.py line 96 (seven padded passes in eval mode), lines 6-31 (responses) and
# run/URFunny_main.py line 117 (coefficients with 3/2 and cap 7), line 204 (clipping at 5): three modalities.
def test_parity_with_the_released_urfunny_step():
    _check_parity(("v", "a", "t"), steps=3, seed=2, cap=7.0, grad_clip=5.0, alpha=0.5)


def test_coalitions_use_eval_mode_features_and_leave_modes_as_they_were():
    model = _bn_model(("a", "v"), seed=3)
    model.encoders["v"].eval()                                   # a module kept in eval mode stays so
    xs = {"a": torch.randn(6, 2, dtype=torch.float64), "v": torch.randn(6, 3, dtype=torch.float64)}
    f = coalition_outputs(model, xs)
    assert model.training and model.encoders["a"].training and not model.encoders["v"].training
    with torch.no_grad(), eval_mode(model):
        ua = model.encoders["a"](xs["a"])
        v0 = model.encoders["v"](torch.zeros(1, 3, dtype=torch.float64)).expand(6, -1)
        torch.testing.assert_close(f[frozenset("a")], model.head(torch.cat([ua, v0], 1)))
    with torch.no_grad():
        train_a = nn.Sequential(*model.encoders["a"]).train()(xs["a"])
    assert (train_a - ua).abs().max() > 1e-3                     # train and eval features differ here


def test_no_stale_coefficients_after_the_window():
    # lihong2303/AGM run/CREMAD_main.py line 159: update_scale runs only inside the window, so the released hooks
    # keep the last coefficients after it ends; mie steps with c = 1 there
    torch.manual_seed(0)
    model = SharedHeadModel({"a": nn.Linear(3, 2), "v": nn.Linear(4, 2)}, ClassifierHead(4, 3, hidden=()), "concat")
    method = AGM(modulation_ends=1, grad_clip=None)
    method.setup(model, _ctx(model))
    y = torch.tensor([0, 1, 2, 0])
    inside = _train(method, {"a": torch.randn(4, 3), "v": 3 * torch.randn(4, 4)}, y, epoch=0)
    assert inside["agm_coeff_a"] != pytest.approx(1.0, abs=1e-3)
    after = _train(method, {"a": torch.randn(4, 3), "v": torch.randn(4, 4)}, y, epoch=1)
    assert after["agm_coeff_a"] == 1.0 and after["agm_coeff_v"] == 1.0
    assert method.iteration == 2


def test_cap_none_leaves_the_gap_unbounded_and_notices():
    c = agm_coefficients({"a": 0.0, "v": 5.0}, {"a": 5.0, "v": 0.0}, alpha=0.1, cap=None)
    assert c["v"] == pytest.approx(math.exp(0.1 * (math.exp(5.0) - math.exp(-5.0))))
    assert agm_coefficients({"a": 0.0, "v": 5.0}, {"a": 5.0, "v": 0.0}, alpha=0.1)["v"] == pytest.approx(math.e)
    model = _tiny_model()
    method = AGM(modulation_starts=1)
    method.setup(model, _ctx(model))                             # 1 epoch: the window never opens
    assert "no step is modulated" in method.notices()[0]
    method = AGM()
    method.setup(model, _ctx(model))
    assert method.notices() == []
