"""MNL — Multimodal Negative Learning.

Gong, Gao, Zhu, Hu, Cao, "Multimodal Negative Learning", NeurIPS 2025 (arXiv 2510.20877); code:
github.com/BaoquanGong/Multimodal-Negative-Learning @64cea56 (``train_latefusion.py``, cited below
as TL:line; ``src/models/latefusion.py`` as LF:line). Two modalities a, b (the code's txt, img).

Model. A head per modality (``LateFusionModel``), z^m = h_m(φ_m(x_m)) (B, C), fused by the mean of
the logits, z^f = ½(z^a + z^b) (LF:28). Prediction (``fusion="model"``, default): softmax(z^f), as
the code evaluates (TL:96); "average" / "weight" are ``mie``'s late-fusion rules.

Guidance, per sample i and step (TL:128-147, 155, 163). j_i = the strongest wrong class of the
FUSED prediction, j_i = argmax_{c≠y_i} softmax(z^f_i)_c; margins (the paper's UCoM) and target
confidences of each modality, with p^m = softmax(z^m):

    ξ^m_i = z^m_{i,y} − z^m_{i,j},    π^m_i = p^m_{i,y}
    a guides b  where ξ^a > ξ^b and π^a > π^b,
    b guides a  where ξ^a ≤ ξ^b and π^a ≤ π^b,        otherwise no guidance.

(``a`` is ``model.modalities[0]``, the code's txt: the code tests "txt guides img" strictly and
"img guides txt" with ≤, TL:155/163, so an exact tie goes to b guiding a. The paper says "higher
confidence and larger UCoM, and vice versa"; ties are measure-zero and follow the code.)
Logged per epoch: ``mnl_guided_<m>``, the fraction of samples in which modality m is guided.

Loss (one forward, one backward, one step per batch, TL:213-220). With G^{g→w}_i ∈ {0, 1} the
mask "g guides w", q = p^w the guided modality's prediction, p^g the guide's prediction DETACHED:

    L = CE(z^f, y) + CE(z^a, y) + CE(z^b, y)                                     (TL:149-153)
        + λ/(B·C) Σ_i Σ_{(g,w)} G^{g→w}_i Σ_{c≠y_i} −p^g_{i,c} log q_{i,c}      (negative learning)

``objective="paper"`` (default): the paper's total loss, L = CE(P^fusion) + Σ_i CE(P^(i)) +
λ·MNL(P^RDM, P^IM, ȳ) with MNL = −ȳ·P^RDM·log P^IM, ȳ the non-target indicator and P^RDM (the
guide) detached — as transcribed by a detailed summary of the paper (see Warm-up; the paper's own
equations could not be read here). The term acts on the wrong classes only: alone, it is least
for q_c = p^g_c / Σ_{c'≠y} p^g_{c'} (c ≠ y) and q_y → 0, so it pulls the guided modality's
distribution over the wrong classes towards its guide's, and the CE terms hold q_y up. With λ = 0
this is the base loss.
``objective="released"`` (opt-in): the released code's loss (TL:158-161, 166-169), which adds to
each guided sample its guided modality's target term as well,

        + 1/(B·C) Σ_i Σ_{(g,w)} G^{g→w}_i (−log q_{i,y}),

i.e. the code's ``boosting_loss`` = −onehot·log q·G − λ p^g·log q·G + λ onehot·p^g·log q·G,
averaged by ``torch.mean`` over its B×C entries.
The average over B·C (unguided samples count as zeros) is the code's (TL:161, 169); the paper's
normalisation could not be read, so the code fills it.

Warm-up. The paper trains in two stages: first "each modality is optimized solely with cross-entropy",
then, "after modality-level performance stabilizes", the MNL term is added. The released code has
no warm-up: guidance acts from the first step (its ``--warmup 0.1`` argument, TL:58, is never
read). No length is given (reachable text: a detailed summary of the paper,
en.papernotes.org/NeurIPS2025/multimodal_vlm/multimodal_negative_learning; the arXiv text beyond
the abstract could not be read here), so ``warmup_epochs=0`` (default) follows the code and
``warmup_epochs=K`` (opt-in) trains the first K loop epochs on the base loss alone. Reconstructed:
that the warm-up loss is the base loss with its fused CE (the summary speaks of per-modality CE
only), and that the stage ends after a fixed number of epochs rather than on a stability test.

Defaults and sources: λ = 0.7 (``--weight1``, TL:63); fusion "model" (TL:96, LF:28); warm-up 0
(the code). Two modalities: the paper's analysis (its Theorem 3.1, the robustness bound of bimodal
late fusion) and the code are for a pair, and the summary says only the bimodal case is
considered (the choice of guide among more is left open), so ``setup`` refuses M ≥ 3.

The authors' training settings (for reference; the run's ``train.*`` settings apply here): Adam
(TL:79), lr 2e-5, batch 16, at most 100 epochs, early stopping after 10 epochs without a better
validation accuracy (TL:249), ReduceLROnPlateau (mode max, patience 2, factor 0.5, TL:84-86)
(``shell/train_MVSA_latefusion.sh``; its ``--gradient_accumulation_steps`` and ``--freeze_*``
arguments are never read).
"""
import torch
import torch.nn.functional as F

from ..errors import MieInputError
from ..models import FUSIONS
from .base import SingleOptimizerMethod, fusion_param, require_two_modalities
from .params import Param, Space, number, one_of


def mean_fusion(per_modality_logits):
    """z^f = (1/M) Σ_m z^m: {m: (B, C)} → (B, C) (the code's ½ z^a + ½ z^b)."""
    return torch.stack(list(per_modality_logits.values())).mean(dim=0)


@torch.no_grad()
def guidance_masks(z_a, z_b, z_f, y):
    """(a guides b, b guides a): bool (B,) each, from the logits z_a, z_b, the fused z_f (B, C) and
    labels y (B,); j is the fused prediction's strongest wrong class."""
    rows = torch.arange(len(y), device=y.device)
    p_f = F.softmax(z_f.float(), dim=1)
    p_f[rows, y] = -1.0
    j = p_f.argmax(dim=1)
    xi_a = z_a[rows, y] - z_a[rows, j]
    xi_b = z_b[rows, y] - z_b[rows, j]
    pi_a = F.softmax(z_a.float(), dim=1)[rows, y]
    pi_b = F.softmax(z_b.float(), dim=1)[rows, y]
    return (xi_a > xi_b) & (pi_a > pi_b), (xi_a <= xi_b) & (pi_a <= pi_b)


def guidance_loss(guide, guided, y, mask, lam, released=False):
    """(1/(B·C)) Σ_i mask_i [λ Σ_{c≠y} −p^g_{i,c} log q_{i,c}  (+ −log q_{i,y} when ``released``)],
    p^g = softmax(guide) detached, q = softmax(guided); guide, guided (B, C), mask bool (B,)."""
    log_q = F.log_softmax(guided.float(), dim=1)
    p_g = F.softmax(guide.detach().float(), dim=1)
    target = F.one_hot(y, log_q.shape[1]).to(log_q.dtype)
    per_class = -lam * (1.0 - target) * p_g * log_q
    if released:
        per_class = per_class - target * log_q
    return (per_class * mask.to(log_q.dtype)[:, None]).mean()


class MNL(SingleOptimizerMethod):
    name = "mnl"
    params = {
        "fusion": fusion_param("model", FUSIONS),
        "lam": Param(0.7, number(at_least=0), "weight λ of the negative-learning term (released --weight1)",
                     Space("log", 0.07, 7.0)),  # ours: a decade each side
        "objective": Param("paper", one_of("paper", "released"),
                           "paper = base CE + λ·non-target term | released = the code's loss, which also adds "
                           "the guided modality's target CE on guided samples"),
        "warmup_epochs": Param(0, number(at_least=0, integer=True),
                               "loop epochs on the base CE before guidance starts (0: released code; the paper's "
                               "length is not given)"),
    }

    def setup(self, model, ctx):
        require_two_modalities(model, self.name)
        mods = model.modalities
        if len(mods) != 2:
            raise MieInputError(
                f"MNL is defined for exactly 2 modalities, got {len(mods)} ({', '.join(mods)}): "
                "the paper and the authors' code pick which of a pair guides the other by comparing their margins and "
                "confidences, and define no rule for more; select 2 modalities (data.modalities) or use a method that "
                "handles M modalities")
        super().setup(model, ctx)

    def notices(self):
        budget = self.ctx.epochs_per_modality if self.ctx is not None else None
        if budget is not None and self.warmup_epochs >= budget:
            return [f"warmup_epochs={self.warmup_epochs} >= the {budget}-epoch budget: MNL's guidance never acts "
                    "(this run is late fusion trained on the fused and unimodal cross-entropies)"]
        if self.lam == 0 and self.objective == "paper":
            return ["lam=0: the negative-learning term is zero (this run is late fusion trained on the fused and "
                    "unimodal cross-entropies)"]
        return []

    def training_step(self, batch, step):
        xs, y = batch
        a, b = self.model.modalities
        z = self.model(xs)
        z_f = mean_fusion(z)
        loss = F.cross_entropy(z_f, y) + F.cross_entropy(z[a], y) + F.cross_entropy(z[b], y)
        logs = {f"mnl_guided_{a}": 0.0, f"mnl_guided_{b}": 0.0}
        if step.epoch >= self.warmup_epochs:
            a_guides_b, b_guides_a = guidance_masks(z[a], z[b], z_f, y)
            released = self.objective == "released"
            loss = (loss + guidance_loss(z[a], z[b], y, a_guides_b, self.lam, released)
                    + guidance_loss(z[b], z[a], y, b_guides_a, self.lam, released))
            logs = {f"mnl_guided_{a}": b_guides_a.float().mean(), f"mnl_guided_{b}": a_guides_b.float().mean()}
        self.minimize(loss)
        return {"loss": loss.detach(), **logs}

    def fuse_logits(self, per_logits):
        """z^f: the mean of the per-modality logits."""
        return mean_fusion(per_logits)

    def logits(self, xs):
        per = self.model(xs)
        return per, self.fuse_logits(per)
