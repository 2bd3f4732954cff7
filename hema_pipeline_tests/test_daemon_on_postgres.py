"""A burst through the real daemon on the network-scale storage: `dagster dev` with Dagster's instance on
PostgreSQL (psycopg2 scheme) and the warehouse on PostgreSQL. Twelve smears arrive at once; the inbox
sensor requests twelve imports; the queue holds the run limit and the `duckdb_writer` pool holds its
slots; every smear is imported once, with no row lost or duplicated."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import dagster as dg
import pytest
import yaml

from hema_pipeline.defs.ingest import DUCKDB_WRITER_POOL
from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
from hema_pipeline.storage.warehouse import Warehouse
from hema_pipeline_tests.postgres_server import create_database, dagster_instance_storage
from hema_pipeline_tests.support import TEST_KEY
from hema_pipeline_tests.test_ui import REPO, RUN_TIMEOUT_S, _wait_until, dagster_dev_environment, running_dagster_dev

pytestmark = pytest.mark.slow

SMEARS = 12
CELLS = 8
MAX_CONCURRENT_RUNS = 3
POOL_SLOTS = 2


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    current = highest = 0
    for _, change in events:
        current += change
        highest = max(highest, current)
    return highest


def test_a_burst_of_imports_through_the_daemon_on_postgres_holds_every_limit(tmp_path: Path, postgres_server: str) -> None:
    home = tmp_path / "hema"
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(parents=True)
    dagster_url = create_database(postgres_server, f"dagster_{uuid.uuid4().hex[:8]}")
    warehouse_url = create_database(postgres_server, f"hema_{uuid.uuid4().hex[:8]}")
    instance_config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    instance_config["storage"] = dagster_instance_storage(dagster_url)
    instance_config["concurrency"]["runs"]["max_concurrent_runs"] = MAX_CONCURRENT_RUNS
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(instance_config))
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        # What an operator sets once at scale (deploy/README.md, "Pools"): PostgreSQL takes concurrent writers.
        instance.event_log_storage.set_concurrency_slots(DUCKDB_WRITER_POOL, POOL_SLOTS)

    export = generate_export(home / "inbox", SyntheticExportSpec(smears=SMEARS, cells_per_smear=CELLS, seed=71))
    environment = dagster_dev_environment(home, dagster_home, HEMA_WAREHOUSE=warehouse_url)
    with running_dagster_dev(home, dagster_home, environment, log_name="dagster-dev-postgres.log") as server:

        def imports_done() -> list[dict] | None:
            runs = server.runs("import_smears")
            failed = [run for run in runs if run["status"] in ("FAILURE", "CANCELED")]
            if failed:
                raise AssertionError(f"import runs failed: {failed}\n{server.log_tail()}")
            succeeded = [run for run in runs if run["status"] == "SUCCESS"]
            return succeeded if len(succeeded) >= SMEARS else None

        runs = _wait_until(imports_done, RUN_TIMEOUT_S * 2, f"the daemon to import {SMEARS} smears", server)

    assert len(runs) == SMEARS
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        records = instance.get_run_records(dg.RunsFilter(job_name="import_smears"))
        assert _max_overlap([(record.start_time, record.end_time) for record in records]) <= MAX_CONCURRENT_RUNS
        steps = []
        for record in records:
            times = {
                event.dagster_event.event_type_value: event.timestamp
                for event in instance.all_logs(record.dagster_run.run_id)
                if event.dagster_event
            }
            steps.append((times["STEP_START"], times["STEP_SUCCESS"]))
        assert _max_overlap(steps) <= POOL_SLOTS
        assert {record.dagster_run.tags["dagster/partition"] for record in records} == {
            TEST_KEY.smear_id(smear.accession) for smear in export.smears
        }

    warehouse = Warehouse(warehouse_url)
    cells = warehouse.query("select cell_uid from cells")
    assert len(cells) == SMEARS * CELLS and cells["cell_uid"].is_unique
    runs_per_smear = warehouse.query("select smear_id, count(*) as n from import_runs group by 1")
    assert len(runs_per_smear) == SMEARS and set(runs_per_smear["n"]) == {1}
    assert not (home / "warehouse.duckdb").exists(), "the warehouse setting did not reach the runs"
    shutil.rmtree(home / "inbox")
