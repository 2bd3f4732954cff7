"""Automation beyond imports: the retraining sensor (new verified cells, referral drift) and the
run-failure sensor that records failed runs in the warehouse. The decisions are in
``hema_pipeline.monitoring``; these are the Dagster wrappers."""

# No `from __future__ import annotations`: Dagster reads the context and resource annotations at definition time.
import datetime as dt
import json
from typing import Any

import dagster as dg

from hema_pipeline import settings
from hema_pipeline.datasets.tasks import TASKS
from hema_pipeline.defs.datasets import dataset_asset_key, dataset_checks
from hema_pipeline.defs.models import TRAINER_TAGS, train_models_job
from hema_pipeline.defs.quality import cell_table, cell_table_checks
from hema_pipeline.defs.resources import WarehouseResource
from hema_pipeline.monitoring.failures import RunFailure, record_run_failure
from hema_pipeline.monitoring.retraining import (
    RetrainingPolicy,
    TaskRetrainingState,
    decide_retraining,
    gather_evidence,
)

MODEL_STAGES = ("trained_model", "calibration", "model", "champion")


_POLICY_DEFAULTS = RetrainingPolicy()


class RetrainingPolicyResource(dg.ConfigurableResource):
    """When the retraining sensor launches a task's training: the fields of ``RetrainingPolicy`` with its
    defaults, overridden by HEMA_RETRAIN_* variables where set. The promotion gate still decides whether
    the new model replaces the champion."""

    min_new_verified_cells: int = _POLICY_DEFAULTS.min_new_verified_cells
    max_referred_share: float = _POLICY_DEFAULTS.max_referred_share
    min_predictions_for_drift: int = _POLICY_DEFAULTS.min_predictions_for_drift
    # A task's first model is a deliberate act (materialise it in the UI); set true to let the sensor
    # train any task that reaches min_new_verified_cells without a champion.
    train_tasks_without_champion: bool = False
    tasks: list[str] = list(TASKS)

    def policy(self) -> RetrainingPolicy:
        return RetrainingPolicy(
            min_new_verified_cells=self.min_new_verified_cells,
            max_referred_share=self.max_referred_share,
            min_predictions_for_drift=self.min_predictions_for_drift,
        )


def retraining_policy_from_settings() -> RetrainingPolicyResource:
    overrides: dict[str, Any] = {
        "min_new_verified_cells": settings.retrain_min_new_verified_cells(),
        "max_referred_share": settings.retrain_max_referred_share(),
        "min_predictions_for_drift": settings.retrain_min_predictions_for_drift(),
    }
    return RetrainingPolicyResource(
        **{name: value for name, value in overrides.items() if value is not None},
        train_tasks_without_champion=settings.retrain_tasks_without_champion(),
    )


def retraining_selection(task_name: str) -> tuple[list[dg.AssetKey], list[dg.AssetCheckKey]]:
    """A fresh cell-table snapshot, the task's dataset and model chain, and the checks that guard them."""
    assets = [cell_table.key, dataset_asset_key(task_name), *[dg.AssetKey(f"{task_name}_{stage}") for stage in MODEL_STAGES]]
    guarded = {cell_table.key, dataset_asset_key(task_name)}
    checks = [
        key for definition in (*cell_table_checks, *dataset_checks) for key in definition.check_keys if key.asset_key in guarded
    ]
    return assets, checks


@dg.sensor(
    job=train_models_job,
    minimum_interval_seconds=settings.retraining_sensor_interval_seconds(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Launches a task's training (fresh cell-table snapshot -> dataset -> model -> promotion gate) when "
        "enough newly technologist-verified cells have arrived since the champion's dataset, or when the "
        "champion refers too large a share of cells. Thresholds: the `retraining_policy` resource."
    ),
)
def retraining_sensor(
    context: dg.SensorEvaluationContext, warehouse: WarehouseResource, retraining_policy: RetrainingPolicyResource
):
    policy = retraining_policy.policy()
    store = warehouse.warehouse()
    if not store.exists():
        return dg.SensorResult(skip_reason=dg.SkipReason(f"no warehouse yet at {store.description}: nothing imported"))
    cursor = json.loads(context.cursor) if context.cursor else {}
    next_cursor = dict(cursor)
    requests: list[dg.RunRequest] = []
    observed: list[str] = []
    with store.connect(read_only=True) as connection:
        for task_name in retraining_policy.tasks:
            state = TaskRetrainingState.from_dict(cursor.get(task_name, {}))
            evidence = gather_evidence(connection, TASKS[task_name], state.drift_checked_until)
            if evidence.champion is None and not retraining_policy.train_tasks_without_champion:
                continue
            triggers, next_state = decide_retraining(evidence, state, policy)
            next_cursor[task_name] = next_state.to_dict()
            observed.append(
                f"{task_name}: {evidence.new_verified_cells} new verified cells, "
                f"{evidence.referred_in_window}/{evidence.predictions_in_window} referred"
            )
            if not triggers:
                continue
            for trigger in triggers:
                context.log.info(f"retraining {task_name}: {trigger.detail}")
            assets, checks = retraining_selection(task_name)
            requests.append(
                dg.RunRequest(
                    run_key="|".join(trigger.run_key for trigger in triggers),
                    asset_selection=assets,
                    asset_check_keys=checks,
                    tags={
                        **TRAINER_TAGS,
                        "hema/trigger": "retraining",
                        "hema/task": task_name,
                        "hema/retraining_reason": ",".join(trigger.reason for trigger in triggers),
                        "hema/retraining_detail": "; ".join(trigger.detail for trigger in triggers)[:1000],
                    },
                )
            )
    if not requests:
        return dg.SensorResult(
            skip_reason=dg.SkipReason("no task needs retraining: " + ("; ".join(observed) or "no champions yet")),
            cursor=json.dumps(next_cursor, sort_keys=True),
        )
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(next_cursor, sort_keys=True))


@dg.run_failure_sensor(
    name="run_failure_recorder",
    minimum_interval_seconds=settings.failure_sensor_interval_seconds(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    # At scale the imports run in another code location (hema_pipeline/defs/definitions.py).
    monitor_all_code_locations=True,
    description="Records every failed run, of every code location, in the warehouse table `run_failures`.",
)
def run_failure_recorder(context: dg.RunFailureSensorContext, warehouse: WarehouseResource) -> None:
    run = context.dagster_run
    steps, error_types, messages = [], [], [context.failure_event.message or ""]
    for event in context.get_step_failure_events():
        steps.append(event.step_key or "")
        error = getattr(event.event_specific_data, "error", None)
        if error is not None:
            error_types.append(error.cls_name or "")
            messages.append(f"{event.step_key}: {error.cls_name}: {error.message.strip()}")
    failure = RunFailure(
        run_id=run.run_id,
        job_name=run.job_name,
        partition_key=run.tags.get("dagster/partition"),
        trigger=run.tags.get("hema/trigger"),
        failed_steps=steps,
        error_types=error_types,
        message="\n".join(message for message in messages if message),
        failed_at=dt.datetime.now(dt.UTC),
    )
    if record_run_failure(warehouse.warehouse(), failure):
        context.log.info(f"recorded failed run {run.run_id} ({run.job_name}) in run_failures")
