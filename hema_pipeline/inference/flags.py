"""When a smear goes to a haematologist: review flags over its differentials, with the settings that
decide them (``FlagSettings``, the launchpad's ``smear_flag_thresholds``)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hema_pipeline.inference.differential import (
    Differential,
    clopper_pearson,
)
from hema_pipeline.taxonomy import (
    ERYTHROBLAST,
    HYPOGRANULATED_NEUTROPHIL,
    IMMATURE_GRANULOCYTE,
    MALIGNANT_LYMPHOCYTE,
    NEUTROPHIL,
)


@dataclass(frozen=True)
class FlagSettings:
    """When a smear is flagged for a haematologist. Counts are of accepted cells."""

    # Thesis ch. 5: dysplastic-neutrophil share > 0.123 -> MDS (94.85 % accuracy on 136 new smears).
    # Re-fit it on the lab's own labelled smears: `hema thresholds fit` (inference/smear_thresholds.py).
    dysplasia_share_threshold: float = 0.123
    # Immature granulocytes, erythroblasts and blasts are absent or near-absent in healthy adult blood,
    # so one accepted cell is worth a look.
    min_immature_granulocytes: int = 1
    min_erythroblasts: int = 1
    min_malignant_lymphocytes: int = 1
    max_referred_share: float = 0.10
    # Below 100 leukocytes the intervals are too wide to read the differential (CLSI H20-A2 counts 200 x 2).
    min_counted_leukocytes: int = 100

    def __post_init__(self) -> None:
        if not 0.0 <= self.dysplasia_share_threshold <= 1.0:
            raise ValueError("dysplasia_share_threshold must be in [0, 1]")
        if not 0.0 <= self.max_referred_share <= 1.0:
            raise ValueError("max_referred_share must be in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return {
            "dysplasia_share_threshold": self.dysplasia_share_threshold,
            "min_immature_granulocytes": self.min_immature_granulocytes,
            "min_erythroblasts": self.min_erythroblasts,
            "min_malignant_lymphocytes": self.min_malignant_lymphocytes,
            "max_referred_share": self.max_referred_share,
            "min_counted_leukocytes": self.min_counted_leukocytes,
        }


class FlagCode(enum.StrEnum):
    IMMATURE_GRANULOCYTES_PRESENT = "immature_granulocytes_present"
    ERYTHROBLASTS_PRESENT = "erythroblasts_present"
    SUSPECTED_MALIGNANT_LYMPHOCYTES = "suspected_malignant_lymphocytes"
    REVIEW_FOR_MYELODYSPLASIA = "review_for_myelodysplasia"
    MANY_REFERRED_CELLS = "many_referred_cells"
    LOW_CELL_COUNT = "low_cell_count"


@dataclass(frozen=True)
class Flag:
    code: FlagCode
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": str(self.code), "message": self.message}


@dataclass(frozen=True)
class ShareEstimate:
    count: int
    of: int
    share: float
    ci_low: float
    ci_high: float


def dysplastic_neutrophil_share(differential: Differential, confidence: float | None = None) -> ShareEstimate | None:
    """Hypogranulated neutrophils among accepted neutrophils (normal + hypogranulated) of one model, or
    None when the model has no hypogranulated class or counted no neutrophils."""
    if differential.row(HYPOGRANULATED_NEUTROPHIL) is None:
        return None
    dysplastic = differential.count(HYPOGRANULATED_NEUTROPHIL)
    neutrophils = dysplastic + differential.count(NEUTROPHIL)
    if neutrophils == 0:
        return None
    low, high = clopper_pearson(dysplastic, neutrophils, confidence or differential.confidence)
    return ShareEstimate(dysplastic, neutrophils, dysplastic / neutrophils, low, high)


def _count_over(differentials: Sequence[Differential], cell_class: str) -> int:
    return sum(differential.count(cell_class) for differential in differentials)


def _percent(value: float) -> str:
    return f"{100.0 * value:.1f}%"


def smear_flags(
    primary: Differential,
    specialists: Sequence[Differential] = (),
    settings: FlagSettings = FlagSettings(),
) -> list[Flag]:
    """The flags a haematologist acts on, from the first model's differential and the specialist models'
    (whose cells are a subset of the primary's accepted cells)."""
    everything = [primary, *specialists]
    flags: list[Flag] = []

    immature = _count_over(everything, IMMATURE_GRANULOCYTE)
    if immature >= settings.min_immature_granulocytes > 0:
        flags.append(
            Flag(FlagCode.IMMATURE_GRANULOCYTES_PRESENT, f"{immature} immature granulocyte(s) counted: review the smear.")
        )
    erythroblasts = _count_over(everything, ERYTHROBLAST)
    if erythroblasts >= settings.min_erythroblasts > 0:
        flags.append(
            Flag(
                FlagCode.ERYTHROBLASTS_PRESENT,
                f"{erythroblasts} erythroblast(s) (nucleated red cells) counted: review the smear.",
            )
        )
    malignant = _count_over(everything, MALIGNANT_LYMPHOCYTE)
    if malignant >= settings.min_malignant_lymphocytes > 0:
        flags.append(
            Flag(
                FlagCode.SUSPECTED_MALIGNANT_LYMPHOCYTES,
                f"{malignant} lymphocyte(s) classified as suspected malignant: haematologist review.",
            )
        )
    for differential in everything:
        share = dysplastic_neutrophil_share(differential)
        # The point share, not its interval: the threshold was fitted on point shares (thesis, and
        # fit_smear_threshold), so comparing an interval limit would change its operating point.
        if share is not None and share.share > settings.dysplasia_share_threshold:
            flags.append(
                Flag(
                    FlagCode.REVIEW_FOR_MYELODYSPLASIA,
                    f"Hypogranulated neutrophils {share.count} of {share.of} ({_percent(share.share)}, "
                    f"{differential.confidence:.0%} CI {_percent(share.ci_low)}-{_percent(share.ci_high)}) exceed "
                    f"{_percent(settings.dysplasia_share_threshold)}: review for myelodysplasia.",
                )
            )
    # Specialists see only cells the primary accepted, so a cell is referred by at most one stage.
    referred = sum(differential.referred_cells for differential in everything)
    if primary.total_cells > 0 and referred / primary.total_cells > settings.max_referred_share:
        flags.append(
            Flag(
                FlagCode.MANY_REFERRED_CELLS,
                f"{referred} of {primary.total_cells} cells ({_percent(referred / primary.total_cells)}) referred for review "
                f"(more than {_percent(settings.max_referred_share)}): the automated differential is unreliable until they are classified.",
            )
        )
    if primary.denominator_cells < settings.min_counted_leukocytes:
        flags.append(
            Flag(
                FlagCode.LOW_CELL_COUNT,
                f"Only {primary.denominator_cells} {primary.denominator_label} counted (fewer than {settings.min_counted_leukocytes}): "
                "intervals are wide; count more cells before reading the differential.",
            )
        )
    return flags
