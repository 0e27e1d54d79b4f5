"""MMPareto (mie.methods.mmpareto) against a transcription of the authors' released training step
(GeWu-Lab/MMPareto_ICML2024 @a339db3, ``code/MMPareto.py`` = MP, ``code/min_norm_solvers.py`` = MNS),
against a hand computation of a step whose encoders' gradients conflict (the min-norm branch that
BalanceBenchmark's version never reaches), and through the loop and the CLI."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie
import mie.cli
from conftest import TINY, make_arrays, make_context, make_step
from mie.errors import MieInputError
from mie.methods import Batch
from mie.methods.mmpareto import MMPareto, pareto_weights
from mie.models import ClassifierHead, MultiHeadModel

K = 3


def _model(mods=("a", "b"), seed=0):
    torch.manual_seed(seed)
    enc = {m: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)) for m in mods}
    heads = {m: ClassifierHead(3, K, hidden=()) for m in mods}
    return MultiHeadModel(enc, heads, ClassifierHead(3 * len(mods), K, hidden=()))


def _sgd(params, lr=None):
    return torch.optim.SGD(list(params), lr=0.05, momentum=0.9, weight_decay=1e-4)   # MP:296


def _method(model, make_optimizer=_sgd, **params):
    method = MMPareto(**params)
    method.setup(model, make_context(model.modalities, make_optimizer=make_optimizer))
    return method


def _batches(n_steps, mods=("a", "b"), n=16):
    g = torch.Generator().manual_seed(7)
    return [({m: torch.randn(n, 4, generator=g) for m in mods}, torch.randint(0, K, (n,), generator=g))
            for _ in range(n_steps)]


# ---- the released step, transcribed ------------------------------------------------------------
def _min_norm_element_from2(v1v1, v1v2, v2v2):
    """MNS:9-30."""
    if v1v2 >= v1v1:
        return 0.999
    if v1v2 >= v2v2:
        return 0.001
    return -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))


def _find_min_norm_element_two(vecs):
    """MNS:92-129 for two vectors (lists of tensors): _min_norm_2d's inner products (MNS:39-54),
    then sol_vec = [c, 1 − c] (MNS:122-129)."""
    dot = lambda u, v: sum(torch.mul(u[k], v[k]).sum() for k in range(len(u)))
    c = _min_norm_element_from2(dot(vecs[0], vecs[0]), dot(vecs[0], vecs[1]), dot(vecs[1], vecs[1]))
    return [float(c), 1 - float(c)]


def released_step(model, xs, y, optimizer, gamma=1.5):
    """MP:88-209 with audio → a, visual → b. Encoder tensors are those named ``encoders.<m>.`` (the
    code's ``'audio' in name``, MP:76-84); ``'head' in name`` excludes every head as in MP:77."""
    mods = ("a", "b")
    record = {m: [(n, p) for n, p in model.named_parameters() if "head" not in n and n.startswith(f"encoders.{m}.")]
              for m in mods}
    optimizer.zero_grad()                                                       # MP:93
    per, out = model.outputs(xs)                                                # MP:97
    losses = [F.cross_entropy(out, y)] + [F.cross_entropy(per[m], y) for m in mods]   # MP:99-110
    names = ["both", "a", "b"]
    grads = {m: {} for m in mods}
    for idx, loss_type in enumerate(names):                                     # MP:117-147
        losses[idx].backward(retain_graph=True)
        for m in mods:
            if loss_type in (m, "both"):
                grads[m][loss_type] = {n: p.grad.data.clone() for n, p in record[m]}
                grads[m][loss_type]["concat"] = torch.cat([grads[m][loss_type][n].flatten() for n, _ in record[m]])
        optimizer.zero_grad()
    k, branch = {}, {}
    for m in mods:                                                              # MP:149-174
        cos = F.cosine_similarity(grads[m]["both"]["concat"], grads[m][m]["concat"], dim=0)
        branch[m] = "equal" if cos > 0 else "pareto"
        k[m] = [0.5, 0.5] if cos > 0 else _find_min_norm_element_two([list(grads[m][t].values()) for t in ("both", m)])
    loss = sum(losses)                                                          # MP:180-181
    loss.backward()
    for m in mods:                                                              # MP:184-207
        for n, param in record[m]:
            three_norm = torch.norm(param.grad.data.clone())
            new_grad = 2 * k[m][0] * grads[m]["both"][n] + 2 * k[m][1] * grads[m][m][n]
            diff = three_norm / torch.norm(new_grad)
            param.grad = diff * new_grad * gamma if diff > 1 else new_grad * gamma
    optimizer.step()                                                            # MP:209
    return branch, k


def test_matches_the_released_training_step_over_several_steps():
    """Parity with GeWu-Lab/MMPareto_ICML2024 code/MMPareto.py lines 88-209 (the training step) and
    code/min_norm_solvers.py lines 9-129: same weights after 4 SGD steps (momentum 0.9, wd 1e-4,
    MP:296) with BatchNorm encoders; both branches of MP:165-174 are taken along the way."""
    model = _model()
    ref = copy.deepcopy(model)
    method = _method(model)
    ref_opt = _sgd(ref.parameters())
    branches = []
    for i, (xs, y) in enumerate(_batches(4)):
        logs = method.training_step(Batch(xs, y), make_step(index=i, steps_per_epoch=4))
        branch, k = released_step(ref, xs, y, ref_opt)
        branches += branch.values()
        for m in ("a", "b"):
            assert logs[f"pareto_conflict_{m}"] == float(branch[m] == "pareto")
            assert logs[f"pareto_alpha_{m}"] == pytest.approx(k[m][0], rel=1e-5)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q)
        for (n, b), b_ref in zip(model.named_buffers(), ref.buffers()):
            torch.testing.assert_close(b, b_ref, msg=n)
    assert {"equal", "pareto"} <= set(branches)


# ---- the conflict branch by hand -------------------------------------------------------------
X = {"a": [[1.0, 2.0], [0.5, -1.0]], "b": [[0.5, -1.0], [1.0, 0.5]], "c": [[-1.0, 1.0], [2.0, 0.0]]}
Y = [0, 1]
H = [[0.0, 0.0], [1.0, 0.0]]                                   # every unimodal head: logits (0, f₁)
G = [[0.0] * 6, [-1.0, 1.0, 1.0, 1.0, -2.0, 0.5]]              # fused head on [f_a; f_b; f_c]


def _hand_model():
    """Encoders Linear(2, 2) = identity (f_m = x_m), K = 2, heads as H and G, zero biases."""
    enc, heads = {}, {}
    for m in "abc":
        enc[m] = nn.Linear(2, 2)
        heads[m] = ClassifierHead(2, 2, hidden=())
        with torch.no_grad():
            enc[m].weight.copy_(torch.eye(2))
            enc[m].bias.zero_()
            heads[m].linears[0].weight.copy_(torch.tensor(H))
            heads[m].linears[0].bias.zero_()
    fused = ClassifierHead(6, 2, hidden=())
    with torch.no_grad():
        fused.linears[0].weight.copy_(torch.tensor(G))
        fused.linears[0].bias.zero_()
    return MultiHeadModel(enc, heads, fused)


def _expected_gradients(gamma=1.5):
    """Every gradient of the step, from the closed forms of a linear model (no autograd):
    r = (softmax(z) − onehot(y))/B per sample; δ = r·(head weight) is ∂L/∂f; ∂L/∂W_enc = Σ δᵢ xᵢᵀ,
    ∂L/∂b_enc = Σ δᵢ; a head's gradient is Σ rᵢ fᵢᵀ and Σ rᵢ."""
    xs = {m: torch.tensor(v) for m, v in X.items()}
    onehot = torch.eye(2)[torch.tensor(Y)]
    Hm, Gm = torch.tensor(H), torch.tensor(G)
    feats = torch.cat([xs[m] for m in "abc"], dim=1)
    r_mm = (torch.softmax(feats @ Gm.T, dim=1) - onehot) / 2
    expected = {"fused_head.net.0.weight": r_mm.T @ feats, "fused_head.net.0.bias": r_mm.sum(0)}
    alphas, conflict = {}, {}
    for i, m in enumerate("abc"):
        r_u = (torch.softmax(xs[m] @ Hm.T, dim=1) - onehot) / 2
        expected[f"heads.{m}.net.0.weight"] = r_u.T @ xs[m]
        expected[f"heads.{m}.net.0.bias"] = r_u.sum(0)
        d_mm, d_u = r_mm @ Gm[:, 2 * i:2 * i + 2], r_u @ Hm
        g_mm = [d_mm.T @ xs[m], d_mm.sum(0)]                       # (weight, bias) of encoder m
        g_u = [d_u.T @ xs[m], d_u.sum(0)]
        v11 = sum((a * a).sum() for a in g_mm)
        v12 = sum((a * b).sum() for a, b in zip(g_mm, g_u))
        v22 = sum((b * b).sum() for b in g_u)
        conflict[m] = bool(v12 <= 0)
        alpha = (v22 - v12) / (v11 + v22 - 2 * v12) if conflict[m] else torch.tensor(0.5)
        alphas[m] = float(alpha)
        for name, a, b in zip(("weight", "bias"), g_mm, g_u):
            d = 2 * (alpha * a + (1 - alpha) * b)
            s = torch.linalg.norm(a + b) / torch.linalg.norm(d)
            expected[f"encoders.{m}.{name}"] = gamma * max(float(s), 1.0) * d
    return expected, alphas, conflict


def test_conflict_branch_fires_and_matches_a_hand_computation():
    """Encoders a and c: cos(g_mm, g_u) < 0 → min-norm weights, per-tensor magnitude, γ; encoder b:
    cos > 0 → ½, ½, i.e. γ·g_sum. Three modalities: each encoder pairs L_mm with its own L_m."""
    expected, alphas, conflict = _expected_gradients()
    assert conflict == {"a": True, "b": False, "c": True}
    model = _hand_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain_sgd = lambda params, lr=None: torch.optim.SGD(list(params), lr=1.0)
    method = _method(model, make_optimizer=plain_sgd)
    logs = method.training_step(Batch({m: torch.tensor(v) for m, v in X.items()}, torch.tensor(Y)), make_step())
    for n, p in model.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), expected[n], msg=n)     # Δθ = −1 · grad
    for m in "abc":
        assert logs[f"pareto_conflict_{m}"] == float(conflict[m])
        assert logs[f"pareto_alpha_{m}"] == pytest.approx(alphas[m], rel=1e-5)
        assert (logs[f"pareto_cos_{m}"] < 0) == conflict[m]
    assert 0.001 < alphas["a"] < 0.999 and alphas["a"] != 0.5 and 0.001 < alphas["c"] < 0.999
    # the rule changes training: under conflict the encoder's step is not the multitask gradient
    # (g_mm + g_u) nor γ times it; without conflict it is exactly γ·(g_mm + g_u)
    for m, conflicting in conflict.items():
        step = before[f"encoders.{m}.weight"] - model.encoders[m].weight.detach()
        plain = _plain_multitask_gradient(m)
        if conflicting:
            assert not torch.allclose(step, plain, atol=1e-3) and not torch.allclose(step, 1.5 * plain, atol=1e-3)
        else:
            torch.testing.assert_close(step, 1.5 * plain)


def _plain_multitask_gradient(m):
    """∂(L_mm + Σ L_k)/∂W_m of the hand model by autograd (the uniform baseline's encoder gradient)."""
    model = _hand_model()
    per, fused = model.outputs({k: torch.tensor(v) for k, v in X.items()})
    y = torch.tensor(Y)
    (F.cross_entropy(fused, y) + sum(F.cross_entropy(z, y) for z in per.values())).backward()
    return model.encoders[m].weight.grad


def test_min_norm_weights_and_their_degenerate_cases():
    g = torch.tensor([1.0, 0.0])
    assert pareto_weights(g, torch.tensor([1.0, 1.0]))[0] == 0.5                  # cos > 0
    assert pareto_weights(g, torch.tensor([0.0, 2.0]))[0] == pytest.approx(0.8)    # cos = 0: v22/(v11 + v22)
    alpha, cos = pareto_weights(torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.0]))
    assert float(cos) == pytest.approx(-2 ** -0.5) and alpha == pytest.approx(0.4)   # (2 + 2)/(4 + 2 + 4)
    assert pareto_weights(torch.zeros(2), g)[0] == 0.999                           # g_mm = 0 (MNS:17-21)
    assert pareto_weights(g, torch.zeros(2))[0] == 0.001                           # g_u = 0 (MNS:22-26)


def test_a_frozen_encoder_is_left_alone():
    model = _model()
    model.encoders["b"].requires_grad_(False)
    frozen = copy.deepcopy(model.encoders["b"].state_dict())
    xs, y = _batches(1)[0]
    logs = _method(model).training_step(Batch(xs, y), make_step())
    assert "pareto_alpha_a" in logs and "pareto_alpha_b" not in logs
    for k, v in model.encoders["b"].state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, frozen[k]), k


def test_settings_and_one_modality_are_refused():
    with pytest.raises(MieInputError, match="gamma must be a number > 0"):
        MMPareto(gamma=0)
    with pytest.raises(MieInputError, match="fusion must be one of 'model', 'average', 'weight'"):
        MMPareto(fusion="concat")
    with pytest.raises(MieInputError, match="unknown parameter"):
        MMPareto(alpha=1)
    with pytest.raises(MieInputError, match="unimodal"):
        _method(_model(mods=("a",)))


def test_inference_reads_the_multimodal_head():
    model = _model()
    xs = _batches(1)[0][0]
    model.eval()
    fused, per = _method(model).predict(xs)
    per_logits, fused_logits = model.outputs(xs)
    torch.testing.assert_close(fused, torch.softmax(fused_logits, dim=-1))
    torch.testing.assert_close(per["b"], torch.softmax(per_logits["b"], dim=-1))


CONFIG = {"train": {"epochs": 2, "batch_size": 16}, "model": {"dim": 8, "head_hidden": [8]}}


def test_three_modalities_run_through_the_loop(monkeypatch):
    monkeypatch.setitem(mie.methods.METHODS, "mmpareto", (MMPareto, {}, "MMPareto"))
    x, y = make_arrays(n=60, shapes={"a": (6,), "b": (4,), "c": (5,)})
    rows = []
    result = mie.fit(mie.MultimodalArrays(x, y), "mmpareto", config=CONFIG, seed=0, progress=False,
                     callbacks=[lambda e, row: rows.append(row)])
    assert set(result["test"]["per_modality"]) == {"a", "b", "c"}
    assert all(0.0 <= rows[-1][f"pareto_conflict_{m}"] <= 1.0 for m in "abc")


def test_train_through_the_cli(monkeypatch, npz_file, tmp_path):
    monkeypatch.setitem(mie.methods.METHODS, "mmpareto", (MMPareto, {}, "MMPareto"))
    out = tmp_path / "run"
    code = mie.cli.main(["train", "--data", str(npz_file), "--method", "mmpareto", "--out", str(out), *TINY,
                         "method.gamma=1.2"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "mmpareto" and metrics["method_params"]["gamma"] == 1.2
    assert set(metrics["test"]["per_modality"]) == {"a", "b"} and 0 <= metrics["test"]["accuracy"] <= 1
    history = (out / "history.csv").read_text().splitlines()
    assert "pareto_conflict_a" in history[0] and len(history) == 3
