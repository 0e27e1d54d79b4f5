"""MIE — Modal-aware Interactive Enhancement (Jiang, Chi, Yang, arXiv 2407.04587; IGM, IJCAI 2025).

Each modality m has its own encoder and head and its own loss L(θ_m) = CE(h_m(φ_m(x_m)), y).
Modalities are trained in alternating stages; in the stage of modality j, with k the modality
trained just before j in the cycle (T^(m) = I for every modality at the start):

    g  = ∇θ_j L(θ_j)                               pass 1
    ε  = ρ · g / ‖g‖₂                              (SAM, ‖·‖ over all of θ_j)
    g' = ∇θ_j L(θ_j + ε)                           pass 2, BatchNorm statistics untouched
    ∇W ← ∇W · T^(k)  for each head Linear W of j   (GM; biases untouched)
    θ_j ← optimizer step with g'  from the restored θ_j

and after the stage, T^(j) = V exp(−τ (Λ − λ_min)/(λ_max − λ_min)) Vᵀ from Ȳ = Σ_t z̄_t z̄_tᵀ of
each of j's head Linear inputs over one eval pass of the training data (``mie.optim.flat``). Ȳ depends
on what each batch t holds; the paper does not say, and the released code passes over its training
loader, shuffled, the last incomplete batch dropped (IJCAI25-IGM ``train_CREMA.py`` l. 366 and 385,
the same in the other ``train_*.py``), as ``gm_batches="shuffled"`` (default) does with a permutation
of its own per stage end (``ctx.train_batches``). ``gm_batches="data"`` takes the data's order, every
sample, the same batches each time; where the data are sorted by class (mfeat, many archives) its
z̄_t are near class means. On mfeat pix + zer and BasicMotions the two gave the same fused test
accuracy within the seeds' spread (README, Speed).
At inference p = fuse(p_1, …, p_m) with "average" (default), per-sample entropy "weight", "log"
(geometric mean) or "fitted" (per-modality weights fitted on validation) fusion; docs/fusion.md
measures when each helps.

GM rewrites the head's Linear layers by default. ``gm_scope`` s ∈ [0, 1] extends it into the
encoder, as the paper's Table 4 does (30% of the parameters scored best on CREMA-D): Linear and
convolution (1-, 2-, 3-D) layers are added from the last one backwards while the chosen layers'
weights hold less than s of the modality's parameters, a conv layer's Ȳ being its unfolded-input
covariance (``mie.optim.flat``). Layers of j and k are paired by position counted from the output; a pair
whose d_in differs (e.g. a 1-channel and a 3-channel stem) is left unmodified.

A stage lasts ``epochs_per_stage`` epochs, one number for all modalities or one per modality
(``{audio: 25, video: 50}`` as the authors' CREMA-D runs). The cycle repeats until every modality
has had exactly ``train.epochs`` = E epochs of updates, the budget of every other method: a stage
that would pass E is cut short, and a modality that has its E epochs is left out of the remaining
cycles (``stage_plan``). With ``train.lr_step``, ``schedule="modality"`` (default) steps each
modality's rate by its own count of trained epochs, as a baseline's rate steps by its epochs;
``schedule="stage"`` restarts the schedule at every stage, as the authors' code does by building a
new scheduler per stage (IJCAI25-IGM ``train_*.py``).

``objective="released"`` (the named variant ``mie_released``) trains each stage on the objective
of the authors' released code (IJCAI25-IGM ``train_*.py``) instead of the paper's cross-entropy,
still with this file's SAM and GM: with λ ~ Beta(α, α) and a permutation π of the batch,

    x̃ = λ x + (1 − λ) x[π]                   (floating-point inputs; token ids are not mixed)
    o = h_j(φ_j(x̃))
    L = (1 − w) · [λ CE(o, y) + (1 − λ) CE(o, y[π])] + w · CE(o, y)

α = ``mixup_alpha`` (code: 1.0; 0.9 for Twitter), w = ``flat_weight`` (code: ``flat_ratio`` 0.3).
In the code the second term's head sees SAM-perturbed weights that are never restored; here both
terms are evaluated in both SAM passes and the weights are restored, as SAM defines. The code's
other departures (ρ = 1e-10, checkpoints chosen on test) are not reproduced.

Each modality has its own optimizer (``SAM`` around the configured one when ``sam``), and GM is a
step pre-hook on it (``mie.optim.GradientModification``): a step is ``optimizer.step(closure)``,
and GM rewrites the gradients between the second backward and the base step.

``ensemble_weight`` = λ ∈ [0, 1] (ours; 0, the paper's objective, by default) trains the stage of
j on a mix of its own loss and the loss of the ensemble it joins, the other modalities' logits
held fixed (computed in eval mode, no gradient):

    L = (1 − λ) · CE(z_j, y) + λ · CE(z_j + Σ_{k≠j} z_k, y)

Only θ_j is updated, as in every MIE stage; the second term asks j to add what the others lack,
the way gradient boosting (and ReconBoost's stage loss) fits each learner against the current
ensemble. Independently trained heads err on the same samples, so their fusion gains little
(docs/fusion.md); this term is what makes them complementary. Its natural inference rule is
``log`` (softmax of the mean log-probabilities: the summed logits' argmax), as ``mie_recipe`` uses.
``ensemble_heads`` (ours, ``mie_recipe_heads``) gives each modality a second head g_m on the same
features for that term, so that the head that must be good alone is not also asked to complement:

    L = (1 − λ) · CE(h_j(φ_j(x_j)), y) + λ · CE(g_j(φ_j(x_j)) + Σ_{k≠j} g_k(φ_k(x_k)), y)

the fused prediction is softmax(Σ_m g_m) (``fusion="model"``), each modality's own prediction
softmax(h_m); θ_j holds φ_j, h_j and g_j, GM acts on h_j's layers as in the paper. With a late-fusion
rule instead ("average", "log", ...), the prediction fuses the own heads h_m and the g_m act only on
training, through the features φ_m they share with h_m (an auxiliary ensemble loss; docs/recipe.md
measures both).

Efficiency options (ours, after the cited papers; defaults leave every step a full SAM step):
``sam_every`` = k runs SAM's two passes on each modality's optimizer steps 0, k, 2k, … and a plain
step with one pass in between (MosaicML Composer's SAM ``interval``); ``sam_reuse="looksam"``
makes those plain steps use g + α (‖g‖/‖g_v‖) g_v, g_v being the part of the last SAM gradient
orthogonal to its g (LookSAM, Liu et al., CVPR 2022; α = 0.7). GM rewrites the stepped gradient
in plain steps too. ``mie.optim.SAM`` documents both. ``gm_refresh`` = r recomputes T^(j) after
j's 1st, (r+1)-th, (2r+1)-th … stage and keeps the last T^(j) in between (after every r-th epoch
under ``alternation="iteration"``), cutting the covariance passes to 1/r (ours: the amortisation
that K-FAC, Martens & Grosse, ICML 2015, applies to its curvature inverses, recomputed only every
T₃ iterations). ``gm_statistics="steps"`` takes Ȳ^(j) from the batch means z̄_t of the GM layers'
inputs in the first, unperturbed pass of every training step of the stage's last epoch instead of
an eval pass after the stage: no extra pass, at the price of features from weights that move during
the epoch, in train mode (dropout, BatchNorm batch statistics), over the loader's batches (ours, as
K-FAC estimates its statistics from the training mini-batches' own forward passes, Martens & Grosse,
ICML 2015, §5). ``gm_lowrank`` applies T^(k) as I + U diag(σ − 1) Uᵀ over the r directions it damps
(r ≤ n, the batch means; ``mie.optim.LowRankModification``) where 2r < d: the same T, 2·out·d·r
multiply-adds per layer and step instead of out·d², in place, results equal up to float rounding.
``gm_tolerance`` = tol leaves out the directions that T damps by at most tol (1 − σ ≤ tol): each
rewritten gradient moves by at most tol·‖∇W‖_F, and since Ȳ of batch means has one eigenvalue far
above the rest, r drops from n to a few (on mfeat's heads, 22 → 1–6 at tol = 1e-3).

``sam`` and ``gm`` switch the two ingredients off, so the paper's ablation (neither / SAM only /
GM only / both) is four runs of this method; ``gm_into`` applies GM to the updates of the listed
modalities only (the paper's unidirectional ablation: ``[a]`` rewrites a's gradients with T of its
source, the others train unmodified), and only the T that those updates read are computed (nor the
T after the run's last stage, which no stage reads, unless the diagnostics record it).
``alternation="iteration"`` trains every modality in turn on each mini-batch (as MLA does) and
recomputes every T after each epoch. ``mie ablate`` runs the whole grid (``mie.ablate``).

``diagnostics=True`` writes, into the run folder, the spectra of each GM layer's Ȳ and T at every
recomputation of T, and per epoch the mean cosine between each step's gradient before and after GM
(``mie.diagnostics``); ``stage_checkpoints=True`` keeps the model at each stage end as
``checkpoints/epoch_<n>.pt`` (each epoch under ``alternation="iteration"``).
"""
from contextlib import ExitStack, nullcontext

import torch
import torch.nn.functional as F

from ..diagnostics import GMDiagnostics
from ..data.torch_dataset import Indexed
from ..errors import MieInputError
from ..models import LATE_FUSIONS, EnsembleHeadsModel, eval_mode
from ..optim import (GM_LAYERS, SAM, GradientModification, InputCovariance, LowRankModification,
                     flat_modification_from_means, input_dim, matrix_stats)
from .base import Method, fusion_param, require_two_modalities
from .params import Param, Space, boolean, modality_list, number, one_of


def stage_lengths(v):
    """Check of ``epochs_per_stage``: an integer >= 1, or a mapping modality → integer >= 1."""
    lengths = v.values() if isinstance(v, dict) else [v]
    ok = all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in lengths)
    return None if ok else "an integer >= 1 or a mapping modality → integer >= 1, e.g. {audio: 25, video: 50}"


def stage_plan(cycle, lengths, epochs):
    """[(j, epoch within its stage, the stage's length)] for each loop epoch: stages of ``lengths``
    epochs in ``cycle`` order, repeated until every modality has exactly ``epochs`` epochs; a stage
    that would pass the budget is cut short, and a modality that has it is skipped."""
    done, plan = {m: 0 for m in cycle}, []
    while any(n < epochs for n in done.values()):
        for m, n in zip(cycle, lengths):
            length = min(n, epochs - done[m])
            plan += [(m, i, length) for i in range(length)]
            done[m] += length
    return plan


def gm_layers(model, m, scope=0.0):
    """Modality m's layers whose gradients GM rewrites, in forward order: its head's Linears, then
    its encoder's Linear / convolution layers taken from the last backwards while the chosen layers'
    weights hold less than a share ``scope`` ∈ [0, 1] of m's parameters (0: the head alone)."""
    layers = list(model.heads[m].linears)
    total = sum(p.numel() for p in model.modality_parameters(m))
    held = sum(l.weight.numel() for l in layers)
    candidates = [l for l in model.encoders[m].modules() if isinstance(l, GM_LAYERS) and _supported(l)]
    for layer in reversed(candidates):
        if held >= scope * total:
            break
        layers.insert(0, layer)
        held += layer.weight.numel()
    return layers


def _supported(layer):
    try:
        input_dim(layer)
    except TypeError:
        return False
    return True


class MIE(Method):
    name = "mie"
    params = {
        "tau": Param(0.4, number(above=0), "GM temperature τ: the sharpest direction is damped by e^{-τ} (paper 0.4)",
                     Space("log", 0.04, 4.0)),          # ours: a decade each side of the paper's 0.4
        "rho": Param(0.05, number(at_least=0), "SAM radius ρ",
                     Space("log", 0.005, 0.5)),         # a decade each side; holds SAM's grid 0.01-0.5 (Foret et al.)
        "sam": Param(True, boolean, "SAM on each modality's parameters"),
        "gm": Param(True, boolean, "flat gradient modification"),
        "adaptive": Param(False, boolean, "ASAM's scale-invariant perturbation"),
        "sam_every": Param(1, number(at_least=1, integer=True),
                           "SAM's two passes on every k-th step of a modality, plain steps between (1: always)"),
        "sam_reuse": Param(None, one_of(None, "looksam"),
                           "between SAM steps, add back SAM's reused orthogonal gradient (LookSAM, α = 0.7)"),
        "alternation": Param("stage", one_of("stage", "iteration"), "stages of whole epochs, or every modality per batch"),
        "epochs_per_stage": Param(1, stage_lengths, "epochs of one stage (one number, or one per modality)"),
        "order": Param(None, modality_list, "the modality cycle (default: the data's order)"),
        "fusion": fusion_param("average", LATE_FUSIONS + ("model",)),
        "ensemble_weight": Param(0.0, number(at_least=0, at_most=1),
                                 "λ: weight of the ensemble loss CE(z_j + Σ z_k) in j's stage (0: the paper's "
                                 "CE; mie_recipe tunes it)"),
        "ensemble_heads": Param(False, boolean, "a second head g_m per modality takes the ensemble term, "
                                                "CE(g_j + Σ g_k); with fusion 'model' the fused prediction is "
                                                "Σ g_m, else the own heads' fusion; h_m, trained on m's own CE, "
                                                "stays m's prediction"),
        "gm_refresh": Param(1, number(at_least=1, integer=True),
                            "T^(j) recomputed after every r-th stage of j, reused in between (1: every stage)"),
        "gm_batches": Param("shuffled", one_of("shuffled", "data"),
                            "batches of the covariance pass: shuffled, the last incomplete one dropped (the released "
                            "code's training loader), or the data's order"),
        "gm_statistics": Param("pass", one_of("pass", "steps"),
                               "Ȳ from an eval pass over the training data after the stage (the paper), or from "
                               "the batch means the stage's last epoch's training steps see (no extra pass)"),
        "gm_lowrank": Param(False, boolean, "apply T as I + U diag(σ − 1) Uᵀ over the r directions it damps "
                                            "(r ≤ n batch means): 2·out·d·r per step instead of out·d², equal "
                                            "up to float rounding"),
        "gm_tolerance": Param(0.0, number(at_least=0, below=1),
                              "with gm_lowrank, leave undamped the directions T damps by at most this (1 − σ ≤ "
                              "tol): each rewritten gradient moves by at most tol·‖∇W‖"),
        "gm_scope": Param(0.0, number(at_least=0, at_most=1), "share of parameters GM reaches (0: the head)"),
        "schedule": Param("modality", one_of("modality", "stage"),
                          "train.lr_step counts each modality's own epochs, or restarts every stage (authors' code)"),
        "objective": Param("paper", one_of("paper", "released"), "the paper's CE, or the released code's mixup"),
        "mixup_alpha": Param(1.0, number(above=0), "released objective: λ ~ Beta(α, α)",
                             Space("log", 0.1, 10.0)),  # ours (code: 1.0; 0.9 on Twitter)
        "flat_weight": Param(0.3, number(at_least=0, at_most=1), "released objective: weight w of the clean CE",
                             Space("float", 0.0, 1.0)),  # ours: the whole range (code: 0.3)
        "gm_into": Param(None, modality_list, "GM only into these modalities' updates (default: all)"),
        "diagnostics": Param(False, boolean, "write GM diagnostics into the run folder (spectra of Ȳ and T, "
                                             "gradient cosines before/after GM)"),
        "stage_checkpoints": Param(False, boolean, "keep the model at each stage end: checkpoints/epoch_<n>.pt"),
    }

    @classmethod
    def check_params(cls, values):
        if values["ensemble_weight"] and values["objective"] != "paper":
            raise MieInputError("method.ensemble_weight mixes the ensemble loss into the paper's objective; "
                                "it cannot be used with objective 'released'")
        if values["ensemble_heads"] and not values["ensemble_weight"]:
            raise MieInputError("method.ensemble_heads trains the second heads on the ensemble term; it needs "
                                "method.ensemble_weight > 0")
        if values["gm_tolerance"] and not values["gm_lowrank"]:
            raise MieInputError("method.gm_tolerance truncates the low-rank form of T; it needs method.gm_lowrank=true")
        if values["fusion"] == "model" and not values["ensemble_heads"]:
            raise MieInputError("method.fusion 'model' is the ensemble heads' summed logits: it needs "
                                "method.ensemble_heads=true")

    @classmethod
    def unused_params(cls, fixed):
        return ({"rho", "adaptive", "sam_every", "sam_reuse"} if fixed.get("sam") is False else set()) | \
               ({"tau", "gm_scope", "gm_into", "gm_refresh", "gm_batches", "gm_statistics", "gm_lowrank",
                 "gm_tolerance", "diagnostics"} if fixed.get("gm") is False else set()) | \
               ({"gm_batches"} if fixed.get("gm_statistics") == "steps" else set()) | \
               ({"mixup_alpha", "flat_weight", "objective"} if fixed.get("objective") != "released"
                else {"ensemble_weight", "ensemble_heads"})

    # ---- set-up -----------------------------------------------------------------------
    def build_model(self, spec):
        return EnsembleHeadsModel.build(spec) if self.ensemble_heads else super().build_model(spec)

    separate_modalities = True

    def setup(self, model, ctx):
        super().setup(model, ctx)
        require_two_modalities(model, self.name)
        order = list(self.order or model.modalities)
        if sorted(order) != sorted(model.modalities):
            raise MieInputError(f"method.order {order} must list each modality once: {model.modalities}")
        self.cycle = order
        lengths = self.epochs_per_stage
        if isinstance(lengths, dict) and sorted(lengths) != sorted(order):
            raise MieInputError(f"method.epochs_per_stage names {sorted(lengths)}; it must give one length for each "
                                f"modality: {order}")
        self.lengths = [lengths[m] if isinstance(lengths, dict) else lengths for m in order]
        self.plan = stage_plan(order, self.lengths, ctx.epochs_per_modality)
        into = list(order if self.gm_into is None else self.gm_into)
        if not into or not set(into) <= set(order) or len(set(into)) != len(into):
            raise MieInputError(f"method.gm_into {into} must list some of the modalities {order}, each once")
        self.targets = into
        self.layers = {m: gm_layers(model, m, self.gm_scope) for m in order}
        self.T = {m: [torch.eye(input_dim(l), dtype=torch.float64) for l in self.layers[m]] for m in order}
        self.means = {m: None for m in order}   # the factors Z (Ȳ = Z Zᵀ) T^(m) was made from (None: T = I)
        self.optimizers, self.gm_hooks = {}, {}
        for m in order:
            base = ctx.make_optimizer(model.modality_parameters(m))
            if self.gm:
                self.gm_hooks[m] = GradientModification(self.layers[m], track=self.diagnostics)
                self.gm_hooks[m].attach(base)
            self.optimizers[m] = SAM(base, rho=self.rho, adaptive=self.adaptive, model=model.modality_modules(m),
                                     every=self.sam_every, reuse=self.sam_reuse) if self.sam else base
        for m in order:
            self._feed(m)
        self._stats_cache = {}
        self._collectors = {}  # m → InputCovariance over the training steps of m (gm_statistics="steps")
        self._shares = {}      # m → (N, K): modality m's share of the ensemble on every training sample
        self.diagnosis = GMDiagnostics(self.tau) if self.gm and self.diagnostics else None

    def num_epochs(self, epochs_per_modality):
        if self.alternation == "iteration":
            return epochs_per_modality
        self.plan = stage_plan(self.cycle, self.lengths, epochs_per_modality)
        return len(self.plan)

    # ---- the cycle ----------------------------------------------------------------------
    def source(self, j):
        """k: the modality trained just before j in the cycle, whose T^(k) shapes j's gradients."""
        return self.cycle[self.cycle.index(j) - 1]

    def successor(self, m):
        """The modality trained just after m in the cycle, which reads T^(m)."""
        return self.cycle[(self.cycle.index(m) + 1) % len(self.cycle)]

    def stage(self, epoch):
        """(j, k, last): the modality trained in loop epoch ``epoch`` (stage mode), its source k,
        and whether the stage ends here."""
        j, within, length = self.plan[epoch]
        return j, self.source(j), within + 1 == length

    def trained_modalities(self, epoch):
        return list(self.cycle) if self.alternation == "iteration" else [self.plan[epoch][0]]

    def schedule_epoch(self, epoch):
        """The epoch count train.lr_step reads: j's own trained epochs before this one, or the epoch
        within the current stage (``schedule="stage"``)."""
        if self.alternation == "iteration":
            return epoch
        j, within, _ = self.plan[epoch]
        return within if self.schedule == "stage" else sum(m == j for m, _, _ in self.plan[:epoch])

    def start_epoch(self, epoch):
        for hook in self.gm_hooks.values():
            hook.changes = []
        if self.gm_statistics == "steps":
            self._collectors = {m: InputCovariance(self.layers[m]) for m in self._recomputed_after(epoch)}
        if self._keeps_shares:
            j = self.stage(epoch)[0]
            self._shares.pop(j, None)                  # θ_j changes in this stage
            for k in self.cycle:
                if k != j and k not in self._shares:
                    self._shares[k] = self._training_shares(k)

    # ---- the other modalities' shares of the ensemble --------------------------------------
    @property
    def _keeps_shares(self):
        """Whether the stages keep each untrained modality's share of the ensemble term on the whole training
        set (``ensemble_weight`` > 0, stage alternation): one pass over the data after each stage instead of
        a forward of every other modality at every step. Where the training set draws random windows or crops
        (NVGesture), the kept share is that of one draw, not of the draw the step sees."""
        return bool(self.ensemble_weight) and self.alternation == "stage"     # (the paper's objective: checked)

    def training_data(self, epoch, dataset):
        return Indexed(dataset) if self._keeps_shares else dataset

    def training_inputs(self, epoch):
        """A stage reads its own modality's inputs only, unless its ensemble term computes the others' shares
        at every step (they are kept per sample instead, ``_keeps_shares``); per-batch alternation reads all."""
        per_step_shares = self.ensemble_weight and not self._keeps_shares
        return None if self.alternation == "iteration" or per_step_shares else [self.stage(epoch)[0]]

    def _share(self, k, x):
        """Modality k's share of the ensemble term (B, K): g_k with ``ensemble_heads``, else its logits z_k."""
        return self.model.ensemble_modality(k, x) if self.ensemble_heads else self.model.forward_modality(k, x)

    @torch.no_grad()
    def _training_shares(self, k):
        """Modality k's share (N, K) on every training sample, in the data's order, in eval mode."""
        with eval_mode(self.model.modality_modules(k)):
            return torch.cat([self._share(k, xs[k]) for xs, _ in self.ctx.train_batches()])

    # ---- one step -----------------------------------------------------------------------
    def training_step(self, batch, step):
        xs, y = batch
        if self.alternation == "iteration":
            return {f"loss_{j}": self._step(j, xs, y) for j in self.cycle}
        j = self.stage(step.epoch)[0]
        return {f"loss_{j}": self._step(j, xs, y, getattr(batch, "extras", {}).get("index"))}

    def _step(self, j, xs, y, index=None):
        """One update of θ_j on the batch (xs, y): SAM's two passes (one pass between SAM steps when
        ``sam_every`` > 1), GM (the optimizer's pre-hook), the step. Returns the pass-1 loss."""
        opt = self.optimizers[j]
        objective = self._objective(j, xs, y, index)
        collector = self._collectors.get(j)        # records the first pass only: θ_j unperturbed

        def closure():
            nonlocal collector
            with collector or nullcontext():
                loss = objective(j)
            collector = None
            loss.backward()
            return loss
        if self.sam:
            loss = opt.step(closure)
        else:
            opt.zero_grad(set_to_none=True)
            loss = closure()
            opt.step()
        return loss.detach()

    @torch.no_grad()
    def _other_logits(self, j, xs, index=None):
        """Σ_{k≠j} of the other modalities' shares (B, K) (their ensemble heads' g_k with ``ensemble_heads``), in
        eval mode, without gradient: looked up by the batch's sample ``index`` (B,) when the stages keep them."""
        others = [k for k in self.cycle if k != j]
        if index is not None and self._keeps_shares:
            return sum(self._shares[k][index] for k in others)
        with eval_mode(*(self.model.modality_modules(k) for k in others)):
            return sum(self._share(k, xs[k]) for k in others)

    def _objective(self, j, xs, y, index=None):
        """j → the loss of θ_j on this mini-batch; the same mixup draw (and the same others' logits of
        ``ensemble_weight``) serves both SAM passes."""
        x = xs[j]
        if self.objective == "paper":
            if not self.ensemble_weight:
                return lambda j: F.cross_entropy(self.model.forward_modality(j, x), y)
            lam, others = self.ensemble_weight, self._other_logits(j, xs, index)
            if self.ensemble_heads:
                def two_heads_loss(j):
                    own, share = self.model.both_heads(j, x)
                    return (1 - lam) * F.cross_entropy(own, y) + lam * F.cross_entropy(share + others, y)
                return two_heads_loss

            def ensemble_loss(j):
                z = self.model.forward_modality(j, x)
                return (1 - lam) * F.cross_entropy(z, y) + lam * F.cross_entropy(z + others, y)
            return ensemble_loss
        lam = float(torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample())
        perm = torch.randperm(len(y)).to(y.device)
        mixed = lam * x + (1 - lam) * x[perm] if x.is_floating_point() else x
        w = self.flat_weight

        def loss(j):
            o = self.model.forward_modality(j, mixed)
            mix = lam * F.cross_entropy(o, y) + (1 - lam) * F.cross_entropy(o, y[perm])
            return (1 - w) * mix + w * F.cross_entropy(o, y)
        return loss

    def _feed(self, j):
        """Give j's GM hook T^(k) of its source k: paired by position from the output, where d_in agrees
        (no matrix when j is not among ``gm_into``)."""
        if not self.gm:
            return
        p = next(self.model.heads[j].parameters())
        k = self.source(j)
        layers, T, Z = self.layers[j], self.T[k], self.means[k]
        matrices = [None] * len(layers)
        paired = min(len(layers), len(T)) if j in self.targets else 0
        for i in range(1, paired + 1):                          # the i-th layer from the output
            d = input_dim(layers[-i])
            if T[-i].shape[0] == d:
                t = T[-i]
                if torch.equal(t, torch.eye(d, dtype=t.dtype, device=t.device)):   # e.g. k not trained yet
                    t = LowRankModification.identity(d)                          # ∇W · I = ∇W: no product
                elif self.gm_lowrank and Z is not None:
                    t = LowRankModification.from_means(Z[-i], self.tau, self.gm_tolerance)
                    t = t if 2 * t.rank < d else t.dense()          # else the d × d product is cheaper
                matrices[-i] = t.to(device=p.device, dtype=p.dtype)
        self.gm_hooks[j].matrices = matrices

    # ---- inference ------------------------------------------------------------------------
    def modality_logits(self, m, x):
        """(h_m logits, None), or with ``ensemble_heads`` (h_m logits, g_m logits): both heads from one pass."""
        return self.model.both_heads(m, x) if self.ensemble_heads else super().modality_logits(m, x)

    def logits(self, xs):
        """({m: h_m logits}, None), or with ``ensemble_heads`` ({m: h_m logits}, Σ_m g_m logits)."""
        if not self.ensemble_heads:
            return super().logits(xs)
        both = {m: self.modality_logits(m, xs[m]) for m in self.model.modalities}
        return {m: own for m, (own, _) in both.items()}, sum(share for _, share in both.values())

    @torch.no_grad()
    def predict_present(self, xs, present):
        if self.fusion != "model":
            return super().predict_present(xs, present)
        return F.softmax(self.model.fused_logits(xs, list(present)).float(), dim=-1)

    # ---- between stages ----------------------------------------------------------------
    def end_epoch(self, epoch):
        trained = self.trained_modalities(epoch)
        j = trained[0]
        logs = self._gm_logs(j, [self.gm_hooks[m] for m in trained] if self.gm else [])
        if self.alternation == "stage":
            logs = {"active": j, **logs}
        self._diagnose_steps(epoch, trained)
        recomputed = self._recomputed_after(epoch)
        if recomputed and self.gm_statistics == "steps":
            collectors, self._collectors = self._collectors, {}
            for c in collectors.values():
                c.all_reduce()             # each rank saw its own shard
            self._use_statistics(collectors, epoch)
        elif recomputed:
            self.recompute(recomputed, epoch)
        return logs

    def _recomputed_after(self, epoch):
        """The modalities whose T is recomputed at the end of loop epoch ``epoch``: those trained in it
        whose T a later stage reads (or the diagnostics record), at a stage's end, every r-th time."""
        if not self.gm:
            return []
        if self.alternation == "iteration":
            due = epoch % self.gm_refresh == 0 and (epoch + 1 < self.ctx.epochs_per_modality or self.diagnosis)
            return self._read_by_targets(self.cycle) if due else []
        j, _, last = self.stage(epoch)
        due = last and self._refresh_due(j, epoch) and self._read_later(j, epoch)
        return self._read_by_targets([j]) if due else []

    def _read_later(self, j, epoch):
        """Whether a stage after loop epoch ``epoch`` reads T^(j) (its successor's), or the diagnostics
        record every stage's spectra: the run's last T is never read, so it is not computed."""
        return self.diagnosis is not None or any(m == self.successor(j) for m, _, _ in self.plan[epoch + 1:])

    def _refresh_due(self, j, epoch):
        """Whether the stage of j ending with loop epoch ``epoch`` is its 1st, (r+1)-th, (2r+1)-th …"""
        ended = sum(m == j and within + 1 == length for m, within, length in self.plan[:epoch + 1])
        return (ended - 1) % self.gm_refresh == 0

    def _read_by_targets(self, modalities):
        """Those of ``modalities`` whose T a modality in ``gm_into`` reads (their successor)."""
        return [m for m in modalities if self.successor(m) in self.targets]

    def _diagnose_steps(self, epoch, trained):
        if self.diagnosis is not None:
            for j in trained:
                self.diagnosis.add_cosines(epoch + 1, j, self.source(j), self.gm_hooks[j])

    def _gm_logs(self, j, hooks):
        """How strongly T^(k) acted on j this epoch: how many of j's layers it rewrote, its mean
        eigenvalue tr(T)/d and ‖T − I‖_F (means over the GM layers), and the mean relative change
        ‖∇W·T − ∇W‖/‖∇W‖ it made to the gradients."""
        if not self.gm:
            return {}
        k = self.source(j)
        stats = self._stats(k)
        logs = {"gm_source": k, "gm_layers": sum(t is not None for t in self.gm_hooks[j].matrices),
                "gm_T_mean_eig": sum(s["mean_eig"] for s in stats) / len(stats),
                "gm_T_dist_identity": sum(s["dist_identity"] for s in stats) / len(stats)}
        changes = [c for hook in hooks for c in hook.changes]
        if changes:
            logs["gm_grad_rel_change"] = float(torch.stack(changes).mean())
        return logs

    def _stats(self, m):
        """matrix_stats of each T^(m), computed once per set of matrices."""
        cached, stats = self._stats_cache.get(m, ((), None))
        if len(cached) != len(self.T[m]) or any(a is not b for a, b in zip(cached, self.T[m])):
            stats = [matrix_stats(t) for t in self.T[m]]
            self._stats_cache[m] = (list(self.T[m]), stats)     # holds the matrices it describes
        return stats

    @torch.no_grad()
    def recompute(self, modalities, epoch=None):
        """T^(m) for each m in ``modalities`` from one eval pass over the training data (after loop
        epoch ``epoch``, which the diagnostics record)."""
        collectors = {m: InputCovariance(self.layers[m]) for m in modalities}
        with eval_mode(self.model), ExitStack() as stack:
            for c in collectors.values():
                stack.enter_context(c)
            order = None if self.gm_batches == "data" else (epoch or 0)
            for xs, _ in self.ctx.train_batches(shuffle=order):
                for m in modalities:
                    self.model.forward_modality(m, xs[m])
        self._use_statistics(collectors, epoch)

    def _use_statistics(self, collectors, epoch=None):
        """T^(m) from each collector {m: InputCovariance}, handed to the GM hooks that read it."""
        for m, c in collectors.items():
            self.means[m] = [c.factor(i) for i in range(len(self.layers[m]))]
            self.T[m] = c.flat_matrices(self.tau)
            if self.diagnosis is not None and epoch is not None:
                names = {id(mod): name for name, mod in self.model.named_modules()}
                self.diagnosis.add_spectra(epoch + 1, m, [names[id(l)] for l in self.layers[m]], self.means[m])
        self._feed_successors(list(collectors))

    def use_matrices(self, T):
        """Set T^(m) = ``T[m]`` (one float64 matrix per GM layer of m) for every m in ``T`` and give
        them to the GM hooks that read them, as given (not in low rank: they come from no batch means,
        so a resumed run, which rebuilds T from the means, starts them from I)."""
        self.T.update(T)
        self.means.update({m: None for m in T})
        self._feed_successors(list(T))

    def _feed_successors(self, modalities):
        for m in modalities:
            self._feed(self.successor(m))

    # ---- the run folder -----------------------------------------------------------------
    def write_files(self, out_dir, final):
        if self.diagnosis is not None:
            self.diagnosis.write(out_dir, final)

    def keep_model(self, epoch):
        return self.stage_checkpoints and (self.alternation == "iteration" or self.stage(epoch)[2])

    # ---- resume -----------------------------------------------------------------------
    def state_dict(self):
        state = {"optimizers": {m: o.state_dict() for m, o in self.optimizers.items()},
                 "means": {m: None if z is None else [a.clone() for a in z] for m, z in self.means.items()}}
        if self.diagnosis is not None:
            state["diagnostics"] = self.diagnosis.state_dict()
        return state

    def load_state_dict(self, state):
        for m, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][m])
        if self.diagnosis is not None and "diagnostics" in state:
            self.diagnosis.load_state_dict(state["diagnostics"])
        # T is rebuilt from the factors Z (d × n, n ≤ 2d + one batch's columns)
        self.means = {m: None if z is None else list(z) for m, z in state["means"].items()}
        self.T = {m: ([torch.eye(input_dim(l), dtype=torch.float64) for l in self.layers[m]] if z is None
                      else [flat_modification_from_means(a, self.tau) for a in z])
                  for m, z in self.means.items()}
        self._feed_successors(self.cycle)
