"""The PostgreSQL warehouse under the load a lab network puts on it: many processes importing the same and
different smears at once, lab SQL through `hema query`, and locations that would leak a password.

The single-process behaviour of both backends is covered where it is tested for DuckDB: test_import.py
and test_inference_sql.py run every test on both."""

from __future__ import annotations

import multiprocessing
import random
import re
from pathlib import Path

import psycopg2
import pytest

from hema_pipeline.cli import main
from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
from hema_pipeline.storage.warehouse import Warehouse
from hema_pipeline_tests.support import TEST_KEY

PROCESSES = 6
WORKER_DEADLINE_SECONDS = 300  # the workers take about 20 s here; generous for a loaded 2-core CI machine
SMEARS = 4
CELLS_PER_SMEAR = 15


def _import_everything_in_some_order(location: str, root: str, order_seed: int) -> list[tuple[str, str, int]]:
    """One worker: every smear of the inbox, in its own order. Returns (smear, status, cells imported)."""
    from hema_pipeline.ingest.inbox import Inbox
    from hema_pipeline.ingest.smear_import import ImportTargets, import_smear
    from hema_pipeline.storage.object_store import LocalObjectStore

    base = Path(root)
    inbox = Inbox(LocalObjectStore(base / "inbox"), settle_seconds=0)
    targets = ImportTargets(LocalObjectStore(base / "lake"), LocalObjectStore(base / "quarantine"), Warehouse(location))
    smears = inbox.smears()
    random.Random(order_seed).shuffle(smears)
    reports = [import_smear(inbox.store, smear, TEST_KEY, targets) for smear in smears]
    return [(report.smear_id, report.status, report.cells_imported) for report in reports]


def test_concurrent_imports_of_the_same_and_different_smears_lose_and_duplicate_nothing(tmp_path, postgres_database):
    export = generate_export(tmp_path / "inbox", SyntheticExportSpec(smears=SMEARS, cells_per_smear=CELLS_PER_SMEAR, seed=11))
    # One unreadable image: its quarantine row must be written once, however many imports find it.
    broken_smear = export.smears[0]
    broken = sorted((tmp_path / "inbox").glob(f"{broken_smear.accession}/*.jpg"))[0]
    broken.write_bytes(b"not a jpeg at all")

    # A deadline, not a wait without end: a worker lost mid-task (a pool never hands its task to another)
    # or an import stuck on a lock fails the test within minutes, and leaving the block terminates the pool.
    with multiprocessing.get_context("spawn").Pool(PROCESSES) as pool:
        outcomes = pool.starmap_async(
            _import_everything_in_some_order, [(postgres_database, str(tmp_path), seed) for seed in range(PROCESSES)]
        ).get(timeout=WORKER_DEADLINE_SECONDS)

    warehouse = Warehouse(postgres_database)
    reports = [report for worker in outcomes for report in worker]
    assert len(reports) == PROCESSES * SMEARS
    cells = warehouse.query("select cell_uid, smear_id from cells")
    assert len(cells) == SMEARS * CELLS_PER_SMEAR - 1 and cells["cell_uid"].is_unique
    assert set(cells["smear_id"]) == {TEST_KEY.smear_id(smear.accession) for smear in export.smears}
    # Imports of one smear ran one after another: exactly one wrote its cells, the rest found them.
    for smear_id in set(cells["smear_id"]):
        of_smear = [(status, imported) for sid, status, imported in reports if sid == smear_id]
        assert sum(imported for _, imported in of_smear) == int((cells["smear_id"] == smear_id).sum())
        assert {status for status, _ in of_smear} <= {"imported", "partially_quarantined", "already_present"}
        assert sum(imported > 0 for _, imported in of_smear) == 1
    runs = warehouse.query("select import_run_id from import_runs")
    assert len(runs) == PROCESSES * SMEARS and runs["import_run_id"].is_unique
    smears = warehouse.query("select smear_id, cell_count from smears order by smear_id")
    assert len(smears) == SMEARS and sorted(smears["cell_count"]) == sorted(
        [CELLS_PER_SMEAR] * (SMEARS - 1) + [CELLS_PER_SMEAR - 1]
    )
    quarantine = warehouse.query("select smear_id, reason_code, resolved_by_import_run_id from quarantine")
    assert len(quarantine) == 1
    assert quarantine.loc[0, "smear_id"] == TEST_KEY.smear_id(broken_smear.accession)
    assert quarantine.loc[0, "reason_code"] == "not_an_image" and quarantine.loc[0, "resolved_by_import_run_id"] is None


@pytest.fixture
def reader_url(postgres_database: str) -> str:
    """The warehouse with its schema and one row, and the URL of a role that may only read it."""
    Warehouse(postgres_database).query("select 1")  # creates the schema
    with psycopg2.connect(postgres_database) as admin, admin.cursor() as cursor:
        cursor.execute(
            "insert into quarantine (quarantine_id, smear_id, cell_id, reason_code, reason, import_run_id, quarantined_at) "
            "values ('q1', 'Sabc', 3, 'corrupt_image', 'not a JPEG', 'r1', timestamp '2026-03-01 10:00:00')"
        )
        cursor.execute(
            "do $$ begin if not exists (select from pg_roles where rolname = 'hema_reader') then create role hema_reader login; end if; end $$"
        )
        cursor.execute("grant select on all tables in schema public to hema_reader")
    return postgres_database.replace("postgres@", "hema_reader@", 1)


def test_hema_query_reads_through_a_reader_role_and_cannot_write_or_read_files(reader_url, capsys):
    assert (
        main(["query", "--warehouse", reader_url, "--csv", "select reason_code, count(*) as n from open_quarantine group by 1"])
        == 0
    )
    assert capsys.readouterr().out.splitlines() == ["reason_code,n", "corrupt_image,1"]
    for attempt in (
        "delete from quarantine",
        "insert into quarantine (quarantine_id, smear_id, reason_code, reason, import_run_id, quarantined_at) values ('q2', 's', 'x', 'x', 'r', now())",
        "select pg_read_file('/etc/passwd')",
        "set transaction read write; delete from quarantine",
        "copy quarantine to '/tmp/hema-query-escape.csv'",
    ):
        assert main(["query", "--warehouse", reader_url, attempt]) == 1, attempt
        assert capsys.readouterr().err.startswith("hema query: ")
    assert not Path("/tmp/hema-query-escape.csv").exists()
    assert Warehouse(reader_url).query_locked_down("select count(*) as n from quarantine")["n"].tolist() == [1]


def test_hema_query_refuses_a_superuser_role_and_a_role_that_can_write(postgres_database, capsys):
    Warehouse(postgres_database).query("select 1")
    assert main(["query", "--warehouse", postgres_database, "select 1"]) == 2
    assert "superuser" in capsys.readouterr().err
    # The warehouse's own writer (what HEMA_WAREHOUSE names) could undo the read-only session and write.
    with psycopg2.connect(postgres_database) as admin, admin.cursor() as cursor:
        cursor.execute(
            "do $$ begin if not exists (select from pg_roles where rolname = 'hema_writer') then create role hema_writer login; end if; end $$"
        )
        cursor.execute("grant select, insert on all tables in schema public to hema_writer")
    writer = postgres_database.replace("postgres@", "hema_writer@", 1)
    assert (
        main(["query", "--warehouse", writer, "set session characteristics as transaction read write; delete from quarantine"])
        == 2
    )
    assert "can write the warehouse" in capsys.readouterr().err
    # A role with no grants of its own that may SET ROLE to the writer is as powerful as the writer.
    with psycopg2.connect(postgres_database) as admin, admin.cursor() as cursor:
        cursor.execute(
            "do $$ begin if not exists (select from pg_roles where rolname = 'hema_sneak') then create role hema_sneak login noinherit; end if; end $$"
        )
        cursor.execute("grant hema_writer to hema_sneak")
    sneak = postgres_database.replace("postgres@", "hema_sneak@", 1)
    assert main(["query", "--warehouse", sneak, "set role hema_writer; delete from quarantine"]) == 2
    assert "could become a role that can" in capsys.readouterr().err


def test_hema_query_on_an_absent_database_creates_nothing(postgres_server, capsys):
    absent = postgres_server.rsplit("/", 1)[0] + "/hema_never_created"
    assert main(["query", "--warehouse", absent, "select 1"]) == 2
    assert "nothing was created" in capsys.readouterr().err
    with psycopg2.connect(postgres_server) as admin, admin.cursor() as cursor:
        cursor.execute("select count(*) from pg_database where datname = 'hema_never_created'")
        assert cursor.fetchone() == (0,)


def test_a_location_with_a_password_is_refused_and_descriptions_never_show_one(postgres_database):
    with pytest.raises(ValueError, match="PGPASSWORD"):
        Warehouse(postgres_database.replace("postgres@", "postgres:secret@", 1))
    with pytest.raises(ValueError, match="PGPASSWORD"):
        Warehouse(postgres_database + "?sslmode=disable&password=secret")
    assert "@" not in Warehouse(postgres_database).description
    assert Warehouse(postgres_database.replace("postgresql://", "postgresql+psycopg2://", 1)).exists() is False
    Warehouse(postgres_database).query("select 1")
    assert Warehouse(postgres_database.replace("postgresql://", "postgresql+psycopg2://", 1)).exists() is True
    # A database that is absent is "not created yet"; a server that cannot be reached is an error, not that.
    assert Warehouse(postgres_database + "_absent").exists() is False
    unreachable = Warehouse("postgresql://postgres@127.0.0.1:1/hema")
    with pytest.raises(psycopg2.OperationalError):
        unreachable.exists()


def test_placeholders_are_translated_outside_quotes_only():
    from hema_pipeline.storage.postgres import _sql_with_pyformat_placeholders

    assert _sql_with_pyformat_placeholders("select ? where a = '?' and b like '5%' and c = \"x?\" and d = ?") == (
        "select %s where a = '?' and b like '5%%' and c = \"x?\" and d = %s"
    )
    assert _sql_with_pyformat_placeholders("select 'it''s ?', ?") == "select 'it''s ?', %s"
    assert _sql_with_pyformat_placeholders("select ? -- why? it's 5%\n, ? /* or? */ , $$ ? $$, $f$ ? $f$") == (
        "select %s -- why? it's 5%%\n, %s /* or? */ , $$ ? $$, $f$ ? $f$"
    )


def test_numeric_results_take_their_type_from_the_column_not_the_values(postgres_database):
    warehouse = Warehouse(postgres_database)
    warehouse.query("select 1")
    frame = warehouse.query(
        "select cast(18446744073709551615 as numeric(20, 0)) as hash, avg(x) as whole_mean, avg(y) as mean "
        "from (values (1, 1), (3, 2)) as v(x, y)"
    )
    assert int(frame.loc[0, "hash"]) == 2**64 - 1 and frame["hash"].dtype.kind in "uiO"
    assert isinstance(frame.loc[0, "whole_mean"], float) and frame.loc[0, "whole_mean"] == 2.0
    assert frame.loc[0, "mean"] == 1.5


def test_the_schema_is_one_text_with_the_postgres_edition_of_the_views_only():
    from hema_pipeline.storage.warehouse import schema_sql

    duckdb_sql, postgres_sql = schema_sql("duckdb"), schema_sql("postgres")
    qualify = re.compile(r"^\s*qualify\b", re.IGNORECASE | re.MULTILINE)
    assert qualify.search(duckdb_sql) and not qualify.search(postgres_sql)
    assert "ubigint" in duckdb_sql and "ubigint" not in postgres_sql.split("--")[0]
    # Everything before the views is the same text, apart from the one substituted type.
    marker = "-- hema-pipeline views over predictions"
    tables_duckdb, tables_postgres = duckdb_sql.split(marker)[0], postgres_sql.split(marker)[0]
    differing = [(a, b) for a, b in zip(tables_duckdb.splitlines(), tables_postgres.splitlines(), strict=True) if a != b]
    assert differing and all("ubigint" in a and "numeric(20, 0)" in b for a, b in differing)
