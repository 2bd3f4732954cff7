"""The model registry: content-addressed artefacts, model cards, and a recorded promotion gate.

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

DuckDB (``sql/models.sql``) indexes the models, their per-class test metrics and every promotion
decision. A challenger replaces the champion only if it beats it on the *same* test split by the
policy's margins and passes its checks; ``rollback`` restores the previous champion. The current
champion is derived from the decision log, never from "the latest file in a folder".
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import subprocess
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import duckdb
import numpy as np
import pandas as pd

from hema_pipeline.modeling.calibration import (
    CalibrationReport,
    OodThreshold,
    ReferralOutcome,
    ReferralPolicy,
)
from hema_pipeline.modeling.contract import ModelContract
from hema_pipeline.modeling.evaluation import PER_CLASS_COLUMNS, EvaluationReport
from hema_pipeline.storage.object_store import ObjectStore
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


def _utc_now() -> dt.datetime:
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
        created_at=_utc_now().isoformat(timespec="seconds") + "Z",
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

    if not store.exists(card.artifact_key):
        store.put_bytes(card.artifact_key, model_bytes)
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


def load_model(
    store: ObjectStore,
    warehouse: Warehouse,
    task: str,
    model_version: str | None = None,
) -> LoadedModel:
    """The given model version of ``task``, or its current champion when ``model_version`` is None.
    The artefact's bytes are checked against the hash in the card before Keras sees them."""
    if model_version is None:
        model_version = current_champion(warehouse, task)
        if model_version is None:
            raise LookupError(f"task {task!r} has no champion model")
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


# --------------------------------------------------------------------------------------------------
# Promotion gate


@dataclass(frozen=True)
class PromotionPolicy:
    """A challenger must beat the champion by both margins (on the same test split) and pass every
    check: the absolute floors below and any external checks (e.g. data-quality gates) given."""

    min_accuracy_gain: float = 0.002  # 0.2 percentage points: below that, PBC-sized test sets cannot tell
    min_macro_f1_gain: float = 0.0  # not worse on the class-balanced view (rare classes matter clinically)
    min_accuracy: float = 0.0
    min_macro_f1: float = 0.0
    max_ece_after: float = 1.0
    min_referral_coverage: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class SplitMetrics:
    """Test metrics of one model on one test split (identified by its dataset version)."""

    model_version: str
    dataset_version: str
    cells: int
    accuracy: float
    macro_f1: float

    @classmethod
    def from_report(cls, model_version: str, dataset_version: str, report: EvaluationReport) -> SplitMetrics:
        """For re-evaluating a champion on the challenger's test split (``dataset_version`` = the
        challenger's): load it with ``load_model``, predict that split, ``evaluate_logits``, then this."""
        return cls(model_version, dataset_version, report.cells, report.accuracy, report.macro_f1)


@dataclass(frozen=True)
class PromotionDecision:
    task: str
    model_version: str
    previous_champion: str | None
    action: Literal["promoted", "refused", "rolled_back"]
    reason: str
    decided_at: dt.datetime

    @property
    def promoted(self) -> bool:
        return self.action == "promoted"


def compare_on_same_split(challenger: SplitMetrics, champion: SplitMetrics, policy: PromotionPolicy) -> tuple[bool, str]:
    """Whether ``challenger`` beats ``champion`` by the policy's margins, and why (or why not). Both must
    have been measured on the same test split; anything else is a comparison of two different exams."""
    if challenger.dataset_version != champion.dataset_version or challenger.cells != champion.cells:
        raise ValueError(
            f"metrics from different test splits: challenger on {challenger.dataset_version} "
            f"({challenger.cells} cells), champion on {champion.dataset_version} ({champion.cells} cells)"
        )
    accuracy_gain = challenger.accuracy - champion.accuracy
    f1_gain = challenger.macro_f1 - champion.macro_f1
    summary = (
        f"accuracy {challenger.accuracy:.4f} vs {champion.accuracy:.4f} ({accuracy_gain:+.4f}, needs "
        f"{policy.min_accuracy_gain:+.4f}); macro F1 {challenger.macro_f1:.4f} vs {champion.macro_f1:.4f} "
        f"({f1_gain:+.4f}, needs {policy.min_macro_f1_gain:+.4f}) on {challenger.dataset_version}"
    )
    # A tiny tolerance so that a gain equal to the margin is not lost to floating-point rounding.
    beats = accuracy_gain >= policy.min_accuracy_gain - 1e-12 and f1_gain >= policy.min_macro_f1_gain - 1e-12
    return beats, summary


def failed_checks(row: Mapping[str, Any], policy: PromotionPolicy, checks: Mapping[str, bool]) -> list[str]:
    """The policy floors and external checks ``row`` (a ``models`` row) fails."""
    failures = [f"check {name} failed" for name, passed in sorted(checks.items()) if not passed]
    if row["accuracy"] < policy.min_accuracy:
        failures.append(f"accuracy {row['accuracy']:.4f} < {policy.min_accuracy:.4f}")
    if row["macro_f1"] < policy.min_macro_f1:
        failures.append(f"macro F1 {row['macro_f1']:.4f} < {policy.min_macro_f1:.4f}")
    if row["ece_after"] > policy.max_ece_after:
        failures.append(f"ECE after calibration {row['ece_after']:.4f} > {policy.max_ece_after:.4f}")
    if row["referral_coverage"] < policy.min_referral_coverage:
        failures.append(f"referral coverage {row['referral_coverage']:.4f} < {policy.min_referral_coverage:.4f}")
    return failures


def decide_promotion(
    warehouse: Warehouse,
    task: str,
    challenger_version: str,
    policy: PromotionPolicy | None = None,
    checks: Mapping[str, bool] | None = None,
    champion_on_challenger_split: SplitMetrics | None = None,
) -> PromotionDecision:
    """Promote ``challenger_version`` to champion of ``task`` or refuse it; record the decision.

    If the champion was tested on a different dataset version than the challenger, its stored metrics
    are not comparable: pass ``champion_on_challenger_split`` (the champion re-evaluated on the
    challenger's test split, see ``SplitMetrics.from_report``), or this raises ``ValueError``."""
    policy = policy or PromotionPolicy()
    # One decision per task at a time: the gate, an operator's promote and a rollback all read the
    # promotion log's last sequence number and append the next.
    with warehouse.transaction(serialise_on=f"promotion:{task}") as connection:
        decision = _decide(connection, task, challenger_version, policy, dict(checks or {}), champion_on_challenger_split)
        _record(connection, decision)
    return decision


def _decide(
    connection: duckdb.DuckDBPyConnection,
    task: str,
    challenger_version: str,
    policy: PromotionPolicy,
    checks: dict[str, bool],
    champion_on_challenger_split: SplitMetrics | None,
) -> PromotionDecision:
    now = _utc_now()
    challenger = _model_record(connection, challenger_version)
    if challenger is None or challenger["task"] != task:
        raise LookupError(f"no model {challenger_version!r} registered for task {task!r}")
    stack = _champion_stack(connection, task)
    champion_version = stack[-1] if stack else None

    def decision(action: Literal["promoted", "refused"], reason: str) -> PromotionDecision:
        return PromotionDecision(task, challenger_version, champion_version, action, reason, now)

    if champion_version == challenger_version:
        return decision("refused", "already the champion")
    failures = failed_checks(challenger, policy, checks)
    if failures:
        return decision("refused", "checks failed: " + "; ".join(failures))
    if champion_version is None:
        return decision("promoted", "first model of the task to pass its checks")

    champion = _model_record(connection, champion_version)
    if champion is None:
        raise LookupError(f"champion {champion_version!r} of {task!r} is missing from the models table")
    if _class_names(connection, challenger_version) != _class_names(connection, champion_version):
        return decision("refused", "class names differ from the champion's: the models answer different questions")
    challenger_metrics = SplitMetrics(
        challenger_version,
        challenger["dataset_version"],
        int(challenger["test_cells"]),
        float(challenger["accuracy"]),
        float(challenger["macro_f1"]),
    )
    if champion["dataset_version"] == challenger["dataset_version"]:
        champion_metrics = SplitMetrics(
            champion_version,
            champion["dataset_version"],
            int(champion["test_cells"]),
            float(champion["accuracy"]),
            float(champion["macro_f1"]),
        )
    elif champion_on_challenger_split is None:
        raise ValueError(
            f"champion {champion_version} was tested on {champion['dataset_version']}, the challenger on "
            f"{challenger['dataset_version']}: re-evaluate the champion on the challenger's test split and "
            "pass it as champion_on_challenger_split"
        )
    else:
        champion_metrics = champion_on_challenger_split
        if champion_metrics.model_version != champion_version:
            raise ValueError(f"champion_on_challenger_split is for {champion_metrics.model_version}, not {champion_version}")
    beats, summary = compare_on_same_split(challenger_metrics, champion_metrics, policy)
    if beats:
        return decision("promoted", f"beats the champion: {summary}")
    return decision("refused", f"does not beat the champion: {summary}")


def rollback(warehouse: Warehouse, task: str, reason: str = "rolled back by operator") -> PromotionDecision:
    """Make the champion before the current one champion again; record it. Raises ``LookupError`` when
    there is no earlier champion to return to."""
    # One decision per task at a time: the gate, an operator's promote and a rollback all read the
    # promotion log's last sequence number and append the next.
    with warehouse.transaction(serialise_on=f"promotion:{task}") as connection:
        stack = _champion_stack(connection, task)
        if len(stack) < 2:
            raise LookupError(f"task {task!r} has no earlier champion to roll back to")
        decision = PromotionDecision(task, stack[-2], stack[-1], "rolled_back", reason, _utc_now())
        _record(connection, decision)
    return decision


def promote_by_operator(warehouse: Warehouse, task: str, model_version: str, reason: str) -> PromotionDecision:
    """Make a registered model the task's champion on an operator's word, bypassing the gate's margins
    (after a clinical review of a candidate the gate refused, say); recorded in the promotion log like the
    gate's own decisions, with the reason. Refused (raises) for a model not registered for the task, the
    reigning champion, or one whose classes differ from the champion's: those answer another question."""
    reason = reason.strip()
    if not reason:
        raise ValueError("give a reason: it is recorded in the promotion log")
    # One decision per task at a time: the gate, an operator's promote and a rollback all read the
    # promotion log's last sequence number and append the next.
    with warehouse.transaction(serialise_on=f"promotion:{task}") as connection:
        record = _model_record(connection, model_version)
        if record is None or record["task"] != task:
            raise LookupError(f"no model {model_version!r} registered for task {task!r}")
        stack = _champion_stack(connection, task)
        champion = stack[-1] if stack else None
        if champion == model_version:
            raise ValueError(f"{model_version} is already the champion of {task!r}")
        if champion is not None and _class_names(connection, model_version) != _class_names(connection, champion):
            raise ValueError(f"{model_version}'s classes differ from champion {champion}'s")
        decision = PromotionDecision(task, model_version, champion, "promoted", f"by operator: {reason}", _utc_now())
        _record(connection, decision)
    return decision


def current_champion(warehouse: Warehouse, task: str) -> str | None:
    return current_champions(warehouse, [task])[task]


def current_champions(warehouse: Warehouse, tasks: Sequence[str]) -> dict[str, str | None]:
    """Each task's champion as the ``model_champions`` view names it (the promotion log's latest
    champion-changing event), over one read-only connection; None for a task without one."""
    if not tasks or not warehouse.exists():
        return dict.fromkeys(tasks)
    placeholders = ", ".join("?" for _ in tasks)
    rows = warehouse.query(f"select task, model_version from model_champions where task in ({placeholders})", list(tasks))
    champions: dict[str, str | None] = dict.fromkeys(tasks)
    champions.update(zip(rows["task"], rows["model_version"], strict=True))
    return champions


def promotion_history(warehouse: Warehouse, task: str) -> pd.DataFrame:
    return warehouse_rows(warehouse, "select * from model_promotions where task = ? order by sequence", [task])


def _champion_stack(connection: duckdb.DuckDBPyConnection, task: str) -> list[str]:
    """Replay the decision log: a promotion pushes a champion, a rollback pops one. The top is the
    champion ``model_champions`` names; the one below is where a rollback goes (only writers replay)."""
    events = connection.execute(
        "select model_version, previous_champion, action from model_promotions where task = ? order by sequence",
        [task],
    ).fetchall()
    stack: list[str] = []
    for model_version, previous_champion, action in events:
        if action == "promoted":
            stack.append(model_version)
        elif action == "rolled_back":
            if len(stack) < 2 or stack[-1] != previous_champion or stack[-2] != model_version:
                raise RuntimeError(f"the promotion log of {task!r} is inconsistent at a rollback to {model_version}")
            stack.pop()
    return stack


def _record(connection: duckdb.DuckDBPyConnection, decision: PromotionDecision) -> None:
    (sequence,) = connection.execute(
        "select coalesce(max(sequence), 0) + 1 from model_promotions where task = ?", [decision.task]
    ).fetchall()[0]
    connection.execute(
        "insert into model_promotions (event_id, task, sequence, model_version, previous_champion, action, reason, "
        "decided_at) values (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            str(uuid.uuid4()),
            decision.task,
            sequence,
            decision.model_version,
            decision.previous_champion,
            decision.action,
            decision.reason,
            decision.decided_at,
        ],
    )
    if decision.action == "promoted":
        if decision.previous_champion is not None:
            _set_status(connection, decision.previous_champion, "retired")
        _set_status(connection, decision.model_version, "champion")
    elif decision.action == "rolled_back":
        if decision.previous_champion is not None:
            _set_status(connection, decision.previous_champion, "rolled_back")
        _set_status(connection, decision.model_version, "champion")
    else:
        # A refusal never demotes: asking to promote the reigning champion again is refused, and it
        # stays champion.
        connection.execute(
            "update models set status = 'refused' where model_version = ? and status <> 'champion'",
            [decision.model_version],
        )


def _set_status(connection: duckdb.DuckDBPyConnection, model_version: str, status: str) -> None:
    connection.execute("update models set status = ? where model_version = ?", [status, model_version])


def _model_record(connection: duckdb.DuckDBPyConnection, model_version: str) -> dict[str, Any] | None:
    frame = connection.execute("select * from models where model_version = ?", [model_version]).df()
    return None if frame.empty else {str(column): value for column, value in frame.iloc[0].items()}


def _class_names(connection: duckdb.DuckDBPyConnection, model_version: str) -> list[str]:
    rows = connection.execute(
        "select class_name from model_evaluations where model_version = ? order by class_index", [model_version]
    ).fetchall()
    return [name for (name,) in rows]
