"""Dataset versions and manifests.

A dataset version is the SHA-256 of the dataset's rows (cell, patient pseudonym, image content hash, task
label, split) and of its configuration (task, split fractions and seed, image size, augmentation,
sampling). Rows are hashed in ``cell_uid`` order, so the version is stable across re-runs and row order and
changes when any row, label, image or setting changes. A model records the version it was trained on, and
the manifest says exactly which images with which labels in which split that was.

The manifest is written twice, idempotently: as Parquet in the lake (the file a training job or an
auditor reads) and as rows of ``dataset_manifests`` / ``dataset_versions`` in the warehouse (for queries).
Writing a version that already exists rewrites identical rows and keeps its first ``created_at``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any, Final

import pandas as pd

from hema_pipeline.datasets.augmentation import AugmentationConfig
from hema_pipeline.datasets.input_pipeline import DEFAULT_IMAGE_SIZE
from hema_pipeline.datasets.near_duplicates import DEFAULT_MAX_DISTANCE as NEAR_DUPLICATE_MAX_DISTANCE
from hema_pipeline.datasets.splits import SPLIT_COLUMN, PatientSplit, SplitFractions, split_by_patient
from hema_pipeline.datasets.tasks import (
    DEFAULT_MIN_CELLS_PER_CLASS,
    DEFAULT_MIN_PATIENTS_PER_CLASS,
    PATIENT_COLUMN,
    TASK_LABEL_COLUMN,
    TASK_LABEL_INDEX_COLUMN,
    TASKS,
    TaskCoverage,
    TaskDataError,
    get_task,
    require_trainable,
    task_coverage,
)
from hema_pipeline.storage.object_store import ObjectStore
from hema_pipeline.storage.warehouse import Warehouse, replace_rows

# Bump when what goes into the hash changes, so an old and a new scheme never produce the same version.
VERSION_SCHEME: Final = "hema-dataset-v1"
HASHED_COLUMNS: Final[tuple[str, ...]] = ("cell_uid", "patient_id", "image_sha256", TASK_LABEL_COLUMN, SPLIT_COLUMN)
MANIFEST_COLUMNS: Final[tuple[str, ...]] = (
    "dataset_version",
    "task",
    "cell_uid",
    "patient_id",
    "image_sha256",
    "image_key",
    TASK_LABEL_COLUMN,
    TASK_LABEL_INDEX_COLUMN,
    SPLIT_COLUMN,
)
_FIELD_SEPARATOR: Final = "\x1f"
# Centred share of each image's shortest side the networks see (CellaVision centres the cell): at 0.75 the
# cell is seen at the resolution of a 4/3 larger whole image, for the compute of image_size.
DEFAULT_CROP_FRACTION: Final = 0.75  # ASCII unit separator: cannot occur in pseudonyms, hashes or labels


@dataclass(frozen=True)
class DatasetConfig:
    task: str
    fractions: SplitFractions = field(default_factory=SplitFractions)
    seed: int = 0
    image_size: int = DEFAULT_IMAGE_SIZE
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    balance_classes: bool = True
    # Centred share of each image's shortest side that is kept before resizing to image_size
    # (input_pipeline.decode_and_resize); 1.0 keeps the whole image.
    crop_fraction: float = DEFAULT_CROP_FRACTION

    def __post_init__(self) -> None:
        get_task(self.task)  # unknown task names fail here, not halfway through a build
        if self.image_size < 8:
            raise ValueError(f"image_size {self.image_size} is too small to show a cell")
        if not 0.2 <= self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in [0.2, 1], got {self.crop_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "fractions": self.fractions.as_dict(),
            "seed": self.seed,
            "image_size": self.image_size,
            "augmentation": self.augmentation.to_dict(),
            "balance_classes": self.balance_classes,
            "crop_fraction": self.crop_fraction,
        }

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): equal configs give equal bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> DatasetConfig:
        values = json.loads(text)
        return cls(
            task=values["task"],
            fractions=SplitFractions(**values["fractions"]),
            seed=int(values["seed"]),
            image_size=int(values["image_size"]),
            augmentation=AugmentationConfig.from_dict(values["augmentation"]),
            balance_classes=bool(values["balance_classes"]),
            # absent from versions written before cropping existed, which kept the whole image
            crop_fraction=float(values.get("crop_fraction", 1.0)),
        )


def dataset_version(rows: pd.DataFrame, config: DatasetConfig) -> str:
    """``<task>-<16 hex>``: SHA-256 over the scheme, the canonical config and the rows' ``HASHED_COLUMNS``
    sorted by ``cell_uid``. Raises ``ValueError`` for missing columns, missing values or repeated cells."""
    missing = [column for column in HASHED_COLUMNS if column not in rows.columns]
    if missing:
        raise ValueError(f"rows lack columns {missing}")
    hashed = rows[list(HASHED_COLUMNS)]
    if hashed.isna().any().any():
        raise ValueError("rows have missing values in the hashed columns")
    if hashed["cell_uid"].duplicated().any():
        raise ValueError("a cell appears more than once")
    ordered = hashed.astype(str).sort_values("cell_uid", kind="stable")
    first, *others = HASHED_COLUMNS
    lines = ordered[first].str.cat([ordered[column] for column in others], sep=_FIELD_SEPARATOR)
    digest = hashlib.sha256()
    digest.update(f"{VERSION_SCHEME}\n{config.to_json()}\n".encode())
    digest.update(("\n".join(lines) + "\n").encode())
    return f"{config.task}-{digest.hexdigest()[:16]}"


@dataclass(frozen=True)
class BuiltDataset:
    dataset_version: str
    config: DatasetConfig
    manifest: pd.DataFrame  # MANIFEST_COLUMNS, one row per cell, in cell_uid order
    split: PatientSplit
    coverage: TaskCoverage

    def split_counts(self) -> dict[str, dict[str, int]]:
        return self.split.report()


@dataclass(frozen=True)
class DatasetBuildSettings:
    """How a task's dataset is built, as an operator sets it (the ``<task>_dataset`` asset's config is
    derived from these fields and defaults; benchmarks build with them too)."""

    seed: int = 0
    # None: the task's own (``Task.image_size``: 128 px for the typing tasks, whose pretrained network was
    # measured there; 96 px for the from-scratch specialists). Part of the dataset version.
    image_size: int | None = None
    crop_fraction: float = DEFAULT_CROP_FRACTION
    train_fraction: float = SplitFractions.train
    validation_fraction: float = SplitFractions.validation
    calibration_fraction: float = SplitFractions.calibration
    test_fraction: float = SplitFractions.test
    min_cells_per_class: int = DEFAULT_MIN_CELLS_PER_CLASS
    min_patients_per_class: int = DEFAULT_MIN_PATIENTS_PER_CLASS
    balance_classes: bool = True
    # Before splitting, one image of each confirmed near-duplicate pair across patients is dropped, so the
    # blocking leakage check after the split guards rather than routinely stops (PBC holds such a pair).
    near_duplicate_max_distance: int = NEAR_DUPLICATE_MAX_DISTANCE

    def dataset_config(self, task: str) -> DatasetConfig:
        return DatasetConfig(
            task=task,
            fractions=SplitFractions(
                self.train_fraction, self.validation_fraction, self.calibration_fraction, self.test_fraction
            ),
            seed=self.seed,
            image_size=get_task(task).image_size if self.image_size is None else self.image_size,
            augmentation=AugmentationConfig(),
            balance_classes=self.balance_classes,
            crop_fraction=self.crop_fraction,
        )


def build_dataset(
    cells: pd.DataFrame,
    config: DatasetConfig,
    min_cells_per_class: int = DEFAULT_MIN_CELLS_PER_CLASS,
    min_patients_per_class: int = DEFAULT_MIN_PATIENTS_PER_CLASS,
) -> BuiltDataset:
    """Select the task's verified cells, check every class has enough data (``TaskDataError`` naming the
    classes otherwise), split by patient, and version the result. ``cells`` are rows of the ``cells`` table
    (``cell_uid, patient_id, image_sha256, image_key, verified_class``)."""
    task = get_task(config.task)
    coverage = task_coverage(task, cells, min_cells_per_class, min_patients_per_class)
    require_trainable(coverage)
    rows = task.select_rows(cells)
    open_splits = sum(1 for fraction in config.fractions.as_tuple() if fraction > 0)
    patients = int(rows[PATIENT_COLUMN].nunique())
    if patients < open_splits:
        raise TaskDataError(
            coverage,
            f"{task.name}: not enough data ({patients} patients cannot fill {open_splits} splits; "
            "a patient's cells never straddle splits)",
        )
    split = split_by_patient(rows, fractions=config.fractions, seed=config.seed, class_order=task.classes)
    rows = rows.assign(**{SPLIT_COLUMN: split.assignments})
    version = dataset_version(rows, config)
    manifest = (
        rows.assign(dataset_version=version, task=task.name)
        .loc[:, list(MANIFEST_COLUMNS)]
        .sort_values("cell_uid", kind="stable")
        .reset_index(drop=True)
    )
    manifest[TASK_LABEL_INDEX_COLUMN] = manifest[TASK_LABEL_INDEX_COLUMN].astype("int32")
    return BuiltDataset(dataset_version=version, config=config, manifest=manifest, split=split, coverage=coverage)


def manifest_key(task: str, version: str) -> str:
    return f"datasets/{task}/{version}/manifest.parquet"


@dataclass(frozen=True)
class DatasetRecord:
    dataset_version: str
    task: str
    config_json: str
    cell_count: int
    patient_count: int
    split_counts: dict[str, dict[str, int]]
    manifest_key: str
    created_at: dt.datetime


@dataclass(frozen=True)
class DatasetHandle:
    """What the dataset stage hands the model stage: the version and where its manifest is (small; stored
    as JSON by the handle IO manager)."""

    dataset_version: str
    task: str
    classes: tuple[str, ...]
    manifest_key: str
    config_json: str

    @classmethod
    def of(cls, record: DatasetRecord) -> DatasetHandle:
        return cls(
            dataset_version=record.dataset_version,
            task=record.task,
            classes=TASKS[record.task].classes,
            manifest_key=record.manifest_key,
            config_json=record.config_json,
        )

    @property
    def config(self) -> DatasetConfig:
        return DatasetConfig.from_json(self.config_json)

    def manifest(self, lake: ObjectStore) -> pd.DataFrame:
        return read_manifest_parquet(lake, self.task, self.dataset_version)


def write_dataset(
    dataset: BuiltDataset, store: ObjectStore, warehouse: Warehouse, now: dt.datetime | None = None
) -> DatasetRecord:
    """Write the manifest to ``store`` (Parquet) and the warehouse, idempotently; see the module docstring."""
    manifest = dataset.manifest
    key = manifest_key(dataset.config.task, dataset.dataset_version)
    buffer = io.BytesIO()
    manifest.to_parquet(buffer, index=False)
    # The lake copy first: a warehouse row must never point at a manifest file that does not exist.
    store.put_bytes(key, buffer.getvalue())

    split_counts = dataset.split_counts()
    with warehouse.transaction(serialise_on=f"dataset:{dataset.dataset_version}") as connection:
        # fetchall: DuckDB refuses other work on a connection while a result is only partly read.
        previous = connection.execute(
            "select created_at from dataset_versions where dataset_version = ?", [dataset.dataset_version]
        ).fetchall()
        created_at = previous[0][0] if previous else (now or dt.datetime.now(dt.UTC).replace(tzinfo=None))
        record = DatasetRecord(
            dataset_version=dataset.dataset_version,
            task=dataset.config.task,
            config_json=dataset.config.to_json(),
            cell_count=len(manifest),
            patient_count=int(manifest["patient_id"].nunique()),
            split_counts=split_counts,
            manifest_key=key,
            created_at=created_at,
        )
        version_row = pd.DataFrame(
            [
                {
                    "dataset_version": record.dataset_version,
                    "task": record.task,
                    "config_json": record.config_json,
                    "cell_count": record.cell_count,
                    "patient_count": record.patient_count,
                    "split_counts_json": json.dumps(split_counts, sort_keys=True),
                    "manifest_key": record.manifest_key,
                    "created_at": record.created_at,
                }
            ]
        )
        replace_rows(connection, "dataset_manifests", manifest, ["dataset_version", "cell_uid"])
        replace_rows(connection, "dataset_versions", version_row, ["dataset_version"])
    return record


def read_manifest(warehouse: Warehouse, version: str) -> pd.DataFrame:
    """The manifest of one dataset version from the warehouse, in cell_uid order (empty if unknown)."""
    columns = ", ".join(MANIFEST_COLUMNS)
    return warehouse.query(f"select {columns} from dataset_manifests where dataset_version = ? order by cell_uid", [version])


def read_manifest_parquet(store: ObjectStore, task: str, version: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(store.get_bytes(manifest_key(task, version))))
