"""One smear end to end: images from the object store, routed models, Grad-CAMs for referred cells,
the report, and one transaction into the warehouse; a re-run replaces instead of duplicating."""

from __future__ import annotations

import datetime as dt
import io

import keras
import numpy as np
import pytest
from PIL import Image

from hema_pipeline.inference.predict import CellClassifier
from hema_pipeline.inference.routing import Route
from hema_pipeline.inference.smear import infer_smear, load_smear_cells, save_smear_inference
from hema_pipeline.storage.object_store import LocalObjectStore
from hema_pipeline.storage.warehouse import Warehouse
from hema_pipeline_tests.support import model_contract
from hema_pipeline_tests.test_inference_sql import insert_model, insert_smear

SMEAR = "S" + "c" * 20
SIZE = 16
PRIMARY = ("neutrophil", "lymphocyte", "monocyte")
DYSPLASIA = ("neutrophil", "hypogranulated_neutrophil")


def colour_cnn(weights: np.ndarray, bias: np.ndarray) -> keras.Model:
    """A 1x1 identity convolution (the Grad-CAM layer) then logits = mean RGB in [0, 1] @ weights + bias."""
    inputs = keras.Input((SIZE, SIZE, 3))
    conv = keras.layers.Conv2D(3, 1, activation="relu", name="last_conv")
    pooled = keras.layers.Rescaling(1.0 / 255.0)(keras.layers.GlobalAveragePooling2D()(conv(inputs)))
    dense = keras.layers.Dense(weights.shape[1], name="logits")
    model = keras.Model(inputs, dense(pooled))
    conv.set_weights([np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3), np.zeros(3, np.float32)])
    dense.set_weights([weights.astype(np.float32), bias.astype(np.float32)])
    return model


def jpeg(rgb: tuple[int, int, int]) -> bytes:
    image = np.full((36, 36, 3), rgb, np.uint8)
    image[10:26, 10:26] = np.clip(np.array(rgb) * 0.6, 0, 255).astype(np.uint8)  # a "nucleus"
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


COLOURS = {
    1: (220, 30, 30),  # neutrophil
    2: (220, 30, 160),  # neutrophil, hypogranulated
    3: (30, 220, 30),  # lymphocyte
    4: (30, 30, 220),  # monocyte
    5: (128, 128, 128),  # equal logits: referred by the primary model
}


@pytest.fixture
def classifiers() -> dict[str, CellClassifier]:
    primary = colour_cnn(np.eye(3) * 8.0, np.zeros(3))
    dysplasia = colour_cnn(np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 12.0]]), np.array([0.0, -3.0]))
    return {
        "pbc": CellClassifier(primary, model_contract("pbc", "pbc-v1", PRIMARY, SIZE, 1.0, {name: 0.6 for name in PRIMARY})),
        "dysplasia": CellClassifier(
            dysplasia, model_contract("dysplasia", "dys-v1", DYSPLASIA, SIZE, 1.0, {name: 0.6 for name in DYSPLASIA})
        ),
    }


def test_a_smear_from_store_to_warehouse(tmp_path, classifiers):
    store = LocalObjectStore(tmp_path / "lake")
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    analyser = {1: "neutrophil", 2: "neutrophil", 3: "lymphocyte", 4: "lymphocyte", 5: "monocyte"}
    with warehouse.connect() as connection:
        insert_model(connection, "pbc-v1", "pbc", "ds-1", "champion")
        insert_model(connection, "dys-v1", "dysplasia", "ds-1", "champion")
        insert_smear(connection, SMEAR, dt.date(2026, 11, 18), {number: (analyser[number], None) for number in COLOURS})
        for number, colour in COLOURS.items():
            store.put_bytes(f"images/{SMEAR}/{number}.jpg", jpeg(colour))

        routes = [Route("pbc", "neutrophil", "dysplasia")]
        cells = load_smear_cells(connection, SMEAR)
        inference = infer_smear(SMEAR, cells, store, classifiers, "pbc", routes, created_at=dt.datetime(2026, 11, 20, 12, 0))
        save_smear_inference(warehouse, inference, "prun-1")
        save_smear_inference(warehouse, inference, "prun-1")  # a re-run of the same partition

        assert connection.execute("select task, count(*) from predictions group by 1 order by 1").fetchall() == [
            ("dysplasia", 2),
            ("pbc", 5),
        ]
        assert connection.execute("select count(*) from smear_reports").fetchall() == [(1,)]
        differential = dict(
            connection.execute(
                "select cell_class, cells from differential_per_smear where task = 'pbc' and smear_id = ?", [SMEAR]
            ).fetchall()
        )
        assert differential == {"neutrophil": 2, "lymphocyte": 1, "monocyte": 1}
        queue = connection.execute("select cell_uid, referral_reason, gradcam_key, image_key from referral_queue").fetchall()

    assert queue == [(f"{SMEAR}:5", "low_confidence", f"gradcam/pbc-v1/{SMEAR}/5.png", f"images/{SMEAR}/5.jpg")]
    with Image.open(io.BytesIO(store.get_bytes(queue[0][2]))) as gradcam:
        assert gradcam.format == "PNG" and gradcam.size == (36, 36)
    assert sorted(info.key for info in store.list("gradcam")) == [queue[0][2]]  # accepted cells get none

    report = inference.report
    assert report.specialists[0].count("hypogranulated_neutrophil") == 1
    # 4 cells accepted throughout; the analyser agrees on cell 1 and 3 (2 is hypogranulated, 4 a monocyte).
    assert (report.agreement.cells, report.agreement.agreeing) == (4, 2)
    assert "| hypogranulated neutrophil | 1 | 50.0 |" in report.markdown()
