"""Classification metrics: accuracy, macro-F1, MAP (mean over classes of average precision),
log loss, and each modality's own accuracy and loss, so that imbalance between modalities is visible."""
import numpy as np


def accuracy(probs, y):
    """probs (N, K), y (N,) → fraction of argmax predictions equal to y."""
    return float(np.mean(np.argmax(probs, axis=1) == y))


def macro_f1(probs, y):
    """Mean over the classes that occur in y or in the predictions of F1 = 2TP / (2TP + FP + FN)
    (0 for a class with no TP, FP or FN; sklearn's f1_score(average="macro", zero_division=0))."""
    pred = np.argmax(probs, axis=1)
    classes = np.union1d(y, pred)
    tp = np.array([np.sum((pred == c) & (y == c)) for c in classes])
    fp = np.array([np.sum((pred == c) & (y != c)) for c in classes])
    fn = np.array([np.sum((pred != c) & (y == c)) for c in classes])
    denominator = 2 * tp + fp + fn
    return float(np.mean(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)))


def average_precision(positive, scores):
    """AP = Σ_n (R_n − R_{n−1}) P_n over the distinct score thresholds, from the highest (sklearn's
    average_precision_score): positive (N,) bool, scores (N,)."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, positive = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]     # the last index of each threshold
    tp = np.cumsum(positive, dtype=np.float64)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(probs, y):
    """Mean over the classes present in y of the average precision of ranking by probs[:, c]."""
    return float(np.mean([average_precision(y == c, probs[:, c]) for c in np.unique(y)]))


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
