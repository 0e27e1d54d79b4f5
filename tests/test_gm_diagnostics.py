"""MIE's GM diagnostics and unidirectional GM against hand computations in numpy.

The head-input covariances Ȳ = Σ_t z̄_t z̄_tᵀ and T = V exp(−τ (Λ − λ_min)/(λ_max − λ_min)) Vᵀ are
rebuilt here from a manual forward pass (no hooks), their spectra with numpy.linalg.eigvalsh; the
cosine between a gradient before and after GM from the vectors themselves."""
import copy
import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie
from conftest import make_arrays, make_context, make_step
from mie.diagnostics import GMDiagnostics
from mie.errors import MieInputError
from mie.methods import Batch, create_method
from mie.models import ClassifierHead, LateFusionModel
from mie.optim.flat import GradientModification, LowRankModification

K, LR = 3, 0.1


def _model():
    torch.manual_seed(0)
    encoders = {"a": nn.Sequential(nn.Linear(5, 6), nn.ReLU()), "b": nn.Sequential(nn.Linear(4, 6), nn.ReLU())}
    heads = {m: ClassifierHead(6, K, hidden=(7,)) for m in "ab"}       # Linear 6→7, ReLU, Linear 7→3
    return LateFusionModel(encoders, heads)


def _batches(n, size=5):
    g = torch.Generator().manual_seed(1)
    return [Batch({"a": torch.randn(size, 5, generator=g), "b": torch.randn(size, 4, generator=g)},
                  torch.randint(0, K, (size,), generator=g)) for _ in range(n)]


def _hand_covariances(model, batches, m):
    """[Ȳ (d_in × d_in) of each head Linear of m] by a manual forward pass in eval mode, numpy float64."""
    covs = None
    with torch.no_grad():
        for xs, _ in batches:
            h, inputs = model.encoders[m](xs[m]), []
            for layer in model.heads[m].net:
                if isinstance(layer, nn.Linear):
                    inputs.append(h.double().mean(dim=0).numpy())
                h = layer(h)
            outer = [np.outer(z, z) for z in inputs]
            covs = outer if covs is None else [c + o for c, o in zip(covs, outer)]
    return covs


def _hand_T(cov, tau):
    lam, V = np.linalg.eigh(cov)
    lam = np.clip(lam, 0, None)
    return V @ np.diag(np.exp(-tau * (lam - lam.min()) / (lam.max() - lam.min()))) @ V.T


@pytest.mark.parametrize("n_batches", [3, 12])     # rank-deficient Ȳ (n < d_in) and full rank
def test_spectra_match_numpy_eigvalsh(tmp_path, n_batches):
    tau = 3.0
    batches = _batches(n_batches)
    model = _model()
    method = create_method("mie", tau=tau, diagnostics=True)
    method.setup(model, make_context("ab", lr=LR, train_batches=batches))
    method.recompute(["a"], epoch=0)
    method.write_files(tmp_path, final=True)

    rows = list(csv.DictReader(open(tmp_path / "gm_spectra.csv")))
    spectra = np.load(tmp_path / "gm_spectra.npz")
    assert [r["name"] for r in rows] == ["heads.a.net.0", "heads.a.net.2"]
    for i, (row, cov) in enumerate(zip(rows, _hand_covariances(_model(), batches, "a"))):
        cov_eig = np.linalg.eigvalsh(cov).clip(0, None)
        T_eig = np.linalg.eigvalsh(_hand_T(cov, tau))
        assert int(row["epoch"]) == 1 and row["modality"] == "a" and int(row["d_in"]) == len(cov)
        np.testing.assert_allclose(float(row["cov_max"]), cov_eig.max(), rtol=1e-9)
        np.testing.assert_allclose(float(row["cov_mean"]), cov_eig.mean(), rtol=1e-9)
        np.testing.assert_allclose(float(row["T_max"]), T_eig.max(), rtol=1e-9)
        np.testing.assert_allclose(float(row["T_mean"]), T_eig.mean(), rtol=1e-9)
        assert int(row["damped"]) == int((T_eig < 0.99).sum())
        np.testing.assert_allclose(spectra[f"a.{i}.cov"][0], np.sort(cov_eig), rtol=1e-9, atol=1e-12 * cov_eig.max())
        np.testing.assert_allclose(spectra[f"a.{i}.T"][0], np.sort(T_eig)[::-1], atol=1e-10)
        assert spectra[f"a.{i}.epoch"].tolist() == [1]
    # τ = 3 damps most directions of the full-rank Ȳ, only the n_batches of the rank-deficient one
    assert 0 < int(rows[0]["damped"]) <= min(n_batches, 6)
    assert (tmp_path / "gm_diagnostics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("low_rank", [False, True])
def test_cosine_equals_hand_computation(low_rank):
    """Also with a low-rank T, which rewrites the gradient in place: the cosine still compares it with
    the gradient from before."""
    torch.manual_seed(3)
    layer, other = nn.Linear(4, 3), nn.Linear(2, 2)
    opt = torch.optim.SGD(list(layer.parameters()) + list(other.parameters()), lr=0.0)
    A = torch.randn(4, 4, dtype=torch.float64)
    T = torch.linalg.matrix_exp(-(A @ A.T) / 4)                  # a symmetric T with eigenvalues in (0, 1]
    applied = T
    if low_rank:
        applied = LowRankModification.from_means(torch.randn(4, 2, dtype=torch.float64), 3.0)
        T = applied.dense()
    hook = GradientModification([layer], [applied], track=True)
    hook.attach(opt)
    expected = []
    for _ in range(2):
        grads = {p: torch.randn_like(p) for p in opt.param_groups[0]["params"]}
        for p, g in grads.items():
            p.grad = g.clone()
        G = grads[layer.weight].double().numpy()
        rest = sum(float((g.double() ** 2).sum()) for p, g in grads.items() if p is not layer.weight)
        GT = G @ T.numpy()
        dot, nb, na = (G * GT).sum(), (G ** 2).sum(), (GT ** 2).sum()
        expected.append([dot / np.sqrt(nb * na), (dot + rest) / np.sqrt((nb + rest) * (na + rest))])
        opt.step()
        np.testing.assert_allclose(layer.weight.grad.double().numpy(), GT, rtol=1e-5, atol=1e-6)
    record = GMDiagnostics(0.4)
    record.add_cosines(3, "b", "a", hook)
    got = record.cosines[0]
    assert (got["epoch"], got["modality"], got["source"], got["steps"]) == (3, "b", "a", 2)
    np.testing.assert_allclose([got["cos_rewritten"], got["cos_all"]], np.mean(expected, axis=0), rtol=1e-6)
    assert expected[0][0] < 0.99                                 # T turns the gradient measurably
    assert hook.steps == 0 and hook.cosines is None              # read and reset
    layer.weight.grad = torch.zeros_like(layer.weight)           # a zero gradient is left unchanged
    other.weight.grad = other.bias.grad = layer.bias.grad = None
    opt.step()
    assert hook.cosines.tolist() == [1.0, 1.0]


def _params(model, m):
    return [p.detach().clone() for p in model.modality_parameters(m)]


def test_gm_into_one_modality_rewrites_that_modality_only():
    tau = 2.0
    batches = _batches(4)
    model = _model()
    method = create_method("mie_gm_only", tau=tau, gm_into=["b"])
    method.setup(model, make_context("ab", lr=LR, train_batches=batches, epochs_per_modality=2))
    method.num_epochs(2)
    assert [method.stage(e)[0] for e in range(4)] == ["a", "b", "a", "b"]

    reference = copy.deepcopy(model)
    xs, y = batches[0]
    method.training_step(batches[0], make_step(0, 0, 4))        # a, before any T: a plain SGD step
    method.end_epoch(0)                                          # a's stage ends: T^(a), which b reads
    assert method.means["a"] is not None
    Ta = [torch.from_numpy(_hand_T(c, tau)) for c in _hand_covariances(model, batches, "a")]
    assert all((T - torch.eye(len(T))).abs().max() > 0.05 for T in Ta)      # GM acts measurably here

    # b: each head Linear's weight gradient becomes ∇W·T^(a); its other gradients untouched
    before = _params(model, "b")
    loss = F.cross_entropy(reference.forward_modality("b", xs["b"]), y)
    params = reference.modality_parameters("b")
    grads = dict(zip(map(id, params), torch.autograd.grad(loss, params)))
    for layer, T in zip(reference.heads["b"].linears, Ta):
        grads[id(layer.weight)] = (grads[id(layer.weight)].double() @ T).float()
    method.training_step(batches[0], make_step(1, 0, 4))
    for got, p, b in zip(model.modality_parameters("b"), params, before):
        torch.testing.assert_close(got.detach(), b - LR * grads[id(p)], rtol=1e-5, atol=1e-6)
    method.end_epoch(1)                                          # b's stage ends: nobody reads T^(b)
    assert method.means["b"] is None

    # a again: a plain gradient step although b has trained, GM hooks and all
    reference.load_state_dict(model.state_dict())
    before = _params(model, "a")
    loss = F.cross_entropy(reference.forward_modality("a", xs["a"]), y)
    expected = [b - LR * g for b, g in zip(before, torch.autograd.grad(loss, reference.modality_parameters("a")))]
    method.training_step(batches[0], make_step(2, 0, 4))
    for got, want in zip(model.modality_parameters("a"), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    assert method.gm_hooks["a"].matrices == [None, None]


def test_gm_into_all_is_the_default_and_names_are_checked():
    batches = _batches(2)
    both = create_method("mie", gm_into=["b", "a"])
    both.setup(_model(), make_context("ab", train_batches=batches))
    default = create_method("mie")
    default.setup(_model(), make_context("ab", train_batches=batches))
    assert sorted(both.targets) == sorted(default.targets) == ["a", "b"]
    for bad in (["c"], [], ["a", "a"]):
        with pytest.raises(MieInputError, match="gm_into"):
            create_method("mie", gm_into=bad).setup(_model(), make_context("ab"))
    with pytest.raises(MieInputError, match="gm_into"):
        create_method("mie_sam_only", gm_into=["a"])               # no GM, nothing to direct


def _history(path):
    return list(csv.DictReader(open(path / "history.csv")))


CONFIG = {"train": {"epochs": 2, "batch_size": 32, "threads": 1}, "model": {"dim": 16, "head_hidden": [16, 8]}}


def test_diagnostics_in_a_run_change_no_number(tmp_path):
    x, y = make_arrays(n=150)
    data = mie.MultimodalArrays(x, y)
    plain = mie.fit(data, "mie", config=CONFIG, out_dir=tmp_path / "plain", progress=False)
    diag = mie.fit(data, "mie", config=CONFIG, out_dir=tmp_path / "diag", progress=False, diagnostics=True)
    assert plain["test"] == diag["test"]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop(_history(tmp_path / "plain")) == drop(_history(tmp_path / "diag"))
    assert not list((tmp_path / "plain").glob("gm_*"))

    cos = list(csv.DictReader(open(tmp_path / "diag" / "gm_cosine.csv")))
    assert [(int(r["epoch"]), r["modality"], r["source"]) for r in cos] == [(1, "a", "b"), (2, "b", "a"),
                                                                            (3, "a", "b"), (4, "b", "a")]
    assert float(cos[0]["cos_rewritten"]) == pytest.approx(1.0)  # the first stage's T is I
    assert all(-1 <= float(r["cos_rewritten"]) <= 1 and -1 <= float(r["cos_all"]) <= 1 for r in cos)
    spectra = np.load(tmp_path / "diag" / "gm_spectra.npz")
    rows = list(csv.DictReader(open(tmp_path / "diag" / "gm_spectra.csv")))
    assert len(rows) == 4 * 3                                    # 4 stage ends × 3 head Linears
    for m, layer in [("a", 0), ("b", 2)]:
        mine = [r for r in rows if r["modality"] == m and int(r["layer"]) == layer]
        np.testing.assert_allclose([float(r["T_mean"]) for r in mine], spectra[f"{m}.{layer}.T"].mean(axis=1))
        np.testing.assert_allclose([float(r["cov_max"]) for r in mine], spectra[f"{m}.{layer}.cov"].max(axis=1))
        assert [int(r["epoch"]) for r in mine] == spectra[f"{m}.{layer}.epoch"].tolist()
    assert (tmp_path / "diag" / "gm_diagnostics.png").read_bytes()[:4] == b"\x89PNG"
