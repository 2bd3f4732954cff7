"""When smears are predicted on their own: the automation condition of the prediction assets, evaluated
by Dagster against a real instance's materialisation history (what `prediction_automation_sensor` does
on every tick), and the retraining sensor on a fresh install."""

from __future__ import annotations

import dagster as dg

from hema_pipeline.defs.automation import RetrainingPolicyResource, retraining_sensor
from hema_pipeline.defs.definitions import defs
from hema_pipeline.defs.ingest import smear_partitions
from hema_pipeline.defs.resources import WarehouseResource

PREDICTIONS = dg.AssetKey("smear_predictions")


def _materialised(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=partition))


def _requested(instance: dg.DagsterInstance, cursor=None):
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
    return set(result.get_requested_partitions(PREDICTIONS)), result.cursor


def test_smears_are_predicted_once_imported_and_again_after_a_new_champion(dagster_instance) -> None:
    instance = dagster_instance
    instance.add_dynamic_partitions(smear_partitions.name, ["S1", "S2"])
    _materialised(instance, "smear_flag_thresholds")
    for smear in ("S1", "S2"):
        _materialised(instance, "imported_smear", smear)

    # No pbc8 champion yet: nothing to predict with.
    requested, cursor = _requested(instance)
    assert requested == set()

    # A pbc8 champion, and no specialist champions (a lab without dysplasia/malignancy data): predicted.
    _materialised(instance, "pbc8_champion")
    requested, cursor = _requested(instance, cursor)
    assert requested == {"S1", "S2"}
    for smear in ("S1", "S2"):
        _materialised(instance, "smear_predictions", smear)
        _materialised(instance, "smear_report", smear)
    requested, cursor = _requested(instance, cursor)
    assert requested == set()  # nothing new: no second request

    # A new smear arrives: only it.
    instance.add_dynamic_partitions(smear_partitions.name, ["S3"])
    _materialised(instance, "imported_smear", "S3")
    requested, cursor = _requested(instance, cursor)
    assert requested == {"S3"}
    _materialised(instance, "smear_predictions", "S3")
    _materialised(instance, "smear_report", "S3")
    requested, cursor = _requested(instance, cursor)

    # A new specialist champion re-predicts every smear (old predictions stay, keyed by model version).
    _materialised(instance, "neutrophil_dysplasia_champion")
    requested, cursor = _requested(instance, cursor)
    assert requested == {"S1", "S2", "S3"}


def test_prediction_sensor_runs_by_default_and_targets_the_prediction_assets() -> None:
    sensor = defs.get_sensor_def("prediction_automation_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert {key.to_user_string() for key in sensor.asset_selection.resolve(defs.resolve_asset_graph())} == {
        "smear_predictions",
        "smear_report",
    }


def test_retraining_sensor_skips_before_anything_was_imported(pipeline_env, dagster_instance) -> None:
    with dg.build_sensor_context(
        instance=dagster_instance,
        resources={
            "warehouse": WarehouseResource(path=str(pipeline_env.warehouse)),
            "retraining_policy": RetrainingPolicyResource(),
        },
    ) as context:
        result = retraining_sensor(context)
    assert not result.run_requests
    assert "no warehouse yet" in result.skip_reason.skip_message
    assert not pipeline_env.warehouse.exists()  # a sensor never creates the warehouse
