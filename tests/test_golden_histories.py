"""Behaviour pinned: every registered method, trained on UCI mfeat (pix + zer) for 3 epochs per
modality with one torch thread and dropout off, reproduces the history.csv rows and test metrics
recorded in tests/golden/histories.json (``scripts/golden_histories.py`` wrote them; re-record
only for a deliberate change of behaviour, and say which in the commit).

Against the code before the method interface was redesigned, the interface alone changed no value
to 1e-6 in 18 of 21 methods (``mie_released``: evaluation no longer draws from the global random
state its mixup uses; ``greedy``: columns that repeated the loop's accuracies are gone; ``ogr_gb``:
losses from the loop's evaluation). The recording now also holds the baselines made faithful to
their papers and released code (joint on summed logits, OGM-GE, OPM, Greedy, AGM, PMR, DOMFN, MSLR,
MSES, OGR-GB; ``pmr_per`` is new); MIE and its ablations, MLA and the feature-fusion joints are
unchanged since the redesign. The histories gained the validation losses (``val_loss``,
``val_loss_<m>``) as columns, every other value unchanged; the newer methods (M-SAM, MNL, MILES,
CGGM, ReconBoost, SMV, MMPareto) were recorded as implemented. MIE's covariance pass now takes shuffled
batches as the released code does (``gm_batches``), re-recorded for mie, mie_gm_only, mie_released and
mie_recipe; the speed work before it (cheaper covariance hooks, ``gm_refresh``) changed no value.
All were re-recorded once more when the recording pinned its numerics to CPU-independent kernels
(``MKL_CBWR=COMPATIBLE``, ``ATEN_CPU_CAPABILITY=default``); before that, the values held only on CPUs
with the recording machine's vector units. ``mie_recipe_heads`` and ``mie_fast`` were recorded as implemented; ``mie_fast`` again when it
took ``gm_tolerance`` 1e-3 (its zer losses moved by up to 1e-4, no choice changed). Since
ties in the validation score go to the lower validation loss, ``mie_released`` (a tie at epochs 5
and 6) chooses epoch 6; no other method's choice changed.

Four methods still round differently on another x86-64 CPU under the pinned kernels: MKL's LAPACK
eigenvalues (MLA's spectrum ratio) and the ratios of small loss differences (OGR-GB's weights, PMR's
prototype terms) move by 1e-6–1e-5, and OGR-GB and PMR turn that into different choices within 3
epochs. Their histories as an Intel Xeon (Sapphire Rapids) computes them are kept in
tests/golden/other_cpus/ (``scripts/golden_histories.py --methods mla,ogr_gb,pmr,pmr_per --out
tests/golden/other_cpus/NAME.json``); a history passes when it matches the recording or one of
these, to 1e-6."""
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "histories.json").read_text())
OTHER_CPUS = [json.loads(p.read_text()) for p in sorted((ROOT / "tests" / "golden" / "other_cpus").glob("*.json"))]


@pytest.fixture(scope="module")
def recomputed(tmp_path_factory):
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the histories were recorded with x86-64 kernels (MKL, ATen's baseline); another CPU family "
                    "rounds differently")
    """Every method's history, recomputed by the recording script in a process of its own (its numerics
    are pinned when torch starts, so the bits do not depend on the CPU's vector units)."""
    out = tmp_path_factory.mktemp("golden") / "histories.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "golden_histories.py"), "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True)
    return json.loads(out.read_text())


def _same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return (isinstance(a, (int, float)) and isinstance(b, (int, float))
                and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9))
    return a == b


def _differences(expected, got, where=""):
    if isinstance(expected, dict) and isinstance(got, dict):
        out = [f"{where}: columns {sorted(set(expected) ^ set(got))}"] if set(expected) != set(got) else []
        return out + [d for k in expected if k in got for d in _differences(expected[k], got[k], f"{where}.{k}")]
    if isinstance(expected, list) and isinstance(got, list):
        out = [f"{where}: {len(expected)} rows, got {len(got)}"] if len(expected) != len(got) else []
        return out + [d for i, (e, g) in enumerate(zip(expected, got)) for d in _differences(e, g, f"{where}[{i}]")]
    return [] if _same(expected, got) else [f"{where}: {expected!r} → {got!r}"]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_method_reproduces_its_recorded_history(name, recomputed):
    got = recomputed[name]
    differences = _differences(GOLDEN[name], got, name)
    if differences and any(not _differences(other[name], got, name) for other in OTHER_CPUS if name in other):
        return
    assert not differences, "\n".join(differences[:20])


def test_every_registered_method_is_recorded():
    from mie.methods import METHODS
    assert sorted(GOLDEN) == sorted(METHODS)
