"""The model registry: content-addressed artefacts and model cards, registered and loaded.

Storage (any ``ObjectStore``, local or S3)::

    models/<task>/<sha256 of model.keras>/model.keras
    models/<task>/<sha256 of model.keras>/<model_version>/card.json
    models/<task>/<sha256 of model.keras>/<model_version>/<attachment>   (OOD statistics, figures)

The same ``.keras`` bytes always land on the same key, so re-registering writes nothing new. The card
sits one level below, under its model_version, because one trained network can be packaged more than
once (e.g. recalibrated on a new calibration split): each packaging is a model version of its own and
must not overwrite the other's card. ``model_version`` is ``<task>-<12 hex>`` of the hash of the card's
content (which includes the artefact's hash), excluding only its creation time: registering the same
package twice is idempotent.

The warehouse (``sql/models.sql``) indexes the models and their per-class test metrics. Which model
serves a task (the promotion gate, rollback, the champion) is ``modeling.promotion``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hema_pipeline.modeling.calibration import CalibrationReport, ReferralOutcome, ReferralPolicy
from hema_pipeline.modeling.contract import ModelContract
from hema_pipeline.modeling.evaluation import PER_CLASS_COLUMNS, EvaluationReport
from hema_pipeline.modeling.ood import OodThreshold
from hema_pipeline.storage.object_store import ObjectStore, put_if_absent
from hema_pipeline.storage.warehouse import Warehouse, replace_rows

if TYPE_CHECKING:
    import keras

    from hema_pipeline.modeling.networks import ArchitectureConfig
    from hema_pipeline.modeling.training import TrainingConfig

MODEL_FILE_NAME = "model.keras"
CARD_FILE_NAME = "card.json"
MAHALANOBIS_ATTACHMENT = "ood_mahalanobis.npz"
TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,62}$")
# Card fields that do not define the package: when it was made, and where it was put (derived).
_VOLATILE_CARD_FIELDS = ("model_version", "created_at", "card_key")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null (JSON has neither); NumPy scalars become Python numbers."""
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    return value


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def code_version() -> str:
    """The git commit of the checkout this package runs from (with ``-dirty`` when tracked files differ
    from it); the package version where there is no git checkout (an installed wheel, a container)."""
    from hema_pipeline import __version__

    package_dir = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=package_dir, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=package_dir,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"hema-pipeline {__version__}"
    return f"{commit}-dirty" if changes else commit


# --------------------------------------------------------------------------------------------------
# Model card


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to use, audit and compare one packaged model. JSON-serialisable."""

    task: str
    dataset_version: str
    code_version: str
    architecture: dict[str, Any]  # ArchitectureConfig.to_dict()
    training: dict[str, Any]  # TrainingConfig.to_dict() plus what was resolved at run time
    class_names: list[str]
    input_size: int
    pixel_range: float
    metrics: dict[str, float | int | None]  # test split: accuracy, macro_f1, ECE, referral coverage...
    per_class_metrics: list[dict[str, Any]]  # test split, one entry per class
    temperature: float
    referral: dict[str, Any]  # ReferralPolicy.to_dict()
    ood: dict[str, Any] | None  # OodThreshold.to_dict() (+ attachment name for Mahalanobis), or None
    training_seconds: float
    training_device: str
    created_at: str  # ISO 8601, UTC
    notes: list[str] = field(default_factory=list)
    artifact_sha256: str = ""
    artifact_key: str = ""
    attachments: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    features_layer: str = "features"  # penultimate feature vector (Mahalanobis OOD, embeddings)
    last_conv_layer: str = "last_conv"  # last spatial feature map (Grad-CAM)
    # Preprocessing and read-out the temperature and thresholds were fitted with; inference repeats them.
    # Every card written since these fields exist states them (draft_model_card requires them); the
    # defaults are what cards written before them were fitted with: the whole image, one view.
    crop_fraction: float = 1.0  # centred share of each image's shortest side the network sees
    test_time_views: int = 1  # dihedral views of each cell whose logits are averaged
    model_version: str = ""
    card_key: str = ""

    def to_json(self) -> str:
        return json.dumps(_json_safe(asdict(self)), indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        values = json.loads(text)
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model card fields {unknown}: written by a newer version?")
        return cls(**values)

    def content_digest(self) -> str:
        """sha256 of the canonical JSON of everything but the volatile fields."""
        content = {key: value for key, value in asdict(self).items() if key not in _VOLATILE_CARD_FIELDS}
        canonical = json.dumps(_json_safe(content), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return sha256_hex(canonical.encode())

    def referral_policy(self) -> ReferralPolicy:
        return ReferralPolicy.from_dict(self.referral)

    def ood_settings(self) -> OodThreshold | None:
        return None if self.ood is None else OodThreshold.from_dict(self.ood)

    def contract(self) -> ModelContract:
        """What inference takes: the classes, preprocessing, temperature and thresholds of this model."""
        policy, ood = self.referral_policy(), self.ood_settings()
        return ModelContract(
            task=self.task,
            model_version=self.model_version,
            class_names=tuple(self.class_names),
            input_size=self.input_size,
            pixel_range=self.pixel_range,
            crop_fraction=self.crop_fraction,
            test_time_views=self.test_time_views,
            temperature=self.temperature,
            class_thresholds=dict(zip(policy.class_names, policy.thresholds, strict=True)),
            ood_method=None if ood is None else ood.method,
            ood_threshold=None if ood is None else ood.threshold,
            energy_temperature=1.0 if ood is None else ood.energy_temperature,
            features_layer=self.features_layer,
            last_conv_layer=self.last_conv_layer,
        )


def draft_model_card(
    task: str,
    dataset_version: str,
    arch: ArchitectureConfig,
    training_config: TrainingConfig,
    class_names: Sequence[str],
    training_seconds: float,
    training_device: str,
    test_evaluation: EvaluationReport,
    test_calibration: CalibrationReport,
    referral: ReferralPolicy,
    test_referral: ReferralOutcome,
    ood: OodThreshold | None,
    crop_fraction: float,
    test_time_views: int,
    training_details: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> ModelCard:
    """Assemble a card from the stage results; ``register_model`` fills in the version and keys.

    ``test_*`` must all come from the test split (the temperature, referral thresholds and OOD threshold
    were fitted on the calibration split, with ``test_time_views`` views per image of ``crop_fraction``
    crops, as the test evaluation was computed). ``training_details`` adds what was resolved at run time
    (batch size actually used, epochs run, best epoch...)."""
    if not TASK_NAME.match(task):
        raise ValueError(f"task {task!r}: use lower-case letters, digits, '-' and '_'")
    if tuple(class_names) != test_evaluation.class_names or tuple(class_names) != referral.class_names:
        raise ValueError("class names differ between the evaluation, the referral policy and the card")
    per_class = test_evaluation.per_class.merge(
        test_referral.per_class.rename(
            columns={
                "predicted_class": "class_name",
                "threshold": "referral_threshold",
                "coverage": "referral_coverage",
                "accepted_accuracy": "referral_accepted_accuracy",
            }
        )[["class_name", "referral_threshold", "referral_coverage", "referral_accepted_accuracy"]],
        on="class_name",
        how="left",
    )
    per_class["referral_threshold_source"] = list(referral.sources)
    ood_values: dict[str, Any] | None = None
    if ood is not None:
        ood_values = ood.to_dict()
        if ood.method == "mahalanobis":
            ood_values["statistics_attachment"] = MAHALANOBIS_ATTACHMENT
    metrics = {
        **test_evaluation.headline(),
        **test_calibration.headline(),
        **test_referral.headline(),
        "referral_target": referral.target_accuracy,
        # The certificate from the calibration split (None where nothing was certified).
        "referral_confidence": referral.confidence,
        "referral_certified_accuracy": None if referral.guarantee is None else referral.guarantee.accuracy_lower_bound,
    }
    from hema_pipeline.modeling.networks import FEATURES_LAYER, LAST_CONV_LAYER

    return ModelCard(
        task=task,
        dataset_version=dataset_version,
        code_version=code_version(),
        architecture=arch.to_dict(),
        training={**training_config.to_dict(), **dict(training_details or {})},
        class_names=list(class_names),
        input_size=arch.input_size,
        pixel_range=arch.pixel_range,
        metrics=_json_safe(metrics),
        per_class_metrics=_json_safe(per_class.to_dict(orient="records")),
        temperature=float(test_calibration.temperature),
        referral=referral.to_dict(),
        ood=None if ood_values is None else _json_safe(ood_values),
        training_seconds=float(training_seconds),
        training_device=training_device,
        created_at=utc_now().isoformat(timespec="seconds") + "Z",
        notes=[*test_evaluation.notes, *notes],
        features_layer=FEATURES_LAYER,
        last_conv_layer=LAST_CONV_LAYER,
        crop_fraction=float(crop_fraction),
        test_time_views=int(test_time_views),
    )


# --------------------------------------------------------------------------------------------------
# Keras artefact <-> bytes


def model_to_bytes(model: keras.Model) -> bytes:
    """The ``.keras`` file of ``model`` for inference: architecture and weights, without the optimiser
    state a compiled model would also save (Adam's two moment estimates: three times the file for
    nothing inference uses; resuming training uses the training checkpoint instead).

    Two saves of the same weights differ (the file records when it was saved), so the content address
    is of these bytes, not of the weights."""
    import keras

    if getattr(model, "optimizer", None) is not None:  # never compiled (an ensemble): no attribute at all
        # Rebuilt from its layer config: clone_model and model_from_json would also restore the
        # compile config, and with it the optimiser.
        uncompiled = keras.Model.from_config(model.get_config())
        uncompiled.set_weights(model.get_weights())
        model = uncompiled
    with tempfile.TemporaryDirectory(prefix="hema-model-") as folder:
        path = Path(folder) / MODEL_FILE_NAME
        model.save(path)
        return path.read_bytes()


def model_from_bytes(data: bytes) -> keras.Model:
    import keras

    with tempfile.TemporaryDirectory(prefix="hema-model-") as folder:
        path = Path(folder) / MODEL_FILE_NAME
        path.write_bytes(data)
        # Inference-only: the optimiser state is not needed, and compile=False avoids rebuilding it.
        return keras.models.load_model(path, compile=False)


def artifact_key(task: str, artifact_sha256: str) -> str:
    return f"models/{task}/{artifact_sha256}/{MODEL_FILE_NAME}"


def package_prefix(task: str, artifact_sha256: str, model_version: str) -> str:
    return f"models/{task}/{artifact_sha256}/{model_version}"


# --------------------------------------------------------------------------------------------------
# Registration


def register_model(
    store: ObjectStore,
    warehouse: Warehouse,
    card: ModelCard,
    model_bytes: bytes,
    attachments: Mapping[str, bytes] | None = None,
) -> ModelCard:
    """Store the model, its card and attachments; index them in DuckDB as a ``candidate``.

    Returns the card with ``model_version``, ``artifact_sha256``, keys and attachment hashes filled in.
    Idempotent: the same model bytes, card content and attachments give the same model version, and a
    second registration changes nothing. Objects are written before the rows, so a crash leaves at most
    unreferenced objects, never a row pointing at nothing."""
    attachments = dict(attachments or {})
    if card.ood is not None and card.ood.get("method") == "mahalanobis" and MAHALANOBIS_ATTACHMENT not in attachments:
        raise ValueError(f"a Mahalanobis OOD threshold needs its statistics as attachment {MAHALANOBIS_ATTACHMENT!r}")
    for name in attachments:
        if "/" in name or name in (CARD_FILE_NAME, MODEL_FILE_NAME) or not name.strip("."):
            raise ValueError(f"invalid attachment name {name!r}")
    digest = sha256_hex(model_bytes)
    card = replace(
        card,
        artifact_sha256=digest,
        artifact_key=artifact_key(card.task, digest),
        attachments={name: sha256_hex(data) for name, data in sorted(attachments.items())},
    )
    model_version = f"{card.task}-{card.content_digest()[:12]}"
    prefix = package_prefix(card.task, digest, model_version)
    card = replace(card, model_version=model_version, card_key=f"{prefix}/{CARD_FILE_NAME}")

    existing = warehouse_rows(warehouse, "select card_key from models where model_version = ?", [model_version])
    if not existing.empty:
        return read_card(store, str(existing.iloc[0]["card_key"]))

    put_if_absent(store, card.artifact_key, model_bytes)
    for name, data in attachments.items():
        store.put_bytes(f"{prefix}/{name}", data)
    store.put_bytes(card.card_key, card.to_json().encode())

    with warehouse.transaction() as connection:
        replace_rows(connection, "models", _model_row(card), ["model_version"])
        replace_rows(connection, "model_evaluations", _evaluation_rows(card), ["model_version", "class_name"])
    return card


def _model_row(card: ModelCard) -> pd.DataFrame:
    metrics = card.metrics

    def required(name: str) -> float:
        value = metrics.get(name)
        if value is None:
            raise ValueError(f"model card metric {name!r} is missing")
        return float(value)

    def optional(name: str) -> float | None:
        value = metrics.get(name)
        return None if value is None else float(value)

    ood = card.ood or {}
    row = {
        "model_version": card.model_version,
        "task": card.task,
        "dataset_version": card.dataset_version,
        "code_version": card.code_version,
        "architecture": str(card.architecture.get("name", "")),
        "class_count": len(card.class_names),
        "input_size": card.input_size,
        "artifact_sha256": card.artifact_sha256,
        "artifact_key": card.artifact_key,
        "card_key": card.card_key,
        "test_cells": int(required("cells")),
        "accuracy": required("accuracy"),
        "macro_f1": required("macro_f1"),
        "macro_auc": optional("macro_auc"),
        "nll_before": required("nll_before"),
        "nll_after": required("nll_after"),
        "ece_before": required("ece_before"),
        "ece_after": required("ece_after"),
        "mce_before": required("mce_before"),
        "mce_after": required("mce_after"),
        "temperature": card.temperature,
        "referral_target": required("referral_target"),
        "referral_coverage": required("referral_coverage"),
        "referral_accepted_accuracy": optional("referral_accepted_accuracy"),
        "referral_confidence": optional("referral_confidence"),
        "referral_certified_accuracy": optional("referral_certified_accuracy"),
        "ood_method": ood.get("method"),
        "ood_threshold": ood.get("threshold"),
        "ood_keep_quantile": ood.get("keep_quantile"),
        "training_seconds": card.training_seconds,
        "training_device": card.training_device,
        "created_at": dt.datetime.fromisoformat(card.created_at.removesuffix("Z")),
        "status": "candidate",
    }
    frame = pd.DataFrame([row])
    # All-null optional columns would otherwise be inferred as object/NULL type by DuckDB's scan.
    for column in (
        "macro_auc",
        "referral_accepted_accuracy",
        "referral_confidence",
        "referral_certified_accuracy",
        "ood_threshold",
        "ood_keep_quantile",
    ):
        frame[column] = frame[column].astype("float64")
    frame["ood_method"] = frame["ood_method"].astype("string")
    return frame


_REFERRAL_COLUMNS = ("referral_threshold", "referral_threshold_source", "referral_coverage", "referral_accepted_accuracy")
_EVALUATION_COLUMNS = (*PER_CLASS_COLUMNS, *_REFERRAL_COLUMNS)
_WHOLE_NUMBER_OR_TEXT_COLUMNS = (
    "class_index",
    "class_name",
    "support",
    "predicted",
    "true_positives",
    "referral_threshold_source",
)


def _evaluation_rows(card: ModelCard) -> pd.DataFrame:
    frame = pd.DataFrame(card.per_class_metrics)
    missing = sorted(set(_EVALUATION_COLUMNS) - set(frame.columns))
    if missing:
        raise ValueError(f"per-class metrics lack {missing}")
    frame = frame[list(_EVALUATION_COLUMNS)].copy()
    for column in _EVALUATION_COLUMNS:
        if column not in _WHOLE_NUMBER_OR_TEXT_COLUMNS:
            frame[column] = pd.to_numeric(frame[column], errors="raise").astype("float64")
    frame.insert(0, "model_version", card.model_version)
    return frame


def warehouse_rows(warehouse: Warehouse, sql: str, parameters: Sequence[object] | None = None) -> pd.DataFrame:
    """A read query on a read-only connection (an absent warehouse is created with its schema first, so
    the registry tables always exist; an existing one is never written, its views never re-created)."""
    return warehouse.query(sql, list(parameters or []))


def read_card(store: ObjectStore, card_key: str) -> ModelCard:
    return ModelCard.from_json(store.get_bytes(card_key).decode())


def read_attachment(store: ObjectStore, card: ModelCard, name: str) -> bytes:
    """An attachment of ``card``, checked against the hash the card recorded."""
    if name not in card.attachments:
        raise KeyError(f"{card.model_version} has no attachment {name!r}; it has {sorted(card.attachments)}")
    data = store.get_bytes(f"{package_prefix(card.task, card.artifact_sha256, card.model_version)}/{name}")
    if sha256_hex(data) != card.attachments[name]:
        raise ValueError(f"attachment {name!r} of {card.model_version} does not match its recorded hash")
    return data


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedModel:
    model: keras.Model
    card: ModelCard


def load_model(store: ObjectStore, warehouse: Warehouse, task: str, model_version: str) -> LoadedModel:
    """A registered model version of ``task`` (``promotion.load_champion`` loads the champion). The
    artefact's bytes are checked against the hash in the card before Keras sees them."""
    rows = warehouse_rows(warehouse, "select card_key from models where model_version = ? and task = ?", [model_version, task])
    if rows.empty:
        raise LookupError(f"no model {model_version!r} registered for task {task!r}")
    return load_model_from_card(store, str(rows.iloc[0]["card_key"]))


def load_model_from_card(store: ObjectStore, card_key: str) -> LoadedModel:
    card = read_card(store, card_key)
    data = store.get_bytes(card.artifact_key)
    if sha256_hex(data) != card.artifact_sha256:
        raise ValueError(f"{card.artifact_key} does not match the hash recorded in {card_key}")
    return LoadedModel(model=model_from_bytes(data), card=card)
