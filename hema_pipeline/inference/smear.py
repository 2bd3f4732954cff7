"""One smear end to end: its cells' images from the object store through the routed models, Grad-CAMs
for the referred cells, the report, and one transaction writing predictions and report.

A Dagster asset (or a CLI command) only opens the warehouse and the store and calls, in order,
``load_smear_cells``, ``infer_smear`` and ``save_smear_inference``.
"""

from __future__ import annotations

import datetime as dt
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import duckdb
import pandas as pd

from hema_pipeline.inference.gradcam import GradCam, gradcam_object_key
from hema_pipeline.inference.predict import DEFAULT_BATCH_SIZE, CellClassifier, predict_routed
from hema_pipeline.inference.records import prediction_records, write_predictions, write_smear_report
from hema_pipeline.inference.report import ReportSettings, SmearReport, build_smear_report
from hema_pipeline.inference.routing import Route
from hema_pipeline.storage.object_store import ObjectStore
from hema_pipeline.storage.warehouse import Warehouse


@dataclass(frozen=True)
class SmearInference:
    smear_id: str
    predictions: pd.DataFrame  # every stage's rows (routing.PREDICTION_COLUMNS + gradcam_key)
    report: SmearReport


def load_smear_cells(connection: duckdb.DuckDBPyConnection, smear_id: str) -> pd.DataFrame:
    """The smear's cells in analyser order: cell_uid, image_key, analyser_class."""
    return connection.execute(
        "select cell_uid, image_key, analyser_class from cells where smear_id = ? order by cell_id", [smear_id]
    ).df()


def infer_smear(
    smear_id: str,
    cells: pd.DataFrame,
    store: ObjectStore,
    classifiers: Mapping[str, CellClassifier],
    primary_task: str,
    routes: Sequence[Route] = (),
    *,
    settings: ReportSettings = ReportSettings(),
    render_gradcams: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    created_at: dt.datetime | None = None,
) -> SmearInference:
    """Predict every cell of ``cells`` (``load_smear_cells``), store a Grad-CAM for each referred
    prediction (what the technologist reviewing it sees first) and build the report."""
    if cells.empty:
        raise ValueError(f"smear {smear_id} has no cells to classify")
    # Images come through the store interface (local folder or S3) as bytes; a smear is a few hundred.
    images = [store.get_bytes(key) for key in cells["image_key"]]
    cell_uids = cells["cell_uid"].astype(str).tolist()
    predictions = predict_routed(images, classifiers, primary_task, routes, cell_keys=cell_uids, batch_size=batch_size)
    predictions["gradcam_key"] = pd.Series([None] * len(predictions), dtype=object)
    if render_gradcams:
        image_by_cell = dict(zip(cell_uids, images, strict=True))
        predictions["gradcam_key"] = _store_referral_gradcams(predictions, image_by_cell, classifiers, store)
    report = build_smear_report(
        smear_id,
        predictions,
        {task: classifier.contract for task, classifier in classifiers.items()},
        primary_task,
        routes,
        analyser_classes=dict(zip(cell_uids, cells["analyser_class"].astype(str), strict=True)),
        settings=settings,
        created_at=created_at,
    )
    return SmearInference(smear_id, predictions, report)


# Built once per classifier (a sub-model and a traced gradient pass): smears predicted in one process
# with the same champions reuse them.
_GRADCAMS: weakref.WeakKeyDictionary[CellClassifier, GradCam] = weakref.WeakKeyDictionary()


def _gradcam_for(classifier: CellClassifier) -> GradCam:
    if classifier not in _GRADCAMS:
        _GRADCAMS[classifier] = GradCam(classifier)
    return _GRADCAMS[classifier]


def _store_referral_gradcams(
    predictions: pd.DataFrame,
    image_by_cell: Mapping[str, bytes],
    classifiers: Mapping[str, CellClassifier],
    store: ObjectStore,
) -> list[str | None]:
    """Object keys of the Grad-CAMs written for referred rows (None for accepted ones), for the class
    each model predicted: the reviewer sees what the model based its uncertain call on."""
    keys: list[str | None] = [None] * len(predictions)
    referred = predictions.reset_index(drop=True)
    referred = referred[~referred["accepted"].astype(bool)]
    for task, rows in referred.groupby("task", sort=True):
        # One batched gradient pass per model for all of the smear's referred cells.
        pngs = _gradcam_for(classifiers[str(task)]).pngs(
            [image_by_cell[str(cell)] for cell in rows["cell_key"]], [str(name) for name in rows["predicted_class"]]
        )
        for position, row, png in zip(rows.index, rows.itertuples(index=False), pngs, strict=True):
            key = gradcam_object_key(str(row.model_version), str(row.cell_key))
            store.put_bytes(key, png)
            keys[position] = key
    return keys


def save_smear_inference(
    warehouse: Warehouse,
    inference: SmearInference,
    prediction_run_id: str,
    predicted_at: dt.datetime | None = None,
) -> None:
    """Predictions and report in one transaction: a failure leaves the smear's previous rows intact."""
    records = prediction_records(inference.predictions, inference.smear_id, prediction_run_id, predicted_at)
    with warehouse.transaction(serialise_on=f"smear:{inference.smear_id}") as connection:
        write_predictions(connection, records)
        write_smear_report(connection, inference.report, prediction_run_id)
