"""How a trained model holds up when modalities are missing or noisy at test time (``mie eval
--missing / --drop / --noise``).

The model is the checkpoint chosen on clean validation; only the evaluated split's inputs are
damaged, and the split is read once per setting:

missing r   in every modality at once, each unit is erased independently with probability r (the
            protocol of LNLN, Zhang, Wang, Yu, NeurIPS 2024; Haoyu-ha/LNLN): the elements of a
            feature vector (D,); the time steps of a sequence (C, L); the last-axis columns of a
            (C, H, W) input (the time steps of mie's (1, F, T) spectrograms); the frames of a clip
            (C, T, H, W); the tokens of text (2, L) [ids; mask], replaced by the tokenizer's [UNK]
            while the first token ([CLS]), the last attended one ([SEP]) and padding are kept.
            Erased values are 0: for array data, standardised on the training split, the training mean.
drop M      modality M (or several together) removed: every unit erased — the model is not told —
            and, side by side, the fused prediction over the present modalities only
            (``Method.predict_present``: the model is told, as a deployed system would be), for every
            method whose prediction is a fusion of per-modality predictions.
noise σ     N(0, σ²) added to every element of every real-valued input (in the units the model
            reads: standard deviations for array data); token ids are left unchanged.

Masks and noise come from a generator seeded with ``mask_seed`` for each setting and drawn in the
loader's fixed order, so every model evaluated with the same seed meets the same damage. At r = 0
(and σ = 0) nothing is drawn and the metrics are the clean ones, bit for bit.
"""
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import MieInputError
from .io import csv_text, write_text
from .metrics import accuracy, classification_metrics, macro_f1
from .models.encoders import encoder_options
from .train import predict_all

TEXT_ENCODERS = {"minilm", "bert", "clip_text"}
DEFAULT_RATES = tuple(round(0.1 * i, 1) for i in range(10))      # 0, 0.1, …, 0.9 (LNLN)


@dataclass(frozen=True)
class Corruption:
    kind: str                 # "clean" | "missing" | "noise" | "drop"
    level: float = 0.0        # r for missing, σ for noise
    removed: tuple = ()       # the modalities a "drop" removes

    @property
    def label(self):
        if self.kind == "drop":
            return "drop " + "+".join(self.removed)
        return "clean" if self.kind == "clean" else f"{self.kind} {self.level:g}"


def parse_levels(text, what):
    """'0:0.9:0.1' (start:stop:step, stop included) or '0,0.5,1' → a tuple of floats ≥ 0."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = int(round((stop - start) / step))
            levels = tuple(round(start + i * step, 10) for i in range(n + 1))
        else:
            levels = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MieInputError(f"{what} must be START:STOP:STEP or comma-separated numbers, got '{text}'") from None
    if not levels or any(v < 0 for v in levels):
        raise MieInputError(f"{what} must be numbers >= 0, got '{text}'")
    return levels


def erase(x, rate, generator, unk_id=None):
    """``x`` (B, *shape) with each sample's units erased independently with probability ``rate``
    (see the module docstring for the unit of each layout); ``unk_id`` for token inputs."""
    if rate == 0:
        return x
    b = x.shape[0]
    if unk_id is not None:                                # (B, 2, L) [ids; mask]
        ids, mask = x[:, 0], x[:, 1]
        hit = torch.rand(ids.shape, generator=generator) < rate
        lengths = mask.sum(dim=1, keepdim=True)
        position = torch.arange(ids.shape[1]).expand_as(ids)
        keep = (position == 0) | (position == lengths - 1) | (mask == 0)
        hit = hit.to(x.device) & ~keep.to(x.device)
        return torch.stack([ids.masked_fill(hit, unk_id), mask], dim=1)
    if x.ndim == 2:                                       # (B, D): elements
        shape = x.shape
    elif x.ndim in (3, 4):                                # (B, C, L) time steps; (B, C, H, W) columns
        shape = (b,) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    elif x.ndim == 5:                                     # (B, C, T, H, W): frames
        shape = (b, 1, x.shape[2], 1, 1)
    else:
        raise MieInputError(f"cannot erase parts of inputs of shape {tuple(x.shape[1:])}")
    hit = (torch.rand(shape, generator=generator) < rate).to(x.device)
    return x.masked_fill(hit, 0)


def add_noise(x, sigma, generator):
    """``x`` + N(0, σ²) for real-valued inputs; integer inputs (token ids) unchanged."""
    if sigma == 0 or not x.is_floating_point():
        return x
    return x + sigma * torch.randn(x.shape, generator=generator).to(x.device, x.dtype)


def unknown_token_ids(spec):
    """{m: the [UNK] id of modality m's tokenizer} for text modalities (read from the tokenizer the
    encoder was built from)."""
    ids = {}
    for m in spec.modalities:
        name, options = encoder_options(spec.encoders[m], m)
        if name in TEXT_ENCODERS:
            from .models.text import load_tokenizer
            path = options.get("path") or {"bert": "bert-base-uncased"}.get(name)
            if name == "clip_text" and path is None:
                raise MieInputError(f"modality {m}: the clip_text encoder's path is needed to read its tokenizer")
            ids[m] = load_tokenizer(path).unk_token_id
    return ids


def corrupted_predict(method, corruption, generator, unk_ids):
    """A ``predict(xs)`` that damages ``xs`` by ``corruption`` before ``method.predict``."""
    def predict(xs):
        if corruption.kind == "missing":
            xs = {m: erase(x, corruption.level, generator, unk_ids.get(m)) for m, x in xs.items()}
        elif corruption.kind == "noise":
            xs = {m: add_noise(x, corruption.level, generator) for m, x in xs.items()}
        elif corruption.kind == "drop":
            xs = {m: erase(x, 1.0, generator, unk_ids.get(m)) if m in corruption.removed else x
                  for m, x in xs.items()}
        return method.predict(xs)
    return predict


def evaluate_corruption(method, data_loader, device, corruption, mask_seed=0, unk_ids=None):
    """One row: fused and per-modality metrics of ``method`` on the damaged split; for a "drop", also
    ``told_accuracy``/``told_macro_f1`` of the fusion over the present modalities (None when the
    method's prediction is not a fusion of per-modality predictions)."""
    modalities = method.model.modalities
    generator = torch.Generator().manual_seed(mask_seed)
    predict = corrupted_predict(method, corruption, generator, unk_ids or {})
    fused, per, y = predict_all(predict, method.model, data_loader, device, modalities)
    metrics = classification_metrics(fused, per, y)
    row = {"setting": corruption.label, "kind": corruption.kind, "level": corruption.level,
           "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
    row.update({f"acc_{m}": v["accuracy"] for m, v in metrics["per_modality"].items()})
    if corruption.kind == "drop":
        present = [m for m in modalities if m not in corruption.removed]
        told = _told(method, data_loader, device, present, corruption, generator, unk_ids or {})
        row["told_accuracy"] = None if told is None else accuracy(told, y)
        row["told_macro_f1"] = None if told is None else macro_f1(told, y)
    return row


def _told(method, data_loader, device, present, corruption, generator, unk_ids):
    """Fused probabilities (N, K) over ``present`` alone, or None when the method cannot fuse a subset."""
    from .models import eval_mode
    from .train import to_device
    out = []
    with torch.no_grad(), eval_mode(method.model):
        for batch in data_loader:
            xs, _ = to_device(batch, device, method.model.modalities)
            xs = {m: erase(x, 1.0, generator, unk_ids.get(m)) if m in corruption.removed else x
                  for m, x in xs.items()}
            probs = method.predict_present(xs, present)
            if probs is None:
                return None
            out.append(probs.float().cpu())
    return torch.cat(out).numpy()


def robustness_rows(method, data_loader, device, rates=(), drops=(), noises=(), mask_seed=0, unk_ids=None):
    """Rows for every missing rate, every dropped set and every noise level, each followed by the
    mean over its levels ("missing mean", "noise mean")."""
    for removed in drops:
        unknown = [m for m in removed if m not in method.model.modalities]
        if unknown or len(removed) >= len(method.model.modalities):
            raise MieInputError(f"--drop {','.join(removed)}: name some but not all of the model's modalities "
                                f"({', '.join(method.model.modalities)})")
    rows = []
    for kind, levels in (("missing", rates), ("noise", noises)):
        mine = [evaluate_corruption(method, data_loader, device, Corruption(kind, float(v)), mask_seed, unk_ids)
                for v in levels]
        if len(mine) > 1:
            mine.append(mean_row(mine, kind))
        rows += mine
    rows += [evaluate_corruption(method, data_loader, device, Corruption("drop", removed=tuple(r)), mask_seed,
                                 unk_ids) for r in drops]
    return rows


def mean_row(rows, kind):
    """The mean over levels of every metric column of ``rows``."""
    keys = [k for k in rows[0] if k == "accuracy" or k == "macro_f1" or k.startswith("acc_")]
    return {"setting": f"{kind} mean", "kind": f"{kind} mean", "level": None,
            **{k: statistics.fmean(r[k] for r in rows) for k in keys}}


def robustness_markdown(rows, modalities, title):
    """One Markdown table of ``rows``; – where a value does not apply."""
    told = any("told_accuracy" in r for r in rows)
    header = ["setting", "fused acc", "fused macro-F1"] + [f"acc {m}" for m in modalities]
    header += ["told fused acc (present modalities)"] if told else []
    fmt = lambda v: "–" if v is None else f"{v:.4f}"
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["setting"], fmt(r["accuracy"]), fmt(r["macro_f1"])] + [fmt(r.get(f"acc_{m}")) for m in modalities]
        if told:
            cells.append(fmt(r.get("told_accuracy")) if r["kind"] == "drop" else "–")
        bold = "**" if r["kind"].endswith("mean") else ""
        lines.append("| " + " | ".join(f"{bold}{c}{bold}" if c != "–" else c for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_rates(rows, modalities, path, title):
    """Fused and per-modality accuracy against the missing rate r, as a PNG at ``path``."""
    from .plots import pyplot, save_figure
    plt = pyplot()
    points = [r for r in rows if r["kind"] == "missing"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    levels = [r["level"] for r in points]
    ax.plot(levels, [r["accuracy"] for r in points], "o-", color="black", label="fused")
    for m in modalities:
        ax.plot(levels, [r[f"acc_{m}"] for r in points], ".--", label=f"{m} alone")
    ax.set_xlabel("missing rate r (each unit erased with probability r)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_report(rows, modalities, out_dir, title, plot_title):
    """robustness.csv, robustness.md (headed by ``title``) and, with missing rates when matplotlib is
    installed, robustness.png (``plot_title``) in ``out_dir``, each written atomically. Returns the
    Markdown and a note (or None)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MieInputError(f"--out {out} is a file; expected a folder for the robustness report")
    text = robustness_markdown(rows, modalities, title)
    write_text(out / "robustness.csv", csv_text(rows))
    write_text(out / "robustness.md", text)
    note = None
    if sum(r["kind"] == "missing" for r in rows) > 1:
        from .plots import missing_extra
        note = missing_extra()
        if note is None:
            plot_rates(rows, modalities, out / "robustness.png", plot_title)
    return text, note


def mean_missing_accuracy(rows):
    """The fused accuracy averaged over the missing rates of ``rows``."""
    values = [r["accuracy"] for r in rows if r["kind"] == "missing"]
    return float(np.mean(values)) if values else None
