"""Settings read from the environment, with the embedded defaults a new user needs no setup for.

Every path can be a local folder or an ``s3://bucket/prefix`` URL. See docs/settings.md for the list.
"""

from __future__ import annotations

import os
from pathlib import Path


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def _env_flag(name: str) -> bool:
    return _env(name, "0").lower() in ("1", "true", "yes")


def hema_home() -> Path:
    return Path(_env("HEMA_HOME", ".hema")).resolve()


def inbox_url() -> str:
    return _env("HEMA_INBOX", str(hema_home() / "inbox"))


def inbox_archive_url() -> str:
    """Empty (the embedded default): the inbox is read-only and keeps every export."""
    return _env("HEMA_INBOX_ARCHIVE", "")


def lake_url() -> str:
    return _env("HEMA_LAKE", str(hema_home() / "lake"))


def quarantine_url() -> str:
    return _env("HEMA_QUARANTINE", str(hema_home() / "quarantine"))


def warehouse_path() -> str:
    return _env("HEMA_WAREHOUSE", str(hema_home() / "warehouse.duckdb"))


def s3_endpoint_url() -> str:
    return _env("HEMA_S3_ENDPOINT_URL", "")


def demo_mode() -> bool:
    return _env_flag("HEMA_DEMO")


def pseudonym_key_file() -> str:
    return _env("HEMA_PSEUDONYM_KEY_FILE", str(hema_home() / "pseudonym.key") if demo_mode() else "")


def inbox_settle_seconds() -> float:
    return float(_env("HEMA_INBOX_SETTLE_SECONDS", "300"))


def shared_data_dir() -> Path:
    return Path(_env("HEMA_SHARED_DATA", "../shared/data")).resolve()


def cell_side_range() -> tuple[int, int]:
    """Accepted width and height of a cell image, in pixels: CellaVision DM96 crops are 360x363 (a few
    366x369 / 360x360). Cells outside are quarantined at import (``unexpected_dimensions``)."""
    return int(_env("HEMA_CELL_MIN_SIDE_PX", "300")), int(_env("HEMA_CELL_MAX_SIDE_PX", "400"))


def max_cell_file_bytes() -> int:
    """Larger inbox files are quarantined without being read (and left in the inbox)."""
    return int(_env("HEMA_MAX_CELL_FILE_BYTES", str(32 * 1024 * 1024)))


def partition_retention_days() -> float:
    """How long a settled smear keeps its Dagster partition (0: for ever). 14 days of 5,000 smears is
    70,000 live partitions, under Dagster's advice of about 100,000 per asset."""
    return float(_env("HEMA_PARTITION_RETENTION_DAYS", "14"))


def partition_retention_interval_seconds() -> int:
    return int(_env("HEMA_PARTITION_RETENTION_INTERVAL_SECONDS", "3600"))


def prediction_batch_smears() -> int:
    """Most smears one prediction run takes when many are requested at once (a backfill)."""
    return int(_env("HEMA_PREDICTION_BATCH_SMEARS", "50"))


def import_max_runtime_seconds() -> int:
    """An import run still STARTED after this (its code server died with it) is failed by run monitoring
    and its writer slot freed; the instance-wide limit in dagster.yaml is sized for training."""
    return int(_env("HEMA_IMPORT_MAX_RUNTIME_SECONDS", "1800"))


def nightly_import_cron() -> str:
    return _env("HEMA_NIGHTLY_IMPORT_CRON", "30 2 * * *")


def schedule_timezone() -> str:
    return _env("HEMA_TIMEZONE", "Europe/Madrid")


def inbox_sensor_interval_seconds() -> int:
    return int(_env("HEMA_INBOX_SENSOR_INTERVAL_SECONDS", "30"))


def prediction_sensor_interval_seconds() -> int:
    return int(_env("HEMA_PREDICTION_SENSOR_INTERVAL_SECONDS", "30"))


def failure_sensor_interval_seconds() -> int:
    return int(_env("HEMA_FAILURE_SENSOR_INTERVAL_SECONDS", "30"))


def retraining_sensor_interval_seconds() -> int:
    return int(_env("HEMA_RETRAIN_SENSOR_INTERVAL_SECONDS", "600"))


# Unset (None): the domain default (``monitoring.retraining.RetrainingPolicy``), written there only.
def retrain_min_new_verified_cells() -> int | None:
    value = _env("HEMA_RETRAIN_MIN_NEW_VERIFIED_CELLS", "")
    return int(value) if value else None


def retrain_max_referred_share() -> float | None:
    value = _env("HEMA_RETRAIN_MAX_REFERRED_SHARE", "")
    return float(value) if value else None


def retrain_min_predictions_for_drift() -> int | None:
    value = _env("HEMA_RETRAIN_MIN_PREDICTIONS_FOR_DRIFT", "")
    return int(value) if value else None


def retrain_tasks_without_champion() -> bool:
    return _env_flag("HEMA_RETRAIN_TASKS_WITHOUT_CHAMPION")


def max_image_pixels() -> int:
    """The most pixels (width x height) an image may declare before anything decodes it: larger cell
    images are quarantined as ``image_too_large`` and ``hema classify`` skips them. A CellaVision cell
    is 360 x 363 = 130,680 pixels."""
    value = int(_env("HEMA_MAX_IMAGE_PIXELS", "4000000"))
    if value < 1:
        raise ValueError("HEMA_MAX_IMAGE_PIXELS must be a positive number of pixels")
    return value
