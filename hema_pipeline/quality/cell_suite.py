"""Quality checks of the imported cell table, with Great Expectations 1.x, as plain typed results.

``validate_cell_table`` runs seven check groups over a frame of the ``cells`` table (sql/schema.sql) and
returns one ``CheckGroupResult`` per group: its success and, per expectation, the type, column, success,
unexpected count and a few unexpected examples. Each group is meant to become one blocking asset check.

    schema                  expected columns and types; image_sha256 is a SHA-256 hex digest
    keys_not_null           no missing value in any column the schema declares ``not null``
    labels_in_taxonomy      analyser_class and verified_class (where present) are taxonomy classes
    image_dimensions        stored image width and height within the configured ranges
    unique_identity         one row per cell_uid, one cell per image content hash
    no_patient_identifiers  no identifying column names; identity columns hold pseudonyms and
                            content-addressed keys only; no date-, record-number- or e-mail-like values
                            in any other text column
    class_minimums          enough verified cells in every class of each configured task

Nothing a check reports may itself leak: examples from the identifier group are row positions (0-based,
in the frame validated), never values, and examples from other groups that look identifying are replaced
by ``<redacted>``.

GX is imported lazily (it takes seconds); running expectations on a frame is ``quality.gx_runtime``'s job.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import pandas as pd

from hema_pipeline import settings, taxonomy
from hema_pipeline.anonymise.pseudonymise import PSEUDONYM_HEX_CHARS
from hema_pipeline.datasets.tasks import TASKS, get_task
from hema_pipeline.quality.gx_runtime import exception_messages, gx_runtime, run_expectations

if TYPE_CHECKING:
    from great_expectations.expectations import Expectation

SCHEMA: Final = "schema"
KEYS_NOT_NULL: Final = "keys_not_null"
LABELS_IN_TAXONOMY: Final = "labels_in_taxonomy"
IMAGE_DIMENSIONS: Final = "image_dimensions"
UNIQUE_IDENTITY: Final = "unique_identity"
NO_PATIENT_IDENTIFIERS: Final = "no_patient_identifiers"
CLASS_MINIMUMS: Final = "class_minimums"

CHECK_GROUPS: Final[dict[str, str]] = {
    SCHEMA: "The cell table has the expected columns and types.",
    KEYS_NOT_NULL: "Every required column has a value in every row.",
    LABELS_IN_TAXONOMY: "Analyser and verified labels are classes of the taxonomy.",
    IMAGE_DIMENSIONS: "Stored images have the expected width and height.",
    UNIQUE_IDENTITY: "Cells and image contents are unique.",
    NO_PATIENT_IDENTIFIERS: "No column or value looks like a patient identifier.",
    CLASS_MINIMUMS: "Every class of each task has enough verified cells.",
}

STRING: Final = "string"
INTEGER: Final = "integer"
TIMESTAMP: Final = "timestamp"
# The cells table of sql/schema.sql: column -> (kind, nullable)
CELL_TABLE_COLUMNS: Final[dict[str, tuple[str, bool]]] = {
    "cell_uid": (STRING, False),
    "smear_id": (STRING, False),
    "patient_id": (STRING, False),
    "cell_id": (INTEGER, False),
    "image_sha256": (STRING, False),
    "image_key": (STRING, False),
    "width": (INTEGER, False),
    "height": (INTEGER, False),
    "analyser_class": (STRING, False),
    "verified_class": (STRING, True),
    "import_run_id": (STRING, False),
    "imported_at": (TIMESTAMP, False),
}
# Type names as GX 1.x resolves them for pandas columns. Text columns are handed to GX as object columns,
# whose values GX checks one by one (GX 1.24 does not recognise pandas 3's ``str`` dtype in type lists).
_TYPE_NAMES: Final[dict[str, list[str]]] = {
    STRING: ["str"],
    INTEGER: [
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "Int8Dtype",
        "Int16Dtype",
        "Int32Dtype",
        "Int64Dtype",
        "UInt8Dtype",
        "UInt16Dtype",
        "UInt32Dtype",
        "UInt64Dtype",
    ],
    TIMESTAMP: ["datetime64[ns]", "datetime64[us]", "datetime64[ms]", "datetime64[s]"],
}

SHA256_PATTERN: Final = r"^[0-9a-f]{64}$"
_PSEUDONYM = f"[0-9a-f]{{{PSEUDONYM_HEX_CHARS}}}"
# Identity columns and the only form their values may take (hema_pipeline.anonymise.pseudonymise and the
# importer's content-addressed image keys). A raw record number or accession in one of them fails here.
IDENTITY_COLUMN_PATTERNS: Final[dict[str, str]] = {
    "patient_id": f"^P{_PSEUDONYM}$",
    "smear_id": f"^S{_PSEUDONYM}$",
    "cell_uid": f"^S{_PSEUDONYM}:[0-9]+$",
    "image_key": r"^images/[0-9a-f]{2}/[0-9a-f]{64}\.jpg$",
}
# Words that name identifying data, matched as whole words of a column name (snake_case or camelCase).
IDENTIFYING_NAME_WORDS: Final[tuple[str, ...]] = (
    "name",
    "names",
    "firstname",
    "lastname",
    "surname",
    "fullname",
    "initials",
    "mrn",
    "record",
    "records",
    "nhs",
    "ssn",
    "accession",
    "birth",
    "birthdate",
    "birthday",
    "dob",
    "dateofbirth",
    "comment",
    "comments",
    "note",
    "notes",
    "remark",
    "remarks",
    "file",
    "filename",
    "filepath",
    "path",
    "address",
    "postcode",
    "zip",
    "phone",
    "telephone",
    "email",
)
IDENTIFYING_NAME_PATTERN: Final = r"(?:^|_)(?:" + "|".join(IDENTIFYING_NAME_WORDS) + r")(?:_|$)"
# Values that look like an identifier in free text: an ISO or day/month/year date, a run of six or more
# digits standing alone (record numbers; pseudonyms and hashes are hex runs mixed with letters), an e-mail.
# Groups are non-capturing: GX hands the pattern to pandas' str.contains, which warns about capturing ones.
IDENTIFYING_VALUE_PATTERN: Final = (
    r"(?:19|20)[0-9]{2}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
    r"|(?:^|[^0-9])(?:[0-2]?[0-9]|3[01])[/.](?:0?[1-9]|1[0-2])[/.](?:19|20)[0-9]{2}(?:[^0-9]|$)"
    r"|(?:^|[^0-9A-Za-z])[0-9]{6,}(?:[^0-9A-Za-z]|$)"
    r"|[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+\.[A-Za-z0-9.-]+"
)
_IDENTIFYING_VALUE = re.compile(IDENTIFYING_VALUE_PATTERN)
REDACTED: Final = "<redacted>"


@dataclass(frozen=True)
class CellTableRules:
    """What the checks accept. Defaults fit CellaVision DM96 crops (360x363, a few 366x369 / 360x360)."""

    # The range the import accepts (HEMA_CELL_MIN_SIDE_PX..HEMA_CELL_MAX_SIDE_PX): the check guards it.
    width_range: tuple[int, int] = field(default_factory=settings.cell_side_range)
    height_range: tuple[int, int] = field(default_factory=settings.cell_side_range)
    # tasks whose classes need ``min_verified_per_class`` verified cells each
    tasks: tuple[str, ...] = tuple(TASKS)
    min_verified_per_class: int = 20
    # Columns beyond the schema fail the schema group: drift must be a deliberate change here.
    allow_extra_columns: bool = False
    max_examples: int = 5

    def __post_init__(self) -> None:
        for task in self.tasks:
            get_task(task)
        for low, high in (self.width_range, self.height_range):
            if not 0 < low <= high:
                raise ValueError(f"invalid dimension range ({low}, {high})")
        if self.min_verified_per_class < 0 or self.max_examples < 0:
            raise ValueError("minimums and example counts must not be negative")


@dataclass(frozen=True)
class ExpectationOutcome:
    expectation_type: str  # the GX expectation, e.g. "expect_column_values_to_not_be_null"
    column: str | None  # None for table-level expectations
    success: bool
    unexpected_count: int | None  # None for expectations about the whole column or table
    unexpected_examples: tuple[str, ...] = ()
    detail: str | None = None  # observed value, scope (e.g. which task), or why GX could not evaluate

    def as_dict(self) -> dict[str, Any]:
        return {
            "expectation": self.expectation_type,
            "column": self.column,
            "success": self.success,
            "unexpected_count": self.unexpected_count,
            "unexpected_examples": list(self.unexpected_examples),
            "detail": self.detail,
        }


@dataclass(frozen=True)
class CheckGroupResult:
    name: str
    description: str
    success: bool
    expectations: tuple[ExpectationOutcome, ...] = field(default_factory=tuple)

    @property
    def failures(self) -> tuple[ExpectationOutcome, ...]:
        return tuple(outcome for outcome in self.expectations if not outcome.success)

    def summary(self) -> str:
        if self.success:
            return f"{self.name}: {len(self.expectations)} expectations passed"
        described = [
            f"{outcome.expectation_type}({outcome.column or 'table'})"
            + (f": {outcome.unexpected_count} unexpected" if outcome.unexpected_count else "")
            + (f" [{outcome.detail}]" if outcome.detail else "")
            for outcome in self.failures
        ]
        return f"{self.name}: {len(self.failures)} of {len(self.expectations)} failed: " + "; ".join(described)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for asset-check metadata."""
        return {
            "name": self.name,
            "description": self.description,
            "success": self.success,
            "expectations": [outcome.as_dict() for outcome in self.expectations],
        }

    def markdown_table(self) -> str:
        lines = ["| expectation | column | success | unexpected | examples | detail |", "|---|---|---|---|---|---|"]
        for outcome in self.expectations:
            cells = [
                outcome.expectation_type,
                outcome.column or "",
                "yes" if outcome.success else "**no**",
                "" if outcome.unexpected_count is None else str(outcome.unexpected_count),
                ", ".join(outcome.unexpected_examples),
                outcome.detail or "",
            ]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        return "\n".join(lines)


# How a check shows unexpected examples: the values themselves; row positions only (identifier checks,
# whose values must not be repeated); the original column names; or "class: count" from the count frame.
ExampleSource = Literal["values", "rows", "column_names", "class_counts"]


@dataclass(frozen=True)
class _Planned:
    group: str
    expectation: Expectation
    column: str | None
    examples: ExampleSource = "values"
    detail: str | None = None


def _run_suite(frame: pd.DataFrame, planned: Sequence[_Planned], max_examples: int) -> list[Any]:
    """GX validation results, in the order of ``planned``."""
    return run_expectations(frame, [item.expectation for item in planned], max_examples)


def _display_value(value: Any) -> str:
    text = str(value)
    return REDACTED if _IDENTIFYING_VALUE.search(text) else text


def _outcome(item: _Planned, result: Any, frame: pd.DataFrame, max_examples: int) -> ExpectationOutcome:
    details = result.result or {}
    errors = exception_messages(result.exception_info)
    count = details.get("unexpected_count")
    if item.examples == "rows":
        examples = [f"row {index}" for index in details.get("partial_unexpected_index_list") or []]
    elif item.examples == "column_names":
        examples = [str(frame.at[index, "original_name"]) for index in details.get("partial_unexpected_index_list") or []]
    elif item.examples == "class_counts":
        examples = [
            f"{frame.at[index, 'task_class']}: {frame.at[index, 'verified_cells']}"
            for index in details.get("partial_unexpected_index_list") or []
        ]
    else:
        examples = [_display_value(value) for value in details.get("partial_unexpected_list") or []]
    detail_parts = [item.detail] if item.detail else []
    if errors:
        detail_parts.append("not evaluated: " + errors[0].splitlines()[0])
    elif "observed_value" in details and count is None:
        observed = details["observed_value"]
        mismatch = (details.get("details") or {}).get("mismatched")
        if mismatch:
            detail_parts.append(f"missing {mismatch.get('missing', [])}, unexpected {mismatch.get('unexpected', [])}")
        else:
            detail_parts.append(f"observed {observed}")
    return ExpectationOutcome(
        expectation_type=result.expectation_config.type,
        column=item.column,
        success=bool(result.success) and not errors,
        unexpected_count=None if count is None else int(count),
        unexpected_examples=tuple(examples[:max_examples]),
        detail="; ".join(detail_parts) or None,
    )


# --- the check groups ------------------------------------------------------------------------------------


def _text_columns(frame: pd.DataFrame) -> list[str]:
    return [
        column
        for column in frame.columns
        if pd.api.types.is_string_dtype(frame[column]) or pd.api.types.is_object_dtype(frame[column])
    ]


def _table_expectations(frame: pd.DataFrame, rules: CellTableRules) -> list[_Planned]:
    import great_expectations.expectations as gxe

    planned = [
        _Planned(
            SCHEMA,
            gxe.ExpectTableColumnsToMatchSet(column_set=list(CELL_TABLE_COLUMNS), exact_match=not rules.allow_extra_columns),
            None,
        )
    ]
    for column, (kind, _) in CELL_TABLE_COLUMNS.items():
        planned.append(_Planned(SCHEMA, gxe.ExpectColumnValuesToBeInTypeList(column=column, type_list=_TYPE_NAMES[kind]), column))
    planned.append(
        _Planned(SCHEMA, gxe.ExpectColumnValuesToMatchRegex(column="image_sha256", regex=SHA256_PATTERN), "image_sha256")
    )

    for column, (_, nullable) in CELL_TABLE_COLUMNS.items():
        if not nullable:
            planned.append(_Planned(KEYS_NOT_NULL, gxe.ExpectColumnValuesToNotBeNull(column=column), column))

    for column in ("analyser_class", "verified_class"):
        # GX skips nulls here, so an unverified cell passes; only a present, unknown label fails
        planned.append(
            _Planned(
                LABELS_IN_TAXONOMY,
                gxe.ExpectColumnValuesToBeInSet(column=column, value_set=list(taxonomy.CELL_CLASSES)),
                column,
            )
        )

    for column, (low, high) in (("width", rules.width_range), ("height", rules.height_range)):
        planned.append(
            _Planned(
                IMAGE_DIMENSIONS,
                gxe.ExpectColumnValuesToBeBetween(column=column, min_value=low, max_value=high),
                column,
            )
        )

    for column in ("cell_uid", "image_sha256"):
        planned.append(_Planned(UNIQUE_IDENTITY, gxe.ExpectColumnValuesToBeUnique(column=column), column))

    for column, pattern in IDENTITY_COLUMN_PATTERNS.items():
        planned.append(
            _Planned(
                NO_PATIENT_IDENTIFIERS,
                gxe.ExpectColumnValuesToMatchRegex(column=column, regex=pattern),
                column,
                examples="rows",
            )
        )
    for column in _text_columns(frame):
        if column not in IDENTITY_COLUMN_PATTERNS:
            planned.append(
                _Planned(
                    NO_PATIENT_IDENTIFIERS,
                    gxe.ExpectColumnValuesToNotMatchRegex(column=column, regex=IDENTIFYING_VALUE_PATTERN),
                    column,
                    examples="rows",
                )
            )
    return planned


def _snake_case(name: str) -> str:
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(name))
    return re.sub(r"[^0-9a-z]+", "_", spaced.lower()).strip("_")


def _column_name_frame(frame: pd.DataFrame) -> pd.DataFrame:
    # Names normalised to snake_case so "patientName", "Patient Name" and "patient_name" all match.
    originals = [str(column) for column in frame.columns]
    return pd.DataFrame(
        {
            "column_name": pd.Series([_snake_case(name) for name in originals], dtype=object),
            "original_name": pd.Series(originals, dtype=object),
        }
    )


def _class_count_frame(frame: pd.DataFrame, rules: CellTableRules) -> pd.DataFrame:
    verified = frame["verified_class"] if "verified_class" in frame.columns else pd.Series(dtype=object)
    label_counts = verified.dropna().astype(str).value_counts()
    rows = []
    for task_name in rules.tasks:
        task = get_task(task_name)
        for task_class in task.classes:
            cells = sum(int(label_counts.get(label, 0)) for label in task.source_labels(task_class))
            rows.append({"task": task.name, "task_class": task_class, "verified_cells": cells})
    return pd.DataFrame(rows, columns=["task", "task_class", "verified_cells"]).astype({"verified_cells": "int64"})


def _gx_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as GX should see it: row positions as the index (examples name rows by position) and
    text columns as object dtype (see ``_TYPE_NAMES``). The caller's frame is not modified."""
    prepared = frame.reset_index(drop=True)
    for column in prepared.columns:
        if pd.api.types.is_string_dtype(prepared[column]) and not pd.api.types.is_object_dtype(prepared[column]):
            prepared[column] = prepared[column].astype(object).where(prepared[column].notna(), None)
    return prepared


def validate_cell_table(
    cells: pd.DataFrame,
    rules: CellTableRules | None = None,
    groups: Sequence[str] | None = None,
) -> dict[str, CheckGroupResult]:
    """Run the check groups (all by default, or those named in ``groups``) over ``cells``.

    Returns group name -> result, in ``CHECK_GROUPS`` order. A missing column makes the expectations on it
    fail with a ``detail`` saying so; it never raises."""
    rules = rules or CellTableRules()
    wanted = list(CHECK_GROUPS) if groups is None else list(groups)
    unknown = sorted(set(wanted) - set(CHECK_GROUPS))
    if unknown:
        raise ValueError(f"unknown check groups {unknown}; known: {list(CHECK_GROUPS)}")

    gx_runtime()  # before any GX import below: it configures GX (telemetry off) and builds the context once
    frame = _gx_frame(cells)
    outcomes: dict[str, list[ExpectationOutcome]] = {name: [] for name in CHECK_GROUPS if name in wanted}

    def run(target: pd.DataFrame, planned: list[_Planned]) -> None:
        planned = [item for item in planned if item.group in outcomes]
        if not planned:
            return
        for item, result in zip(planned, _run_suite(target, planned, rules.max_examples), strict=True):
            outcomes[item.group].append(_outcome(item, result, target, rules.max_examples))

    run(frame, _table_expectations(frame, rules))
    if NO_PATIENT_IDENTIFIERS in outcomes:
        import great_expectations.expectations as gxe

        # column names are not patient data, so these examples show the names themselves
        names = _column_name_frame(frame)
        run(
            names,
            [
                _Planned(
                    NO_PATIENT_IDENTIFIERS,
                    gxe.ExpectColumnValuesToNotMatchRegex(column="column_name", regex=IDENTIFYING_NAME_PATTERN),
                    "column names",
                    examples="column_names",
                )
            ],
        )
    if CLASS_MINIMUMS in outcomes and rules.tasks:
        import great_expectations.expectations as gxe
        from great_expectations.expectations.row_conditions import Column

        counts = _class_count_frame(frame, rules)
        run(
            counts,
            [
                _Planned(
                    CLASS_MINIMUMS,
                    gxe.ExpectColumnValuesToBeBetween(
                        column="verified_cells",
                        min_value=rules.min_verified_per_class,
                        row_condition=Column("task") == task,
                    ),
                    "verified_class",
                    examples="class_counts",
                    detail=f"task {task}: at least {rules.min_verified_per_class} verified cells per class",
                )
                for task in rules.tasks
            ],
        )
    return {
        name: CheckGroupResult(
            name=name,
            description=CHECK_GROUPS[name],
            success=all(outcome.success for outcome in group_outcomes),
            expectations=tuple(group_outcomes),
        )
        for name, group_outcomes in outcomes.items()
    }
