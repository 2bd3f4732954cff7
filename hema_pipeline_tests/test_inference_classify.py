"""`hema classify`'s core on a folder with a corrupt file: the CSV has the readable images, the failure
is reported with its reason and returned."""

from __future__ import annotations

import csv
import io

import keras
import numpy as np
import pytest
from PIL import Image

from hema_pipeline.inference.classify import classify_files, collect_image_files
from hema_pipeline.inference.predict import CellClassifier
from hema_pipeline_tests.support import model_contract

SIZE = 16
CLASSES = ("neutrophil", "lymphocyte", "monocyte")


@pytest.fixture(scope="module")
def classifier() -> CellClassifier:
    """Logits = 6 x mean RGB in [0, 1]: red cells are neutrophils, green lymphocytes, blue monocytes."""
    inputs = keras.Input((SIZE, SIZE, 3))
    pooled = keras.layers.Rescaling(1.0 / 255.0)(keras.layers.GlobalAveragePooling2D()(inputs))
    dense = keras.layers.Dense(3, name="logits")
    model = keras.Model(inputs, dense(pooled))
    dense.set_weights([np.eye(3, dtype=np.float32) * 6.0, np.zeros(3, np.float32)])
    thresholds = {"neutrophil": 0.5, "lymphocyte": 0.5, "monocyte": 0.5}
    return CellClassifier(model, model_contract("pbc", "pbc-v1", CLASSES, SIZE, 1.5, thresholds, None))


def write_image(path, rgb, image_format):
    Image.fromarray(np.full((30, 34, 3), rgb, np.uint8)).save(path, format=image_format)


def test_classify_a_directory_with_a_corrupt_file(classifier, tmp_path):
    folder = tmp_path / "cells"
    folder.mkdir()
    write_image(folder / "a_red.jpg", (230, 20, 20), "JPEG")
    write_image(folder / "b_green.PNG", (20, 230, 20), "PNG")
    write_image(folder / "c_grey.jpeg", (128, 128, 128), "JPEG")  # equal logits: referred
    (folder / "d_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    (folder / "notes.txt").write_text("not an image: ignored in a directory")

    files = collect_image_files(directories=[folder])
    assert [path.name for path in files] == ["a_red.jpg", "b_green.PNG", "c_grey.jpeg", "d_corrupt.jpg"]

    output = tmp_path / "out" / "predictions.csv"
    messages = io.StringIO()
    outcome = classify_files(files, classifier, output, batch_size=2, messages=messages)

    assert outcome.classified == 3 and not outcome.ok
    assert [failure.cell_key for failure in outcome.failures] == [str(folder / "d_corrupt.jpg")]
    assert outcome.failures[0].reason
    log = messages.getvalue()
    assert f"skipped {folder / 'd_corrupt.jpg'}: {outcome.failures[0].reason}" in log
    assert "4/4" in log  # the progress bar counted every file, the skipped one included

    with output.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == [
        "file",
        "predicted_class",
        "confidence",
        "referred",
        "referral_reason",
        "p_neutrophil",
        "p_lymphocyte",
        "p_monocyte",
    ]
    assert [row["file"] for row in rows] == [str(path) for path in files[:3]]
    assert [row["predicted_class"] for row in rows[:2]] == ["neutrophil", "lymphocyte"]
    assert [row["referred"] for row in rows] == ["False", "False", "True"]
    assert [row["referral_reason"] for row in rows] == ["", "", "low_confidence"]
    for row in rows:
        probabilities = [float(row[f"p_{name}"]) for name in CLASSES]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert float(row["confidence"]) == pytest.approx(max(probabilities), abs=1e-6)
    assert sorted(path.name for path in output.parent.iterdir()) == ["predictions.csv"]  # no temporary left


def test_classify_all_good_files_to_a_stream(classifier, tmp_path):
    red = tmp_path / "red.png"
    write_image(red, (230, 20, 20), "PNG")
    stream = io.StringIO()
    outcome = classify_files(collect_image_files(files=[red, red]), classifier, stream, progress=False)
    assert outcome.ok and outcome.classified == 1
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"{red},neutrophil,")


def test_missing_inputs_are_reported(classifier, tmp_path):
    messages = io.StringIO()
    outcome = classify_files([tmp_path / "absent.jpg"], classifier, tmp_path / "out.csv", progress=False, messages=messages)
    assert outcome.classified == 0
    assert "No such file" in outcome.failures[0].reason
    assert (tmp_path / "out.csv").read_text().startswith("file,predicted_class")
    with pytest.raises(NotADirectoryError):
        collect_image_files(directories=[tmp_path / "no-such-folder"])
