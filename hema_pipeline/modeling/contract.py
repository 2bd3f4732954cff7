"""The model contract: everything using a model requires, in one type, with no defaults.

A registered model's card holds the contract (``registry.ModelCard.contract()``); inference takes nothing
else (``inference.predict.CellClassifier``, routing, reports). Every field is required, so a card that
lacks one is an error where it is built, never a silent "one view" or "no crop" at prediction time.

The referral decision is made here, by the function calibration certified it with
(``triage_cells``, below): the cells a smear gets accepted are exactly the cells the model card's
coverage counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hema_pipeline.modeling.calibration import accepted_at, softmax
from hema_pipeline.modeling.ood import energy_score, is_unfamiliar

# A cell's triage: accepted, or referred to a technologist for one of these reasons.
ACCEPTED = "accepted"
LOW_CONFIDENCE = "low_confidence"
UNFAMILIAR = "unfamiliar"


@dataclass(frozen=True)
class CellTriage:
    decisions: np.ndarray  # per cell: ACCEPTED, LOW_CONFIDENCE or UNFAMILIAR
    predicted: np.ndarray  # class index
    confidence: np.ndarray  # calibrated top-class probability
    ood_scores: np.ndarray | None = field(default=None)


def triage_cells(
    logits: np.ndarray,
    temperature: float,
    minimum_confidences: Sequence[float],
    ood_scores: np.ndarray | None = None,
    ood_threshold: float | None = None,
) -> CellTriage:
    """Each cell accepted, referred for low confidence (``accepted_at`` fails) or referred as unfamiliar (OOD
    score above ``ood_threshold``). Unfamiliar wins over low confidence: a cell unlike anything in training
    is flagged as such even when the model is confident about it (confident errors on unseen cell types are
    the failure the thesis saw: 67% of unseen abnormal cells were called monocytes)."""
    probabilities = softmax(logits, temperature)
    decisions = np.where(accepted_at(probabilities, minimum_confidences), ACCEPTED, LOW_CONFIDENCE).astype(object)
    if (ood_scores is None) != (ood_threshold is None):
        raise ValueError("give both ood_scores and ood_threshold, or neither")
    if ood_scores is not None and ood_threshold is not None:
        decisions[is_unfamiliar(ood_scores, ood_threshold)] = UNFAMILIAR
    return CellTriage(
        decisions=decisions.astype(str),
        predicted=probabilities.argmax(axis=1),
        confidence=probabilities.max(axis=1),
        ood_scores=None if ood_scores is None else np.asarray(ood_scores, dtype=np.float64),
    )


TEST_TIME_VIEW_COUNTS: tuple[int, ...] = (1, 2, 4, 8)  # dihedral views a cell's logits can be averaged over


class InvalidModelContract(ValueError):
    pass


@dataclass(frozen=True, kw_only=True)
class ModelContract:
    task: str
    model_version: str
    class_names: tuple[str, ...]  # in the order of the model's logits
    input_size: int  # square input, in pixels
    # Pixel range the network expects (1.0 or 255.0); None: the network's own pixel_scaling layer says.
    pixel_range: float | None
    crop_fraction: float  # centred share of each image's shortest side the network sees
    test_time_views: int  # dihedral views whose logits are averaged; the temperature and thresholds assume them
    temperature: float  # calibrated probabilities are softmax(logits / temperature)
    # Minimum calibrated confidence to accept a cell predicted as the class; +inf or None refers every such cell.
    class_thresholds: Mapping[str, float | None]
    ood_method: str | None  # "energy" or a feature-space score ("mahalanobis"); None: no OOD threshold
    ood_threshold: float | None  # OOD score above this: the cell is unfamiliar
    energy_temperature: float  # the temperature of the energy score the OOD threshold was fitted on
    features_layer: str  # penultimate feature vector (feature-space OOD scores)
    last_conv_layer: str  # last spatial feature map (Grad-CAM)

    def __post_init__(self) -> None:
        where = f"model {self.task}/{self.model_version}"
        names = list(self.class_names)
        if len(names) < 2:
            raise InvalidModelContract(f"{where}: needs at least two class names, got {names}")
        if len(set(names)) != len(names):
            raise InvalidModelContract(f"{where}: class names repeat: {names}")
        if self.input_size < 1:
            raise InvalidModelContract(f"{where}: input_size must be positive, got {self.input_size}")
        if self.pixel_range is not None and self.pixel_range not in (1.0, 255.0):
            raise InvalidModelContract(f"{where}: pixel_range must be 1.0 or 255.0, got {self.pixel_range}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise InvalidModelContract(f"{where}: temperature must be a positive number, got {self.temperature}")
        unknown = sorted(set(self.class_thresholds) - set(names))
        if unknown:
            raise InvalidModelContract(f"{where}: thresholds for classes the model does not have: {unknown}")
        # A class silently left out would be accepted at any confidence: the unsafe direction for a lab.
        missing = [name for name in names if name not in self.class_thresholds]
        if missing:
            raise InvalidModelContract(f"{where}: no confidence threshold for {missing} (use 0.0 to accept any confidence)")
        for name, threshold in self.class_thresholds.items():
            if threshold is not None and not (0.0 <= threshold <= 1.0 or threshold == math.inf):
                raise InvalidModelContract(f"{where}: threshold for {name!r} must be in [0, 1] or refer-all, got {threshold}")
        if (self.ood_threshold is None) != (self.ood_method is None):
            raise InvalidModelContract(f"{where}: an OOD threshold needs its method, and a method its threshold")
        if self.ood_threshold is not None and not math.isfinite(self.ood_threshold):
            raise InvalidModelContract(f"{where}: ood_threshold must be a finite number or None")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise InvalidModelContract(f"{where}: crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if self.test_time_views not in TEST_TIME_VIEW_COUNTS:  # check_test_time_views, with the model named
            raise InvalidModelContract(f"{where}: test_time_views must be 1, 2, 4 or 8, got {self.test_time_views}")
        if not (math.isfinite(self.energy_temperature) and self.energy_temperature > 0):
            raise InvalidModelContract(f"{where}: energy_temperature must be positive, got {self.energy_temperature!r}")

    def minimum_confidences(self) -> list[float]:
        """Per class, in class order, the confidence a cell needs to be accepted (inf: never)."""
        minimums = []
        for name in self.class_names:
            threshold = self.class_thresholds[name]
            minimums.append(math.inf if threshold is None else float(threshold))
        return minimums

    def energy(self, logits: np.ndarray) -> np.ndarray:
        """The energy score at the temperature the OOD threshold was fitted with (higher: less familiar)."""
        return energy_score(np.asarray(logits, np.float64), self.energy_temperature)

    def triage(self, logits: np.ndarray, ood_scores: np.ndarray | None = None) -> CellTriage:
        """Accepted, low confidence or unfamiliar, per cell. ``ood_scores`` are the scores the OOD threshold
        is on; they default to the energy, which is what an "energy" threshold needs."""
        if self.ood_threshold is None:
            return triage_cells(logits, self.temperature, self.minimum_confidences())
        if ood_scores is None:
            if self.ood_method != "energy":
                raise ValueError(f"model {self.model_version}: its OOD threshold is on {self.ood_method!r} scores; pass them")
            ood_scores = self.energy(logits)
        return triage_cells(logits, self.temperature, self.minimum_confidences(), ood_scores, self.ood_threshold)

    def decision_settings(self) -> dict[str, Any]:
        """The decision settings, JSON-ready, as recorded with every report (a refer-all class threshold is
        written as null: JSON has no infinity)."""
        return {
            "task": self.task,
            "model_version": self.model_version,
            "temperature": float(self.temperature),
            "class_thresholds": {
                name: None if math.isinf(minimum) else minimum
                for name, minimum in zip(self.class_names, self.minimum_confidences(), strict=True)
            },
            "ood_method": self.ood_method,
            "ood_threshold": None if self.ood_threshold is None else float(self.ood_threshold),
            "energy_temperature": self.energy_temperature,
            "crop_fraction": self.crop_fraction,
            "test_time_views": self.test_time_views,
        }


def check_test_time_views(views: int) -> int:
    if views not in TEST_TIME_VIEW_COUNTS:
        raise ValueError(f"test-time views must be one of {TEST_TIME_VIEW_COUNTS}, got {views}")
    return views
