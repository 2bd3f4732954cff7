"""Prediction stage, per smear partition: every cell classified by the champion models (8-class, then
the routed specialists), with calibrated probabilities, referral decisions and Grad-CAMs, and the smear
report (differential with exact intervals, flags). Thresholds are an asset of their own."""

# No `from __future__ import annotations`: Dagster reads the context and input annotations at definition time.
import hashlib
import json
from dataclasses import asdict

import dagster as dg

from hema_pipeline import settings
from hema_pipeline.defs.ingest import DUCKDB_WRITER_POOL, imported_smear, smear_partitions
from hema_pipeline.defs.kubernetes import PREDICTION_RUN_POD, k8s_tags
from hema_pipeline.defs.resources import StorageResource, WarehouseResource
from hema_pipeline.inference.flags import FlagSettings

PRIMARY_TASK = "pbc8"
NEUTROPHIL_DYSPLASIA_TASK = "neutrophil_dysplasia"
LYMPHOCYTE_MALIGNANCY_TASK = "lymphocyte_malignancy"
PREDICTION_TASKS = (PRIMARY_TASK, NEUTROPHIL_DYSPLASIA_TASK, LYMPHOCYTE_MALIGNANCY_TASK)


# When a smear is predicted on its own: eager (a newly imported smear, or any dependency updated, e.g. a
# new champion), except that the specialist champions are optional: a lab without dysplasia or
# malignancy models yet still gets its 8-class predictions. A specialist's *update* still re-predicts.
_OPTIONAL_DEPENDENCIES = dg.AssetSelection.assets(
    f"{NEUTROPHIL_DYSPLASIA_TASK}_champion", f"{LYMPHOCYTE_MALIGNANCY_TASK}_champion"
)
PREDICT_WHEN = (
    dg.AutomationCondition.eager()
    .replace(
        dg.AutomationCondition.any_deps_missing(),
        dg.AutomationCondition.any_deps_missing().ignore(_OPTIONAL_DEPENDENCIES),
    )
    .with_label("eager; specialist champions optional")
)


_FLAG_DEFAULTS = FlagSettings()


class FlagThresholdsConfig(dg.Config):
    """Every field of ``inference.flags.FlagSettings``, with its defaults (one source: a test
    checks that the two agree)."""

    # None: the newest `hema thresholds fit` on the lab's labelled smears, else the thesis's 0.123.
    dysplasia_share_threshold: float | None = None
    min_immature_granulocytes: int = _FLAG_DEFAULTS.min_immature_granulocytes
    min_erythroblasts: int = _FLAG_DEFAULTS.min_erythroblasts
    min_malignant_lymphocytes: int = _FLAG_DEFAULTS.min_malignant_lymphocytes
    max_referred_share: float = _FLAG_DEFAULTS.max_referred_share
    min_counted_leukocytes: int = _FLAG_DEFAULTS.min_counted_leukocytes


@dg.asset(
    group_name="predictions",
    kinds={"python"},
    owners=["team:haematology"],
    description=(
        "The smear-level thresholds a haematologist's flags depend on (dysplastic-neutrophil share for "
        "'review for myelodysplasia', immature cells, referred share, minimum counted leukocytes), versioned "
        "so each report records exactly which were used. The dysplasia threshold is the newest fit on the "
        "lab's labelled smears (`hema thresholds fit`) unless set here."
    ),
)
def smear_flag_thresholds(config: FlagThresholdsConfig, warehouse: WarehouseResource) -> dg.Output[dict]:
    from hema_pipeline.inference.smear_thresholds import latest_threshold_fit

    chosen = config.model_dump()
    if config.dysplasia_share_threshold is not None:
        source = "set in the asset's config"
    else:
        fitted = latest_threshold_fit(warehouse.warehouse())
        if fitted is None:
            chosen["dysplasia_share_threshold"] = _FLAG_DEFAULTS.dysplasia_share_threshold
            source = "default: the source thesis (ch. 5); no fit on this lab's smears yet"
        else:
            chosen["dysplasia_share_threshold"] = fitted["threshold"]
            source = (
                f"fit {fitted['fit_id']} of {fitted['fitted_at']} on {fitted['positive_smears']} + "
                f"{fitted['negative_smears']} labelled smears with {fitted['model_version']}: {fitted['reason']}"
            )
    values = asdict(FlagSettings(**chosen))
    version = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
    return dg.Output(
        values,
        metadata={"thresholds": dg.MetadataValue.json(values), "version": version, "dysplasia_share_threshold_source": source},
        data_version=dg.DataVersion(version),
    )


def _champion_classifiers(storage: StorageResource, warehouse: WarehouseResource) -> dict:
    from hema_pipeline.inference.champions import champion_classifiers

    classifiers = champion_classifiers(storage.lake(), warehouse.warehouse(), PREDICTION_TASKS)
    if PRIMARY_TASK not in classifiers:
        raise dg.Failure(f"no champion model for {PRIMARY_TASK}: materialise the `models` group first")
    return classifiers


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "smear_predictions",
            deps=[imported_smear, smear_flag_thresholds, *[f"{task}_champion" for task in PREDICTION_TASKS]],
            group_name="predictions",
            kinds={"duckdb", "keras"},
            owners=["team:haematology"],
            description=(
                "Every cell of the smear classified by the champion of pbc8; neutrophils routed to the "
                "neutrophil-dysplasia champion and lymphocytes to the lymphocyte-malignancy champion where "
                "those exist. Calibrated probabilities, accepted or referred (low confidence / unfamiliar), "
                "Grad-CAM for referred cells; rows keyed by (smear, cell, model version), so re-runs and "
                "new champions never duplicate and old predictions stay."
            ),
            automation_condition=PREDICT_WHEN,
        ),
        dg.AssetSpec(
            "smear_report",
            deps=["smear_predictions"],
            group_name="predictions",
            kinds={"duckdb", "markdown"},
            owners=["team:haematology"],
            description=(
                "The smear's differential with 95% Clopper-Pearson intervals, reference-range marks, flags "
                "(immature granulocytes, erythroblasts, suspected malignant lymphocytes, dysplasia share, "
                "many referrals), analyser agreement and the models and thresholds used."
            ),
            automation_condition=PREDICT_WHEN,
        ),
    ],
    ins={"flag_thresholds": dg.AssetIn(key=smear_flag_thresholds.key)},
    partitions_def=smear_partitions,
    pool=DUCKDB_WRITER_POOL,
    # Many smears at once (a new champion, a burst of imports) are one backfill, run in batches: each run
    # loads the champions once and predicts up to HEMA_PREDICTION_BATCH_SMEARS smears.
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=settings.prediction_batch_smears()),
)
def smear_predictions(
    context: dg.AssetExecutionContext, flag_thresholds: dict, storage: StorageResource, warehouse: WarehouseResource
):
    from hema_pipeline.inference.report import ReportSettings
    from hema_pipeline.inference.routing import thesis_routes
    from hema_pipeline.inference.smear import infer_smear, load_smear_cells, save_smear_inference

    smear_ids = list(context.partition_keys)
    classifiers = _champion_classifiers(storage, warehouse)
    routes = tuple(
        route
        for route in thesis_routes(PRIMARY_TASK, NEUTROPHIL_DYSPLASIA_TASK, LYMPHOCYTE_MALIGNANCY_TASK)
        if route.to_task in classifiers
    )
    report_settings = ReportSettings(flags=FlagSettings(**flag_thresholds))
    store, lake = warehouse.warehouse(), storage.lake()
    run_id = context.run.run_id
    predicted: dict[str, dict] = {}
    without_cells: list[str] = []
    failed: dict[str, str] = {}
    for number, smear_id in enumerate(smear_ids, start=1):
        # One smear's failure (an image missing from the lake, say) never stops the others in its batch:
        # their rows are saved, and the run fails at the end naming the smears that need a look.
        try:
            with store.connect(read_only=True) as connection:
                cells = load_smear_cells(connection, smear_id)
            if cells.empty:
                without_cells.append(smear_id)
                context.log.warning(f"smear {smear_id} has no imported cells (quarantined whole?): nothing to predict")
                continue
            inference = infer_smear(smear_id, cells, lake, classifiers, PRIMARY_TASK, routes, settings=report_settings)
            save_smear_inference(store, inference, prediction_run_id=run_id)
        except Exception as error:  # noqa: BLE001 - isolated per smear, reported below
            failed[smear_id] = f"{type(error).__name__}: {str(error)[:300]}"
            context.log.error(f"smear {smear_id} ({number}/{len(smear_ids)}): prediction failed: {failed[smear_id]}")
            continue
        report = inference.report
        predicted[smear_id] = {
            "cells": int(cells.shape[0]),
            "referred": int((~inference.predictions["accepted"]).sum()),
            "flags": [flag.code for flag in report.flags],
            "report_version": report.report_version,
        }
        if len(smear_ids) > 1:
            context.log.info(f"smear {smear_id} ({number}/{len(smear_ids)}): {predicted[smear_id]['cells']} cells predicted")
    if failed:
        raise dg.Failure(
            description=(
                f"{len(failed)} of {len(smear_ids)} smear(s) could not be predicted "
                f"({len(predicted)} predicted and saved): " + "; ".join(f"{smear} {reason}" for smear, reason in failed.items())
            ),
            metadata={"failed_smears": dg.MetadataValue.json(failed)},
        )
    yield dg.MaterializeResult(
        asset_key="smear_predictions",
        metadata={
            "smears": len(smear_ids),
            "cells": sum(item["cells"] for item in predicted.values()),
            "referred": sum(item["referred"] for item in predicted.values()),
            "smears_without_cells": dg.MetadataValue.json(without_cells),
            "model_versions": dg.MetadataValue.json(
                {task: classifier.contract.model_version for task, classifier in classifiers.items()}
            ),
        },
    )
    report_metadata: dict = {"smears": dg.MetadataValue.json(predicted)}
    if len(smear_ids) == 1 and predicted:
        # One smear: its whole report in the UI, as the lab reads it.
        report_metadata.update(
            {
                "report_version": report.report_version,
                "flags": dg.MetadataValue.json([flag.to_dict() for flag in report.flags]),
                "referred_cells": report.referred_cells,
                "report": dg.MetadataValue.md(report.markdown()),
            }
        )
    yield dg.MaterializeResult(asset_key="smear_report", metadata=report_metadata)


prediction_automation_sensor = dg.AutomationConditionSensorDefinition(
    "prediction_automation_sensor",
    target=dg.AssetSelection.assets("smear_predictions", "smear_report"),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=settings.prediction_sensor_interval_seconds(),
    # Automation runs carry no job tags: the run pod's shape must come with the run's own tags.
    run_tags={"hema/trigger": "automation", **k8s_tags(PREDICTION_RUN_POD)},
    description=(
        "Predicts each newly imported smear, and every smear again when a champion changes (the automation "
        "condition of smear_predictions / smear_report). Running by default, unlike Dagster's default "
        "automation sensor."
    ),
)


predict_smears_job = dg.define_asset_job(
    "predict_smears",
    selection=dg.AssetSelection.assets("smear_predictions", "smear_report"),
    tags=k8s_tags(PREDICTION_RUN_POD),
    description="Classify one smear partition with the current champions and write its report.",
)
