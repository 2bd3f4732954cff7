"""Exact intervals, the differential, reference-range marks, flags, analyser agreement and the
smear-level dysplasia threshold, on constructed predictions (no model needed)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from hema_pipeline.inference.agreement import analyser_agreement
from hema_pipeline.inference.differential import (
    NON_LEUKOCYTE_CLASSES,
    RangeMark,
    ReferenceRange,
    ReferenceRanges,
    clopper_pearson,
    compute_differential,
    per_hundred_interval,
    range_mark,
)
from hema_pipeline.inference.flags import FlagCode, FlagSettings, dysplastic_neutrophil_share, smear_flags
from hema_pipeline.inference.smear_thresholds import fit_smear_threshold

EIGHT_CLASSES = (
    "neutrophil",
    "eosinophil",
    "basophil",
    "lymphocyte",
    "monocyte",
    "immature_granulocyte",
    "erythroblast",
    "platelet",
)
DYSPLASIA_CLASSES = ("neutrophil", "hypogranulated_neutrophil")


def predictions(task: str, version: str, counts: dict[str, int], referred: int = 0, prefix: str = "c") -> pd.DataFrame:
    """A prediction table with ``counts`` accepted cells per class and ``referred`` low-confidence ones."""
    rows: list[tuple[str, str, bool, str | None]] = []
    number = 0
    for cell_class, count in counts.items():
        for _ in range(count):
            rows.append((f"{prefix}{number}", cell_class, True, None))
            number += 1
    for _ in range(referred):
        rows.append((f"{prefix}{number}", next(iter(counts)), False, "low_confidence"))
        number += 1
    return pd.DataFrame(
        {
            "cell_key": [row[0] for row in rows],
            "task": task,
            "model_version": version,
            "predicted_class": [row[1] for row in rows],
            "confidence": 0.9,
            "energy": -5.0,
            "ood_score": float("nan"),
            "accepted": [row[2] for row in rows],
            "referral_reason": pd.Series([row[3] for row in rows], dtype=object),
            "probabilities": [{} for _ in rows],
        }
    )


@pytest.mark.parametrize(
    ("successes", "trials", "expected"),
    [
        (0, 10, (0.0, 0.3085)),
        (10, 10, (0.6915, 1.0)),
        (5, 100, (0.0164, 0.1128)),
        (10, 200, (0.02423, 0.09003)),
        (1, 2, (0.0126, 0.9874)),
    ],
)
def test_clopper_pearson_matches_published_values(successes, trials, expected):
    low, high = clopper_pearson(successes, trials)
    assert low == pytest.approx(expected[0], abs=5e-5)
    assert high == pytest.approx(expected[1], abs=5e-5)


def test_clopper_pearson_reproduces_ruemke_limits():
    # CLSI H20-A2 (Rümke): a true 5 % reads anywhere from 2.4 % to 9.0 % on a 200-cell count.
    low, high = clopper_pearson(10, 200)
    assert (round(100 * low, 1), round(100 * high, 1)) == (2.4, 9.0)


def test_clopper_pearson_edges_are_exact_and_inputs_checked():
    assert clopper_pearson(0, 1) == (0.0, pytest.approx(0.975))
    assert clopper_pearson(0, 10)[0] == 0.0 and clopper_pearson(10, 10)[1] == 1.0
    # 0 of n: the upper limit has the closed form 1 - (alpha/2)^(1/n).
    assert clopper_pearson(0, 50)[1] == pytest.approx(1 - 0.025 ** (1 / 50), rel=1e-12)
    assert clopper_pearson(3, 40, confidence=0.99)[1] > clopper_pearson(3, 40)[1]
    for bad in [(1, 0), (-1, 10), (11, 10)]:
        with pytest.raises(ValueError):
            clopper_pearson(*bad)


def test_per_hundred_interval_is_the_binomial_interval_on_the_odds():
    low, high = per_hundred_interval(5, 100)
    p_low, p_high = clopper_pearson(5, 105)
    assert (low, high) == pytest.approx((100 * p_low / (1 - p_low), 100 * p_high / (1 - p_high)))
    assert per_hundred_interval(0, 100)[0] == 0.0


def test_range_mark_uses_the_interval_not_only_the_point():
    neutrophils = ReferenceRange(40.0, 80.0)
    assert range_mark(60.0, 50.0, 70.0, neutrophils) is RangeMark.WITHIN
    assert range_mark(90.0, 82.0, 95.0, neutrophils) is RangeMark.ABOVE
    assert range_mark(84.0, 75.0, 91.0, neutrophils) is RangeMark.POSSIBLY_ABOVE
    assert range_mark(20.0, 10.0, 35.0, neutrophils) is RangeMark.BELOW
    assert range_mark(37.0, 30.0, 45.0, neutrophils) is RangeMark.POSSIBLY_BELOW


def test_differential_counts_accepted_cells_with_exact_intervals_and_marks():
    counts = {
        "neutrophil": 130,
        "lymphocyte": 50,
        "monocyte": 10,
        "eosinophil": 0,
        "basophil": 10,
        "erythroblast": 4,
        "platelet": 6,
    }
    frame = predictions("pbc8", "pbc8-v1", counts, referred=12)
    differential = compute_differential(
        frame, "pbc8", EIGHT_CLASSES, reference_ranges=ReferenceRanges(), outside_denominator=NON_LEUKOCYTE_CLASSES
    )
    assert (differential.total_cells, differential.accepted_cells, differential.referred_cells) == (222, 210, 12)
    assert differential.denominator_cells == 200  # erythroblasts and platelets are not leukocytes
    assert differential.denominator_label == "leukocytes"

    neutrophil = differential.row("neutrophil")
    assert neutrophil.count == 130 and neutrophil.percent == pytest.approx(65.0)
    low, high = clopper_pearson(130, 200)
    assert (neutrophil.ci_low_percent, neutrophil.ci_high_percent) == pytest.approx((100 * low, 100 * high))
    assert neutrophil.mark is RangeMark.WITHIN

    # 5 % monocytes: the Rümke case, inside 2-10 %.
    monocyte = differential.row("monocyte")
    assert monocyte.percent == pytest.approx(5.0)
    assert (monocyte.ci_low_percent, monocyte.ci_high_percent) == pytest.approx((2.43, 9.00), abs=0.01)
    assert monocyte.mark is RangeMark.WITHIN

    # 0 eosinophils in 200: below 1 % on the point, but the interval reaches 1.8 %: not conclusive.
    eosinophil = differential.row("eosinophil")
    assert eosinophil.count == 0 and eosinophil.ci_low_percent == 0.0
    assert eosinophil.mark is RangeMark.POSSIBLY_BELOW

    # 5 % basophils: the whole interval (2.4-9.0 %) lies above 0-2 %.
    assert differential.row("basophil").mark is RangeMark.ABOVE
    assert differential.row("lymphocyte").mark is RangeMark.WITHIN  # 25 %

    erythroblast = differential.row("erythroblast")
    assert not erythroblast.in_denominator and erythroblast.percent == pytest.approx(2.0)  # per 100 leukocytes
    assert erythroblast.reference is None and erythroblast.mark is None
    assert differential.row("immature_granulocyte").count == 0


def test_differential_without_denominator_exclusions_is_over_all_accepted_cells():
    frame = predictions("pbc8", "v1", {"neutrophil": 3, "platelet": 1})
    differential = compute_differential(frame, "pbc8", EIGHT_CLASSES)
    assert differential.denominator_cells == 4
    assert differential.row("platelet").percent == pytest.approx(25.0)
    assert differential.denominator_label == "accepted cells"


def test_differential_with_nothing_accepted_has_no_percentages():
    frame = predictions("pbc8", "v1", {"neutrophil": 0}, referred=3)
    differential = compute_differential(frame, "pbc8", EIGHT_CLASSES, reference_ranges=ReferenceRanges())
    assert differential.accepted_cells == 0 and differential.referred_cells == 3
    assert all(row.percent is None and row.mark is None for row in differential.rows)


def test_differential_refuses_mixed_model_versions_and_unknown_classes():
    mixed = pd.concat([predictions("pbc8", "v1", {"neutrophil": 2}), predictions("pbc8", "v2", {"neutrophil": 2}, prefix="d")])
    with pytest.raises(ValueError, match="several model versions"):
        compute_differential(mixed, "pbc8", EIGHT_CLASSES)
    assert compute_differential(mixed, "pbc8", EIGHT_CLASSES, model_version="v2").model_version == "v2"
    with pytest.raises(ValueError, match="outside"):
        compute_differential(predictions("pbc8", "v1", {"blast": 1}), "pbc8", EIGHT_CLASSES)


def _primary(counts: dict[str, int], referred: int = 0):
    return compute_differential(
        predictions("pbc8", "v1", counts, referred=referred),
        "pbc8",
        EIGHT_CLASSES,
        reference_ranges=ReferenceRanges(),
        outside_denominator=NON_LEUKOCYTE_CLASSES,
    )


def test_a_normal_smear_raises_no_flags():
    primary = _primary({"neutrophil": 120, "lymphocyte": 60, "monocyte": 12, "eosinophil": 6, "basophil": 2}, referred=5)
    dysplasia = compute_differential(
        predictions("dysplasia", "d1", {"neutrophil": 110, "hypogranulated_neutrophil": 10}, prefix="n"),
        "dysplasia",
        DYSPLASIA_CLASSES,
    )
    assert smear_flags(primary, [dysplasia]) == []


def test_flags_a_haematologist_acts_on():
    primary = _primary(
        {"neutrophil": 50, "lymphocyte": 20, "monocyte": 5, "immature_granulocyte": 3, "erythroblast": 2}, referred=15
    )
    dysplasia = compute_differential(
        predictions("dysplasia", "d1", {"neutrophil": 40, "hypogranulated_neutrophil": 10}, prefix="n"),
        "dysplasia",
        DYSPLASIA_CLASSES,
    )
    malignancy = compute_differential(
        predictions("lymph", "l1", {"lymphocyte": 18, "malignant_lymphocyte": 2}, prefix="l"),
        "lymph",
        ("lymphocyte", "malignant_lymphocyte"),
    )
    flags = {flag.code: flag.message for flag in smear_flags(primary, [dysplasia, malignancy])}
    assert set(flags) == {
        FlagCode.IMMATURE_GRANULOCYTES_PRESENT,
        FlagCode.ERYTHROBLASTS_PRESENT,
        FlagCode.SUSPECTED_MALIGNANT_LYMPHOCYTES,
        FlagCode.REVIEW_FOR_MYELODYSPLASIA,
        FlagCode.MANY_REFERRED_CELLS,
        FlagCode.LOW_CELL_COUNT,
    }
    assert "10 of 50" in flags[FlagCode.REVIEW_FOR_MYELODYSPLASIA]  # 20 % > 12.3 %
    assert "15 of 95" in flags[FlagCode.MANY_REFERRED_CELLS]
    assert "78 leukocytes" in flags[FlagCode.LOW_CELL_COUNT]


def test_dysplasia_flag_follows_the_threshold():
    dysplasia = compute_differential(
        predictions("dysplasia", "d1", {"neutrophil": 88, "hypogranulated_neutrophil": 12}), "dysplasia", DYSPLASIA_CLASSES
    )
    share = dysplastic_neutrophil_share(dysplasia)
    assert (share.count, share.of, share.share) == (12, 100, pytest.approx(0.12))
    primary = _primary({"neutrophil": 100, "lymphocyte": 40})
    assert smear_flags(primary, [dysplasia]) == []  # 0.12 is not above 0.123
    lowered = FlagSettings(dysplasia_share_threshold=0.10)
    assert [flag.code for flag in smear_flags(primary, [dysplasia], lowered)] == [FlagCode.REVIEW_FOR_MYELODYSPLASIA]
    # The 8-class model has no hypogranulated class, so it yields no share.
    assert dysplastic_neutrophil_share(primary) is None


def test_analyser_agreement_share_and_kappa():
    model = ["neutrophil"] * 8 + ["lymphocyte"] * 2
    analyser = ["neutrophil"] * 7 + ["lymphocyte"] * 3
    agreement = analyser_agreement(model, analyser)
    assert (agreement.cells, agreement.agreeing, agreement.share) == (10, 9, pytest.approx(0.9))
    # po = 0.9, pe = 0.8 * 0.7 + 0.2 * 0.3 = 0.62 -> kappa = 0.28 / 0.38
    assert agreement.kappa == pytest.approx(0.28 / 0.38)
    same = analyser_agreement(["neutrophil"] * 3, ["neutrophil"] * 3)
    assert same.share == 1.0 and same.kappa is None  # chance agreement is 1: kappa undefined
    assert analyser_agreement([], []).share is None
    with pytest.raises(ValueError):
        analyser_agreement(["a"], [])


def test_fit_smear_threshold_finds_the_youden_optimum():
    shares = [0.00, 0.02, 0.05, 0.08, 0.10, 0.11, 0.14, 0.16, 0.20, 0.35, 0.09, 0.30]
    labels = [False, False, False, False, False, False, True, True, True, True, True, False]
    fit = fit_smear_threshold(shares, labels)
    # Flagging above 0.125 catches 4 of 5 MDS smears and clears 6 of 7 others: J = 0.8 + 6/7 - 1.
    assert fit.threshold == pytest.approx(0.125)
    assert (fit.sensitivity, fit.specificity) == (pytest.approx(0.8), pytest.approx(6 / 7))
    assert fit.youden_j == pytest.approx(0.8 + 6 / 7 - 1)
    assert (fit.positive_smears, fit.negative_smears) == (5, 7)
    assert 0.5 < fit.auc < 1.0


def test_fit_smear_threshold_separable_smears_and_ties_prefer_sensitivity():
    fit = fit_smear_threshold([0.01, 0.03, 0.05, 0.20, 0.25], [False, False, False, True, True])
    assert fit.threshold == pytest.approx(0.125) and fit.youden_j == pytest.approx(1.0) and fit.auc == 1.0
    # Two cut points with J = 0.5: the lower one (more sensitive) wins.
    tied = fit_smear_threshold([0.1, 0.2, 0.3, 0.4], [False, True, False, True])
    assert tied.threshold == pytest.approx(0.15)
    assert (tied.sensitivity, tied.specificity) == (1.0, 0.5)


def test_fit_smear_threshold_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="both kinds"):
        fit_smear_threshold([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="same share"):
        fit_smear_threshold([0.1, 0.1], [True, False])
    with pytest.raises(ValueError, match="chance"):
        fit_smear_threshold([0.1, 0.2], [True, False])
    with pytest.raises(ValueError, match="within"):
        fit_smear_threshold([0.1, math.nan], [True, False])
