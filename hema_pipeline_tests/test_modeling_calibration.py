"""Calibration, referral and OOD maths against values computed by hand or by brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hema_pipeline.modeling.calibration import (
    ACCEPTED,
    LOW_CONFIDENCE,
    REFER_ALL,
    UNFAMILIAR,
    MahalanobisScorer,
    ReferralPolicy,
    calibration_errors,
    calibration_errors_from_confidence,
    calibration_report,
    energy_score,
    evaluate_referral,
    fit_ood_threshold,
    fit_referral_policy,
    fit_temperature,
    leave_one_class_out_report,
    logsumexp,
    negative_log_likelihood,
    reliability_diagram_png,
    smallest_threshold_reaching,
    softmax,
    triage_cells,
)

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


def _brute_force_threshold(confidence: np.ndarray, correct: np.ndarray, target: float) -> float:
    for threshold in sorted(set(confidence.tolist())):  # smallest first
        accepted = confidence >= threshold
        if correct[accepted].mean() >= target:
            return threshold
    return math.inf


def test_smallest_threshold_reaching_the_target_matches_brute_force_and_respects_ties():
    rng = np.random.default_rng(11)
    for _ in range(50):
        confidence = np.round(rng.uniform(0.3, 1.0, 60), 2)  # rounding creates ties
        correct = rng.random(60) < confidence  # errors more likely at low confidence
        for target in (0.8, 0.95, 1.0):
            expected = _brute_force_threshold(confidence, correct, target)
            assert smallest_threshold_reaching(confidence, correct, target) == expected
    # Tied cells go together: 0.9 (x2, one wrong) cannot be split to reach 100%.
    assert smallest_threshold_reaching(np.array([0.99, 0.9, 0.9]), np.array([True, True, False]), 1.0) == 0.99


def test_referral_policy_reaches_the_target_and_falls_back_for_rare_classes():
    class_names = ["neutrophil", "lymphocyte", "basophil"]
    rows, labels = [], []
    # 400 cells predicted neutrophil, confidences 0.600..0.999; the 40 least confident are wrong, plus one
    # wrong cell at 0.95: the smallest threshold keeping >= 99.5% correct is found by brute force below.
    neutrophil_confidence = np.linspace(0.6, 0.999, 400)
    neutrophil_correct = np.ones(400, dtype=bool)
    neutrophil_correct[:40] = False
    neutrophil_correct[np.argmin(np.abs(neutrophil_confidence - 0.95))] = False
    for confidence, correct in zip(neutrophil_confidence, neutrophil_correct, strict=True):
        rest = (1 - confidence) / 2
        rows.append([confidence, rest, rest])
        labels.append(0 if correct else 1)
    # 100 cells predicted lymphocyte whose most confident cell is wrong: the target is unreachable.
    for index, confidence in enumerate(np.linspace(0.99, 0.7, 100)):
        rest = (1 - confidence) / 2
        rows.append([rest, confidence, rest])
        labels.append(0 if index == 0 else 1)
    # 5 cells predicted basophil (too few for a threshold of its own), all correct.
    for confidence in (0.95, 0.9, 0.85, 0.8, 0.75):
        rest = (1 - confidence) / 2
        rows.append([rest, rest, confidence])
        labels.append(2)
    probabilities = np.array(rows)
    labels = np.array(labels)

    policy = fit_referral_policy(probabilities, labels, class_names, target_accuracy=0.995, min_cells_per_class=50)
    expected_neutrophil = _brute_force_threshold(neutrophil_confidence, neutrophil_correct, 0.995)
    assert policy.thresholds[0] == pytest.approx(expected_neutrophil)
    assert policy.sources[0] == "class"
    assert policy.thresholds[1] == REFER_ALL and policy.sources[1].startswith("refer all")
    assert policy.sources[2].startswith("global fallback: only 5 calibration cells predicted as basophil")
    assert policy.thresholds[2] == policy.global_threshold

    outcome = evaluate_referral(policy, probabilities, labels)
    assert outcome.accepted_accuracy >= 0.995
    neutrophils = outcome.per_class.set_index("predicted_class").loc["neutrophil"]
    assert neutrophils["accepted_accuracy"] >= 0.995
    assert outcome.per_class.set_index("predicted_class").loc["lymphocyte", "accepted"] == 0
    # Lowering the neutrophil threshold to the next observed confidence misses the target.
    lower = neutrophil_confidence[neutrophil_confidence < policy.thresholds[0]].max()
    assert neutrophil_correct[neutrophil_confidence >= lower].mean() < 0.995
    # Coverage counted by hand: accepted neutrophils plus the basophils above the global threshold.
    accepted_by_hand = int((neutrophil_confidence >= policy.thresholds[0]).sum()) + sum(
        confidence >= policy.global_threshold for confidence in (0.95, 0.9, 0.85, 0.8, 0.75)
    )
    assert outcome.accepted == accepted_by_hand
    assert outcome.coverage == pytest.approx(accepted_by_hand / len(labels))

    restored = ReferralPolicy.from_dict(policy.to_dict())
    assert restored == policy
    assert policy.to_dict()["thresholds"][1] is None  # JSON has no infinity


def test_a_rare_class_with_a_confident_error_is_referred_rather_than_given_the_global_threshold():
    rows, labels = [], []
    for confidence in np.linspace(0.6, 0.99, 300):  # 300 correct cells predicted as class 0
        rows.append([confidence, 1 - confidence])
        labels.append(0)
    for index, confidence in enumerate((0.97, 0.9, 0.85, 0.8)):  # 4 predicted as class 1; the top one wrong
        rows.append([1 - confidence, confidence])
        labels.append(0 if index == 0 else 1)
    policy = fit_referral_policy(np.array(rows), np.array(labels), ["common", "rare"], 0.995, min_cells_per_class=50)
    # Pooled, 1 error in 304 cells (99.67%) reaches the target at the lowest confidence.
    assert policy.global_threshold == pytest.approx(0.6)
    assert policy.thresholds[0] == pytest.approx(0.6)
    assert policy.thresholds[1] == REFER_ALL
    assert "raised because its own cells miss" in policy.sources[1] and policy.sources[1].endswith("refer all")


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
    triage = triage_cells(cells, 1.0, _accept_everything(3), energy_score(cells), threshold)
    assert triage.decisions.tolist() == [ACCEPTED] * 3 + [UNFAMILIAR] * 2


def _accept_everything(classes: int) -> ReferralPolicy:
    names = tuple(f"c{index}" for index in range(classes))
    return ReferralPolicy(names, (0.0,) * classes, ("class",) * classes, 0.0, 0.9, 1, 1)


def test_triage_refers_low_confidence_and_lets_unfamiliar_win():
    policy = ReferralPolicy(("a", "b"), (0.9, 0.6), ("class", "class"), 0.9, 0.99, 1, 10)
    logits = np.log(np.array([[0.95, 0.05], [0.85, 0.15], [0.3, 0.7], [0.99, 0.01]]))
    scores = np.array([0.0, 0.0, 0.0, 5.0])
    threshold = fit_ood_threshold(np.zeros(10), "energy")
    triage = triage_cells(logits, 1.0, policy, scores, threshold)
    assert triage.decisions.tolist() == [ACCEPTED, LOW_CONFIDENCE, ACCEPTED, UNFAMILIAR]
    np.testing.assert_allclose(triage.confidence, [0.95, 0.85, 0.7, 0.99])
    with pytest.raises(ValueError):
        triage_cells(logits, 1.0, policy, scores, None)


def test_mahalanobis_score_is_the_distance_to_the_nearest_class_and_flags_outliers():
    rng = np.random.default_rng(5)
    dims = 6
    centres = np.array([np.zeros(dims), np.full(dims, 6.0)])
    labels = rng.integers(0, 2, 800)
    features = centres[labels] + rng.normal(0, 1, (800, dims)) * np.linspace(0.5, 2.0, dims)
    scorer = MahalanobisScorer.fit(features, labels, num_classes=3)  # class 2 has no training cells
    probe = np.array([[0.5, -0.5, 0.2, 0.0, 1.0, -1.0], [20.0, -20.0, 20.0, -20.0, 20.0, -20.0]])
    by_hand = [
        min(float((x - mean) @ scorer.precision @ (x - mean)) for mean in scorer.class_means[:2]) for x in probe
    ]
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
