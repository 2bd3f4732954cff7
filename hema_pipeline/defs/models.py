"""Model stage, per task: train -> calibrate -> evaluate and register -> promotion decision.

Each step is an asset, so every model, temperature and threshold is versioned and its lineage runs back
through the dataset version to the imported smears. Artefacts live in the lake through the storage
resource; assets hand each other small handles (keys and versions), never "the latest file".
"""

# No `from __future__ import annotations`: Dagster reads the context and input annotations at definition time.
import base64
import math
import tempfile
from dataclasses import asdict, dataclass

import dagster as dg

from hema_pipeline import settings
from hema_pipeline.datasets.input_pipeline import evaluation_dataset, resolve_local_image_paths, split_inputs, training_stream
from hema_pipeline.datasets.splits import CALIBRATION, TEST, TRAIN, VALIDATION
from hema_pipeline.datasets.tasks import TASKS
from hema_pipeline.defs.datasets import DatasetHandle, dataset_asset_key
from hema_pipeline.defs.ingest import DUCKDB_WRITER_POOL
from hema_pipeline.defs.kubernetes import TRAINING_RUN_POD, k8s_tags, training_executor, training_step_pod
from hema_pipeline.defs.resources import StorageResource, WarehouseResource
from hema_pipeline.modeling.calibration import DEFAULT_REFERRAL_CONFIDENCE, DEFAULT_REFERRAL_TARGET
from hema_pipeline.storage.object_store import ObjectStore

TRAINER_POOL = "trainer"  # one training at a time: it takes every core (or the GPU)
# Run tag that dagster.yaml's tag_concurrency_limits holds to one run at a time (queued, not refused).
TRAINER_TAGS = {"hema/resource": "trainer"}


@dataclass(frozen=True)
class TrainedModelHandle:
    task: str
    dataset_version: str
    model_key: str  # the .keras bytes in the lake, content-addressed
    architecture: dict
    training_config: dict
    training_seconds: float  # all ensemble members together
    device: str
    epochs_run: int  # all ensemble members together
    best_val_accuracy: float  # of the stored model (the ensemble's, for an ensemble)


@dataclass(frozen=True)
class CalibrationHandle:
    task: str
    dataset_version: str
    model_key: str
    temperature: float
    referral_policy: dict
    ood_threshold: dict
    test_time_views: int = 1  # the logits everything above was fitted on are means over this many views


class TrainingRunConfig(dg.Config):
    architecture: str = ""  # compact | standard | large | efficientnet_lite0 | efficientnet_lite2; empty: the task's hint
    # Unset: the architecture's measured recipe (`training.recipe_for`): from scratch 70 epochs at 2e-3 with
    # patience 25; from ImageNet weights 9 epochs at 5e-4 with patience 9.
    epochs: int | None = None
    batch_size: int = 64
    gpu_batch_size: int = 256
    learning_rate: float | None = None
    early_stopping_patience: int | None = None
    seed: int = 20260101
    # >1: a deep ensemble of that many networks, each trained as above with its own weight seed and sample
    # order, stored as one model averaging their logits. Training and prediction cost grow in proportion.
    ensemble_members: int = 1


class CalibrationConfig(dg.Config):
    # Accepted cells reach this accuracy with `referral_confidence` confidence, certified on the calibration
    # split (an exact binomial test per candidate threshold, in a fixed order). 99.5% at 95% needs at least
    # 598 accepted calibration cells: a smaller split refers every cell rather than claim what it cannot show.
    target_accuracy: float = DEFAULT_REFERRAL_TARGET
    referral_confidence: float = DEFAULT_REFERRAL_CONFIDENCE
    ood_keep_quantile: float = 0.95  # share of known calibration cells the unfamiliarity threshold keeps
    # Logits are averaged over this many dihedral views of each cell (1, 2, 4 or 8) for calibration, test
    # evaluation and every later prediction: a cell has no orientation, and neither should its answer.
    test_time_views: int = 8


class PromotionConfig(dg.Config):
    """The launchpad face of ``registry.PromotionPolicy``: the same fields with the same defaults (a test
    holds them together)."""

    min_accuracy_gain: float = 0.002
    min_macro_f1_gain: float = 0.0
    min_accuracy: float = 0.0
    min_macro_f1: float = 0.0
    max_ece_after: float = 1.0
    min_referral_coverage: float = 0.0


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


class _SplitReader:
    """Local image files for a dataset's splits (an S3 lake is mirrored into the local cache first)."""

    def __init__(self, dataset: DatasetHandle, lake: ObjectStore) -> None:
        self.dataset = dataset
        self.manifest = dataset.manifest(lake)
        keys = sorted(set(self.manifest["image_key"]))
        cache = settings.hema_home() / "cache" / "images"
        self.paths_by_key = dict(zip(keys, resolve_local_image_paths(lake, keys, cache), strict=True))

    def inputs(self, split: str) -> tuple[list[str], list[int]]:
        return split_inputs(self.manifest, split, self.paths_by_key)

    def evaluation(self, split: str):  # -> tf.data.Dataset
        paths, labels = self.inputs(split)
        config = self.dataset.config
        return evaluation_dataset(paths, labels, image_size=config.image_size, crop_fraction=config.crop_fraction)


def _outputs(model, reader: _SplitReader, split: str, test_time_views: int):  # -> ModelOutputs
    from hema_pipeline.modeling.networks import predict_outputs

    return predict_outputs(model, reader.evaluation(split), test_time_views=test_time_views)


def _load_keras(lake: ObjectStore, key: str):
    from hema_pipeline.modeling.registry import model_from_bytes

    return model_from_bytes(lake.get_bytes(key))


def _champion_on_candidate_split(
    task_name: str, dataset: DatasetHandle, storage: StorageResource, store, candidate_dataset_version: str
):
    """The current champion's test metrics on the candidate's test split (``SplitMetrics``), or None where
    the stored metrics already compare (same dataset version), there is no champion, or the classes
    differ (the gate refuses that on its own)."""
    from hema_pipeline.datasets.input_pipeline import evaluation_dataset
    from hema_pipeline.modeling.evaluation import evaluate_logits
    from hema_pipeline.modeling.networks import predict_outputs
    from hema_pipeline.modeling.registry import SplitMetrics, current_champion, load_model, warehouse_rows

    champion_version = current_champion(store, task_name)
    if champion_version is None:
        return None
    rows = warehouse_rows(store, "select dataset_version from models where model_version = ?", [champion_version])
    if rows.empty or rows.iloc[0]["dataset_version"] == candidate_dataset_version:
        return None
    lake = storage.lake()
    loaded = load_model(lake, store, task_name, champion_version)
    if list(loaded.card.class_names) != list(dataset.classes):
        return None
    paths, labels = _SplitReader(dataset, lake).inputs(TEST)
    card = loaded.card
    images = evaluation_dataset(paths, labels, image_size=card.input_size, cache=False, crop_fraction=card.crop_fraction)
    outputs = predict_outputs(loaded.model, images, test_time_views=card.test_time_views)
    if outputs.labels is None:
        raise RuntimeError(f"the test split of {dataset.dataset_version} reached the champion without its labels")
    report = evaluate_logits(outputs.logits, outputs.labels, dataset.classes, loaded.card.temperature)
    return SplitMetrics.from_report(champion_version, dataset.dataset_version, report)


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
        from hema_pipeline.modeling.networks import architecture_preset
        from hema_pipeline.modeling.registry import model_to_bytes, sha256_hex
        from hema_pipeline.modeling.training import (
            TrainingConfig,
            recipe_for,
            train_ensemble,
            training_batch_size,
            training_curves_png,
        )

        lake = storage.lake()
        reader = _SplitReader(dataset, lake)
        dataset_config = dataset.config
        arch = architecture_preset(config.architecture or task.architecture_hint, dataset_config.image_size)
        # The input pipeline yields [0, 1] floats.
        arch = type(arch)(**{**asdict(arch), "pixel_range": 1.0, "ensemble_members": config.ensemble_members})
        recipe = recipe_for(arch)
        training_config = TrainingConfig(
            epochs=recipe.epochs if config.epochs is None else config.epochs,
            batch_size=config.batch_size,
            gpu_batch_size=config.gpu_batch_size,
            learning_rate=recipe.learning_rate if config.learning_rate is None else config.learning_rate,
            early_stopping_patience=(
                recipe.early_stopping_patience if config.early_stopping_patience is None else config.early_stopping_patience
            ),
            seed=config.seed,
            augment=False,  # the dataset's configured augmentation runs in the input pipeline
        )
        train_paths, train_labels = reader.inputs(TRAIN)

        def member_training_data(member: int):
            stream = training_stream(
                train_paths,
                train_labels,
                len(dataset.classes),
                image_size=dataset_config.image_size,
                batch_size=training_batch_size(training_config),
                augmentation=dataset_config.augmentation,
                balance_classes=dataset_config.balance_classes,
                # Member 0 draws the dataset's own sample order; the others their own, for diversity.
                seed=dataset_config.seed + member,
                crop_fraction=dataset_config.crop_fraction,
            )
            return stream.dataset, stream.steps_per_epoch

        with tempfile.TemporaryDirectory() as checkpoints:
            result = train_ensemble(
                arch,
                training_config,
                member_training_data,
                reader.evaluation(VALIDATION),
                dataset.classes,
                checkpoints,
                progress=lambda line: context.log.info(f"{task_name}: {line}"),
            )
        model_bytes = model_to_bytes(result.model)
        key = f"models/{task_name}/trained/{sha256_hex(model_bytes)}.keras"
        if not lake.exists(key):
            lake.put_bytes(key, model_bytes)
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
            TrainedModelHandle(
                task=task_name,
                dataset_version=dataset.dataset_version,
                model_key=key,
                architecture=asdict(arch),
                training_config=training_config.to_dict(),
                training_seconds=result.seconds,
                device=result.device,
                epochs_run=result.epochs_run,
                best_val_accuracy=result.best_val_accuracy,
            ),
            metadata={
                "dataset_version": dataset.dataset_version,
                "device": result.device,
                "epochs_run": result.epochs_run,
                "ensemble_members": arch.ensemble_members,
                "members": dg.MetadataValue.json(result.member_summaries()),
                "training_seconds": round(result.seconds, 1),
                "best_val_accuracy": result.best_val_accuracy,
                "parameters": int(result.model.count_params()),
                "architecture": dg.MetadataValue.json(asdict(arch)),
                "training_curves": dg.MetadataValue.md(curves),
                "artifact": dg.MetadataValue.path(lake.uri(key)),
            },
            data_version=dg.DataVersion(key.rsplit("/", 1)[-1].removesuffix(".keras")[:16]),
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
        from hema_pipeline.modeling.calibration import (
            energy_score,
            fit_ood_threshold,
            fit_referral_policy,
            fit_temperature,
            referral_threshold_candidates,
            softmax,
        )
        from hema_pipeline.modeling.networks import check_test_time_views

        lake = storage.lake()
        views = check_test_time_views(config.test_time_views)
        model, reader = _load_keras(lake, trained.model_key), _SplitReader(dataset, lake)
        outputs = _outputs(model, reader, CALIBRATION, views)
        temperature = fit_temperature(outputs.logits, outputs.labels)
        probabilities = softmax(outputs.logits, temperature.temperature)
        # The thresholds to test come from the validation split, so the calibration labels that certify
        # a threshold took no part in proposing it.
        validation = _outputs(model, reader, VALIDATION, views)
        candidates = referral_threshold_candidates(
            softmax(validation.logits, temperature.temperature).max(axis=1),
            len(outputs.labels),
            config.target_accuracy,
            config.referral_confidence,
        )
        policy = fit_referral_policy(
            probabilities, outputs.labels, dataset.classes, candidates, config.target_accuracy, config.referral_confidence
        )
        context.log.info(f"{task_name} referral policy: {policy.describe_guarantee()}")
        ood = fit_ood_threshold(
            energy_score(outputs.logits, temperature.temperature),
            "energy",
            keep_quantile=config.ood_keep_quantile,
            energy_temperature=temperature.temperature,
        )
        return dg.Output(
            CalibrationHandle(
                task=task_name,
                dataset_version=dataset.dataset_version,
                model_key=trained.model_key,
                temperature=temperature.temperature,
                referral_policy=policy.to_dict(),
                ood_threshold=ood.to_dict(),
                test_time_views=views,
            ),
            metadata={
                "temperature": temperature.temperature,
                "test_time_views": views,
                "calibration_cells": len(outputs.labels),
                "nll_before": temperature.nll_before,
                "nll_after": temperature.nll_after,
                "referral_guarantee": policy.describe_guarantee(),
                "referral_threshold": None if math.isinf(policy.global_threshold) else policy.global_threshold,
                "referral_policy": dg.MetadataValue.json(policy.to_dict()),
                "ood_threshold": dg.MetadataValue.json(ood.to_dict()),
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
        from hema_pipeline.modeling.calibration import (
            OodThreshold,
            ReferralPolicy,
            calibration_report,
            evaluate_referral,
            reliability_diagram_png,
            softmax,
        )
        from hema_pipeline.modeling.evaluation import confusion_matrix_png, evaluate_logits
        from hema_pipeline.modeling.networks import ArchitectureConfig
        from hema_pipeline.modeling.registry import draft_model_card, register_model
        from hema_pipeline.modeling.training import TrainingConfig

        lake = storage.lake()
        model_bytes = lake.get_bytes(trained.model_key)
        model = _load_keras(lake, trained.model_key)
        outputs = _outputs(model, _SplitReader(dataset, lake), TEST, calibrated.test_time_views)
        temperature = calibrated.temperature
        evaluation = evaluate_logits(outputs.logits, outputs.labels, dataset.classes, temperature)
        calibration = calibration_report(outputs.logits, outputs.labels, temperature)
        policy = ReferralPolicy.from_dict(calibrated.referral_policy)
        referral = evaluate_referral(policy, softmax(outputs.logits, temperature), outputs.labels)
        confusion_png = confusion_matrix_png(evaluation, title=f"{task_name} test")
        reliability_png = reliability_diagram_png(calibration)
        card = draft_model_card(
            task=task_name,
            dataset_version=dataset.dataset_version,
            arch=ArchitectureConfig(**trained.architecture),
            training_config=TrainingConfig.from_dict(trained.training_config),
            training_details={"epochs_run": trained.epochs_run, "best_val_accuracy": trained.best_val_accuracy},
            class_names=dataset.classes,
            training_seconds=trained.training_seconds,
            training_device=trained.device,
            test_evaluation=evaluation,
            test_calibration=calibration,
            referral=policy,
            test_referral=referral,
            ood=OodThreshold.from_dict(calibrated.ood_threshold),
            crop_fraction=dataset.config.crop_fraction,
            test_time_views=calibrated.test_time_views,
        )
        card = register_model(
            lake,
            warehouse.warehouse(),
            card,
            model_bytes,
            attachments={"confusion_matrix.png": confusion_png, "reliability_diagram.png": reliability_png},
        )
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
                "referral_guarantee": policy.describe_guarantee(),
                "per_class": dg.MetadataValue.md(_per_class_markdown(evaluation.per_class_records())),
                "confusion_matrix": _png_markdown(confusion_png, "confusion matrix"),
                "reliability_diagram": _png_markdown(reliability_png, "reliability diagram"),
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
        candidate,
        dataset: DatasetHandle,
        storage: StorageResource,
        warehouse: WarehouseResource,
    ) -> dg.Output[str]:
        from hema_pipeline.modeling.registry import PromotionPolicy, current_champion, decide_promotion

        policy = PromotionPolicy(**config.model_dump())
        store = warehouse.warehouse()
        champion_on_split = _champion_on_candidate_split(task_name, dataset, storage, store, candidate.dataset_version)
        if champion_on_split is not None:
            context.log.info(
                f"{task_name}: champion {champion_on_split.model_version} re-evaluated on {dataset.dataset_version}: "
                f"accuracy {champion_on_split.accuracy:.4f}, macro F1 {champion_on_split.macro_f1:.4f}"
            )
        decision = decide_promotion(
            store, task_name, candidate.model_version, policy, champion_on_challenger_split=champion_on_split
        )
        champion_version = current_champion(store, task_name)
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
