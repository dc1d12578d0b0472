"""The encoder evaluation's figures against independent references (scipy's Spearman, hand
cases) and its bad input."""

import numpy as np
import pytest
from scipy import stats

from jaxopt_llm.encoders import compare_embeddings, paraphrase_accuracy, sentences, spearman
from jaxopt_llm.errors import ParameterError


@pytest.mark.parametrize("seed", range(4))
def test_spearman_equals_scipy_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=40)
    b = a + rng.normal(scale=0.5, size=40)
    if seed % 2:  # ties in both
        a, b = np.round(a, 0), np.round(b, 0)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_comparison_by_hand():
    reference = _unit(np.array([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.9, 0.2]]))
    same = compare_embeddings(reference, reference)
    assert (same.cosine, same.spearman, same.top1_agreement) == (pytest.approx(1.0), 1.0, 1.0)
    # text 3 moved near text 0 and away from text 2: text 3's nearest becomes text 0 and
    # text 2's text 1; texts 0 and 1 (cosine 0.994) keep each other
    moved = reference.copy()
    moved[3] = _unit(np.array([[1.0, 0.0, 0.3]]))[0]
    result = compare_embeddings(reference, moved)
    assert result.top1_agreement == 0.5
    assert result.cosine_min == pytest.approx(float(reference[3] @ moved[3]))
    sims_ref = (reference @ reference.T)[np.triu_indices(4, 1)]
    sims_new = (moved @ moved.T)[np.triu_indices(4, 1)]
    assert result.spearman == pytest.approx(stats.spearmanr(sims_ref, sims_new).statistic)


def test_paraphrase_accuracy_counts_triples():
    close, far = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    good = [close, close, far]  # paraphrase identical, unrelated orthogonal
    bad = [close, far, close]
    assert paraphrase_accuracy(np.array(good + bad + good + good)) == 0.75


def test_bad_input():
    with pytest.raises(ParameterError, match="count=2: expected an integer of at least 3"):
        sentences("x", 2)
    with pytest.raises(ParameterError, match="expected two \\(N, D\\) arrays of the same shape "
                                             "with N ≥ 3"):
        compare_embeddings(np.eye(2), np.eye(2))
