"""Tests of the lead-ID metrics (leadtune.trainables.lead_id.metrics) against values worked out by hand, by enumeration or by sklearn."""

import itertools
import json
import math

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

from leadtune.trainables.lead_id.metrics import (
    LEAD_NAMES,
    argmax_assign,
    bootstrap_ci,
    bootstrap_distribution,
    confusion_matrix,
    correct_leads,
    hungarian_assign,
    lead_accuracy,
    log_softmax,
    mcnemar,
    per_lead_counts,
    per_lead_recall,
    set_accuracy,
    summarize,
    wilson_interval,
)

Z = 1.96

# Three ECGs with four lead slots. Correct per ECG: 4, 2 (slots 2 and 3 swapped), 3 (slot 3 wrong).
TRUE = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [3, 2, 1, 0]])
PRED = np.array([[0, 1, 2, 3], [0, 1, 3, 2], [3, 2, 1, 1]])


def wilson_by_quadratic(successes: int, n: int, z: float = Z) -> tuple[float, float]:
    """Wilson bounds as the roots in pi of (p - pi)^2 = z^2 pi (1 - pi) / n, i.e. of
    (1 + z^2/n) pi^2 - (2p + z^2/n) pi + p^2 = 0: a derivation independent of the module's."""
    p = successes / n
    a = 1 + z * z / n
    b = -(2 * p + z * z / n)
    c = p * p
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


# --- Wilson score interval ---------------------------------------------------------------


def test_wilson_8_of_10_by_hand():
    # p = 0.8, z^2 = 3.8416, z^2/n = 0.38416, denominator 1.38416.
    # centre = (0.8 + 0.19208) / 1.38416 = 0.716737...
    # half = (1.96 / 1.38416) * sqrt(0.8 * 0.2 / 10 + 3.8416 / 400) = 1.416020 * sqrt(0.025604)
    centre = (0.8 + 0.19208) / 1.38416
    half = 1.96 / 1.38416 * math.sqrt(0.016 + 0.009604)
    lower, upper = wilson_interval(8, 10)
    assert lower == pytest.approx(centre - half, abs=1e-12)
    assert upper == pytest.approx(centre + half, abs=1e-12)
    assert (lower, upper) == pytest.approx(wilson_by_quadratic(8, 10), abs=1e-12)
    assert (lower, upper) == pytest.approx((0.4902, 0.9433), abs=5e-5)


def test_wilson_at_the_edges_by_hand():
    # 0/5: p = 0 so the bounds are 0 and (z^2/n) / (1 + z^2/n) = 0.76832 / 1.76832.
    assert wilson_interval(0, 5) == pytest.approx((0.0, 0.76832 / 1.76832), abs=1e-12)
    # 5/5: by symmetry 1 - 0.76832 / 1.76832 = 1 / 1.76832, and 1.
    assert wilson_interval(5, 5) == pytest.approx((1 / 1.76832, 1.0), abs=1e-12)
    # Rounding must not push the bounds of 0/n and n/n outside [0, 1] (it would for many n).
    n = np.arange(1, 300)
    assert (wilson_interval(np.zeros_like(n), n)[0] == 0.0).all()
    assert (wilson_interval(n, n)[1] == 1.0).all()


def test_wilson_matches_published_values():
    # Newcombe (1998), Statistics in Medicine 17:857-872, score interval without continuity
    # correction, printed to 4 decimals.
    published = {
        (81, 263): (0.2553, 0.3662),
        (15, 148): (0.0624, 0.1605),
        (0, 20): (0.0000, 0.1611),
        (1, 29): (0.0061, 0.1718),
    }
    for (successes, n), bounds in published.items():
        assert wilson_interval(successes, n) == pytest.approx(bounds, abs=5e-5)
        if successes > 0:
            assert wilson_interval(successes, n) == pytest.approx(
                wilson_by_quadratic(successes, n), abs=1e-12
            )


def test_wilson_vectorised_and_empty():
    successes = np.array([8, 0, 5, 0])
    totals = np.array([10, 5, 5, 0])
    lower, upper = wilson_interval(successes, totals)
    assert lower.shape == upper.shape == (4,)
    for i in range(3):
        assert (lower[i], upper[i]) == pytest.approx(wilson_interval(successes[i], totals[i]))
    assert np.isnan(lower[3]) and np.isnan(upper[3])
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(6, 5)


# --- McNemar ------------------------------------------------------------------------------


def paired(b: int, c: int, both_right: int, both_wrong: int) -> tuple[np.ndarray, np.ndarray]:
    a = [True] * b + [False] * c + [True] * both_right + [False] * both_wrong
    other = [False] * b + [True] * c + [True] * both_right + [False] * both_wrong
    return np.array(a), np.array(other)


def test_mcnemar_small_table_by_hand():
    a, b = paired(b=10, c=3, both_right=20, both_wrong=5)
    result = mcnemar(a.reshape(2, 19), b.reshape(2, 19))
    assert (result.b, result.c) == (10, 3)
    # (|10 - 3| - 1)^2 / (10 + 3) = 36 / 13; chi-square with 1 dof is Z^2, so its upper tail at x
    # is P(|Z| > sqrt(x)) = erfc(sqrt(x / 2)).
    assert result.statistic == pytest.approx(36 / 13, rel=1e-12)
    assert result.p_value == pytest.approx(math.erfc(math.sqrt(36 / 13 / 2)), rel=1e-9)
    assert result.p_value == pytest.approx(0.09609, abs=1e-5)


def test_mcnemar_degenerate_cases():
    a, b = paired(b=0, c=0, both_right=7, both_wrong=2)
    assert mcnemar(a, b).statistic == 0.0 and mcnemar(a, b).p_value == 1.0
    a, b = paired(b=1, c=1, both_right=0, both_wrong=0)
    # (|1 - 1| - 1)^2 / 2 = 1/2
    assert mcnemar(a, b).statistic == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same shape"):
        mcnemar(np.ones(3, bool), np.ones(4, bool))


def test_absent_leads_do_not_count_in_mcnemar():
    true = np.array([[0, 1, -1], [1, 0, 2]])
    model_a = np.array([[0, 1, 5], [1, 0, 1]])  # wrong only on slot (1, 2)
    model_b = np.array([[1, 1, 5], [1, 0, 2]])  # wrong only on slot (0, 0)
    result = mcnemar(correct_leads(model_a, true), correct_leads(model_b, true))
    assert (result.b, result.c) == (1, 1)


# --- Lead accuracy, set accuracy, recall, confusion matrix ----------------------------------


def test_lead_and_set_accuracy_by_hand():
    assert lead_accuracy(PRED, TRUE) == pytest.approx(9 / 12)
    assert set_accuracy(PRED, TRUE) == pytest.approx(1 / 3)


def test_mask_and_minus_one_mean_absent():
    # Hide both wrong slots of ECG 1 and the wrong slot of ECG 2: 4 + 2 + 3 = 9 of 9 correct.
    mask = np.ones_like(TRUE, dtype=bool)
    mask[1, 2:] = False
    mask[2, 3] = False
    assert lead_accuracy(PRED, TRUE, mask) == 1.0
    assert set_accuracy(PRED, TRUE, mask) == 1.0
    true_padded = np.where(mask, TRUE, -1)
    assert lead_accuracy(PRED, true_padded) == 1.0
    assert set_accuracy(PRED, true_padded) == 1.0
    # Hiding only ECG 2's wrong slot: 4 + 2 + 3 correct of 4 + 4 + 3 present, 2 of 3 sets.
    mask = np.ones_like(TRUE, dtype=bool)
    mask[2, 3] = False
    assert lead_accuracy(PRED, TRUE, mask) == pytest.approx(9 / 11)
    assert set_accuracy(PRED, TRUE, mask) == pytest.approx(2 / 3)


def test_ecg_without_leads_is_left_out_of_set_accuracy():
    mask = np.ones_like(TRUE, dtype=bool)
    mask[1] = False  # ECG 1 (the one with the swap) has no lead at all
    assert set_accuracy(PRED, TRUE, mask) == pytest.approx(1 / 2)
    assert lead_accuracy(PRED, TRUE, mask) == pytest.approx(7 / 8)
    assert math.isnan(lead_accuracy(PRED, TRUE, np.zeros_like(mask)))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="must both be shaped"):
        lead_accuracy(PRED[:, :3], TRUE)
    with pytest.raises(ValueError, match="mask"):
        lead_accuracy(PRED, TRUE, np.ones((3, 3), bool))


def test_per_lead_recall_by_hand():
    # Label 0 occurs at (0,0) right, (1,0) right, (2,3) wrong: 2/3. Label 1: (0,1), (1,1), (2,2)
    # all right: 3/3. Label 2: (0,2) right, (1,2) wrong, (2,1) right: 2/3. Label 3: (0,3) right,
    # (1,3) wrong, (2,0) right: 2/3. Label 4 never occurs.
    successes, totals = per_lead_counts(PRED, TRUE, n_classes=5)
    assert successes.tolist() == [2, 3, 2, 2, 0]
    assert totals.tolist() == [3, 3, 3, 3, 0]
    recall = per_lead_recall(PRED, TRUE, n_classes=5)
    assert recall[:4] == pytest.approx([2 / 3, 1.0, 2 / 3, 2 / 3])
    assert np.isnan(recall[4])
    mask = np.ones_like(TRUE, dtype=bool)
    mask[2, 3] = False  # the only wrong label-0 slot
    assert per_lead_recall(PRED, TRUE, n_classes=5, mask=mask)[0] == 1.0


def test_confusion_matrix_matches_sklearn():
    rng = np.random.default_rng(3)
    true = rng.integers(0, 12, size=(40, 12))
    pred = np.where(rng.random((40, 12)) < 0.7, true, rng.integers(0, 12, size=(40, 12)))
    mask = rng.random((40, 12)) < 0.8
    expected = sklearn_confusion_matrix(true[mask], pred[mask], labels=list(range(12)))
    got = confusion_matrix(pred, true, mask=mask)
    np.testing.assert_array_equal(got, expected)
    assert got.sum() == mask.sum()
    # Diagonal over row sums is the per-lead recall.
    np.testing.assert_allclose(
        np.diag(got) / got.sum(axis=1), per_lead_recall(pred, true, mask=mask)
    )
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.full((1, 2), -1), np.zeros((1, 2), dtype=int))


# --- Labelling -------------------------------------------------------------------------------


def test_log_softmax_by_hand():
    # exp(0) = 1 and exp(ln 3) = 3, so the probabilities are 1/4 and 3/4.
    got = log_softmax(np.array([0.0, math.log(3)]))
    assert got == pytest.approx([math.log(0.25), math.log(0.75)])
    # Large logits must neither overflow nor lose precision: three equal ones give -ln 3.
    assert log_softmax(np.full(3, 1000.0)) == pytest.approx([-math.log(3)] * 3)
    x = np.array([[1.0, 2.0], [3.0, 5.0]])
    np.testing.assert_allclose(np.exp(log_softmax(x, axis=0)).sum(axis=0), [1.0, 1.0])


def test_hungarian_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(60):
        k = int(rng.integers(1, 6))
        m = int(rng.integers(k, 7))
        logp = log_softmax(rng.normal(size=(k, m)) * 2)
        best = max(
            itertools.permutations(range(m), k),
            key=lambda labels: sum(logp[i, labels[i]] for i in range(k)),
        )
        assert hungarian_assign(logp).tolist() == list(best)


def test_hungarian_fixes_a_repeated_argmax_by_hand():
    # Both leads prefer label 0. Options: (0, 1) scores 0.6 * 0.3 = 0.18, (1, 0) scores
    # 0.4 * 0.7 = 0.28, so the joint optimum gives lead 0 label 1.
    logp = np.log(np.array([[0.6, 0.4], [0.7, 0.3]]))
    assert argmax_assign(logp).tolist() == [0, 0]
    assert hungarian_assign(logp).tolist() == [1, 0]


def test_hungarian_batch_mask_and_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 4, 6)) * 3
    mask = np.ones((5, 4), dtype=bool)
    mask[2, 1] = False
    mask[4] = False
    got = hungarian_assign(log_softmax(logits), mask)
    assert got.shape == (5, 4)
    assert got[2, 1] == -1 and (got[4] == -1).all()
    for i in range(4):
        labels = got[i][mask[i]]
        assert len(set(labels.tolist())) == labels.size
        np.testing.assert_array_equal(labels, hungarian_assign(log_softmax(logits[i][mask[i]])))
    # A per-lead shift (the log-normaliser) does not change an assignment of every lead.
    np.testing.assert_array_equal(hungarian_assign(logits, mask), got)
    assert (argmax_assign(logits, mask)[mask] == logits.argmax(-1)[mask]).all()


def test_hungarian_rejects_probabilities_and_too_many_leads():
    with pytest.raises(ValueError, match="probabilities"):
        hungarian_assign(np.array([[0.6, 0.4], [0.7, 0.3]]))
    with pytest.raises(ValueError, match="K <= M"):
        hungarian_assign(np.zeros((3, 2)))


# --- Bootstrap -------------------------------------------------------------------------------


def test_bootstrap_degenerate_when_every_ecg_scores_the_same():
    true = np.tile(np.arange(12), (30, 1))
    pred = true.copy()
    pred[:, 11] = 0  # every ECG has 11 of 12 right, so every resample scores 11/12
    assert bootstrap_ci(pred, true, n_boot=500) == pytest.approx((11 / 12, 11 / 12))


def two_ecgs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ECG A: 4 present leads, all right. ECG B: 12 present leads, 6 right."""
    true = np.tile(np.arange(12), (2, 1))
    pred = true.copy()
    pred[1, :6] = (true[1, :6] + 1) % 12
    mask = np.ones((2, 12), dtype=bool)
    mask[0, 4:] = False
    return pred, true, mask


def test_bootstrap_two_ecgs_against_enumeration():
    # Resamples of 2 ECGs: AA (prob 1/4) pools 8/8 = 1, AB or BA (1/2) pools 10/16 = 0.625,
    # BB (1/4) pools 12/24 = 0.5 (lead accuracy pools leads, it does not average ECGs).
    pred, true, mask = two_ecgs()
    values = bootstrap_distribution(pred, true, n_boot=10_000, seed=0, mask=mask)
    assert set(np.unique(values).tolist()) == {0.5, 0.625, 1.0}
    for value, probability in [(0.5, 0.25), (0.625, 0.5), (1.0, 0.25)]:
        assert np.mean(values == value) == pytest.approx(probability, abs=0.02)
    # Quantiles of that distribution: 2.5 % -> 0.5 and 97.5 % -> 1; 20 % -> 0.5 and 80 % -> 1;
    # 30 % and 70 % -> 0.625.
    assert bootstrap_ci(pred, true, mask=mask) == (0.5, 1.0)
    assert bootstrap_ci(pred, true, alpha=0.4, mask=mask) == (0.5, 1.0)
    assert bootstrap_ci(pred, true, alpha=0.6, mask=mask) == (0.625, 0.625)
    # The interval is the alpha/2 and 1 - alpha/2 percentiles of the same resamples.
    for alpha in (0.05, 0.1, 0.5):
        expected = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        assert bootstrap_ci(pred, true, alpha=alpha, mask=mask) == pytest.approx(expected)


def test_bootstrap_three_ecgs_cdf_against_enumeration():
    true = np.tile(np.arange(12), (3, 1))
    pred = true.copy()
    pred[1, :3] = 11  # 9 right
    pred[2, :7] = 11  # 5 right (slot 11 is right in all three)
    correct = (pred == true).sum(axis=1)
    # All 3^3 ordered resamples are equally likely.
    exact = [correct[list(rows)].sum() / 36 for rows in itertools.product(range(3), repeat=3)]
    values = bootstrap_distribution(pred, true, n_boot=10_000, seed=1)
    for x in sorted(set(exact)):
        assert np.mean(values <= x) == pytest.approx(np.mean(np.array(exact) <= x), abs=0.02)
    assert np.isin(values, exact).all()


def test_bootstrap_fast_path_equals_generic_statistic():
    rng = np.random.default_rng(5)
    true = np.tile(np.arange(12), (50, 1))
    pred = np.where(rng.random((50, 12)) < 0.9, true, 0)
    mask = rng.random((50, 12)) < 0.9

    def pooled_accuracy(p, t, mask=None):
        return lead_accuracy(p, t, mask)

    def all_right(p, t, mask=None):
        return set_accuracy(p, t, mask)

    for fast, generic in [(lead_accuracy, pooled_accuracy), (set_accuracy, all_right)]:
        a = bootstrap_distribution(pred, true, fast, n_boot=300, seed=2, mask=mask)
        b = bootstrap_distribution(pred, true, generic, n_boot=300, seed=2, mask=mask)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_bootstrap_is_reproducible_per_seed():
    rng = np.random.default_rng(7)
    true = np.tile(np.arange(12), (200, 1))
    pred = np.where(rng.random((200, 12)) < 0.95, true, 0)
    first = bootstrap_ci(pred, true, n_boot=2000, seed=11)
    assert bootstrap_ci(pred, true, n_boot=2000, seed=11) == first
    assert bootstrap_ci(pred, true, n_boot=2000, seed=12) != first
    lower, upper = first
    assert lower < lead_accuracy(pred, true) < upper


# --- Summary ---------------------------------------------------------------------------------


def test_summarize_by_hand():
    # ECG 0: leads 0 and 1 both prefer label 0 (as in the hand case above), lead 2 is clear.
    # ECG 1: every lead clear; its last slot is padding whose scores would take label 0 (and push
    # lead 0 to label 2) if padding joined the assignment.
    probabilities = np.array(
        [
            [[0.6, 0.4, 0.0], [0.7, 0.3, 0.0], [0.0, 0.0, 1.0]],
            [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.98, 0.01, 0.01]],
        ]
    )
    logprobs = np.log(np.clip(probabilities, 1e-9, None))
    true = np.array([[1, 0, 2], [0, 1, -1]])
    result = summarize(logprobs, true, n_boot=200, seed=0)
    json.dumps(result, allow_nan=False)  # strict JSON: NaN became None

    argmax, hungarian = result["argmax"], result["hungarian"]
    # Argmax gets lead (0, 0) wrong: 4 of 5 present leads, 1 of 2 sets.
    assert (argmax["leads_correct"], argmax["leads_present"]) == (4, 5)
    assert argmax["lead_accuracy"] == pytest.approx(4 / 5)
    assert (argmax["sets_correct"], argmax["sets_total"]) == (1, 2)
    assert argmax["set_accuracy_ci"] == pytest.approx(wilson_by_quadratic(1, 2))
    # Hungarian gets everything right; its per-label counts are label 0: 2, 1: 2, 2: 1.
    assert hungarian["lead_accuracy"] == 1.0 and hungarian["set_accuracy"] == 1.0
    assert hungarian["lead_accuracy_ci"] == [1.0, 1.0]
    assert hungarian["per_lead_total"] == [2, 2, 1]
    assert hungarian["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 1]]
    assert argmax["per_lead_recall"] == pytest.approx([1.0, 0.5, 1.0])
    assert argmax["per_lead_recall_ci"][1] == pytest.approx(wilson_by_quadratic(1, 2))
    # Paired comparison: one lead only Hungarian gets right.
    assert (result["hungarian_vs_argmax"]["b"], result["hungarian_vs_argmax"]["c"]) == (1, 0)
    assert result["labels"] == ["0", "1", "2"]


def test_summarize_twelve_leads_names_and_missing_label():
    rng = np.random.default_rng(4)
    true = np.tile(np.arange(12), (6, 1))
    true[:, 7] = -1  # V2 never present
    logits = rng.normal(size=(6, 12, 12)) + 4 * np.eye(12)
    result = summarize(logits, true, n_boot=100)
    assert result["labels"] == list(LEAD_NAMES)
    assert result["argmax"]["per_lead_recall"][7] is None
    assert result["argmax"]["per_lead_recall_ci"][7] == [None, None]
    assert result["argmax"]["leads_present"] == 66
    expected = lead_accuracy(argmax_assign(logits), true)
    assert result["argmax"]["lead_accuracy"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="probabilities"):
        summarize(np.exp(log_softmax(logits)), true, n_boot=10)
