"""SMV — sample-level modality valuation and re-sampling.

Wei, Feng, Wang, Hu, "Enhancing Multimodal Cooperation via Sample-level Modality Valuation",
CVPR 2024 (arXiv 2309.06255); code: github.com/GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation
@7ed12b0, files ``code/sample_level.py`` (SL:line), ``code/modality_level.py`` (ML:line),
``code/datasets/dataloader.py`` (DL:line), ``code/models/models.py`` (MM:line). Only the paper's
abstract was reached; everything below is read in the released code.

Model and loss. Encoders φ_m and one head h on the concatenated features (``SharedHeadModel``,
"concat"; the code's ``ConcatFusion`` is one Linear, MM:8-16, 69-70 — ``model.head_hidden: []``
for theirs), plain cross-entropy of z = h([φ_1(x_1); …; φ_M(x_M)]) (SL:171-176).

Valuation (``execute_modulation``, SL:75-122; ``exec_drop``, MM:74-86). With the model in eval
mode and no gradient, over the TRAINING set in order (the code's unshuffled ``train_val_dataloader``,
SL:261, 271-277): for every sample and every modality subset S, the prediction of h on the features
with the modalities outside S set to zero after the encoders, and the value

    v(S) = |S| · 1[argmax h(φ_S) = y],    v(∅) = 0,

(the code: v(a) = v(v) = 1, v(av) = 2 when correct, SL:107-115), and the Shapley value

    φ_m = Σ_{S ⊆ M∖{m}} |S|! (M − |S| − 1)! / M! · [v(S ∪ {m}) − v(S)],

for two modalities φ_a = ½[v(a) + v(av) − v(v)] (SL:117-118). φ_m is computed as an integer
over M!, so thresholds are compared exactly. The prediction is the argmax of the logits (the code's
of their softmax, SL:95-105: the same but for ties that rounding in the softmax creates).

When. Loop epochs 0 … ``warmup`` − 1 train on the plain training set (``warmup_epoch``, SL:321-323);
after every epoch e ≥ ``warmup`` − 1 the valuation rebuilds the set epoch e + 1 draws from (SL:141,
330-336). The code also values the warm-up epochs, only to log them (SL:335); here the valuation
runs only when its set will be trained on (``warmup`` − 1 ≤ e ≤ E − 2).

Sample level (``level="sample"``, registry ``smv``; ``AV_KS_Dataset_sample_level``, DL:154-186).
The set is every sample once (all modalities) plus, for each sample and each modality m, c(φ_m)
copies that keep only modality m:

    c = 1 if 0.4 < φ_m < 1,   2 if −0.1 < φ_m < 0.4,   3 if φ_m < −0.1,   0 otherwise,

strict inequalities as the code's, so φ_m ≥ 1 and the two boundary values φ_m = 0.4 and −0.1 give
no copy (unreachable with two modalities, where φ_m ∈ {−½, 0, ½, 1, 3/2}). The code's copies of
contrib_a carry drop = 2 (visual zeroed: audio kept), those of contrib_v drop = 1 (DL:152, 156-186).

Keeping only modality m (MM:62-67): the other modalities' features of that sample are set to zero
after the encoders, in training mode; their encoders still see its inputs in the forward pass (and
BatchNorm's batch statistics with them) but receive no gradient from it.

Modality level (``level="modality"``, registry ``smv_modality``; ML:143-164, DL:297-316). The
valuation runs on the whole training set (as the code: ML:87-126); then num = ⌊N · ``part_ratio``⌋
samples are drawn with replacement and averaged, gap_m = 1 − mean φ_m over them, and

    R = ⌊(|gap_a − gap_v| / 3 · 2) · α · N⌋

samples drawn with replacement are added once each, keeping only the modality with the larger gap
(v on a tie, where R = 0). The code draws with numpy's global generator (ML:147, DL:308); here
torch's global generator (saved with the run, so a resume draws the same). num ≥ 1 (ours; the code
divides by zero below one). The dataset class also has ``func`` "tanh" and "square" forms
(DL:300-306) that the released script never selects (ML:164-170): not offered.

Defaults from the released arguments: ``warmup`` 5 (SL:44, ML:50), ``part_ratio`` 0.2 (ML:51),
α = 1 (ML:52). The authors' training settings (here the run's shared ``train.*``): Adam, lr 5e-5,
betas (0.9, 0.999), weight decay 1e-4 (SL:286-294), StepLR(30, 0.1) (SL:296-298), batch 64,
60 epochs (SL:41-42), ResNet-18 encoders. A re-sampled epoch has more items (up to (1 + 3M)·N)
and so more steps; the budget counts epochs, as the code does.

Logged after each valuation: ``smv_phi_m`` (mean φ_m over the training set, the code's cona/conv,
SL:119-125), ``smv_copies_m`` (extra items keeping m) and, modality level, ``smv_gap_m``. Cost: one
pass over the training set with 2^M − 1 head evaluations per batch. The code's valuation set is the
training split with its training-time augmentation (DL:70-76); here the loop's unshuffled training
batches (``ctx.train_batches``, whose loader draws nothing from the run's random streams).

Inference (``fusion``): "model" (default) = softmax(z), the code's ``valid`` (SL:226-228);
"average" / "weight" fuse the per-modality predictions. Modality m's own logits are the valuation's
view, h on the features with every other modality zeroed (``joint_concat``'s).

Three or more modalities. Sample level: the same v(S) = |S| · 1[correct] and the exact Shapley sum
over the 2^M − 1 non-empty subsets, thresholds unchanged (ours: the code is two-modality; since
Σ_m φ_m = v(all) = M · 1[correct], φ_m = 1 stays a modality's equal share, which the thresholds
are placed around). Modality level compares one pair (|gap_a − gap_v|): ``setup`` refuses M ≥ 3.
"""
import math
from itertools import combinations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import MieInputError
from ..models import FUSIONS, SharedHeadModel, eval_mode
from .base import SingleOptimizerMethod, fusion_param, require_two_modalities
from .params import Param, Space, number, one_of

ALL = -1          # ``keep`` of an item that keeps every modality


def subset_logits(model, feats, subset):
    """h on the concatenated features with the modalities outside ``subset`` zeroed → (B, K)."""
    return model.head(model.combine({m: f if m in subset else torch.zeros_like(f) for m, f in feats.items()}))


@torch.no_grad()
def shapley_values(model, batches):
    """φ (N, M) float64 over ``batches`` ((xs, y) pairs, in order), v(S) = |S|·1[h(φ_S) right].

    Runs as the model is (the caller sets eval mode). φ_m = k_m / M! with k_m an exact integer."""
    mods = model.modalities
    M = len(mods)
    out = []
    for xs, y in batches:
        feats = model.features(xs)
        value = {(): torch.zeros_like(y)}
        for size in range(1, M + 1):
            for S in combinations(mods, size):
                value[S] = size * (subset_logits(model, feats, S).argmax(dim=-1) == y).long()
        k = torch.zeros(len(y), M, dtype=torch.long, device=y.device)
        for j, m in enumerate(mods):
            others = [o for o in mods if o != m]
            for size in range(M):
                weight = math.factorial(size) * math.factorial(M - size - 1)
                for S in combinations(others, size):
                    with_m = tuple(o for o in mods if o in S or o == m)
                    k[:, j] += weight * (value[with_m] - value[S])
        out.append(k.cpu())
    return torch.cat(out).double() / math.factorial(M)


def sample_copies(phi):
    """Copies per sample and modality (N, M) int64 from φ (N, M): DL:156-186's thresholds."""
    copies = torch.zeros(phi.shape, dtype=torch.long)
    copies[(phi > 0.4) & (phi < 1)] = 1
    copies[(phi > -0.1) & (phi < 0.4)] = 2
    copies[phi < -0.1] = 3
    return copies


def sample_plan(phi):
    """(index (R,), keep (R,)) of the extra items, sample by sample, modality by modality."""
    n, M = phi.shape
    counts = sample_copies(phi).reshape(-1)
    index = torch.arange(n).repeat_interleave(M).repeat_interleave(counts)
    keep = torch.arange(M).repeat(n).repeat_interleave(counts)
    return index, keep


def modality_plan(phi, part_ratio, alpha):
    """(index (R,), keep (R,), gaps (2,)) for two modalities, from torch's global generator."""
    n = len(phi)
    num = max(1, int(n * part_ratio))
    part = phi[torch.randint(n, (num,))]
    gap_a, gap_v = (1.0 - float(part[:, j].sum()) / num for j in range(2))
    count = int(abs(gap_a - gap_v) / 3 * 2 * alpha * n)
    index = torch.randint(n, (count,))
    keep = torch.full((count,), 0 if gap_a > gap_v else 1, dtype=torch.long)
    return index, keep, (gap_a, gap_v)


class Resampled(Dataset):
    """The training set once, then the extra items: sample ``index[r]`` keeping only modality
    ``keep[r]``; items carry ``{"keep": modality index or ALL}``."""

    def __init__(self, base, index, keep):
        self.base, self.index, self.keep = base, index, keep

    def __len__(self):
        return len(self.base) + len(self.index)

    def __getitem__(self, i):
        n = len(self.base)
        if i < n:
            xs, y = self.base[i]
            return xs, y, {"keep": torch.tensor(ALL)}
        xs, y = self.base[int(self.index[i - n])]
        return xs, y, {"keep": self.keep[i - n].clone()}


class SMV(SingleOptimizerMethod):
    name = "smv"
    params = {
        "fusion": fusion_param("model", FUSIONS),
        "level": Param("sample", one_of("sample", "modality"),
                       "re-sampling: sample (per-sample copies by φ_m) | modality (copies of the larger-gap "
                       "modality)"),
        "warmup": Param(5, number(at_least=1, integer=True),
                        "epochs on the plain training set before the first re-sampled one"),
        "part_ratio": Param(0.2, number(above=0, at_most=1),
                            "share of the training set whose mean φ_m gives the gaps (modality level)"),
        "alpha": Param(1.0, number(at_least=0), "scale α of the number of copies (modality level)",
                       Space("log", 0.1, 10.0)),    # ours: a decade each side
    }

    @classmethod
    def unused_params(cls, fixed):
        return {"part_ratio", "alpha"} if fixed.get("level") == "sample" else set()

    def build_model(self, spec):
        return SharedHeadModel.build(spec, "concat")

    def setup(self, model, ctx):
        if not isinstance(model, SharedHeadModel):
            raise MieInputError(f"SMV trains a concat-fusion SharedHeadModel; got {type(model).__name__}")
        require_two_modalities(model, self.name)
        if self.level == "modality" and len(model.modalities) != 2:
            raise MieInputError(
                f"SMV's modality level is defined for exactly 2 modalities, got {len(model.modalities)} "
                f"({', '.join(model.modalities)}): its copy count |gap_a − gap_v| and the choice of the larger "
                "gap compare one pair; use the sample level (method smv) for more modalities.")
        super().setup(model, ctx)
        self.plan = None

    def notices(self):
        budget = self.ctx.epochs_per_modality if self.ctx is not None else None
        if budget is not None and self.warmup >= budget:
            return [f"warmup={self.warmup} >= the {budget}-epoch budget: SMV never re-samples "
                    "(this run is joint_concat)"]
        return []

    # ---- training ---------------------------------------------------------------------
    def training_data(self, epoch, dataset):
        return dataset if self.plan is None else Resampled(dataset, *self.plan)

    def training_step(self, batch, step):
        xs, y = batch
        feats = self.model.features(xs)
        keep = batch.extras.get("keep")
        if keep is not None:
            for j, m in enumerate(self.model.modalities):
                drop = ((keep != ALL) & (keep != j))[:, None]
                feats[m] = feats[m].masked_fill(drop, 0.0)
        loss = F.cross_entropy(self.model.head(self.model.combine(feats)), y)
        self.minimize(loss)
        return {"loss": loss.detach()}

    def end_epoch(self, epoch):
        if not self.warmup - 1 <= epoch < self.ctx.epochs_per_modality - 1:
            return {}
        with eval_mode(self.model):
            phi = shapley_values(self.model, self.ctx.train_batches())
        mods = self.model.modalities
        logs = {f"smv_phi_{m}": float(phi[:, j].mean()) for j, m in enumerate(mods)}
        if self.level == "sample":
            index, keep = sample_plan(phi)
        else:
            index, keep, gaps = modality_plan(phi, self.part_ratio, self.alpha)
            logs.update({f"smv_gap_{m}": g for m, g in zip(mods, gaps)})
        self.plan = (index, keep)
        logs.update({f"smv_copies_{m}": int((keep == j).sum()) for j, m in enumerate(mods)})
        return logs

    # ---- inference --------------------------------------------------------------------
    def logits(self, xs):
        feats = self.model.features(xs)
        return self.model.modality_logits(feats), self.model.head(self.model.combine(feats))

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "plan": self.plan}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.plan = state["plan"]
