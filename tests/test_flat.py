"""Flat gradient modification (mie.optim.flat) against hand-built matrices."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mie.optim import InputCovariance, flat_modification_matrix, matrix_stats, modify_gradient


def _orthogonal(d, seed):
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def _expected_T(V, lam, tau):
    lam = np.asarray(lam, dtype=np.float64)
    sigma = np.exp(-tau * (lam - lam.min()) / (lam.max() - lam.min()))
    return V @ np.diag(sigma) @ V.T


@pytest.mark.parametrize("tau", [0.4, 2.0])
def test_matches_hand_built_T(tau):
    V = _orthogonal(5, 0)
    lam = np.array([0.1, 0.7, 1.3, 2.0, 4.5])
    perm = np.array([3, 0, 4, 1, 2])                   # eigenvalues not sorted in V's column order
    cov = V[:, perm] @ np.diag(lam[perm]) @ V[:, perm].T
    T = flat_modification_matrix(torch.from_numpy(cov), tau=tau)
    np.testing.assert_allclose(T.numpy(), _expected_T(V, lam, tau), rtol=0, atol=1e-10)
    # a wrong sign (amplifying sharp directions) or no normalisation would be far off
    assert np.abs(T.numpy() - V @ np.diag(np.exp(tau * (lam - lam.min()) / (lam.max() - lam.min()))) @ V.T).max() > 0.1
    assert np.abs(T.numpy() - V @ np.diag(np.exp(-tau * lam)) @ V.T).max() > 0.01


def test_accepts_numpy_and_float32_and_returns_float64():
    V = _orthogonal(4, 1)
    lam = np.array([0.5, 1.0, 2.0, 3.0])
    cov = V @ np.diag(lam) @ V.T
    for c in (cov, torch.tensor(cov, dtype=torch.float32)):
        T = flat_modification_matrix(c, tau=0.4)
        assert isinstance(T, torch.Tensor)
        assert T.dtype == torch.float64
        assert T.shape == (4, 4)
    np.testing.assert_allclose(flat_modification_matrix(torch.tensor(cov, dtype=torch.float32)).numpy(),
                               _expected_T(V, lam, 0.4), atol=1e-6)


def test_identity_when_all_eigenvalues_equal():
    eye = torch.eye(4, dtype=torch.float64)
    T = flat_modification_matrix(3.0 * eye, tau=0.4)
    assert T.dtype == torch.float64
    torch.testing.assert_close(T, eye, rtol=0, atol=1e-12)
    # a rotated multiple of I: round-off splits the eigenvalues by ~1e-16, which must not count
    V = _orthogonal(4, 2)
    T = flat_modification_matrix(torch.from_numpy(V @ (2.5 * np.eye(4)) @ V.T), tau=0.4)
    torch.testing.assert_close(T, eye, rtol=0, atol=1e-12)
    # and the zero matrix
    torch.testing.assert_close(flat_modification_matrix(torch.zeros(3, 3)), torch.eye(3, dtype=torch.float64),
                               rtol=0, atol=0)


def test_eigenvalues_clamped_at_zero():
    V = _orthogonal(4, 3)
    neg = V @ np.diag([-1e-6, 0.5, 1.0, 3.0]) @ V.T
    zero = V @ np.diag([0.0, 0.5, 1.0, 3.0]) @ V.T
    T_neg = flat_modification_matrix(torch.from_numpy(neg), tau=0.4)
    T_zero = flat_modification_matrix(torch.from_numpy(zero), tau=0.4)
    torch.testing.assert_close(T_neg, T_zero, rtol=0, atol=1e-13)
    np.testing.assert_allclose(T_zero.numpy(), _expected_T(V, [0.0, 0.5, 1.0, 3.0], 0.4), atol=1e-12)
    # without the clamp the answer would differ by ~1e-7: the tolerance above would catch it
    unclamped = _expected_T(V, [-1e-6, 0.5, 1.0, 3.0], 0.4)
    assert np.abs(unclamped - T_zero.numpy()).max() > 1e-8


@pytest.mark.parametrize("scale", [1e-4, 7.0, 1e5])
def test_invariant_to_scaling(scale):
    rng = np.random.default_rng(4)
    Z = rng.normal(size=(20, 6))
    cov = Z.T @ Z
    T = flat_modification_matrix(torch.from_numpy(cov), tau=0.4)
    Ts = flat_modification_matrix(torch.from_numpy(scale * cov), tau=0.4)
    torch.testing.assert_close(Ts, T, rtol=0, atol=1e-10)


def test_symmetric_spectrum_and_damped_directions():
    tau = 0.7
    V = _orthogonal(6, 5)
    lam = np.array([0.2, 0.9, 1.1, 2.5, 3.0, 8.0])
    cov = V @ np.diag(lam) @ V.T
    T = flat_modification_matrix(torch.from_numpy(cov), tau=tau).numpy()
    np.testing.assert_allclose(T, T.T, rtol=0, atol=1e-14)
    eig = np.linalg.eigvalsh(T)
    assert eig.min() >= math.exp(-tau) - 1e-12
    assert eig.max() <= 1 + 1e-12
    v_sharp, v_flat = V[:, -1], V[:, 0]              # largest and smallest λ
    np.testing.assert_allclose(T @ v_sharp, math.exp(-tau) * v_sharp, atol=1e-12)
    np.testing.assert_allclose(T @ v_flat, v_flat, atol=1e-12)
    np.testing.assert_allclose(eig.min(), math.exp(-tau), atol=1e-12)
    np.testing.assert_allclose(eig.max(), 1.0, atol=1e-12)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        flat_modification_matrix(torch.zeros(3, 4))
    with pytest.raises(ValueError):
        flat_modification_matrix(torch.eye(3), tau=0.0)
    with pytest.raises(ValueError):
        flat_modification_matrix(torch.eye(3), tau=-1.0)


def test_matrix_stats():
    V = _orthogonal(4, 6)
    T = torch.from_numpy(V @ np.diag([0.6, 0.8, 0.9, 1.0]) @ V.T)
    s = matrix_stats(T)
    assert s["mean_eig"] == pytest.approx((0.6 + 0.8 + 0.9 + 1.0) / 4, abs=1e-12)
    assert s["dist_identity"] == pytest.approx(math.sqrt(0.4 ** 2 + 0.2 ** 2 + 0.1 ** 2), abs=1e-12)


# ---- InputCovariance -----------------------------------------------------------------------

def test_input_covariance_matches_numpy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    batches = [torch.randn(n, 4) for n in (7, 3, 11, 5)]
    with InputCovariance([net[0], net[2]]) as cov:
        with torch.no_grad():
            for x in batches:
                net(x)

    W1, b1 = net[0].weight.detach().double().numpy(), net[0].bias.detach().double().numpy()
    Y1, Y2 = np.zeros((4, 4)), np.zeros((5, 5))
    for x in batches:
        x = x.double().numpy()
        z1 = x.mean(axis=0)                                  # input of the first Linear
        z2 = np.maximum(x @ W1.T + b1, 0.0).mean(axis=0)     # input of the second: the ReLU output
        Y1 += np.outer(z1, z1)
        Y2 += np.outer(z2, z2)
    assert [c.dtype for c in cov.covariances] == [torch.float64, torch.float64]
    assert [tuple(c.shape) for c in cov.covariances] == [(4, 4), (5, 5)]
    np.testing.assert_allclose(cov.covariances[0].numpy(), Y1, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(cov.covariances[1].numpy(), Y2, rtol=1e-6, atol=1e-9)
    # the batch mean is taken before the outer product (not the mean of per-sample outer products)
    per_sample = sum(np.einsum("ni,nj->ij", x.double().numpy(), x.double().numpy()) / len(x) for x in batches)
    assert np.abs(per_sample - Y1).max() > 0.1

    # hooks removed on exit: further passes change nothing and no hook is left on the layers
    snapshot = [c.clone() for c in cov.covariances]
    with torch.no_grad():
        net(torch.randn(4, 4))
    for c, s in zip(cov.covariances, snapshot):
        assert torch.equal(c, s)
    assert len(net[0]._forward_hooks) == 0 and len(net[2]._forward_hooks) == 0


def test_input_covariance_hooks_removed_after_exception():
    lin = nn.Linear(3, 2)
    with pytest.raises(RuntimeError):
        with InputCovariance([lin]):
            raise RuntimeError("boom")
    assert len(lin._forward_hooks) == 0


def test_input_covariance_rejects_layers_without_an_input_matrix():
    with pytest.raises(TypeError, match="GM takes"):
        InputCovariance([nn.Conv1d(2, 2, 3, groups=2)])


# ---- modify_gradient --------------------------------------------------------------

def test_modify_gradient():
    torch.manual_seed(1)
    lin = nn.Linear(5, 3)
    g_w, g_b = torch.randn(3, 5), torch.randn(3)
    lin.weight.grad, lin.bias.grad = g_w.clone(), g_b.clone()
    T = torch.eye(5, dtype=torch.float64) + 0.3 * torch.randn(5, 5, dtype=torch.float64)   # not symmetric
    change = modify_gradient(lin, T)

    expected = g_w.double().numpy() @ T.numpy()
    assert lin.weight.grad.dtype == torch.float32
    np.testing.assert_allclose(lin.weight.grad.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    # T on the input side (∇W·T), not the output side or transposed
    assert np.abs(expected - g_w.double().numpy() @ T.numpy().T).max() > 1e-2
    assert torch.equal(lin.bias.grad, g_b)
    g = g_w.double().numpy()
    assert change == pytest.approx(np.linalg.norm(expected - g) / np.linalg.norm(g), rel=1e-5)


def test_modify_gradient_shape_mismatch_and_no_grad():
    lin = nn.Linear(5, 3)
    assert modify_gradient(lin, torch.eye(5, dtype=torch.float64)) == 0.0     # no grad yet
    lin.weight.grad = torch.randn(3, 5)
    with pytest.raises(ValueError):
        modify_gradient(lin, torch.eye(3, dtype=torch.float64))               # out_features-sized
    with pytest.raises(ValueError):
        modify_gradient(lin, torch.eye(6, dtype=torch.float64))


# ---- convolution layers (GM beyond the head) --------------------------------------------------

def _mean_input_patches_by_hand(x, k, stride, pad):
    """Every (C·k·k) patch of the batch-mean input, one row per output position, by explicit loops."""
    x = np.pad(x.mean(axis=0), ((0, 0), (pad, pad), (pad, pad)))
    c, h, w = x.shape
    return np.stack([x[:, i:i + k, j:j + k].reshape(-1)                       # channel-major
                     for i in range(0, h - k + 1, stride) for j in range(0, w - k + 1, stride)])


def test_conv_covariance_is_the_unfolded_input_covariance():
    """Ȳ = Σ_t Σ_p u_{t,p} u_{t,p}ᵀ over the patches of each batch's mean input (Adam-NSCL)."""
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(4, 2, 7, 6)) for _ in range(3)]
    with InputCovariance([conv]) as cov:
        for x in batches:
            conv(torch.tensor(x, dtype=torch.float32))
    expected = sum(U.T @ U for U in (_mean_input_patches_by_hand(x.astype(np.float32).astype(np.float64), 3, 2, 1)
                                      for x in batches))
    assert cov.covariances[0].shape == (18, 18)
    np.testing.assert_allclose(cov.covariances[0].numpy(), expected, rtol=1e-6, atol=1e-9)


def test_conv_covariance_matches_the_released_code():
    """The authors' conv branch, transcribed: unfold the batch-mean input, covariance of the patches.

    # njustkmg/IJCAI25-IGM models/AudioVideo.py line 101: nn.Conv2d: F.unfold(torch.mean(fea_in[0], 0, True), ...)
    # njustkmg/IJCAI25-IGM models/AudioVideo.py line 109: permute(0, 2, 1).reshape(-1, C·k·k); update_cov: UᵀU
    """
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    batches = [torch.randn(5, 3, 9, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = 0
    for x in batches:
        u = F.unfold(torch.mean(x.double(), 0, True), kernel_size=conv.kernel_size, padding=conv.padding,
                     stride=conv.stride)                        # in float64, as ours accumulates
        u = u.permute(0, 2, 1).reshape(-1, u.shape[1])
        expected = expected + u.T @ u
    with InputCovariance([conv]) as cov:
        for x in batches:
            conv(x)
    torch.testing.assert_close(cov.covariances[0], expected, rtol=1e-10, atol=1e-10)


def test_the_factor_is_compacted_without_changing_the_covariance():
    """More than 2·d_in columns are folded into the QR factor Rᵀ (d_in × d_in): Z Zᵀ is kept."""
    conv = nn.Conv1d(1, 2, 2)                                   # d_in = 2; 7 positions per batch
    xs = [torch.randn(3, 1, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with InputCovariance([conv]) as cov:
        for x in xs:
            conv(x)
    assert cov.factor(0).shape[1] <= 2 * 2 + 7
    expected = 0
    for x in xs:
        u = x.double().mean(0)[0].unfold(0, 2, 1)                # (7, 2) patches of the batch-mean input
        expected = expected + u.T @ u
    torch.testing.assert_close(cov.covariances[0], expected, rtol=1e-10, atol=1e-10)


def test_conv_gradient_is_modified_as_a_matrix():
    conv = nn.Conv2d(2, 3, 2)
    conv(torch.randn(2, 2, 4, 4)).sum().backward()
    grad = conv.weight.grad.clone()
    T = torch.as_tensor(np.random.default_rng(1).normal(size=(8, 8)), dtype=torch.float64)
    modify_gradient(conv, T)
    expected = (grad.reshape(3, 8).double() @ T).reshape(3, 2, 2, 2)
    assert torch.allclose(conv.weight.grad.double(), expected, atol=1e-5)
    assert conv.bias.grad is not None


def test_layers_gm_cannot_take_are_refused():
    from mie.optim import input_dim
    for layer in (nn.Conv2d(4, 4, 3, groups=2), nn.Conv1d(1, 1, 3, padding="same"),
                  nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), nn.BatchNorm1d(3)):
        with pytest.raises(TypeError, match="GM takes"):
            input_dim(layer)


def _mean_input_patches_nd(x, kernel, stride, pad, dilation):
    """Patches of the batch-mean input of an N-d convolution, one row per output position (numpy loops)."""
    x = np.pad(x.mean(axis=0), [(0, 0)] + [(p, p) for p in pad])
    reach = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    outs = [(n - r) // s + 1 for n, r, s in zip(x.shape[1:], reach, stride)]
    return np.stack([x[(slice(None),) + tuple(slice(p * s, p * s + r, d) for p, s, r, d
                                               in zip(pos, stride, reach, dilation))].reshape(-1)
                     for pos in np.ndindex(*outs)])


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv1d(3, 2, 3, stride=2, padding=1), (4, 3, 9)),
    (nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1)), (3, 2, 7, 6)),
    (nn.Conv3d(2, 2, (3, 3, 3), stride=(2, 1, 2), padding=(1, 1, 0)), (2, 2, 5, 4, 6)),
])
def test_conv_patches_of_every_dimension(conv, shape):
    from mie.optim.flat import input_dim, layer_input_columns
    x = np.random.default_rng(len(shape)).normal(size=shape)
    got = layer_input_columns(conv, torch.tensor(x)).numpy()
    expected = _mean_input_patches_nd(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation).T
    assert got.shape == expected.shape and got.shape[0] == input_dim(conv)
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_low_rank_covariance_of_a_wide_layer(monkeypatch):
    """Ȳ = Z Zᵀ of rank 3 in 600 dimensions: T = I + Σ_i (σ_i − 1) u_i u_iᵀ over Z's left singular
    vectors (every other direction has λ = λ_min = 0, so σ = 1), also when torch's eigh gives up."""
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(600, 3))
    U, s, _ = np.linalg.svd(Z, full_matrices=False)
    lam = s ** 2
    sigma = np.exp(-0.4 * lam / lam.max())
    expected = np.eye(600) + (U * (sigma - 1)) @ U.T
    np.testing.assert_allclose(flat_modification_matrix(torch.tensor(Z @ Z.T), 0.4).numpy(), expected, atol=1e-8)

    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("failed to converge")
    monkeypatch.setattr(torch.linalg, "eigh", fail)
    np.testing.assert_allclose(flat_modification_matrix(torch.tensor(Z @ Z.T), 0.4).numpy(), expected, atol=1e-8)


@pytest.mark.parametrize("d, n", [(50, 7), (6, 20), (9, 1)])
def test_T_from_batch_means_equals_T_from_their_covariance(d, n):
    from mie.optim import flat_modification_from_means
    Z = torch.as_tensor(np.random.default_rng(d).normal(size=(d, n)))
    np.testing.assert_allclose(flat_modification_from_means(Z, 0.7).numpy(),
                               flat_modification_matrix(Z @ Z.T, 0.7).numpy(), atol=1e-9)
    assert torch.equal(flat_modification_from_means(torch.zeros(d, 0), 0.7), torch.eye(d, dtype=torch.float64))


@pytest.mark.parametrize("d, n", [(40, 6), (9, 1)])
def test_low_rank_modification_applies_the_T_of_its_means(d, n):
    """LowRankModification.from_means(Z): G · T = G + ((G U) ⊙ (σ − 1)) Uᵀ equals G times the T that
    numpy's eigendecomposition of Ȳ = Z Zᵀ gives, in float64 and (to float32 rounding) in modify_gradient."""
    from mie.optim import LowRankModification
    rng = np.random.default_rng(d)
    Z = rng.normal(size=(d, n))
    lam, V = np.linalg.eigh(Z @ Z.T)
    lam = np.clip(lam, 0, None)
    T = _expected_T(V, lam, 0.4)
    G = rng.normal(size=(5, d))
    low = LowRankModification.from_means(torch.tensor(Z), 0.4)
    assert low.shape == (d, d) and low.U.shape[1] <= n
    new = torch.tensor(G)
    change = low.right_multiply_(new)
    np.testing.assert_allclose(new.numpy(), G @ T, atol=1e-10)
    assert float(change) == pytest.approx(np.linalg.norm(G @ T - G), rel=1e-9)
    lin = nn.Linear(d, 5)
    lin.weight.grad = torch.tensor(G, dtype=torch.float32)
    rel = modify_gradient(lin, low)
    np.testing.assert_allclose(lin.weight.grad.double().numpy(), G @ T, rtol=1e-5, atol=1e-5)
    assert float(rel) == pytest.approx(np.linalg.norm(G @ T - G) / np.linalg.norm(G), rel=1e-5)
    empty = LowRankModification.from_means(torch.zeros(d, 0), 0.4)        # no means: T = I
    same = torch.tensor(G)
    assert float(empty.right_multiply_(same)) == 0 and torch.equal(same, torch.tensor(G))


@pytest.mark.parametrize("d, n", [(12, 3), (6, 10)])
def test_low_rank_modification_with_a_tolerance_leaves_out_the_nearly_undamped_directions(d, n):
    """from_means(Z, τ, tol) for n < d (Gram matrix) and n ≥ d (Ȳ itself): with tol = 0 the T of numpy's
    eigendecomposition; with tol > 0 exactly the directions with 1 − σ > tol kept (σ from numpy), and
    ‖T_tol − T‖₂ ≤ tol."""
    from mie.optim import LowRankModification
    rng = np.random.default_rng(d + n)
    Z = rng.normal(size=(d, n)) * np.linspace(0.05, 3, n)        # spread eigenvalues
    Z[:, 0] += 4.0                                               # one dominant direction, as batch means have
    lam, V = np.linalg.eigh(Z @ Z.T)
    lam = np.clip(lam, 0, None)
    if n < d:
        lam[: d - n] = 0.0                                       # exactly rank n
    sigma = np.exp(-1.5 * (lam - lam.min()) / (lam.max() - lam.min()))
    T = V @ np.diag(sigma) @ V.T
    exact = LowRankModification.from_means(torch.tensor(Z), 1.5)
    np.testing.assert_allclose(exact.dense().numpy(), T, atol=1e-10)
    for tol in (1e-3, 0.05, 0.3):
        low = LowRankModification.from_means(torch.tensor(Z), 1.5, tol=tol)
        kept = 1 - sigma > tol
        assert low.rank == kept.sum()
        np.testing.assert_allclose(low.dense().numpy(), V[:, kept] @ np.diag(sigma[kept] - 1) @ V[:, kept].T
                                   + np.eye(d), atol=1e-10)
        assert np.linalg.norm(low.dense().numpy() - T, 2) <= tol + 1e-12
    assert low.rank < exact.rank                                 # tol 0.3 leaves directions out
    with pytest.raises(ValueError, match="tol must be in"):
        LowRankModification.from_means(torch.tensor(Z), 1.5, tol=1.0)


def test_gradient_modification_logs_the_mean_relative_change_over_its_layers():
    """The hook's per-step log: the mean over the layers it was given a T for of ‖∇W·T − ∇W‖ / ‖∇W‖,
    by numpy, a layer without gradient counting 0 and one with ∇W = 0 too; each gradient is ∇W · T."""
    from mie.optim import GradientModification, LowRankModification
    rng = np.random.default_rng(5)
    layers = [nn.Linear(6, 4), nn.Linear(5, 3), nn.Linear(3, 2), nn.Linear(4, 2)]
    dense = _expected_T(_orthogonal(6, 1), rng.uniform(0, 1, 6), 0.9)
    low = LowRankModification.from_means(torch.tensor(rng.normal(size=(5, 2))), 0.9)
    Ts = [torch.tensor(dense), low, torch.eye(3, dtype=torch.float64), None]
    G = [rng.normal(size=(4, 6)), rng.normal(size=(3, 5)), None, rng.normal(size=(2, 4))]
    for layer, g in zip(layers, G):
        layer.weight.grad = None if g is None else torch.tensor(g, dtype=torch.float32)
    layers[1].weight.grad.zero_()
    opt = torch.optim.SGD([p for layer in layers for p in layer.parameters()], lr=0.0)
    gm = GradientModification(layers, Ts)
    gm.attach(opt)
    opt.step()
    np.testing.assert_allclose(layers[0].weight.grad.double().numpy(), G[0] @ dense, rtol=1e-5, atol=1e-6)
    assert torch.equal(layers[1].weight.grad, torch.zeros(3, 5)) and layers[2].weight.grad is None
    np.testing.assert_array_equal(layers[3].weight.grad.numpy(), np.float32(G[3]))       # no T: untouched
    expected = (np.linalg.norm(G[0] @ dense - G[0]) / np.linalg.norm(G[0]) + 0 + 0) / 3
    assert len(gm.changes) == 1 and float(gm.changes[0]) == pytest.approx(expected, rel=1e-5)


def test_input_covariance_keeps_its_columns_on_the_layers_device():
    """The hooks move nothing to the host per forward pass (a host sync per step on a GPU): columns
    collected on another device (here "meta") stay there until the factor is read."""
    lin = nn.Linear(4, 3, device="meta")
    with InputCovariance([lin]) as cov:
        for _ in range(2):
            lin(torch.randn(5, 4, device="meta"))
    assert [b.device.type for b in cov.blocks[0]] == ["meta", "meta"] and cov.columns == [2]
