"""The model stage as plain functions: train for a dataset, calibrate, evaluate and register, and sit the
current champion on a candidate's test split before the promotion gate.

Each function takes a dataset handle, the lake (and the warehouse where it writes), and a settings value,
and returns a typed result. The Dagster assets in ``defs/models.py`` call these and describe the result in
metadata; the benchmarks call the same functions, so a figure in RESULTS.md is what the asset computes.

TensorFlow is imported inside the functions that need it: this module's settings types define the
launchpad's defaults, and the Dagster definitions load without TensorFlow until a model step runs.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from hema_pipeline import settings
from hema_pipeline.datasets.input_pipeline import evaluation_dataset, resolve_local_image_paths, split_inputs
from hema_pipeline.datasets.splits import CALIBRATION, TEST, TRAIN, VALIDATION
from hema_pipeline.datasets.tasks import TASKS
from hema_pipeline.datasets.versioning import DatasetHandle
from hema_pipeline.modeling.calibration import (
    DEFAULT_REFERRAL_CONFIDENCE,
    DEFAULT_REFERRAL_TARGET,
    CalibrationReport,
    ReferralOutcome,
    ReferralPolicy,
    TemperatureFit,
    calibration_report,
    evaluate_referral,
    fit_referral_policy,
    fit_temperature,
    referral_threshold_candidates,
    reliability_diagram_png,
    softmax,
)
from hema_pipeline.modeling.contract import check_test_time_views
from hema_pipeline.modeling.evaluation import EvaluationReport, confusion_matrix_png, evaluate_logits
from hema_pipeline.modeling.ood import OodThreshold, energy_score, fit_ood_threshold
from hema_pipeline.modeling.promotion import PromotionDecision, PromotionPolicy, SplitMetrics, current_champion, decide_promotion
from hema_pipeline.modeling.registry import (
    ModelCard,
    draft_model_card,
    load_model,
    model_from_bytes,
    model_to_bytes,
    register_model,
    sha256_hex,
    warehouse_rows,
)
from hema_pipeline.storage.object_store import ObjectStore, put_if_absent
from hema_pipeline.storage.warehouse import Warehouse

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from hema_pipeline.modeling.networks import ArchitectureConfig, ModelOutputs
    from hema_pipeline.modeling.training import EnsembleTrainingResult, TrainingConfig


@dataclass(frozen=True)
class TrainedModelHandle:
    """What training hands on: where the weights are and how they were made (small; stored as JSON)."""

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
    """What calibration hands on: the temperature, referral policy and OOD threshold of one trained model."""

    task: str
    dataset_version: str
    model_key: str
    temperature: float
    referral_policy: dict
    ood_threshold: dict
    test_time_views: int = 1  # the logits everything above was fitted on are means over this many views


@dataclass(frozen=True)
class TrainingSettings:
    """How to train a task's model; ``defs.models.TrainingRunConfig`` is its launchpad face."""

    architecture: str = ""  # compact | standard | large | efficientnet_lite0 | efficientnet_lite2; empty: the task's hint
    # Unset: the architecture's measured recipe (`training.recipe_for`): from scratch 70 epochs at 2e-3 with
    # patience 25; from ImageNet weights 9 epochs at 5e-4 with patience 9.
    epochs: int | None = None
    batch_size: int = 64
    gpu_batch_size: int = 256
    learning_rate: float | None = None
    early_stopping_patience: int | None = None
    # Pretrained networks: the stem and this many leading blocks keep their ImageNet weights. Unset: the
    # recipe's (0 in both recipes: every layer trains).
    frozen_blocks: int | None = None
    seed: int = 20260101
    # >1: a deep ensemble of that many networks, each trained as above with its own weight seed and sample
    # order, stored as one model averaging their logits. Training and prediction cost grow in proportion.
    ensemble_members: int = 1

    def resolve(self, task: str, image_size: int) -> tuple[ArchitectureConfig, TrainingConfig]:
        """The network and the full training configuration (both recorded in the model card)."""
        from hema_pipeline.modeling.networks import architecture_preset, check_frozen_blocks
        from hema_pipeline.modeling.training import TrainingConfig, recipe_for

        preset = architecture_preset(self.architecture or TASKS[task].architecture_hint, image_size)
        # The input pipeline yields [0, 1] floats.
        arch = dataclasses.replace(preset, pixel_range=1.0, ensemble_members=self.ensemble_members)
        recipe = recipe_for(arch)
        config = TrainingConfig(
            epochs=recipe.epochs if self.epochs is None else self.epochs,
            batch_size=self.batch_size,
            gpu_batch_size=self.gpu_batch_size,
            learning_rate=recipe.learning_rate if self.learning_rate is None else self.learning_rate,
            early_stopping_patience=(
                recipe.early_stopping_patience if self.early_stopping_patience is None else self.early_stopping_patience
            ),
            frozen_blocks=recipe.frozen_blocks if self.frozen_blocks is None else self.frozen_blocks,
            seed=self.seed,
            augment=False,  # the dataset's configured augmentation runs in the input pipeline
        )
        check_frozen_blocks(arch, config.frozen_blocks)  # before any data is read, not at the first training step
        return arch, config


@dataclass(frozen=True)
class CalibrationSettings:
    """How to calibrate a trained model; ``defs.models.CalibrationConfig`` is its launchpad face."""

    # Accepted cells reach this accuracy with `referral_confidence` confidence, certified on the calibration
    # split (an exact binomial test per candidate threshold, in a fixed order). 99.5% at 95% needs at least
    # 598 accepted calibration cells: a smaller split refers every cell rather than claim what it cannot show.
    target_accuracy: float = DEFAULT_REFERRAL_TARGET
    referral_confidence: float = DEFAULT_REFERRAL_CONFIDENCE
    ood_keep_quantile: float = 0.95  # share of known calibration cells the unfamiliarity threshold keeps
    # Logits are averaged over this many dihedral views of each cell (1, 2, 4 or 8) for calibration, test
    # evaluation and every later prediction: a cell has no orientation, and neither should its answer.
    test_time_views: int = 8


class SplitReader:
    """Local image files for a dataset's splits (an S3 lake is mirrored into the local cache first)."""

    def __init__(self, dataset: DatasetHandle, lake: ObjectStore) -> None:
        self.dataset = dataset
        self.manifest = dataset.manifest(lake)
        keys = sorted(set(self.manifest["image_key"]))
        cache = settings.hema_home() / "cache" / "images"
        self.paths_by_key = dict(zip(keys, resolve_local_image_paths(lake, keys, cache), strict=True))

    def inputs(self, split: str) -> tuple[list[str], list[int]]:
        return split_inputs(self.manifest, split, self.paths_by_key)

    def evaluation(self, split: str) -> tf.data.Dataset:
        """The split's images with labels, preprocessed as the dataset says."""
        paths, labels = self.inputs(split)
        config = self.dataset.config
        return evaluation_dataset(paths, labels, image_size=config.image_size, crop_fraction=config.crop_fraction)

    def outputs(self, model: keras.Model, split: str, test_time_views: int) -> ModelOutputs:
        """The model's logits and features on the split, averaged over ``test_time_views`` views."""
        from hema_pipeline.modeling.networks import predict_outputs

        outputs = predict_outputs(model, self.evaluation(split), test_time_views=test_time_views)
        if outputs.labels is None:
            raise RuntimeError(f"the {split} split of {self.dataset.dataset_version} reached the model without its labels")
        return outputs


def load_trained(lake: ObjectStore, trained: TrainedModelHandle) -> keras.Model:
    return model_from_bytes(lake.get_bytes(trained.model_key))


def store_trained(lake: ObjectStore, task: str, model: keras.Model) -> str:
    """Put a trained network in the lake under the SHA-256 of its saved bytes and return that key: a key never
    names two different files, and bytes already stored are not written again. (Keras stamps the save time into
    the file, so training the same weights again gives new bytes and a new key.)"""
    model_bytes = model_to_bytes(model)
    key = f"models/{task}/trained/{sha256_hex(model_bytes)}.keras"
    put_if_absent(lake, key, model_bytes)
    return key


@dataclass(frozen=True)
class TrainedModel:
    handle: TrainedModelHandle
    architecture: ArchitectureConfig
    result: EnsembleTrainingResult  # the stored network and each ensemble member, with their histories

    @property
    def parameters(self) -> int:
        return int(self.result.model.count_params())


def train_for_dataset(
    dataset: DatasetHandle,
    lake: ObjectStore,
    training: TrainingSettings,
    progress: Callable[[str], None] | None = None,
) -> TrainedModel:
    """Train on the dataset's training split (class-balanced and augmented as the dataset says), early-stopped
    on its validation split, and store the weights content-addressed in the lake."""
    from hema_pipeline.datasets.input_pipeline import training_stream
    from hema_pipeline.modeling.training import train_ensemble, training_batch_size

    reader = SplitReader(dataset, lake)
    dataset_config = dataset.config
    arch, training_config = training.resolve(dataset.task, dataset_config.image_size)
    train_paths, train_labels = reader.inputs(TRAIN)

    def member_training_data(member: int) -> tuple[tf.data.Dataset, int | None]:
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
            progress=progress,
        )
    key = store_trained(lake, dataset.task, result.model)
    handle = TrainedModelHandle(
        task=dataset.task,
        dataset_version=dataset.dataset_version,
        model_key=key,
        architecture=asdict(arch),
        training_config=training_config.to_dict(),
        training_seconds=result.seconds,
        device=result.device,
        epochs_run=result.epochs_run,
        best_val_accuracy=result.best_val_accuracy,
    )
    return TrainedModel(handle=handle, architecture=arch, result=result)


@dataclass(frozen=True)
class Calibration:
    handle: CalibrationHandle
    temperature: TemperatureFit
    policy: ReferralPolicy
    ood: OodThreshold
    calibration_cells: int


def calibrate(
    dataset: DatasetHandle, lake: ObjectStore, trained: TrainedModelHandle, calibration: CalibrationSettings
) -> Calibration:
    """Fit the temperature (NLL), the certified referral policy and the energy OOD threshold on the calibration
    split. Candidate thresholds come from the validation split, so the calibration labels that certify a
    threshold took no part in proposing it."""
    views = check_test_time_views(calibration.test_time_views)
    model, reader = load_trained(lake, trained), SplitReader(dataset, lake)
    outputs = reader.outputs(model, CALIBRATION, views)
    labels = outputs.labels
    assert labels is not None  # SplitReader.outputs refuses a split without labels
    temperature = fit_temperature(outputs.logits, labels)
    validation = reader.outputs(model, VALIDATION, views)
    candidates = referral_threshold_candidates(
        softmax(validation.logits, temperature.temperature).max(axis=1),
        len(labels),
        calibration.target_accuracy,
        calibration.referral_confidence,
    )
    policy = fit_referral_policy(
        softmax(outputs.logits, temperature.temperature),
        labels,
        dataset.classes,
        candidates,
        calibration.target_accuracy,
        calibration.referral_confidence,
    )
    ood = fit_ood_threshold(
        energy_score(outputs.logits, temperature.temperature),
        "energy",
        keep_quantile=calibration.ood_keep_quantile,
        energy_temperature=temperature.temperature,
    )
    handle = CalibrationHandle(
        task=dataset.task,
        dataset_version=dataset.dataset_version,
        model_key=trained.model_key,
        temperature=temperature.temperature,
        referral_policy=policy.to_dict(),
        ood_threshold=ood.to_dict(),
        test_time_views=views,
    )
    return Calibration(handle=handle, temperature=temperature, policy=policy, ood=ood, calibration_cells=len(labels))


@dataclass(frozen=True)
class Registration:
    card: ModelCard  # as registered: with its model version and where it is stored
    evaluation: EvaluationReport  # on the test split, with the fitted temperature
    calibration: CalibrationReport  # ECE/MCE before and after temperature scaling, on the test split
    policy: ReferralPolicy
    referral: ReferralOutcome  # the policy's coverage and accepted-cell accuracy on the test split
    confusion_png: bytes
    reliability_png: bytes


def evaluate_and_register(
    dataset: DatasetHandle,
    lake: ObjectStore,
    warehouse: Warehouse,
    trained: TrainedModelHandle,
    calibrated: CalibrationHandle,
) -> Registration:
    """Evaluate the calibrated model on the test split and register it, with its card and figures, as a
    candidate."""
    from hema_pipeline.modeling.networks import ArchitectureConfig
    from hema_pipeline.modeling.training import TrainingConfig

    model_bytes = lake.get_bytes(trained.model_key)
    outputs = SplitReader(dataset, lake).outputs(model_from_bytes(model_bytes), TEST, calibrated.test_time_views)
    labels = outputs.labels
    assert labels is not None  # SplitReader.outputs refuses a split without labels
    temperature = calibrated.temperature
    evaluation = evaluate_logits(outputs.logits, labels, dataset.classes, temperature)
    calibration = calibration_report(outputs.logits, labels, temperature)
    policy = ReferralPolicy.from_dict(calibrated.referral_policy)
    referral = evaluate_referral(policy, softmax(outputs.logits, temperature), labels)
    confusion_png = confusion_matrix_png(evaluation, title=f"{dataset.task} test")
    reliability_png = reliability_diagram_png(calibration)
    card = draft_model_card(
        task=dataset.task,
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
        warehouse,
        card,
        model_bytes,
        attachments={"confusion_matrix.png": confusion_png, "reliability_diagram.png": reliability_png},
    )
    return Registration(card, evaluation, calibration, policy, referral, confusion_png, reliability_png)


def champion_on_candidate_split(
    dataset: DatasetHandle, lake: ObjectStore, warehouse: Warehouse, candidate_dataset_version: str
) -> SplitMetrics | None:
    """The current champion's test metrics on ``dataset``'s test split, preprocessed as the champion's card
    says; None where the stored metrics already compare (the champion was tested on the candidate's dataset
    version), there is no champion, or the classes differ (the gate refuses that on its own)."""
    from hema_pipeline.modeling.networks import predict_outputs

    champion_version = current_champion(warehouse, dataset.task)
    if champion_version is None:
        return None
    rows = warehouse_rows(warehouse, "select dataset_version from models where model_version = ?", [champion_version])
    if rows.empty or rows.iloc[0]["dataset_version"] == candidate_dataset_version:
        return None
    loaded = load_model(lake, warehouse, dataset.task, champion_version)
    card = loaded.card
    if list(card.class_names) != list(dataset.classes):
        return None
    paths, labels = SplitReader(dataset, lake).inputs(TEST)
    images = evaluation_dataset(paths, labels, image_size=card.input_size, cache=False, crop_fraction=card.crop_fraction)
    outputs = predict_outputs(loaded.model, images, test_time_views=card.test_time_views)
    if outputs.labels is None:
        raise RuntimeError(f"the test split of {dataset.dataset_version} reached the champion without its labels")
    report = evaluate_logits(outputs.logits, outputs.labels, dataset.classes, card.temperature)
    return SplitMetrics.from_report(champion_version, dataset.dataset_version, report)


@dataclass(frozen=True)
class GateOutcome:
    decision: PromotionDecision
    champion: str | None  # the task's champion after the decision
    champion_on_candidate_split: SplitMetrics | None  # the old champion re-examined, where that was needed


def gate_candidate(
    dataset: DatasetHandle, lake: ObjectStore, warehouse: Warehouse, candidate: ModelCard, policy: PromotionPolicy
) -> GateOutcome:
    """The promotion gate: the champion sits the candidate's exam where their dataset versions differ, then
    ``promotion.decide_promotion`` decides and records the decision in the promotion log."""
    champion_on_split = champion_on_candidate_split(dataset, lake, warehouse, candidate.dataset_version)
    decision = decide_promotion(
        warehouse, dataset.task, candidate.model_version, policy, champion_on_challenger_split=champion_on_split
    )
    return GateOutcome(decision, current_champion(warehouse, dataset.task), champion_on_split)
