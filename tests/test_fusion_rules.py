"""The "log" and "fitted" fusion rules (mie.models.fusion): by hand, at the fitted optimum, carried by
the checkpoint chosen on validation, fitted on validation only, and for every late-fusion method."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from scipy.special import logsumexp

import mie
from conftest import TINY, make_arrays
from mie.cli import main
from mie.errors import MieInputError
from mie.evaluate import evaluate_checkpoint
from mie.methods import create_method
from mie.methods.base import Method
from mie.models import LateFusionModel, ModelSpec, fuse, fused_prediction
from mie.models.fusion import fit_log_weights

# (m=3, B=2, K=3), as in test_fusion_metrics
PROBS = np.array([
    [[0.90, 0.05, 0.05], [0.34, 0.33, 0.33]],
    [[0.50, 0.30, 0.20], [0.20, 0.50, 0.30]],
    [[0.33, 0.33, 0.34], [0.05, 0.05, 0.90]],
])
CONFIG = {"train": {"epochs": 2, "batch_size": 16, "threads": 1}, "model": {"dim": 16, "head_hidden": [16, 8]}}


def test_log_fusion_is_the_normalised_geometric_mean():
    geometric = np.cbrt(PROBS[0] * PROBS[1] * PROBS[2])
    expected = geometric / geometric.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(fuse(torch.tensor(PROBS), "log").numpy(), expected, rtol=1e-12)
    # sample 0: the product follows the confident head more than the mean does
    assert expected[0, 0] > PROBS[:, 0, 0].mean()
    probs = {m: torch.tensor(PROBS[i]) for i, m in enumerate("abc")}
    np.testing.assert_allclose(fused_prediction("log", probs).numpy(), expected, rtol=1e-12)


def test_fitted_rule_by_hand_and_unfitted_weights_give_log():
    w = np.array([0.7, 0.2, 1.5])
    expected = np.exp(np.einsum("m,mbk->bk", w, np.log(PROBS)))
    expected /= expected.sum(axis=1, keepdims=True)
    got = fuse(torch.tensor(PROBS), "fitted", torch.tensor(w))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    third = torch.full((3,), 1 / 3, dtype=torch.float64)
    torch.testing.assert_close(fuse(torch.tensor(PROBS), "fitted", third), fuse(torch.tensor(PROBS), "log"))
    with pytest.raises(MieInputError, match="fitted on validation"):
        fuse(torch.tensor(PROBS), "fitted")


def _heads(n=300, k=4, seed=0):
    """(probs (3, n, k), labels): a good calibrated head, a weak overconfident one, a weak timid one."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    onehot = np.eye(k)[y]
    logits = np.stack([2.0 * onehot + rng.normal(size=(n, k)),
                       6.0 * (0.4 * onehot + rng.normal(size=(n, k))),
                       0.3 * (1.0 * onehot + rng.normal(size=(n, k)))])
    probs = np.exp(logits - logsumexp(logits, axis=-1, keepdims=True))
    return probs, y


def _objective(w, log_p, y):
    """Σ_i −log softmax(Σ_m w_m log p_m,i)_{y_i} + ½ ‖w − 1/m‖², in numpy."""
    s = np.einsum("m,mnk->nk", w, log_p)
    return (logsumexp(s, axis=1) - s[np.arange(len(y)), y]).sum() + 0.5 * ((w - 1 / len(w)) ** 2).sum()


def _nll(fused, y):
    return -np.log(fused[np.arange(len(y)), y]).mean()


def test_fitted_weights_reach_the_minimum():
    probs, y = _heads()
    log_p = np.log(probs)
    w = fit_log_weights(torch.tensor(probs), torch.tensor(y)).numpy()
    h = 1e-6
    grad = [(_objective(w + h * e, log_p, y) - _objective(w - h * e, log_p, y)) / (2 * h) for e in np.eye(3)]
    np.testing.assert_allclose(grad, 0, atol=1e-4)
    reference = minimize(_objective, np.full(3, 1 / 3), args=(log_p, y), method="BFGS", options={"gtol": 1e-9}).x
    np.testing.assert_allclose(w, reference, atol=1e-5)
    assert w[1] < w[0]                            # the overconfident weak head is turned down
    fitted = fuse(torch.tensor(probs), "fitted", torch.tensor(w)).numpy()
    for rule in ("average", "log", "weight"):
        assert _nll(fitted, y) <= _nll(fuse(torch.tensor(probs), rule).numpy(), y)


def test_fitted_weights_stay_finite_when_validation_is_separable():
    probs = np.array([[[0.9, 0.1], [0.2, 0.8]], [[0.6, 0.4], [0.3, 0.7]]])     # every head right on both
    w = fit_log_weights(torch.tensor(probs), torch.tensor([0, 1]))
    assert torch.isfinite(w).all() and (w < 20).all()
    assert torch.equal(w, fit_log_weights(torch.tensor(probs), torch.tensor([0, 1])))   # deterministic


def test_predict_present_fuses_the_present_modalities_by_log_and_fitted():
    torch.manual_seed(0)
    spec = ModelSpec(modalities=["a", "b", "c"], input_shapes={"a": (4,), "b": (5,), "c": (3,)},
                     encoders={m: "mlp" for m in "abc"}, num_classes=3, dim=8, head_hidden=(6,))
    xs = {m: torch.randn(7, *spec.input_shapes[m]) for m in "abc"}
    for rule in ("log", "fitted"):
        method = create_method("mie", fusion=rule)
        method.model = LateFusionModel.build(spec).eval()
        per = {m: F.log_softmax(z, dim=-1) for m, z in method.model(xs).items()}
        w = {"a": 1.0 / 2, "c": 1.0 / 2}
        if rule == "fitted":
            method.model.fitted_fusion.weight.copy_(torch.tensor([0.3, 2.0, 1.2]))
            w = {"a": 0.3, "c": 1.2}
        expected = F.softmax(w["a"] * per["a"] + w["c"] * per["c"], dim=-1)
        torch.testing.assert_close(method.predict_present(xs, ["a", "c"]), expected)


@pytest.fixture(scope="module")
def fitted_mie_run(tmp_path_factory):
    """A 2-epoch ``mie`` run with fusion "fitted", every call of the seam recorded: (run folder, data,
    [(labels, weights after the fit)], the run's metrics)."""
    x, y = make_arrays()
    out = tmp_path_factory.mktemp("fitted") / "run"
    calls, fit = [], Method.fit_on_validation

    def recording(self, per_logits, labels):
        fit(self, per_logits, labels)
        calls.append((labels.clone(), self.model.fitted_fusion.weight.clone()))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Method, "fit_on_validation", recording)
        result = mie.fit(mie.MultimodalArrays(x, y), "mie", config=CONFIG, out_dir=out, seed=1, fusion="fitted")
    return out, (x, y), calls, result


def test_fitting_sees_the_validation_labels_only(fitted_mie_run):
    out, (x, y), calls, result = fitted_mie_run
    split = np.load(out / "split.npz")
    assert len(calls) == result["loop_epochs"] == 4              # once per validation of a changed model
    for labels, _ in calls:
        assert labels.tolist() == y[split["val"]].tolist() != y[split["test"]].tolist()
    assert not any(torch.equal(w, torch.full((2,), 0.5)) for _, w in calls)


def test_fitted_weights_are_saved_in_best_pt_and_used_by_mie_eval(fitted_mie_run, capsys):
    out, (x, y), calls, result = fitted_mie_run
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=False)
    weight = best["model"]["fitted_fusion.weight"]
    assert torch.equal(weight, calls[result["best_epoch"] - 1][1])    # the fit of the epoch validation chose
    np.savez(out / "data.npz", y=y, **{f"x_{m}": a for m, a in x.items()})
    assert main(["eval", "--checkpoint", str(out / "checkpoints" / "best.pt"), "--data", str(out / "data.npz")]) == 0
    again = json.loads(capsys.readouterr().out)
    for key in ("accuracy", "loss", "map", "per_modality"):
        assert again[key] == result["test"][key]
    # the validation metrics were computed after the fit, with the weights the checkpoint holds
    val = evaluate_checkpoint(out / "checkpoints" / "best.pt", mie.MultimodalArrays(x, y), split="val")
    assert val["loss"] == pytest.approx(result["val"]["loss"], rel=1e-6)


@pytest.mark.parametrize("name", ["joint", "ogm_ge", "mslr", "mla"])
def test_late_fusion_methods_train_with_fitted_fusion(name, tmp_path):
    x, y = make_arrays(seed=2)
    result = mie.fit(mie.MultimodalArrays(x, y), name, config=CONFIG, out_dir=tmp_path, fusion="fitted")
    assert result["method_params"]["fusion"] == "fitted" and 0 <= result["test"]["accuracy"] <= 1
    weight = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=False)["model"]["fitted_fusion.weight"]
    assert torch.isfinite(weight).all() and not torch.equal(weight, torch.full((2,), 0.5))


def test_an_unknown_rule_is_one_line(capsys, npz_file, tmp_path):
    code = main(["train", "--data", str(npz_file), "--out", str(tmp_path / "r"), "method.fusion=geometric", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "fusion must be one of 'average', 'weight', 'log', 'fitted', 'model', got 'geometric'" in err
    with pytest.raises(MieInputError, match="expected one of average, weight, log, fitted"):
        fuse(torch.tensor(PROBS), "geometric")
