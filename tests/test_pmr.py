"""PMR (mie.methods.pmr): a parity test against a transcription of the authors' released training
step and prototype update; prototypes are class means on a random fraction of the training set
(fresh after epoch 0, then a momentum average); prototypical logits are minus Euclidean distances;
the sign rule (default) and the clip rule of β by hand; the ``pmr_per`` variant's loss and
gradient by hand; the modulation window and PER epochs; parameter checks and defaults (concat
fusion); the two-modality restriction; notices; and resume."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie
from conftest import make_context, make_step
from mie.methods import Batch, create_method, method_params
from mie.methods.pmr import PMR, pmr_coefficients, prototype_entropy, prototype_logits, prototype_score
from mie.models import ClassifierHead, LateFusionModel, SharedHeadModel


def _model(mods=("a", "v"), feature_fusion="concat", hidden=(4,)):
    torch.manual_seed(0)
    enc = {m: nn.Linear(3 + i, 2) for i, m in enumerate(mods)}
    if feature_fusion == "concat":
        return SharedHeadModel(enc, ClassifierHead(2 * len(mods), 3, hidden=hidden), "concat")
    return LateFusionModel(enc, {m: ClassifierHead(2, 3, hidden=()) for m in mods})


def _data(seed=0, n=10):
    g = torch.Generator().manual_seed(seed)
    xs = {"a": torch.randn(n, 3, generator=g), "v": torch.randn(n, 4, generator=g)}
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 0] * (n // 10 + 1))[:n]
    return xs, y


def _ctx(model, batches, lr=0.1, epochs=3):
    return make_context(model.modalities, lr=lr, train_batches=batches, epochs_per_modality=epochs)


def _split(xs, y, at=4):
    return [Batch({m: x[:at] for m, x in xs.items()}, y[:at]), Batch({m: x[at:] for m, x in xs.items()}, y[at:])]


# ---- parity with the authors' released code ---------------------------------------------------
# A transcription, in plain torch, of the released training step and prototype update:
# fanyunfeng-bit/Modal-Imbalance-PMR main_Prototype_grad.py line 69 (EU_dist), lines 126-178 (the
# step: a, v, out = model(...); audio_sim = -EU_dist(a, audio_proto); the sign rule on
# ratio_a_p = score_a_p / score_v_p; loss = CE(out) + beta * CE(audio_sim) + lam * CE(visual_sim)),
# lines 383-441 (calculate_prototype: class means in eval mode, `if epoch <= 0` fresh, else
# (1 - momentum_coef) * new + momentum_coef * old) and lines 535-557 (prototypes before epoch 0 and
# after every epoch, called with the epoch just trained); models/fusion_modules.py line 16
# (ConcatFusion: one Linear on torch.cat((x, y), dim=1)). The code's prototypes average the first
# len(loader) // 10 batches of its shuffled loader (line 429); here every batch (proto_fraction=1),
# the code's own path for AVE (line 535, the whole validation loader). Plain SGD for both sides.
def _code_eu_dist(x1, x2):
    d_matrix = torch.zeros(x1.shape[0], x2.shape[0], dtype=x1.dtype)
    for i in range(x1.shape[0]):
        for j in range(x2.shape[0]):
            d = torch.sqrt(torch.dot((x1[i] - x2[j]), (x1[i] - x2[j])))
            d_matrix[i, j] = d
    return d_matrix


def _code_calculate_prototype(w, batches, epoch, momentum_coef, n_classes, a_proto=None, v_proto=None):
    audio_prototypes = torch.zeros(n_classes, 2, dtype=torch.float64)
    visual_prototypes = torch.zeros(n_classes, 2, dtype=torch.float64)
    count_class = [0 for _ in range(n_classes)]
    with torch.no_grad():
        for spec, image, label in batches:
            a = spec @ w["Wa"].T + w["ba"]
            v = image @ w["Wv"].T + w["bv"]
            for c, l in enumerate(label):
                count_class[l] += 1
                audio_prototypes[l, :] += a[c, :]
                visual_prototypes[l, :] += v[c, :]
    for c in range(audio_prototypes.shape[0]):
        audio_prototypes[c, :] /= count_class[c]
        visual_prototypes[c, :] /= count_class[c]
    if epoch <= 0:
        return audio_prototypes, visual_prototypes
    return ((1 - momentum_coef) * audio_prototypes + momentum_coef * a_proto,
            (1 - momentum_coef) * visual_prototypes + momentum_coef * v_proto)


def _code_step(w, spec, image, label, audio_proto, visual_proto, alpha, lr):
    criterion = nn.CrossEntropyLoss()
    softmax = nn.Softmax(dim=1)
    a = spec @ w["Wa"].T + w["ba"]
    v = image @ w["Wv"].T + w["bv"]
    out = torch.cat((a, v), dim=1) @ w["Wf"].T + w["bf"]
    audio_sim = -_code_eu_dist(a, audio_proto)
    visual_sim = -_code_eu_dist(v, visual_proto)
    score_a_p = sum([softmax(audio_sim)[i][label[i]] for i in range(audio_sim.size(0))])
    score_v_p = sum([softmax(visual_sim)[i][label[i]] for i in range(visual_sim.size(0))])
    ratio_a_p = score_a_p / score_v_p
    loss_proto_a = criterion(audio_sim, label)
    loss_proto_v = criterion(visual_sim, label)
    if ratio_a_p > 1:
        beta = 0  # audio coef
        lam = 1 * alpha  # visual coef
    elif ratio_a_p < 1:
        beta = 1 * alpha
        lam = 0
    else:
        beta = 0
        lam = 0
    loss = criterion(out, label) + beta * loss_proto_a + lam * loss_proto_v
    grads = torch.autograd.grad(loss, list(w.values()))
    with torch.no_grad():
        for p, g in zip(w.values(), grads):
            p -= lr * g
    return float(ratio_a_p.detach()), float(loss.detach())


def test_parity_with_the_released_training_step_and_prototype_update():
    torch.manual_seed(0)
    enc = {"a": nn.Linear(3, 2), "v": nn.Linear(4, 2)}
    model = SharedHeadModel(enc, ClassifierHead(4, 3, hidden=()), "concat").double()    # the authors' head
    g = torch.Generator().manual_seed(5)
    n = 12
    xs = {"a": torch.randn(n, 3, generator=g, dtype=torch.float64),
          "v": 1.5 * torch.randn(n, 4, generator=g, dtype=torch.float64)}
    y = torch.arange(n) % 3
    batches = [Batch({m: x[i:i + 6] for m, x in xs.items()}, y[i:i + 6]) for i in (0, 6)]
    lr, alpha, mom = 0.5, 1.0, 0.2

    method = create_method("pmr", proto_fraction=1.0)          # every other setting: the default
    assert (method.alpha, method.momentum, method.feature_fusion) == (alpha, mom, "concat")
    method.setup(model, _ctx(model, batches, lr=lr))

    lin = model.head.linears[0]
    w = {"Wa": enc["a"].weight, "ba": enc["a"].bias, "Wv": enc["v"].weight, "bv": enc["v"].bias,
         "Wf": lin.weight, "bf": lin.bias}
    w = {k: p.detach().clone().requires_grad_(True) for k, p in w.items()}
    code_batches = [(b.inputs["a"], b.inputs["v"], b.labels) for b in batches]

    ratios = []
    a_proto, v_proto = _code_calculate_prototype(w, code_batches, 0, mom, 3)          # line 539
    for epoch in range(3):
        method.start_epoch(epoch)
        torch.testing.assert_close(method.prototypes["a"], a_proto)
        torch.testing.assert_close(method.prototypes["v"], v_proto)
        for index, batch in enumerate(batches):
            ratio, loss = _code_step(w, *code_batches[index], a_proto, v_proto, alpha, lr)
            logs = method.training_step(batch, make_step(epoch, index, len(batches)))
            ratios.append(ratio)
            assert logs["pmr_rho"] == pytest.approx(ratio, rel=1e-9)
            assert logs["loss"] == pytest.approx(loss, rel=1e-9)
        method.end_epoch(epoch)
        a_proto, v_proto = _code_calculate_prototype(w, code_batches, epoch, mom, 3, a_proto, v_proto)   # line 557
    for name, p in (("Wa", enc["a"].weight), ("bv", enc["v"].bias), ("Wf", lin.weight), ("bf", lin.bias)):
        torch.testing.assert_close(p.detach(), w[name].detach(), msg=name)
    # the check has power: the slower modality changes across steps, and α·clip(ρ − 1, 0, 1) (the
    # former default) would weight every step's prototype loss differently from α
    assert min(ratios) < 1 < max(ratios)
    assert all(0 < abs(r - 1) < 1 and abs(1 / r - 1) < 1 for r in ratios)


# ---- prototypes -----------------------------------------------------------------------------
def test_prototypes_are_class_means_fresh_after_epoch_0_then_momentum():
    model = _model()
    xs, y = _data()
    method = PMR(momentum=0.2, proto_fraction=1.0)
    method.setup(model, _ctx(model, _split(xs, y)))
    method.start_epoch(0)

    def means():
        with torch.no_grad():
            feats = {m: model.encoders[m](xs[m]).numpy() for m in xs}
        return {m: np.stack([feats[m][y.numpy() == k].mean(axis=0) for k in range(3)]) for m in xs}

    for m, c in means().items():
        assert np.allclose(method.prototypes[m].numpy(), c, atol=1e-6)
    with torch.no_grad():                                  # the encoders change during an epoch …
        for p in model.parameters():
            p.add_(0.5)
    method.end_epoch(0)                                    # … after epoch 0: fresh means (code: epoch <= 0)
    for m, c in means().items():
        assert np.allclose(method.prototypes[m].numpy(), c, atol=1e-6)
    old = {m: method.prototypes[m].clone() for m in xs}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    method.end_epoch(1)                                    # after epoch 1: C ← 0.8 C_new + 0.2 C_old
    for m, c in means().items():
        assert np.allclose(method.prototypes[m].numpy(), 0.8 * c + 0.2 * old[m].numpy(), atol=1e-6)


def test_prototypes_average_a_random_fraction_of_the_training_set():
    model = _model()
    xs, y = _data(n=200)
    batches = [Batch({m: x[i:i + 50] for m, x in xs.items()}, y[i:i + 50]) for i in range(0, 200, 50)]
    method = create_method("pmr")
    assert method.proto_fraction == 0.1                    # the released code: a tenth of the loader
    method.setup(model, _ctx(model, batches))
    replay = torch.Generator()
    replay.set_state(method.generator.get_state())
    method.start_epoch(0)
    keep = torch.cat([torch.rand(len(b.labels), generator=replay) < 0.1 for b in batches])
    assert 5 < int(keep.sum()) < 40
    assert set(y[keep].tolist()) == {0, 1, 2}
    with torch.no_grad():
        feats = {m: model.encoders[m](xs[m][keep]) for m in xs}
    for m in xs:
        expected = torch.stack([feats[m][y[keep] == k].mean(0) for k in range(3)])
        torch.testing.assert_close(method.prototypes[m], expected)
        with torch.no_grad():
            whole = torch.stack([model.encoders[m](xs[m])[y == k].mean(0) for k in range(3)])
        assert not torch.allclose(method.prototypes[m], whole, atol=1e-4)
    before = {m: c.clone() for m, c in method.prototypes.items()}
    method.end_epoch(0)                                     # a new subset each time
    assert not torch.equal(method.prototypes["a"], before["a"])


def test_a_class_missing_from_the_subset_keeps_its_prototype_or_takes_its_full_mean():
    model = _model()
    xs, y = _data()
    method = PMR(proto_fraction=1e-9)                       # the subset is (almost surely) empty
    method.setup(model, _ctx(model, _split(xs, y)))
    method.start_epoch(0)                                   # no prototype yet: the full class means
    with torch.no_grad():
        for m in xs:
            full = torch.stack([model.encoders[m](xs[m])[y == k].mean(0) for k in range(3)])
            torch.testing.assert_close(method.prototypes[m], full)
    before = {m: c.clone() for m, c in method.prototypes.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    method.end_epoch(3)
    for m in xs:
        assert torch.equal(method.prototypes[m], before[m])

    full = PMR(proto_fraction=1.0)                           # an absent class keeps its prototype
    full.setup(model, _ctx(model, _split(xs, y)))
    full.start_epoch(0)
    kept = full.prototypes["a"][2].clone()
    keep = y != 2
    full.ctx.train_batches = lambda: iter([Batch({m: x[keep] for m, x in xs.items()}, y[keep])])
    full.end_epoch(1)
    assert torch.equal(full.prototypes["a"][2], kept)


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
def test_sign_rule_by_hand():
    # the released code (main_Prototype_grad.py line 169): a ahead (ρ = s_a/s_v > 1) → v gets α·PCE
    beta, _ = pmr_coefficients({"a": 3.0, "v": 2.0}, alpha=2.0)
    assert beta == {"a": 0.0, "v": 2.0}
    beta, _ = pmr_coefficients({"a": 1.0, "v": 1.01}, alpha=0.6)
    assert beta == {"a": 0.6, "v": 0.0}                    # however small the imbalance
    beta, _ = pmr_coefficients({"a": 2.0, "v": 2.0}, alpha=1.0)
    assert beta == {"a": 0.0, "v": 0.0}                    # a tie: neither


def test_clip_rule_by_hand():
    # BalanceBenchmark 01458a1 (opt-in): β_slower = α·clip(ρ_faster − 1, 0, 1), γ_faster = clip(ρ − 1, 0, 1)
    beta, gamma = pmr_coefficients({"a": 3.0, "v": 2.0}, alpha=1.0, rule="clip")
    assert beta == pytest.approx({"a": 0.0, "v": 0.5}) and gamma == pytest.approx({"a": 0.5, "v": 0.0})
    beta, gamma = pmr_coefficients({"a": 1.0, "v": 4.0}, alpha=0.6, rule="clip")   # ρ_v = 4, clipped to 1
    assert beta == pytest.approx({"a": 0.6, "v": 0.0}) and gamma == pytest.approx({"a": 0.0, "v": 1.0})
    beta, gamma = pmr_coefficients({"a": 2.0, "v": 2.0}, alpha=1.0, rule="clip")
    assert beta == {"a": 0.0, "v": 0.0} and gamma == {"a": 0.0, "v": 0.0}


# ---- a step: the loss and its gradient by hand -------------------------------------------
@pytest.mark.parametrize("name, feature_fusion", [("pmr", "late"), ("pmr", "concat"), ("pmr_per", "concat")])
def test_step_loss_and_update_by_hand(name, feature_fusion):
    model = _model(feature_fusion=feature_fusion)
    xs, y = _data()
    extra = {"mu": 0.5} if name == "pmr_per" else {}
    method = create_method(name, alpha=0.7, proto_fraction=1.0, feature_fusion=feature_fusion, **extra)
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
    if name == "pmr":
        beta = {"a": 0.7 * (rho_a < 1), "v": 0.7 * (rho_a > 1)}
        gamma = {"a": 0.0, "v": 0.0}
    else:
        beta = {"a": 0.7 * min(max(rho_v - 1, 0), 1), "v": 0.7 * min(max(rho_a - 1, 0), 1)}
        gamma = {"a": min(max(rho_a - 1, 0), 1), "v": min(max(rho_v - 1, 0), 1)}
        assert max(gamma.values()) > 0.01
    assert max(beta.values()) > 0.01                                     # the check has power
    ent = {m: -(p[m] * p[m].log()).sum(1).mean() for m in xs}
    if feature_fusion == "concat":
        z_fused = ref.head(torch.cat([z["a"], z["v"]], dim=1))
    else:
        z_fused = ref.heads["a"](z["a"]) + ref.heads["v"](z["v"])         # joint's late fusion: the sum
    loss = (F.cross_entropy(z_fused, y)
            + sum(beta[m] * F.cross_entropy(-dist[m], y) for m in xs)
            - 0.5 * sum(gamma[m] * ent[m] for m in xs))
    grads = torch.autograd.grad(loss, list(ref.parameters()))

    logs = method.training_step(Batch(xs, y), make_step(0, 0, 2))
    assert logs["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert logs["pmr_rho"] == pytest.approx(rho_a, rel=1e-5)
    assert any(k.startswith("pmr_gamma") for k in logs) == (name == "pmr_per")
    for q, g, p_ in zip(ref.parameters(), grads, model.parameters()):
        assert torch.allclose(p_, q - 0.1 * g, atol=1e-6)


def test_no_per_after_its_epochs_and_no_modulation_outside_window():
    model = _model()
    xs, y = _data()
    method = create_method("pmr_per", per_epochs=1, modulation_ends=2, proto_fraction=1.0)
    method.setup(model, _ctx(model, _split(xs, y)))
    method.start_epoch(0)
    assert any(k.startswith("pmr_gamma") for k in method.training_step(Batch(xs, y), make_step(0)))
    method.start_epoch(1)
    logs = method.training_step(Batch(xs, y), make_step(1))
    assert "pmr_beta_a" in logs and not any(k.startswith("pmr_gamma") for k in logs)
    method.start_epoch(2)
    assert set(method.training_step(Batch(xs, y), make_step(2))) == {"loss"}
    # a window that starts later: no modulation before it, PER counted from its start
    late = create_method("pmr_per", per_epochs=1, modulation_starts=1)
    late.setup(model, _ctx(model, _split(xs, y)))
    late.start_epoch(0)
    assert set(late.training_step(Batch(xs, y), make_step(0))) == {"loss"}
    late.start_epoch(1)
    assert any(k.startswith("pmr_gamma") for k in late.training_step(Batch(xs, y), make_step(1)))
    assert not any(k.startswith("pmr_gamma") for k in late.training_step(Batch(xs, y), make_step(2)))


def test_settings_defaults_and_the_default_prediction():
    with pytest.raises(mie.MieInputError, match=r"momentum must be a number in \[0, 1\)"):
        create_method("pmr", momentum=1.0)
    with pytest.raises(mie.MieInputError, match="alpha must be a number >= 0"):
        create_method("pmr", alpha=-1)
    with pytest.raises(mie.MieInputError, match="feature_fusion must be one of"):
        create_method("pmr", feature_fusion="average")
    with pytest.raises(mie.MieInputError, match="modulation_ends"):
        create_method("pmr", modulation_starts=3, modulation_ends=2)
    with pytest.raises(mie.MieInputError, match=r"proto_fraction must be a number in \(0, 1\]"):
        create_method("pmr", proto_fraction=0)
    with pytest.raises(mie.MieInputError, match="rule must be one of 'sign', 'clip'"):
        create_method("pmr", rule="tanh")
    # the released method: no PER parameters; they belong to the pmr_per variant, whose rule is fixed
    assert not {"mu", "per", "per_epochs"} & set(method_params("pmr"))
    with pytest.raises(mie.MieInputError, match="unknown parameter"):
        create_method("pmr", mu=0.1)
    assert {"mu", "per_epochs"} <= set(method_params("pmr_per")) and "rule" not in method_params("pmr_per")
    per = create_method("pmr_per")
    assert (per.rule, per.per, per.mu, per.per_epochs) == ("clip", True, 0.01, 10)

    method = create_method("pmr")
    assert (method.feature_fusion, method.fusion, method.rule, method.per) == ("concat", "model", "sign", False)
    assert (method.alpha, method.momentum, method.proto_fraction) == (1.0, 0.2, 0.1)
    model = _model()
    method.setup(model, _ctx(model, []))
    xs, _ = _data()
    model.eval()
    fused, per_mod = method.predict(xs)
    with torch.no_grad():
        feats = {m: model.encoders[m](xs[m]) for m in xs}
        z = model.head(torch.cat([feats["a"], feats["v"]], dim=1))
        za = model.head(torch.cat([feats["a"], torch.zeros_like(feats["v"])], dim=1))
    assert torch.allclose(fused, F.softmax(z, dim=-1), atol=1e-6)
    assert torch.allclose(per_mod["a"], F.softmax(za, dim=-1), atol=1e-6)


def test_three_modalities_raise():
    model = _model(("a", "v", "t"))
    with pytest.raises(mie.MieInputError, match="exactly 2 modalities"):
        PMR().setup(model, _ctx(model, []))


def test_notice_when_the_window_starts_after_the_budget():
    model = _model()
    method = create_method("pmr", modulation_starts=5)
    method.setup(model, _ctx(model, [], epochs=5))
    assert len(method.notices()) == 1 and "never acts" in method.notices()[0]
    method = create_method("pmr")
    method.setup(model, _ctx(model, [], epochs=5))
    assert method.notices() == []


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
    method.end_epoch(1)                           # … and the same next subset
    other.end_epoch(1)
    assert torch.equal(other.prototypes["v"], method.prototypes["v"])
