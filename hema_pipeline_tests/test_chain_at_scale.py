"""The whole chain on the network-scale configuration (deploy/): Dagster's instance on PostgreSQL, the
warehouse on PostgreSQL, the inbox, lake, quarantine and compute logs on S3. Import -> cell table ->
dataset -> a short training -> calibration -> registration -> predictions -> SQL, every run through real
Dagster materialisation; then the PHI canary over both databases and the buckets."""

from __future__ import annotations

import uuid

import boto3
import dagster as dg
import psycopg2
import pytest

from hema_pipeline.defs.definitions import defs
from hema_pipeline.defs.handles import HandleIOManager
from hema_pipeline.defs.ingest import imported_smear, smear_partitions
from hema_pipeline.defs.resources import InboxResource, StorageResource, WarehouseResource
from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
from hema_pipeline.storage.object_store import open_object_store
from hema_pipeline.storage.warehouse import Warehouse
from hema_pipeline.taxonomy import CELL_CLASSES
from hema_pipeline_tests.postgres_server import create_database, dagster_instance_storage, s3_compute_logs
from hema_pipeline_tests.support import TEST_KEY

pytestmark = pytest.mark.slow

TASK = "pbc8"


def _database(server: str) -> str:
    return create_database(server, f"hema_{uuid.uuid4().hex[:12]}")


def _instance_config(dagster_url: str, bucket: str, endpoint: str) -> dict:
    """What deploy/ gives the instance, with this test's server and bucket (deploy/dagster-instance.yaml)."""
    return {"storage": dagster_instance_storage(dagster_url), "compute_logs": s3_compute_logs(bucket, endpoint)}


def test_the_chain_on_postgres_and_s3(pipeline_env, postgres_server, s3_endpoint, monkeypatch):
    bucket = f"hema-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    warehouse_url = _database(postgres_server)
    dagster_url = _database(postgres_server)
    monkeypatch.setenv("HEMA_WAREHOUSE", warehouse_url)

    export = generate_export(
        pipeline_env.home / "export",
        SyntheticExportSpec(smears=8, cells_per_smear=40, seed=61, class_mix={name: 1.0 for name in CELL_CLASSES}),
    )
    inbox = open_object_store(f"s3://{bucket}/inbox", endpoint_url=s3_endpoint)
    for smear in export.smears:
        for path in smear.folder.iterdir():
            inbox.put_bytes(f"{smear.folder.name}/{path.name}", path.read_bytes())
    resources = {
        **pipeline_env.resources(),
        "inbox": InboxResource(url=f"s3://{bucket}/inbox", s3_endpoint_url=s3_endpoint, settle_seconds=0),
        "storage": StorageResource(
            lake_url=f"s3://{bucket}/lake", quarantine_url=f"s3://{bucket}/quarantine", s3_endpoint_url=s3_endpoint
        ),
        "warehouse": WarehouseResource(path=warehouse_url),
        "io_manager": HandleIOManager(lake_url=f"s3://{bucket}/lake", s3_endpoint_url=s3_endpoint),
    }

    with dg.instance_for_test(overrides=_instance_config(dagster_url, bucket, s3_endpoint)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        partitions = [TEST_KEY.smear_id(smear.accession) for smear in export.smears]
        instance.add_dynamic_partitions(smear_partitions.name, partitions)
        for partition in partitions:
            assert dg.materialize([imported_smear], partition_key=partition, resources=resources, instance=instance).success

        trained = dg.materialize(
            [*defs.assets, *defs.asset_checks],
            selection=dg.AssetSelection.assets("cell_table", "smear_flag_thresholds")
            | dg.AssetSelection.assets(
                *[f"{TASK}_{stage}" for stage in ("dataset", "trained_model", "calibration", "model", "champion")]
            ),
            instance=instance,
            resources=resources,
            run_config={
                "ops": {
                    f"{TASK}_dataset": {"config": {"image_size": 48, "min_cells_per_class": 8}},
                    f"{TASK}_trained_model": {"config": {"architecture": "compact", "epochs": 4, "seed": 1}},
                    f"{TASK}_calibration": {"config": {"target_accuracy": 0.5, "referral_confidence": 0.5}},
                }
            },
        )
        assert trained.success
        [champion] = [m.metadata["champion"].value for m in trained.asset_materializations_for_node(f"{TASK}_champion")]

        job = dg.Definitions(assets=defs.assets, jobs=defs.jobs, resources=resources).resolve_job_def("predict_smears")
        for partition in partitions:
            assert job.execute_in_process(instance=instance, partition_key=partition).success

        # The compute logs went to S3.
        logs = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket, Prefix="compute-logs")
        assert logs.get("KeyCount", 0) > 0

    warehouse = Warehouse(warehouse_url)
    cells = warehouse.query("select count(*) as n from cells").n[0]
    assert cells == 8 * 40
    predictions = warehouse.query(f"select * from predictions where task = '{TASK}'")
    assert len(predictions) == cells and set(predictions["model_version"]) == {champion}
    assert warehouse.query("select count(*) as n from smear_reports").n[0] == len(partitions)
    smear = partitions[0]
    accepted = predictions[(predictions["smear_id"] == smear) & predictions["accepted"]]
    view = warehouse.query(
        "select cell_class, cells from differential_per_smear where smear_id = ? and task = ? and cells > 0", [smear, TASK]
    )
    assert dict(zip(view["cell_class"], view["cells"], strict=True)) == accepted["predicted_class"].value_counts().to_dict()
    lake = open_object_store(f"s3://{bucket}/lake", endpoint_url=s3_endpoint)
    assert any(info.key.endswith("model.keras") for info in lake.list("models"))

    # PHI canary: no identifier of any exported smear in either database or the anonymised zone.
    identifiers = [value.lower() for value in export.phi_strings()]
    assert len(identifiers) >= 8 * 3
    for url in (warehouse_url, dagster_url):
        with psycopg2.connect(url) as connection, connection.cursor() as cursor:
            cursor.execute("select table_name from information_schema.tables where table_schema = 'public'")
            for (table,) in cursor.fetchall():
                cursor.execute(f'select * from "{table}"')
                text = "\n".join(map(repr, cursor.fetchall())).lower()
                leaked = [value for value in identifiers if value in text]
                assert not leaked, f"{table} in {url.rsplit('/', 1)[1]} holds identifiers: {leaked[:3]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    inbox_keys = " ".join(item.key for item in inbox.list("")).lower()
    assert any(value in inbox_keys for value in identifiers), "positive control: the inbox's folder names are accessions"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            key = item["Key"]
            if key.startswith(("inbox/", "quarantine/")):
                continue  # the identifiable zone: the export itself, and what is kept of its bad files
            leaked = [value for value in identifiers if value in key.lower()]
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read().lower()
            leaked += [value for value in identifiers if value.encode() in body]
            assert not leaked, f"{key} holds identifiers: {leaked[:3]}"
