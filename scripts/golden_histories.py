"""Write tests/golden/histories.json: every registered method's history.csv rows and test metrics on
UCI mfeat (pix + zer), 3 epochs per modality, one torch thread, dropout off (so that the numbers
depend on the training arithmetic alone). tests/test_golden_histories.py checks that the code
still produces them; re-run this script only for a deliberate change of behaviour, and say so.

The arithmetic is pinned to kernels that give the same bits on every x86-64 CPU: MKL's conditional
numerical reproducibility (``MKL_CBWR=COMPATIBLE``) and ATen's baseline kernels
(``ATEN_CPU_CAPABILITY=default``). Without them, the AVX2 and AVX-512 kernels round differently and
methods with a discrete choice in their update (AGM, MILES, OGR-GB, ReconBoost, ...) turn the 1e-7
difference into 1e-2 within 3 epochs. Both are read when torch starts, so this script must run in a
process of its own.

    python scripts/golden_histories.py [--out tests/golden/histories.json] [--methods a,b (update only these)]

Where a method still rounds differently on another CPU, ``--methods NAME --out
tests/golden/other_cpus/CPU.json`` keeps that CPU's values beside the recording (see the test).
"""
import argparse
import json
import os
from pathlib import Path

PINNED_NUMERICS = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default"}
os.environ.update(PINNED_NUMERICS)      # before torch is imported

import mie  # noqa: E402
from mie.methods import METHODS  # noqa: E402

# Settings that make each method's own mechanism act within 3 epochs.
PARAMS = {
    "ogr_gb": {"blend_every": 1},
    "mses": {"patience": 0},
    "mslr": {"history": 1},
    "greedy": {"warmup_epochs": 0, "alpha": 0.001},
    "opm": {"modulation_starts": 0},
    "opm_ogm": {"modulation_starts": 0},
    "pmr": {},
    "pmr_per": {},
    "smv": {"warmup": 1},
    "smv_modality": {"warmup": 1},
    "miles": {"tau": 0.0},
    "miles_sum": {"tau": 0.0},
}


def config(name):
    mods = ["pix"] if name == "unimodal" else ["pix", "zer"]
    enc = {m: {"name": "mlp", "dropout": 0.0} for m in mods}
    return {"data": {"dataset": "mfeat", "modalities": mods},
            "model": {"dim": 32, "head_hidden": [32, 16], "encoders": enc},
            "train": {"epochs": 3, "batch_size": 64, "threads": 1, "seed": 0},
            "method": {"name": name, **PARAMS.get(name, {})}}


def golden(name):
    rows = []
    result = mie.fit(config=config(name), callbacks=[lambda epoch, row: rows.append(dict(row))], progress=False)
    for row in rows:
        row.pop("seconds", None)
    return {"history": rows, "test": result["test"], "val": result["val"], "best_epoch": result["best_epoch"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="tests/golden/histories.json")
    p.add_argument("--methods")
    args = p.parse_args()
    names = args.methods.split(",") if args.methods else list(METHODS)
    path = Path(args.out)
    out = json.loads(path.read_text()) if args.methods and path.exists() else {}   # --methods: update those
    out.update({name: golden(name) for name in names})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
