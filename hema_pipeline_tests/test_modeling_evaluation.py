"""Test-set metrics against scikit-learn and hand-counted values."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from hema_pipeline.modeling.calibration import softmax
from hema_pipeline.modeling.evaluation import (
    PER_CLASS_COLUMNS,
    confusion_matrix_png,
    evaluate_logits,
    evaluation_rows,
)

CLASSES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]


def _noisy_logits(seed: int, cells: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.choice(4, cells, p=[0.5, 0.3, 0.15, 0.05])
    logits = rng.normal(0, 1.0, (cells, 4))
    logits[np.arange(cells), labels] += 1.2
    return logits, labels


def test_metrics_match_sklearn():
    logits, labels = _noisy_logits(1)
    report = evaluate_logits(logits, labels, CLASSES, temperature=1.7)
    predicted = logits.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=range(4), zero_division=0)
    table = report.per_class.set_index("class_name")
    np.testing.assert_allclose(table["precision"], precision)
    np.testing.assert_allclose(table["recall"], recall)
    np.testing.assert_allclose(table["f1"], f1)
    np.testing.assert_array_equal(table["support"], support)
    np.testing.assert_array_equal(report.confusion, confusion_matrix(labels, predicted, labels=range(4)))
    assert report.accuracy == pytest.approx(accuracy_score(labels, predicted))
    assert report.macro_f1 == pytest.approx(f1_score(labels, predicted, average="macro"))
    probabilities = softmax(logits, 1.7)
    for index, name in enumerate(CLASSES):
        assert table.loc[name, "roc_auc"] == pytest.approx(roc_auc_score(labels == index, probabilities[:, index]))
        negatives = labels != index
        assert table.loc[name, "specificity"] == pytest.approx((predicted[negatives] != index).mean())
    assert report.macro_auc == pytest.approx(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))
    expected_nll = -np.log(probabilities[np.arange(len(labels)), labels]).mean()
    assert report.nll == pytest.approx(expected_nll)
    assert list(report.per_class.columns) == list(PER_CLASS_COLUMNS)


def test_a_tiny_confusion_counted_by_hand():
    # true:      0  0  0  1  1  2
    # predicted: 0  0  1  1  0  2
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 0, 2])
    logits = np.eye(3)[predicted] * 3.0
    report = evaluate_logits(logits, labels, ["a", "b", "c"])
    a, b, c = (report.per_class.iloc[index] for index in range(3))
    assert (a["precision"], a["recall"], a["specificity"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert a["f1"] == pytest.approx(2 / 3)
    assert (b["precision"], b["recall"], b["specificity"]) == pytest.approx((1 / 2, 1 / 2, 3 / 4))
    assert (c["precision"], c["recall"], c["specificity"], c["f1"]) == pytest.approx((1.0, 1.0, 1.0, 1.0))
    assert report.accuracy == pytest.approx(4 / 6)
    assert report.macro_f1 == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_undefined_values_are_nan_and_left_out_of_macro_averages():
    labels = np.array([0, 0, 1, 1])
    predicted = np.array([0, 1, 1, 1])  # class 2 absent and never predicted
    report = evaluate_logits(np.eye(3)[predicted] * 2.0, labels, ["a", "b", "c"])
    absent = report.per_class.iloc[2]
    assert absent["support"] == 0 and math.isnan(absent["precision"]) and math.isnan(absent["recall"])
    assert math.isnan(absent["f1"]) and math.isnan(absent["roc_auc"])
    assert absent["specificity"] == 1.0
    assert report.macro_f1 == pytest.approx(f1_score(labels, predicted, average="macro", labels=[0, 1]))
    assert any("c: absent from the test set" in note for note in report.notes)
    # A class present but never predicted: precision undefined, F1 zero (as sklearn).
    never = evaluate_logits(np.eye(2)[[0, 0, 0]] * 2.0, np.array([0, 1, 0]), ["x", "y"]).per_class.iloc[1]
    assert math.isnan(never["precision"]) and never["recall"] == 0.0 and never["f1"] == 0.0


def test_rows_and_figure():
    logits, labels = _noisy_logits(2)
    report = evaluate_logits(logits, labels, CLASSES)
    rows = evaluation_rows(report, "wbc-abc")
    assert rows["model_version"].unique().tolist() == ["wbc-abc"]
    assert rows["class_name"].tolist() == CLASSES
    image = Image.open(io.BytesIO(confusion_matrix_png(report)))
    assert image.format == "PNG" and image.size[0] > 300
    records = report.per_class_records()
    assert records[0]["class_name"] == "neutrophil" and isinstance(records[0]["support"], int)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="labels outside"):
        evaluate_logits(np.zeros((2, 2)), np.array([0, 2]), ["a", "b"])
    with pytest.raises(ValueError, match="logits of shape"):
        evaluate_logits(np.zeros((2, 3)), np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="2 logits but 3 labels"):
        evaluate_logits(np.zeros((2, 2)), np.array([0, 1, 1]), ["a", "b"])
