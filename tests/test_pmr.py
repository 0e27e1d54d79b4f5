"""PMR (mie.methods.pmr): prototypes are class means (then a momentum average), prototypical logits
are minus Euclidean distances, the ρ → β/γ coefficients by hand, the step's loss and gradient by
hand, the modulation window and PER epochs, parameter checks and the default prediction, the
two-modality restriction, and resume."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie
from conftest import make_context, make_step
from mie.methods import Batch, create_method
from mie.methods.pmr import PMR, pmr_coefficients, prototype_entropy, prototype_logits, prototype_score
from mie.models import ClassifierHead, LateFusionModel, SharedHeadModel


def _model(mods=("a", "v"), feature_fusion="late"):
    torch.manual_seed(0)
    enc = {m: nn.Linear(3 + i, 2) for i, m in enumerate(mods)}
    if feature_fusion == "concat":
        return SharedHeadModel(enc, ClassifierHead(2 * len(mods), 3, hidden=(4,)), "concat")
    return LateFusionModel(enc, {m: ClassifierHead(2, 3, hidden=()) for m in mods})


def _data(seed=0, n=10):
    g = torch.Generator().manual_seed(seed)
    xs = {"a": torch.randn(n, 3, generator=g), "v": torch.randn(n, 4, generator=g)}
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 0])[:n]
    return xs, y


def _ctx(model, batches, lr=0.1):
    return make_context(model.modalities, lr=lr, train_batches=batches, epochs_per_modality=1,
                        steps_per_epoch=len(batches))


def _split(xs, y, at=4):
    return [Batch({m: x[:at] for m, x in xs.items()}, y[:at]), Batch({m: x[at:] for m, x in xs.items()}, y[at:])]


# ---- prototypes -----------------------------------------------------------------------------
def test_prototypes_are_class_means_then_momentum():
    model = _model()
    xs, y = _data()
    method = PMR(momentum=0.2)
    method.setup(model, _ctx(model, _split(xs, y)))
    method.start_epoch(0)
    with torch.no_grad():
        feats = {m: model.encoders[m](xs[m]).numpy() for m in xs}
    for m in xs:
        means = np.stack([feats[m][y.numpy() == k].mean(axis=0) for k in range(3)])
        assert np.allclose(method.prototypes[m].numpy(), means, atol=1e-6)
    old = {m: method.prototypes[m].clone() for m in xs}

    with torch.no_grad():                                  # the encoders change during an epoch …
        for p in model.parameters():
            p.add_(0.5)
    method.end_epoch(0)                                    # … then C ← 0.8 C_new + 0.2 C_old
    with torch.no_grad():
        feats = {m: model.encoders[m](xs[m]).numpy() for m in xs}
    for m in xs:
        means = np.stack([feats[m][y.numpy() == k].mean(axis=0) for k in range(3)])
        assert np.allclose(method.prototypes[m].numpy(), 0.8 * means + 0.2 * old[m].numpy(), atol=1e-6)


def test_absent_class_keeps_its_prototype():
    model = _model()
    xs, y = _data()
    method = PMR()
    method.setup(model, _ctx(model, _split(xs, y)))
    method.start_epoch(0)
    before = method.prototypes["a"][2].clone()
    keep = y != 2
    method.ctx.train_batches = lambda: iter([Batch({m: x[keep] for m, x in xs.items()}, y[keep])])
    method.end_epoch(0)
    assert torch.equal(method.prototypes["a"][2], before)


def test_prototype_logits_are_minus_distances():
    z = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    C = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    # ‖(0,0)−(0,0)‖ = 0, ‖(0,0)−(3,0)‖ = 3, ‖(3,4)−(0,0)‖ = 5, ‖(3,4)−(3,0)‖ = 4
    assert torch.allclose(prototype_logits(z, C), -torch.tensor([[0.0, 3.0], [5.0, 4.0]]), atol=1e-5)
    z = torch.randn(5, 7)
    C = torch.randn(3, 7)
    assert torch.allclose(prototype_logits(z, C), -torch.cdist(z, C), atol=1e-5)


def test_score_and_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0], [np.log(3.0), 0.0]])   # softmax rows (.5, .5) and (.75, .25)
    assert prototype_score(logits, torch.tensor([1, 0])) == pytest.approx(0.5 + 0.75)
    h = (np.log(2) + (-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))) / 2
    assert prototype_entropy(logits).item() == pytest.approx(h, rel=1e-6)


# ---- coefficients ---------------------------------------------------------------------------
def test_coefficients_by_hand():
    # a ahead: ρ_a = 3/2 → the prototype loss goes to v with β_v = α·(ρ_a − 1), a gets PER γ_a = ρ_a − 1
    beta, gamma = pmr_coefficients({"a": 3.0, "v": 2.0}, alpha=1.0)
    assert beta == pytest.approx({"a": 0.0, "v": 0.5}) and gamma == pytest.approx({"a": 0.5, "v": 0.0})
    # v far ahead: ρ_v = 4, clipped to 1
    beta, gamma = pmr_coefficients({"a": 1.0, "v": 4.0}, alpha=0.6)
    assert beta == pytest.approx({"a": 0.6, "v": 0.0}) and gamma == pytest.approx({"a": 0.0, "v": 1.0})
    beta, gamma = pmr_coefficients({"a": 2.0, "v": 2.0}, alpha=1.0)
    assert beta == {"a": 0.0, "v": 0.0} and gamma == {"a": 0.0, "v": 0.0}


# ---- a step: the loss and its gradient by hand -------------------------------------------
@pytest.mark.parametrize("feature_fusion", ["late", "concat"])
def test_step_loss_and_update_by_hand(feature_fusion):
    model = _model(feature_fusion=feature_fusion)
    xs, y = _data()
    method = PMR(alpha=1.0, mu=0.5, momentum=0.2, feature_fusion=feature_fusion)
    method.setup(model, _ctx(model, _split(xs, y), lr=0.1))
    method.start_epoch(0)
    C = {m: c.clone() for m, c in method.prototypes.items()}
    C["v"] = C["v"] + 0.7                       # make the modalities unequal, so a coefficient is on
    method.prototypes = C
    ref = copy.deepcopy(model)

    z = {m: ref.encoders[m](xs[m]) for m in xs}
    dist = {m: torch.sqrt(((z[m][:, None, :] - C[m][None]) ** 2).sum(-1)) for m in xs}
    p = {m: F.softmax(-dist[m], dim=1) for m in xs}
    s = {m: float(p[m].detach()[torch.arange(len(y)), y].sum()) for m in xs}
    rho_a, rho_v = s["a"] / s["v"], s["v"] / s["a"]
    beta = {"a": min(max(rho_v - 1, 0), 1), "v": min(max(rho_a - 1, 0), 1)}
    gamma = {"a": min(max(rho_a - 1, 0), 1), "v": min(max(rho_v - 1, 0), 1)}
    assert max(beta.values()) > 0.01                                     # the check has power
    ent = {m: -(p[m] * p[m].log()).sum(1).mean() for m in xs}
    if feature_fusion == "concat":
        z_fused = ref.head(torch.cat([z["a"], z["v"]], dim=1))
    else:
        z_fused = (ref.heads["a"](z["a"]) + ref.heads["v"](z["v"])) / 2
    loss = (F.cross_entropy(z_fused, y)
            + sum(beta[m] * F.cross_entropy(-dist[m], y) for m in xs)
            - 0.5 * sum(gamma[m] * ent[m] for m in xs))
    grads = torch.autograd.grad(loss, list(ref.parameters()))

    logs = method.training_step(Batch(xs, y), make_step(0, 0, 2))
    assert logs["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert logs["pmr_rho"] == pytest.approx(rho_a, rel=1e-5)
    for q, g, p_ in zip(ref.parameters(), grads, model.parameters()):
        assert torch.allclose(p_, q - 0.1 * g, atol=1e-6)


def test_no_per_after_its_epochs_and_no_modulation_outside_window():
    model = _model()
    xs, y = _data()
    method = PMR(per_epochs=1, modulation_ends=2)
    method.setup(model, _ctx(model, _split(xs, y)))
    method.start_epoch(0)
    assert any(k.startswith("pmr_gamma") for k in method.training_step(Batch(xs, y), make_step(0)))
    method.start_epoch(1)
    logs = method.training_step(Batch(xs, y), make_step(1))
    assert "pmr_beta_a" in logs and not any(k.startswith("pmr_gamma") for k in logs)
    method.start_epoch(2)
    assert set(method.training_step(Batch(xs, y), make_step(2))) == {"loss"}
    # a window that starts later: no modulation before it, PER counted from its start
    late = PMR(per_epochs=1, modulation_starts=1)
    late.setup(model, _ctx(model, _split(xs, y)))
    late.start_epoch(0)
    assert set(late.training_step(Batch(xs, y), make_step(0))) == {"loss"}
    late.start_epoch(1)
    assert any(k.startswith("pmr_gamma") for k in late.training_step(Batch(xs, y), make_step(1)))
    assert not any(k.startswith("pmr_gamma") for k in late.training_step(Batch(xs, y), make_step(2)))


def test_settings_are_checked_and_the_default_predicts_softmax_of_the_mean_logits():
    with pytest.raises(mie.MieInputError, match=r"momentum must be a number in \[0, 1\)"):
        create_method("pmr", momentum=1.0)
    with pytest.raises(mie.MieInputError, match="alpha must be a number >= 0"):
        create_method("pmr", alpha=-1)
    with pytest.raises(mie.MieInputError, match="feature_fusion must be one of"):
        create_method("pmr", feature_fusion="average")
    with pytest.raises(mie.MieInputError, match="modulation_ends"):
        create_method("pmr", modulation_starts=3, modulation_ends=2)
    method = create_method("pmr")
    assert (method.feature_fusion, method.fusion) == ("late", "model")
    model = _model()
    method.setup(model, _ctx(model, []))
    xs, _ = _data()
    model.eval()
    fused, per = method.predict(xs)
    z = {m: model.heads[m](model.encoders[m](xs[m])).detach() for m in xs}
    assert torch.allclose(fused, F.softmax((z["a"] + z["v"]) / 2, dim=-1), atol=1e-6)
    assert torch.allclose(per["v"], F.softmax(z["v"], dim=-1), atol=1e-6)


def test_three_modalities_raise():
    model = _model(("a", "v", "t"))
    with pytest.raises(mie.MieInputError, match="exactly 2 modalities"):
        PMR().setup(model, _ctx(model, []))


def test_state_dict_round_trip():
    model = _model()
    xs, y = _data()
    method = PMR()
    method.setup(model, _ctx(model, _split(xs, y)))
    method.start_epoch(0)
    method.training_step(Batch(xs, y), make_step(0))
    state = method.state_dict()
    other = PMR()
    other.setup(model, _ctx(model, _split(xs, y)))
    other.load_state_dict(state)
    for m in ("a", "v"):
        assert torch.equal(other.prototypes[m], method.prototypes[m])
    other.start_epoch(1)                          # resumed: no fresh recomputation
    assert torch.equal(other.prototypes["a"], method.prototypes["a"])
