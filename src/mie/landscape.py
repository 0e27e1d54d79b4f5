"""Filter-normalised 2-D loss surfaces around a checkpoint (``mie landscape``).

Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018,
following their code (github.com/tomgoldstein/loss-landscape at 64ef4d5, ``net_plotter.py``) with the settings
its README uses for 2-D contours (``--dir_type weights --xnorm filter --xignore biasbn``):

- two directions d1, d2, each a Gaussian tensor per parameter of the model, in the order of
  ``model.parameters()`` (``get_random_weights``, l. 68-73; d1 is drawn whole, then d2). They come from
  a generator seeded with ``seed`` alone, so two checkpoints of one architecture get the same
  directions before normalisation;
- filter normalisation (``normalize_direction``, l. 108-112): for every parameter with two or more
  dimensions, each filter (a row of a Linear weight, an output channel of a convolution: the slice
  along the first dimension) is rescaled to d_i ← d_i / (‖d_i‖ + 1e-10) · ‖θ_i‖;
- every parameter with one dimension or less — biases, BatchNorm / LayerNorm scales and shifts —
  gets a zero direction (``ignore='biasbn'``, ``normalize_directions_for_weights`` l. 137-140);
  running statistics are buffers and are never moved (``dir_type='weights'``);
- the loss at θ* + a·d1 + b·d2 is evaluated with the model in eval mode, without gradients
  (``evaluation.eval_loss``, l. 31-33), on the training split by default (``plot_surface.py`` l. 289).

One pair of directions spans all the model's parameters. Modality m's loss (−log of its own
prediction of the label, its head alone) depends only on the parameters its prediction passes through — its
encoder and head, and any module shared with other modalities — so its surface is the surface along
the components of d1, d2 on those parameters; the fused loss (−log of the method's fused probability
of the label, floored at 1e-12 as ``mie eval``'s loss) moves every parameter. All the losses come
from the same forward passes.

Sharpness figure: the mean (and max) increase of each loss over ``CIRCLE`` equally spaced points on
the circle √(a² + b²) = r of the plane, relative to the loss at the checkpoint (a = b = 0).
"""
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from .errors import MieInputError
from .io import atomic_path, csv_text, write_text
from .models import eval_mode
from .train import loader, to_device

CIRCLE = 16
CACHE_BYTES = 1 << 30


def parse_grid(text):
    """'MIN:MAX:NUM' → NUM equally spaced coordinates from MIN to MAX (NUM ≥ 2, MIN < MAX)."""
    parts = str(text).split(":")
    try:
        low, high, num = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (ValueError, IndexError):
        raise MieInputError(f"--grid must be MIN:MAX:NUM, e.g. --grid=-1:1:21, got '{text}'") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high and num >= 2):
        raise MieInputError(f"--grid {text}: needs finite MIN < MAX and NUM ≥ 2 points")
    return np.linspace(low, high, num)


def check_radius(radius):
    if not (radius > 0 and math.isfinite(radius)):
        raise MieInputError(f"--radius must be a positive number, got {radius}")


def output_folder(out_dir, checkpoint):
    """``out_dir``, or the run's ``landscape`` folder beside ``checkpoints/``; refused when it is a file."""
    if out_dir is None:
        path = Path(checkpoint)
        out_dir = (path.parent.parent if path.parent.name == "checkpoints" else path.parent) / "landscape"
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MieInputError(f"--out {out} is a file; expected a folder for the landscape")
    return out


def gaussian_directions(model, seed):
    """Two lists (d1, d2) of standard Gaussian float32 CPU tensors shaped like ``model.parameters()``,
    drawn from ``seed`` alone (the same for every model of one architecture)."""
    generator = torch.Generator().manual_seed(int(seed))
    shapes = [p.shape for p in model.parameters()]
    return tuple([torch.randn(s, generator=generator) for s in shapes] for _ in range(2))


def filter_normalize(direction, weights):
    """Li et al.'s filter normalisation with biases and norm parameters ignored: for each tensor pair,
    d (F, ...) → each filter d_i · ‖w_i‖ / (‖d_i‖ + 1e-10); a d with ≤ 1 dimension → zeros."""
    out = []
    for d, w in zip(direction, weights):
        if d.dim() <= 1:
            out.append(torch.zeros_like(d))
            continue
        w = w.detach().to(device=d.device, dtype=d.dtype)
        scale = w.flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + 1e-10)
        out.append(d * scale.view(-1, *([1] * (d.dim() - 1))))
    return out


def landscape_directions(model, seed):
    """The filter-normalised (d1, d2) of ``model`` for ``seed``, on its parameters' devices and dtypes."""
    params = list(model.parameters())
    return tuple([d.to(device=p.device, dtype=p.dtype) for d, p in zip(filter_normalize(raw, params), params)]
                 for raw in gaussian_directions(model, seed))


def circle_points(radius):
    """(CIRCLE, 2) points (a, b) equally spaced on the circle of ``radius``, the first at (radius, 0)."""
    angles = 2 * np.pi * np.arange(CIRCLE) / CIRCLE
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


class CachedBatches:
    """The batches of ``data_loader`` on ``device``, iterated again and again; after the first pass they
    are kept in memory when their inputs total at most ``CACHE_BYTES``, else read anew each pass."""

    def __init__(self, data_loader, device, modalities):
        self.data_loader, self.device, self.modalities = data_loader, device, modalities
        self.kept = None

    def __iter__(self):
        if self.kept is not None:
            yield from self.kept
            return
        kept, size = [], 0
        for batch in self.data_loader:
            batch = to_device(batch, self.device, self.modalities)
            if kept is not None:
                size += sum(x.nelement() * x.element_size() for x in batch.inputs.values())
                kept = kept + [batch] if size <= CACHE_BYTES else None
            yield batch
        self.kept = kept


@torch.no_grad()
def point_losses(method, data_loader, device, points, directions):
    """Losses and accuracies (P, M + 1) at each (a, b) of ``points`` (P, 2): columns are the model's
    modalities (each one's own prediction) then the fused prediction; loss −log p[y] with p floored
    at 1e-12, as ``mie eval`` computes it. The model is in eval mode throughout; its weights and buffers are given back
    bit-exactly afterwards, also when this raises."""
    model = method.model
    modalities = list(model.modalities)
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    d1, d2 = directions
    batches = CachedBatches(data_loader, device, modalities)
    losses = np.zeros((len(points), len(modalities) + 1))
    correct = np.zeros_like(losses)
    n = 0
    try:
        with eval_mode(model):
            for i, (a, b) in enumerate(points):
                for p, w, u, v in zip(params, theta, d1, d2):
                    p.copy_(w + float(a) * u + float(b) * v)
                n = 0
                for xs, y in batches:
                    fused, per = method.predict(xs)
                    for j, probs in enumerate([per[m] for m in modalities] + [fused]):
                        p_true = probs.double().gather(1, y[:, None]).squeeze(1).clamp_min(1e-12)
                        losses[i, j] += -p_true.log().sum().item()
                        correct[i, j] += (probs.argmax(dim=1) == y).sum().item()
                    n += len(y)
    finally:
        model.load_state_dict(saved)
    return losses / n, correct / n


def subsample(data_loader, samples, seed):
    """A loader over ``samples`` (≥ 1) indices of ``data_loader``'s dataset drawn without replacement from
    ``seed`` (in dataset order), or the loader itself when ``samples`` is None or ≥ its size."""
    size = len(data_loader.dataset)
    if samples is None or samples >= size:
        return data_loader
    idx = np.sort(np.random.default_rng(seed).choice(size, samples, replace=False))
    return loader(Subset(data_loader.dataset, idx.tolist()), data_loader.batch_size,
                  num_workers=data_loader.num_workers)


def surface(method, data_loader, device, coords, seed=0, radius=0.5):
    """The landscape of ``method.model`` on the grid ``coords`` (A,) × ``coords`` along the directions
    of ``seed``: {"names" (L,) = modalities + ["fused"], "a", "b" (A,), "loss", "accuracy" (L, A, A)
    with [l, i, j] at (a_i, b_j), "origin_loss", "origin_accuracy" (L,), "circle" (CIRCLE, 2),
    "circle_loss" (L, CIRCLE), "radius", "n"}."""
    check_radius(radius)
    coords = np.asarray(coords, dtype=np.float64)
    directions = landscape_directions(method.model, seed)
    circle = circle_points(radius)
    grid = np.stack(np.meshgrid(coords, coords, indexing="ij"), axis=-1).reshape(-1, 2)
    points = np.concatenate([[[0.0, 0.0]], circle, grid])
    losses, accuracy = point_losses(method, data_loader, device, points, directions)
    shape = (-1, len(coords), len(coords))
    return {"names": list(method.model.modalities) + ["fused"], "a": coords, "b": coords.copy(),
            "loss": losses[1 + CIRCLE:].T.reshape(shape), "accuracy": accuracy[1 + CIRCLE:].T.reshape(shape),
            "origin_loss": losses[0], "origin_accuracy": accuracy[0], "circle": circle,
            "circle_loss": losses[1:1 + CIRCLE].T, "radius": float(radius), "n": len(data_loader.dataset)}


def summary_rows(result):
    """One row per loss: its value and accuracy at the checkpoint, the grid's minimum, and the mean and
    max increase over the circle of radius r (the sharpness figure)."""
    rows = []
    for l, name in enumerate(result["names"]):
        increase = result["circle_loss"][l] - result["origin_loss"][l]
        rows.append({"loss": name, "origin_loss": float(result["origin_loss"][l]),
                     "origin_accuracy": float(result["origin_accuracy"][l]),
                     "grid_min_loss": float(result["loss"][l].min()), "radius": result["radius"],
                     "mean_increase": float(increase.mean()), "max_increase": float(increase.max())})
    return rows


def summary_markdown(rows, title):
    lines = [title, "",
             f"| loss | at checkpoint | accuracy | grid minimum | mean increase at r = {rows[0]['radius']:g} "
             "| max increase |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['loss']} | {r['origin_loss']:.4f} | {r['origin_accuracy']:.4f} | {r['grid_min_loss']:.4f} "
              f"| {r['mean_increase']:.4f} | {r['max_increase']:.4f} |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_surfaces(result, path, title):
    """One filled-contour panel per loss (geometric levels, so the basin stays visible next to the
    steep edges), the checkpoint marked, the circle of the sharpness figure dashed."""
    from .plots import pyplot, save_figure
    plt = pyplot()
    names = result["names"]
    from matplotlib.colors import BoundaryNorm
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.2), squeeze=False, layout="constrained")
    a, b = result["a"], result["b"]
    for l, (ax, name, z) in enumerate(zip(axes[0], names, result["loss"])):
        low, high = max(float(z.min()), 1e-4), max(float(z.max()), 1e-4)
        levels = np.geomspace(low, high * (1 + 1e-6), 16) if high > low * (1 + 1e-4) else np.array([low, low * 1.01])
        norm = BoundaryNorm(levels, 256)
        filled = ax.contourf(a, b, z.T, levels=levels, norm=norm, cmap="viridis")
        ax.contour(a, b, z.T, levels=levels, colors="white", linewidths=0.4, alpha=0.6)
        fig.colorbar(filled, ax=ax, format="%.3g", shrink=0.85).set_label("cross-entropy")
        ax.plot(0, 0, marker="*", color="red", markersize=9)
        ax.add_patch(plt.Circle((0, 0), result["radius"], fill=False, linestyle="--", color="red", linewidth=0.8))
        ax.set_title(f"{name}: {result['origin_loss'][l]:.3g} at the checkpoint")
        ax.set_xlabel("a (direction d1)")
        ax.set_aspect("equal")
    axes[0][0].set_ylabel("b (direction d2)")
    fig.suptitle(title)
    save_figure(fig, path)


def write_landscape(result, out_dir, title, plot_title, meta):
    """landscape.npz (the raw grid and ``meta``), landscape.csv, landscape.md (headed by ``title``) and,
    when matplotlib is installed, landscape.png in ``out_dir``, each written atomically. Returns the
    Markdown and a note (or None)."""
    out = Path(out_dir)
    rows = summary_rows(result)
    with atomic_path(out / "landscape.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, names=np.array(result["names"]), a=result["a"], b=result["b"], loss=result["loss"],
                 accuracy=result["accuracy"], origin_loss=result["origin_loss"],
                 origin_accuracy=result["origin_accuracy"], circle=result["circle"],
                 circle_loss=result["circle_loss"], radius=result["radius"], **meta)
    text = summary_markdown(rows, title)
    write_text(out / "landscape.csv", csv_text(rows))
    write_text(out / "landscape.md", text)
    from .plots import missing_extra
    note = missing_extra()
    if note is None:
        plot_surfaces(result, out / "landscape.png", plot_title)
    return text, note


def loss_landscape(checkpoint, data=None, split="train", grid="-1:1:21", seed=0, samples=None, radius=0.5,
                   device="auto", root=None, out_dir=None):
    """``surface`` of a saved model on ``split`` of ``data`` (default: the data it was trained on; see
    ``mie.evaluate.load_for_evaluation``), written to ``out_dir`` (default: the run's ``landscape``
    folder). Returns (the result dict, Markdown, a note or None)."""
    from .evaluate import load_for_evaluation
    coords = parse_grid(grid)
    if samples is not None and samples < 1:
        raise MieInputError(f"--samples must be at least 1, got {samples}")
    check_radius(radius)
    out_dir = output_folder(out_dir, checkpoint)
    method, data_loader, dev, ckpt = load_for_evaluation(checkpoint, data, split, device, root)
    data_loader = subsample(data_loader, samples, seed)
    result = surface(method, data_loader, dev, coords, seed, radius)
    cfg = ckpt["config"]
    name, run_seed = cfg["method"]["name"], cfg["train"]["seed"]
    data_name = cfg["data"]["dataset"] or "your data"
    test_note = (" This reads the test split: an analysis only, never a basis for choosing anything."
                 if split == "test" else "")
    title = (f"Loss landscape of {name} (seed {run_seed}, checkpoint of epoch {ckpt['epoch']}) on {result['n']} "
             f"samples of the {split} split of {data_name}: filter-normalised random directions d1, d2 "
             f"(seed {seed}; biases and norm parameters fixed), grid {coords[0]:g}..{coords[-1]:g} × "
             f"{len(coords)} per axis; increases over {CIRCLE} points on the circle of radius "
             f"{result['radius']:g}.{test_note}")
    meta = {"checkpoint": str(checkpoint), "split": split, "direction_seed": int(seed), "samples": result["n"]}
    text, note = write_landscape(result, out_dir, title,
                                 f"{name} (seed {run_seed}) on {data_name}, {split}; directions seed {seed}", meta)
    return result, text, note
