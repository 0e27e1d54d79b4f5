"""The metrics equal scikit-learn's definitions (macro-F1 with zero_division=0, average precision over
distinct thresholds), on random predictions with and without tied scores."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score

from mie.metrics import macro_f1, mean_average_precision


@pytest.mark.parametrize("ties", [False, True])
def test_macro_f1_and_map_equal_sklearn(ties):
    rng = np.random.default_rng(1)
    for _ in range(100):
        n, k = int(rng.integers(2, 150)), int(rng.integers(2, 8))
        probs = rng.random((n, k))
        probs = np.round(probs, 1) if ties else probs
        y = rng.integers(0, k, n)
        assert macro_f1(probs, y) == pytest.approx(f1_score(y, probs.argmax(1), average="macro", zero_division=0),
                                                   abs=1e-12)
        expected = np.mean([average_precision_score(y == c, probs[:, c]) for c in np.unique(y)])
        assert mean_average_precision(probs, y) == pytest.approx(expected, abs=1e-12)


def test_a_class_never_predicted_nor_present_is_left_out_and_empty_f1_is_zero():
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0]])
    y = np.array([1, 1])          # class 0 predicted but absent, class 1 present but never predicted, 2 neither
    assert macro_f1(probs, y) == 0.0
    assert mean_average_precision(probs, y) == 1.0      # every sample is a positive of class 1: AP 1
