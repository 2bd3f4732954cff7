"""Bad input is quarantined with its reason and its file kept; the rest of the smear goes on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
from hema_pipeline_tests.support import TEST_KEY, import_metadata, materialise_smear

CELLS = 12


def _quarantine(env) -> pd.DataFrame:
    with duckdb.connect(str(env.warehouse), read_only=True) as connection:
        return connection.execute("select * from quarantine order by cell_id nulls first, reason_code").df()


def _count(env, table: str) -> int:
    with duckdb.connect(str(env.warehouse), read_only=True) as connection:
        return int(connection.execute(f"select count(*) from {table}").fetchone()[0])


@pytest.fixture
def smear(pipeline_env):
    export = generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=1, cells_per_smear=CELLS, seed=11))
    folder = export.smears[0].folder
    document = json.loads((folder / "smear.json").read_text())
    return folder, document


def _image(folder: Path, document: dict, index: int) -> Path:
    return folder / document["cells"][index]["image"]


def _assert_kept(env, row, original: bytes) -> None:
    assert (env.quarantine / row.kept_key).read_bytes() == original


def test_bad_cells_are_quarantined_and_the_rest_imported(pipeline_env, dagster_instance, smear):
    folder, document = smear
    truncated = _image(folder, document, 0)
    truncated.write_bytes(truncated.read_bytes()[:1500])
    not_an_image = _image(folder, document, 1)
    not_an_image.write_bytes(b"this is a text file renamed to .jpg\n")
    _image(folder, document, 2).unlink()
    document["cells"][3]["analyser_class"] = "smudge cell"
    (folder / "smear.json").write_text(json.dumps(document))
    (folder / "notes.txt").write_text("left here by someone")
    originals = {
        0: truncated.read_bytes(),
        1: not_an_image.read_bytes(),
        3: _image(folder, document, 3).read_bytes(),
    }
    cell_ids = [cell["cell_id"] for cell in document["cells"]]

    result = materialise_smear(pipeline_env, dagster_instance, folder.name)

    assert result.success
    metadata = import_metadata(result)
    assert metadata["status"] == "partially_quarantined"
    assert metadata["cells_imported"] == CELLS - 4 and metadata["cells_quarantined"] == 4
    quarantine = _quarantine(pipeline_env)
    by_cell = {int(row.cell_id): row for row in quarantine.itertuples() if not pd.isna(row.cell_id)}
    assert by_cell[cell_ids[0]].reason_code == "corrupt_image"
    assert by_cell[cell_ids[1]].reason_code == "not_an_image"
    assert by_cell[cell_ids[2]].reason_code == "missing_image" and pd.isna(by_cell[cell_ids[2]].kept_key)
    assert by_cell[cell_ids[3]].reason_code == "unknown_class"
    assert "analyser_class" in by_cell[cell_ids[3]].reason and "smudge" not in by_cell[cell_ids[3]].reason
    for index in (0, 1, 3):
        _assert_kept(pipeline_env, by_cell[cell_ids[index]], originals[index])
    [unlisted] = [row for row in quarantine.itertuples() if row.reason_code == "unlisted_file"]
    _assert_kept(pipeline_env, unlisted, b"left here by someone")
    assert set(quarantine["smear_id"]) == {TEST_KEY.smear_id(folder.name)}
    assert _count(pipeline_env, "cells") == CELLS - 4

    # A re-run adds neither cells nor quarantine rows.
    again = materialise_smear(pipeline_env, dagster_instance, folder.name)
    assert import_metadata(again)["cells_skipped_existing"] == CELLS - 4
    assert _count(pipeline_env, "cells") == CELLS - 4
    assert len(_quarantine(pipeline_env)) == len(quarantine)


def test_fixed_cell_resolves_its_quarantine_row(pipeline_env, dagster_instance, smear):
    folder, document = smear
    image = _image(folder, document, 0)
    good = image.read_bytes()
    image.write_bytes(good[:1000])
    materialise_smear(pipeline_env, dagster_instance, folder.name)
    assert _count(pipeline_env, "open_quarantine") == 1

    image.write_bytes(good)
    materialise_smear(pipeline_env, dagster_instance, folder.name)

    assert _count(pipeline_env, "open_quarantine") == 0
    assert _count(pipeline_env, "quarantine") == 1
    assert _count(pipeline_env, "cells") == CELLS


@pytest.mark.parametrize(
    ("damage", "reason_code"),
    [
        ("delete_metadata", "missing_metadata"),
        ("garble_metadata", "malformed_metadata"),
        ("drop_required_field", "malformed_metadata"),
        ("no_cells", "empty_smear"),
        ("wrong_accession", "accession_mismatch"),
    ],
)
def test_bad_smear_is_quarantined_whole_with_every_file_kept(pipeline_env, dagster_instance, smear, damage, reason_code):
    folder, document = smear
    metadata = folder / "smear.json"
    if damage == "delete_metadata":
        metadata.unlink()
    elif damage == "garble_metadata":
        metadata.write_bytes(metadata.read_bytes()[:200])
    elif damage == "drop_required_field":
        del document["patient"]["birth_date"]
        metadata.write_text(json.dumps(document))
    elif damage == "no_cells":
        document["cells"] = []
        metadata.write_text(json.dumps(document))
        for image in folder.glob("*.jpg"):
            image.unlink()
    elif damage == "wrong_accession":
        document["accession"] = document["accession"] + "X"
        metadata.write_text(json.dumps(document))
    originals = sorted(path.read_bytes() for path in folder.iterdir())

    result = materialise_smear(pipeline_env, dagster_instance, folder.name)

    assert result.success, "a bad smear is a quarantine, not a failed run"
    assert import_metadata(result)["status"] == "quarantined"
    quarantine = _quarantine(pipeline_env)
    assert set(quarantine["reason_code"]) == {reason_code}
    assert quarantine["cell_id"].isna().all()
    kept = sorted((pipeline_env.quarantine / key).read_bytes() for key in quarantine["kept_key"])
    assert kept == originals
    assert _count(pipeline_env, "cells") == 0
    materialise_smear(pipeline_env, dagster_instance, folder.name)
    assert len(_quarantine(pipeline_env)) == len(quarantine)


def test_one_corrupt_smear_does_not_stop_the_others(pipeline_env, dagster_instance):
    export = generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=3, cells_per_smear=8, seed=12))
    (export.smears[1].folder / "smear.json").write_text("{not json")
    results = [materialise_smear(pipeline_env, dagster_instance, smear.folder.name) for smear in export.smears]
    assert all(result.success for result in results)
    assert [import_metadata(result)["status"] for result in results] == ["imported", "quarantined", "imported"]
    assert _count(pipeline_env, "cells") == 16


def test_same_smear_exported_twice_under_one_accession_is_not_duplicated(pipeline_env, dagster_instance, smear):
    folder, _ = smear
    materialise_smear(pipeline_env, dagster_instance, folder.name)
    copy = pipeline_env.home / "second-export"
    shutil.copytree(folder, copy)
    shutil.rmtree(folder)
    shutil.copytree(copy, folder)  # re-exported: same accession, fresh files and timestamps
    result = materialise_smear(pipeline_env, dagster_instance, folder.name)
    assert import_metadata(result)["status"] == "already_present"
    assert _count(pipeline_env, "cells") == CELLS
