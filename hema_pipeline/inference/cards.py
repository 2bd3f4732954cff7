"""What inference needs to know about a trained model, as a structural type.

The model registry (``hema_pipeline.modeling``) owns the real model card; inference depends only on the
attributes below, so any object that has them (the registry's card, ``PlainModelCard``) can be used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class ModelCard(Protocol):
    """The model's output contract and the decision thresholds fitted for it at calibration time."""

    @property
    def task(self) -> str: ...

    @property
    def model_version(self) -> str: ...

    @property
    def class_names(self) -> Sequence[str]: ...  # in the order of the model's logits

    @property
    def input_size(self) -> int: ...  # square input, in pixels

    @property
    def temperature(self) -> float: ...  # calibrated probabilities are softmax(logits / temperature)

    # Minimum calibrated confidence to accept a cell predicted as the class; +inf or None refers every
    # such cell (modeling.calibration.REFER_ALL, which JSON writes as null).
    @property
    def class_thresholds(self) -> Mapping[str, float | None]: ...

    @property
    def ood_threshold(self) -> float | None: ...  # OOD score above this: the cell is unfamiliar

    @property
    def last_conv_layer(self) -> str: ...  # for Grad-CAM


@dataclass(frozen=True)
class PlainModelCard:
    """A ``ModelCard`` for callers that hold the values themselves (a card read from JSON, tests)."""

    task: str
    model_version: str
    class_names: tuple[str, ...]
    input_size: int
    temperature: float
    class_thresholds: Mapping[str, float | None] = field(default_factory=dict)
    ood_threshold: float | None = None
    last_conv_layer: str = "last_conv"
    energy_temperature: float = 1.0
    ood_method: str | None = None  # None or "energy": ood_threshold is on the energy score
    features_layer: str = "features"
    crop_fraction: float = 1.0
    test_time_views: int = 1


class InvalidModelCard(ValueError):
    pass


def validate_card(card: ModelCard) -> None:
    """Refuse a card whose thresholds cannot be applied as written.

    Every class must have an explicit minimum confidence (0.0 accepts any, +inf or None refers all): a
    class silently left out would otherwise be accepted at any confidence, the unsafe direction for a lab.
    """
    where = f"model card {card.task}/{card.model_version}"
    names = list(card.class_names)
    if len(names) < 2:
        raise InvalidModelCard(f"{where}: needs at least two class names, got {names}")
    if len(set(names)) != len(names):
        raise InvalidModelCard(f"{where}: class names repeat: {names}")
    if card.input_size < 1:
        raise InvalidModelCard(f"{where}: input_size must be positive, got {card.input_size}")
    if not (math.isfinite(card.temperature) and card.temperature > 0):
        raise InvalidModelCard(f"{where}: temperature must be a positive number, got {card.temperature}")
    unknown = sorted(set(card.class_thresholds) - set(names))
    if unknown:
        raise InvalidModelCard(f"{where}: thresholds for classes the model does not have: {unknown}")
    missing = [name for name in names if name not in card.class_thresholds]
    if missing:
        raise InvalidModelCard(f"{where}: no confidence threshold for {missing} (use 0.0 to accept any confidence)")
    for name, threshold in card.class_thresholds.items():
        if threshold is not None and not (0.0 <= threshold <= 1.0 or threshold == math.inf):
            raise InvalidModelCard(f"{where}: threshold for {name!r} must be in [0, 1] or refer-all, got {threshold}")
    if card.ood_threshold is not None and not math.isfinite(card.ood_threshold):
        raise InvalidModelCard(f"{where}: ood_threshold must be a finite number or None")
    if not 0.0 < crop_fraction(card) <= 1.0:
        raise InvalidModelCard(f"{where}: crop_fraction must be in (0, 1], got {crop_fraction(card)}")
    if test_time_views(card) not in (1, 2, 4, 8):
        raise InvalidModelCard(f"{where}: test_time_views must be 1, 2, 4 or 8, got {test_time_views(card)}")
    declared_temperature = getattr(card, "energy_temperature", 1.0)
    if not (isinstance(declared_temperature, int | float) and declared_temperature > 0):
        raise InvalidModelCard(f"{where}: energy_temperature must be positive, got {declared_temperature!r}")


def minimum_confidences(card: ModelCard) -> list[float]:
    """Per class, in the card's class order, the confidence a cell needs to be accepted (inf: never)."""
    minimums = []
    for name in card.class_names:
        threshold = card.class_thresholds[name]
        minimums.append(math.inf if threshold is None else float(threshold))
    return minimums


# Optional attributes a richer card (the registry's) carries; absent, the defaults below apply.


def ood_method(card: ModelCard) -> str | None:
    """Which score ``ood_threshold`` is on: "energy" (the default) or a feature-space score such as
    "mahalanobis"; None when the card has no OOD threshold."""
    if card.ood_threshold is None:
        return None
    return str(getattr(card, "ood_method", None) or "energy")


def features_layer(card: ModelCard) -> str:
    """The penultimate layer a feature-space OOD score reads (networks.FEATURES_LAYER by default)."""
    return str(getattr(card, "features_layer", "features"))


def crop_fraction(card: ModelCard) -> float:
    """The share of each image's shortest side, centred, that the model was trained on (1.0: all of it)."""
    return float(getattr(card, "crop_fraction", 1.0))


def test_time_views(card: ModelCard) -> int:
    """How many dihedral views of each cell the logits are averaged over (1: the image as it is); the
    temperature and thresholds were fitted on logits computed this way."""
    return int(getattr(card, "test_time_views", 1))


def energy_temperature(card: ModelCard) -> float:
    """The temperature of the energy score the card's ood_threshold was fitted on (1.0 unless it says)."""
    return float(getattr(card, "energy_temperature", 1.0))


def card_thresholds(card: ModelCard) -> dict[str, Any]:
    """The decision settings of one model, JSON-ready, as recorded with every report. A refer-all class
    threshold is written as null (JSON has no infinity)."""
    return {
        "task": card.task,
        "model_version": card.model_version,
        "temperature": float(card.temperature),
        "class_thresholds": {
            name: None if math.isinf(minimum) else minimum
            for name, minimum in zip(card.class_names, minimum_confidences(card), strict=True)
        },
        "ood_method": ood_method(card),
        "ood_threshold": None if card.ood_threshold is None else float(card.ood_threshold),
        "energy_temperature": energy_temperature(card),
        "crop_fraction": crop_fraction(card),
        "test_time_views": test_time_views(card),
    }
