"""OPM + OGM — prediction and gradient modulation together.

Wei, Hu, Du, Wen: "On-the-fly Modulation for Balanced Multimodal Learning", TPAMI 2024
(code: GeWu-Lab/BML_TPAMI2024, ``main.py`` with both ``--use_adam_drop`` and ``--use_modulation``).

One step, with z_u = h_u(φ_u(x_u)) on the undropped features and the batch's ratios ρ_u computed
once from them (``mie.methods.ogm_ge``: s_u = Σ_i softmax(z_u,i)[y_i], ρ_u = s_u / mean_{v≠u} s_v):

    feed-forward (OPM, ``mie.methods.opm``):
        q_u = clip(q_base·(1 + λ·tanh(relu(ρ_u − 1))), 0, 1) for ρ_u > 1, else 0
        with probability p_exe:  f̃_u,i = κ_u,i · φ_u(x_u,i) / (1 − q_u),  κ_u,i ~ Bernoulli(1 − q_u)
        L = CE(Σ_u h_u(f̃_u), y)
    back-propagation (OGM-GE):
        k_u = 1 − tanh(α·relu(ρ_u − c)) for ρ_u > 1, else 1
        g ← k_u · g + ε,  ε ~ N(0, (std(g) + 1e-8)²)   for every gradient g of encoder φ_u

Both act only in loop epochs ``modulation_starts <= epoch < modulation_ends``. The released code
computes the OGM coefficients from the same undropped scores that set q, and its OGM defaults to
the GE variant (``--modulation OGM_GE``), as here (``ge="off"`` gives OPM + plain OGM).
Defaults: q_base = 0.5, λ = 0.5, p_exe = 0.7 (``train_opm.sh``), α = 0.8 (``train_ogm.sh``);
``ratio_offset``, ``ge``, ``scope``, ``rescale`` and the inference ``fusion`` ("model": softmax(Σ_u z_u))
as documented in OGM-GE and OPM.
"""
from .ogm_ge import OGM_PARAMS, apply_ogm
from .opm import OPM


class OPMOGM(OPM):
    name = "opm_ogm"
    params = {**OPM.params, **OGM_PARAMS}

    def after_backward(self, ratios, step):
        return apply_ogm(self.model, ratios, self.alpha, self.ratio_offset, self.ge, self.scope, self.generator,
                         self.active(step))
