"""The run-failure sensor records a failed run once in `run_failures`, with paths redacted."""

from __future__ import annotations

import dagster as dg

from hema_pipeline.defs.automation import run_failure_recorder
from hema_pipeline.defs.ingest import imported_smear, smear_partitions
from hema_pipeline.defs.resources import WarehouseResource
from hema_pipeline.monitoring.failures import redact_paths
from hema_pipeline.storage.warehouse import Warehouse


def test_paths_and_urls_are_redacted_from_stored_messages() -> None:
    message = (
        "OSError: [Errno 2] No such file or directory: '/srv/analyser/export/ACC-2026-000123/cell_0001.jpg'; "
        "while reading s3://lab-inbox/exports/ACC-2026-000124/metadata.json and C:\\DM96\\ACC-2026-000125\\x.jpg "
        "(relative 'ACC-2026-000126/cell.jpg')"
    )
    redacted = redact_paths(message)
    assert "ACC-2026" not in redacted and "cell_0001" not in redacted
    assert redacted.startswith("OSError: [Errno 2] No such file or directory:")
    assert redacted.count("<path>") == 4


def test_a_failed_import_run_is_recorded_once(pipeline_env, dagster_instance) -> None:
    env, instance = pipeline_env, dagster_instance
    instance.add_dynamic_partitions(smear_partitions.name, ["S0000000000000000000a"])  # no folder pseudonymises to it
    result = dg.materialize(
        [imported_smear],
        partition_key="S0000000000000000000a",
        resources=env.resources(),
        instance=instance,
        raise_on_error=False,
        tags={"hema/trigger": "inbox"},
    )
    assert not result.success

    def evaluate() -> None:
        with dg.build_run_status_sensor_context(
            sensor_name=run_failure_recorder.name,
            dagster_event=result.get_run_failure_event(),
            dagster_instance=instance,
            dagster_run=result.dagster_run,
            resources={"warehouse": WarehouseResource(path=str(env.warehouse))},
        ) as context:
            run_failure_recorder(context)

    evaluate()
    evaluate()  # a sensor tick repeated after a restart must not add a second row
    rows = Warehouse(env.warehouse).query("select * from run_failures")
    assert len(rows) == 1
    row = rows.iloc[0]
    assert row.run_id == result.run_id
    assert row.job_name == result.dagster_run.job_name
    assert row.partition_key == "S0000000000000000000a"
    assert row.trigger == "inbox"
    assert list(row.failed_steps) == ["imported_smear"]
    assert "Failure" in list(row.error_types)
    assert "no folder in the inbox or its archive pseudonymises" in row.message
    assert str(env.home) not in row.message
