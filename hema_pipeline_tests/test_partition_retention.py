"""Bounded partitions (issue 17): the retention sensor retires the Dagster partitions of settled smears
(imported long enough ago, and predicted or with nothing to predict), and nothing else."""

from __future__ import annotations

import datetime as dt

import dagster as dg

from hema_pipeline.defs.ingest import inbox_sensor, smear_partition_retention_sensor, smear_partitions
from hema_pipeline.defs.resources import PartitionRetentionResource
from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
from hema_pipeline.storage.warehouse import Warehouse
from hema_pipeline_tests.support import TEST_KEY, materialise_inbox, sensor_resources


def _evaluate_retention(env, instance, retention_days: float, limit: int = 5000):
    resources = {
        "warehouse": env.resources()["warehouse"],
        "partition_retention": PartitionRetentionResource(retention_days=retention_days, max_retired_per_tick=limit),
    }
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        return smear_partition_retention_sensor(context)


def _report_row(connection, smear_id: str) -> None:
    """What the prediction asset leaves for a predicted smear (the rule only asks whether one exists)."""
    connection.execute(
        "insert into smear_reports (smear_id, report_version, model_versions, differential, flags, flag_codes, "
        "total_cells, referred_cells, agreement, thresholds, markdown, prediction_run_id, created_at) "
        "values (?, 'r1', '{}', '{}', '[]', [], 4, 0, null, '{}', '', 'run', now())",
        [smear_id],
    )


def test_only_settled_smears_lose_their_partition_and_come_back_with_a_new_export(pipeline_env, dagster_instance, monkeypatch):
    export = generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=4, cells_per_smear=4, seed=81))
    predicted, unpredicted, empty, recent = (TEST_KEY.smear_id(smear.accession) for smear in export.smears)
    for image in export.smears[2].folder.glob("*.jpg"):
        image.write_bytes(b"not a jpeg")  # every cell quarantined: nothing to predict
    assert all(result.success for result in materialise_inbox(pipeline_env, dagster_instance))
    with Warehouse(pipeline_env.warehouse).transaction() as connection:
        _report_row(connection, predicted)
        _report_row(connection, recent)
        # Three smears imported 20 days ago, one today.
        connection.execute(
            "update import_runs set finished_at = finished_at - interval 20 day where smear_id in (?, ?, ?)",
            [predicted, unpredicted, empty],
        )
        assert connection.execute("select count(*) from cells where smear_id = ?", [empty]).fetchone() == (0,)

    assert isinstance(_evaluate_retention(pipeline_env, dagster_instance, retention_days=0), dg.SkipReason)
    assert isinstance(_evaluate_retention(pipeline_env, dagster_instance, retention_days=30), dg.SkipReason)
    assert (
        len(_evaluate_retention(pipeline_env, dagster_instance, 14, limit=1).dynamic_partitions_requests[0].partition_keys) == 1
    )

    result = _evaluate_retention(pipeline_env, dagster_instance, retention_days=14)
    [request] = result.dynamic_partitions_requests
    assert isinstance(request, dg.DeleteDynamicPartitionsRequest)
    assert sorted(request.partition_keys) == sorted([predicted, empty])
    # The live set is looked up in chunks: one smear a query gives the same answer.
    from hema_pipeline.monitoring import retention

    monkeypatch.setattr(retention, "_CHUNK", 1)
    live = dagster_instance.get_dynamic_partitions(smear_partitions.name)
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=14)
    assert retention.settled_smears(Warehouse(pipeline_env.warehouse), live, cutoff, 10) == list(request.partition_keys)
    for smear_id in request.partition_keys:
        dagster_instance.delete_dynamic_partition(smear_partitions.name, smear_id)
    assert sorted(dagster_instance.get_dynamic_partitions(smear_partitions.name)) == sorted([unpredicted, recent])
    # Nothing of the retired smears left the warehouse.
    kept = Warehouse(pipeline_env.warehouse).query("select distinct smear_id from import_runs")
    assert set(kept["smear_id"]) == {predicted, unpredicted, empty, recent}

    # The predicted smear is exported again: the inbox sensor adds its partition back and imports it.
    metadata = export.smears[0].folder / "smear.json"
    metadata.write_text(metadata.read_text() + "\n")
    with dg.build_sensor_context(instance=dagster_instance, resources=sensor_resources(pipeline_env)) as context:
        tick = inbox_sensor(context)
    added = {key for request in tick.dynamic_partitions_requests for key in request.partition_keys}
    assert predicted in added and unpredicted not in added
    assert predicted in {request.partition_key for request in tick.run_requests}


def test_retention_sensor_is_in_the_ingest_location_and_reads_an_absent_warehouse_as_nothing_settled(
    pipeline_env, dagster_instance
):
    from hema_pipeline.defs.definitions import build_definitions

    ingest = build_definitions("ingest").get_repository_def()
    assert ingest.has_sensor_def(smear_partition_retention_sensor.name)
    dagster_instance.add_dynamic_partitions(smear_partitions.name, ["s1"])
    assert not Warehouse(pipeline_env.warehouse).exists()
    assert isinstance(_evaluate_retention(pipeline_env, dagster_instance, retention_days=1), dg.SkipReason)
    assert not Warehouse(pipeline_env.warehouse).exists()  # a read never creates it
