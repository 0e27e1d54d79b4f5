"""MLA — Multimodal Learning with Alternating Unimodal Adaptation.

Zhang, Yoon, Bansal, Yao, "Multimodal Representation Learning by Alternating Unimodal
Adaptation", CVPR 2024 (arXiv 2311.10707); code: github.com/Cecile-hi/Multimodal-Learning-with-
Alternating-Unimodal-Adaptation (also published as xiaohuimc/MLA).

Model. Every modality m has its own encoder φ_m (output size d, the same d for all) and all share
ONE head h: modality m predicts p_m = softmax(h(φ_m(x_m))). There is no fused training loss.

Training (per-iteration alternation). On every mini-batch (x, y), the modalities are trained in
turn, m = 1, …, M (the same order every batch), each with its own forward/backward/step:

    L_m = CE(h(φ_m(x_m)), y)
    g   = ∇ L_m   for φ_m and h only (the other encoders get no gradient)
    for each Linear W of h, with z the layer's input on this batch (B × d_in):
        r  = mean_b z_b                                 (d_in,)   the batch-mean input
        k  = P r
        P ← P − k kᵀ / (α + rᵀ k)                       recursive-least-squares / OWM update
        P ← P / ‖P‖_F                                   (normalize=True, as the released code)
        ∇W ← ∇W Pᵀ                                      (P is symmetric; biases untouched)
    θ ← optimizer step

with P = I (d_in × d_in) at the start, ONE P per head Linear shared by all modalities and kept
for the whole run (never reset between epochs), and the step size

    α = 0.1^(1 + b/N),   b = index of the mini-batch within the epoch (0-based, ``step.index``),
                         N = batches per epoch (``step.steps_per_epoch``)

so α falls from 0.1 to ~0.01 over each epoch and starts again at 0.1 the next epoch. P is updated
with the CURRENT modality's r before its gradient is projected (the released code's order), so
after a few steps P ≈ (I + Σ_s r_s r_sᵀ / α_s)⁻¹ (up to scale): the head's weight update is
damped along the directions of the mean features of every modality trained so far — the head
"keeps" what the earlier modalities taught it (Zeng et al., "Continual learning of context-
dependent processing in neural networks", Nat. Mach. Intell. 2019, the OWM update MLA uses).

The paper's head is a single Linear (d → K); ``mie`` uses the configured head (model.head_hidden;
set it to [] for the paper's) and gives each of its Linear layers its own P fed by that layer's
input, which is exactly OWM's per-layer rule and reduces to the paper's for one Linear.

Known differences between the paper and the authors' released code, both fixed here:
  * the projection is NEVER applied in the released code: ``GSPlugin.before_update`` receives the
    head Linear itself and tests ``n == "module.weight"``, but a Linear's parameters are named
    "weight" and "bias", so the branch is silently skipped and MLA trains without gradient
    modification. Here it is applied on every step.
  * inside that dead branch the denominator is written ``α + k rᵀ`` (a d×d outer product, divided
    element-wise) instead of the scalar ``α + rᵀ k``; the scalar RLS/OWM form is used here.
  * the released code skips the very first update of the run (exp_count == 0); here every step,
    the first included, updates P (with r ≠ 0 this changes only that one step).

Inference (test-time uncertainty-based fusion, paper eq. 9). Per sample, with H_m the entropy of
p_m, w_m = softmax_m(−H_m) and p = Σ_m w_m p_m (``fusion="weight"``, the default; the released
code computes the entropy over the batch axis of each test batch — ``mie.models.fuse`` does it per
sample as the paper says). ``fusion="average"`` gives p = (1/M) Σ_m p_m. Modality m's own accuracy
is read from the shared head on φ_m(x_m) alone.

Three or more modalities: the paper trains three (IEMOCAP: audio, video, text; ``--modal3`` in the
released code) with exactly this loop — each batch visits all M modalities in turn through the same head and the same
P — and fuses with the same entropy weights over M predictions; ``mie`` does the same for any M ≥ 2.
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
