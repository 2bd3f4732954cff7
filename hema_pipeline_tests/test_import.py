"""The import stage through real Dagster materialisation: rows, images, Parquet, idempotence."""

from __future__ import annotations

import io

import pandas as pd
from PIL import Image

from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
from hema_pipeline.storage.warehouse import Warehouse
from hema_pipeline_tests.conftest import pipeline_env_on_both_warehouses
from hema_pipeline_tests.support import TEST_KEY, import_metadata, materialise_inbox, materialise_smear

pipeline_env = pipeline_env_on_both_warehouses()


def _table(env, sql: str) -> pd.DataFrame:
    return Warehouse(env.warehouse).query(sql)


def test_import_through_dagster_writes_cells_images_and_parquet(pipeline_env, dagster_instance):
    export = generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=3, cells_per_smear=25, seed=3))
    results = materialise_inbox(pipeline_env, dagster_instance)

    assert all(result.success for result in results)
    assert [import_metadata(result)["cells_imported"] for result in results] == [25, 25, 25]
    cells = _table(pipeline_env, "select * from cells order by smear_id, cell_id")
    assert len(cells) == 75
    assert cells["cell_uid"].is_unique
    expected_smears = {TEST_KEY.smear_id(smear.accession) for smear in export.smears}
    assert set(cells["smear_id"]) == expected_smears
    assert (cells[["width", "height"]] == [360, 363]).all().all()

    # Labels arrive unchanged, keyed by the analyser's cell number.
    for smear in export.smears:
        smear_cells = cells[cells["smear_id"] == TEST_KEY.smear_id(smear.accession)].set_index("cell_id")
        verified = smear_cells["verified_class"].dropna()
        assert all(smear.true_classes[cell_id] == label for cell_id, label in verified.items())

    # Every image is stored once under its content hash, decodes, and carries no metadata.
    for row in cells.itertuples():
        stored = (pipeline_env.lake / row.image_key).read_bytes()
        assert row.image_key.endswith(f"{row.image_sha256}.jpg")
        image = Image.open(io.BytesIO(stored))
        image.load()
        assert not image.getexif() and "comment" not in image.info and "exif" not in image.info

    # Parquet mirrors the warehouse, one file per smear.
    parquet_cells = pd.concat(
        pd.read_parquet(path) for path in sorted((pipeline_env.lake / "tables" / "cells").rglob("*.parquet"))
    )
    assert sorted(parquet_cells["cell_uid"]) == sorted(cells["cell_uid"])
    # The same column types from either warehouse backend, whatever the values: a lake reads them together.
    import pyarrow.parquet as pq

    schema = pq.read_schema(next((pipeline_env.lake / "tables" / "cells").rglob("*.parquet")))
    assert {name: str(schema.field(name).type) for name in ("cell_uid", "cell_id", "width", "verified_class", "imported_at")} == {
        "cell_uid": "string",
        "cell_id": "int32",
        "width": "int32",
        "verified_class": "string",
        "imported_at": "timestamp[us]",
    }

    runs = _table(pipeline_env, "select * from import_runs")
    assert len(runs) == 3 and set(runs["status"]) == {"imported"}
    assert (runs["cells_imported"] == 25).all() and (runs["files_seen"] == 26).all()
    smears = _table(pipeline_env, "select * from smears")
    assert sorted(smears["cell_count"]) == [25, 25, 25]
    assert smears["age_band"].str.fullmatch(r"\d\d-\d\d|90\+").all()


def test_reimport_adds_nothing_and_reports_skipped(pipeline_env, dagster_instance):
    generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=2, cells_per_smear=20, seed=4))
    materialise_inbox(pipeline_env, dagster_instance)
    before = _table(pipeline_env, "select * from cells order by cell_uid")

    again = materialise_inbox(pipeline_env, dagster_instance)

    metadata = [import_metadata(result) for result in again]
    assert [item["status"] for item in metadata] == ["already_present", "already_present"]
    assert [item["cells_skipped_existing"] for item in metadata] == [20, 20]
    assert [item["cells_imported"] for item in metadata] == [0, 0]
    after = _table(pipeline_env, "select * from cells order by cell_uid")
    pd.testing.assert_frame_equal(before, after)
    assert len(_table(pipeline_env, "select * from import_runs")) == 4


def test_verified_label_added_later_updates_the_row_without_duplicating(pipeline_env, dagster_instance):
    import json

    export = generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=1, cells_per_smear=10, seed=5, verified_share=0.0))
    smear = export.smears[0]
    materialise_smear(pipeline_env, dagster_instance, smear.folder.name)
    assert _table(pipeline_env, "select count(verified_class) as n from cells").n[0] == 0

    metadata_path = smear.folder / "smear.json"
    document = json.loads(metadata_path.read_text())
    document["cells"][0]["verified_class"] = smear.true_classes[document["cells"][0]["cell_id"]]
    metadata_path.write_text(json.dumps(document))
    result = materialise_smear(pipeline_env, dagster_instance, smear.folder.name)

    assert import_metadata(result)["cells_imported"] == 1
    assert import_metadata(result)["cells_skipped_existing"] == 9
    cells = _table(pipeline_env, "select * from cells")
    assert len(cells) == 10 and cells["verified_class"].notna().sum() == 1


def test_crash_half_way_leaves_no_rows_and_rerun_completes(pipeline_env, dagster_instance, monkeypatch):
    from hema_pipeline.storage.object_store import LocalObjectStore

    export = generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=1, cells_per_smear=30, seed=6))
    folder = export.smears[0].folder.name
    real_put = LocalObjectStore.put_bytes
    calls = {"images": 0}

    def failing_put(self, key, data):
        if key.startswith("images/"):
            calls["images"] += 1
            if calls["images"] > 12:
                raise OSError("disk full (simulated crash)")
        return real_put(self, key, data)

    monkeypatch.setattr(LocalObjectStore, "put_bytes", failing_put)
    crashed = materialise_smear(pipeline_env, dagster_instance, folder, raise_on_error=False)
    assert not crashed.success
    assert _table(pipeline_env, "select count(*) as n from cells").n[0] == 0
    assert _table(pipeline_env, "select count(*) as n from import_runs").n[0] == 0

    monkeypatch.setattr(LocalObjectStore, "put_bytes", real_put)
    rerun = materialise_smear(pipeline_env, dagster_instance, folder)
    assert rerun.success
    cells = _table(pipeline_env, "select * from cells")
    assert len(cells) == 30 and cells["cell_uid"].is_unique
    stored = list((pipeline_env.lake / "images").rglob("*.jpg"))
    assert len(stored) == cells["image_sha256"].nunique()


def test_partition_without_inbox_folder_fails_clearly(pipeline_env, dagster_instance):
    import dagster as dg

    from hema_pipeline.defs.ingest import imported_smear, smear_partitions

    dagster_instance.add_dynamic_partitions(smear_partitions.name, ["Sdeadbeef"])
    result = dg.materialize(
        [imported_smear],
        partition_key="Sdeadbeef",
        resources=pipeline_env.resources(),
        instance=dagster_instance,
        raise_on_error=False,
    )
    assert not result.success
    failure = result.get_step_failure_events()[0]
    assert "no folder in the inbox" in failure.step_failure_data.error.message
