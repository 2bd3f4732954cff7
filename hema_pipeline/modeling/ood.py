"""Out-of-distribution scores and thresholds: how unlike the training cells a cell is.

The energy score needs only the logits; the Mahalanobis score needs the penultimate features and a
scorer fitted on the training split (stored as a model attachment). A threshold keeps a chosen share of
known calibration cells; cells scoring above it are referred as unfamiliar (``is_unfamiliar``, the one
rule). The energy score is ``-T * logsumexp(logits / T)`` (Liu et al. 2020); the Mahalanobis distance is
to the nearest class mean in the penultimate feature space (Lee et al. 2018); higher means more
unfamiliar for both. The thesis's rule "top probability <= 0.5 -> other" caught only 0-3.5% of unseen
abnormal cells; ``leave_one_class_out_report`` measures what these scores catch instead of assuming it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from hema_pipeline.modeling.calibration import logsumexp

OodMethod = Literal["energy", "mahalanobis"]


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``-T * logsumexp(logits / T)`` per cell: low for cells like the training data, higher for
    unfamiliar ones (its negative is proportional to the log of the model's unnormalised density)."""
    return -temperature * logsumexp(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


@dataclass
class MahalanobisScorer:
    """Squared Mahalanobis distance to the nearest class mean under one shared (tied) covariance,
    estimated with Ledoit-Wolf shrinkage: penultimate features have hundreds of dimensions and some are
    nearly constant (dead ReLUs), so the plain sample covariance is singular or ill-conditioned."""

    class_means: np.ndarray  # [k, d]
    precision: np.ndarray  # [d, d], inverse of the shrunk covariance

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, num_classes: int) -> MahalanobisScorer:
        from sklearn.covariance import LedoitWolf

        features = np.asarray(features, dtype=np.float64)
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        if features.ndim != 2 or len(features) != len(labels):
            raise ValueError("need [n, d] features and n labels")
        present = np.unique(labels)
        if len(present) < 2:
            raise ValueError("need training features of at least two classes")
        means = np.full((num_classes, features.shape[1]), np.nan)
        centred = np.empty_like(features)
        for index in present:
            mask = labels == index
            means[index] = features[mask].mean(axis=0)
            centred[mask] = features[mask] - means[index]
        estimate = LedoitWolf(assume_centered=True).fit(centred)
        return cls(class_means=means, precision=estimate.precision_)

    def score(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float64)
        means = self.class_means[~np.isnan(self.class_means).any(axis=1)]  # classes seen in training
        projected = features @ self.precision
        distances = (
            (projected * features).sum(axis=1)[:, None]
            - 2.0 * projected @ means.T
            + ((means @ self.precision) * means).sum(axis=1)[None, :]
        )
        return np.maximum(distances.min(axis=1), 0.0)  # rounding can dip a true 0 below it

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, class_means=self.class_means, precision=self.precision)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> MahalanobisScorer:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return cls(class_means=arrays["class_means"], precision=arrays["precision"])


@dataclass(frozen=True)
class OodThreshold:
    """Cells scoring above ``threshold`` are referred as unfamiliar."""

    method: OodMethod
    threshold: float
    keep_quantile: float  # share of known calibration cells kept (not referred)
    calibration_cells: int
    energy_temperature: float = 1.0  # energy only

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "threshold": self.threshold,
            "keep_quantile": self.keep_quantile,
            "calibration_cells": self.calibration_cells,
            "energy_temperature": self.energy_temperature,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> OodThreshold:
        return cls(
            method=values["method"],
            threshold=float(values["threshold"]),
            keep_quantile=float(values["keep_quantile"]),
            calibration_cells=int(values["calibration_cells"]),
            energy_temperature=float(values.get("energy_temperature", 1.0)),
        )


def fit_ood_threshold(
    known_scores: np.ndarray,
    method: OodMethod,
    keep_quantile: float = 0.95,
    energy_temperature: float = 1.0,
) -> OodThreshold:
    """The threshold keeping at least ``keep_quantile`` of the known (in-distribution) calibration cells:
    the empirical quantile taken at an observed score ("higher"), so the kept share never falls short."""
    known_scores = np.asarray(known_scores, dtype=np.float64).reshape(-1)
    if len(known_scores) == 0:
        raise ValueError("no calibration scores")
    if not 0 < keep_quantile <= 1:
        raise ValueError("keep_quantile must be in (0, 1]")
    return OodThreshold(
        method=method,
        threshold=float(np.quantile(known_scores, keep_quantile, method="higher")),
        keep_quantile=keep_quantile,
        calibration_cells=len(known_scores),
        energy_temperature=energy_temperature,
    )


def is_unfamiliar(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The one unfamiliarity rule: an OOD score above the fitted threshold."""
    return np.asarray(scores, dtype=np.float64) > threshold


def leave_one_class_out_report(
    known_scores: np.ndarray,
    held_out_scores: Mapping[str, np.ndarray],
    threshold: OodThreshold,
) -> pd.DataFrame:
    """Share of cells referred as unfamiliar: for known cells (the false-referral rate) and for each
    held-out class (the detection rate), with the held-out class's ROC AUC against known cells (how
    well the score separates them at any threshold).

    Scores come from a model trained without the held-out class, on cells it never saw; running those
    trainings is the caller's job."""
    from sklearn.metrics import roc_auc_score

    known_scores = np.asarray(known_scores, dtype=np.float64).reshape(-1)
    rows = [
        {
            "group": "known",
            "held_out": False,
            "cells": len(known_scores),
            "referred": int(is_unfamiliar(known_scores, threshold.threshold).sum()),
            "referred_share": float(is_unfamiliar(known_scores, threshold.threshold).mean()) if len(known_scores) else math.nan,
            "roc_auc_vs_known": math.nan,
        }
    ]
    for name, scores in held_out_scores.items():
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        referred = is_unfamiliar(scores, threshold.threshold)
        auc = math.nan
        if len(scores) and len(known_scores):
            truth = np.r_[np.zeros(len(known_scores)), np.ones(len(scores))]
            auc = float(roc_auc_score(truth, np.r_[known_scores, scores]))
        rows.append(
            {
                "group": name,
                "held_out": True,
                "cells": len(scores),
                "referred": int(referred.sum()),
                "referred_share": float(referred.mean()) if len(scores) else math.nan,
                "roc_auc_vs_known": auc,
            }
        )
    return pd.DataFrame(rows)
