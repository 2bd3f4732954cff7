"""The cell-table quality checks (Great Expectations 1.x): clean rows pass every group, each planted fault
fails exactly the group meant to catch it, and no check result repeats an identifying value."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable

import pandas as pd
import pytest

from hema_pipeline.quality.cell_suite import (
    CHECK_GROUPS,
    CLASS_MINIMUMS,
    IMAGE_DIMENSIONS,
    KEYS_NOT_NULL,
    LABELS_IN_TAXONOMY,
    NO_PATIENT_IDENTIFIERS,
    REDACTED,
    SCHEMA,
    UNIQUE_IDENTITY,
    CellTableRules,
    validate_cell_table,
)
from hema_pipeline.quality.gx_runtime import gx_runtime
from hema_pipeline.storage.warehouse import Warehouse, replace_rows
from hema_pipeline.taxonomy import CELL_CLASSES


def _hex(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def clean_cells(patients: int = 6, cells_per_patient: int = 40) -> pd.DataFrame:
    """Rows as the importer writes them: pseudonyms, content-addressed keys, every taxonomy class verified
    in some cells, a few cells unverified."""
    rows = []
    for patient in range(patients):
        patient_id = "P" + _hex(f"patient-{patient}", 20)
        smear_id = "S" + _hex(f"smear-{patient}", 20)
        for cell in range(1, cells_per_patient + 1):
            sha = _hex(f"image-{patient}-{cell}", 64)
            label = CELL_CLASSES[cell % len(CELL_CLASSES)]
            rows.append(
                {
                    "cell_uid": f"{smear_id}:{cell}",
                    "smear_id": smear_id,
                    "patient_id": patient_id,
                    "cell_id": cell,
                    "image_sha256": sha,
                    "image_key": f"images/{sha[:2]}/{sha}.jpg",
                    "width": 360,
                    "height": 363,
                    "analyser_class": label,
                    "verified_class": None if cell % 9 == 0 else label,
                    "import_run_id": _hex(f"run-{patient}", 32),
                    "imported_at": dt.datetime(2026, 3, 1, 8, 30),
                }
            )
    return pd.DataFrame(rows).astype({"cell_id": "int32", "width": "int32", "height": "int32"})


RULES = CellTableRules(min_verified_per_class=10)


def failing_groups(results: dict[str, object]) -> set[str]:
    return {name for name, result in results.items() if not result.success}


def test_clean_rows_pass_every_group():
    results = validate_cell_table(clean_cells(), RULES)
    assert list(results) == list(CHECK_GROUPS)
    assert failing_groups(results) == set(), [result.summary() for result in results.values()]
    assert all(len(result.expectations) > 0 for result in results.values())


def test_rows_read_back_from_the_warehouse_pass(tmp_path):
    """The real cells table (sql/schema.sql) as DuckDB hands it to pandas: int32, timestamps, text."""
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    with warehouse.connect() as connection:
        replace_rows(connection, "cells", clean_cells(), ["cell_uid"])
    cells = warehouse.query("select * from cells")
    assert failing_groups(validate_cell_table(cells, RULES)) == set()


def _null_key(cells: pd.DataFrame) -> None:
    cells.loc[3, "cell_uid"] = None


def _unknown_label(cells: pd.DataFrame) -> None:
    cells.loc[4, "verified_class"] = "blast"


def _unknown_analyser_label(cells: pd.DataFrame) -> None:
    cells.loc[4, "analyser_class"] = "smudge_cell"


def _wide_image(cells: pd.DataFrame) -> None:
    cells.loc[5, "width"] = 1024


def _tiny_image(cells: pd.DataFrame) -> None:
    cells.loc[5, "height"] = 40


def _duplicate_hash(cells: pd.DataFrame) -> None:
    cells.loc[6, "image_sha256"] = cells.loc[7, "image_sha256"]
    cells.loc[6, "image_key"] = cells.loc[7, "image_key"]


def _duplicate_cell(cells: pd.DataFrame) -> None:
    cells.loc[8, "cell_uid"] = cells.loc[9, "cell_uid"]


def _record_number_as_patient(cells: pd.DataFrame) -> None:
    cells.loc[10, "patient_id"] = "20480193"


def _birth_date_in_text(cells: pd.DataFrame) -> None:
    cells.loc[11, "import_run_id"] = "dob 1961-03-04"


def _day_month_year_in_text(cells: pd.DataFrame) -> None:
    cells.loc[11, "import_run_id"] = "04/03/1961"


def _file_name_as_key(cells: pd.DataFrame) -> None:
    cells.loc[12, "image_key"] = "images/ab/SMITH_JOHN_cell12.jpg"


def _text_column_type(cells: pd.DataFrame) -> None:
    cells["width"] = cells["width"].astype(str)


def _missing_column(cells: pd.DataFrame) -> None:
    del cells["height"]


PLANTED: dict[str, tuple[Callable[[pd.DataFrame], None], set[str], str]] = {
    # fault: (plant, groups that must fail, column of the failing expectation)
    "null key": (_null_key, {KEYS_NOT_NULL}, "cell_uid"),
    "unknown verified label": (_unknown_label, {LABELS_IN_TAXONOMY}, "verified_class"),
    "unknown analyser label": (_unknown_analyser_label, {LABELS_IN_TAXONOMY}, "analyser_class"),
    "width out of range": (_wide_image, {IMAGE_DIMENSIONS}, "width"),
    "height out of range": (_tiny_image, {IMAGE_DIMENSIONS}, "height"),
    "duplicate content hash": (_duplicate_hash, {UNIQUE_IDENTITY}, "image_sha256"),
    "duplicate cell uid": (_duplicate_cell, {UNIQUE_IDENTITY}, "cell_uid"),
    "record number as patient id": (_record_number_as_patient, {NO_PATIENT_IDENTIFIERS}, "patient_id"),
    "ISO birth date in a text column": (_birth_date_in_text, {NO_PATIENT_IDENTIFIERS}, "import_run_id"),
    "d/m/y date in a text column": (_day_month_year_in_text, {NO_PATIENT_IDENTIFIERS}, "import_run_id"),
    "original file name as image key": (_file_name_as_key, {NO_PATIENT_IDENTIFIERS}, "image_key"),
    "text where an integer belongs": (_text_column_type, {SCHEMA, IMAGE_DIMENSIONS}, "width"),
}


@pytest.mark.parametrize("fault", list(PLANTED))
def test_each_planted_fault_fails_its_group(fault):
    plant, expected_groups, column = PLANTED[fault]
    cells = clean_cells()
    plant(cells)
    results = validate_cell_table(cells, RULES)
    assert failing_groups(results) == expected_groups, [result.summary() for result in results.values()]
    failed_columns = {outcome.column for name in expected_groups for outcome in results[name].failures}
    assert column in failed_columns


def test_a_missing_column_fails_the_schema_without_raising():
    cells = clean_cells()
    _missing_column(cells)
    results = validate_cell_table(cells, RULES)
    schema = results[SCHEMA]
    assert not schema.success
    [table_outcome] = [outcome for outcome in schema.failures if outcome.column is None]
    assert "height" in (table_outcome.detail or "")
    [height_outcome] = [outcome for outcome in results[IMAGE_DIMENSIONS].failures if outcome.column == "height"]
    assert "not evaluated" in (height_outcome.detail or "")


def test_identifying_column_names_fail_in_any_spelling():
    cells = clean_cells()
    for name in ("patient_name", "dateOfBirth", "MRN", "Original File", "comment"):
        cells[name] = "x"
    cells["pathology_flag"] = "x"  # "path" inside a longer word is not a file path
    results = validate_cell_table(cells, CellTableRules(min_verified_per_class=10, allow_extra_columns=True))
    assert failing_groups(results) == {NO_PATIENT_IDENTIFIERS}
    [names] = [outcome for outcome in results[NO_PATIENT_IDENTIFIERS].failures if outcome.column == "column names"]
    assert names.unexpected_count == 5
    assert set(names.unexpected_examples) == {"patient_name", "dateOfBirth", "MRN", "Original File", "comment"}


def test_extra_columns_fail_the_schema_unless_allowed():
    cells = clean_cells()
    cells["stain_batch"] = "b1"
    assert failing_groups(validate_cell_table(cells, RULES)) == {SCHEMA}
    relaxed = CellTableRules(min_verified_per_class=10, allow_extra_columns=True)
    assert failing_groups(validate_cell_table(cells, relaxed)) == set()


def test_results_never_repeat_an_identifying_value():
    cells = clean_cells()
    cells.loc[10, "patient_id"] = "20480193"
    cells.loc[11, "import_run_id"] = "dob 1961-03-04 jane.doe@example.org"
    cells.loc[12, "verified_class"] = "1961-03-04"  # an unknown label that is really a birth date
    results = validate_cell_table(cells, RULES)
    reported = json.dumps([result.as_dict() for result in results.values()]) + "".join(
        result.markdown_table() + result.summary() for result in results.values()
    )
    for needle in ("20480193", "1961-03-04", "jane.doe"):
        assert needle not in reported
    identifier_examples = {
        example for outcome in results[NO_PATIENT_IDENTIFIERS].failures for example in outcome.unexpected_examples
    }
    # row 12 too: the date-like "label" is caught by the value scan of verified_class as well
    assert identifier_examples == {"row 10", "row 11", "row 12"}
    [label_outcome] = results[LABELS_IN_TAXONOMY].failures
    assert label_outcome.unexpected_examples == (REDACTED,)


def test_class_minimums_name_the_short_classes_per_task():
    cells = clean_cells()
    cells = cells[cells["verified_class"] != "basophil"].reset_index(drop=True)
    results = validate_cell_table(cells, CellTableRules(min_verified_per_class=10, tasks=("pbc8", "mono_poly", "wbc4")))
    assert failing_groups(results) == {CLASS_MINIMUMS}
    failures = {outcome.detail.split(":")[0]: outcome for outcome in results[CLASS_MINIMUMS].failures}
    assert set(failures) == {"task pbc8"}  # mono_poly's polynuclear class still has neutrophils and eosinophils
    assert failures["task pbc8"].unexpected_examples == ("basophil: 0",)

    strict = validate_cell_table(cells, CellTableRules(min_verified_per_class=1000, tasks=("wbc4",)), groups=[CLASS_MINIMUMS])
    [wbc4] = strict[CLASS_MINIMUMS].failures
    assert wbc4.unexpected_count == 4


def test_groups_can_run_alone_and_unknown_groups_are_refused():
    results = validate_cell_table(clean_cells(), RULES, groups=[UNIQUE_IDENTITY])
    assert list(results) == [UNIQUE_IDENTITY]
    with pytest.raises(ValueError, match="unknown check groups"):
        validate_cell_table(clean_cells(), RULES, groups=["nonsense"])


def test_the_gx_context_is_reused_and_left_clean():
    validate_cell_table(clean_cells(), RULES)
    runtime = gx_runtime()
    validate_cell_table(clean_cells(), RULES)
    assert gx_runtime() is runtime
    assert runtime.context.suites.all() == []
    assert runtime.context.validation_definitions.all() == []
