"""MLA (mie.methods.mla): the OWM projection update, its α schedule, that the projection really
acts on the shared head's weight gradient in a step, parity with the update rule the released code
intends (and, with ``project=False``, with the released code as it actually runs: no projection),
the first step projected unlike the released branch, entropy fusion, and settings."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie
from conftest import make_context, make_step
from mie.methods import Batch, create_method
from mie.methods.mla import MLA, MLAModel, owm_alpha, owm_update
from mie.models import ClassifierHead


# ---- the projection update, by hand ---------------------------------------------------------
def test_owm_update_identity_by_hand():
    # P = I, r = e1: k = e1, rᵀk = 1, P' = I − e1 e1ᵀ/(α + 1) = diag(α/(1+α), 1)
    P = owm_update(torch.eye(2, dtype=torch.float64), torch.tensor([1.0, 0.0]), 0.1, normalize=False)
    assert torch.allclose(P, torch.tensor([[0.1 / 1.1, 0.0], [0.0, 1.0]], dtype=torch.float64), atol=1e-12)
    Pn = owm_update(torch.eye(2, dtype=torch.float64), torch.tensor([1.0, 0.0]), 0.1, normalize=True)
    norm = np.sqrt((0.1 / 1.1) ** 2 + 1.0)
    assert torch.allclose(Pn, torch.tensor([[0.1 / 1.1 / norm, 0.0], [0.0, 1.0 / norm]], dtype=torch.float64),
                          atol=1e-12)


def test_owm_update_general_by_hand():
    # P = [[2,1],[1,2]], r = (1,1), α = 0.5: k = P r = (3,3), rᵀk = 6, k kᵀ = 9·1, P' = P − 9/6.5
    P = owm_update(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64), torch.tensor([1.0, 1.0]), 0.5,
                   normalize=False)
    c = 9.0 / 6.5
    assert torch.allclose(P, torch.tensor([[2 - c, 1 - c], [1 - c, 2 - c]], dtype=torch.float64), atol=1e-12)
    # the projected direction is (almost) annihilated: P' r = α/(α + rᵀPr) · P r
    assert torch.allclose(P @ torch.tensor([1.0, 1.0], dtype=torch.float64),
                          torch.tensor([3.0, 3.0], dtype=torch.float64) * 0.5 / 6.5, atol=1e-12)


def test_alpha_schedule_exponent():
    assert owm_alpha(0, 4) == pytest.approx(0.1)
    assert owm_alpha(2, 4) == pytest.approx(0.1 ** 1.5)       # 0.0316…
    assert owm_alpha(3, 4) == pytest.approx(10 ** -1.75)
    assert owm_alpha(2, 4) != pytest.approx(0.1 ** 0.5)       # not 0.1^(b/N)


# ---- a step really projects the shared head's weight gradient ------------------------------
def _tiny_model():
    torch.manual_seed(0)
    encoders = {"a": nn.Linear(3, 2), "b": nn.Linear(4, 2)}
    return MLAModel(encoders, ClassifierHead(2, 3, hidden=()))


def _ctx(model, lr=0.5):
    return make_context(model.modalities, lr=lr, epochs_per_modality=1)


def _reference_step(ref, m, x, y, P, alpha, lr, normalize, project=True):
    """The update of φ_m and the head by hand: P ← P − kkᵀ/(α + rᵀk) (÷‖P‖_F), ∇W ← ∇W Pᵀ, SGD."""
    head = ref.head.linears[0]
    with torch.no_grad():
        r = ref.encoders[m](x).double().mean(dim=0)
    k = P @ r
    P = P - torch.outer(k, k) / (alpha + r @ k)
    if normalize:
        P = P / P.pow(2).sum().sqrt()
    params = list(ref.encoders[m].parameters()) + [head.weight, head.bias]
    grads = torch.autograd.grad(F.cross_entropy(ref.head(ref.encoders[m](x)), y), params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if p is head.weight and project:
                g = (g.double() @ P.T).float()
            p -= lr * g
    return P


@pytest.mark.parametrize("normalize", [False, True])
def test_train_step_projects_head_weight_gradient(normalize):
    model = _tiny_model()
    method = MLA(normalize=normalize)
    method.setup(model, _ctx(model))
    method.start_epoch(0)
    torch.manual_seed(1)
    xs = {"a": 0.3 * torch.randn(6, 3), "b": 0.3 * torch.randn(6, 4)}
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    before = copy.deepcopy(model)

    ref, P = copy.deepcopy(before), torch.eye(2, dtype=torch.float64)
    for m in ("a", "b"):                        # the modalities in turn, each its own step
        P = _reference_step(ref, m, xs[m], y, P, 0.1 ** 1.5, 0.5, normalize)

    logs = method.training_step(Batch(xs, y), make_step(0, 2, 4))   # third of N = 4 batches: α = 0.1^1.5
    assert set(logs) == {"loss_a", "loss_b", "mla_alpha_mean"}
    assert logs["mla_alpha_mean"] == pytest.approx(0.1 ** 1.5)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert torch.allclose(method.P[0].double(), P, atol=1e-6)

    # the check has power: no projection, or a wrong exponent of α, gives other weights
    for alpha, project in ((0.1 ** 1.5, False), (0.1 ** 0.5, True), (0.1 ** 3.0, True)):
        other, Q = copy.deepcopy(before), torch.eye(2, dtype=torch.float64)
        for m in ("a", "b"):
            Q = _reference_step(other, m, xs[m], y, Q, alpha, 0.5, normalize, project=project)
        assert not torch.allclose(model.head.linears[0].weight, other.head.linears[0].weight, atol=1e-4)


def test_each_head_linear_gets_its_own_projection():
    torch.manual_seed(0)
    model = MLAModel({"a": nn.Linear(3, 4), "b": nn.Linear(3, 4)}, ClassifierHead(4, 3, hidden=(5,)))
    method = MLA()
    method.setup(model, _ctx(model))
    method.start_epoch(0)
    assert [tuple(P.shape) for P in method.P] == [(4, 4), (5, 5)]
    method.training_step(Batch({"a": torch.randn(8, 3), "b": torch.randn(8, 3)}, torch.randint(0, 3, (8,))),
                         make_step())
    for P, d in zip(method.P, (4, 5)):
        assert not torch.allclose(P, torch.eye(d) / np.sqrt(d))   # both were updated


# ---- inference: per-sample entropy weights ---------------------------------------------------
def test_predict_weight_fusion_per_sample_by_hand():
    model = _tiny_model()
    method = MLA()
    method.setup(model, _ctx(model))
    xs = {"a": torch.randn(5, 3), "b": torch.randn(5, 4)}
    model.eval()
    fused, per = method.predict(xs)
    pa, pb = (F.softmax(model.forward_modality(m, xs[m]), dim=-1).detach() for m in ("a", "b"))
    assert torch.allclose(per["a"], pa) and torch.allclose(per["b"], pb)
    ha, hb = (-(p * p.log()).sum(dim=1) for p in (pa, pb))
    wa = torch.exp(-ha) / (torch.exp(-ha) + torch.exp(-hb))            # one weight per sample
    assert torch.allclose(fused, wa[:, None] * pa + (1 - wa[:, None]) * pb, atol=1e-6)
    method.fusion = "average"
    assert torch.allclose(method.predict(xs)[0], (pa + pb) / 2, atol=1e-6)


def test_rejects_bad_setup():
    with pytest.raises(mie.MieInputError, match="fusion must be one of 'average', 'weight'"):
        create_method("mla", fusion="max")
    with pytest.raises(mie.MieInputError, match="normalize must be true or false"):
        create_method("mla", normalize=1)
    two = MLAModel({"a": nn.Linear(3, 2), "b": nn.Linear(4, 2)}, ClassifierHead(2, 3, hidden=()))
    with pytest.raises(mie.MieInputError, match="must list each modality once"):
        MLA(order=["a", "c"]).setup(two, _ctx(two))
    model = MLAModel({"a": nn.Linear(3, 2)}, ClassifierHead(2, 3, hidden=()))
    with pytest.raises(mie.MieInputError):
        MLA().setup(model, _ctx(model))


# ---- parity with the authors' released code -------------------------------------------------
# A transcription of the released GSPlugin (Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-
# Adaptation utils/utils.py line 24, before_update) and of its MLA training loop (main.py line 432:
# out_a = fc_out(a); loss_a.backward(); gs_plugin.before_update(fc_out, a, batch_step,
# len_dataloader, exp_count); optimizer.step(); optimizer.zero_grad(); exp_count += 1; the same for
# v, main.py lines 444-454). ``intended=True`` applies the two fixes the dead branch intends (the
# paper's OWM update): the parameter name a Linear really has ("weight", utils.py line 32 tests
# "module.weight") and the scalar denominator α + r k (utils.py line 36 writes torch.mm(k, r), a d×d
# outer product). ``intended=False`` is the code exactly as released.
class _GSPlugin:
    def __init__(self, dim, intended):
        self.Pl = torch.eye(dim)
        self.exp_count = 0
        self.intended = intended

    def before_update(self, model, before_batch_input, batch_index, len_dataloader, train_exp_counter):
        lamda = batch_index / len_dataloader + 1
        alpha = 1.0 * 0.1 ** lamda
        if train_exp_counter != 0:
            for n, w in model.named_parameters():
                if n == ("weight" if self.intended else "module.weight"):
                    r = torch.mean(before_batch_input, 0, True)
                    k = torch.mm(self.Pl, torch.t(r))
                    denominator = torch.mm(r, k) if self.intended else torch.mm(k, r)
                    self.Pl = torch.sub(self.Pl, torch.mm(k, torch.t(k)) / (alpha + denominator))
                    pnorm2 = torch.norm(self.Pl.data, p='fro')
                    self.Pl.data = self.Pl.data / pnorm2
                    w.grad.data = torch.mm(w.grad.data, torch.t(self.Pl.data))


def _released_training(ref, batches, lr, intended, exp_count=0):
    criterion = nn.CrossEntropyLoss()
    fc_out = ref.head.linears[0]
    optimizer = torch.optim.SGD(ref.parameters(), lr=lr)
    gs_plugin = _GSPlugin(fc_out.in_features, intended)
    gs_plugin.exp_count = exp_count
    len_dataloader = len(batches)
    for batch_step, (xs, label) in enumerate(batches):
        for m in ("a", "b"):
            feat = ref.encoders[m](xs[m])
            out = fc_out(feat)
            loss = criterion(out, label)
            loss.backward()
            gs_plugin.before_update(fc_out, feat, batch_step, len_dataloader, gs_plugin.exp_count)
            optimizer.step()
            optimizer.zero_grad()
            gs_plugin.exp_count += 1
    return gs_plugin.Pl


def _two_batches():
    torch.manual_seed(3)
    return [({"a": torch.randn(6, 3), "b": torch.randn(6, 4)}, torch.tensor([0, 1, 2, 0, 1, 2])) for _ in range(2)]


def _run(method, model, batches):
    method.setup(model, _ctx(model, lr=0.5))
    method.start_epoch(0)
    for index, (xs, y) in enumerate(batches):
        method.training_step(Batch(xs, y), make_step(0, index, len(batches)))


def test_parity_with_the_update_rule_the_released_code_intends():
    batches = _two_batches()
    model = _tiny_model()
    ref = copy.deepcopy(model)
    _run(create_method("mla"), model, batches)
    # exp_count starts at 1: the released code would skip its very first update (utils.py line 29);
    # ``mie`` projects from the first step on (see the next test)
    P = _released_training(ref, batches, 0.5, intended=True, exp_count=1)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    # the check has power: the code as released (no projection) ends elsewhere
    plain = copy.deepcopy(_tiny_model())
    _released_training(plain, batches, 0.5, intended=False)
    assert not torch.allclose(model.head.linears[0].weight, plain.head.linears[0].weight, atol=1e-4)
    assert torch.allclose(P, P.T, atol=1e-6) and not torch.allclose(P, torch.eye(2) / np.sqrt(2), atol=1e-3)


def test_project_false_trains_as_the_released_code_actually_runs():
    batches = _two_batches()
    model = _tiny_model()
    ref = copy.deepcopy(model)
    method = create_method("mla", project=False)
    _run(method, model, batches)
    P = _released_training(ref, batches, 0.5, intended=False)
    assert torch.equal(P, torch.eye(2))                   # the released branch never fired
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert create_method("mla").project is True           # the paper's projection is the default


def test_the_first_step_of_the_run_is_projected_unlike_the_released_branch():
    batches = _two_batches()[:1]
    model = _tiny_model()
    _run(create_method("mla"), model, batches)
    projected, skipped = copy.deepcopy(_tiny_model()), copy.deepcopy(_tiny_model())
    _released_training(projected, batches, 0.5, intended=True, exp_count=1)
    _released_training(skipped, batches, 0.5, intended=True, exp_count=0)    # utils.py line 29
    head = model.head.linears[0].weight
    torch.testing.assert_close(head, projected.head.linears[0].weight, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(head, skipped.head.linears[0].weight, atol=1e-4)
