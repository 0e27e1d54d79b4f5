"""OPM and OPM+OGM (mie.methods.opm, mie.methods.opm_ogm): parity of their real training_step with a
transcription of the authors' released code (GeWu-Lab/BML_TPAMI2024), then hand computations of
the drop probability q and its clipping, the drop mask, the two rescales, that only the dominant
modality is dropped, p_exe, the window and warm-up, the notices, and the real loop."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mie
import mie.methods
from conftest import make_context, make_step
from mie.errors import MieInputError
from mie.methods import Batch, create_method
from mie.methods.opm import OPM, drop_mask, drop_probabilities
from mie.methods.opm_ogm import OPMOGM
from mie.models import ClassifierHead, LateFusionModel

K = 3
D = 4
ALPHA = 0.8


# ---- parity with the authors' released code -------------------------------------------------------
def _conv_model(seed=0):
    """Encoders shaped like the authors' ResNet18 in miniature (4-D conv kernels, BatchNorm, global
    pooling to D features, no Linear) and one-Linear heads: the per-modality parts of their
    concatenation layer, out = out_1 + out_2 (models/Classifier.py line 139-140, 148)."""
    torch.manual_seed(seed)

    def encoder():
        return nn.Sequential(nn.Conv2d(1, D, 3, padding=1), nn.BatchNorm2d(D), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return LateFusionModel({"a": encoder(), "v": encoder()}, {m: ClassifierHead(D, K, hidden=()) for m in "av"})


def _conv_batches(count, n=16, seed=2):
    """Mini-batches whose first modality carries the label (a mean shift), the second noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        y = torch.randint(0, K, (n,), generator=g)
        out.append(({"a": torch.randn(n, 1, 5, 5, generator=g) + 1.5 * y.view(-1, 1, 1, 1).float(),
                     "v": torch.randn(n, 1, 5, 5, generator=g)}, y))
    return out


def _sgd(params):
    return torch.optim.SGD(list(params), lr=0.1, momentum=0.9, weight_decay=1e-4)


# GeWu-Lab/BML_TPAMI2024 code/models/Classifier.py line 9-21 (custom_autograd), transcribed
class _CustomAutograd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, theta):
        ctx.save_for_backward(input, theta)
        return input / (1 - theta.item())

    @staticmethod
    def backward(ctx, grad_output):
        input, theta = ctx.saved_tensors
        return 1 / (1 - theta.item()) * grad_output.clone(), None


# GeWu-Lab/BML_TPAMI2024 code/models/Classifier.py line 58-72 (calcu_q), transcribed
def _calcu_q(performance_1, performance_2, q_base, fix_lambda):
    q = torch.tensor([0.0, 0.0])
    relu = nn.ReLU(inplace=True)
    ratio_1 = torch.tanh(relu(performance_1 / performance_2 - 1))
    ratio_2 = torch.tanh(relu(performance_2 / performance_1 - 1))
    lamda = fix_lambda
    q[0] = q_base * (1 + lamda * ratio_1) if ratio_1 > 0 else 0
    q[1] = q_base * (1 + lamda * ratio_2) if ratio_2 > 0 else 0
    return torch.clip(q, 0.0, 1.0)


# GeWu-Lab/BML_TPAMI2024 code/models/Classifier.py line 31-55 (Modality_drop.execute_drop), transcribed;
# its np.random.rand(1) and Bernoulli(1-q).sample([B,1]) draw here from ``gen``.
def _execute_drop(fead_list, q, p_exe, dim_list, gen):
    B = fead_list[0].shape[0]
    D_ = fead_list[0].shape[1]
    exe_drop = torch.rand(1, generator=gen) >= 1 - p_exe
    if not exe_drop:
        return fead_list, torch.ones([B], dtype=torch.int32), False
    num_mod = len(fead_list)
    d_sum = sum(dim_list)
    q_sum = sum(dim_list * q)
    theta = q_sum / d_sum
    mask = torch.bernoulli((1 - q).expand(B, 1, num_mod), generator=gen)
    mask = mask.permute(2, 1, 0).contiguous().reshape(num_mod, B, -1)
    concat_list = torch.stack(fead_list, dim=0)
    concat_list = torch.mul(concat_list, mask)
    concat_list = _CustomAutograd.apply(concat_list, theta)
    mask = torch.transpose(mask, 0, 1).squeeze(-1)
    update_flag = torch.sum(mask, dim=1) > 0
    cleaned_fea = torch.masked_select(concat_list, update_flag.unsqueeze(-1)).reshape(num_mod, -1, D_)
    cleaned_fea = [c.squeeze(0) for c in torch.chunk(cleaned_fea, num_mod, dim=0)]
    return cleaned_fea, update_flag, True


# GeWu-Lab/BML_TPAMI2024 code/main.py line 86-171 (train, one mini-batch) with Classifier.forward
# (code/models/Classifier.py line 93-153), transcribed for --use_adam_drop [--use_modulation].
def _released_step(model, optimizer, xs, label, epoch, gen, q_base=0.5, lam=0.5, p_exe=0.7, use_modulation=False,
                   alpha=ALPHA, modulation="OGM_GE", modulation_starts=0, modulation_ends=80):
    softmax, relu, tanh = nn.Softmax(dim=1), nn.ReLU(inplace=True), nn.Tanh()
    optimizer.zero_grad()
    warm_up = 1 if epoch <= 5 else 0
    out_1, out_2 = model.encoders["a"](xs["a"]), model.encoders["v"](xs["v"])
    t1, t2 = model.heads["a"](out_1), model.heads["v"](out_2)          # f·W_u^T + b/2
    performance_1 = sum([softmax(t1)[i][int(label[i].item())] for i in range(t1.shape[0])])
    performance_2 = sum([softmax(t2)[i][int(label[i].item())] for i in range(t2.shape[0])])
    executed = False
    if warm_up == 0:
        q = _calcu_q(performance_1.detach(), performance_2.detach(), q_base, fix_lambda=lam)
        cleaned_fea, update_flag, executed = _execute_drop([out_1, out_2], q, p_exe, torch.tensor([D, D]), gen)
        out = model.heads["a"](cleaned_fea[0]) + model.heads["v"](cleaned_fea[1])
        if torch.sum(update_flag, dim=0) == 0:
            return None
        label = label[update_flag != 0]
    else:
        out = t1 + t2
    loss = nn.CrossEntropyLoss()(out, label)
    loss.backward()
    if warm_up == 0 and use_modulation:
        radio_1 = performance_1 / performance_2
        radio_2 = performance_2 / performance_1
        if radio_1 > 1:
            coeff_1 = 1 - tanh(alpha * relu(radio_1))
            coeff_2 = 1
        else:
            coeff_1 = 1
            coeff_2 = 1 - tanh(alpha * relu(radio_2))
        if modulation_starts <= epoch <= modulation_ends:
            for name, parms in model.named_parameters():
                for encoder, coeff in (("encoders.a.", coeff_1), ("encoders.v.", coeff_2)):
                    if name.startswith(encoder) and parms.grad is not None and len(parms.grad.size()) == 4:
                        if modulation == "OGM_GE":
                            parms.grad = parms.grad * coeff + \
                                torch.zeros_like(parms.grad).normal_(0, parms.grad.std().item() + 1e-8, generator=gen)
                        elif modulation == "OGM":
                            parms.grad *= coeff
    optimizer.step()
    return executed


def _run_against_released(name, epochs, **params):
    """Train our ``name`` and the transcription side by side: (max |state difference| after each
    step, our logs, their executed flags)."""
    ours, theirs = _conv_model(), _conv_model()
    method = create_method(name, **params)
    method.setup(ours, make_context(["a", "v"], make_optimizer=lambda p, lr=None: _sgd(p), epochs_per_modality=100))
    method.generator.manual_seed(11)
    gen = torch.Generator().manual_seed(11)
    optimizer = _sgd(theirs.parameters())
    combined = name == "opm_ogm"
    diffs, logs, executed = [], [], []
    for epoch, (xs, y) in zip(epochs, _conv_batches(len(epochs))):
        logs.append({k: float(v) for k, v in method.training_step(Batch(xs, y), make_step(epoch)).items()})
        executed.append(_released_step(theirs, optimizer, xs, y, epoch, gen, use_modulation=combined,
                                       alpha=getattr(method, "alpha", ALPHA)))
        a, b = ours.state_dict(), theirs.state_dict()
        diffs.append(max((a[k].double() - b[k].double()).abs().max().item() for k in a))
    return diffs, logs, executed


OPM_EPOCHS = (5, 6, 7, 8, 9, 10, 11, 12)


# GeWu-Lab/BML_TPAMI2024 code/main.py line 86-114 and code/models/Classifier.py line 31-72, 145-149
# (scripts/train_opm.sh: q_base 0.5, lam 0.5, p_exe 0.7): opm's defaults — the warm-up epochs 0-5
# (main.py line 91), q, the execute draw, the Bernoulli keep mask and the shared 1/(1 − θ) rescale.
def test_parity_of_opm_with_the_released_step():
    diffs, logs, executed = _run_against_released("opm", OPM_EPOCHS)
    assert max(diffs) < 1e-6, diffs
    assert [bool(r["opm_executed"]) for r in logs] == executed
    assert executed[0] is False and logs[0]["opm_q_a"] == logs[0]["opm_q_v"] == 0.0      # epoch 5: warm-up
    assert 0 < sum(executed) < len(executed) - 1                                          # some steps drop


# GeWu-Lab/BML_TPAMI2024 code/main.py line 91, 116-169 with --use_adam_drop --use_modulation (argparse
# defaults --modulation OGM_GE --modulation_ends 80, main.py line 36, 47): opm_ogm's defaults — OGM
# from epoch 6 to 80 inclusive on the 4-D kernels, with noise of the unscaled gradient's std; OPM on.
def test_parity_of_opm_ogm_with_the_released_step():
    diffs, logs, executed = _run_against_released("opm_ogm", (5, 6, 7, 80, 81, 82))
    assert max(diffs) < 1e-6, diffs
    assert [bool(r["opm_executed"]) for r in logs] == executed
    assert logs[0]["ogm_coeff_a"] == logs[0]["ogm_coeff_v"] == 1.0                       # epoch 5: warm-up
    assert min(logs[1]["ogm_coeff_a"], logs[1]["ogm_coeff_v"]) < 1.0                     # epoch 6: OGM acts
    assert logs[4]["ogm_coeff_a"] == logs[4]["ogm_coeff_v"] == 1.0                       # epoch 81: OGM over
    assert logs[4]["opm_q_a"] + logs[4]["opm_q_v"] > 0.0                                 # ... OPM still on


# GeWu-Lab/BML_TPAMI2024 code/models/Classifier.py line 38-49, code/main.py line 91, 154: each former
# default of ours breaks the parity — the per-modality 1/(1 − q) rescale, no warm-up, OGM to the end,
# relu(ρ − 1) in k, BatchNorm and biases modulated.
@pytest.mark.parametrize("name,former", [("opm", {"rescale": "modality"}), ("opm", {"modulation_starts": 0}),
                                         ("opm_ogm", {"ogm_ends": None}), ("opm_ogm", {"ratio_offset": 1.0}),
                                         ("opm_ogm", {"scope": "encoder"})])
def test_the_former_defaults_do_not_match_the_released_step(name, former):
    epochs = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9) if "modulation_starts" in former else (5, 6, 7, 80, 81, 82)
    diffs, _, _ = _run_against_released(name, epochs, **former)
    assert max(diffs) > 1e-3


# ---- hand computations on Linear encoders ---------------------------------------------------------
def _model(strong, mods=("a", "v"), seed=0):
    """Linear encoders (K → D) and one-Linear heads; ``strong`` reads the label off a one-hot input."""
    torch.manual_seed(seed)
    encoders, heads = {}, {}
    for m in mods:
        enc, head = nn.Linear(K, D), ClassifierHead(D, K, hidden=())
        with torch.no_grad():
            if m == strong:
                enc.weight.mul_(0.1)
                enc.weight[:K, :K] += torch.eye(K)
                head.net[0].weight.zero_()
                head.net[0].weight[:, :K] = 3.0 * torch.eye(K)
            else:
                enc.weight.mul_(0.3)
                head.net[0].weight.mul_(0.3)
        encoders[m], heads[m] = enc, head
    return LateFusionModel(encoders, heads).double()


def _batch(strong, mods=("a", "v"), n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    xs = {m: torch.randn(n, K, generator=g, dtype=torch.float64) for m in mods}
    xs[strong] = 0.1 * xs[strong] + F.one_hot(y, K).double()
    return xs, y


def _ctx(mods, epochs=4):
    return make_context(mods, lr=0.0, epochs_per_modality=epochs)     # lr 0: the gradients stay visible


def _setup(cls, model, seed=5, **kw):
    method = cls(**{"modulation_starts": 0, **kw})                     # no warm-up unless asked
    method.setup(model, _ctx(model.modalities))
    method.generator.manual_seed(seed)
    return method


def _train(method, xs, y, epoch=0):
    """One training step in loop epoch ``epoch``; the logs as floats."""
    logs = method.training_step(Batch(xs, y), make_step(epoch))
    return {k: float(v) for k, v in logs.items()}


def _scores(model, xs, y):
    with torch.no_grad():
        return {m: F.softmax(model.heads[m](model.encoders[m](xs[m])), dim=-1)[torch.arange(len(y)), y].sum().item()
                for m in model.modalities}


def _record_head_inputs(model):
    seen = {m: [] for m in model.modalities}
    for m in model.modalities:
        model.heads[m].register_forward_pre_hook(lambda mod, args, m=m: seen[m].append(args[0].detach().clone()))
    return seen


def _hand_keep(seed, q, n):
    """The method's draws: the execute draw, then a (n, 2) Bernoulli(1 − q) mask in modality order."""
    g = torch.Generator().manual_seed(seed)
    torch.rand((), generator=g)
    return torch.bernoulli(torch.tensor([1 - v for v in q]).expand(n, len(q)), generator=g).double()


def test_drop_probability_by_hand_and_clipped():
    q = drop_probabilities({"a": 2.0, "v": 0.5}, q_base=0.5, lam=0.5)
    assert q["a"] == pytest.approx(0.5 * (1 + 0.5 * math.tanh(1.0)))     # relu(ρ − 1) = 1
    assert q["a"] != pytest.approx(0.5 * (1 + 0.5 * math.tanh(2.0)))     # not relu(ρ)
    assert q["v"] == 0.0                                                 # the weaker modality is never dropped
    assert drop_probabilities({"a": 1.0, "v": 1.0}, 0.5, 0.5) == {"a": 0.0, "v": 0.0}
    assert drop_probabilities({"a": 5.0, "v": 0.2}, q_base=0.9, lam=1.0)["a"] == 1.0   # 0.9·(1+tanh 4) → 1
    assert drop_probabilities({"a": 1.2, "v": 0.8}, q_base=0.0, lam=1.0)["a"] == 0.0
    three = drop_probabilities({"a": 2.0, "b": 1.0, "c": 0.4}, 0.4, 0.5)
    assert three == {"a": pytest.approx(0.4 * (1 + 0.5 * math.tanh(1.0))), "b": 0.0, "c": 0.0}


def test_drop_mask_keeps_with_probability_one_minus_q():
    mask = drop_mask([0.3, 0.0], 4000, torch.Generator().manual_seed(0))
    expected = torch.bernoulli(torch.tensor([0.7, 1.0]).expand(4000, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, expected)
    assert 1 - mask[:, 0].mean().item() == pytest.approx(0.3, abs=0.025)
    assert torch.all(mask[:, 1] == 1)                                    # q = 0: always kept


@pytest.mark.parametrize("strong", ["a", "v"])
def test_modality_rescale_drops_and_rescales_only_the_dominant_modality(strong):
    model = _model(strong)
    xs, y = _batch(strong)
    weak = "v" if strong == "a" else "a"
    s = _scores(model, xs, y)
    rho = s[strong] / s[weak]
    q = 0.5 * (1 + 0.5 * math.tanh(rho - 1))
    assert rho > 1.5
    keep = _hand_keep(5, [q, 0.0] if strong == "a" else [0.0, q], len(y))[:, 0 if strong == "a" else 1]
    assert 0 < keep.sum() < len(y)
    with torch.no_grad():
        f = {m: model.encoders[m](xs[m]) for m in model.modalities}
    ref = copy.deepcopy(model)
    z = ref.heads[strong](ref.encoders[strong](xs[strong]) * keep[:, None] / (1 - q)) + \
        ref.heads[weak](ref.encoders[weak](xs[weak]))
    loss = F.cross_entropy(z, y)
    loss.backward()

    seen = _record_head_inputs(model)
    logs = _train(_setup(OPM, model, p_exe=1.0, rescale="modality"), xs, y)

    assert logs["opm_executed"] == 1.0
    assert logs[f"opm_q_{strong}"] == pytest.approx(q) and logs[f"opm_q_{weak}"] == 0.0
    assert logs["loss"] == pytest.approx(loss.item())
    assert len(seen[weak]) == 1 and torch.equal(seen[weak][0], f[weak])            # weak: untouched
    assert len(seen[strong]) == 2                                                  # scores, then the drop
    torch.testing.assert_close(seen[strong][1], f[strong] * keep[:, None] / (1 - q))   # κ·f/(1−q)
    assert torch.all(seen[strong][1][keep == 0] == 0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[name].grad)


def test_shared_rescale_is_the_default_and_divides_every_modality_by_one_minus_theta():
    assert create_method("opm").rescale == "shared"
    model = _model("a")
    xs, y = _batch("a")
    s = _scores(model, xs, y)
    q = 0.5 * (1 + 0.5 * math.tanh(s["a"] / s["v"] - 1))
    theta = q / 2                                                     # equal feature sizes: mean of (q, 0)
    keep = _hand_keep(5, [q, 0.0], len(y))
    with torch.no_grad():
        f = {m: model.encoders[m](xs[m]) for m in model.modalities}
    seen = _record_head_inputs(model)
    _train(_setup(OPM, model, p_exe=1.0), xs, y)
    torch.testing.assert_close(seen["a"][1], f["a"] * keep[:, :1] / (1 - theta))
    torch.testing.assert_close(seen["v"][1], f["v"] / (1 - theta))   # not dropped, still rescaled


def test_no_drop_without_execution_or_outside_the_window():
    model = _model("a")
    xs, y = _batch("a")
    plain = F.cross_entropy(sum(model.heads[m](model.encoders[m](xs[m])) for m in model.modalities), y).item()
    seen = _record_head_inputs(model)
    logs = _train(_setup(OPM, model, p_exe=0.0), xs, y)
    assert logs["opm_executed"] == 0.0 and logs["loss"] == pytest.approx(plain)
    assert len(seen["a"]) == len(seen["v"]) == 1
    method = _setup(OPM, model, p_exe=1.0, modulation_starts=1)
    state = method.generator.get_state()
    logs = _train(method, xs, y)
    assert logs["opm_executed"] == 0.0 and logs["opm_q_a"] == 0.0 and logs["loss"] == pytest.approx(plain)
    assert torch.equal(method.generator.get_state(), state)            # outside the window: no draw at all


def test_default_warm_up_is_the_released_codes_epochs_0_to_5():
    for name in ("opm", "opm_ogm"):
        method = create_method(name)
        assert (method.modulation_starts, method.modulation_ends) == (6, None)
        assert [method.active(make_step(e)) for e in (5, 6, 500)] == [False, True, True]
    method = create_method("opm_ogm")
    assert method.ogm_ends == 81
    assert [method.ogm_active(make_step(e)) for e in (5, 6, 80, 81)] == [False, True, True, False]


def test_p_exe_is_the_fraction_of_executed_steps():
    model = _model("a")
    xs, y = _batch("a", n=12)
    method = _setup(OPM, model, p_exe=0.7)
    executed = [_train(method, xs, y)["opm_executed"] for _ in range(300)]
    assert np.mean(executed) == pytest.approx(0.7, abs=0.08)


def test_opm_ogm_scales_the_dominant_encoder_weight_of_the_dropped_loss():
    model = _model("a")
    xs, y = _batch("a")
    s = _scores(model, xs, y)
    rho = s["a"] / s["v"]
    q = 0.5 * (1 + 0.5 * math.tanh(rho - 1))
    k = 1 - math.tanh(ALPHA * rho)
    keep = _hand_keep(5, [q, 0.0], len(y))[:, 0]
    ref = copy.deepcopy(model)
    z = (ref.heads["a"](ref.encoders["a"](xs["a"]) * keep[:, None] / (1 - q))
         + ref.heads["v"](ref.encoders["v"](xs["v"])))
    F.cross_entropy(z, y).backward()
    raw = {n: p.grad for n, p in ref.named_parameters()}

    logs = _train(_setup(OPMOGM, model, p_exe=1.0, alpha=ALPHA, ge="off", rescale="modality"), xs, y)
    assert logs["ogm_coeff_a"] == pytest.approx(k) and logs["ogm_coeff_v"] == 1.0
    assert logs["opm_q_a"] == pytest.approx(q)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, (k if name == "encoders.a.weight" else 1.0) * raw[name])


def test_notices():
    def notes(name, epochs, **kw):
        method = create_method(name, **kw)
        method.setup(_model("a"), _ctx(["a", "v"], epochs=epochs))
        return method.notices()
    assert notes("opm", 4) == ["OPM never acts: its window starts at loop epoch 6, the run has epochs 0-3; "
                               "this run is plain joint training"]
    assert notes("opm", 30) == ["OPM acts in loop epochs 6-29 only, of 0-29"]
    assert notes("opm", 30, modulation_starts=0) == []
    assert notes("opm_ogm", 100) == ["OPM acts in loop epochs 6-99 only, of 0-99",
                                     "OGM acts in loop epochs 6-80 only, of 0-99"]
    scope = notes("opm_ogm", 30, scope="encoder_4d", modulation_starts=0, ogm_ends=None)
    assert len(scope) == 2 and all("selects no tensor" in n for n in scope)      # Linear encoders: no 4-D kernel


def test_invalid_settings_are_refused():
    for kw, refused in (({"q_base": 1.5}, "q_base"), ({"p_exe": -0.1}, "p_exe"), ({"lam": -1}, "lam"),
                        ({"rescale": "none"}, "rescale"), ({"fusion": "max"}, "fusion"),
                        ({"modulation_starts": 2, "modulation_ends": 2}, "modulation_ends")):
        with pytest.raises(MieInputError, match=f"{refused} must be"):
            create_method("opm", **kw)
    with pytest.raises(MieInputError, match="ge must be one of"):
        create_method("opm_ogm", ge="maybe")
    with pytest.raises(MieInputError, match="ogm_ends must be"):
        create_method("opm_ogm", modulation_starts=90)
    with pytest.raises(MieInputError, match="unknown parameter"):
        create_method("opm", alpha=0.5)                                 # OGM's α belongs to opm_ogm


def test_inference_is_the_sum_of_undropped_logits():
    model = _model("a")
    xs, _ = _batch("a")
    with torch.no_grad():
        z = {m: model.heads[m](model.encoders[m](xs[m])) for m in model.modalities}
    model.eval()
    for cls in (OPM, OPMOGM):
        method = _setup(cls, model, p_exe=1.0)
        state = method.generator.get_state()
        fused, per = method.predict(xs)
        assert method.fusion == "model"
        torch.testing.assert_close(fused, F.softmax(z["a"] + z["v"], dim=-1).float())
        torch.testing.assert_close(per["a"], F.softmax(z["a"], dim=-1).float())
        assert torch.equal(method.generator.get_state(), state)        # nothing is dropped at inference


def _arrays(n=90, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    x = {"a": (rng.normal(size=(K, 6))[y] * 2 + rng.normal(size=(n, 6))).astype(np.float32),
         "b": (rng.normal(size=(K, 4))[y] * 0.5 + rng.normal(size=(n, 4))).astype(np.float32)}
    return mie.MultimodalArrays(x, y)


@pytest.mark.parametrize("name,cls", [("opm", OPM), ("opm_ogm", OPMOGM)])
def test_runs_through_the_loop(monkeypatch, tmp_path, name, cls):
    monkeypatch.setitem(mie.methods.METHODS, name, (cls, {}, name))
    rows = []
    config = {"model": {"dim": 8, "head_hidden": [8]}, "train": {"batch_size": 32, "device": "cpu"}}
    result = mie.fit(_arrays(), method=name, config=config, epochs=2, seed=0, progress=False,
                     out_dir=tmp_path / "run", callbacks=[lambda epoch, row: rows.append(row)], modulation_starts=0)
    assert len(rows) == 2 and 0.0 <= rows[0]["opm_executed"] <= 1.0
    assert max(rows[0]["opm_q_a"], rows[0]["opm_q_b"]) > 0.0
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert set(result["test"]["per_modality"]) == {"a", "b"}
    assert result["notices"] == []


def test_the_default_warm_up_outlasts_a_short_run_and_says_so():
    config = {"model": {"dim": 8, "head_hidden": [8]}, "train": {"batch_size": 32, "device": "cpu"}}
    result = mie.fit(_arrays(), method="opm", config=config, epochs=2, seed=0, progress=False)
    assert result["notices"] == ["opm: OPM never acts: its window starts at loop epoch 6, the run has epochs 0-1; "
                                 "this run is plain joint training"]


def test_state_dict_restores_optimizer_and_generator():
    model = _model("a")
    xs, y = _batch("a")
    method = _setup(OPM, model, p_exe=1.0)
    _train(method, xs, y)
    state = copy.deepcopy(method.state_dict())
    after = [_train(method, xs, y)["loss"] for _ in range(3)]
    other = _setup(OPM, model, seed=99, p_exe=1.0)
    other.load_state_dict(state)
    assert [_train(other, xs, y)["loss"] for _ in range(3)] == after      # same drops after a resume
