"""MLA — Multimodal Learning with Alternating Unimodal Adaptation.

Zhang, Yoon, Bansal, Yao, "Multimodal Representation Learning by Alternating Unimodal
Adaptation", CVPR 2024 (arXiv 2311.10707); code: github.com/Cecile-hi/Multimodal-Learning-with-
Alternating-Unimodal-Adaptation (also published as xiaohuimc/MLA), cited below as main.py:line and
utils.py:line (``utils/utils.py``).

Model. Every modality m has its own encoder φ_m (output size d, the same d for all) and all share
ONE head h: modality m predicts p_m = softmax(h(φ_m(x_m))). There is no fused training loss. (The
code's shared head is one Linear, ``ConcatFusion(input_dim=512)`` with ``--gs_flag``,
models/basic_model.py:31-32, applied to each modality's features, main.py:432, 444, 456.)

Training (per-iteration alternation, main.py:419-466). On every mini-batch (x, y), the modalities
are trained in turn, m = 1, …, M (the same order every batch), each with its own forward, backward
and optimizer step:

    L_m = CE(h(φ_m(x_m)), y)
    g   = ∇ L_m   for φ_m and h only (the other encoders get no gradient)
    for each Linear W of h, with z the layer's input on this batch (B × d_in):
        r  = mean_b z_b                                 (d_in,)   the batch-mean input
        k  = P r
        P ← P − k kᵀ / (α + rᵀ k)                       recursive-least-squares / OWM update
        P ← P / ‖P‖_F                                   (``normalize=True``, as utils.py:38-40)
        ∇W ← ∇W Pᵀ                                      (P is symmetric; biases untouched)
    θ ← optimizer step

with P = I (d_in × d_in) at the start, ONE P per head Linear shared by all modalities and kept
for the whole run (never reset between epochs: one ``GSPlugin`` for the run, main.py:819), and
the step size (utils.py:26-27)

    α = 0.1^(1 + b/N),   b = index of the mini-batch within the epoch (0-based, ``step.index``),
                         N = batches per epoch (``step.steps_per_epoch``)

so α falls from 0.1 to ~0.01 over each epoch and starts again at 0.1 the next epoch. P is updated
with the CURRENT modality's r before its gradient is projected (utils.py:34-41, called between
``backward`` and ``step``, main.py:435-439), so after a few steps P ≈ (I + Σ_s r_s r_sᵀ / α_s)⁻¹
(up to scale): the head's weight update is damped along the directions of the mean features of
every modality trained so far — the head "keeps" what the earlier modalities taught it (Zeng et
al., "Continual learning of context-dependent processing in neural networks", Nat. Mach. Intell.
2019, the OWM update MLA uses).

``mie`` uses the configured head (model.head_hidden; set it to [] for the paper's single Linear)
and gives each of its Linear layers its own P fed by that layer's input, which is exactly OWM's
per-layer rule and reduces to the paper's for one Linear.

The paper's method vs the released code. The default is the paper's method: the projection acts.
  * In the released code the projection NEVER acts: ``GSPlugin.before_update`` receives the head
    Linear itself (main.py:437) and tests ``n == "module.weight"`` (utils.py:32), but a Linear's
    parameters are named "weight" and "bias", so the branch is silently skipped and the code trains
    without gradient modification: per-batch alternation of plain SGD steps through a shared head.
    ``project=False`` (opt-in) trains that way.
  * Inside that dead branch the denominator is written ``alpha + torch.mm(k, r)`` (utils.py:36;
    k is d×1 and r is 1×d, so a d×d outer product, divided element-wise) instead of the scalar
    ``α + rᵀ k`` of OWM; the scalar form is used here.
  * The dead branch would skip the very first update of the run (``train_exp_counter != 0``,
    utils.py:29; the counter counts modality steps, main.py:442); here every step, the first
    included, updates P and projects (with r ≠ 0 this changes only that one step).
  * The code's optimizer is SGD with momentum 0.9 and weight decay 1e-4 (main.py:749) over all
    parameters; ``optimizer.zero_grad()`` between the modality steps (main.py:440) leaves zero
    gradients (torch < 2.0) or none (torch ≥ 2.0) on the other encoder, so with older torch the
    other encoder still moves by its momentum and weight decay. Here the other encoders have no
    gradient (``zero_grad(set_to_none=True)``) and the optimizer is the run's (``train.*``).

Inference (test-time uncertainty-based fusion, paper eq. 9). Per sample, with H_m the entropy of
p_m, w_m = softmax_m(−H_m) and p = Σ_m w_m p_m (``fusion="weight"``, the default, as SPEC.md
fixes it). The released code (``--dynamic``, main.py:640-646 and 65-106) computes one entropy per
modality per test batch (a softmax over the batch axis, summed over the whole batch) and weights
the logits; without ``--dynamic`` it fuses 0.5·z_a + 0.5·z_v (main.py:651; ``av_alpha``).
``fusion="average"`` gives p = (1/M) Σ_m p_m. Modality m's own accuracy is read from the shared
head on φ_m(x_m) alone.

Three or more modalities: the paper trains three (IEMOCAP: audio, video, text; ``--modal3`` in the
released code, main.py:455-466) with exactly this loop — each batch visits all M modalities in turn
through the same head and the same P — and fuses with the same entropy weights over M predictions;
``mie`` does the same for any M ≥ 2.
"""
import torch
import torch.nn.functional as F

from ..errors import MieInputError
from ..models import LATE_FUSIONS, ClassifierHead, MultimodalModel, build_encoders
from .base import SingleOptimizerMethod, fusion_param, require_two_modalities
from .params import Param, boolean, modality_list


class MLAModel(MultimodalModel):
    """One encoder per modality and ONE head shared by all: ``forward({m: x_m})`` → {m: h(φ_m(x_m))}."""

    def __init__(self, encoders, head):
        super().__init__(encoders)
        self.head = head

    def modality_parameters(self, m):
        """The parameters modality m's step touches: φ_m and the shared head."""
        return list(self.encoders[m].parameters()) + list(self.head.parameters())

    def forward_modality(self, m, x):
        return self.head(self.encoders[m](x))

    def forward(self, xs):
        return {m: self.forward_modality(m, xs[m]) for m in self.modalities}

    @classmethod
    def build(cls, spec):
        encoders = build_encoders(spec)
        return cls(encoders, ClassifierHead(spec.dim, spec.num_classes, spec.head_hidden))


def owm_alpha(batch_index, batches_per_epoch):
    """α = 0.1^(1 + b/N) for mini-batch b (0-based) of an epoch of N batches."""
    return 0.1 ** (1.0 + batch_index / max(int(batches_per_epoch), 1))


@torch.no_grad()
def owm_update(P, r, alpha, normalize=True):
    """One projection update: k = P r, P − k kᵀ/(α + rᵀk), then ÷‖·‖_F if ``normalize``.

    P (d × d) symmetric, r (d,) the batch-mean layer input; returns the new P (same dtype)."""
    r = r.to(P.dtype).reshape(-1, 1)
    k = P @ r
    P = P - (k @ k.T) / (alpha + (r.T @ k))
    if normalize:
        P = P / torch.linalg.matrix_norm(P, ord="fro")
    return P


def _global_mean(z):
    """Mean over the batch rows of z (B, d); under torch.distributed, over every rank's batch, so
    that all replicas keep the same P (their gradients are already all-reduced)."""
    r = z.mean(dim=0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(r)
        r = r / torch.distributed.get_world_size()
    return r


class _LayerInputs:
    """Records the input of each given Linear layer during forward passes (detached)."""

    def __init__(self, linears):
        self.linears, self.inputs, self._handles = list(linears), {}, []

    def __enter__(self):
        def hook(index):
            def fn(module, inputs, output):
                self.inputs[index] = inputs[0].detach()
            return fn
        self._handles = [l.register_forward_hook(hook(i)) for i, l in enumerate(self.linears)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []


class MLA(SingleOptimizerMethod):
    name = "mla"
    params = {
        "project": Param(True, boolean, "project the head's weight gradients with P (the paper); false: no "
                                        "projection, how the released code actually trains (its branch never fires)"),
        "normalize": Param(True, boolean, "divide P by its Frobenius norm after each update (released code)"),
        "order": Param(None, modality_list, "the order modalities are trained in on each batch (default: the data's)"),
        "fusion": fusion_param("weight", LATE_FUSIONS),
    }

    # ---- set-up -----------------------------------------------------------------------
    def build_model(self, spec):
        """Encoders of output size spec.dim (one d for all modalities) and one shared head."""
        return MLAModel.build(spec)

    def setup(self, model, ctx):
        require_two_modalities(model, self.name)
        order = list(self.order or model.modalities)
        if sorted(order) != sorted(model.modalities):
            raise MieInputError(f"method.order {order} must list each modality once: {model.modalities}")
        self.cycle = order
        # One optimizer; zero_grad(set_to_none) leaves the other encoders without gradients, so each
        # modality step updates exactly φ_m and the shared head.
        super().setup(model, ctx)
        self.linears = model.head.linears
        self.P = [torch.eye(l.in_features, device=l.weight.device, dtype=torch.float32) for l in self.linears]

    # ---- training ---------------------------------------------------------------------
    def training_step(self, batch, step):
        xs, y = batch
        alpha = owm_alpha(step.index, step.steps_per_epoch)
        logs = {f"loss_{m}": self._step(m, xs[m], y, alpha) for m in self.cycle}
        logs["mla_alpha_mean"] = alpha          # the epoch's row holds its mean
        return logs

    def _step(self, m, x, y, alpha):
        """One update of φ_m and the shared head on modality m's CE, head gradients projected."""
        self.optimizer.zero_grad(set_to_none=True)
        if not self.project:                     # the released code as it runs: plain steps
            loss = F.cross_entropy(self.model.forward_modality(m, x), y)
            loss.backward()
            self.optimizer.step()
            return loss.detach()
        with _LayerInputs(self.linears) as rec:
            loss = F.cross_entropy(self.model.forward_modality(m, x), y)
        loss.backward()
        for i, layer in enumerate(self.linears):
            r = _global_mean(rec.inputs[i].reshape(-1, layer.in_features).float())
            self.P[i] = owm_update(self.P[i], r, alpha, self.normalize)
            if layer.weight.grad is not None:
                layer.weight.grad = layer.weight.grad @ self.P[i].T.to(layer.weight.grad.dtype)
        self.optimizer.step()
        return loss.detach()

    def end_epoch(self, epoch):
        # How anisotropic the projections have become: λ_min/λ_max of each P (1 while P ∝ I; → 0 as
        # the directions of the modalities' mean features get damped), mean over the head's layers.
        ratios = []
        for P in self.P:
            lam = torch.linalg.eigvalsh((P + P.T).double() / 2)
            ratios.append(float(lam[0] / lam[-1]) if lam[-1] > 0 else 0.0)
        return {"mla_P_min_over_max_eig": sum(ratios) / len(ratios)}

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "P": [P.detach().clone() for P in self.P]}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.P = [P.to(device=l.weight.device, dtype=torch.float32)
                  for P, l in zip(state["P"], self.linears)]
