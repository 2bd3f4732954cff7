"""A burst through the real daemon on the network-scale storage: `dagster dev` with Dagster's instance on
PostgreSQL (psycopg2 scheme) and the warehouse on PostgreSQL, a pbc8 champion in place. Six smears,
twice the run limit, arrive at once; the inbox sensor requests six imports and declarative automation their predictions
(batched where several were imported within one tick); the queue holds the run limit and the
`duckdb_writer` pool holds its slots across imports and predictions; every smear is imported and
predicted once, with no row lost or duplicated."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import dagster as dg
import pytest
import yaml

from hema_pipeline.defs.ingest import DUCKDB_WRITER_POOL
from hema_pipeline.defs.resources import WarehouseResource
from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
from hema_pipeline.storage.warehouse import Warehouse
from hema_pipeline_tests.postgres_server import create_database, dagster_instance_storage
from hema_pipeline_tests.support import TEST_KEY
from hema_pipeline_tests.test_ui import (
    REPO,
    RUN_TIMEOUT_S,
    _wait_until,
    dagster_dev_environment,
    running_dagster_dev,
    train_a_champion_before_start,
)

pytestmark = pytest.mark.end_to_end

SMEARS = 6  # twice MAX_CONCURRENT_RUNS, three times POOL_SLOTS: more work arrives than either limit admits at once
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
    train_a_champion_before_start(home, dagster_home, {"warehouse": WarehouseResource(path=warehouse_url)})
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        before = {record.dagster_run.run_id for record in instance.get_run_records()}

    # Another seed than the champion's earlier export (71): new accessions, so every smear of the burst is new.
    export = generate_export(home / "inbox", SyntheticExportSpec(smears=SMEARS, cells_per_smear=CELLS, seed=72))
    burst = sorted(TEST_KEY.smear_id(smear.accession) for smear in export.smears)
    placeholders = ", ".join("?" for _ in burst)
    warehouse = Warehouse(warehouse_url)
    already = warehouse.query(f"select smear_id from smears where smear_id in ({placeholders})", burst)
    assert already.empty, "the burst must hold smears the warehouse has not seen"
    environment = dagster_dev_environment(home, dagster_home, HEMA_WAREHOUSE=warehouse_url)
    with running_dagster_dev(home, dagster_home, environment, log_name="dagster-dev-postgres.log") as server:

        def imports_done() -> list[dict] | None:
            runs = [run for run in server.runs("import_smears") if run["runId"] not in before]
            failed = [run for run in runs if run["status"] in ("FAILURE", "CANCELED")]
            if failed:
                raise AssertionError(f"import runs failed: {failed}\n{server.log_tail()}")
            succeeded = [run for run in runs if run["status"] == "SUCCESS"]
            return succeeded if len(succeeded) >= SMEARS else None

        runs = _wait_until(imports_done, RUN_TIMEOUT_S * 2, f"the daemon to import {SMEARS} smears", server)

        def predictions_done() -> bool:
            predictions = server.runs("__ASSET_JOB")
            failed = [run for run in predictions if run["status"] in ("FAILURE", "CANCELED")]
            if failed:
                raise AssertionError(f"prediction runs failed: {failed}\n{server.log_tail()}")
            if any(run["status"] != "SUCCESS" for run in predictions):
                # Every run's start and end are read below: stopping the server under a queued or running
                # one would cut it short. (One smear's run may also predict others imported by then.)
                return False
            reported = warehouse.query(
                f"select count(distinct smear_id) as n from smear_reports where smear_id in ({placeholders})", burst
            )
            return int(reported.n[0]) == SMEARS

        _wait_until(predictions_done, RUN_TIMEOUT_S * 3, f"the daemon to predict {SMEARS} smears", server)

    assert len(runs) == SMEARS
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        records = [record for record in instance.get_run_records() if record.dagster_run.run_id not in before]
        imports = [record for record in records if record.dagster_run.job_name == "import_smears"]
        assert _max_overlap([(record.start_time, record.end_time) for record in records]) <= MAX_CONCURRENT_RUNS
        steps = []  # every step in the writer pool: imports and predictions
        for record in records:
            times = {
                event.dagster_event.event_type_value: event.timestamp
                for event in instance.all_logs(record.dagster_run.run_id)
                if event.dagster_event
            }
            steps.append((times["STEP_START"], times["STEP_SUCCESS"]))
        assert _max_overlap(steps) <= POOL_SLOTS
        assert {record.dagster_run.tags["dagster/partition"] for record in imports} == set(burst)
        assert len(records) > len(imports), "no prediction run was launched"

    cells = warehouse.query(f"select cell_uid from cells where smear_id in ({placeholders})", burst)
    assert len(cells) == SMEARS * CELLS and cells["cell_uid"].is_unique
    runs_per_smear = warehouse.query(
        f"select smear_id, count(*) as n from import_runs where smear_id in ({placeholders}) group by 1", burst
    )
    assert len(runs_per_smear) == SMEARS and set(runs_per_smear["n"]) == {1}
    # One prediction per cell and model, whichever batch predicted it: nothing lost, nothing twice.
    predicted = warehouse.query(
        f"select count(*) as n, count(distinct cell_uid) as cells from predictions where task = 'pbc8' and smear_id in ({placeholders})",
        burst,
    ).iloc[0]
    assert (int(predicted.n), int(predicted.cells)) == (SMEARS * CELLS, SMEARS * CELLS)
    assert not (home / "warehouse.duckdb").exists(), "the warehouse setting did not reach the runs"
    shutil.rmtree(home / "inbox")
