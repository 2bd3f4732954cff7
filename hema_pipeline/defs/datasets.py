"""Dataset stage: per clinical task, a versioned, patient-grouped split of the validated cell table, with
blocking checks that no patient and no near-duplicate image straddles two splits."""

# No `from __future__ import annotations`: Dagster reads the context and input annotations at definition time.

import dagster as dg

from hema_pipeline.datasets.near_duplicates import (
    DEFAULT_MAX_DISTANCE,
    cells_to_drop_for_near_duplicates,
    cross_split_near_duplicates_in_manifest,
    near_duplicates_across_patients,
)
from hema_pipeline.datasets.splits import SPLIT_NAMES
from hema_pipeline.datasets.tasks import (
    TASKS,
    TaskDataError,
)
from hema_pipeline.datasets.versioning import (
    DatasetBuildSettings,
    DatasetHandle,
    build_dataset,
    write_dataset,
)
from hema_pipeline.defs.ingest import DUCKDB_WRITER_POOL
from hema_pipeline.defs.quality import CellSnapshot
from hema_pipeline.defs.resources import StorageResource, WarehouseResource

_BUILD_DEFAULTS = DatasetBuildSettings()


class DatasetBuildConfig(dg.Config):
    """The launchpad face of ``datasets.versioning.DatasetBuildSettings``: the same fields with the same
    defaults (a test holds them together)."""

    seed: int = _BUILD_DEFAULTS.seed
    image_size: int | None = _BUILD_DEFAULTS.image_size
    crop_fraction: float = _BUILD_DEFAULTS.crop_fraction
    train_fraction: float = _BUILD_DEFAULTS.train_fraction
    validation_fraction: float = _BUILD_DEFAULTS.validation_fraction
    calibration_fraction: float = _BUILD_DEFAULTS.calibration_fraction
    test_fraction: float = _BUILD_DEFAULTS.test_fraction
    min_cells_per_class: int = _BUILD_DEFAULTS.min_cells_per_class
    min_patients_per_class: int = _BUILD_DEFAULTS.min_patients_per_class
    balance_classes: bool = _BUILD_DEFAULTS.balance_classes
    near_duplicate_max_distance: int = _BUILD_DEFAULTS.near_duplicate_max_distance

    def build_settings(self) -> DatasetBuildSettings:
        return DatasetBuildSettings(**self.model_dump())


def dataset_asset_key(task: str) -> dg.AssetKey:
    return dg.AssetKey(f"{task}_dataset")


def _split_counts_markdown(split_counts: dict[str, dict[str, int]], classes: tuple[str, ...]) -> str:
    lines = ["| class | " + " | ".join(SPLIT_NAMES) + " |", "|---|" + "---:|" * len(SPLIT_NAMES)]
    for name in classes:
        lines.append(f"| {name} | " + " | ".join(str(split_counts.get(split, {}).get(name, 0)) for split in SPLIT_NAMES) + " |")
    return "\n".join(lines)


def build_dataset_asset(task_name: str) -> dg.AssetsDefinition:
    task = TASKS[task_name]

    @dg.asset(
        name=f"{task_name}_dataset",
        group_name="datasets",
        kinds={"duckdb", "parquet"},
        owners=["team:ml"],
        tags={"task": task_name},
        pool=DUCKDB_WRITER_POOL,
        output_required=False,
        description=(
            f"Dataset for task `{task_name}` ({task.description}): technologist-verified cells mapped to "
            f"{', '.join(task.classes)}; train/validation/calibration/test split stratified by class and "
            "grouped by patient pseudonym; version = hash of rows + configuration; manifest in Parquet and "
            "the `dataset_manifests` table. A task lacking data for a class is reported and yields nothing, "
            "so no model is trained for it."
        ),
    )
    def dataset_asset(
        context: dg.AssetExecutionContext,
        config: DatasetBuildConfig,
        cell_table: CellSnapshot,
        storage: StorageResource,
        warehouse: WarehouseResource,
    ):
        lake = storage.lake()
        dataset_config = config.build_settings().dataset_config(task_name)
        cells = cell_table.load(lake)
        candidates = task.select_rows(cells)
        with warehouse.warehouse().connect() as connection:
            duplicate_pairs = near_duplicates_across_patients(connection, lake, candidates, config.near_duplicate_max_distance)
        dropped = cells_to_drop_for_near_duplicates(duplicate_pairs)
        if dropped:
            context.log.warning(f"{task_name}: dropped {len(dropped)} near-duplicate image(s) shared across patients")
        try:
            built = build_dataset(
                cells[~cells["cell_uid"].isin(dropped)],
                dataset_config,
                config.min_cells_per_class,
                config.min_patients_per_class,
            )
        except TaskDataError as error:
            context.log.warning(f"no dataset (and so no model) for {task_name}: {error}")
            context.log_event(
                dg.AssetObservation(
                    asset_key=context.asset_key,
                    metadata={"status": "insufficient data", "reason": str(error)},
                )
            )
            return
        record = write_dataset(built, lake, warehouse.warehouse())
        yield dg.Output(
            DatasetHandle.of(record),
            metadata={
                "dataset_version": record.dataset_version,
                "cell_table_version": cell_table.version,
                "dagster/row_count": record.cell_count,
                "patients": record.patient_count,
                "near_duplicates_dropped": len(dropped),
                "class_counts_per_split": dg.MetadataValue.md(_split_counts_markdown(record.split_counts, task.classes)),
                "split_counts": dg.MetadataValue.json(record.split_counts),
                "config": dg.MetadataValue.json(built.config.to_dict()),
                "manifest": dg.MetadataValue.path(lake.uri(record.manifest_key)),
            },
            data_version=dg.DataVersion(record.dataset_version),
        )

    return dataset_asset


class NearDuplicateCheckConfig(dg.Config):
    max_hamming_distance: int = DEFAULT_MAX_DISTANCE


def build_dataset_checks(task_name: str) -> dg.AssetChecksDefinition:
    key = dataset_asset_key(task_name)

    @dg.multi_asset_check(
        name=f"{task_name}_dataset_leakage_checks",
        specs=[
            dg.AssetCheckSpec(
                "no_patient_in_two_splits",
                asset=key,
                blocking=True,
                description="Every patient pseudonym's cells lie in exactly one split.",
            ),
            dg.AssetCheckSpec(
                "no_near_duplicates_across_splits",
                asset=key,
                blocking=True,
                description=(
                    "No two images in different splits have perceptual hashes within the Hamming-distance "
                    "threshold (pHash, 64 bit, confirmed by dHash): a re-encoded or resized copy of a test cell "
                    "must not sit in training."
                ),
            ),
        ],
        ins={"dataset": dg.AssetIn(key=key)},
        # Perceptual hashes are cached in the warehouse, so these checks write it.
        pool=DUCKDB_WRITER_POOL,
    )
    def leakage_checks(
        config: NearDuplicateCheckConfig, dataset: DatasetHandle, storage: StorageResource, warehouse: WarehouseResource
    ):
        lake = storage.lake()
        manifest = dataset.manifest(lake)
        splits_per_patient = manifest.groupby("patient_id")["split"].nunique()
        straddling = splits_per_patient[splits_per_patient > 1]
        yield dg.AssetCheckResult(
            asset_key=key,
            check_name="no_patient_in_two_splits",
            passed=straddling.empty,
            metadata={"patients": len(splits_per_patient), "patients_in_several_splits": len(straddling)},
        )
        with warehouse.warehouse().connect() as connection:
            pairs = cross_split_near_duplicates_in_manifest(connection, lake, manifest, config.max_hamming_distance)
        yield dg.AssetCheckResult(
            asset_key=key,
            check_name="no_near_duplicates_across_splits",
            passed=pairs.empty,
            metadata={
                "images": len(manifest),
                "near_duplicate_pairs": len(pairs),
                "max_hamming_distance": config.max_hamming_distance,
                "examples": dg.MetadataValue.md(
                    f"```\n{pairs.head(10).to_string(index=False)}\n```" if not pairs.empty else "none"
                ),
            },
        )

    return leakage_checks


dataset_assets = [build_dataset_asset(name) for name in TASKS]
dataset_checks = [build_dataset_checks(name) for name in TASKS]
