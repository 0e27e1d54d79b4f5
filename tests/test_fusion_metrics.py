"""Late-fusion rules (mie.models.fusion) and classification metrics (mie.metrics) by hand."""
import numpy as np
import pytest
import torch

from mie.errors import MieInputError
from mie.metrics import accuracy, classification_metrics, macro_f1, mean_average_precision
from mie.models import entropy_weights, fuse

# (m=3 modalities, B=2 samples, K=3 classes). Sample 0 is dominated by modality 0 (confident),
# sample 1 by modality 2; modality 1 is in between for both.
PROBS = np.array([
    [[0.90, 0.05, 0.05], [0.34, 0.33, 0.33]],
    [[0.50, 0.30, 0.20], [0.20, 0.50, 0.30]],
    [[0.33, 0.33, 0.34], [0.05, 0.05, 0.90]],
])


def _entropy(p):
    return -(p * np.log(p)).sum(axis=-1)


def _softmax(z, axis):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _hand_weights():
    w = np.zeros((3, 2))
    for b in range(2):                     # per sample, softmax over the modalities of −H_m
        H = np.array([_entropy(PROBS[m, b]) for m in range(3)])
        e = np.exp(-H)
        w[:, b] = e / e.sum()
    return w


def test_entropy_weights_per_sample():
    w = entropy_weights(torch.tensor(PROBS))
    assert tuple(w.shape) == (3, 2)
    expected = _hand_weights()
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-10, atol=1e-12)
    # the dominant modality differs between the samples
    assert np.argmax(w.numpy()[:, 0]) == 0 and np.argmax(w.numpy()[:, 1]) == 2
    np.testing.assert_allclose(w.numpy().sum(axis=0), [1.0, 1.0], atol=1e-12)

    # the variants MLA's released code / a careless port would compute are clearly different
    H = _entropy(PROBS)                                            # (m, B)
    wrong_axis = _softmax(-H, axis=1)                              # softmax over the batch
    per_batch = np.repeat(_softmax(-H.mean(axis=1), axis=0)[:, None], 2, axis=1)
    plus_sign = _softmax(H, axis=0)
    for wrong in (wrong_axis, per_batch, plus_sign):
        assert np.abs(wrong - expected).max() > 0.02


def test_weight_fusion():
    fused = fuse(torch.tensor(PROBS), "weight")
    assert tuple(fused.shape) == (2, 3)
    w = _hand_weights()
    expected = np.stack([sum(w[m, b] * PROBS[m, b] for m in range(3)) for b in range(2)])
    np.testing.assert_allclose(fused.numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fused.numpy().sum(axis=1), [1.0, 1.0], atol=1e-12)
    # per-sample weighting makes each sample follow its own confident modality
    assert fused.numpy()[0].argmax() == 0 and fused.numpy()[1].argmax() == 2


def test_average_fusion():
    fused = fuse(torch.tensor(PROBS), "average")
    expected = (PROBS[0] + PROBS[1] + PROBS[2]) / 3
    np.testing.assert_allclose(fused.numpy(), expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(fuse(torch.tensor(PROBS)), fused)          # average is the default


def test_unknown_fusion_rule_raises():
    with pytest.raises(MieInputError):
        fuse(torch.tensor(PROBS), "max")


# ---- metrics -------------------------------------------------------------------------------

Y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 1])
FUSED = np.array([               # distinct scores in every column (no ties)
    [0.70, 0.20, 0.10],          # y0 → 0 ✓
    [0.15, 0.60, 0.25],          # y1 → 1 ✓
    [0.25, 0.35, 0.40],          # y2 → 2 ✓
    [0.30, 0.45, 0.26],          # y0 → 1 ✗
    [0.50, 0.40, 0.11],          # y1 → 0 ✗
    [0.05, 0.15, 0.80],          # y2 → 2 ✓
    [0.55, 0.12, 0.33],          # y0 → 0 ✓
    [0.20, 0.42, 0.38],          # y1 → 1 ✓
    [0.36, 0.30, 0.34],          # y2 → 0 ✗
    [0.10, 0.58, 0.32],          # y1 → 1 ✓
])
MOD_A = np.eye(3)[[0, 1, 2, 0, 0, 0, 0, 1, 2, 2]] * 0.8 + 0.2 / 3     # 7 / 10 right
MOD_B = np.eye(3)[[1, 1, 1, 1, 1, 1, 1, 1, 1, 1]] * 0.8 + 0.2 / 3     # 4 / 10 right


def _hand_ap(labels, scores):
    """Average precision: mean over the positives of the precision at their rank (no ties)."""
    order = np.argsort(-scores)
    hits = labels[order].astype(float)
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / hits.sum())


def _hand_macro_f1(y, pred, k):
    f1s = []
    for c in range(k):
        tp = np.sum((pred == c) & (y == c))
        fp = np.sum((pred == c) & (y != c))
        fn = np.sum((pred != c) & (y == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def test_hand_ap_helper_on_known_numbers():
    # ranking + - + - : precisions at the positives 1/1 and 2/3 → AP = 5/6
    assert _hand_ap(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx(5 / 6)


def test_classification_metrics_by_hand():
    got = classification_metrics(FUSED, {"a": MOD_A, "b": MOD_B}, Y)
    pred = FUSED.argmax(axis=1)

    assert got["accuracy"] == pytest.approx(7 / 10)
    # per class: 0: tp2 fp2 fn1 → 4/7; 1: tp3 fp1 fn1 → 6/8; 2: tp2 fp0 fn1 → 4/5
    assert got["macro_f1"] == pytest.approx((4 / 7 + 6 / 8 + 4 / 5) / 3)
    assert got["macro_f1"] == pytest.approx(_hand_macro_f1(Y, pred, 3))
    expected_map = np.mean([_hand_ap(Y == c, FUSED[:, c]) for c in range(3)])
    assert got["map"] == pytest.approx(expected_map, rel=1e-12)
    # MAP is not the accuracy, nor the AP of a single class, nor a micro-averaged AP
    assert abs(expected_map - 0.7) > 1e-3
    micro = _hand_ap(np.eye(3)[Y].reshape(-1), FUSED.reshape(-1))
    assert abs(expected_map - micro) > 1e-3

    assert got["per_modality"]["a"]["accuracy"] == pytest.approx(7 / 10)
    assert got["per_modality"]["b"]["accuracy"] == pytest.approx(4 / 10)
    assert got["per_modality"]["a"]["macro_f1"] == pytest.approx(_hand_macro_f1(Y, MOD_A.argmax(1), 3))
    assert got["per_modality"]["b"]["macro_f1"] == pytest.approx(_hand_macro_f1(Y, MOD_B.argmax(1), 3))
    assert got["n"] == 10

    assert accuracy(FUSED, Y) == pytest.approx(0.7)
    assert macro_f1(FUSED, Y) == pytest.approx((4 / 7 + 6 / 8 + 4 / 5) / 3)


def test_map_is_mean_over_present_classes():
    # 4 classes in the model's output, class 3 never occurs in y
    probs = np.array([
        [0.60, 0.10, 0.20, 0.10],
        [0.20, 0.50, 0.10, 0.20],
        [0.30, 0.20, 0.15, 0.35],
        [0.10, 0.40, 0.30, 0.20],
        [0.25, 0.05, 0.45, 0.25],
    ])
    y = np.array([0, 1, 0, 2, 1])
    expected = np.mean([_hand_ap(y == c, probs[:, c]) for c in (0, 1, 2)])
    # class 0: scores .6(+) .3(+) .25 .2 .1 → AP 1; class 1: .5(+) .4 .2 .1 .05(+) → (1 + 2/5)/2 = .7
    # class 2: .45 .3(+) .2 .15 .1 → 1/2
    assert expected == pytest.approx((1.0 + 0.7 + 0.5) / 3)
    assert mean_average_precision(probs, y) == pytest.approx(expected, rel=1e-12)
    assert classification_metrics(probs, {}, y)["map"] == pytest.approx(expected, rel=1e-12)


def test_macro_f1_averages_over_classes_that_occur():
    # class 3 exists in the model's output but neither in y nor in the predictions
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]])
    assert macro_f1(probs, np.array([0, 1, 2])) == 1.0
    # a class predicted but absent from y counts (F1 = 0), as a wrong prediction should
    assert macro_f1(probs, np.array([0, 1, 1])) == pytest.approx((1 + 2 / 3 + 0) / 3)
