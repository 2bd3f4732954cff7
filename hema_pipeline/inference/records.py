"""Rows for the prediction tables (sql/predictions.sql), written and read back in the caller's
transaction. Upserts by key, so re-running a smear replaces its rows instead of duplicating them.

Writes upsert by key (``storage.warehouse.replace_rows``): run them inside a transaction
(``begin`` ... ``commit``), as the importer does per smear, so a refused row leaves the old ones."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence

import duckdb
import pandas as pd

from hema_pipeline.inference.report import SmearReport
from hema_pipeline.inference.routing import PREDICTION_COLUMNS
from hema_pipeline.storage.warehouse import replace_rows

PREDICTION_KEY: tuple[str, ...] = ("smear_id", "cell_uid", "model_version")
SMEAR_REPORT_KEY: tuple[str, ...] = ("smear_id", "report_version")

PREDICTION_TABLE_COLUMNS: tuple[str, ...] = (
    "smear_id",
    "cell_uid",
    "model_version",
    "task",
    "predicted_class",
    "confidence",
    "probabilities",
    "energy",
    "ood_score",
    "accepted",
    "referral_reason",
    "gradcam_key",
    "predicted_at",
    "prediction_run_id",
)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def prediction_records(
    predictions: pd.DataFrame,
    smear_id: str,
    prediction_run_id: str,
    predicted_at: dt.datetime | None = None,
) -> pd.DataFrame:
    """``predictions`` (cell keys are cell_uids of ``smear_id``) as rows of the ``predictions`` table.
    An optional ``gradcam_key`` column is carried over (the object-store key of the cell's heat-map)."""
    foreign = [key for key in predictions["cell_key"] if not str(key).startswith(f"{smear_id}:")]
    if foreign:
        raise ValueError(f"{len(foreign)} predictions are not cells of {smear_id} (e.g. {foreign[0]!r})")
    gradcam = predictions["gradcam_key"] if "gradcam_key" in predictions.columns else pd.Series(None, index=predictions.index)
    records = pd.DataFrame(
        {
            "smear_id": smear_id,
            "cell_uid": predictions["cell_key"].astype(str).to_numpy(),
            "model_version": predictions["model_version"].to_numpy(),
            "task": predictions["task"].to_numpy(),
            "predicted_class": predictions["predicted_class"].to_numpy(),
            "confidence": predictions["confidence"].astype(float).to_numpy(),
            "probabilities": [json.dumps(values) for values in predictions["probabilities"]],
            "energy": predictions["energy"].astype(float).to_numpy(),
            # NaN (no OOD threshold) must reach the table as NULL, not as a NaN double.
            "ood_score": [None if pd.isna(value) else float(value) for value in predictions["ood_score"]],
            "accepted": predictions["accepted"].astype(bool).to_numpy(),
            "referral_reason": predictions["referral_reason"].to_numpy(dtype=object),
            "gradcam_key": gradcam.to_numpy(dtype=object),
            "predicted_at": predicted_at or _utc_now(),
            "prediction_run_id": prediction_run_id,
        }
    )
    return records.loc[:, list(PREDICTION_TABLE_COLUMNS)]


def write_predictions(connection: duckdb.DuckDBPyConnection, records: pd.DataFrame) -> None:
    replace_rows(connection, "predictions", records, PREDICTION_KEY)


def load_smear_predictions(
    connection: duckdb.DuckDBPyConnection, smear_id: str, model_versions: Sequence[str] | None = None
) -> pd.DataFrame:
    """A smear's stored predictions back in the prediction-table form (``routing.PREDICTION_COLUMNS``,
    cell_key = cell_uid), optionally only those of ``model_versions``, ordered by cell."""
    frame = connection.execute(
        """
        select p.cell_uid as cell_key, p.task, p.model_version, p.predicted_class, p.confidence, p.energy,
               coalesce(p.ood_score, cast('NaN' as double precision)) as ood_score, p.accepted, p.referral_reason, cast(p.probabilities as varchar) as probabilities, p.gradcam_key
        from predictions p left join cells c using (cell_uid)
        where p.smear_id = ?
        order by p.task, p.model_version, c.cell_id, p.cell_uid
        """,
        [smear_id],
    ).df()
    if model_versions is not None:
        frame = frame[frame["model_version"].isin(list(model_versions))].reset_index(drop=True)
    frame["probabilities"] = [json.loads(values) for values in frame["probabilities"]]
    frame["referral_reason"] = frame["referral_reason"].astype(object).where(frame["referral_reason"].notna(), None)
    return frame.loc[:, [*PREDICTION_COLUMNS, "gradcam_key"]]


def load_analyser_classes(connection: duckdb.DuckDBPyConnection, smear_id: str) -> dict[str, str]:
    """cell_uid -> the analyser's pre-classification, for agreement in the report."""
    rows = connection.execute("select cell_uid, analyser_class from cells where smear_id = ?", [smear_id]).fetchall()
    return {cell_uid: analyser_class for cell_uid, analyser_class in rows}


def smear_report_record(report: SmearReport, prediction_run_id: str) -> pd.DataFrame:
    content = report.to_dict()
    return pd.DataFrame(
        [
            {
                "smear_id": report.smear_id,
                "report_version": report.report_version,
                "model_versions": json.dumps(report.model_versions, sort_keys=True),
                "differential": json.dumps(content["differentials"]),
                "flags": json.dumps(content["flags"]),
                "flag_codes": [str(flag.code) for flag in report.flags],
                "total_cells": report.total_cells,
                "referred_cells": report.referred_cells,
                "agreement": None if content["agreement"] is None else json.dumps(content["agreement"]),
                "thresholds": json.dumps(report.thresholds, sort_keys=True),
                "markdown": report.markdown(),
                "prediction_run_id": prediction_run_id,
                "created_at": report.created_at,
            }
        ]
    )


def write_smear_report(connection: duckdb.DuckDBPyConnection, report: SmearReport, prediction_run_id: str) -> None:
    replace_rows(connection, "smear_reports", smear_report_record(report, prediction_run_id), SMEAR_REPORT_KEY)
