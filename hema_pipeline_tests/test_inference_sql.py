"""The prediction tables and views in a real warehouse, DuckDB and PostgreSQL: hand-computed differentials, champion
selection, the referral queue, lineage, verified agreement by week, and idempotent re-writes."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pandas as pd
import psycopg2
import pytest

from hema_pipeline.inference.flags import FlagSettings
from hema_pipeline.inference.records import (
    load_analyser_classes,
    load_smear_predictions,
    prediction_records,
    write_predictions,
    write_smear_report,
)
from hema_pipeline.inference.report import ReportSettings, build_smear_report
from hema_pipeline.inference.routing import Route
from hema_pipeline.storage.warehouse import Warehouse, dialect_of
from hema_pipeline_tests.support import model_contract

SMEAR_A = "S" + "a" * 20
SMEAR_B = "S" + "b" * 20
PBC_CLASSES = ("neutrophil", "lymphocyte", "monocyte", "erythroblast", "platelet")
DYSPLASIA_CLASSES = ("neutrophil", "hypogranulated_neutrophil")


# Every test here runs on both warehouse backends: the views are written twice (sql/views.sql and
# sql/postgres/views.sql), and these hand-computed answers are what keeps the two editions in step.
@pytest.fixture(params=["duckdb", "postgres"])
def connection(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    location = request.getfixturevalue("postgres_database") if request.param == "postgres" else tmp_path / "warehouse.duckdb"
    # The real warehouse applies every schema file in order.
    with Warehouse(location).connect() as connection:
        yield connection


CONSTRAINT_ERRORS = (duckdb.ConstraintException, psycopg2.IntegrityError)


def insert_model(connection: duckdb.DuckDBPyConnection, model_version: str, task: str, dataset_version: str, status: str) -> None:
    """A models row with the columns the views read; other NOT NULL columns of the registry's table get
    neutral values of their type, so the test follows that table as it grows."""
    values: dict[str, object] = {
        "model_version": model_version,
        "task": task,
        "dataset_version": dataset_version,
        "status": status,
    }
    columns = connection.execute(
        "select column_name, data_type, is_nullable from information_schema.columns where table_name = 'models'"
    ).fetchall()
    neutral = {
        "varchar": "x",
        "character varying": "x",
        "integer": 0,
        "bigint": 0,
        "double": 0.0,
        "double precision": 0.0,
        "timestamp": dt.datetime(2026, 1, 1),
        "timestamp without time zone": dt.datetime(2026, 1, 1),
        "boolean": False,
    }
    for name, data_type, nullable in columns:
        if name not in values and nullable == "NO":
            values[name] = neutral[data_type.lower()]
    names = ", ".join(values)
    connection.execute(f"insert into models ({names}) values ({', '.join('?' for _ in values)})", list(values.values()))


def record_promotion(connection, model_version: str, task: str, action: str = "promoted", previous: str | None = None) -> None:
    """A champion-changing event in the promotion log, which is what makes a model champion."""
    (sequence,) = connection.execute(
        "select coalesce(max(sequence), 0) + 1 from model_promotions where task = ?", [task]
    ).fetchall()[0]
    connection.execute(
        "insert into model_promotions (event_id, task, sequence, model_version, previous_champion, action, reason, "
        "decided_at) values (?, ?, ?, ?, ?, ?, ?, ?)",
        [f"{task}-{sequence}", task, sequence, model_version, previous, action, "test", dt.datetime(2026, 11, 1)],
    )


def insert_smear(connection, smear_id: str, collected: dt.date, cells: dict[int, tuple[str, str | None]]) -> None:
    """cells: cell number -> (analyser class, verified class or None)."""
    now = dt.datetime(2026, 11, 19, 8, 0)
    run_id = f"run-{smear_id[:4]}"
    connection.execute(
        "insert into import_runs (import_run_id, smear_id, dagster_run_id, started_at, finished_at, status, files_seen, "
        "cells_imported, cells_quarantined, cells_skipped_existing) values (?, ?, 'dagster-1', ?, ?, 'imported', ?, ?, 0, 0)",
        [run_id, smear_id, now, now, len(cells) + 1, len(cells)],
    )
    connection.execute(
        "insert into smears values (?, 'P0000000000000000000a', '40-49', 'F', ?, 'DM96-1', ?, ?, ?)",
        [smear_id, collected, len(cells), run_id, now],
    )
    for number, (analyser, verified) in cells.items():
        connection.execute(
            "insert into cells values (?, ?, 'P0000000000000000000a', ?, ?, ?, 360, 363, ?, ?, ?, ?)",
            [
                f"{smear_id}:{number}",
                smear_id,
                number,
                f"{number:064x}",
                f"images/{smear_id}/{number}.jpg",
                analyser,
                verified,
                run_id,
                now,
            ],
        )


def stage(
    smear_id: str, task: str, version: str, classes: tuple[str, ...], cells: dict[int, tuple[str, str | None]]
) -> pd.DataFrame:
    """Prediction-table rows: cell number -> (predicted class, referral reason or None)."""
    return pd.DataFrame(
        {
            "cell_key": [f"{smear_id}:{number}" for number in cells],
            "task": task,
            "model_version": version,
            "predicted_class": [cell_class for cell_class, _ in cells.values()],
            "confidence": [0.97 if reason is None else 0.41 for _, reason in cells.values()],
            "energy": -6.5,
            "ood_score": -6.5,
            "accepted": [reason is None for _, reason in cells.values()],
            "referral_reason": pd.Series([reason for _, reason in cells.values()], dtype=object),
            "probabilities": [
                {name: (0.96 if name == cell_class else 0.04 / (len(classes) - 1)) for name in classes}
                for cell_class, _ in cells.values()
            ],
        }
    )


A_PBC_V1 = {
    1: ("neutrophil", None),
    2: ("neutrophil", None),
    3: ("neutrophil", None),
    4: ("neutrophil", None),
    5: ("neutrophil", None),
    6: ("lymphocyte", None),
    7: ("lymphocyte", None),
    8: ("erythroblast", None),
    9: ("monocyte", "low_confidence"),
    10: ("lymphocyte", "unfamiliar"),
}


@pytest.fixture
def warehouse(connection):
    insert_model(connection, "pbc-v1", "pbc", "ds-1", "champion")
    insert_model(connection, "pbc-v2", "pbc", "ds-2", "candidate")
    insert_model(connection, "dys-v1", "dysplasia", "ds-1", "champion")
    record_promotion(connection, "pbc-v1", "pbc")
    record_promotion(connection, "dys-v1", "dysplasia")
    insert_smear(
        connection,
        SMEAR_A,
        dt.date(2026, 11, 18),  # a Wednesday: week starting Monday 16 November
        {
            1: ("neutrophil", "neutrophil"),
            2: ("neutrophil", None),
            3: ("neutrophil", None),
            4: ("neutrophil", None),
            5: ("neutrophil", "hypogranulated_neutrophil"),
            6: ("lymphocyte", "lymphocyte"),
            7: ("lymphocyte", None),
            8: ("erythroblast", None),
            9: ("monocyte", None),
            10: ("lymphocyte", "lymphocyte"),
        },
    )
    insert_smear(
        connection,
        SMEAR_B,
        dt.date(2026, 11, 24),
        {1: ("neutrophil", "lymphocyte"), 2: ("neutrophil", None), 3: ("neutrophil", None), 4: ("platelet", "platelet")},
    )
    champion_time = dt.datetime(2026, 11, 19, 10, 0)
    later = dt.datetime(2026, 11, 20, 10, 0)
    a_pbc_v1 = stage(SMEAR_A, "pbc", "pbc-v1", PBC_CLASSES, A_PBC_V1)
    a_pbc_v1["gradcam_key"] = [f"gradcam/pbc-v1/{SMEAR_A}/9.png" if number == 9 else None for number in A_PBC_V1]
    # A challenger run later on the same smear: everything a monocyte. The champion's rows must count.
    a_pbc_v2 = stage(SMEAR_A, "pbc", "pbc-v2", PBC_CLASSES, {number: ("monocyte", None) for number in A_PBC_V1})
    a_dysplasia = stage(
        SMEAR_A,
        "dysplasia",
        "dys-v1",
        DYSPLASIA_CLASSES,
        {n: ("neutrophil", None) for n in (1, 2, 3, 4)} | {5: ("hypogranulated_neutrophil", None)},
    )
    b_pbc_v2 = stage(
        SMEAR_B,
        "pbc",
        "pbc-v2",
        PBC_CLASSES,
        {1: ("neutrophil", None), 2: ("neutrophil", None), 3: ("neutrophil", None), 4: ("platelet", None)},
    )
    write_predictions(connection, prediction_records(pd.concat([a_pbc_v1, a_dysplasia]), SMEAR_A, "prun-1", champion_time))
    write_predictions(connection, prediction_records(a_pbc_v2, SMEAR_A, "prun-2", later))
    write_predictions(connection, prediction_records(b_pbc_v2, SMEAR_B, "prun-2", later))
    return connection


def rows(connection, sql: str, parameters=()) -> list[tuple]:
    return connection.execute(sql, list(parameters)).fetchall()


def rounded(found: list[tuple], places: int = 4) -> list[tuple]:
    """Floats rounded in Python: PostgreSQL has no round(double precision, places)."""
    return [tuple(round(value, places) if isinstance(value, float) else value for value in row) for row in found]


def test_differential_per_smear_uses_the_champion_and_counts_accepted_cells(warehouse):
    differential = rounded(
        rows(
            warehouse,
            """select cell_class, cells, accepted_cells, referred_cells, total_cells,
                  percent_of_accepted, is_leukocyte, per_100_leukocytes
           from differential_per_smear where smear_id = ? and task = 'pbc' and model_version = 'pbc-v1'
           order by cell_class""",
            [SMEAR_A],
        )
    )
    # 8 accepted cells (2 referred), 7 of them leukocytes.
    assert differential == [
        ("erythroblast", 1, 8, 2, 10, 12.5, False, round(100 / 7, 4)),
        ("lymphocyte", 2, 8, 2, 10, 25.0, True, round(200 / 7, 4)),
        ("monocyte", 0, 8, 2, 10, 0.0, True, 0.0),
        ("neutrophil", 5, 8, 2, 10, 62.5, True, round(500 / 7, 4)),
        ("platelet", 0, 8, 2, 10, 0.0, False, 0.0),
    ]
    # The later challenger run (pbc-v2) does not replace the champion's differential on smear A ...
    assert rows(
        warehouse, "select distinct model_version from differential_per_smear where smear_id = ? and task = 'pbc'", [SMEAR_A]
    ) == [("pbc-v1",)]
    # ... but where only it ran (smear B), its predictions are the current ones.
    b = rounded(
        rows(
            warehouse,
            "select cell_class, cells, percent_of_accepted, per_100_leukocytes from differential_per_smear "
            "where smear_id = ? and cells > 0 order by cell_class",
            [SMEAR_B],
        )
    )
    assert b == [("neutrophil", 3, 75.0, 100.0), ("platelet", 1, 25.0, round(100 / 3, 4))]
    dysplasia = rows(
        warehouse,
        "select cell_class, cells, percent_of_accepted from differential_per_smear where task = 'dysplasia' order by cell_class",
    )
    assert dysplasia == [("hypogranulated_neutrophil", 1, 20.0), ("neutrophil", 4, 80.0)]


def test_the_promotion_log_alone_decides_which_predictions_count(warehouse):
    """One definition of champion: the `model_champions` view over the promotion log. The models table's
    status column is a record for people; a stale or hand-edited status never changes what the lab sees."""

    def counted_on_a() -> list[tuple]:
        return rows(
            warehouse, "select distinct model_version from current_predictions where smear_id = ? and task = 'pbc'", [SMEAR_A]
        )

    warehouse.execute("update models set status = 'retired' where model_version = 'pbc-v1'")
    warehouse.execute("update models set status = 'champion' where model_version = 'pbc-v2'")
    assert counted_on_a() == [("pbc-v1",)]
    record_promotion(warehouse, "pbc-v2", "pbc", previous="pbc-v1")
    assert counted_on_a() == [("pbc-v2",)]
    assert rows(warehouse, "select model_version from model_champions where task = 'pbc'") == [("pbc-v2",)]
    record_promotion(warehouse, "pbc-v1", "pbc", action="rolled_back", previous="pbc-v2")
    assert counted_on_a() == [("pbc-v1",)]
    # A refusal changes no champion.
    record_promotion(warehouse, "pbc-v2", "pbc", action="refused", previous="pbc-v1")
    assert counted_on_a() == [("pbc-v1",)]


@pytest.mark.parametrize("backend", ["duckdb", "postgres"])
def test_current_champions_reads_the_promotion_log_on_both_backends(backend, request, tmp_path):
    from hema_pipeline.modeling.promotion import current_champion, current_champions

    location = request.getfixturevalue("postgres_database") if backend == "postgres" else tmp_path / "warehouse.duckdb"
    warehouse = Warehouse(location)
    with warehouse.connect() as connection:
        record_promotion(connection, "pbc-v1", "pbc")
        record_promotion(connection, "pbc-v2", "pbc", previous="pbc-v1")
        record_promotion(connection, "dys-v1", "dysplasia")
        record_promotion(connection, "pbc-v1", "pbc", action="rolled_back", previous="pbc-v2")
        record_promotion(connection, "dys-v2", "dysplasia", action="refused", previous="dys-v1")
    assert current_champions(warehouse, ["pbc", "dysplasia", "wbc"]) == {"pbc": "pbc-v1", "dysplasia": "dys-v1", "wbc": None}
    assert current_champion(warehouse, "pbc") == "pbc-v1"
    assert current_champions(warehouse, []) == {}


def test_referral_queue_lists_unverified_referred_cells_with_their_images(warehouse):
    queue = rows(
        warehouse,
        "select cell_uid, cell_id, task, model_version, predicted_class, referral_reason, gradcam_key, image_key, analyser_class from referral_queue",
    )
    # Cell 10 was referred too, but a technologist has verified it since.
    assert queue == [
        (
            f"{SMEAR_A}:9",
            9,
            "pbc",
            "pbc-v1",
            "monocyte",
            "low_confidence",
            f"gradcam/pbc-v1/{SMEAR_A}/9.png",
            f"images/{SMEAR_A}/9.jpg",
            "monocyte",
        )
    ]


def test_prediction_lineage_links_cell_model_dataset_and_import(warehouse):
    assert rows(warehouse, "select count(*) from prediction_lineage") == [(29,)]
    lineage = rows(
        warehouse,
        "select model_version, model_status, dataset_version, import_run_id, import_dagster_run_id, prediction_run_id "
        "from prediction_lineage where cell_uid = ? order by model_version",
        [f"{SMEAR_A}:1"],
    )
    assert lineage == [
        ("dys-v1", "champion", "ds-1", "run-Saaa", "dagster-1", "prun-1"),
        ("pbc-v1", "champion", "ds-1", "run-Saaa", "dagster-1", "prun-1"),
        ("pbc-v2", "candidate", "ds-2", "run-Saaa", "dagster-1", "prun-2"),
    ]


def test_verified_agreement_by_week(warehouse):
    agreement = rows(
        warehouse,
        """select week_start, model_version, verified_cells, agreeing_cells, agreement, accepted_cells,
                  accepted_agreement, referred_cells, outside_model_classes
           from verified_agreement order by week_start, model_version""",
    )
    week_a, week_b = dt.date(2026, 11, 16), dt.date(2026, 11, 23)
    assert agreement == [
        # Cells 1, 6 and 10 are comparable (cell 5's hypogranulated class is not a pbc class).
        (week_a, "dys-v1", 2, 2, 1.0, 2, 1.0, 0, 0),
        (week_a, "pbc-v1", 3, 3, 1.0, 2, 1.0, 1, 1),
        (week_a, "pbc-v2", 3, 0, 0.0, 3, 0.0, 0, 1),
        (week_b, "pbc-v2", 2, 1, 0.5, 2, 0.5, 0, 0),
    ]


def test_rewrites_replace_rows_and_reads_round_trip(warehouse):
    before = rows(warehouse, "select count(*) from predictions")
    again = stage(SMEAR_A, "pbc", "pbc-v1", PBC_CLASSES, A_PBC_V1 | {9: ("monocyte", None)})
    write_predictions(warehouse, prediction_records(again, SMEAR_A, "prun-3", dt.datetime(2026, 11, 21)))
    assert rows(warehouse, "select count(*) from predictions") == before
    assert rows(warehouse, "select count(*) from referral_queue") == [(0,)]  # cell 9 is accepted now

    loaded = load_smear_predictions(warehouse, SMEAR_A, ["pbc-v1"])
    assert loaded["cell_key"].tolist() == [f"{SMEAR_A}:{number}" for number in range(1, 11)]
    assert loaded["predicted_class"].tolist() == again["predicted_class"].tolist()
    assert loaded["referral_reason"].tolist() == [None] * 9 + ["unfamiliar"]
    assert loaded["probabilities"][0] == again["probabilities"][0]
    with pytest.raises(ValueError, match="not cells of"):
        prediction_records(again, SMEAR_B, "prun-4")
    # The table refuses a referral reason it does not know, and an accepted cell with a reason.
    insert = (
        "insert into predictions values (?, ?, 'pbc-v9', 'pbc', 'monocyte', 0.5, '{}', -1.0, null, ?, ?, null, "
        "timestamp '2026-11-21 00:00:00', 'prun-5')"
    )
    for accepted, reason in [(False, "tired"), (True, "low_confidence"), (False, None)]:
        with pytest.raises(CONSTRAINT_ERRORS):
            warehouse.execute(insert, [SMEAR_A, f"{SMEAR_A}:1", accepted, reason])
    assert rows(warehouse, "select count(*) from predictions") == before


def test_smear_reports_are_keyed_by_version(warehouse):
    cards = {
        "pbc": model_contract("pbc", "pbc-v1", PBC_CLASSES, 96, 1.2, {name: 0.6 for name in PBC_CLASSES}, -3.0),
        "dysplasia": model_contract("dysplasia", "dys-v1", DYSPLASIA_CLASSES, 96, 1.0, {name: 0.6 for name in DYSPLASIA_CLASSES}),
    }
    routes = [Route("pbc", "neutrophil", "dysplasia")]
    predictions = load_smear_predictions(warehouse, SMEAR_A)
    analyser = load_analyser_classes(warehouse, SMEAR_A)
    report = build_smear_report(SMEAR_A, predictions, cards, "pbc", routes, analyser_classes=analyser)
    write_smear_report(warehouse, report, "prun-1")
    write_smear_report(warehouse, report, "prun-1")  # a re-run
    assert rows(warehouse, "select count(*) from smear_reports") == [(1,)]

    stricter = build_smear_report(
        SMEAR_A, predictions, cards, "pbc", routes, settings=ReportSettings(flags=FlagSettings(dysplasia_share_threshold=0.25))
    )
    write_smear_report(warehouse, stricter, "prun-1")
    # The lab's queries in each dialect (deploy/README.md, "Lab SQL on PostgreSQL", shows both).
    by_dialect = {
        "duckdb": """select report_version, total_cells, referred_cells, list_contains(flag_codes, 'review_for_myelodysplasia'),
                            cast(thresholds->>'$.flags.dysplasia_share_threshold' as double), model_versions->>'$.pbc'
                     from smear_reports order by 5""",
        "postgres": """select report_version, total_cells, referred_cells, 'review_for_myelodysplasia' = any(flag_codes),
                              cast(thresholds #>> '{flags,dysplasia_share_threshold}' as double precision), model_versions->>'pbc'
                       from smear_reports order by 5""",
    }
    stored = rows(warehouse, by_dialect[dialect_of(warehouse)])
    # 1 hypogranulated of 5 neutrophils = 20 %: flagged at 0.123, not at 0.25.
    assert stored == [
        (report.report_version, 10, 2, True, 0.123, "pbc-v1"),
        (stricter.report_version, 10, 2, False, 0.25, "pbc-v1"),
    ]
    markdown, differential = rows(
        warehouse, "select markdown, differential from smear_reports where report_version = ?", [report.report_version]
    )[0]
    assert markdown == report.markdown()
    assert json.loads(differential)[0]["rows"][0]["class"] == "neutrophil"


def test_a_withdrawn_cell_leaves_the_current_predictions_and_the_differential(warehouse):
    before = rows(warehouse, "select count(*) from current_predictions where smear_id = ? and task = 'pbc'", [SMEAR_A])[0][0]
    warehouse.execute("delete from cells where cell_uid = ?", [f"{SMEAR_A}:1"])
    after = rows(warehouse, "select count(*) from current_predictions where smear_id = ? and task = 'pbc'", [SMEAR_A])[0][0]
    assert after == before - 1
    [(neutrophils,)] = rows(
        warehouse,
        "select cells from differential_per_smear where smear_id = ? and task = 'pbc' and cell_class = 'neutrophil'",
        [SMEAR_A],
    )
    assert neutrophils == 4
