"""The MIE method (mie.methods.mie): stage cycle, SAM + GM step, T recomputation, logs."""
import copy
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_context, make_step
from mie.errors import MieInputError
from mie.methods import MIE, create_method
from mie.models import LateFusionModel, ModelSpec
from mie.optim import flat_modification_from_means, flat_modification_matrix

MODS = ["a", "b", "c"]
SHAPES = {"a": (5,), "b": (6,), "c": (7,)}
K = 3
LR = 0.5
RHO = 0.3
TAU = 0.4


def _model():
    torch.manual_seed(0)
    spec = ModelSpec(modalities=list(MODS), input_shapes=dict(SHAPES), encoders={m: "mlp" for m in MODS},
                     num_classes=K, dim=8, head_hidden=(6, 4))
    model = LateFusionModel.build(spec).double().train()
    for module in model.modules():            # deterministic forward passes (BatchNorm stays active)
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _batches(n=3, size=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        xs = {m: torch.randn(size, *SHAPES[m], generator=g, dtype=torch.float64) for m in MODS}
        y = torch.randint(0, K, (size,), generator=g)
        out.append((xs, y))
    return out


def _ctx(batches):
    return make_context(MODS, lr=LR, train_batches=batches, epochs_per_modality=2)


def _setup(batches=None, **kw):
    model = _model()
    method = MIE(tau=TAU, rho=RHO, **kw)
    method.setup(model, _ctx(batches if batches is not None else _batches()))
    return model, method


def _random_Ts(model, seed, symmetric=False):
    """Distinct non-identity matrices per modality, one per head Linear (in_features wide)."""
    g = torch.Generator().manual_seed(seed)
    Ts = {}
    for m in model.modalities:
        ts = []
        for lin in model.heads[m].linears:
            d = lin.in_features
            A = torch.randn(d, d, generator=g, dtype=torch.float64)
            if symmetric:
                Q, _ = torch.linalg.qr(A)
                eig = 0.5 + 0.5 * torch.rand(d, generator=g, dtype=torch.float64)
                ts.append((Q * eig) @ Q.T)
            else:
                ts.append(torch.eye(d, dtype=torch.float64) + 0.4 * A)
        Ts[m] = ts
    return Ts


def _reference(model, j, T_k, x, y, sam):
    """Expected parameter deltas of θ_j (in ``model.modality_parameters(j)`` order) for one step,
    computed with autograd on a copy: g (pass 1), g' at θ + ρ g/‖g‖ (joint norm), ∇W·T^(k)."""
    ref = copy.deepcopy(model)
    params = ref.modality_parameters(j)
    loss = F.cross_entropy(ref.forward_modality(j, x), y)
    g = torch.autograd.grad(loss, params)
    bn_after_one_pass = [b.clone() for b in ref.encoders[j].buffers()]
    if sam:
        norm = torch.sqrt(sum((t ** 2).sum() for t in g))
        with torch.no_grad():
            for p, t in zip(params, g):
                p.add_(RHO * t / norm)
        g = torch.autograd.grad(F.cross_entropy(ref.forward_modality(j, x), y), params)
    position = {id(l.weight): i for i, l in enumerate(ref.heads[j].linears)}
    deltas, changes = [], []
    for p, t in zip(params, g):
        if id(p) in position and T_k is not None:
            new = t @ T_k[position[id(p)]]
            changes.append(((new - t).norm() / t.norm()).item())
            t = new
        deltas.append(-LR * t)
    return deltas, changes, loss.item(), bn_after_one_pass


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_step(model, method, epoch, j, k, sam, batch):
    xs, y = batch
    T_k = method.T[k]
    before = _snapshot(model)
    old_j = [p.detach().clone() for p in model.modality_parameters(j)]
    deltas, changes, loss, bn_ref = _reference(model, j, T_k, xs[j], y, sam)
    wrong_T = _reference(model, j, method.T[j], xs[j], y, sam)[0]           # T^(j) instead of T^(k)
    no_gm = _reference(model, j, None, xs[j], y, sam)[0]

    logs = method.training_step((xs, y), make_step(epoch))
    assert set(logs) == {f"loss_{j}"}
    assert logs[f"loss_{j}"] == pytest.approx(loss, rel=1e-10)

    got = [p.detach() - o for p, o in zip(model.modality_parameters(j), old_j)]
    for g_, e in zip(got, deltas):
        torch.testing.assert_close(g_, e, rtol=1e-5, atol=1e-10)
    # the check can tell T^(k) from T^(j) and from no modification at all
    for alt in (wrong_T, no_gm):
        assert max((a - e).abs().max().item() for a, e in zip(alt, deltas)) > 1e-4

    # head weights moved by −η ∇W·T, biases by −η ∇b (checked above); every other modality untouched
    after = _snapshot(model)
    for name, value in after.items():
        owner = name.split(".")[1]
        if owner != j:
            assert torch.equal(value, before[name]), name
    # BatchNorm statistics of j's encoder: exactly one train-mode pass (pass 2 of SAM leaves none)
    for b, r in zip(model.encoders[j].buffers(), bn_ref):
        assert torch.equal(b, r)
    return changes


# ---- (1) the cycle --------------------------------------------------------------------------

def test_stage_order_three_modalities():
    _, method = _setup(epochs_per_stage=2)
    assert method.num_epochs(4) == 12
    got = [method.stage(e) for e in range(12)]
    expected_j = ["a", "a", "b", "b", "c", "c"] * 2
    expected_k = ["c", "c", "a", "a", "b", "b"] * 2
    assert [s[0] for s in got] == expected_j
    assert [s[1] for s in got] == expected_k
    assert [s[2] for s in got] == [False, True] * 6


def test_stage_custom_order():
    _, method = _setup(epochs_per_stage=1, order=["c", "a", "b"])
    assert method.num_epochs(2) == 6
    got = [method.stage(e)[:2] for e in range(6)]
    assert got == [("c", "b"), ("a", "c"), ("b", "a")] * 2
    assert all(method.stage(e)[2] for e in range(6))
    with pytest.raises(MieInputError):
        _setup(order=["a", "b"])
    with pytest.raises(MieInputError):
        _setup(order=["a", "b", "b"])


def test_num_epochs():
    _, stage1 = _setup(epochs_per_stage=1)
    _, stage2 = _setup(epochs_per_stage=2)
    _, iteration = _setup(alternation="iteration")
    assert stage1.num_epochs(5) == 15
    assert stage2.num_epochs(4) == 12
    assert stage2.num_epochs(6) == 18
    assert iteration.num_epochs(5) == 5
    # whatever E, every modality gets exactly E epochs: the last stage is cut short
    for E in (1, 3, 5):
        counts = Counter(stage2.stage(e)[0] for e in range(stage2.num_epochs(E)))
        assert counts == {m: E for m in MODS}
    assert [stage2.stage(e)[0] for e in range(stage2.num_epochs(3))] == list("aabbccabc")
    assert [stage2.stage(e)[2] for e in range(9)] == [False, True] * 3 + [True] * 3


def test_uneven_stages_give_every_modality_exactly_the_budget():
    """{a: 1, b: 3, c: 2} with E = 4: b's second stage is cut to 1 epoch, a runs alone at the end."""
    _, method = _setup(epochs_per_stage={"a": 1, "b": 3, "c": 2})
    n = method.num_epochs(4)
    plan = [method.stage(e)[0] for e in range(n)]
    assert plan == list("abbbcc" + "abcc" + "a" + "a")
    assert Counter(plan) == {"a": 4, "b": 4, "c": 4}
    assert [method.trained_modalities(e) for e in range(n)] == [[m] for m in plan]
    # the step schedule reads each modality's own count of trained epochs (or the stage's, on request)
    assert [method.schedule_epoch(e) for e in range(n)] == [0, 0, 1, 2, 0, 1, 1, 3, 2, 3, 2, 3]
    _, restart = _setup(epochs_per_stage={"a": 1, "b": 3, "c": 2}, schedule="stage")
    restart.num_epochs(4)
    assert [restart.schedule_epoch(e) for e in range(n)] == [0, 0, 1, 2, 0, 1, 0, 0, 0, 1, 0, 0]


def test_bad_hyper_parameters():
    for kw in ({"alternation": "epoch"}, {"tau": 0.0}, {"rho": -1.0}, {"epochs_per_stage": 0}):
        with pytest.raises(MieInputError):
            MIE(**kw)
    assert create_method("mie_gm_only").sam is False
    assert create_method("mie_sam_only").gm is False


# ---- (2) one step ---------------------------------------------------------------------------

@pytest.mark.parametrize("epoch,j,k", [(0, "a", "c"), (1, "b", "a"), (2, "c", "b"), (3, "a", "c")])
def test_gm_step_uses_previous_modality_T(epoch, j, k):
    model, method = _setup(sam=False, gm=True)
    method.use_matrices(_random_Ts(model, seed=10 + epoch))
    assert method.stage(epoch)[:2] == (j, k)
    method.start_epoch(epoch)
    batches = _batches()
    _check_step(model, method, epoch, j, k, sam=False, batch=batches[0])
    _check_step(model, method, epoch, j, k, sam=False, batch=batches[1])   # from the updated θ_j


def test_gm_step_custom_order():
    model, method = _setup(sam=False, gm=True, order=["b", "c", "a"])
    method.use_matrices(_random_Ts(model, seed=3))
    method.start_epoch(0)
    _check_step(model, method, 0, "b", "a", sam=False, batch=_batches()[0])


@pytest.mark.parametrize("epoch,j,k", [(0, "a", "c"), (1, "b", "a")])
def test_sam_then_gm_step(epoch, j, k):
    model, method = _setup(sam=True, gm=True)
    method.use_matrices(_random_Ts(model, seed=20 + epoch))
    method.start_epoch(epoch)
    batches = _batches()
    xs, y = batches[0]
    plain = _reference(model, j, method.T[k], xs[j], y, sam=False)[0]
    expected = _reference(model, j, method.T[k], xs[j], y, sam=True)[0]
    # the SAM step differs measurably from a plain GM step on these numbers
    assert max((a - e).abs().max().item() for a, e in zip(plain, expected)) > 1e-4
    _check_step(model, method, epoch, j, k, sam=True, batch=batches[0])
    _check_step(model, method, epoch, j, k, sam=True, batch=batches[1])


def test_sam_only_step_leaves_gradient_unmodified():
    model, method = _setup(sam=True, gm=False)
    Ts = _random_Ts(model, seed=5)
    method.use_matrices(Ts)                              # must be ignored when gm=False
    method.start_epoch(0)
    xs, y = _batches()[0]
    old = [p.detach().clone() for p in model.modality_parameters("a")]
    expected = _reference(model, "a", None, xs["a"], y, sam=True)[0]
    method.training_step((xs, y), make_step(0))
    for p, o, e in zip(model.modality_parameters("a"), old, expected):
        torch.testing.assert_close(p.detach() - o, e, rtol=1e-5, atol=1e-10)


def test_iteration_alternation_steps_every_modality():
    model, method = _setup(sam=False, gm=True, alternation="iteration")
    method.use_matrices(_random_Ts(model, seed=7))
    method.start_epoch(0)
    xs, y = _batches()[0]
    prev = {"a": "c", "b": "a", "c": "b"}
    old = {m: [p.detach().clone() for p in model.modality_parameters(m)] for m in MODS}
    expected = {m: _reference(model, m, method.T[prev[m]], xs[m], y, sam=False)[0] for m in MODS}
    logs = method.training_step((xs, y), make_step(0))
    assert set(logs) == {"loss_a", "loss_b", "loss_c"}
    for m in MODS:
        for p, o, e in zip(model.modality_parameters(m), old[m], expected[m]):
            torch.testing.assert_close(p.detach() - o, e, rtol=1e-5, atol=1e-10)


# ---- (3) recompute ----------------------------------------------------------------------------

def _hand_T(model, m, batches, train=False):
    """T for each head Linear of m from an eval-mode pass: Ȳ = Σ_t z̄_t z̄_tᵀ of the Linear inputs."""
    ref = copy.deepcopy(model).train(train)
    lin0, lin1, lin2 = ref.heads[m].linears
    covs = [torch.zeros(l.in_features, l.in_features, dtype=torch.float64) for l in (lin0, lin1, lin2)]
    with torch.no_grad():
        for xs, _ in batches:
            z0 = ref.encoders[m](xs[m])
            z1 = torch.relu(lin0(z0))           # the head: FC → ReLU → FC → FC
            z2 = lin1(z1)
            for c, z in zip(covs, (z0, z1, z2)):
                zb = z.mean(dim=0)
                c += torch.outer(zb, zb)
    return [flat_modification_matrix(c, TAU) for c in covs]


def test_recompute_after_stage():
    batches = _batches(n=4, size=5, seed=11)
    model, method = _setup(batches=batches, sam=True, gm=True, epochs_per_stage=2)
    initial = _random_Ts(model, seed=8, symmetric=True)
    method.T = {m: [t.clone() for t in ts] for m, ts in initial.items()}

    method.start_epoch(0)
    for xs, y in batches:
        method.training_step((xs, y), make_step(0))
    method.end_epoch(0)                     # not the end of the stage: nothing recomputed
    for m in MODS:
        for t, t0 in zip(method.T[m], initial[m]):
            assert torch.equal(t, t0)

    method.start_epoch(1)
    for xs, y in batches:
        method.training_step((xs, y), make_step(1))
    method.end_epoch(1)                     # end of a's stage: T^(a) recomputed, others untouched
    assert model.training
    expected = _hand_T(model, "a", batches)
    assert [tuple(t.shape) for t in method.T["a"]] == [(8, 8), (6, 6), (4, 4)]
    for t, e in zip(method.T["a"], expected):
        assert t.dtype == torch.float64
        torch.testing.assert_close(t, e, rtol=0, atol=1e-9)
        assert (t - torch.eye(t.shape[0], dtype=torch.float64)).abs().max() > 1e-3
    for m in ("b", "c"):
        for t, t0 in zip(method.T[m], initial[m]):
            assert torch.equal(t, t0)

    # the next stage (b, with k = a) uses the freshly computed T^(a), not a stale copy
    method.start_epoch(2)
    _check_step(model, method, 2, "b", "a", sam=True, batch=batches[0])


def test_recompute_uses_eval_mode():
    """Train-mode BatchNorm would give other features: the eval pass is what T must come from."""
    batches = _batches(n=3, size=4, seed=12)
    model, method = _setup(batches=batches, sam=False, gm=True)
    # move the running statistics away from the batch statistics
    with torch.no_grad():
        for mod in model.encoders["c"].modules():
            if isinstance(mod, nn.BatchNorm1d):
                mod.running_mean.add_(0.7)
                mod.running_var.mul_(3.0)
    bn_before = [b.clone() for b in model.encoders["c"].buffers()]
    method.recompute(["c"])
    for t, e, w in zip(method.T["c"], _hand_T(model, "c", batches), _hand_T(model, "c", batches, train=True)):
        torch.testing.assert_close(t, e, rtol=0, atol=1e-9)
        assert (w - e).abs().max() > 1e-4
    for b, b0 in zip(model.encoders["c"].buffers(), bn_before):
        assert torch.equal(b, b0)
    assert model.training


# ---- (4) logs ---------------------------------------------------------------------------------

def test_end_epoch_logs():
    batches = _batches(n=3, size=6, seed=13)
    model, method = _setup(batches=batches, sam=False, gm=True, epochs_per_stage=2)
    method.use_matrices(_random_Ts(model, seed=9, symmetric=True))
    method.start_epoch(0)
    changes = []
    for xs, y in batches:
        changes.append(_reference(model, "a", method.T["c"], xs["a"], y, sam=False)[1])
        method.training_step((xs, y), make_step(0))
    logs = method.end_epoch(0)

    assert logs["active"] == "a"
    assert logs["gm_source"] == "c"
    Tc = [t.numpy() for t in method.T["c"]]
    assert logs["gm_T_mean_eig"] == pytest.approx(np.mean([np.linalg.eigvalsh(t).mean() for t in Tc]), abs=1e-10)
    assert logs["gm_T_dist_identity"] == pytest.approx(
        np.mean([np.linalg.norm(t - np.eye(t.shape[0])) for t in Tc]), abs=1e-10)
    expected_change = np.mean([np.mean(c) for c in changes])
    assert logs["gm_grad_rel_change"] == pytest.approx(expected_change, rel=1e-5)
    # T^(a) (the trained modality's own matrix) would give other numbers
    Ta = [t.numpy() for t in method.T["a"]]
    assert abs(np.mean([np.linalg.eigvalsh(t).mean() for t in Ta]) - logs["gm_T_mean_eig"]) > 1e-4


def test_end_epoch_without_gm_has_no_gm_logs():
    model, method = _setup(sam=True, gm=False)
    method.start_epoch(0)
    xs, y = _batches()[0]
    method.training_step((xs, y), make_step(0))
    logs = method.end_epoch(0)
    assert logs == {"active": "a"}


def test_recomputed_T_used_after_a_full_cycle():
    """T^(a) is used (k = a) in b's stage, recomputed at the end of a's next stage, and b's next
    stage must then use the new T^(a), not the one it used a cycle before."""
    batches = _batches(n=2, size=5, seed=14)
    model, method = _setup(batches=batches, sam=False, gm=True, epochs_per_stage=1)
    method.use_matrices(_random_Ts(model, seed=15, symmetric=True))
    for epoch in range(4):                   # stages a, b, c, a
        method.start_epoch(epoch)
        for xs, y in batches:
            method.training_step((xs, y), make_step(epoch))
        method.end_epoch(epoch)
    for t, e in zip(method.T["a"], _hand_T(model, "a", batches)):
        torch.testing.assert_close(t, e, rtol=0, atol=1e-9)
    method.start_epoch(4)                    # stage b again, k = a
    _check_step(model, method, 4, "b", "a", sam=False, batch=batches[0])


def _run_epochs(method, batches, epochs):
    for epoch in epochs:
        method.start_epoch(epoch)
        for xs, y in batches:
            method.training_step((xs, y), make_step(epoch))
        method.end_epoch(epoch)


@pytest.mark.parametrize("alternation, kept, refreshed", [("stage", 3, 6), ("iteration", 1, 2)])
def test_gm_refresh_recomputes_T_after_every_rth_stage_only(alternation, kept, refreshed):
    """gm_refresh=2 with stages a, b, c of one epoch: T^(a) is computed after a's 1st stage (loop epoch
    0), kept after its 2nd (epoch 3) though a's weights moved, and recomputed after its 3rd (epoch 6)
    from the model as it is then; under per-batch alternation, after epochs 0 and 2 but not 1."""
    batches = _batches(n=2, size=5, seed=18)
    model = _model()
    method = MIE(tau=TAU, rho=RHO, sam=False, gm=True, gm_refresh=2, alternation=alternation)
    method.setup(model, make_context(MODS, lr=LR, train_batches=batches, epochs_per_modality=4))
    _run_epochs(method, batches, [0])
    first = [t.clone() for t in method.T["a"]]
    for t, e in zip(first, _hand_T(model, "a", batches)):
        torch.testing.assert_close(t, e, rtol=0, atol=1e-9)
    _run_epochs(method, batches, range(1, kept + 1))
    for t, e in zip(method.T["a"], first):
        assert torch.equal(t, e)
    assert max((t - e).abs().max() for t, e in zip(_hand_T(model, "a", batches), first)) > 1e-6
    _run_epochs(method, batches, range(kept + 1, refreshed + 1))
    for t, e in zip(method.T["a"], _hand_T(model, "a", batches)):
        torch.testing.assert_close(t, e, rtol=0, atol=1e-9)


@pytest.mark.parametrize("alternation, epochs", [("stage", 6), ("iteration", 2)])
@pytest.mark.parametrize("diagnostics", [False, True])
def test_the_run_s_last_T_is_computed_only_for_the_diagnostics(alternation, epochs, diagnostics):
    """No stage follows the run's last one, so the covariance pass after it is skipped: 2 epochs per
    modality of a, b, c make 6 one-epoch stages, and T is computed after the first 5 (every epoch but
    the last under per-batch alternation); the diagnostics, which record every stage's spectra, keep it."""
    batches = _batches(n=2, size=5, seed=21)
    method = MIE(tau=TAU, rho=RHO, sam=False, gm=True, alternation=alternation, diagnostics=diagnostics)
    method.setup(_model(), make_context(MODS, lr=LR, train_batches=batches, epochs_per_modality=2))
    calls = []
    recompute = method.recompute
    method.recompute = lambda modalities, epoch=None: (calls.append(epoch), recompute(modalities, epoch))
    _run_epochs(method, batches, range(method.num_epochs(2)))
    computed = list(range(epochs if alternation == "stage" else 2))
    assert calls == (computed if diagnostics else computed[:-1])


def test_gm_batches_shuffled_takes_the_covariance_over_reshuffled_batches():
    """gm_batches="shuffled" asks the loop for the training data in the permutation keyed by the loop
    epoch after which T is recomputed, and Ȳ sums the batch means of those batches (batch means, not
    their order, make Ȳ: the batches are re-cut from shuffled samples here)."""
    batches = _batches(n=3, size=4, seed=19)
    xs_all = {m: torch.cat([xs[m] for xs, _ in batches]) for m in MODS}
    asked = []

    def train_batches(shuffle=None):
        asked.append(shuffle)
        order = torch.arange(12) if shuffle is None else torch.randperm(12, generator=torch.Generator().manual_seed(shuffle))
        return iter([({m: xs_all[m][order[i:i + 4]] for m in MODS}, None) for i in range(0, 12, 4)])
    model = _model()
    method = MIE(tau=TAU, rho=RHO, sam=False, gm=True, gm_batches="shuffled")
    ctx = make_context(MODS, lr=LR, train_batches=batches)
    ctx.train_batches = train_batches
    method.setup(model, ctx)
    method.recompute(["b"], epoch=5)
    assert asked == [5]
    shuffled = list(train_batches(5))
    for t, e, plain in zip(method.T["b"], _hand_T(model, "b", shuffled), _hand_T(model, "b", batches)):
        torch.testing.assert_close(t, e, rtol=0, atol=1e-9)
        assert (e - plain).abs().max() > 1e-4


def test_gm_lowrank_steps_as_the_dense_T():
    """gm_lowrank: the hook gets T^(k) as I + U diag(σ − 1) Uᵀ from k's batch means (2 batches, so
    rank 2 in 8, 6 and 4 dimensions; as the d × d matrix where 2·2 ≥ d), and the SAM + GM step equals
    the dense one."""
    batches = _batches(n=2, size=5, seed=20)
    steps = {}
    for low in (False, True):
        model, method = _setup(batches=batches, sam=True, gm=True, gm_lowrank=low)
        method.recompute(["c"])
        kinds = [type(t).__name__ for t in method.gm_hooks["a"].matrices]
        assert kinds == (["LowRankModification"] * 2 + ["Tensor"] if low else ["Tensor"] * 3)
        before = [p.detach().clone() for p in model.modality_parameters("a")]
        method.start_epoch(0)
        method.training_step(batches[0], make_step(0))
        steps[low] = [p.detach() - b for p, b in zip(model.modality_parameters("a"), before)]
    assert max(float(d.abs().max()) for d in steps[False]) > 1e-3
    for dense, low in zip(steps[False], steps[True]):
        torch.testing.assert_close(low, dense, rtol=0, atol=1e-12)


def test_before_its_source_is_trained_a_modality_s_gradient_is_not_multiplied_by_I():
    """T^(k) = I until k's first stage: the hook holds a rank-0 T, no product is computed, and the step
    is bit for bit that of MIE without GM; the logged change is 0 over the paired layers."""
    batches = _batches(n=2, size=5, seed=24)
    steps = {}
    for gm in (True, False):
        model, method = _setup(batches=batches, sam=True, gm=gm)
        if gm:
            assert [t.rank for t in method.gm_hooks["a"].matrices] == [0, 0, 0]
        before = [p.detach().clone() for p in model.modality_parameters("a")]
        method.start_epoch(0)
        method.training_step(batches[0], make_step(0))
        steps[gm] = [p.detach() - b for p, b in zip(model.modality_parameters("a"), before)]
        if gm:
            logs = method.end_epoch(0)
            assert logs["gm_layers"] == 3 and logs["gm_grad_rel_change"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(steps[True], steps[False]))
    _, method = _setup(batches=batches, sam=False, gm=True)
    method.recompute(["c"])
    assert all(isinstance(t, torch.Tensor) for t in method.gm_hooks["a"].matrices)   # a's source trained: dense T


def test_gm_tolerance_leaves_out_the_directions_T_barely_damps():
    """gm_tolerance: each hook matrix keeps exactly the eigen-directions of numpy's Ȳ = Σ z̄ z̄ᵀ with
    1 − σ > tol (σ = exp(−τ λ/λ_max), Ȳ of rank n = 3 < d), is within tol of the exact T in spectral
    norm, and needs gm_lowrank."""
    batches = _batches(n=3, size=5, seed=21)
    tol = 0.02
    model, method = _setup(batches=batches, sam=False, gm=True, gm_lowrank=True, gm_tolerance=tol)
    method.recompute(["c"])
    for layer, t, Z in zip(method.layers["a"], method.gm_hooks["a"].matrices, method.means["c"]):
        lam = np.clip(np.linalg.eigvalsh(Z.numpy() @ Z.numpy().T), 0, None)
        sigma = np.exp(-TAU * lam / lam.max())
        dense = t.dense() if hasattr(t, "dense") else t
        exact = flat_modification_from_means(Z, TAU)
        assert np.linalg.norm((dense.double() - exact).numpy(), 2) <= tol + 1e-6
        if hasattr(t, "rank"):
            assert t.rank == int((1 - sigma > tol).sum()) < 3
    assert any(hasattr(t, "rank") for t in method.gm_hooks["a"].matrices)
    with pytest.raises(MieInputError, match="gm_tolerance truncates the low-rank form of T; it needs"):
        create_method("mie", gm_tolerance=0.01)


def test_matrices_given_by_hand_are_applied_as_given_under_gm_lowrank():
    """use_matrices after a covariance pass: the hooks get the given matrices, not a low-rank T of the
    earlier batch means."""
    model, method = _setup(batches=_batches(n=2, size=5, seed=22), sam=False, gm=True, gm_lowrank=True)
    method.recompute(["c"])
    assert any(type(t).__name__ == "LowRankModification" for t in method.gm_hooks["a"].matrices)
    Ts = _random_Ts(model, seed=23)
    method.use_matrices(Ts)
    for t, given in zip(method.gm_hooks["a"].matrices, Ts["c"]):
        assert torch.equal(t, given.to(t.dtype))


def test_iteration_alternation_recomputes_every_T():
    batches = _batches(n=2, size=5, seed=16)
    model, method = _setup(batches=batches, sam=True, gm=True, alternation="iteration")
    method.use_matrices(_random_Ts(model, seed=17, symmetric=True))
    prev = {"a": "c", "b": "a", "c": "b"}
    method.start_epoch(0)
    for xs, y in batches:
        method.training_step((xs, y), make_step(0))
    logs = method.end_epoch(0)
    assert logs["gm_source"] == "c"          # the matrix used by the first modality of the cycle
    for m in MODS:
        for t, e in zip(method.T[m], _hand_T(model, m, batches)):
            torch.testing.assert_close(t, e, rtol=0, atol=1e-9)
    # the next epoch's steps use the new matrices
    method.start_epoch(1)
    xs, y = batches[0]
    old = {m: [p.detach().clone() for p in model.modality_parameters(m)] for m in MODS}
    expected = {m: _reference(model, m, method.T[prev[m]], xs[m], y, sam=True)[0] for m in MODS}
    method.training_step((xs, y), make_step(1))
    for m in MODS:
        for p, o, e in zip(model.modality_parameters(m), old[m], expected[m]):
            torch.testing.assert_close(p.detach() - o, e, rtol=1e-5, atol=1e-10)


def test_released_objective_matches_hand_computation():
    """mie_released: (1 − w)·[λ CE(o, y) + (1 − λ) CE(o, y[π])] + w·CE(o, y) on the mixed input."""
    # njustkmg/IJCAI25-IGM train_CREMA.py line 75: loss_ori = mixup_criterion(criterion, o, y_a, y_b, lam)
    # njustkmg/IJCAI25-IGM utils/loss.py line 98: lam · criterion(pred, y_a) + (1 − lam) · criterion(pred, y_b)
    # njustkmg/IJCAI25-IGM train_CREMA.py line 122: loss_tmp = CE(cls(fea), y), fea of the mixed input
    # njustkmg/IJCAI25-IGM train_CREMA.py line 127: (1 − flat_ratio) · loss_ori + flat_ratio · loss_tmp
    model = _model()
    method = create_method("mie_released", mixup_alpha=0.7, flat_weight=0.3)
    method.model = model
    (xs, y), = _batches(n=1)
    torch.manual_seed(5)
    loss = method._objective("a", xs, y)("a")
    torch.manual_seed(5)
    lam = torch.distributions.Beta(0.7, 0.7).sample().item()
    perm = torch.randperm(len(y))
    o = model.forward_modality("a", lam * xs["a"] + (1 - lam) * xs["a"][perm])
    ce = lambda target: -torch.log_softmax(o, dim=1)[torch.arange(len(y)), target].mean()
    expected = 0.7 * (lam * ce(y) + (1 - lam) * ce(y[perm])) + 0.3 * ce(y)
    assert 0 < lam < 1 and torch.allclose(loss, expected)
    assert create_method("mie").objective == "paper"          # the paper's objective is the default
    with pytest.raises(MieInputError, match="unknown config key 'method.mixup_alpha' for method 'mie'"):
        from mie.config import build_config
        build_config(None, ["method.mixup_alpha=0.5"])


def test_released_objective_leaves_token_ids_unmixed():
    method = create_method("mie_released")
    seen = []
    method.model = type("M", (), {"forward_modality": lambda self, j, x: seen.append(x) or torch.zeros(len(x), 2,
                                                                                                  requires_grad=True)})()
    ids = torch.randint(0, 100, (4, 2, 6))
    method._objective("text", {"text": ids}, torch.tensor([0, 1, 0, 1]))("text")
    assert torch.equal(seen[0], ids)


# ---- (5) GM beyond the head -------------------------------------------------------------------

def _image_model():
    torch.manual_seed(0)
    spec = ModelSpec(["img", "spec"], {"img": (3, 8, 8), "spec": (1, 8, 8)},
                     {"img": "resnet_small", "spec": "resnet_small"}, K, dim=16, head_hidden=(8,))
    return LateFusionModel.build(spec)


def test_gm_scope_takes_layers_from_the_output_back_to_a_parameter_share():
    from mie.methods.mie import gm_layers
    model = _image_model()
    head = list(model.heads["img"].linears)
    assert gm_layers(model, "img", 0.0) == head
    convs = [l for l in model.encoders["img"].modules() if isinstance(l, (nn.Conv2d, nn.Linear))]
    total = sum(p.numel() for p in model.modality_parameters("img"))
    for share in (0.05, 0.3, 0.6, 1.0):
        chosen = gm_layers(model, "img", share)
        # by hand: add encoder layers from the last one while the chosen weights hold < share of all
        expected, held = list(head), sum(l.weight.numel() for l in head)
        for layer in reversed(convs):
            if held >= share * total:
                break
            expected.insert(0, layer)
            held += layer.weight.numel()
        assert chosen == expected
    assert len(gm_layers(model, "img", 1.0)) == len(convs) + len(head)


def test_gm_scope_pairs_layers_from_the_output_and_skips_other_sizes():
    model = _image_model()
    method = create_method("mie", gm_scope=1.0, sam=False)
    method.setup(model, make_context(["img", "spec"]))
    pairs = [(l, t) for l, t in zip(method.layers["spec"], method.gm_hooks["spec"].matrices) if t is not None]
    layers = method.layers["spec"]
    assert len(pairs) == len(layers) - 1                     # the 1-channel stem differs from the 3-channel one
    assert all(t.shape[0] == method_input for (l, t), method_input in
               zip(pairs, [__import__("mie.optim", fromlist=["input_dim"]).input_dim(l) for l, _ in pairs]))
    assert layers[0] not in [l for l, _ in pairs]


def test_mie_trains_with_gm_on_the_encoders():
    import mie
    rng = np.random.default_rng(0)
    y = np.arange(60) % K
    x = {"img": rng.normal(size=(60, 3, 8, 8)).astype(np.float32) + y[:, None, None, None],
         "spec": rng.normal(size=(60, 1, 8, 8)).astype(np.float32)}
    rows = []
    result = mie.fit(mie.MultimodalArrays(x, y), "mie", config={"train": {"epochs": 2, "batch_size": 16},
                     "model": {"dim": 16, "head_hidden": [8]}}, gm_scope=0.5, progress=False,
                     callbacks=[lambda epoch, row: rows.append(row)])
    assert result["method_params"]["gm_scope"] == 0.5 and np.isfinite(result["test"]["accuracy"])
    assert rows[1]["gm_T_dist_identity"] > 0 and rows[1]["gm_grad_rel_change"] > 0   # spec's layers shaped by T^(img)
    assert rows[1]["gm_layers"] > 2                                                   # the head's 2 and encoder layers
    with pytest.raises(MieInputError, match=r"gm_scope must be a number in \[0, 1\], got 1.5"):
        create_method("mie", gm_scope=1.5)


def test_checkpoint_keeps_batch_means_and_rebuilds_T():
    """A wide conv layer's T is d × d; the checkpoint holds the d × n batch means it came from."""
    model = _image_model()
    method = create_method("mie", gm_scope=1.0, sam=False)
    batches = [({"img": torch.randn(4, 3, 8, 8), "spec": torch.randn(4, 1, 8, 8)}, torch.tensor([0, 1, 2, 0]))
               for _ in range(3)]
    ctx = make_context(["img", "spec"], train_batches=batches)
    method.setup(model, ctx)
    method.recompute(["img"])
    state = method.state_dict()
    assert state["means"]["spec"] is None
    widest = max(state["means"]["img"], key=lambda z: z.shape[0])
    assert widest.shape[1] == 3 and widest.shape[0] > 3                 # d × n, n = 3 batches
    again = create_method("mie", gm_scope=1.0, sam=False)
    again.setup(_image_model(), ctx)
    again.load_state_dict(state)
    for t, u in zip(method.T["img"], again.T["img"]):
        assert torch.equal(t, u)
    assert all(torch.equal(t, torch.eye(t.shape[0], dtype=torch.float64)) for t in again.T["spec"])


# ---- ensemble_weight: j's stage on (1 − λ) CE(z_j) + λ CE(z_j + Σ_{k≠j} z_k) ------------------

@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_ensemble_weight_step_matches_hand_gradient(lam):
    """One plain step (no SAM, no GM) against autograd on a copy: the others' logits come from their
    eval-mode forward, carry no gradient, and nothing of theirs changes (BatchNorm buffers included)."""
    model, method = _setup(sam=False, gm=False, ensemble_weight=lam)
    xs, y = _batches(1)[0]
    j = method.stage(0)[0]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        others = []
        for k in MODS:
            if k != j:
                ref.encoders[k].eval(), ref.heads[k].eval()
                others.append(ref.forward_modality(k, xs[k]))
    z = ref.forward_modality(j, xs[j])
    loss = (1 - lam) * F.cross_entropy(z, y) + lam * F.cross_entropy(z + sum(others), y)
    grads = torch.autograd.grad(loss, ref.modality_parameters(j))
    before = _snapshot(model)
    old_j = [p.detach().clone() for p in model.modality_parameters(j)]
    logs = method.training_step((xs, y), make_step(0))
    assert logs[f"loss_{j}"] == pytest.approx(loss.item(), rel=1e-10)
    for p, o, g in zip(model.modality_parameters(j), old_j, grads):
        torch.testing.assert_close(p.detach() - o, -LR * g, rtol=1e-6, atol=1e-12)
    for name, value in _snapshot(model).items():
        if name.split(".")[1] != j:
            assert torch.equal(value, before[name]), name
    assert all(m.training for m in model.modules())          # every module's mode given back


def test_ensemble_weight_refused_with_released_objective():
    with pytest.raises(MieInputError, match="ensemble_weight"):
        MIE(ensemble_weight=0.5, objective="released")
    assert "ensemble_weight" not in __import__("mie").methods.method_params("mie_released")
