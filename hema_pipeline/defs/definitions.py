"""The single Dagster ``Definitions`` of hema-pipeline (loaded by workspace.yaml and `dagster dev`)."""

import dagster as dg

from hema_pipeline.defs.automation import retraining_policy_from_settings, retraining_sensor, run_failure_recorder
from hema_pipeline.defs.datasets import dataset_assets, dataset_checks
from hema_pipeline.defs.ingest import imported_smear, import_smears_job, inbox_sensor, nightly_import_schedule
from hema_pipeline.defs.models import model_assets, train_models_job
from hema_pipeline.defs.predictions import (
    predict_smears_job,
    prediction_automation_sensor,
    smear_flag_thresholds,
    smear_predictions,
)
from hema_pipeline.defs.quality import cell_table, cell_table_checks
from hema_pipeline.defs.resources import default_resources

defs = dg.Definitions(
    assets=[imported_smear, cell_table, *dataset_assets, *model_assets, smear_flag_thresholds, smear_predictions],
    asset_checks=[*cell_table_checks, *dataset_checks],
    jobs=[import_smears_job, train_models_job, predict_smears_job],
    sensors=[inbox_sensor, prediction_automation_sensor, retraining_sensor, run_failure_recorder],
    schedules=[nightly_import_schedule],
    resources={**default_resources(), "retraining_policy": retraining_policy_from_settings()},
)
