"""The single Dagster ``Definitions`` of hema-pipeline (loaded by workspace.yaml and `dagster dev`).

At network scale (deploy/) the same module is loaded by two code locations, each with its share of the
definitions, chosen by ``HEMA_CODE_LOCATION``:

- ``ingest``: the import of smears from the inbox (asset, job, sensor, nightly schedule). The only
  location that holds the inbox credentials and the pseudonymisation key, and it never imports TensorFlow.
- ``ml``: everything downstream of the import (cell table, datasets, models, predictions, their jobs and
  sensors). It never sees an identifiable byte: no inbox, no key.
- ``all`` (default): both, for the embedded default (``make demo``, ``make ui``, the tests).

Assets in one location depend on the other's by asset key; the daemon evaluates automation over the
whole workspace, so a smear imported by ``ingest`` is predicted by ``ml``.
"""

import os

import dagster as dg

from hema_pipeline.defs.automation import retraining_policy_from_settings, retraining_sensor, run_failure_recorder
from hema_pipeline.defs.datasets import dataset_assets, dataset_checks
from hema_pipeline.defs.ingest import (
    import_smears_job,
    imported_smear,
    inbox_sensor,
    nightly_import_schedule,
    smear_partition_retention_sensor,
)
from hema_pipeline.defs.models import model_assets, train_models_job
from hema_pipeline.defs.predictions import (
    predict_smears_job,
    prediction_automation_sensor,
    smear_flag_thresholds,
    smear_predictions,
)
from hema_pipeline.defs.quality import cell_table, cell_table_checks
from hema_pipeline.defs.resources import default_resources

CODE_LOCATIONS = ("all", "ingest", "ml")


def build_definitions(location: str = "all") -> dg.Definitions:
    """The definitions of one code location (``CODE_LOCATIONS``)."""
    if location not in CODE_LOCATIONS:
        raise ValueError(f"HEMA_CODE_LOCATION must be one of {', '.join(CODE_LOCATIONS)}, got {location!r}")
    resources = default_resources()
    ingest = dg.Definitions(
        assets=[imported_smear],
        jobs=[import_smears_job],
        sensors=[inbox_sensor, smear_partition_retention_sensor],
        schedules=[nightly_import_schedule],
        resources={name: resources[name] for name in ("inbox", "storage", "warehouse", "pseudonyms", "partition_retention")},
    )
    ml = dg.Definitions(
        assets=[cell_table, *dataset_assets, *model_assets, smear_flag_thresholds, smear_predictions],
        asset_checks=[*cell_table_checks, *dataset_checks],
        jobs=[train_models_job, predict_smears_job],
        # The failure recorder watches every location's runs (monitor_all_code_locations) from here.
        sensors=[prediction_automation_sensor, retraining_sensor, run_failure_recorder],
        resources={
            **{name: resources[name] for name in ("storage", "warehouse", "io_manager")},
            "retraining_policy": retraining_policy_from_settings(),
        },
    )
    if location == "ingest":
        return ingest
    if location == "ml":
        return ml
    return dg.Definitions.merge(ingest, dg.Definitions(resources=resources), ml)


defs = build_definitions(os.environ.get("HEMA_CODE_LOCATION", "all").strip() or "all")
