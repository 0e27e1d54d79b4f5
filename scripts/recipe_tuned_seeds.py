"""Re-run each method's tuned settings from the suite tuning (docs/recipe_suite_tie.md, "Best parameters
found by each task's tuning", as printed there: 3 significant digits) over more seeds, on the tunings'
split (data.split_seed 0), paired with `mie_recipe_heads`; writes OUT/<task>/results.md.

    python scripts/recipe_tuned_seeds.py [--tasks mfeat_pix_zer,mfeat_fac_mor,mfeat_all_views] [--seeds 0-9] [--out runs/tuned10]
"""
import argparse

from mie import config as config_mod
from mie.compare import compare

TUNED = {
    "mfeat_pix_zer": {"joint": {"train.lr": 0.00117, "train.weight_decay": 0.000116},
                      "alternating": {"train.lr": 0.00117, "train.weight_decay": 0.000116},
                      "mie_recipe_heads": {"ensemble_weight": 0.5, "rho": 0.05, "tau": 0.4,
                                           "train.lr": 0.001, "train.weight_decay": 0.0001}},
    "mfeat_fac_mor": {"joint": {"train.lr": 0.00117, "train.weight_decay": 0.00574},
                      "alternating": {"train.lr": 0.001, "train.weight_decay": 0.0001},
                      "mie_recipe_heads": {"ensemble_weight": 0.365, "rho": 0.164, "tau": 0.761,
                                           "train.lr": 0.00109, "train.weight_decay": 0.000168}},
    "mfeat_all_views": {"joint": {"train.lr": 0.00311, "train.weight_decay": 0.00494},
                        "alternating": {"train.lr": 0.00884, "train.weight_decay": 2.81e-05},
                        "mie_recipe_heads": {"ensemble_weight": 0.591, "rho": 0.245, "tau": 0.0838,
                                             "train.lr": 0.00884, "train.weight_decay": 1.04e-06}},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TUNED))
    parser.add_argument("--seeds", default="0-9", help="first-last")
    parser.add_argument("--out", default="runs/tuned10")
    args = parser.parse_args()
    first, last = (int(s) for s in args.seeds.split("-"))
    for task in args.tasks.split(","):
        cfg = config_mod.build_config(f"configs/suite/{task}.yaml", ["data.split_seed=0", "train.threads=1"])
        compare(cfg, list(TUNED[task]), list(range(first, last + 1)), f"{args.out}/{task}",
                reference="mie_recipe_heads", method_settings=TUNED[task], progress=False,
                command=f"python scripts/recipe_tuned_seeds.py --tasks {task} --seeds {args.seeds} --out {args.out}")


if __name__ == "__main__":
    main()
