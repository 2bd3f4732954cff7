"""Quality stage: a versioned snapshot of the imported cell table, validated by blocking Great
Expectations checks (one Dagster asset check per check group) before any dataset is built from it."""

# No `from __future__ import annotations`: Dagster reads the context and input annotations at definition time.
import hashlib
import io
from dataclasses import dataclass

import dagster as dg
import pandas as pd

from hema_pipeline.defs.ingest import imported_smear
from hema_pipeline.defs.resources import StorageResource, WarehouseResource
from hema_pipeline.quality.cell_suite import CHECK_GROUPS, CLASS_MINIMUMS, CellTableRules, validate_cell_table
from hema_pipeline.storage.object_store import ObjectStore


@dataclass(frozen=True)
class CellSnapshot:
    """What ``cell_table`` hands downstream: where its rows are, not the rows themselves."""

    version: str
    parquet_key: str
    rows: int

    def load(self, lake: ObjectStore) -> pd.DataFrame:
        return pd.read_parquet(io.BytesIO(lake.get_bytes(self.parquet_key)))


def snapshot_version(cells: pd.DataFrame) -> str:
    digest = hashlib.sha256(pd.util.hash_pandas_object(cells.sort_values("cell_uid"), index=False).values.tobytes())
    return digest.hexdigest()[:16]


@dg.asset(
    deps=[imported_smear],
    group_name="quality",
    kinds={"duckdb", "parquet"},
    owners=["team:lab-informatics"],
    description=(
        "Every imported cell at one moment: a Parquet snapshot of the `cells` table, versioned by the "
        "content of its rows. The blocking checks below validate it before any dataset is built."
    ),
)
def cell_table(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, storage: StorageResource
) -> dg.Output[CellSnapshot]:
    cells = warehouse.warehouse().query("select * from cells order by cell_uid")
    version = snapshot_version(cells)
    key = f"tables/cell_snapshots/{version}.parquet"
    lake = storage.lake()
    if not lake.exists(key):
        buffer = io.BytesIO()
        cells.to_parquet(buffer, index=False)
        lake.put_bytes(key, buffer.getvalue())
    verified = cells["verified_class"].value_counts().sort_index()
    return dg.Output(
        CellSnapshot(version=version, parquet_key=key, rows=len(cells)),
        metadata={
            "dagster/row_count": len(cells),
            "snapshot_version": version,
            "verified_cells": int(cells["verified_class"].notna().sum()),
            "smears": int(cells["smear_id"].nunique()),
            "patients": int(cells["patient_id"].nunique()),
            "verified_class_counts": dg.MetadataValue.json({str(k): int(v) for k, v in verified.items()}),
            "parquet": dg.MetadataValue.path(lake.uri(key)),
        },
        data_version=dg.DataVersion(version),
    )


_RULE_DEFAULTS = CellTableRules()


class CellTableCheckConfig(dg.Config):
    """The launchpad face of ``quality.cell_suite.CellTableRules`` (its ranges as min/max fields), with its
    defaults: the import's accepted side range, so the dimension check guards that invariant; narrowing
    it here makes it a stricter gate."""

    min_width: int = _RULE_DEFAULTS.width_range[0]
    max_width: int = _RULE_DEFAULTS.width_range[1]
    min_height: int = _RULE_DEFAULTS.height_range[0]
    max_height: int = _RULE_DEFAULTS.height_range[1]
    min_verified_per_class: int = _RULE_DEFAULTS.min_verified_per_class

    def rules(self) -> CellTableRules:
        return CellTableRules(
            width_range=(self.min_width, self.max_width),
            height_range=(self.min_height, self.max_height),
            min_verified_per_class=self.min_verified_per_class,
        )


def _cell_table_check(group: str, description: str) -> dg.AssetChecksDefinition:
    # Too few cells for some task's class must not stop the tasks that have enough: that gate is per task
    # (each dataset asset's coverage). Here it is a warning; every other group blocks.
    blocking = group != CLASS_MINIMUMS
    severity = dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN

    @dg.asset_check(
        asset=cell_table,
        name=group,
        blocking=blocking,
        description=f"Great Expectations: {description}" + ("" if blocking else " (warning only)"),
    )
    def check(config: CellTableCheckConfig, cell_table: CellSnapshot, storage: StorageResource) -> dg.AssetCheckResult:
        result = validate_cell_table(cell_table.load(storage.lake()), config.rules(), groups=[group])[group]
        return dg.AssetCheckResult(
            passed=result.success,
            severity=severity,
            description=result.summary(),
            metadata={
                "expectations": dg.MetadataValue.md(result.markdown_table()),
                "failed_expectations": len(result.failures),
                "unexpected_rows": sum(int(item.unexpected_count or 0) for item in result.failures),
                "snapshot_version": cell_table.version,
            },
        )

    return check


cell_table_checks = [_cell_table_check(group, description) for group, description in CHECK_GROUPS.items()]
