"""The inbox sensor and the nightly sweep: their run requests, partitions and exactly-once behaviour."""

from __future__ import annotations

import json
import os
import time

import dagster as dg
import pytest

from hema_pipeline.defs.ingest import inbox_sensor, nightly_import_schedule, smear_partitions
from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
from hema_pipeline_tests.support import TEST_KEY, sensor_resources


def _evaluate_sensor(env, instance, cursor=None) -> dg.SensorResult:
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=sensor_resources(env)) as context:
        return inbox_sensor(context)


def _apply_partition_requests(instance, result: dg.SensorResult) -> None:
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))


def test_sensor_requests_each_new_smear_once(pipeline_env, dagster_instance):
    export = generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=3, cells_per_smear=5, seed=31))
    expected = sorted(TEST_KEY.smear_id(smear.accession) for smear in export.smears)

    first = _evaluate_sensor(pipeline_env, dagster_instance)
    assert sorted(request.partition_key for request in first.run_requests) == expected
    [partition_request] = first.dynamic_partitions_requests
    assert sorted(partition_request.partition_keys) == expected
    _apply_partition_requests(dagster_instance, first)

    # Restart: a new evaluation with the stored cursor requests nothing.
    second = _evaluate_sensor(pipeline_env, dagster_instance, cursor=first.cursor)
    assert second.run_requests == [] and not second.dynamic_partitions_requests

    # A new smear arrives: only it is requested.
    later = generate_export(pipeline_env.home / "later", SyntheticExportSpec(smears=1, cells_per_smear=5, seed=32))
    new_folder = later.smears[0].folder.rename(pipeline_env.inbox / later.smears[0].folder.name)
    future = time.time() + 5
    for path in [new_folder, *new_folder.iterdir()]:
        os.utime(path, (future, future))
    third = _evaluate_sensor(pipeline_env, dagster_instance, cursor=second.cursor)
    assert [request.partition_key for request in third.run_requests] == [TEST_KEY.smear_id(later.smears[0].accession)]
    assert json.loads(third.cursor)["newest_change"] >= future - 1


def test_run_key_changes_only_when_the_export_changes(pipeline_env, dagster_instance):
    export = generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=1, cells_per_smear=5, seed=33))
    first = _evaluate_sensor(pipeline_env, dagster_instance)
    again = _evaluate_sensor(pipeline_env, dagster_instance)
    assert [r.run_key for r in first.run_requests] == [r.run_key for r in again.run_requests]
    (export.smears[0].folder / "smear.json").write_text((export.smears[0].folder / "smear.json").read_text() + " ")
    changed = _evaluate_sensor(pipeline_env, dagster_instance)
    assert changed.run_requests[0].run_key != first.run_requests[0].run_key
    assert changed.run_requests[0].partition_key == first.run_requests[0].partition_key


def test_sensor_waits_for_a_folder_without_metadata_to_settle(pipeline_env, dagster_instance):
    from hema_pipeline.defs.resources import InboxResource

    export = generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=1, cells_per_smear=5, seed=34))
    (export.smears[0].folder / "smear.json").unlink()
    resources = sensor_resources(pipeline_env)
    resources["inbox"] = InboxResource(url=str(pipeline_env.inbox), settle_seconds=3600)
    with dg.build_sensor_context(instance=dagster_instance, resources=resources) as context:
        assert inbox_sensor(context).run_requests == []


def test_nightly_schedule_sweeps_the_whole_inbox(pipeline_env, dagster_instance):
    export = generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=2, cells_per_smear=5, seed=35))
    with dg.build_schedule_context(instance=dagster_instance, resources=sensor_resources(pipeline_env)) as context:
        requests = nightly_import_schedule(context)
    expected = sorted(TEST_KEY.smear_id(smear.accession) for smear in export.smears)
    assert sorted(request.partition_key for request in requests) == expected
    assert sorted(dagster_instance.get_dynamic_partitions(smear_partitions.name)) == expected
    assert all(request.run_key for request in requests)


def test_definitions_load_with_sensor_schedule_and_job(dagster_instance):
    # Loading resolves Dagster's definitions-state storage through the current instance: give it a live one.
    from hema_pipeline.defs.definitions import defs

    repository = defs.get_repository_def()
    assert repository.has_sensor_def("inbox_sensor")
    assert repository.has_schedule_def("nightly_import_schedule")
    assert repository.has_job("import_smears")


@pytest.mark.slow  # starts Python processes that load the code locations
def test_workspace_loads_in_the_dagster_cli(tmp_path):
    """What `dagster dev` loads: workspace.yaml -> the code location, validated by Dagster itself."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "HEMA_DEMO": "1", "HEMA_HOME": str(tmp_path), "DAGSTER_HOME": str(tmp_path)}
    completed = subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=repo,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "All code locations passed validation" in completed.stderr + completed.stdout
