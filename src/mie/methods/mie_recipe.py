"""The recommended MIE recipe (``mie_recipe``): MIE with two changes of ours, chosen on the
development suite (configs/suite; the evidence is in docs/recipe.md and docs/fusion.md).

- Each stage of modality j trains on (1 − λ) CE(z_j, y) + λ CE(z_j + Σ_{k≠j} z_k, y), the other
  modalities' logits fixed (``ensemble_weight`` = λ, default 0.5): MIE's heads, trained apart,
  err on the same samples; the ensemble term makes each one add what the others lack.
- The heads are fused in log space (``fusion="log"``: softmax of the mean log-probabilities, the
  summed logits' argmax), the rule the ensemble term trains for.

Everything else is the paper's MIE (SAM, GM, stages, the budget); ``mie`` stays the paper's method.
Both settings remain parameters, so ``mie tune`` searches λ with τ, ρ and the learning rate.
"""
from .base import fusion_param
from .mie import MIE
from .params import Param, Space, number


class MIERecipe(MIE):
    name = "mie_recipe"
    params = {**MIE.params,
              "fusion": fusion_param("log"),
              "ensemble_weight": Param(0.5, number(at_least=0, at_most=1),
                                       "λ: weight of the ensemble loss CE(z_j + Σ z_k) in j's stage",
                                       Space("float", 0.0, 1.0))}
