"""OPM + OGM — prediction and gradient modulation together.

Wei, Hu, Du, Wen: "On-the-fly Modulation for Balanced Multimodal Learning", TPAMI 2024
(code: GeWu-Lab/BML_TPAMI2024, ``code/main.py`` run with both ``--use_adam_drop`` and
``--use_modulation``; main:N and Cls:N cite ``code/main.py`` and ``code/models/Classifier.py``).

One step, with z_u = h_u(φ_u(x_u)) on the undropped features and the batch's ratios ρ_u computed
once from them (``mie.methods.ogm_ge``: s_u = Σ_i softmax(z_u,i)[y_i], ρ_u = s_u / mean_{v≠u} s_v;
the code computes the OGM coefficients from the same undropped scores that set q, main:93, 119):

    feed-forward (OPM, ``mie.methods.opm``):
        q_u = clip(q_base·(1 + λ·tanh(relu(ρ_u − 1))), 0, 1) for ρ_u > 1, else 0
        with probability p_exe:  f̃_u,i = κ_u,i · φ_u(x_u,i) / (1 − θ),  κ_u,i ~ Bernoulli(1 − q_u),
        θ = mean_u q_u (``rescale="shared"``, the code; "modality" is ours)
        L = CE(Σ_u h_u(f̃_u), y)
    back-propagation (OGM-GE, main:116-169):
        k_u = 1 − tanh(α·ρ_u) for ρ_u > 1, else 1          (``ratio_offset`` 0; 1 is ours)
        g ← k_u · g + ε,  ε ~ N(0, (std(g) + 1e-8)²)   for every selected gradient g of encoder φ_u

Windows (loop epochs, 0-based, end excluded): OPM acts in ``modulation_starts <= epoch <
modulation_ends``; OGM in the same window and before ``ogm_ends``. Defaults from the code: both
skip the warm-up epochs 0-5 (main:91, 95, 116), OPM then acts to the end (nothing bounds it) and OGM
while ``modulation_starts <= epoch <= modulation_ends`` with the argparse default 80 (main:47, 154):
``modulation_starts=6``, ``modulation_ends=None``, ``ogm_ends=81``. The code's OGM defaults to the
GE variant (``--modulation OGM_GE``, main:36), as here (``ge="off"`` gives OPM + plain OGM).
Defaults: q_base = 0.5, λ = 0.5, p_exe = 0.7 (main:42-44, ``train_opm.sh``); α = 0.8 (``train_ogm.sh``;
main:45's argparse default is 1.0 and no script runs the combination); ``scope`` the codes' conv
kernels (see OGM-GE for the generalisation to other encoders, ours); inference ``fusion`` "model":
softmax(Σ_u z_u).
"""
from ..errors import MieInputError
from .ogm_ge import OGM_PARAMS, apply_ogm, scope_notices, window_notice
from .opm import OPM
from .params import Param, number


class OPMOGM(OPM):
    name = "opm_ogm"
    params = {**OPM.params, **OGM_PARAMS,
              "ogm_ends": Param(81, number(at_least=1, integer=True, optional=True),
                                "first loop epoch in which OGM no longer acts (None: OPM's window end); "
                                "81 = the released code's inclusive --modulation_ends 80")}

    @classmethod
    def check_params(cls, values):
        super().check_params(values)
        ends, starts = values.get("ogm_ends"), values.get("modulation_starts", 0)
        if ends is not None and ends <= starts:
            raise MieInputError(f"ogm_ends must be None or an epoch index > modulation_starts ({starts}), got {ends}")

    def ogm_active(self, step):
        return self.active(step) and (self.ogm_ends is None or step.epoch < self.ogm_ends)

    def notices(self):
        epochs = self.num_epochs(self.ctx.epochs_per_modality)
        ends = self.modulation_ends if self.ogm_ends is None else (
            self.ogm_ends if self.modulation_ends is None else min(self.ogm_ends, self.modulation_ends))
        lines = [window_notice("OPM", self.modulation_starts, self.modulation_ends, epochs),
                 window_notice("OGM", self.modulation_starts, ends, epochs)]
        return [line for line in lines if line] + scope_notices(self.model, self.scope)

    def after_backward(self, ratios, step):
        return apply_ogm(self.model, ratios, self.alpha, self.ratio_offset, self.ge, self.scope, self.generator,
                         self.ogm_active(step))
