"""Method registry: ``create_method("mie", tau=0.4)``; ``METHODS`` maps each name to its class and
fixed settings. A method is one file; registering it here is all the training loop needs."""
from ..errors import MieInputError
from .agm import AGM
from .base import Batch, Method, Step
from .cggm import CGGM
from .domfn import DOMFN
from .greedy import Greedy
from .joint import Joint
from .mie import MIE
from .mie_recipe import MIERecipe, MIERecipeHeads
from .miles import MILES
from .mla import MLA
from .mmpareto import MMPareto
from .mnl import MNL
from .msam import MSAM
from .mses import MSES
from .mslr import MSLR
from .ogr_gb import GradientBlending
from .ogm_ge import OGMGE
from .opm import OPM
from .opm_ogm import OPMOGM
from .pmr import PMR
from .reconboost import ReconBoost
from .smv import SMV
from .unimodal import Unimodal

# name → (class, fixed hyper-parameters, one-line description)
METHODS = {
    "joint": (Joint, {}, "joint training, late fusion: one cross-entropy on the sum of the per-modality logits"),
    "joint_concat": (Joint, {"feature_fusion": "concat"}, "joint training, concatenated features → one shared head"),
    "joint_sum": (Joint, {"feature_fusion": "sum"}, "joint training, summed features → one shared head"),
    "unimodal": (Unimodal, {}, "one modality alone (pass --modalities NAME)"),
    "mie": (MIE, {}, "MIE: alternating unimodal stages + SAM + flat gradient modification"),
    "mie_sam_only": (MIE, {"gm": False}, "MIE ablation: alternating stages + SAM, no GM"),
    "mie_gm_only": (MIE, {"sam": False}, "MIE ablation: alternating stages + GM, no SAM"),
    "mie_released": (MIE, {"objective": "released"}, "MIE trained on the released code's objective: mixup CE + "
                                                      "clean-label CE (opt-in; the default is the paper's objective)"),
    "mie_fast": (MIE, {"sam_every": 8, "gm_statistics": "steps", "gm_lowrank": True, "gm_tolerance": 1e-3},
                 "MIE at a lower cost (ours): SAM on every 8th step of a modality, Ȳ from the training steps "
                 "(no covariance pass), T applied at low rank over the directions it damps by more than 0.1% "
                 "(README, Speed)"),
    "alternating": (MIE, {"sam": False, "gm": False}, "plain alternating unimodal training (no SAM, no GM)"),
    "mie_recipe": (MIERecipe, {}, "the recommended MIE recipe: MIE whose stages also fit the ensemble "
                                  "(ensemble_weight 0.5), heads fused in log space (docs/recipe.md)"),
    "mie_recipe_heads": (MIERecipeHeads, {}, "the MIE recipe with a second head per modality for the ensemble "
                                             "term and the fused prediction; each modality's own head stays its own"),
    "ogm_ge": (OGMGE, {}, "OGM-GE: dominant encoder's weight gradients × (1 − tanh(α·ρ)) for ρ > 1, + Gaussian noise (GE)"),
    "ogm": (OGMGE, {"ge": "off"}, "OGM: gradient modulation without the GE noise"),
    "opm": (OPM, {}, "OPM: drop the dominant modality's features with probability q in the forward pass"),
    "opm_ogm": (OPMOGM, {}, "OPM + OGM-GE together (Wei et al. TPAMI'24)"),
    "mla": (MLA, {}, "MLA: shared head, per-batch alternation, OWM projection of head gradients, entropy fusion"),
    "agm": (AGM, {}, "AGM: Shapley mono-modal responses, adaptive per-modality gradient scaling"),
    "pmr": (PMR, {}, "PMR: class prototypes, α × prototype loss for the slower modality, concat fusion (2 modalities)"),
    "pmr_per": (PMR, {"rule": "clip", "per": True}, "PMR with the weight α·clip(ρ−1, 0, 1) and the prototypical entropy "
                                                    "regularisation of the faster modality (ours, after BalanceBenchmark)"),
    "mslr": (MSLR, {}, "MSLR: additive late fusion, one learning rate per modality set from its validation accuracy"),
    "mses": (MSES, {}, "MSES: unimodal + fused heads; a modality stops when its smoothed validation loss has not "
                       "improved for more than `patience` epochs, back to its best weights"),
    "ogr_gb": (GradientBlending, {}, "OGR-GB: Σ_k w_k·CE over unimodal and fused heads, w_k ∝ |ΔG_k|/ΔO_k² from copies "
                                     "trained n epochs per output"),
    "greedy": (Greedy, {}, "Greedy (Wu et al. ICML'22): conditional learning speed; re-balancing steps replace the "
                           "slower branch's excitation by its running mean"),
    "domfn": (DOMFN, {}, "DOMFN (Yang et al. MM'22): fuse a sample only when no unimodal prediction diverges from "
                         "the fused one (2 modalities) or the mean one (3+), as the authors' two codes"),
    "mnl": (MNL, {}, "MNL (Gong et al. NeurIPS'25): per sample, the modality with the larger margin and target "
                     "confidence guides the other on its non-target classes; mean-logit late fusion (2 modalities)"),
    "mnl_released": (MNL, {"objective": "released"}, "MNL with the released code's loss (adds the guided modality's "
                                                     "target CE on guided samples)"),
    "msam": (MSAM, {}, "M-SAM (Nowdeh et al. NeurIPS'25): per-batch Shapley weights ν of modality-subset accuracies; "
                       "SAM on the dominant modality's share ν_d·ℓ, plain gradient on (1−ν_d)·ℓ"),
    "miles": (MILES, {}, "MILES (Guerra-Manzanares & Shamout IJCNN'25): the dominant modality's learning rate × μ when "
                         "its conditional-utilisation gap exceeds τ; concat fusion head + unimodal heads (2 modalities)"),
    "miles_sum": (MILES, {"feature_fusion": "sum"}, "MILES with the summed-feature fusion head (paper Table III)"),
    "reconboost": (ReconBoost, {}, "ReconBoost (Hua et al. ICML'24): round-robin stages; f_m = shared head ∘ φ_m on a "
                                   "(w1 − w2·q_y)/C-weighted CE against the others' ensemble, then CE on β Σ f_m"),
    "smv": (SMV, {"level": "sample"}, "SMV (Wei et al. CVPR'24): Shapley valuation of each training sample after "
                                      "warm-up; next epoch adds copies keeping only its low-contributing modality"),
    "smv_modality": (SMV, {"level": "modality"}, "SMV, modality level: copies keeping the larger-gap modality, as many "
                                                 "as the mean Shapley gap on part of train says (2 modalities)"),
    "mmpareto": (MMPareto, {}, "MMPareto (Wei & Hu ICML'24): per encoder, the min-norm mix of the multimodal and "
                               "unimodal gradients when they conflict, magnitude γ·max(‖g_sum‖/‖d‖, 1) per tensor"),
    "cggm": (CGGM, {}, "CGGM (Guo et al. NeurIPS'24): auxiliary classifiers on detached features; encoder i's "
                       "gradients × ρ·B_i from batch-accuracy gains; direction term on the fused output layer"),
    "cggm_clipped": (CGGM, {"coeff_clip": 1.0}, "CGGM with each B_i clamped into [0, 1] (ours)"),
}


def method_params(name):
    """The hyper-parameters a user may set for method ``name``, with their defaults."""
    cls, fixed, _ = _lookup(name)
    hidden = set(fixed) | cls.unused_params(fixed)
    return {k: p.default for k, p in cls.params.items() if k not in hidden}


def spaces(name):
    """{parameter: ``Space``} that ``mie tune`` searches for method ``name`` by default: the declared
    spaces of the parameters a user may set (``name``'s fixed settings, and what they leave unused, excluded)."""
    params = _lookup(name)[0].params
    return {k: params[k].space for k in method_params(name) if params[k].space is not None}


def create_method(name, **params):
    """Instantiate method ``name`` with hyper-parameters ``params``, each checked against what its
    ``Param`` accepts (unknown ones are an error)."""
    cls, fixed, _ = _lookup(name)
    allowed = method_params(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise MieInputError(f"unknown parameter(s) {', '.join(unknown)} for method '{name}'; "
                            f"expected some of: {', '.join(sorted(allowed)) or '(none)'}")
    method = cls(**{**params, **fixed})
    method.name = name
    return method


def _lookup(name):
    if name not in METHODS:
        raise MieInputError(f"unknown method '{name}'; expected one of: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["Method", "Step", "Batch", "METHODS", "create_method", "method_params", "spaces"]
