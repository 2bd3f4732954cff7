"""The smear report built from constructed two-stage predictions: rows, flags, thresholds, Markdown and
HTML from the same content, and a version that only changes with the models or thresholds."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

import pandas as pd
import pytest

from hema_pipeline.inference.differential import clopper_pearson
from hema_pipeline.inference.flags import FlagCode, FlagSettings
from hema_pipeline.inference.report import ReportSettings, build_smear_report
from hema_pipeline.inference.routing import thesis_routes
from hema_pipeline_tests.support import model_contract

SMEAR = "S" + "0a1b2c3d4e" * 2
EIGHT = ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte", "immature_granulocyte", "erythroblast", "platelet")
CARDS = {
    "pbc8": model_contract("pbc8", "pbc8-aaaa", EIGHT, 96, 1.3, {name: 0.7 for name in EIGHT} | {"basophil": None}, -4.5),
    "dysplasia": model_contract(
        "dysplasia",
        "dys-bbbb",
        ("neutrophil", "hypogranulated_neutrophil"),
        128,
        1.1,
        {"neutrophil": 0.8, "hypogranulated_neutrophil": 0.9},
    ),
    "lymphoid": model_contract(
        "lymphoid", "lym-cccc", ("lymphocyte", "malignant_lymphocyte"), 128, 0.9, {"lymphocyte": 0.6, "malignant_lymphocyte": 0.6}
    ),
}
ROUTES = thesis_routes("pbc8", "dysplasia", "lymphoid")
CREATED = dt.datetime(2026, 11, 20, 9, 30)


Cell = tuple[int, str, str | None]  # cell number, predicted class, referral reason


def rows_for(task: str, cells: Sequence[Cell]) -> pd.DataFrame:
    card = CARDS[task]
    return pd.DataFrame(
        {
            "cell_key": [f"{SMEAR}:{number}" for number, _, _ in cells],
            "task": task,
            "model_version": card.model_version,
            "predicted_class": [cell_class for _, cell_class, _ in cells],
            "confidence": 0.95,
            "energy": -7.0,
            "ood_score": float("nan"),
            "accepted": [reason is None for _, _, reason in cells],
            "referral_reason": pd.Series([reason for _, _, reason in cells], dtype=object),
            "probabilities": [{name: 1.0 / len(card.class_names) for name in card.class_names} for _ in cells],
        }
    )


def smear_predictions() -> pd.DataFrame:
    """150 cells: 80 neutrophils (12 hypogranulated by the dysplasia model, 2 referred by it), 40
    lymphocytes (1 malignant), 12 monocytes, 4 eosinophils, 2 immature granulocytes, 2 erythroblasts,
    10 cells referred by the 8-class model (6 low confidence, 4 unfamiliar)."""
    primary: list[Cell] = []
    counts = {"neutrophil": 80, "lymphocyte": 40, "monocyte": 12, "eosinophil": 4, "immature_granulocyte": 2, "erythroblast": 2}
    number = 1
    for cell_class, count in counts.items():
        for _ in range(count):
            primary.append((number, cell_class, None))
            number += 1
    primary += [(number + index, "monocyte", "low_confidence") for index in range(6)]
    primary += [(number + 6 + index, "monocyte", "unfamiliar") for index in range(4)]
    neutrophils = [cell for cell in primary if cell[1] == "neutrophil"]
    lymphocytes = [cell for cell in primary if cell[1] == "lymphocyte"]
    dysplasia: list[Cell] = [(n, "hypogranulated_neutrophil", None) for n, _, _ in neutrophils[:12]]
    dysplasia += [(n, "neutrophil", "low_confidence") for n, _, _ in neutrophils[12:14]]
    dysplasia += [(n, "neutrophil", None) for n, _, _ in neutrophils[14:]]
    lymphoid: list[Cell] = [(lymphocytes[0][0], "malignant_lymphocyte", None)]
    lymphoid += [(n, "lymphocyte", None) for n, _, _ in lymphocytes[1:]]
    # An older model's rows for the same smear must not change the report.
    stale = rows_for("pbc8", [(n, "platelet", None) for n, _, _ in primary]).assign(model_version="pbc8-old")
    return pd.concat(
        [rows_for("pbc8", primary), rows_for("dysplasia", dysplasia), rows_for("lymphoid", lymphoid), stale], ignore_index=True
    )


def build(settings: ReportSettings = ReportSettings(), analyser: dict[str, str] | None = None):
    return build_smear_report(
        SMEAR, smear_predictions(), CARDS, "pbc8", ROUTES, analyser_classes=analyser, settings=settings, created_at=CREATED
    )


def interval(count: int, total: int) -> str:
    low, high = clopper_pearson(count, total)
    return f"{100 * low:.1f}-{100 * high:.1f}"


def test_report_numbers_and_flags():
    report = build()
    assert (report.total_cells, report.referred_cells) == (150, 12)
    assert dict(report.referrals_by_reason) == {"unfamiliar": 4, "low_confidence": 8}
    assert report.primary.denominator_cells == 138  # 140 accepted minus 2 erythroblasts
    assert report.model_versions == {"pbc8": "pbc8-aaaa", "dysplasia": "dys-bbbb", "lymphoid": "lym-cccc"}
    dysplasia = report.specialists[0]
    assert (dysplasia.total_cells, dysplasia.accepted_cells, dysplasia.count("hypogranulated_neutrophil")) == (80, 78, 12)
    codes = {flag.code for flag in report.flags}
    assert codes == {
        FlagCode.IMMATURE_GRANULOCYTES_PRESENT,
        FlagCode.ERYTHROBLASTS_PRESENT,
        FlagCode.SUSPECTED_MALIGNANT_LYMPHOCYTES,
        FlagCode.REVIEW_FOR_MYELODYSPLASIA,  # 12 / 78 = 15.4 % > 12.3 %
    }
    relaxed = build(ReportSettings(flags=FlagSettings(dysplasia_share_threshold=0.2)))
    assert FlagCode.REVIEW_FOR_MYELODYSPLASIA not in {flag.code for flag in relaxed.flags}


def test_markdown_has_the_differential_rows_flags_and_thresholds():
    markdown = build().markdown()
    assert markdown.startswith(f"# Blood smear report {SMEAR}\n")
    # 80 neutrophils of 138 leukocytes = 58.0 %; 4 eosinophils = 2.9 %; 2 erythroblasts per 100 leukocytes.
    assert f"| neutrophil | 80 | 58.0 | {interval(80, 138)} | 40-80 | within |" in markdown
    assert f"| lymphocyte | 40 | 29.0 | {interval(40, 138)} | 20-40 | within |" in markdown
    assert f"| basophil | 0 | 0.0 | {interval(0, 138)} | 0-2 | within |" in markdown
    assert f"| eosinophil | 4 | 2.9 | {interval(4, 138)} | 1-6 | within |" in markdown
    assert "| erythroblast | 2 | 1.4 per 100 |" in markdown
    assert f"| hypogranulated neutrophil | 12 | 15.4 | {interval(12, 78)} |" in markdown
    assert "| referred for review (4 unfamiliar, 8 low confidence) | 12 |" in markdown
    assert "review for myelodysplasia" in markdown
    assert "| pbc8 | pbc8-aaaa | 1.3 | -4.5 (energy) |" in markdown
    assert "basophil refer all" in markdown
    assert "Myelodysplasia review above a hypogranulated-neutrophil share of 0.123." in markdown
    assert "pbc8-old" not in markdown


def test_html_renders_the_same_content_escaped():
    report = build()
    page = report.html()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert f"<h1>Blood smear report {SMEAR}</h1>" in page
    low_high = interval(80, 138)
    assert f'<td>neutrophil</td><td class="num">80</td><td class="num">58.0</td><td class="num">{low_high}</td>' in page
    markdown_tables = [line for line in report.markdown().splitlines() if re.fullmatch(r"\|(:?-+:?\|)+", line)]
    assert page.count("<table>") == len(markdown_tables) == 5
    # Every flag message appears in both renderings.
    for flag in report.flags:
        assert flag.message.split(":")[0] in page


def test_agreement_with_the_analyser():
    predictions = smear_predictions()
    primary = predictions[(predictions["task"] == "pbc8") & (predictions["model_version"] == "pbc8-aaaa")]
    analyser = dict(zip(primary["cell_key"], primary["predicted_class"], strict=True))
    # The analyser calls the 12 hypogranulated neutrophils plain neutrophils: they disagree.
    report = build(analyser=analyser)
    agreement = report.agreement
    assert agreement.cells == 138  # accepted by every stage; the 2 erythroblasts count, 12 referred do not
    assert agreement.agreeing == 138 - 12 - 1  # 12 hypogranulated + 1 malignant lymphocyte refined away
    assert "Agreement with the analyser" in report.markdown()


def test_report_version_changes_only_with_models_or_thresholds():
    first, again = build(), build()
    assert first.report_version == again.report_version
    assert re.fullmatch(r"[0-9a-f]{16}", first.report_version)
    other_threshold = build(ReportSettings(flags=FlagSettings(dysplasia_share_threshold=0.15)))
    assert other_threshold.report_version != first.report_version
    assert first.thresholds["models"][0]["class_thresholds"]["basophil"] is None  # refer-all, JSON-safe


def test_only_pseudonymous_smears_and_their_own_cells():
    with pytest.raises(ValueError, match="pseudonym"):
        build_smear_report("ACC-2026-000123", smear_predictions(), CARDS, "pbc8", ROUTES)
    foreign = smear_predictions().assign(cell_key=lambda frame: frame["cell_key"].str.replace(SMEAR, "S" + "f" * 20))
    with pytest.raises(ValueError, match="not cells of"):
        build_smear_report(SMEAR, foreign, CARDS, "pbc8", ROUTES)


def test_text_from_cards_is_escaped_in_both_renderings():
    odd = dict(CARDS)
    odd["lymphoid"] = model_contract(
        "lymphoid", "lym<b>|&", ("lymphocyte", "malignant_lymphocyte"), 128, 1.0, {"lymphocyte": 0.5, "malignant_lymphocyte": 0.5}
    )
    predictions = smear_predictions()
    predictions.loc[predictions["task"] == "lymphoid", "model_version"] = "lym<b>|&"
    report = build_smear_report(SMEAR, predictions, odd, "pbc8", ROUTES, created_at=CREATED)
    assert "lym&lt;b&gt;|&amp;" in report.html() and "<b>" not in report.html()
    assert "lym\\<b\\>\\|&" in report.markdown()
