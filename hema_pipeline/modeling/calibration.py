"""Calibration and referral: NumPy maths on logits.

- **Temperature scaling** (Guo et al. 2017): one scalar T fitted on the calibration split by minimising
  the negative log-likelihood. The NLL is convex in the inverse temperature 1/T, so a safeguarded
  Newton iteration finds the optimum to machine precision (no SciPy needed).
- **ECE / MCE** over equal-width confidence bins (default 15, as Guo et al.).
- **Referral policy**: one calibrated-confidence threshold, certified on the calibration split so that
  the accepted cells' accuracy is at least a target (default 99.5%) with a stated confidence (default
  95%): an exact binomial test over candidate thresholds in a fixed order; everything below is referred
  to a technologist.

Out-of-distribution ("unfamiliar") scores are in ``modeling.ood``; the per-cell decision that combines
the referral policy and the OOD threshold is ``modeling.contract.triage_cells``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

# --------------------------------------------------------------------------------------------------
# Softmax maths


def logsumexp(values: np.ndarray, axis: int = -1) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    peak = values.max(axis=axis, keepdims=True)
    return (peak + np.log(np.exp(values - peak).sum(axis=axis, keepdims=True))).squeeze(axis)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    return logits - logsumexp(logits, axis=1)[:, None]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    log_probabilities = log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-log_probabilities[np.arange(len(labels)), labels].mean())


# --------------------------------------------------------------------------------------------------
# Temperature scaling


@dataclass(frozen=True)
class TemperatureFit:
    temperature: float
    nll_before: float  # at T = 1, on the fitting data
    nll_after: float
    at_bound: bool  # the optimum lies at (or beyond) the search bound: the model is degenerate here
    iterations: int
    note: str = ""


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    min_temperature: float = 0.05,
    max_temperature: float = 20.0,
    tolerance: float = 1e-12,
    max_iterations: int = 200,
) -> TemperatureFit:
    """The T in ``[min_temperature, max_temperature]`` minimising the mean NLL of ``softmax(logits/T)``.

    With b = 1/T, NLL(b) = mean(logsumexp(b z) - b z_y) is convex; its derivative mean(E_p[z] - z_y)
    is non-decreasing and its second derivative is mean(Var_p[z]) >= 0. Newton steps on b, kept inside a
    shrinking bracket by bisection whenever a step would leave it, converge to the root of the
    derivative in a handful of iterations."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need [n, k] logits and n labels, got {logits.shape} and {labels.shape}")
    if not 0 < min_temperature < 1 < max_temperature:
        raise ValueError("the search interval must contain T = 1")
    true_logits = logits[np.arange(len(labels)), labels]
    nll_before = negative_log_likelihood(logits, labels)

    def slope_and_curvature(inverse_temperature: float) -> tuple[float, float]:
        probabilities = softmax(logits * inverse_temperature)
        expected = (probabilities * logits).sum(axis=1)
        variance = (probabilities * (logits - expected[:, None]) ** 2).sum(axis=1)
        return float((expected - true_logits).mean()), float(variance.mean())

    low, high = 1.0 / max_temperature, 1.0 / min_temperature
    slope_low, _ = slope_and_curvature(low)
    slope_high, _ = slope_and_curvature(high)
    _, curvature_at_one = slope_and_curvature(1.0)
    if curvature_at_one == 0.0:
        # Every cell has equal logits for all classes: the likelihood does not depend on T.
        return TemperatureFit(1.0, nll_before, nll_before, False, 0, "logits constant per cell; T left at 1")
    if slope_low >= 0:
        return _bounded_fit(logits, labels, max_temperature, nll_before, "optimum at or above max_temperature")
    if slope_high <= 0:
        return _bounded_fit(logits, labels, min_temperature, nll_before, "optimum at or below min_temperature (separable data)")

    inverse_temperature = 1.0 if low < 1.0 < high else (low + high) / 2
    iterations = 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007 - the count is reported after the loop
        slope, curvature = slope_and_curvature(inverse_temperature)
        if slope > 0:
            high = inverse_temperature
        else:
            low = inverse_temperature
        step = slope / curvature if curvature > 0 else math.inf
        candidate = inverse_temperature - step
        if not low < candidate < high:
            candidate = (low + high) / 2
        converged = abs(candidate - inverse_temperature) <= tolerance * max(1.0, inverse_temperature)
        inverse_temperature = candidate
        if converged or high - low <= tolerance * max(1.0, inverse_temperature):
            break
    temperature = 1.0 / inverse_temperature
    return TemperatureFit(
        temperature=temperature,
        nll_before=nll_before,
        nll_after=negative_log_likelihood(logits, labels, temperature),
        at_bound=False,
        iterations=iterations,
    )


def _bounded_fit(logits: np.ndarray, labels: np.ndarray, temperature: float, nll_before: float, note: str) -> TemperatureFit:
    return TemperatureFit(
        temperature=temperature,
        nll_before=nll_before,
        nll_after=negative_log_likelihood(logits, labels, temperature),
        at_bound=True,
        iterations=0,
        note=note,
    )


# --------------------------------------------------------------------------------------------------
# Expected and maximum calibration error


@dataclass(frozen=True)
class CalibrationErrors:
    ece: float  # sum over bins of |B|/n * |accuracy(B) - confidence(B)|
    mce: float  # max over non-empty bins of |accuracy(B) - confidence(B)|
    bin_edges: np.ndarray  # n_bins + 1 edges; bin m is (edge[m], edge[m+1]], the first also holds 0
    bin_counts: np.ndarray
    bin_confidence: np.ndarray  # mean confidence per bin, NaN where empty
    bin_accuracy: np.ndarray  # NaN where empty


def calibration_errors_from_confidence(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> CalibrationErrors:
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    if len(confidence) != len(correct) or len(confidence) == 0:
        raise ValueError("need as many correctness flags as confidences, and at least one")
    if n_bins < 1:
        raise ValueError("n_bins must be positive")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Right-closed bins (m/M, (m+1)/M], as in Guo et al.; a confidence of exactly 0 joins the first bin.
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    confidence_sums = np.bincount(bins, weights=confidence, minlength=n_bins)
    correct_sums = np.bincount(bins, weights=correct.astype(np.float64), minlength=n_bins)
    filled = counts > 0
    bin_confidence = np.full(n_bins, np.nan)
    bin_accuracy = np.full(n_bins, np.nan)
    bin_confidence[filled] = confidence_sums[filled] / counts[filled]
    bin_accuracy[filled] = correct_sums[filled] / counts[filled]
    gaps = np.abs(bin_accuracy[filled] - bin_confidence[filled])
    return CalibrationErrors(
        ece=float((counts[filled] / len(confidence) * gaps).sum()),
        mce=float(gaps.max()),
        bin_edges=edges,
        bin_counts=counts,
        bin_confidence=bin_confidence,
        bin_accuracy=bin_accuracy,
    )


def calibration_errors(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> CalibrationErrors:
    """ECE and MCE of the top-class confidence of ``probabilities`` ``[n, k]``."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    return calibration_errors_from_confidence(probabilities.max(axis=1), probabilities.argmax(axis=1) == labels, n_bins)


@dataclass(frozen=True)
class CalibrationReport:
    temperature: float
    before: CalibrationErrors  # at T = 1
    after: CalibrationErrors  # at the fitted temperature
    nll_before: float
    nll_after: float
    cells: int

    def headline(self) -> dict[str, float | int]:
        return {
            "temperature": self.temperature,
            "ece_before": self.before.ece,
            "ece_after": self.after.ece,
            "mce_before": self.before.mce,
            "mce_after": self.after.mce,
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "calibration_report_cells": self.cells,
        }


def calibration_report(logits: np.ndarray, labels: np.ndarray, temperature: float, n_bins: int = 15) -> CalibrationReport:
    """Calibration before and after ``temperature`` on a split the temperature was NOT fitted on (the
    test split): measured on the calibration split itself, "after" would be optimistic."""
    return CalibrationReport(
        temperature=float(temperature),
        before=calibration_errors(softmax(logits), labels, n_bins),
        after=calibration_errors(softmax(logits, temperature), labels, n_bins),
        nll_before=negative_log_likelihood(logits, labels),
        nll_after=negative_log_likelihood(logits, labels, temperature),
        cells=int(len(np.asarray(labels).reshape(-1))),
    )


def reliability_diagram_png(report: CalibrationReport) -> bytes:
    """Accuracy against confidence per bin, before and after temperature scaling; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4.6), dpi=100, sharey=True)
    try:
        panels = (
            ("uncalibrated (T = 1)", report.before),
            (f"temperature-scaled (T = {report.temperature:.3f})", report.after),
        )
        for axis, (title, errors) in zip(axes, panels, strict=True):
            edges = errors.bin_edges
            width = edges[1] - edges[0]
            centres = edges[:-1] + width / 2
            filled = errors.bin_counts > 0
            axis.bar(
                centres[filled],
                errors.bin_accuracy[filled],
                width=width,
                edgecolor="black",
                linewidth=0.5,
                color="tab:blue",
                label="accuracy",
            )
            # The gap to the diagonal, drawn from the bin's mean confidence: what the ECE sums.
            axis.bar(
                centres[filled],
                errors.bin_confidence[filled] - errors.bin_accuracy[filled],
                bottom=errors.bin_accuracy[filled],
                width=width,
                color="tab:red",
                alpha=0.35,
                edgecolor="tab:red",
                linewidth=0.5,
                label="gap to confidence",
            )
            axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
            axis.set_xlim(0, 1)
            axis.set_ylim(0, 1)
            axis.set_xlabel("confidence (top-class probability)")
            axis.set_title(f"{title}\nECE {errors.ece:.2%}, MCE {errors.mce:.2%}")
            axis.legend(loc="upper left")
        axes[0].set_ylabel("accuracy")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(figure)


# --------------------------------------------------------------------------------------------------
# Referral policy


REFER_ALL = math.inf  # a threshold no confidence reaches: every cell predicted as the class is referred
# The production claim: accepted cells are at least 99.5% right, with 95% confidence.
DEFAULT_REFERRAL_TARGET = 0.995
DEFAULT_REFERRAL_CONFIDENCE = 0.95


@dataclass(frozen=True)
class ReferralGuarantee:
    """What the calibration split certifies about the chosen threshold: with probability at least
    ``confidence`` over the draw of the calibration cells, the accuracy of the cells the policy accepts is
    at least ``target_accuracy`` (for cells drawn like the calibration split: same analyser, stain and
    population). ``accuracy_lower_bound`` is the one-sided Clopper-Pearson bound at that confidence from
    the ``accepted_cells`` calibration cells accepted at the threshold, ``errors`` of them wrong."""

    target_accuracy: float
    confidence: float
    calibration_cells: int
    accepted_cells: int
    errors: int
    accuracy_lower_bound: float
    candidates_tested: int  # thresholds tested in sequence, the last one the first that failed (if any)

    def statement(self) -> str:
        return (
            f"accepted-cell accuracy >= {self.target_accuracy:.1%} with {self.confidence:.0%} confidence "
            f"(Clopper-Pearson lower bound {self.accuracy_lower_bound:.2%} from {self.accepted_cells:,} of "
            f"{self.calibration_cells:,} calibration cells accepted, {self.errors} wrong)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "statement": self.statement()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ReferralGuarantee:
        return cls(**{name: values[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ReferralPolicy:
    """Accept a cell iff its calibrated top-class probability >= the threshold of its predicted class.

    Policies fitted here hold one certified threshold for every class (``fit_referral_policy``); the
    per-class form stays because cards registered before certification hold per-class thresholds, and
    inference applies both the same way. ``guarantee`` is None where nothing could be certified (every
    cell is referred) and on those older cards."""

    class_names: tuple[str, ...]
    thresholds: tuple[float, ...]  # per predicted class; REFER_ALL where the target is unreachable
    sources: tuple[str, ...]  # per class: how its threshold was chosen, or why every cell is referred
    global_threshold: float
    target_accuracy: float
    calibration_cells: int
    confidence: float | None  # the confidence the guarantee is stated at (None on older cards)
    guarantee: ReferralGuarantee | None

    def threshold_for(self, class_name: str) -> float:
        return self.thresholds[self.class_names.index(class_name)]

    def describe_guarantee(self) -> str:
        if self.guarantee is not None:
            return self.guarantee.statement()
        if self.confidence is None:
            return "no guarantee (policy fitted before certified referral)"
        return f"nothing certified: every cell is referred ({self.sources[0] if self.sources else 'no classes'})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: an unreachable threshold is written as null (JSON has no infinity)."""

        def finite_or_none(value: float) -> float | None:
            return None if math.isinf(value) else float(value)

        return {
            "class_names": list(self.class_names),
            "thresholds": [finite_or_none(value) for value in self.thresholds],
            "sources": list(self.sources),
            "global_threshold": finite_or_none(self.global_threshold),
            "target_accuracy": self.target_accuracy,
            "calibration_cells": self.calibration_cells,
            "confidence": self.confidence,
            "guarantee": None if self.guarantee is None else self.guarantee.to_dict(),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ReferralPolicy:
        """Also reads the policies of cards registered before certification (per-class point-estimate
        thresholds, no ``confidence`` or ``guarantee`` key): they load with ``guarantee`` None."""

        def finite_or_refer_all(value: float | None) -> float:
            return REFER_ALL if value is None else float(value)

        guarantee = values.get("guarantee")
        confidence = values.get("confidence")
        return cls(
            class_names=tuple(values["class_names"]),
            thresholds=tuple(finite_or_refer_all(value) for value in values["thresholds"]),
            sources=tuple(values["sources"]),
            global_threshold=finite_or_refer_all(values["global_threshold"]),
            target_accuracy=float(values["target_accuracy"]),
            calibration_cells=int(values["calibration_cells"]),
            confidence=None if confidence is None else float(confidence),
            guarantee=None if guarantee is None else ReferralGuarantee.from_dict(guarantee),
        )


def accuracy_lower_bound(correct: int, cells: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower bound on a binomial proportion: the accuracy p such that seeing
    ``correct`` or more right of ``cells`` has probability ``1 - confidence`` when the truth is p."""
    from scipy.stats import beta

    if cells <= 0 or correct <= 0:
        return 0.0
    return float(beta.ppf(1.0 - confidence, correct, cells - correct + 1))


def _rejects_low_accuracy(errors: int, cells: int, target_accuracy: float, confidence: float) -> bool:
    """Exact binomial test of "accuracy < target" at level ``1 - confidence``: reject when so few errors
    would be unlikely were the error rate ``1 - target`` (the worst case of the null hypothesis)."""
    from scipy.stats import binom

    if cells <= 0:
        return False
    if target_accuracy >= 1.0:
        return False  # no finite sample certifies perfection
    p_value = float(binom.cdf(errors, cells, 1.0 - target_accuracy))
    return p_value <= 1.0 - confidence


def cells_needed_to_certify(target_accuracy: float, confidence: float) -> float:
    """The fewest accepted cells that can certify ``target_accuracy`` at ``confidence``, all of them
    right: n with target^n <= 1 - confidence (598 for 99.5% at 95%)."""
    if target_accuracy >= 1.0:
        return math.inf
    return math.ceil(math.log(1.0 - confidence) / math.log(target_accuracy))


def referral_threshold_candidates(
    reference_confidence: np.ndarray,
    calibration_cells: int,
    target_accuracy: float,
    confidence: float,
    coverage_step: float = 0.0025,
) -> np.ndarray:
    """Descending thresholds to test on the calibration split, fixed *before* its labels are looked at,
    from another split's calibrated confidences (the validation split): the confidences at which that
    split's coverage is q, for q from where a calibration split of this size could first certify the
    target (``cells_needed_to_certify``, with 15% to spare) up to 1, in steps of ``coverage_step``, then 0
    (accept everything). Thresholds taken from the calibration confidences themselves would make the
    tested hypotheses depend on the sample that tests them."""
    reference = np.sort(np.asarray(reference_confidence, dtype=np.float64).reshape(-1))
    needed = cells_needed_to_certify(target_accuracy, confidence)
    if len(reference) == 0 or calibration_cells < needed:
        return np.empty(0)
    start = min(1.0, 1.15 * needed / calibration_cells)
    coverages = np.r_[np.arange(start, 1.0, coverage_step), 1.0]
    thresholds = np.quantile(reference, 1.0 - coverages, method="lower")
    thresholds = np.r_[thresholds, 0.0]
    # Ties in the reference give equal thresholds: keep the first of each, in descending order.
    unique = np.unique(thresholds)[::-1]
    return unique


def fit_referral_policy(
    probabilities: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    candidate_thresholds: np.ndarray,
    target_accuracy: float = DEFAULT_REFERRAL_TARGET,
    confidence: float = DEFAULT_REFERRAL_CONFIDENCE,
) -> ReferralPolicy:
    """One confidence threshold for every class, certified on the calibration split.

    The candidates (``referral_threshold_candidates``, fixed independently of this split) are tested in
    descending order with an exact binomial test of "accuracy of the accepted cells < target"; testing
    stops at the first candidate it cannot reject, and the lowest rejected one is chosen. Fixed-sequence
    testing controls the chance of certifying any wrong threshold at ``1 - confidence`` with no correction
    for the number of candidates (Bauer 1991; "Learn then Test", Angelopoulos et al. 2021), so: with
    probability >= ``confidence``, the accepted cells' accuracy is >= ``target_accuracy``. Where even the
    first candidate fails (or the split is too small to certify anything) every cell is referred.

    One threshold rather than one per class: certifying 99.5% needs at least 598 accepted cells (at 95%),
    and a calibration split has ~140 per class. Per-class accepted accuracy is reported beside it
    (``evaluate_referral``), not guaranteed."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(class_names) or len(probabilities) != len(labels):
        raise ValueError("probabilities must be [n, classes] with one label per row")
    if not 0 < target_accuracy <= 1:
        raise ValueError("target_accuracy must be in (0, 1]")
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    candidates = np.asarray(candidate_thresholds, dtype=np.float64).reshape(-1)
    if len(candidates) > 1 and np.any(np.diff(candidates) >= 0):
        raise ValueError("candidate thresholds must be strictly descending")
    top = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    chosen, certified_counts, tested = REFER_ALL, None, 0
    for threshold in candidates:
        tested += 1
        accepted = top >= threshold
        cells = int(accepted.sum())
        errors = int(cells - correct[accepted].sum())
        if not _rejects_low_accuracy(errors, cells, target_accuracy, confidence):
            break
        chosen, certified_counts = float(threshold), (cells, errors)
    guarantee = None
    if certified_counts is not None:
        cells, errors = certified_counts
        guarantee = ReferralGuarantee(
            target_accuracy=target_accuracy,
            confidence=confidence,
            calibration_cells=int(len(labels)),
            accepted_cells=cells,
            errors=errors,
            accuracy_lower_bound=accuracy_lower_bound(cells - errors, cells, confidence),
            candidates_tested=tested,
        )
        source = f"certified: {guarantee.statement()}"
    elif len(candidates) == 0 and len(labels) < cells_needed_to_certify(target_accuracy, confidence):
        source = (
            f"refer all: {len(labels)} calibration cells cannot certify {target_accuracy:.1%} at "
            f"{confidence:.0%} confidence (at least {cells_needed_to_certify(target_accuracy, confidence)} needed)"
        )
    elif len(candidates) == 0:
        source = "refer all: no candidate thresholds to test (no validation cells to propose them)"
    else:
        source = f"refer all: not even the most confident cells certify {target_accuracy:.1%} at {confidence:.0%} confidence"
    return ReferralPolicy(
        class_names=tuple(class_names),
        thresholds=(chosen,) * len(class_names),
        sources=(source,) * len(class_names),
        global_threshold=chosen,
        target_accuracy=target_accuracy,
        calibration_cells=int(len(labels)),
        confidence=confidence,
        guarantee=guarantee,
    )


def accepted_at(probabilities: np.ndarray, minimum_confidences: Sequence[float]) -> np.ndarray:
    """Boolean mask of the cells accepted: top probability at least the predicted class's minimum (the
    rest are referred). The one acceptance rule: certification, test evaluation and prediction use it."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    minimums = np.asarray(minimum_confidences, dtype=np.float64)
    return probabilities.max(axis=1) >= minimums[probabilities.argmax(axis=1)]


@dataclass(frozen=True)
class ReferralOutcome:
    cells: int
    accepted: int
    coverage: float  # share of cells accepted
    accepted_accuracy: float  # NaN when nothing is accepted
    per_class: pd.DataFrame  # by predicted class: cells, accepted, coverage, accepted_accuracy

    def headline(self) -> dict[str, float | int]:
        return {
            "referral_cells": self.cells,
            "referral_accepted": self.accepted,
            "referral_coverage": self.coverage,
            "referral_accepted_accuracy": self.accepted_accuracy,
        }


def evaluate_referral(policy: ReferralPolicy, probabilities: np.ndarray, labels: np.ndarray) -> ReferralOutcome:
    """Coverage and accepted-cell accuracy of ``policy`` on a split it was not fitted on."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    accepted = accepted_at(probabilities, policy.thresholds)
    predicted = probabilities.argmax(axis=1)
    correct = predicted == labels
    rows = []
    for index, name in enumerate(policy.class_names):
        mask = predicted == index
        taken = accepted & mask
        rows.append(
            {
                "predicted_class": name,
                "threshold": policy.thresholds[index],
                "cells": int(mask.sum()),
                "accepted": int(taken.sum()),
                "coverage": float(taken.sum() / mask.sum()) if mask.any() else math.nan,
                "accepted_accuracy": float(correct[taken].mean()) if taken.any() else math.nan,
            }
        )
    return ReferralOutcome(
        cells=int(len(labels)),
        accepted=int(accepted.sum()),
        coverage=float(accepted.mean()) if len(labels) else math.nan,
        accepted_accuracy=float(correct[accepted].mean()) if accepted.any() else math.nan,
        per_class=pd.DataFrame(rows),
    )
