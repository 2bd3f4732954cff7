"""The per-smear report: differential with intervals and reference-range marks, flags, referrals, the
models and thresholds used. One content model renders to Markdown and to HTML, so the two never differ.

The report names the smear only by its pseudonym. It has no field for anything else about the patient,
and ``build_smear_report`` refuses a smear id that is not a pseudonym (an accession number passed by
mistake would otherwise end up in every copy of the report).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from hema_pipeline.anonymise.pseudonymise import PSEUDONYM_HEX_CHARS
from hema_pipeline.inference.agreement import AnalyserAgreement, analyser_agreement
from hema_pipeline.inference.differential import (
    DEFAULT_CONFIDENCE_LEVEL,
    NON_LEUKOCYTE_CLASSES,
    Differential,
    DifferentialRow,
    RangeMark,
    ReferenceRanges,
    compute_differential,
)
from hema_pipeline.inference.flags import Flag, FlagSettings, dysplastic_neutrophil_share, smear_flags
from hema_pipeline.inference.routing import REFERRAL_REASONS, Route, merge_cell_results, stage_order, validate_routes
from hema_pipeline.modeling.contract import ModelContract

SMEAR_PSEUDONYM = re.compile(rf"S[0-9a-f]{{{PSEUDONYM_HEX_CHARS}}}")

REPORT_DISCLAIMER = (
    "Automated pre-classification for review by a technologist or haematologist; not a diagnosis. "
    "Referred cells are left out of every count until a person classifies them."
)


@dataclass(frozen=True)
class ReportSettings:
    flags: FlagSettings = field(default_factory=FlagSettings)
    reference_ranges: ReferenceRanges = field(default_factory=ReferenceRanges)
    confidence: float = DEFAULT_CONFIDENCE_LEVEL

    def to_dict(self) -> dict[str, Any]:
        return {
            "confidence": self.confidence,
            "flags": self.flags.to_dict(),
            "reference_ranges": self.reference_ranges.to_dict(),
        }


@dataclass(frozen=True)
class SmearReport:
    smear_id: str
    created_at: dt.datetime  # UTC
    primary: Differential
    specialists: tuple[Differential, ...]
    flags: tuple[Flag, ...]
    total_cells: int
    referred_cells: int
    referrals_by_reason: Mapping[str, int]
    agreement: AnalyserAgreement | None  # None when no analyser classes were given
    models: tuple[Mapping[str, Any], ...]  # ModelContract.decision_settings of each model, in stage order
    settings: ReportSettings

    @property
    def model_versions(self) -> dict[str, str]:
        return {model["task"]: model["model_version"] for model in self.models}

    @property
    def thresholds(self) -> dict[str, Any]:
        """Everything that decided this report's numbers and flags besides the images."""
        return {"models": [dict(model) for model in self.models], **self.settings.to_dict()}

    @property
    def report_version(self) -> str:
        """Same models and thresholds, same version: a re-run replaces its report instead of adding one."""
        canonical = json.dumps(self.thresholds, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def differentials(self) -> tuple[Differential, ...]:
        return (self.primary, *self.specialists)

    def to_dict(self) -> dict[str, Any]:
        return {
            "smear_id": self.smear_id,
            "report_version": self.report_version,
            "created_at": self.created_at.isoformat(),
            "total_cells": self.total_cells,
            "referred_cells": self.referred_cells,
            "referrals_by_reason": dict(self.referrals_by_reason),
            "differentials": [differential.to_dict() for differential in self.differentials()],
            "flags": [flag.to_dict() for flag in self.flags],
            "agreement": None if self.agreement is None else self.agreement.to_dict(),
            "thresholds": self.thresholds,
        }

    def markdown(self) -> str:
        return "\n\n".join(block.markdown() for block in _report_blocks(self)) + "\n"

    def html(self) -> str:
        body = "\n".join(block.html() for block in _report_blocks(self))
        title = html.escape(f"Blood smear report {self.smear_id}")
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{title}</title>\n<style>{_HTML_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
        )


def build_smear_report(
    smear_id: str,
    predictions: pd.DataFrame,
    contracts: Mapping[str, ModelContract],
    primary_task: str,
    routes: Sequence[Route] = (),
    *,
    analyser_classes: Mapping[str, str] | None = None,
    settings: ReportSettings = ReportSettings(),
    created_at: dt.datetime | None = None,
) -> SmearReport:
    """The report for one smear from its prediction table (cell keys are cell_uids ``<smear_id>:<n>``).

    ``contracts`` hold the model of each task that ran; only rows of those model versions are used, so a
    table that also holds an older model's predictions gives the same report. ``analyser_classes``
    (cell_uid -> the analyser's pre-classification) adds agreement with the analyser."""
    if not SMEAR_PSEUDONYM.fullmatch(smear_id):
        raise ValueError("smear_id must be a smear pseudonym ('S' + hex); a report never carries other identifiers")
    validate_routes(primary_task, routes, contracts)
    tasks = stage_order(primary_task, routes)
    current = pd.concat(
        [
            predictions[(predictions["task"] == task) & (predictions["model_version"] == contracts[task].model_version)]
            for task in tasks
        ],
        ignore_index=True,
    )
    foreign = [key for key in current["cell_key"] if not str(key).startswith(f"{smear_id}:")]
    if foreign:
        raise ValueError(f"{len(foreign)} predictions are not cells of {smear_id} (e.g. {foreign[0]!r})")

    primary_contract = contracts[primary_task]
    primary = compute_differential(
        current,
        primary_task,
        primary_contract.class_names,
        model_version=primary_contract.model_version,
        reference_ranges=settings.reference_ranges,
        outside_denominator=[name for name in NON_LEUKOCYTE_CLASSES if name in primary_contract.class_names],
        confidence=settings.confidence,
    )
    specialists = []
    for task in tasks[1:]:
        routed_classes = sorted({route.from_class for route in routes if route.to_task == task})
        specialists.append(
            compute_differential(
                current,
                task,
                contracts[task].class_names,
                model_version=contracts[task].model_version,
                denominator_label=" / ".join(_readable(name) for name in routed_classes) + " cells",
                confidence=settings.confidence,
            )
        )
    flags = smear_flags(primary, specialists, settings.flags)

    cells = merge_cell_results(current, primary_task, routes)
    referred = cells[~cells["accepted"].astype(bool)]
    reason_counts = referred["referral_reason"].value_counts()
    referrals_by_reason = {reason: int(reason_counts.get(reason, 0)) for reason in REFERRAL_REASONS}

    agreement = None
    if analyser_classes is not None:
        compared = cells[cells["accepted"].astype(bool) & cells["cell_key"].isin(list(analyser_classes))]
        agreement = analyser_agreement(compared["final_class"].tolist(), [analyser_classes[key] for key in compared["cell_key"]])

    return SmearReport(
        smear_id=smear_id,
        created_at=created_at or dt.datetime.now(dt.UTC).replace(tzinfo=None),
        primary=primary,
        specialists=tuple(specialists),
        flags=tuple(flags),
        total_cells=len(cells),
        referred_cells=len(referred),
        referrals_by_reason=referrals_by_reason,
        agreement=agreement,
        models=tuple(contracts[task].decision_settings() for task in tasks),
        settings=settings,
    )


# ---------------------------------------------------------------------------------------------------
# Content model: blocks that render to Markdown and HTML


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_|<>\[\]#])")


def _md(text: str) -> str:
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


@dataclass(frozen=True)
class _Heading:
    level: int
    text: str

    def markdown(self) -> str:
        return f"{'#' * self.level} {_md(self.text)}"

    def html(self) -> str:
        return f"<h{self.level}>{html.escape(self.text)}</h{self.level}>"


@dataclass(frozen=True)
class _Paragraph:
    text: str

    def markdown(self) -> str:
        return _md(self.text)

    def html(self) -> str:
        return f"<p>{html.escape(self.text)}</p>"


@dataclass(frozen=True)
class _Bullets:
    items: tuple[str, ...]

    def markdown(self) -> str:
        return "\n".join(f"- {_md(item)}" for item in self.items)

    def html(self) -> str:
        items = "".join(f"<li>{html.escape(item)}</li>" for item in self.items)
        return f"<ul>{items}</ul>"


@dataclass(frozen=True)
class _Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...]  # right-aligned columns

    def markdown(self) -> str:
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(_md(cell) for cell in cells) + " |"

        rule = "|" + "|".join("---:" if numeric else ":---" for numeric in self.numeric) + "|"
        return "\n".join([line(self.header), rule, *(line(row) for row in self.rows)])

    def html(self) -> str:
        def cell(tag: str, text: str, numeric: bool) -> str:
            style = ' class="num"' if numeric else ""
            return f"<{tag}{style}>{html.escape(text)}</{tag}>"

        head = "".join(cell("th", text, numeric) for text, numeric in zip(self.header, self.numeric, strict=True))
        body = "".join(
            "<tr>" + "".join(cell("td", text, numeric) for text, numeric in zip(row, self.numeric, strict=True)) + "</tr>"
            for row in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_Block = _Heading | _Paragraph | _Bullets | _Table

_HTML_STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
    "table{border-collapse:collapse;margin:0.5em 0}th,td{border:1px solid #999;padding:0.2em 0.6em}"
    "td.num,th.num{text-align:right}"
)

_MARK_TEXT = {
    RangeMark.WITHIN: "within",
    RangeMark.ABOVE: "ABOVE",
    RangeMark.BELOW: "BELOW",
    RangeMark.POSSIBLY_ABOVE: "possibly above",
    RangeMark.POSSIBLY_BELOW: "possibly below",
}


def _readable(cell_class: str) -> str:
    return cell_class.replace("_", " ")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _differential_table(differential: Differential, with_ranges: bool) -> _Table:
    confidence = f"{differential.confidence:.0%} CI"
    header = ["Class", "Count", f"% of {differential.denominator_label}", confidence]
    numeric = [False, True, True, True]
    if with_ranges:
        header += ["Reference %", "Range"]
        numeric += [True, False]
    rows = []
    for row in differential.rows:
        rows.append(tuple(_differential_cells(row, with_ranges)))
    return _Table(tuple(header), tuple(rows), tuple(numeric))


def _differential_cells(row: DifferentialRow, with_ranges: bool) -> list[str]:
    percent = _number(row.percent)
    if row.percent is not None and not row.in_denominator:
        percent += " per 100"
    interval = "-" if row.ci_low_percent is None else f"{_number(row.ci_low_percent)}-{_number(row.ci_high_percent)}"
    cells = [_readable(row.cell_class), str(row.count), percent, interval]
    if with_ranges:
        reference = "" if row.reference is None else f"{row.reference.low_percent:g}-{row.reference.high_percent:g}"
        cells += [reference, "" if row.mark is None else _MARK_TEXT[row.mark]]
    return cells


def _report_blocks(report: SmearReport) -> list[_Block]:
    blocks: list[_Block] = [
        _Heading(1, f"Blood smear report {report.smear_id}"),
        _Paragraph(
            f"Created {report.created_at:%Y-%m-%d %H:%M} UTC. Report version {report.report_version}. {REPORT_DISCLAIMER}"
        ),
        _Heading(2, "Cells"),
    ]
    reasons = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in report.referrals_by_reason.items() if count)
    blocks.append(
        _Table(
            ("Cells", "Number"),
            (
                ("analysed", str(report.total_cells)),
                ("counted (accepted by every model that saw them)", str(report.total_cells - report.referred_cells)),
                ("referred for review" + (f" ({reasons})" if reasons else ""), str(report.referred_cells)),
            ),
            (False, True),
        )
    )

    blocks.append(_Heading(2, "Flags"))
    blocks.append(_Bullets(tuple(flag.message for flag in report.flags)) if report.flags else _Paragraph("No flags."))

    primary = report.primary
    blocks.append(_Heading(2, f"Differential ({primary.task}, model {primary.model_version})"))
    blocks.append(
        _Paragraph(
            f"{primary.denominator_cells} {primary.denominator_label} counted of {primary.accepted_cells} accepted cells; "
            f"{primary.referred_cells} referred."
        )
    )
    blocks.append(_differential_table(primary, with_ranges=True))
    notes = [
        f"Intervals are exact (Clopper-Pearson) {primary.confidence:.0%} intervals.",
        f"Range: ABOVE / BELOW when the whole interval lies outside the reference range; possibly above / "
        f"possibly below when only the point estimate does (this count cannot tell: count more cells). "
        f"Reference ranges: {report.settings.reference_ranges.source.rstrip('.')}.",
    ]
    if any(not row.in_denominator for row in primary.rows):
        outside = " and ".join(_readable(row.cell_class) + "s" for row in primary.rows if not row.in_denominator)
        notes.append(f"{outside.capitalize()} are not leukocytes: they are given per 100 {primary.denominator_label}.")
    blocks.append(_Bullets(tuple(notes)))

    for specialist in report.specialists:
        blocks.append(_Heading(2, f"Routed cells: {specialist.task} (model {specialist.model_version})"))
        if specialist.total_cells == 0:
            blocks.append(_Paragraph("No cells were routed to this model."))
            continue
        blocks.append(
            _Paragraph(
                f"{specialist.accepted_cells} of {specialist.total_cells} {specialist.denominator_label} accepted by this model; "
                f"{specialist.referred_cells} referred."
            )
        )
        blocks.append(_differential_table(specialist, with_ranges=False))
        share = dysplastic_neutrophil_share(specialist)
        if share is not None:
            threshold = report.settings.flags.dysplasia_share_threshold
            blocks.append(
                _Paragraph(
                    f"Hypogranulated-neutrophil share {share.share:.1%} ({specialist.confidence:.0%} CI "
                    f"{share.ci_low:.1%}-{share.ci_high:.1%}); review for myelodysplasia above {threshold:.1%}."
                )
            )

    if report.agreement is not None:
        agreement = report.agreement
        blocks.append(_Heading(2, "Agreement with the analyser's pre-classification"))
        if agreement.cells == 0:
            blocks.append(_Paragraph("No counted cell has an analyser class to compare."))
        else:
            kappa = "undefined (one class only)" if agreement.kappa is None else f"{agreement.kappa:.2f}"
            blocks.append(
                _Paragraph(
                    f"{agreement.agreeing} of {agreement.cells} counted cells agree ({agreement.share:.1%}); Cohen's kappa {kappa}."
                )
            )

    blocks.append(_Heading(2, "Models and thresholds"))
    model_rows = []
    for model in report.models:
        thresholds = ", ".join(
            f"{_readable(name)} {'refer all' if value is None else format(value, 'g')}"
            for name, value in model["class_thresholds"].items()
        )
        ood = "none" if model["ood_threshold"] is None else f"{model['ood_threshold']:g} ({model['ood_method']})"
        model_rows.append((model["task"], model["model_version"], f"{model['temperature']:g}", ood, thresholds))
    blocks.append(
        _Table(
            ("Task", "Model version", "Temperature", "OOD threshold (unfamiliar above)", "Minimum confidence by class"),
            tuple(model_rows),
            (False, False, True, True, False),
        )
    )
    flag_settings = report.settings.flags
    blocks.append(
        _Bullets(
            (
                f"Myelodysplasia review above a hypogranulated-neutrophil share of {flag_settings.dysplasia_share_threshold:g}.",
                f"Many referred cells above a share of {flag_settings.max_referred_share:g}; "
                f"low cell count below {flag_settings.min_counted_leukocytes} leukocytes.",
                f"Presence flags from {flag_settings.min_immature_granulocytes} immature granulocyte(s), "
                f"{flag_settings.min_erythroblasts} erythroblast(s), {flag_settings.min_malignant_lymphocytes} suspected malignant lymphocyte(s).",
            )
        )
    )
    return blocks
