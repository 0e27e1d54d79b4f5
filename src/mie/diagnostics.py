"""GM diagnostics of the MIE family (``method.diagnostics=true``), written into the run folder.

- ``gm_spectra.csv``: one row per recomputation of T^(m) and GM layer of m: the loop epoch after
  which it was computed, the modality m, the layer (its index among m's GM layers, its module name),
  d_in, the largest and mean eigenvalue of Ȳ (``cov_max``, ``cov_mean``) and of T (``T_max``,
  ``T_mean``), and ``damped``: the number of directions T damps by more than 1% (eigenvalue < 0.99).
- ``gm_spectra.npz``: the spectra themselves: ``<m>.<layer>.cov``, Ȳ's eigenvalues ascending, and
  ``<m>.<layer>.T``, T's eigenvalue for each of these directions (so descending), both
  (recomputations × d_in), and ``<m>.<layer>.epoch`` (recomputations,).
- ``gm_cosine.csv``: per loop epoch and trained modality j (GM source k): the steps GM rewrote and
  the mean over them of cos(g, g′) between j's gradient before (g) and after (g′) GM, over the
  rewritten weights (``cos_rewritten``) and over all of j's parameters (``cos_all``).
- ``gm_diagnostics.png``, drawn after the last epoch from these files' numbers.

The cosines are summed on the gradients' device during the epoch and read once at its end.
"""
import sys

import numpy as np

from .io import atomic_path, csv_text, write_text
from .optim.flat import covariance_eigenvalues, flat_eigenvalues

DAMPED_BELOW = 0.99     # an eigenvalue of T below this damps its direction by more than 1%


def spectrum_stats(cov, sigma):
    """The statistics of Ȳ's eigenvalues ``cov`` and T's ``sigma`` (array-likes of d values)."""
    cov, sigma = np.asarray(cov, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    return {"cov_max": float(cov.max()), "cov_mean": float(cov.mean()), "T_max": float(sigma.max()),
            "T_mean": float(sigma.mean()), "damped": int((sigma < DAMPED_BELOW).sum())}


class GMDiagnostics:
    """The records of one run; ``tau`` is the run's τ."""

    def __init__(self, tau):
        self.tau = tau
        self.cosines, self.rows, self.spectra = [], [], {}    # spectra: "<m>.<layer>" → [(epoch, λ, σ)]

    def add_cosines(self, epoch, j, k, hook):
        """Record and reset the cosine sums of j's ``GradientModification`` hook (one device read)."""
        if hook.steps:
            cos = (hook.cosines / hook.steps).tolist()
            self.cosines.append({"epoch": epoch, "modality": j, "source": k, "steps": hook.steps,
                                 "cos_rewritten": cos[0], "cos_all": cos[1]})
        hook.cosines, hook.steps = None, 0

    def add_spectra(self, epoch, m, names, factors):
        """Record the spectra of Ȳ = Z Zᵀ and of T for each GM layer of m (``names``, factors Z)."""
        for i, (name, Z) in enumerate(zip(names, factors)):
            lam = covariance_eigenvalues(Z)
            sigma = flat_eigenvalues(lam, self.tau)
            self.rows.append({"epoch": epoch, "modality": m, "layer": i, "name": name, "d_in": len(lam),
                              **spectrum_stats(lam, sigma)})
            self.spectra.setdefault(f"{m}.{i}", []).append((epoch, lam.cpu().numpy(), sigma.cpu().numpy()))

    def write(self, out_dir, final):
        """The CSV and npz files in ``out_dir``; the figure too when ``final``."""
        if self.cosines:
            write_text(out_dir / "gm_cosine.csv", csv_text(self.cosines))
        if self.rows:
            write_text(out_dir / "gm_spectra.csv", csv_text(self.rows))
            arrays = {}
            for key, events in self.spectra.items():
                arrays[f"{key}.epoch"] = np.array([e for e, _, _ in events])
                arrays[f"{key}.cov"] = np.stack([lam for _, lam, _ in events])
                arrays[f"{key}.T"] = np.stack([sigma for _, _, sigma in events])
            with atomic_path(out_dir / "gm_spectra.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)
        if final and (self.cosines or self.rows):
            from .plots import missing_extra, save_figure
            note = missing_extra()
            if note:
                print(f"mie: note: {note}", file=sys.stderr)
            else:
                save_figure(self.figure(), out_dir / "gm_diagnostics.png")

    def figure(self):
        """Cosines per epoch; T's mean eigenvalue and damped share per recomputation; Ȳ's last spectra."""
        from .plots import pyplot
        plt = pyplot()
        fig, (cos_ax, t_ax, cov_ax) = plt.subplots(1, 3, figsize=(14, 3.8))
        modalities = list(dict.fromkeys([r["modality"] for r in self.cosines] + [r["modality"] for r in self.rows]))
        color = {m: f"C{i}" for i, m in enumerate(modalities)}
        for m in modalities:
            mine = [r for r in self.cosines if r["modality"] == m]
            if mine:
                epochs = [r["epoch"] for r in mine]
                cos_ax.plot(epochs, [r["cos_rewritten"] for r in mine], "o-", ms=3, color=color[m],
                            label=f"{m}: rewritten weights")
                cos_ax.plot(epochs, [r["cos_all"] for r in mine], "x--", ms=4, color=color[m],
                            label=f"{m}: all its parameters")
        cos_ax.set(xlabel="loop epoch", ylabel="cos(g, g′)")
        cos_ax.set_title("gradient before vs after GM (mean over the epoch's steps)", fontsize=9)
        styles = ["-", ":", "-.", (0, (5, 1)), (0, (1, 3))]
        for key in self.spectra:
            m, layer = key.rsplit(".", 1)
            mine = [r for r in self.rows if r["modality"] == m and r["layer"] == int(layer)]
            epochs = [r["epoch"] for r in mine]
            ls = styles[int(layer) % len(styles)]
            t_ax.plot(epochs, [r["T_mean"] for r in mine], "o", ls=ls, ms=3, color=color[m],
                      label=f"T^({m}) layer {layer}: mean eigenvalue")
            t_ax.plot(epochs, [r["damped"] / r["d_in"] for r in mine], "s", ls=ls, ms=3, color=color[m], alpha=0.5,
                      label=f"T^({m}) layer {layer}: share damped > 1%")
            _, lam, _ = self.spectra[key][-1]
            lam = np.sort(lam)[::-1]
            if lam[0] > 0:
                shown = lam[lam > 0] / lam[0]
                cov_ax.semilogy(np.arange(1, len(shown) + 1), shown, ls=ls, color=color[m],
                                label=f"Ȳ^({m}) layer {layer} (d_in {len(lam)})")
        t_ax.set(xlabel="loop epoch of the recomputation", ylim=(0, 1.05))
        t_ax.set_title(f"T (τ = {self.tau:g}): mean eigenvalue, share damped > 1%", fontsize=9)
        cov_ax.set(xlabel="eigenvalue rank", ylabel="λ / λ_max")
        cov_ax.set_title("spectrum of Ȳ at its last recomputation", fontsize=9)
        for ax in (cos_ax, t_ax, cov_ax):
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=5 if ax is t_ax else 6, ncol=2 if ax is t_ax else 1)
        return fig

    def state_dict(self):
        return {"cosines": list(self.cosines), "rows": list(self.rows),
                "spectra": {k: list(v) for k, v in self.spectra.items()}}

    def load_state_dict(self, state):
        self.cosines, self.rows = list(state["cosines"]), list(state["rows"])
        self.spectra = {k: list(v) for k, v in state["spectra"].items()}
