"""Test-set metrics from logits: per-class and overall, as numbers, rows and a confusion-matrix figure.

Undefined values are NaN, never a flattering 0 or 1: the precision of a class the model never predicts,
the ROC AUC of a class absent from the test set. Macro averages run over the classes where the value is
defined, and ``EvaluationReport.notes`` says which classes were left out and why.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from hema_pipeline.modeling.calibration import log_softmax

PER_CLASS_COLUMNS = (
    "class_index",
    "class_name",
    "support",
    "predicted",
    "true_positives",
    "precision",
    "recall",
    "specificity",
    "f1",
    "roc_auc",
)


@dataclass
class EvaluationReport:
    class_names: tuple[str, ...]
    cells: int
    accuracy: float
    macro_f1: float
    macro_auc: float
    nll: float  # mean negative log-likelihood at the temperature the report was computed with
    temperature: float
    per_class: pd.DataFrame  # PER_CLASS_COLUMNS, one row per class in class_names order
    confusion: np.ndarray  # [k, k] counts, rows = true class, columns = predicted class
    notes: list[str] = field(default_factory=list)

    def headline(self) -> dict[str, float | int]:
        return {
            "cells": self.cells,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "macro_auc": self.macro_auc,
            "nll": self.nll,
        }

    def per_class_records(self) -> list[dict[str, Any]]:
        """JSON-ready rows (NaN becomes None)."""
        return [{str(key): _json_number(value) for key, value in row.items()} for row in self.per_class.to_dict(orient="records")]


def _json_number(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def evaluate_logits(
    logits: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    temperature: float = 1.0,
) -> EvaluationReport:
    """Evaluate predictions ``argmax(logits)`` against integer ``labels``. The temperature changes only
    the probability-based metrics (NLL, ROC AUC), never the predicted class."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    classes = len(class_names)
    if logits.ndim != 2 or logits.shape[1] != classes:
        raise ValueError(f"logits of shape {logits.shape} for {classes} classes")
    if len(labels) != len(logits):
        raise ValueError(f"{len(logits)} logits but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("nothing to evaluate")
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError("labels outside class_names")

    log_probabilities = log_softmax(logits / temperature)
    probabilities = np.exp(log_probabilities)
    predicted = logits.argmax(axis=1)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    cells = int(len(labels))

    # sklearn's import costs seconds; every Dagster run process imports this module, few evaluate a model.
    from sklearn.metrics import roc_auc_score

    rows = []
    notes: list[str] = []
    for index, name in enumerate(class_names):
        true_positives = int(confusion[index, index])
        support = int(confusion[index].sum())
        predicted_count = int(confusion[:, index].sum())
        false_positives = predicted_count - true_positives
        negatives = cells - support
        precision = true_positives / predicted_count if predicted_count else math.nan
        recall = true_positives / support if support else math.nan
        specificity = (negatives - false_positives) / negatives if negatives else math.nan
        if support == 0 and predicted_count == 0:
            f1 = math.nan
            notes.append(f"{name}: absent from the test set and never predicted; left out of macro F1")
        else:
            # A class that is present but never predicted (or predicted but absent) scores 0, as in
            # sklearn: 2TP / (2TP + FP + FN).
            f1 = 2 * true_positives / (2 * true_positives + false_positives + (support - true_positives))
        if 0 < support < cells:
            roc_auc = float(roc_auc_score(labels == index, probabilities[:, index]))
        else:
            roc_auc = math.nan
            notes.append(f"{name}: ROC AUC undefined ({'no' if support == 0 else 'only'} cells of this class)")
        rows.append((index, name, support, predicted_count, true_positives, precision, recall, specificity, f1, roc_auc))
    per_class = pd.DataFrame(rows, columns=list(PER_CLASS_COLUMNS))
    return EvaluationReport(
        class_names=tuple(class_names),
        cells=cells,
        accuracy=float(np.trace(confusion) / cells),
        macro_f1=_nan_mean(per_class["f1"]),
        macro_auc=_nan_mean(per_class["roc_auc"]),
        nll=float(-log_probabilities[np.arange(cells), labels].mean()),
        temperature=float(temperature),
        per_class=per_class,
        confusion=confusion,
        notes=notes,
    )


def _nan_mean(values: pd.Series) -> float:
    defined = values.dropna()
    return float(defined.mean()) if len(defined) else math.nan


def evaluation_rows(report: EvaluationReport, model_version: str) -> pd.DataFrame:
    """Per-class rows keyed by ``model_version`` (PER_CLASS_COLUMNS). ``registry.register_model`` writes
    these to ``model_evaluations`` itself, with the referral thresholds and test coverage per class
    added; use this for ad-hoc comparisons (e.g. a champion re-evaluated on a newer test split)."""
    frame = report.per_class.copy()
    frame.insert(0, "model_version", model_version)
    return frame


def confusion_matrix_png(report: EvaluationReport, title: str = "") -> bytes:
    """Row-normalised confusion matrix (each row shows where that true class went, so rare classes are
    as readable as common ones) with the counts written in the cells; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    counts = report.confusion
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)
    classes = len(report.class_names)
    size = max(4.0, 0.75 * classes + 2.5)
    figure, axis = plt.subplots(figsize=(size + 1.0, size), dpi=100)
    try:
        image = axis.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="share of true class")
        axis.set_xticks(range(classes), report.class_names, rotation=45, ha="right")
        axis.set_yticks(range(classes), report.class_names)
        axis.set_xlabel("predicted class")
        axis.set_ylabel("true class")
        for row in range(classes):
            for column in range(classes):
                if counts[row, column]:
                    colour = "white" if shares[row, column] > 0.5 else "black"
                    axis.text(column, row, str(counts[row, column]), ha="center", va="center", color=colour, fontsize=8)
        axis.set_title(title or f"accuracy {report.accuracy:.2%}, macro F1 {report.macro_f1:.3f} (n={report.cells})")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(figure)
