"""pyxclib-exact XMC metrics against pyxclib's own outputs (../shared/fixtures/pyxclib/golden_k10.npz) and worked
examples of the cases pyxclib has no input for (missing predictions, non-binary truth); prediction filtering."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from vixml_ray.data.filters import filter_predictions
from vixml_ray.eval.metrics import inverse_propensity, xmc_metrics

METRICS = ("P", "nDCG", "PSP", "PSnDCG", "R")


def _csr(rows: list[list[int]], num_labels: int) -> sp.csr_matrix:
    indptr = np.cumsum([0] + [len(r) for r in rows])
    indices = np.array([label for r in rows for label in r], dtype=np.int32)
    return sp.csr_matrix((np.ones(len(indices)), indices, indptr), shape=(len(rows), num_labels))


def test_worked_example_precision_and_psp():
    # truth {1..6}; inverse propensities 4,5,6,1,2,3 for labels 1..6 (label 0 unused); prediction (4, 5, 6)
    truth = _csr([[1, 2, 3, 4, 5, 6]], 7)
    w = np.array([1.0, 4, 5, 6, 1, 2, 3])
    out = xmc_metrics(np.array([[4, 5, 6]]), truth, k=3, inv_propensity=w)
    assert out["P"][2] == pytest.approx(1.0)
    assert out["PSP"][2] == pytest.approx(0.4)  # (1+2+3) / (6+5+4)
    assert out["R"][2] == pytest.approx(0.5)
    assert out["nDCG"][2] == pytest.approx(1.0)
    assert set(out) == {"P", "nDCG", "R", "PSP", "PSnDCG"}
    assert all(v.shape == (3,) for v in out.values())


def test_rows_without_labels_count_and_k_beyond_label_count():
    truth = _csr([[0], []], 3)
    out = xmc_metrics(np.array([[0, 1, 2], [0, 1, 2]]), truth, k=3)
    np.testing.assert_allclose(out["P"], [0.5, 0.25, 1 / 6])  # row 1 has no labels but counts
    np.testing.assert_allclose(out["R"], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(out["nDCG"], [0.5, 0.5, 0.5])  # ideal uses min(k, |Y|) = 1 term


def test_missing_predictions_are_misses():
    truth = _csr([[0, 1]], 3)
    out = xmc_metrics(np.array([[1, -1, -1]]), truth, k=3, inv_propensity=np.ones(3))
    np.testing.assert_allclose(out["P"], [1.0, 0.5, 1 / 3])
    np.testing.assert_allclose(out["R"], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(out["PSP"], [1.0, 0.5, 0.5])


def test_metrics_equal_pyxclib_outputs(pyxclib_golden: dict) -> None:
    """P, nDCG, PSP, PSnDCG, R at 1..10 as pyxclib's xc_metrics computes them, on 600 rows with rows without labels
    and rows with fewer labels than k."""
    g = pyxclib_golden
    counts = np.diff(g["test"].indptr)
    assert (counts == 0).sum() > 10 and ((counts > 0) & (counts < int(g["k"]))).sum() > 100  # the edge cases are in
    out = xmc_metrics(g["topk"], g["test"], k=int(g["k"]), inv_propensity=g["inv_propensity"])
    assert set(out) == set(METRICS)
    for name in METRICS:
        np.testing.assert_allclose(out[name], g[name], rtol=0, atol=1e-6, err_msg=name)


def test_inverse_propensity_equals_pyxclib(pyxclib_golden: dict) -> None:
    g = pyxclib_golden
    inv = inverse_propensity(g["train"], float(g["a"]), float(g["b"]))
    # pyxclib raises (n_l + B) to -A in the label matrix's dtype (float32 here): equal up to float32 rounding
    np.testing.assert_allclose(inv, g["inv_propensity"], rtol=1e-6, atol=0)
    out = xmc_metrics(g["topk"], g["test"], k=int(g["k"]), inv_propensity=inv)
    for name in ("PSP", "PSnDCG"):
        np.testing.assert_allclose(out[name], g[name], rtol=0, atol=1e-6, err_msg=name)


def test_truth_values_and_duplicates_are_binarised():
    truth = sp.csr_matrix((np.array([2.0, 3.0, 0.0]), np.array([0, 0, 1]), np.array([0, 3])), shape=(1, 3))
    out = xmc_metrics(np.array([[0, 1]]), truth, k=2)
    np.testing.assert_allclose(out["P"], [1.0, 0.5])  # label 0 once (duplicates summed), label 1 an explicit zero


def test_filter_predictions_shifts_up_and_pads():
    topk = np.array([[3, 1, 4, 2], [5, 3, -1, -1]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, -np.inf, -np.inf]], dtype=np.float32)
    ids, sc = filter_predictions(topk, scores, np.array([[0, 1], [0, 2], [1, 5], [1, 9]]))
    np.testing.assert_array_equal(ids, [[3, 4, -1, -1], [3, -1, -1, -1]])
    np.testing.assert_array_equal(sc, np.array([[0.9, 0.7, -np.inf, -np.inf], [0.4] + [-np.inf] * 3], np.float32))
    assert sc.dtype == np.float32


def test_filter_predictions_matches_per_row_reference():
    rng = np.random.default_rng(3)
    n, num_labels = 200, 30
    topk = np.stack([rng.permutation(num_labels)[:8] for _ in range(n)])
    scores = -np.sort(rng.random(topk.shape), axis=1)
    pairs = np.stack([rng.integers(0, n, 500), rng.integers(0, num_labels, 500)], axis=1)
    ids, sc = filter_predictions(topk, scores, pairs)
    banned = set(map(tuple, pairs.tolist()))
    for i in range(n):
        keep = [j for j in range(8) if (i, topk[i, j]) not in banned]
        np.testing.assert_array_equal(ids[i], list(topk[i, keep]) + [-1] * (8 - len(keep)))
        np.testing.assert_array_equal(sc[i], list(scores[i, keep]) + [-np.inf] * (8 - len(keep)))


def test_bad_input_is_named():
    truth = _csr([[0]], 2)
    with pytest.raises(ValueError, match="columns"):
        xmc_metrics(np.array([[0]]), truth, k=2)
    with pytest.raises(ValueError, match="outside"):
        xmc_metrics(np.array([[5]]), truth, k=1)
    with pytest.raises(ValueError, match="rows"):
        filter_predictions(np.array([[0]]), np.array([[1.0]]), np.array([[3, 0]]))
