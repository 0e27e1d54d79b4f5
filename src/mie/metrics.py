"""Classification metrics: accuracy, macro-F1, MAP (mean over classes of average precision),
log loss, and each modality's own accuracy and loss, so that imbalance between modalities is visible."""
import numpy as np
from sklearn.metrics import average_precision_score, f1_score


def accuracy(probs, y):
    """probs (N, K), y (N,) → fraction of argmax predictions equal to y."""
    return float(np.mean(np.argmax(probs, axis=1) == y))


def macro_f1(probs, y):
    """Mean F1 over the classes that occur in y or in the predictions."""
    return float(f1_score(y, np.argmax(probs, axis=1), average="macro", zero_division=0))


def mean_average_precision(probs, y):
    """Mean over the classes present in y of the average precision of ranking by probs[:, c]."""
    present = np.unique(y)
    return float(np.mean([average_precision_score(y == c, probs[:, c]) for c in present]))


def log_loss(probs, y):
    """Mean over samples of −log p[y] (float64; p floored at 1e-12): the cross-entropy of a prediction."""
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(y)), y]
    return float(np.mean(-np.log(np.maximum(p, 1e-12))))


def classification_metrics(fused, per_modality, y):
    """fused (N, K) probabilities, per_modality {m: (N, K)}, y (N,) → the metrics dict of a run."""
    return {"accuracy": accuracy(fused, y),
            "macro_f1": macro_f1(fused, y),
            "map": mean_average_precision(fused, y),
            "loss": log_loss(fused, y),
            "per_modality": {m: {"accuracy": accuracy(p, y), "macro_f1": macro_f1(p, y), "loss": log_loss(p, y)}
                             for m, p in per_modality.items()},
            "n": int(len(y))}
