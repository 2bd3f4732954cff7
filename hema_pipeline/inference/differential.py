"""The smear differential with exact intervals and reference-range marks. Review flags are in
``inference.flags``, agreement with the analyser in ``inference.agreement``, the smear-level thresholds
fitted on labelled smears in ``inference.smear_thresholds``.

Why exact intervals: a differential is a binomial count. CLSI H20-A2 (Rümke's table) shows how wide it
is: a true 5 % reads anywhere from 2.4 % to 9.0 % on a 200-cell count. Clopper–Pearson intervals give
those limits exactly and never shrink to zero width at 0 or n cells, as the normal approximation does.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from hema_pipeline.taxonomy import (
    BASOPHIL,
    EOSINOPHIL,
    ERYTHROBLAST,
    LYMPHOCYTE,
    MONOCYTE,
    NEUTROPHIL,
    PLATELET,
)

DEFAULT_CONFIDENCE_LEVEL = 0.95

# Nucleated red cells and platelets are not leukocytes: by convention (ICSH, CLSI H20-A2) they are kept
# out of the leukocyte differential and reported per 100 leukocytes, and the reference ranges below are
# percentages of leukocytes. The SQL view `differential_per_smear` uses the same list.
NON_LEUKOCYTE_CLASSES: tuple[str, ...] = (ERYTHROBLAST, PLATELET)


def clopper_pearson(successes: int, trials: int, confidence: float = DEFAULT_CONFIDENCE_LEVEL) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided interval for a binomial proportion.

    The beta quantiles are undefined at the edges, where the exact limits are 0 (no successes) and 1
    (all successes): those bounds are returned as such, not approximated."""
    if trials < 1:
        raise ValueError("an interval needs at least one trial")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be within [0, {trials}], got {successes}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    from scipy.stats import beta  # scipy.stats costs seconds to import; every Dagster run process imports this module

    tail = (1.0 - confidence) / 2.0
    lower = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    upper = 1.0 if successes == trials else float(beta.ppf(1.0 - tail, successes + 1, trials - successes))
    return lower, upper


def per_hundred_interval(count: int, denominator: int, confidence: float = DEFAULT_CONFIDENCE_LEVEL) -> tuple[float, float]:
    """Exact interval for ``count`` cells per 100 ``denominator`` cells (e.g. erythroblasts per 100
    leukocytes), by conditioning on the total: count ~ Binomial(count + denominator, p) and the ratio is
    p / (1 - p). The upper limit is infinite when no denominator cell was counted."""
    if denominator < 1:
        raise ValueError("a ratio needs at least one denominator cell")
    lower, upper = clopper_pearson(count, count + denominator, confidence)
    return 100.0 * lower / (1.0 - lower), (math.inf if upper >= 1.0 else 100.0 * upper / (1.0 - upper))


# ---------------------------------------------------------------------------------------------------
# Reference ranges


@dataclass(frozen=True)
class ReferenceRange:
    low_percent: float
    high_percent: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.low_percent <= self.high_percent <= 100.0:
            raise ValueError(f"invalid reference range {self.low_percent}-{self.high_percent} %")


class RangeMark(enum.StrEnum):
    """Where a class's share lies against its reference range, judged by its exact interval.

    ABOVE / BELOW: the whole interval lies outside the range (outside with the interval's confidence).
    POSSIBLY_ABOVE / POSSIBLY_BELOW: the point estimate is outside but the interval reaches into the
    range, so this count cannot tell; counting more cells (CLSI: 2 x 200) can.
    WITHIN: the point estimate is inside the range."""

    WITHIN = "within"
    ABOVE = "above"
    BELOW = "below"
    POSSIBLY_ABOVE = "possibly_above"
    POSSIBLY_BELOW = "possibly_below"


def range_mark(percent: float, ci_low_percent: float, ci_high_percent: float, reference: ReferenceRange) -> RangeMark:
    if ci_low_percent > reference.high_percent:
        return RangeMark.ABOVE
    if ci_high_percent < reference.low_percent:
        return RangeMark.BELOW
    if percent > reference.high_percent:
        return RangeMark.POSSIBLY_ABOVE
    if percent < reference.low_percent:
        return RangeMark.POSSIBLY_BELOW
    return RangeMark.WITHIN


@dataclass(frozen=True)
class ReferenceRanges:
    """Adult leukocyte differential, % of leukocytes. Defaults: the adult reference values given in
    Dacie and Lewis Practical Haematology (Bain, Bates, Laffan; 12th ed., 2017, chapter "Reference
    ranges and normal values"): neutrophils 40-80 %, lymphocytes 20-40 %, monocytes 2-10 %,
    eosinophils 1-6 %, basophils <1-2 %. Ranges depend on the population and the method: a lab
    replaces them with its own validated ranges."""

    neutrophil: ReferenceRange = ReferenceRange(40.0, 80.0)
    lymphocyte: ReferenceRange = ReferenceRange(20.0, 40.0)
    monocyte: ReferenceRange = ReferenceRange(2.0, 10.0)
    eosinophil: ReferenceRange = ReferenceRange(1.0, 6.0)
    basophil: ReferenceRange = ReferenceRange(0.0, 2.0)
    source: str = "adult reference values, Dacie and Lewis Practical Haematology, 12th ed."

    def by_class(self) -> dict[str, ReferenceRange]:
        return {
            NEUTROPHIL: self.neutrophil,
            LYMPHOCYTE: self.lymphocyte,
            MONOCYTE: self.monocyte,
            EOSINOPHIL: self.eosinophil,
            BASOPHIL: self.basophil,
        }

    def to_dict(self) -> dict[str, Any]:
        ranges = {name: [reference.low_percent, reference.high_percent] for name, reference in self.by_class().items()}
        return {"percent_of_leukocytes": ranges, "source": self.source}


# ---------------------------------------------------------------------------------------------------
# The differential


@dataclass(frozen=True)
class DifferentialRow:
    cell_class: str
    count: int
    # % of the differential's denominator for classes in it; per 100 denominator cells for classes kept
    # out of it (erythroblasts, platelets). None when nothing was counted.
    percent: float | None
    ci_low_percent: float | None
    ci_high_percent: float | None
    in_denominator: bool
    reference: ReferenceRange | None = None
    mark: RangeMark | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "class": self.cell_class,
            "count": self.count,
            "percent": self.percent,
            "ci_low_percent": self.ci_low_percent,
            "ci_high_percent": None if self.ci_high_percent is None or math.isinf(self.ci_high_percent) else self.ci_high_percent,
            "in_denominator": self.in_denominator,
            "reference_percent": None if self.reference is None else [self.reference.low_percent, self.reference.high_percent],
            "mark": None if self.mark is None else str(self.mark),
        }


@dataclass(frozen=True)
class Differential:
    """One model's differential on one smear: counts over the cells it accepted."""

    task: str
    model_version: str
    total_cells: int  # cells this model classified
    referred_cells: int
    accepted_cells: int
    denominator_cells: int  # accepted cells in the denominator (accepted leukocytes for a WBC differential)
    denominator_label: str  # what the percentages are of, for the report
    confidence: float
    rows: tuple[DifferentialRow, ...]

    def row(self, cell_class: str) -> DifferentialRow | None:
        return next((row for row in self.rows if row.cell_class == cell_class), None)

    def count(self, cell_class: str) -> int:
        found = self.row(cell_class)
        return 0 if found is None else found.count

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "model_version": self.model_version,
            "total_cells": self.total_cells,
            "referred_cells": self.referred_cells,
            "accepted_cells": self.accepted_cells,
            "denominator_cells": self.denominator_cells,
            "denominator_label": self.denominator_label,
            "confidence": self.confidence,
            "rows": [row.to_dict() for row in self.rows],
        }


def compute_differential(
    predictions: pd.DataFrame,
    task: str,
    class_names: Sequence[str],
    *,
    model_version: str | None = None,
    reference_ranges: ReferenceRanges | None = None,
    outside_denominator: Sequence[str] = (),
    denominator_label: str | None = None,
    confidence: float = DEFAULT_CONFIDENCE_LEVEL,
) -> Differential:
    """Counts and percentages with exact intervals for one task's rows of a prediction table.

    Only accepted cells are counted; referred cells await a technologist. Classes in
    ``outside_denominator`` (``NON_LEUKOCYTE_CLASSES`` for a leukocyte differential) are counted but kept
    out of the denominator and reported per 100 denominator cells. ``reference_ranges`` apply only to a
    leukocyte differential: a specialist model's percentages are of the cells routed to it.

    ``model_version`` selects one model's rows; without it the task's rows must all come from one."""
    rows_of_task = predictions[predictions["task"] == task]
    if model_version is not None:
        rows_of_task = rows_of_task[rows_of_task["model_version"] == model_version]
    versions = rows_of_task["model_version"].unique().tolist()
    if len(versions) > 1:
        raise ValueError(f"{task!r} predictions come from several model versions {versions}: choose one")
    if model_version is None:
        model_version = versions[0] if versions else ""
    if rows_of_task["cell_key"].duplicated().any():
        raise ValueError(f"a cell appears twice in the {task!r} predictions")
    accepted_mask = rows_of_task["accepted"].astype(bool)
    accepted_classes = rows_of_task.loc[accepted_mask, "predicted_class"]
    unknown = sorted(set(accepted_classes) - set(class_names))
    if unknown:
        raise ValueError(f"{task!r} predictions name classes outside {list(class_names)}: {unknown}")
    counts = accepted_classes.value_counts()
    excluded = set(outside_denominator)
    denominator = int(sum(int(counts.get(name, 0)) for name in class_names if name not in excluded))
    ranges = reference_ranges.by_class() if reference_ranges is not None else {}

    rows = []
    for name in class_names:
        count = int(counts.get(name, 0))
        in_denominator = name not in excluded
        percent = low = high = None
        if denominator > 0:
            percent = 100.0 * count / denominator
            if in_denominator:
                low_share, high_share = clopper_pearson(count, denominator, confidence)
                low, high = 100.0 * low_share, 100.0 * high_share
            else:
                low, high = per_hundred_interval(count, denominator, confidence)
        reference = ranges.get(name) if in_denominator else None
        mark = None
        if reference is not None and percent is not None and low is not None and high is not None:
            mark = range_mark(percent, low, high, reference)
        rows.append(DifferentialRow(name, count, percent, low, high, in_denominator, reference, mark))

    if denominator_label is None:
        denominator_label = "leukocytes" if excluded else "accepted cells"
    return Differential(
        task=task,
        model_version=model_version,
        total_cells=len(rows_of_task),
        referred_cells=int((~accepted_mask).sum()),
        accepted_cells=int(accepted_mask.sum()),
        denominator_cells=denominator,
        denominator_label=denominator_label,
        confidence=confidence,
        rows=tuple(rows),
    )
