"""MIE against its authors' released code (njustkmg/IJCAI25-IGM @19aa8e5), transcribed here with
plain torch: the flat matrix T of a head Linear and the gradient rewrite of the next modality.

Where the code differs from the paper (ρ = 1e-10, perturbation never undone, mixup objective,
checkpoints chosen on test), ``mie`` follows the paper; see ``mie.methods.mie``. The released
objective itself (``mie_released``) is checked in tests/test_mie_method.py."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_context, make_step
from mie.methods import Batch, create_method
from mie.models import ClassifierHead, LateFusionModel

K, TAU, LR = 3, 0.4, 0.1


def _model():
    torch.manual_seed(0)
    encoders = {"a": nn.Sequential(nn.Linear(5, 6), nn.ReLU()), "b": nn.Sequential(nn.Linear(4, 6), nn.ReLU())}
    heads = {m: ClassifierHead(6, K, hidden=(7,)) for m in "ab"}       # Linear 6→7, ReLU, Linear 7→3
    return LateFusionModel(encoders, heads)


def _batches(n=4, size=5):
    g = torch.Generator().manual_seed(1)
    return [Batch({"a": torch.randn(size, 5, generator=g), "b": torch.randn(size, 4, generator=g)},
                  torch.randint(0, K, (size,), generator=g)) for _ in range(n)]


def _released_P(model, batches, m):
    """{weight shape: P} of modality m's head Linears as the released code computes them.

    # njustkmg/IJCAI25-IGM models/AudioVideo.py line 97: compute_cov, nn.Linear: update_cov(mean(fea_in, 0, keepdim))
    # njustkmg/IJCAI25-IGM models/AudioVideo.py line 131: update_cov: cov += fea_inᵀ fea_in
    # njustkmg/IJCAI25-IGM models/AudioVideo.py line 122: svd(cov); exp(temperature1 · (−(λ − min)/(max − min)))
    # njustkmg/IJCAI25-IGM models/AudioVideo.py line 129: P = V diag(·) Vᵀ
    """
    linears = [l for l in model.heads[m].net if isinstance(l, nn.Linear)]
    cov = {id(l): 0 for l in linears}
    hooks = [l.register_forward_hook(lambda mod, inp, out: cov.__setitem__(
        id(mod), cov[id(mod)] + torch.mean(inp[0], 0, True).T @ torch.mean(inp[0], 0, True))) for l in linears]
    model.eval()                                   # AudioVideo.py compute_P_matrix: model.eval()
    with torch.no_grad():
        for xs, _ in batches:
            model.forward_modality(m, xs[m])
    for h in hooks:
        h.remove()
    P = {}
    for l in linears:
        _, eigen_value, eigen_vector = torch.svd(cov[id(l)], some=False)
        lo, hi = torch.min(eigen_value), torch.max(eigen_value)
        learning = torch.exp(TAU * (-(eigen_value - lo) / (hi - lo)))
        P[tuple(l.weight.shape)] = eigen_vector @ torch.diag(learning) @ eigen_vector.t()
    return P


@pytest.mark.parametrize("name, params", [("mie_gm_only", {}),
                                           ("mie_recipe", {"sam": False, "ensemble_weight": 0.0})])
def test_gm_step_matches_the_released_code(name, params):
    """After a's stage, b's step with GM (no SAM: the code's ρ = 1e-10 perturbs nothing) equals the
    released update: each Linear of b whose weight has the shape of a Linear of a gets ∇W @ P. The
    recipe keeps the paper's GM: at λ = 0 its step is the same.

    # njustkmg/IJCAI25-IGM train_CREMA.py line 152: for m in modules_now: if nn.Linear: for n in modules_pre:
    # njustkmg/IJCAI25-IGM train_CREMA.py line 156: if same shape: m.weight.grad = m.weight.grad @ P_matrix[n.weight]
    """
    batches = _batches()
    model = _model()
    reference = copy.deepcopy(model)
    method = create_method(name, tau=TAU, **params)
    method.setup(model, make_context("ab", lr=LR, train_batches=batches))
    method.num_epochs(2)
    method.recompute(["a"])                        # the end of a's stage: T^(a)
    assert method.stage(1)[:2] == ("b", "a")

    P = _released_P(reference, batches, "a")
    assert all((p - torch.eye(len(p))).abs().max() > 0.05 for p in P.values())   # GM acts measurably here
    xs, y = batches[0]
    reference.train()
    loss = F.cross_entropy(reference.forward_modality("b", xs["b"]), y)
    params = reference.modality_parameters("b")
    grads = dict(zip(map(id, params), torch.autograd.grad(loss, params)))
    for layer in reference.heads["b"].net:
        if isinstance(layer, nn.Linear) and tuple(layer.weight.shape) in P:
            grads[id(layer.weight)] = grads[id(layer.weight)] @ P[tuple(layer.weight.shape)]
    expected = [p.detach() - LR * grads[id(p)] for p in params]

    method.training_step(batches[0], make_step(1, 0, len(batches)))
    for got, want in zip(model.modality_parameters("b"), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    # and the released P is ours: T^(a) of each head Linear
    for layer, T in zip(method.layers["a"], method.T["a"]):
        torch.testing.assert_close(T.float(), P[tuple(layer.weight.shape)], rtol=1e-4, atol=1e-5)
    # a's parameters did not move
    for got, want in zip(model.modality_parameters("a"), _model().modality_parameters("a")):
        assert torch.equal(got.detach(), want.detach())
