"""Calibration, referral and OOD maths against values computed by hand or by brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hema_pipeline.modeling.calibration import (
    REFER_ALL,
    ReferralPolicy,
    accuracy_lower_bound,
    calibration_errors,
    calibration_errors_from_confidence,
    calibration_report,
    cells_needed_to_certify,
    evaluate_referral,
    fit_referral_policy,
    fit_temperature,
    logsumexp,
    negative_log_likelihood,
    referral_threshold_candidates,
    reliability_diagram_png,
    softmax,
)
from hema_pipeline.modeling.contract import ACCEPTED, LOW_CONFIDENCE, UNFAMILIAR, triage_cells
from hema_pipeline.modeling.ood import MahalanobisScorer, energy_score, fit_ood_threshold, leave_one_class_out_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_softmax_maths_is_stable_and_exact():
    logits = np.array([[1000.0, 1000.0], [0.0, math.log(3.0)]])
    np.testing.assert_allclose(softmax(logits), [[0.5, 0.5], [0.25, 0.75]])
    np.testing.assert_allclose(logsumexp(logits, axis=1), [1000.0 + math.log(2.0), math.log(4.0)])
    # NLL of the true classes (0 then 1): -(ln 0.5 + ln 0.75) / 2.
    assert negative_log_likelihood(logits, np.array([0, 1])) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2)


def test_temperature_matches_the_closed_form_optimum():
    """Every cell has logits (0, d) and a share q is labelled 1. The NLL is minimised where the model's
    probability sigmoid(d / T) equals q, i.e. T* = d / ln(q / (1 - q)): with d = 2, q = 0.8, T* = 1/ln 2."""
    logits = np.tile([0.0, 2.0], (10, 1))
    labels = np.array([1] * 8 + [0] * 2)
    fit = fit_temperature(logits, labels)
    assert fit.temperature == pytest.approx(2.0 / math.log(4.0), abs=1e-9)
    assert not fit.at_bound
    assert fit.nll_after < fit.nll_before
    # At the optimum the model's probability equals the observed share.
    assert softmax(logits, fit.temperature)[0, 1] == pytest.approx(0.8, abs=1e-9)


def test_temperature_matches_a_brute_force_grid_on_an_overconfident_multiclass_set():
    rng = np.random.default_rng(7)
    cells, classes = 600, 5
    labels = rng.integers(0, classes, cells)
    logits = rng.normal(0, 1, (cells, classes))
    logits[np.arange(cells), labels] += 2.0
    flipped = rng.random(cells) < 0.3  # 30% of cells: the model is confidently wrong
    logits[flipped] = rng.normal(0, 1, (int(flipped.sum()), classes))
    logits *= 3.0  # overconfident: the optimum is well above 1
    fit = fit_temperature(logits, labels)

    grid = np.exp(np.linspace(np.log(0.1), np.log(10.0), 20001))  # steps of 0.023% in T
    losses = np.array([negative_log_likelihood(logits, labels, t) for t in grid])
    best = int(losses.argmin())
    assert 0 < best < len(grid) - 1  # an interior optimum, so the grid brackets it
    assert fit.temperature == pytest.approx(grid[best], abs=1e-3)
    assert fit.temperature > 1.5
    assert negative_log_likelihood(logits, labels, fit.temperature) <= losses[best] + 1e-12


def test_temperature_stops_at_the_bound_on_separable_data_and_ignores_constant_logits():
    separable = fit_temperature(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([1, 0]), min_temperature=0.05)
    assert separable.at_bound and separable.temperature == 0.05 and "separable" in separable.note
    constant = fit_temperature(np.zeros((4, 3)), np.array([0, 1, 2, 0]))
    assert constant.temperature == 1.0 and not constant.at_bound


def test_ece_and_mce_of_a_small_set_computed_by_hand():
    # 15 equal-width bins. Bin (14/15, 1]: four cells at 0.97, 3 correct -> |0.75 - 0.97| = 0.22.
    # Bin (9/15, 10/15]: two at 0.62, both correct -> 0.38. Bin (5/15, 6/15]: two at 0.35, none correct -> 0.35.
    confidence = np.array([0.97, 0.97, 0.97, 0.97, 0.62, 0.62, 0.35, 0.35])
    correct = np.array([1, 1, 1, 0, 1, 1, 0, 0], dtype=bool)
    errors = calibration_errors_from_confidence(confidence, correct)
    assert errors.ece == pytest.approx(4 / 8 * 0.22 + 2 / 8 * 0.38 + 2 / 8 * 0.35)  # 0.2925
    assert errors.mce == pytest.approx(0.38)
    assert errors.bin_counts.sum() == 8 and errors.bin_counts[14] == 4 and errors.bin_counts[9] == 2
    assert errors.bin_counts[5] == 2
    assert np.isnan(errors.bin_accuracy[0])
    # The same cells as a probability matrix (binary: confidence = top probability).
    probabilities = np.array([[0.03, 0.97]] * 4 + [[0.62, 0.38]] * 2 + [[0.35, 0.65]] * 2)
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    # The last pair now has confidence 0.65 (same bin as the 0.62 pair) and is wrong: that bin holds
    # 4 cells, 2 correct, mean confidence 0.635.
    matrix_errors = calibration_errors(probabilities, labels)
    expected = 4 / 8 * abs(0.75 - 0.97) + 4 / 8 * abs(0.5 - (0.62 * 2 + 0.65 * 2) / 4)
    assert matrix_errors.ece == pytest.approx(expected)
    assert matrix_errors.mce == pytest.approx(0.22)


def test_confidences_of_exactly_zero_and_one_fall_in_the_end_bins():
    errors = calibration_errors_from_confidence(np.array([0.0, 1.0]), np.array([False, True]), n_bins=10)
    assert errors.bin_counts[0] == 1 and errors.bin_counts[9] == 1
    assert errors.ece == 0.0 and errors.mce == 0.0


def test_temperature_scaling_reduces_ece_of_an_overconfident_model():
    rng = np.random.default_rng(3)
    cells = 4000
    labels = rng.integers(0, 4, cells)
    clean = rng.normal(0, 1, (cells, 4))
    clean[np.arange(cells), labels] += 1.5
    logits = 4.0 * clean  # the same ranking, far too confident
    fit = fit_temperature(logits[:2000], labels[:2000])
    report = calibration_report(logits[2000:], labels[2000:], fit.temperature)
    assert report.after.ece < report.before.ece / 3
    assert report.nll_after < report.nll_before
    assert reliability_diagram_png(report).startswith(PNG_MAGIC)


def _cells(confidences: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-class probability rows with the given top-class confidence; the label matches the argmax
    (class 0) where ``correct``."""
    confidences = np.asarray(confidences, dtype=np.float64)
    probabilities = np.c_[confidences, 1 - confidences]
    return probabilities, np.where(correct, 0, 1)


def test_clopper_pearson_lower_bound_matches_the_binomial_tail_it_inverts():
    from scipy.stats import binom

    for correct, cells, confidence in ((1000, 1000, 0.95), (995, 1000, 0.95), (140, 140, 0.9), (30, 50, 0.99)):
        bound = accuracy_lower_bound(correct, cells, confidence)
        # At the bound, seeing this many right or more has probability exactly 1 - confidence.
        assert binom.sf(correct - 1, cells, bound) == pytest.approx(1 - confidence, rel=1e-6)
        assert bound < correct / cells
    # All 1,000 right: the bound is (1 - confidence) ** (1 / n), the "rule of three" in exact form.
    assert accuracy_lower_bound(1000, 1000, 0.95) == pytest.approx(0.05 ** (1 / 1000))
    assert accuracy_lower_bound(0, 10, 0.95) == 0.0
    assert cells_needed_to_certify(0.995, 0.95) == 598  # 0.995 ** 598 <= 0.05 < 0.995 ** 597
    assert 0.995**598 <= 0.05 < 0.995**597


def test_candidates_come_from_the_reference_split_in_descending_order_and_end_by_accepting_everything():
    reference = np.linspace(0.5, 1.0, 2001)
    candidates = referral_threshold_candidates(reference, calibration_cells=1000, target_accuracy=0.995, confidence=0.95)
    assert np.all(np.diff(candidates) < 0) and candidates[-1] == 0.0
    # The first candidate accepts ~1.15 x 598 of 1,000 reference-like cells; the last real one all of them.
    assert (reference >= candidates[0]).mean() == pytest.approx(1.15 * 598 / 1000, abs=0.002)
    assert candidates[-2] == reference.min()
    # A calibration split too small to certify anything gets no candidates at all.
    assert len(referral_threshold_candidates(reference, 597, 0.995, 0.95)) == 0


def test_certified_policy_stops_at_the_first_threshold_the_binomial_test_cannot_pass():
    from scipy.stats import binom

    rng = np.random.default_rng(3)
    confidence = np.sort(rng.uniform(0.9, 1.0, 1500))[::-1]
    correct = np.ones(1500, dtype=bool)
    correct[[900, 1200, 1300, 1350, 1400, 1450, 1499]] = False  # errors, more of them at low confidence
    probabilities, labels = _cells(confidence, correct)
    candidates = referral_threshold_candidates(confidence, 1500, 0.995, 0.95)
    policy = fit_referral_policy(probabilities, labels, ["a", "b"], candidates, 0.995, 0.95)

    # The same sequence by brute force: the lowest candidate reached before the first non-rejection.
    expected, expected_cells, expected_errors = math.inf, 0, 0
    for threshold in candidates:
        accepted = confidence >= threshold
        n, errors = int(accepted.sum()), int((~correct[accepted]).sum())
        if binom.cdf(errors, n, 0.005) > 0.05:
            break
        expected, expected_cells, expected_errors = threshold, n, errors
    assert policy.global_threshold == expected and math.isfinite(expected)
    assert policy.thresholds == (expected, expected)
    guarantee = policy.guarantee
    assert guarantee is not None
    assert (guarantee.accepted_cells, guarantee.errors) == (expected_cells, expected_errors)
    assert guarantee.accuracy_lower_bound >= 0.995  # what the test certified, as a bound
    assert guarantee.accuracy_lower_bound == pytest.approx(
        accuracy_lower_bound(expected_cells - expected_errors, expected_cells, 0.95)
    )
    assert "99.5% with 95% confidence" in policy.describe_guarantee()
    # The point estimate alone would have accepted more: certification costs coverage, on purpose.
    assert expected_errors <= 2

    outcome = evaluate_referral(policy, probabilities, labels)
    assert outcome.accepted == expected_cells
    restored = ReferralPolicy.from_dict(policy.to_dict())
    assert restored == policy


def test_the_guarantee_holds_at_its_stated_rate_over_many_calibration_draws():
    """The property itself: draw calibration and candidate-proposing splits from a population whose
    accuracy falls with confidence, certify, and measure the accepted cells' true accuracy on the
    population. Wrong certificates must be at most about 5% of the draws at 95% confidence."""
    rng = np.random.default_rng(2026)

    def population(n: int) -> tuple[np.ndarray, np.ndarray]:
        confidence = rng.beta(150, 1, n)  # most cells near 1
        # True accuracy at confidence c: slightly *below* c, so an uncertified threshold would overclaim.
        correct = rng.random(n) < np.clip(confidence - 0.004, 0, 1)
        return confidence, correct

    def true_accuracy_above(threshold: float) -> float:
        # Exact for this population: E[c - 0.004 | c >= t] under Beta(150, 1), by quadrature.
        grid = np.linspace(threshold, 1.0, 20001)
        density = 150 * grid**149
        return float(np.trapezoid((grid - 0.004) * density, grid) / np.trapezoid(density, grid))

    wrong, certified = 0, 0
    draws = 300
    for _ in range(draws):
        reference, _ = population(1600)
        confidence, correct = population(1100)
        probabilities, labels = _cells(confidence, correct)
        candidates = referral_threshold_candidates(reference, 1100, 0.99, 0.95)
        policy = fit_referral_policy(probabilities, labels, ["a", "b"], candidates, 0.99, 0.95)
        if policy.guarantee is None:
            continue
        certified += 1
        wrong += true_accuracy_above(policy.global_threshold) < 0.99
    # 99% needs ~300 error-free cells to certify anything: power is modest here, but not nil.
    assert certified >= draws * 0.1
    assert wrong <= draws * 0.05 + 3 * math.sqrt(draws * 0.05 * 0.95)


def test_too_small_or_too_poor_a_calibration_split_refers_every_cell():
    probabilities, labels = _cells(np.full(200, 0.999), np.ones(200, dtype=bool))
    small = fit_referral_policy(
        probabilities, labels, ["a", "b"], referral_threshold_candidates(probabilities[:, 0], 200, 0.995, 0.95)
    )
    assert small.thresholds == (REFER_ALL, REFER_ALL) and small.guarantee is None
    assert "at least 598 needed" in small.sources[0]
    assert "nothing certified" in small.describe_guarantee()
    assert evaluate_referral(small, probabilities, labels).accepted == 0
    # 1,000 cells, the most confident of them wrong: not even the first candidate passes.
    confidence = np.linspace(0.999, 0.9, 1000)
    correct = np.ones(1000, dtype=bool)
    correct[:20] = False
    probabilities, labels = _cells(confidence, correct)
    poor = fit_referral_policy(probabilities, labels, ["a", "b"], referral_threshold_candidates(confidence, 1000, 0.995, 0.95))
    assert poor.guarantee is None and poor.thresholds == (REFER_ALL, REFER_ALL)
    assert poor.sources[0].startswith("refer all: not even the most confident cells")
    assert poor.to_dict()["thresholds"] == [None, None]  # JSON has no infinity
    nothing_proposed = fit_referral_policy(probabilities, labels, ["a", "b"], np.empty(0))
    assert nothing_proposed.sources[0] == "refer all: no candidate thresholds to test (no validation cells to propose them)"
    with pytest.raises(ValueError, match="descending"):
        fit_referral_policy(probabilities, labels, ["a", "b"], np.array([0.5, 0.9]))


def test_policies_of_cards_registered_before_certification_still_load():
    old = {
        "class_names": ["a", "b"],
        "thresholds": [0.9, None],
        "sources": ["class", "refer all: no threshold reaches 99.5% on 80 cells"],
        "global_threshold": 0.95,
        "target_accuracy": 0.995,
        "min_cells_per_class": 50,
        "calibration_cells": 1099,
    }
    policy = ReferralPolicy.from_dict(old)
    assert policy.thresholds == (0.9, REFER_ALL) and policy.guarantee is None and policy.confidence is None
    assert policy.describe_guarantee().startswith("no guarantee")


def test_energy_score_is_higher_for_unfamiliar_logits():
    # Known cells: one class clearly wins. Unfamiliar cells: no class responds (all logits low and flat).
    known = np.array([[8.0, 0.0, 0.5], [0.2, 9.0, 0.0], [0.0, 0.3, 7.5]])
    unfamiliar = np.array([[0.4, 0.3, 0.5], [-1.0, -0.8, -1.2]])
    known_energy, unfamiliar_energy = energy_score(known), energy_score(unfamiliar)
    assert unfamiliar_energy.min() > known_energy.max()
    assert energy_score(np.array([[0.0, 0.0]]))[0] == pytest.approx(-math.log(2.0))
    assert energy_score(np.array([[0.0, 0.0]]), temperature=2.0)[0] == pytest.approx(-2.0 * math.log(2.0))
    threshold = fit_ood_threshold(known_energy, "energy", keep_quantile=1.0)
    cells = np.r_[known, unfamiliar]
    triage = triage_cells(cells, 1.0, _accept_everything(3).thresholds, energy_score(cells), threshold.threshold)
    assert triage.decisions.tolist() == [ACCEPTED] * 3 + [UNFAMILIAR] * 2


def _accept_everything(classes: int) -> ReferralPolicy:
    names = tuple(f"c{index}" for index in range(classes))
    return ReferralPolicy(names, (0.0,) * classes, ("class",) * classes, 0.0, 0.9, 1, None, None)


def test_triage_refers_low_confidence_and_lets_unfamiliar_win():
    policy = ReferralPolicy(("a", "b"), (0.9, 0.6), ("class", "class"), 0.9, 0.99, 10, None, None)
    logits = np.log(np.array([[0.95, 0.05], [0.85, 0.15], [0.3, 0.7], [0.99, 0.01]]))
    scores = np.array([0.0, 0.0, 0.0, 5.0])
    threshold = fit_ood_threshold(np.zeros(10), "energy")
    triage = triage_cells(logits, 1.0, policy.thresholds, scores, threshold.threshold)
    assert triage.decisions.tolist() == [ACCEPTED, LOW_CONFIDENCE, ACCEPTED, UNFAMILIAR]
    np.testing.assert_allclose(triage.confidence, [0.95, 0.85, 0.7, 0.99])
    with pytest.raises(ValueError):
        triage_cells(logits, 1.0, policy.thresholds, scores, None)


def test_mahalanobis_score_is_the_distance_to_the_nearest_class_and_flags_outliers():
    rng = np.random.default_rng(5)
    dims = 6
    centres = np.array([np.zeros(dims), np.full(dims, 6.0)])
    labels = rng.integers(0, 2, 800)
    features = centres[labels] + rng.normal(0, 1, (800, dims)) * np.linspace(0.5, 2.0, dims)
    scorer = MahalanobisScorer.fit(features, labels, num_classes=3)  # class 2 has no training cells
    probe = np.array([[0.5, -0.5, 0.2, 0.0, 1.0, -1.0], [20.0, -20.0, 20.0, -20.0, 20.0, -20.0]])
    by_hand = [min(float((x - mean) @ scorer.precision @ (x - mean)) for mean in scorer.class_means[:2]) for x in probe]
    np.testing.assert_allclose(scorer.score(probe), by_hand, rtol=1e-9)

    known = scorer.score(features)
    threshold = fit_ood_threshold(known, "mahalanobis", keep_quantile=0.95)
    assert (known <= threshold.threshold).mean() >= 0.95
    outliers = centres[0] + rng.normal(0, 1, (50, dims)) + np.array([0, 0, 0, 0, 0, 15.0]) * rng.choice([-1, 1], (50, 1))
    assert (scorer.score(outliers) > threshold.threshold).mean() > 0.9

    restored = MahalanobisScorer.from_bytes(scorer.to_bytes())
    np.testing.assert_array_equal(restored.precision, scorer.precision)
    np.testing.assert_array_equal(restored.score(probe), scorer.score(probe))


def test_ood_threshold_keeps_the_requested_share_of_known_cells():
    known = np.arange(1.0, 101.0)  # 1..100
    threshold = fit_ood_threshold(known, "energy", keep_quantile=0.95)
    assert threshold.threshold == 96.0  # 'higher' empirical quantile: an observed score
    assert (known <= threshold.threshold).sum() == 96


def test_leave_one_class_out_report_counts_referrals_per_group():
    threshold = fit_ood_threshold(np.arange(1.0, 21.0), "energy", keep_quantile=0.9)  # threshold 19
    known = np.arange(1.0, 21.0)
    report = leave_one_class_out_report(
        known,
        {"blast": np.array([25.0, 30.0, 18.0, 40.0]), "reactive_lymphocyte": np.array([5.0, 19.0])},
        threshold,
    ).set_index("group")
    assert report.loc["known", "referred"] == 1 and report.loc["known", "referred_share"] == pytest.approx(0.05)
    assert report.loc["blast", "referred"] == 3 and report.loc["blast", "referred_share"] == pytest.approx(0.75)
    assert report.loc["reactive_lymphocyte", "referred"] == 0
    # AUC of blasts against known cells by hand: 25, 30, 40 beat all 20 known; 18 beats 17 and ties
    # one (a tie counts half).
    assert report.loc["blast", "roc_auc_vs_known"] == pytest.approx((20 + 20 + 20 + 17.5) / (4 * 20))
    assert bool(report.loc["blast", "held_out"]) and not bool(report.loc["known", "held_out"])
