"""SAM (mie.optim.sam) against closed forms on a quadratic, and its BatchNorm / restore contract."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from mie.optim import SAM, frozen_batchnorm_stats

SHAPES = [(3,), (2, 2)]          # two parameter tensors, 7 numbers in all


def _problem(seed=0):
    """A, b of L(θ) = ½ θᵀAθ − bᵀθ (numpy float64) and a starting θ (7,)."""
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(7, 7))
    A = M @ M.T + 0.5 * np.eye(7)
    b = rng.normal(size=7)
    theta = rng.normal(size=7)
    # make the two tensors' gradient norms very different, so a per-tensor norm differs a lot
    theta[3:] *= 3.0
    return A, b, theta


def _params(theta, dtype=torch.float64):
    p1 = torch.tensor(theta[:3], dtype=dtype).reshape(SHAPES[0]).requires_grad_()
    p2 = torch.tensor(theta[3:], dtype=dtype).reshape(SHAPES[1]).requires_grad_()
    return [p1, p2]


def _flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params]).numpy().astype(np.float64)


def _loss(params, A, b):
    th = torch.cat([p.reshape(-1) for p in params])
    At = torch.as_tensor(A, dtype=th.dtype)
    bt = torch.as_tensor(b, dtype=th.dtype)
    return 0.5 * th @ At @ th - bt @ th


def _grad(A, b, theta):
    return A @ theta - b


@pytest.mark.parametrize("rho,lr", [(0.5, 0.1), (0.05, 0.3)])
def test_sam_step_matches_closed_form(rho, lr):
    A, b, theta = _problem()
    params = _params(theta)
    sam = SAM(torch.optim.SGD(params, lr=lr), rho=rho)

    _loss(params, A, b).backward()
    sam.first_step(zero_grad=True)
    g = _grad(A, b, theta)
    eps = rho * g / np.linalg.norm(g)              # joint norm over both tensors
    # the perturbed point is θ + ε
    np.testing.assert_allclose(_flat(params), theta + eps, rtol=0, atol=1e-12)
    assert all(p.grad is None for p in params)     # zero_grad=True

    _loss(params, A, b).backward()
    sam.second_step(zero_grad=True)
    expected = theta - lr * _grad(A, b, theta + eps)
    np.testing.assert_allclose(_flat(params), expected, rtol=0, atol=1e-12)

    # the per-tensor norm (as in the authors' released code) gives a clearly different step
    per_tensor = np.concatenate([rho * g[:3] / np.linalg.norm(g[:3]), rho * g[3:] / np.linalg.norm(g[3:])])
    wrong = theta - lr * _grad(A, b, theta + per_tensor)
    assert np.abs(wrong - expected).max() > 1e-3
    # and so does plain SGD (no perturbation)
    assert np.abs((theta - lr * g) - expected).max() > 1e-3


def test_sam_adaptive_matches_closed_form():
    rho, lr = 0.3, 0.2
    A, b, theta = _problem(1)
    params = _params(theta)
    sam = SAM(torch.optim.SGD(params, lr=lr), rho=rho, adaptive=True)

    _loss(params, A, b).backward()
    sam.first_step(zero_grad=True)
    g = _grad(A, b, theta)
    eps = rho * theta ** 2 * g / np.linalg.norm(theta * g)
    np.testing.assert_allclose(_flat(params), theta + eps, rtol=0, atol=1e-12)

    _loss(params, A, b).backward()
    sam.second_step()
    expected = theta - lr * _grad(A, b, theta + eps)
    np.testing.assert_allclose(_flat(params), expected, rtol=0, atol=1e-12)

    # non-adaptive ε would give another point
    plain = rho * g / np.linalg.norm(g)
    assert np.abs(plain - eps).max() > 1e-3


def test_grad_norm_is_joint_over_all_parameters():
    A, b, theta = _problem(2)
    params = _params(theta)
    sam = SAM(torch.optim.SGD(params, lr=0.1), rho=0.1)
    _loss(params, A, b).backward()
    g = _grad(A, b, theta)
    assert float(sam.grad_norm()) == pytest.approx(np.linalg.norm(g), rel=1e-12)
    # and differs from the sum / mean of per-tensor norms
    per = [np.linalg.norm(g[:3]), np.linalg.norm(g[3:])]
    assert abs(sum(per) - np.linalg.norm(g)) > 1e-3


def test_first_step_then_restore_is_bit_exact():
    torch.manual_seed(0)
    params = [torch.randn(17, 5, requires_grad=True), torch.randn(9, requires_grad=True)]
    before = [p.detach().clone() for p in params]
    sam = SAM(torch.optim.SGD(params, lr=0.1), rho=0.7)
    (params[0].sin().sum() + (params[1] ** 3).sum()).backward()
    grads = [p.grad.clone() for p in params]
    sam.first_step()
    moved = [p.detach().clone() for p in params]
    assert not all(torch.equal(m, b) for m, b in zip(moved, before))
    # undoing by subtraction is not bit-exact in float32 for these numbers: the test has teeth
    scale = 0.7 / torch.cat([g.reshape(-1) for g in grads]).norm()
    assert not all(torch.equal(m - g * scale, b) for m, g, b in zip(moved, grads, before))
    sam.restore()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_second_step_restores_before_base_step():
    """With lr = 0 the base step is the identity, so second_step must leave θ bit-identical."""
    torch.manual_seed(1)
    params = [torch.randn(6, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    before = [p.detach().clone() for p in params]
    sam = SAM(torch.optim.SGD(params, lr=0.0), rho=0.9)
    (params[0].exp().sum() + params[1].pow(2).sum()).backward()
    sam.first_step(zero_grad=True)
    (params[0].exp().sum() + params[1].pow(2).sum()).backward()
    sam.second_step(zero_grad=True)
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_second_step_before_first_step_raises():
    p = torch.zeros(2, requires_grad=True)
    sam = SAM(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(RuntimeError):
        sam.second_step()


def test_step_closure_equals_two_call_form():
    A, b, theta = _problem(3)
    rho, lr = 0.4, 0.15

    p_a = _params(theta)
    sam_a = SAM(torch.optim.SGD(p_a, lr=lr), rho=rho)
    _loss(p_a, A, b).backward()
    sam_a.first_step(zero_grad=True)
    _loss(p_a, A, b).backward()
    sam_a.second_step(zero_grad=True)

    p_b = _params(theta)
    sam_b = SAM(torch.optim.SGD(p_b, lr=lr), rho=rho)

    def closure():
        loss = _loss(p_b, A, b)
        loss.backward()
        return loss

    loss = sam_b.step(closure)
    assert loss.item() == pytest.approx(_loss(_params(theta), A, b).item(), rel=1e-12)
    for x, y in zip(p_a, p_b):
        assert torch.equal(x.detach(), y.detach())
    # and both equal the closed form
    g = _grad(A, b, theta)
    expected = theta - lr * _grad(A, b, theta + rho * g / np.linalg.norm(g))
    np.testing.assert_allclose(_flat(p_b), expected, rtol=0, atol=1e-12)


def test_step_requires_closure():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError):
        SAM(torch.optim.SGD([p], lr=0.1)).step(None)


def _bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    # non-trivial starting statistics
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(6))
        model[1].running_var.copy_(torch.rand(6) + 0.5)
        model[1].num_batches_tracked.fill_(5)
    return model


def _bn_buffers(model):
    bn = model[1]
    return [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]


def _reference_buffers(model, x):
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        ref(x)
    return _bn_buffers(ref)


def test_batchnorm_stats_updated_once_with_step_closure():
    model = _bn_model().train()
    torch.manual_seed(1)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    expected = _reference_buffers(model, x)
    before = [p.detach().clone() for p in model.parameters()]
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.5), rho=0.5, model=model)

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    sam.step(closure)
    got = _bn_buffers(model)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    assert int(got[2]) == 6
    # the parameters did move (the second pass really happened)
    assert not all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_batchnorm_stats_updated_once_with_two_call_form():
    model = _bn_model().train()
    torch.manual_seed(2)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    expected = _reference_buffers(model, x)
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.5), rho=0.5)
    nn.functional.cross_entropy(model(x), y).backward()
    sam.first_step(zero_grad=True)
    with frozen_batchnorm_stats(model):
        out = model(x)
        # the second pass does run in train mode (batch statistics), it just leaves no trace
        nn.functional.cross_entropy(out, y).backward()
    sam.second_step(zero_grad=True)
    for g, e in zip(_bn_buffers(model), expected):
        assert torch.equal(g, e)

    # without the freeze the statistics would have been updated twice: the check above has teeth
    model2 = _bn_model().train()
    with torch.no_grad():
        model2(x)
        model2(x + 1.0)
    assert int(model2[1].num_batches_tracked) == 7


def test_frozen_batchnorm_stats_none_is_noop():
    with frozen_batchnorm_stats(None):
        pass


def test_sam_rejects_non_optimizer():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(TypeError):
        SAM([p], rho=0.05)
    with pytest.raises(TypeError):
        SAM(SAM(torch.optim.SGD([p], lr=0.1)), rho=0.05)
    with pytest.raises(ValueError):
        SAM(torch.optim.SGD([p], lr=0.1), rho=-0.1)


# ---- SAM as a torch.optim.Optimizer --------------------------------------------------------------
def _closure(params, A, b):
    def closure():
        loss = _loss(params, A, b)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_step_closure_over_many_steps_equals_hand_computed_iterates(momentum):
    """Five SAM steps with SGD (with and without heavy-ball momentum) against the iterates written
    out with numpy: g = ∇L(θ), g' = ∇L(θ + ρ g/‖g‖), v ← μv + g', θ ← θ − η v."""
    A, b, theta = _problem(5)
    rho, lr = 0.3, 0.05
    params = _params(theta)
    sam = SAM(torch.optim.SGD(params, lr=lr, momentum=momentum), rho=rho)
    closure = _closure(params, A, b)
    th, v = theta.copy(), np.zeros_like(theta)
    for _ in range(5):
        loss = sam.step(closure)
        assert loss.item() == pytest.approx(0.5 * th @ A @ th - b @ th, rel=1e-12)
        g = _grad(A, b, th)
        g_sam = _grad(A, b, th + rho * g / np.linalg.norm(g))
        v = momentum * v + g_sam if momentum else g_sam
        th = th - lr * v
        np.testing.assert_allclose(_flat(params), th, rtol=0, atol=1e-11)


def test_step_clears_stale_gradients_before_its_first_pass():
    A, b, theta = _problem(6)
    rho, lr = 0.2, 0.1
    params = _params(theta)
    for p in params:                                   # left over from somewhere else
        p.grad = torch.full_like(p, 100.0)
    SAM(torch.optim.SGD(params, lr=lr), rho=rho).step(_closure(params, A, b))
    g = _grad(A, b, theta)
    expected = theta - lr * _grad(A, b, theta + rho * g / np.linalg.norm(g))
    np.testing.assert_allclose(_flat(params), expected, rtol=0, atol=1e-12)


def test_sam_is_an_optimizer_sharing_the_base_param_groups():
    p = torch.zeros(2, requires_grad=True)
    base = torch.optim.SGD([p], lr=0.1)
    sam = SAM(base, rho=0.05)
    assert isinstance(sam, torch.optim.Optimizer)
    assert sam.param_groups is base.param_groups


def test_a_scheduler_on_sam_drives_the_base_optimizers_rate():
    A, b, theta = _problem(7)
    params = _params(theta)
    base = torch.optim.SGD(params, lr=0.1)
    sam = SAM(base, rho=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(sam, step_size=2, gamma=0.5)
    rates = []
    for _ in range(5):
        before = _flat(params)
        sam.step(_closure(params, A, b))
        th = before
        g = _grad(A, b, th)
        expected_lr = base.param_groups[0]["lr"]
        np.testing.assert_allclose(_flat(params), th - expected_lr * _grad(A, b, th + 0.1 * g / np.linalg.norm(g)),
                                   rtol=0, atol=1e-12)
        rates.append(expected_lr)
        scheduler.step()
    assert rates == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])


def test_load_state_dict_keeps_the_constructors_rho():
    p = torch.zeros(2, requires_grad=True)
    saved = SAM(torch.optim.Adam([p], lr=0.1), rho=0.5).state_dict()
    sam = SAM(torch.optim.Adam([p], lr=0.1), rho=0.01, adaptive=True)
    sam.load_state_dict(saved)
    assert (sam.rho, sam.adaptive) == (0.01, True)
    assert sam.param_groups is sam.base_optimizer.param_groups


def test_base_optimizer_pre_hooks_run_between_the_second_backward_and_the_step():
    """GM's seam: a hook on the base optimizer sees the SECOND pass's gradient at the restored θ,
    and whatever it writes into the gradient is what the step uses."""
    A, b, theta = _problem(8)
    rho, lr = 0.25, 0.1
    params = _params(theta)
    base = torch.optim.SGD(params, lr=lr)
    seen = []

    def hook(optimizer, args, kwargs):
        seen.append((_flat(params), torch.cat([p.grad.reshape(-1) for p in params]).numpy().copy()))
        for p in params:
            p.grad.mul_(0.5)
    base.register_step_pre_hook(hook)
    SAM(base, rho=rho).step(_closure(params, A, b))
    g = _grad(A, b, theta)
    g_sam = _grad(A, b, theta + rho * g / np.linalg.norm(g))
    (at, grad), = seen
    np.testing.assert_allclose(at, theta, rtol=0, atol=0)              # restored before the hook
    np.testing.assert_allclose(grad, g_sam, rtol=0, atol=1e-12)         # the second pass's gradient
    np.testing.assert_allclose(_flat(params), theta - lr * 0.5 * g_sam, rtol=0, atol=1e-12)


def test_gm_through_the_hook_in_a_users_own_loop():
    """The README's recipe: GradientModification on the base optimizer, SAM around it, one
    ``step(closure)``; the head weight moves by −η (g' · T) and the bias by −η g'."""
    from mie.optim import GradientModification
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    T = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    T = T @ torch.diag(torch.tensor([1.0, 0.5, 0.25, 0.9], dtype=torch.float64)) @ T.T
    rho, lr = 0.05, 0.1

    reference = copy.deepcopy(model)               # the same SAM step written out by hand
    loss_fn = lambda m: nn.functional.cross_entropy(m(x), y)
    g = torch.autograd.grad(loss_fn(reference), list(reference.parameters()))
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    with torch.no_grad():
        perturbed = copy.deepcopy(reference)
        for p, t in zip(perturbed.parameters(), g):
            p.add_(rho * t / (norm + 1e-12))
    g_w, g_b = torch.autograd.grad(loss_fn(perturbed), list(perturbed.parameters()))
    expected_w = reference.weight.detach() - lr * (g_w @ T.float())
    expected_b = reference.bias.detach() - lr * g_b

    base = torch.optim.SGD(model.parameters(), lr=lr)
    gm = GradientModification([model], [T])
    gm.attach(base)
    sam = SAM(base, rho=rho, model=model)

    def closure():
        loss = loss_fn(model)
        loss.backward()
        return loss
    sam.step(closure)
    assert torch.allclose(model.weight, expected_w, atol=1e-6)
    assert torch.allclose(model.bias, expected_b, atol=1e-6)
    assert len(gm.changes) == 1 and float(gm.changes[0]) > 0
