"""Model stage, per task: train -> calibrate -> evaluate and register -> promotion decision.

Each step is an asset, so every model, temperature and threshold is versioned and its lineage runs back
through the dataset version to the imported smears. Artefacts live in the lake through the storage
resource; assets hand each other small handles (keys and versions), never "the latest file".
"""

# No `from __future__ import annotations`: Dagster reads the context and input annotations at definition time.
import base64
import math

import dagster as dg

from hema_pipeline.datasets.tasks import TASKS
from hema_pipeline.datasets.versioning import DatasetHandle
from hema_pipeline.defs.datasets import dataset_asset_key
from hema_pipeline.defs.ingest import DUCKDB_WRITER_POOL
from hema_pipeline.defs.kubernetes import TRAINING_RUN_POD, k8s_tags, training_executor, training_step_pod
from hema_pipeline.defs.resources import StorageResource, WarehouseResource
from hema_pipeline.modeling.promotion import PromotionPolicy
from hema_pipeline.modeling.registry import ModelCard
from hema_pipeline.modeling.stage import (
    CalibrationHandle,
    CalibrationSettings,
    TrainedModelHandle,
    TrainingSettings,
    calibrate,
    evaluate_and_register,
    gate_candidate,
    train_for_dataset,
)

TRAINER_POOL = "trainer"  # one training at a time: it takes every core (or the GPU)
# Run tag that dagster.yaml's tag_concurrency_limits holds to one run at a time (queued, not refused).
TRAINER_TAGS = {"hema/resource": "trainer"}


_TRAINING_DEFAULTS = TrainingSettings()
_CALIBRATION_DEFAULTS = CalibrationSettings()
_PROMOTION_DEFAULTS = PromotionPolicy()


class TrainingRunConfig(dg.Config):
    """The launchpad face of ``modeling.stage.TrainingSettings``: the same fields with the same defaults (a
    test holds them together). Unset epochs, rate, patience and frozen blocks take the architecture's
    measured recipe."""

    architecture: str = _TRAINING_DEFAULTS.architecture
    epochs: int | None = _TRAINING_DEFAULTS.epochs
    batch_size: int = _TRAINING_DEFAULTS.batch_size
    gpu_batch_size: int = _TRAINING_DEFAULTS.gpu_batch_size
    learning_rate: float | None = _TRAINING_DEFAULTS.learning_rate
    early_stopping_patience: int | None = _TRAINING_DEFAULTS.early_stopping_patience
    frozen_blocks: int | None = _TRAINING_DEFAULTS.frozen_blocks
    seed: int = _TRAINING_DEFAULTS.seed
    ensemble_members: int = _TRAINING_DEFAULTS.ensemble_members

    def settings(self) -> TrainingSettings:
        return TrainingSettings(**self.model_dump())


class CalibrationConfig(dg.Config):
    """The launchpad face of ``modeling.stage.CalibrationSettings`` (a test holds them together)."""

    target_accuracy: float = _CALIBRATION_DEFAULTS.target_accuracy
    referral_confidence: float = _CALIBRATION_DEFAULTS.referral_confidence
    ood_keep_quantile: float = _CALIBRATION_DEFAULTS.ood_keep_quantile
    test_time_views: int = _CALIBRATION_DEFAULTS.test_time_views

    def settings(self) -> CalibrationSettings:
        return CalibrationSettings(**self.model_dump())


class PromotionConfig(dg.Config):
    """The launchpad face of ``promotion.PromotionPolicy`` (a test holds them together)."""

    min_accuracy_gain: float = _PROMOTION_DEFAULTS.min_accuracy_gain
    min_macro_f1_gain: float = _PROMOTION_DEFAULTS.min_macro_f1_gain
    min_accuracy: float = _PROMOTION_DEFAULTS.min_accuracy
    min_macro_f1: float = _PROMOTION_DEFAULTS.min_macro_f1
    max_ece_after: float = _PROMOTION_DEFAULTS.max_ece_after
    min_referral_coverage: float = _PROMOTION_DEFAULTS.min_referral_coverage

    def policy(self) -> PromotionPolicy:
        return PromotionPolicy(**self.model_dump())


def _png_markdown(png: bytes, title: str) -> dg.MarkdownMetadataValue:
    return dg.MarkdownMetadataValue(f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})")


def _per_class_markdown(records: list[dict]) -> str:
    columns = list(records[0]) if records else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for record in records:
        lines.append(
            "| " + " | ".join(f"{value:.4f}" if isinstance(value, float) else str(value) for value in record.values()) + " |"
        )
    return "\n".join(lines)


def build_model_assets(task_name: str) -> list[dg.AssetsDefinition]:
    task = TASKS[task_name]
    dataset_key = dataset_asset_key(task_name)
    tags = {"task": task_name}

    @dg.asset(
        name=f"{task_name}_trained_model",
        ins={"dataset": dg.AssetIn(key=dataset_key)},
        group_name="models",
        kinds={"keras", "tensorflow"},
        owners=["team:ml"],
        tags=tags,
        pool=TRAINER_POOL,
        # Its own pod with a GPU under k8s_job_executor (HEMA_EXECUTOR=k8s); inert otherwise.
        op_tags=k8s_tags(training_step_pod()),
        description=(
            f"A {task_name} network ({task.architecture_hint} unless configured; an efficientnet_lite backbone "
            "starts from ImageNet weights, the others from scratch) trained on the dataset's training split "
            "(class-balanced, augmented on the fly), early-stopped on the validation split; GPU with mixed "
            "precision when present, CPU otherwise. The weights are stored content-addressed in the lake."
        ),
    )
    def trained_model(
        context: dg.AssetExecutionContext, config: TrainingRunConfig, dataset: DatasetHandle, storage: StorageResource
    ) -> dg.Output[TrainedModelHandle]:
        from hema_pipeline.modeling.training import training_curves_png

        lake = storage.lake()
        trained = train_for_dataset(
            dataset, lake, config.settings(), progress=lambda line: context.log.info(f"{task_name}: {line}")
        )
        result, handle = trained.result, trained.handle
        context.log.info(
            f"{task_name}: {result.epochs_run} epochs on {result.device} in {result.seconds:.0f} s, "
            f"best validation accuracy {result.best_val_accuracy:.4f}"
        )
        curves = "\n\n".join(
            _png_markdown(training_curves_png(member.history, member.best_epoch), f"training curves, member {index + 1}").md_str
            or ""
            for index, member in enumerate(result.members)
        )
        return dg.Output(
            handle,
            metadata={
                "dataset_version": dataset.dataset_version,
                "device": result.device,
                "epochs_run": result.epochs_run,
                "ensemble_members": trained.architecture.ensemble_members,
                "members": dg.MetadataValue.json(result.member_summaries()),
                "training_seconds": round(result.seconds, 1),
                "best_val_accuracy": result.best_val_accuracy,
                "parameters": trained.parameters,
                "architecture": dg.MetadataValue.json(handle.architecture),
                "training_curves": dg.MetadataValue.md(curves),
                "artifact": dg.MetadataValue.path(lake.uri(handle.model_key)),
            },
            data_version=dg.DataVersion(handle.model_key.rsplit("/", 1)[-1].removesuffix(".keras")[:16]),
        )

    @dg.asset(
        name=f"{task_name}_calibration",
        ins={"dataset": dg.AssetIn(key=dataset_key), "trained": dg.AssetIn(key=f"{task_name}_trained_model")},
        group_name="models",
        kinds={"numpy"},
        owners=["team:ml"],
        tags=tags,
        description=(
            "Calibration artefacts fitted on the calibration split: the temperature (by NLL), the confidence "
            "threshold certified so that accepted cells reach the target accuracy with the stated confidence "
            "(candidates proposed on the validation split; the rest go to a technologist), and the energy "
            "threshold above which a cell is referred as unfamiliar."
        ),
    )
    def calibration(
        context: dg.AssetExecutionContext,
        config: CalibrationConfig,
        dataset: DatasetHandle,
        trained: TrainedModelHandle,
        storage: StorageResource,
    ) -> dg.Output[CalibrationHandle]:
        calibrated = calibrate(dataset, storage.lake(), trained, config.settings())
        policy, temperature = calibrated.policy, calibrated.temperature
        context.log.info(f"{task_name} referral policy: {policy.describe_guarantee()}")
        return dg.Output(
            calibrated.handle,
            metadata={
                "temperature": temperature.temperature,
                "test_time_views": calibrated.handle.test_time_views,
                "calibration_cells": calibrated.calibration_cells,
                "nll_before": temperature.nll_before,
                "nll_after": temperature.nll_after,
                "referral_guarantee": policy.describe_guarantee(),
                "referral_threshold": None if math.isinf(policy.global_threshold) else policy.global_threshold,
                "referral_policy": dg.MetadataValue.json(policy.to_dict()),
                "ood_threshold": dg.MetadataValue.json(calibrated.ood.to_dict()),
            },
        )

    @dg.asset(
        name=f"{task_name}_model",
        ins={
            "dataset": dg.AssetIn(key=dataset_key),
            "trained": dg.AssetIn(key=f"{task_name}_trained_model"),
            "calibrated": dg.AssetIn(key=f"{task_name}_calibration"),
        },
        group_name="models",
        kinds={"keras", "duckdb"},
        owners=["team:ml"],
        tags=tags,
        pool=DUCKDB_WRITER_POOL,
        description=(
            "The registered model: evaluated on the test split (per-class precision, sensitivity, "
            "specificity, F1, ROC AUC, confusion matrix; ECE/MCE before and after temperature scaling; "
            "coverage and accepted-cell accuracy of the referral policy), stored with its model card "
            "content-addressed in the lake and listed in the `models` table as a candidate."
        ),
    )
    def registered_model(
        context: dg.AssetExecutionContext,
        dataset: DatasetHandle,
        trained: TrainedModelHandle,
        calibrated: CalibrationHandle,
        storage: StorageResource,
        warehouse: WarehouseResource,
    ):
        lake = storage.lake()
        registration = evaluate_and_register(dataset, lake, warehouse.warehouse(), trained, calibrated)
        card, evaluation, referral = registration.card, registration.evaluation, registration.referral
        calibration, temperature = registration.calibration, calibrated.temperature
        context.log.info(
            f"{task_name} model {card.model_version}: test accuracy {evaluation.accuracy:.4f}, "
            f"macro F1 {evaluation.macro_f1:.4f}, ECE {calibration.after.ece:.4f}, coverage {referral.coverage:.3f}"
        )
        yield dg.Output(
            card,
            metadata={
                "model_version": card.model_version,
                "dataset_version": dataset.dataset_version,
                "test_cells": evaluation.cells,
                "accuracy": evaluation.accuracy,
                "macro_f1": evaluation.macro_f1,
                "ece_before": calibration.before.ece,
                "ece_after": calibration.after.ece,
                "mce_after": calibration.after.mce,
                "temperature": temperature,
                "referral_coverage": referral.coverage,
                "accepted_accuracy": referral.accepted_accuracy,
                "referral_guarantee": registration.policy.describe_guarantee(),
                "per_class": dg.MetadataValue.md(_per_class_markdown(evaluation.per_class_records())),
                "confusion_matrix": _png_markdown(registration.confusion_png, "confusion matrix"),
                "reliability_diagram": _png_markdown(registration.reliability_png, "reliability diagram"),
                "card": dg.MetadataValue.path(lake.uri(card.card_key)),
            },
            data_version=dg.DataVersion(card.model_version),
        )

    @dg.asset(
        name=f"{task_name}_champion",
        ins={"candidate": dg.AssetIn(key=f"{task_name}_model"), "dataset": dg.AssetIn(key=dataset_key)},
        group_name="models",
        kinds={"duckdb"},
        owners=["team:ml"],
        tags=tags,
        pool=DUCKDB_WRITER_POOL,
        description=(
            "The promotion gate: the candidate replaces the task's champion only if it beats it on the same "
            "test split by the configured margins and passes the floors; every decision is recorded in "
            "`model_promotions`. A champion trained on an older dataset version is re-evaluated on the "
            "candidate's test split first, so both sit the same exam. Its value is the champion's model "
            "version, which predictions use."
        ),
    )
    def champion(
        context: dg.AssetExecutionContext,
        config: PromotionConfig,
        candidate: ModelCard,
        dataset: DatasetHandle,
        storage: StorageResource,
        warehouse: WarehouseResource,
    ) -> dg.Output[str]:
        policy = config.policy()
        gate = gate_candidate(dataset, storage.lake(), warehouse.warehouse(), candidate, policy)
        decision, champion_version, champion_on_split = gate.decision, gate.champion, gate.champion_on_candidate_split
        if champion_on_split is not None:
            context.log.info(
                f"{task_name}: champion {champion_on_split.model_version} re-evaluated on {dataset.dataset_version}: "
                f"accuracy {champion_on_split.accuracy:.4f}, macro F1 {champion_on_split.macro_f1:.4f}"
            )
        if champion_version is None:
            raise dg.Failure(f"{task_name}: no champion after the promotion decision {decision.action!r}; see model_promotions")
        context.log.info(f"{task_name}: {decision.action} {candidate.model_version}: {decision.reason}")
        return dg.Output(
            champion_version,
            metadata={
                "champion": champion_version,
                "candidate": candidate.model_version,
                "decision": decision.action,
                "reason": decision.reason,
                "previous_champion": decision.previous_champion or "none",
                "policy": dg.MetadataValue.json(policy.to_dict()),
            },
            data_version=dg.DataVersion(champion_version or "none"),
        )

    return [trained_model, calibration, registered_model, champion]


model_assets = [asset for name in TASKS for asset in build_model_assets(name)]


train_models_job = dg.define_asset_job(
    "train_models",
    tags={**TRAINER_TAGS, **k8s_tags(TRAINING_RUN_POD)},
    executor_def=training_executor(),
    selection=dg.AssetSelection.groups("quality", "datasets", "models") | dg.AssetSelection.assets("smear_flag_thresholds"),
    description=(
        "Snapshot and validate the cell table, rebuild every task's dataset, train, calibrate, register and "
        "decide promotion. A task without enough data yields no dataset and no model."
    ),
)
