"""A hostile inbox, through real Dagster materialisations and sensor evaluations: every bad entry is
quarantined or skipped with a reason, nothing else stops, nothing identifying reaches what Dagster or the
warehouse store, and re-exports are authoritative without duplicating rows."""

from __future__ import annotations

import io
import json
import os
import stat
import unicodedata
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd
import pytest
from PIL import Image

from hema_pipeline.defs.ingest import imported_smear, inbox_sensor
from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
from hema_pipeline.storage.object_store import LocalObjectStore
from hema_pipeline_tests.phi import byte_hits, decoded_hits
from hema_pipeline_tests.support import TEST_KEY, import_metadata, materialise_smear, sensor_resources

CELLS = 8


def _rows(env, sql: str, parameters=()) -> pd.DataFrame:
    with duckdb.connect(str(env.warehouse), read_only=True) as connection:
        return connection.execute(sql, list(parameters)).df()


def _quarantine(env) -> pd.DataFrame:
    return _rows(env, "select * from quarantine order by cell_id nulls first, reason_code")


def _codes_by_cell(env) -> dict[int | None, set[str]]:
    codes: dict[int | None, set[str]] = {}
    for row in _quarantine(env).itertuples():
        cell = None if pd.isna(row.cell_id) else int(row.cell_id)
        codes.setdefault(cell, set()).add(row.reason_code)
    return codes


def _document(folder: Path) -> dict:
    return json.loads((folder / "smear.json").read_text())


def _write_document(folder: Path, document: dict) -> None:
    (folder / "smear.json").write_text(json.dumps(document))


@pytest.fixture
def export(pipeline_env):
    return generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=3, cells_per_smear=CELLS, seed=41))


def _assert_no_phi(env, needles) -> None:
    written = [env.warehouse, env.lake, env.dagster_home]
    assert byte_hits(written, needles) == []
    assert decoded_hits([env.warehouse], [env.lake], needles) == []


def test_unreadable_cell_file_is_quarantined_and_its_path_reaches_no_log(pipeline_env, dagster_instance, export, monkeypatch):
    """The OS error of an unreadable file quotes its path (<accession>/<NAME>_<MRN>_002.jpg): the cell
    is quarantined by number, the other cells import, and the event log and compute logs stay clean."""
    smear = export.smears[0]
    victim_name = smear.image_names[sorted(smear.image_names)[1]]
    original = LocalObjectStore.get_bytes

    def unreadable(self, key):
        if key.endswith(victim_name):
            raise PermissionError(13, "Permission denied", str(self.root / key))
        return original(self, key)

    monkeypatch.setattr(LocalObjectStore, "get_bytes", unreadable)
    result = materialise_smear(pipeline_env, dagster_instance, smear.folder.name)

    assert result.success
    metadata = import_metadata(result)
    assert metadata["status"] == "partially_quarantined"
    assert metadata["cells_imported"] == CELLS - 1
    codes = _codes_by_cell(pipeline_env)
    assert codes[sorted(smear.image_names)[1]] == {"unreadable_file"}
    _assert_no_phi(pipeline_env, export.phi_strings())


def test_metadata_that_cannot_be_read_quarantines_the_smear_and_not_the_others(
    pipeline_env, dagster_instance, export, monkeypatch
):
    original = LocalObjectStore.get_bytes
    target = export.smears[1].folder.name

    def unreadable(self, key):
        if key == f"{target}/smear.json":
            raise PermissionError(13, "Permission denied", str(self.root / key))
        return original(self, key)

    monkeypatch.setattr(LocalObjectStore, "get_bytes", unreadable)
    results = [materialise_smear(pipeline_env, dagster_instance, smear.folder.name) for smear in export.smears]
    assert all(result.success for result in results)
    assert [import_metadata(result)["status"] for result in results] == ["imported", "quarantined", "imported"]
    quarantine = _quarantine(pipeline_env)
    assert set(quarantine["reason_code"]) == {"unreadable_metadata"}
    # The images of the unreadable smear are kept; smear.json itself could not be read, so it stays in the inbox.
    assert quarantine["kept_key"].notna().sum() == CELLS
    _assert_no_phi(pipeline_env, export.phi_strings())


def test_symlinks_are_never_followed_nor_copied(pipeline_env, dagster_instance, export, tmp_path):
    secret = tmp_path / "pipeline.key"
    secret.write_text("TOP-SECRET-KEY-MATERIAL")
    secret.chmod(0o600)
    smear = export.smears[0]
    listed = smear.folder / smear.image_names[sorted(smear.image_names)[0]]
    listed.unlink()
    listed.symlink_to(secret)
    (smear.folder / "extra.jpg").symlink_to(secret)
    (smear.folder / "linked-folder").symlink_to(tmp_path, target_is_directory=True)
    (pipeline_env.inbox / "linked-smear").symlink_to(export.smears[1].folder, target_is_directory=True)

    result = materialise_smear(pipeline_env, dagster_instance, smear.folder.name)

    assert result.success and import_metadata(result)["cells_imported"] == CELLS - 1
    quarantine = _quarantine(pipeline_env)
    links = quarantine[quarantine["reason_code"] == "symlink_not_followed"]
    assert len(links) == 3 and links["kept_key"].isna().all()
    assert byte_hits([pipeline_env.quarantine, pipeline_env.lake, pipeline_env.warehouse], ["TOP-SECRET-KEY-MATERIAL"]) == []
    # The symlinked smear folder in the inbox root is counted as a skip, never imported through the link.
    with dg.build_sensor_context(instance=dagster_instance, resources=sensor_resources(pipeline_env)) as context:
        tick = inbox_sensor(context)
    assert len(tick.run_requests) == 3


def test_quarantine_files_are_private(pipeline_env, dagster_instance, export):
    smear = export.smears[0]
    (smear.folder / "notes.txt").write_text("left here")
    materialise_smear(pipeline_env, dagster_instance, smear.folder.name)
    kept = [path for path in pipeline_env.quarantine.rglob("*")]
    assert kept
    for path in kept:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{oct(mode)} grants group/other access"


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 160)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _bomb_header() -> bytes:
    """A small JPEG whose frame header declares 40000x40000 pixels."""
    data = bytearray(_jpeg(48, 40))
    position = data.find(b"\xff\xc0")
    data[position + 5 : position + 9] = (40000).to_bytes(2, "big") + (40000).to_bytes(2, "big")
    return bytes(data)


def test_hostile_cells_are_quarantined_one_by_one(pipeline_env, dagster_instance, export):
    smear = export.smears[0]
    ids = sorted(smear.image_names)
    folder = smear.folder
    (folder / smear.image_names[ids[0]]).write_bytes(_bomb_header())
    (folder / smear.image_names[ids[1]]).write_bytes(_jpeg(600, 200))  # a whole slide region, not a cell crop
    (folder / smear.image_names[ids[2]]).unlink()
    os.mkfifo(folder / smear.image_names[ids[2]])  # would block a plain open() forever
    full = (folder / smear.image_names[ids[3]]).read_bytes()
    (folder / smear.image_names[ids[3]]).write_bytes(full[: len(full) // 2] + b"\xff\xd9")  # half the scan, then EOI

    result = materialise_smear(pipeline_env, dagster_instance, folder.name)

    assert result.success
    codes = _codes_by_cell(pipeline_env)
    assert codes[ids[0]] == {"image_too_large"}
    assert codes[ids[1]] == {"unexpected_dimensions"}
    assert codes[ids[2]] == {"not_a_regular_file"}
    assert codes[ids[3]] == {"corrupt_image"}
    assert import_metadata(result)["cells_imported"] == CELLS - 4
    stored = _rows(pipeline_env, "select min(width) w0, max(width) w1, min(height) h0, max(height) h1 from cells")
    assert 300 <= int(stored.w0[0]) and int(stored.w1[0]) <= 400 and 300 <= int(stored.h0[0]) and int(stored.h1[0]) <= 400


@pytest.mark.parametrize(
    "damage",
    ["deep_nesting", "cell_id_out_of_range", "huge_integer", "analyser_free_text", "analyser_megabyte", "control_characters"],
)
def test_hostile_metadata_quarantines_the_smear_with_a_reason(pipeline_env, dagster_instance, export, damage):
    folder = export.smears[0].folder
    document = _document(folder)
    if damage == "deep_nesting":
        (folder / "smear.json").write_text('{"format_version": 1, "x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    else:
        if damage == "cell_id_out_of_range":
            document["cells"][0]["cell_id"] = 2**40
        elif damage == "analyser_free_text":
            document["analyser_id"] = f"scanned by {export.smears[0].patient.name}"
        elif damage == "analyser_megabyte":
            document["analyser_id"] = "A" * 1_000_000
        elif damage == "control_characters":
            document["accession"] = document["accession"] + "\u0000"
        text = json.dumps(document)
        if damage == "huge_integer":
            first_id = f'"cell_id": {document["cells"][0]["cell_id"]},'
            text = text.replace(first_id, '"cell_id": 1' + "0" * 5000 + ",", 1)
        (folder / "smear.json").write_text(text)

    result = materialise_smear(pipeline_env, dagster_instance, folder.name)

    assert result.success, "hostile metadata is a quarantine, not a failed run"
    assert import_metadata(result)["status"] == "quarantined"
    assert set(_quarantine(pipeline_env)["reason_code"]) == {"malformed_metadata"}
    assert _rows(pipeline_env, "select count(*) n from smears").n[0] == 0
    assert byte_hits([pipeline_env.warehouse, pipeline_env.lake], ["scanned by", "AAAAAAAAAAAAAAAA"]) == []


def test_metadata_with_a_byte_order_mark_imports(pipeline_env, dagster_instance, export):
    folder = export.smears[0].folder
    (folder / "smear.json").write_bytes(b"\xef\xbb\xbf" + (folder / "smear.json").read_bytes())
    result = materialise_smear(pipeline_env, dagster_instance, folder.name)
    assert import_metadata(result)["status"] == "imported"


def test_reexport_is_authoritative_for_patient_labels_and_deletions(pipeline_env, dagster_instance, export):
    folder = export.smears[0].folder
    materialise_smear(pipeline_env, dagster_instance, folder.name)
    smear_id = TEST_KEY.smear_id(folder.name)
    old_patient = TEST_KEY.patient_id(export.smears[0].patient.record_number)
    document = _document(folder)
    corrected = "MRN" + "7" * 8
    document["patient"]["record_number"] = corrected
    deleted = document["cells"].pop()
    (folder / deleted["image"]).unlink()
    document["cells"][0]["verified_class"] = (
        "lymphocyte" if document["cells"][0]["verified_class"] != "lymphocyte" else "monocyte"
    )
    _write_document(folder, document)

    result = materialise_smear(pipeline_env, dagster_instance, folder.name)

    metadata = import_metadata(result)
    assert metadata["status"] == "imported"
    assert metadata["cells_withdrawn"] == 1
    assert metadata["cells_updated"] == CELLS - 1
    cells = _rows(pipeline_env, "select * from cells where smear_id = ?", [smear_id])
    assert len(cells) == CELLS - 1 and deleted["cell_id"] not in set(cells["cell_id"])
    assert set(cells["patient_id"]) == {TEST_KEY.patient_id(corrected)} != {old_patient}
    smears = _rows(pipeline_env, "select patient_id, cell_count from smears where smear_id = ?", [smear_id])
    assert smears.patient_id[0] == TEST_KEY.patient_id(corrected) and smears.cell_count[0] == CELLS - 1
    runs = _rows(pipeline_env, "select cells_updated, cells_withdrawn from import_runs order by started_at")
    assert runs.values.tolist() == [[0, 0], [CELLS - 1, 1]]
    # The same export again changes nothing.
    assert import_metadata(materialise_smear(pipeline_env, dagster_instance, folder.name))["status"] == "already_present"
    assert len(_rows(pipeline_env, "select * from cells")) == CELLS - 1


@pytest.mark.parametrize("twin", ["NFD", "trailing space"])
def test_folders_that_differ_only_by_normalisation_are_quarantined_together(pipeline_env, dagster_instance, twin):
    accession = "H26-CAFÉ-000001"
    export = generate_export(pipeline_env.home / "staging", SyntheticExportSpec(smears=1, cells_per_smear=4, seed=42))
    source = export.smears[0].folder
    document = _document(source)
    document["accession"] = unicodedata.normalize("NFC", accession)
    twin_name = unicodedata.normalize("NFD", accession) if twin == "NFD" else accession + " "
    for name in (unicodedata.normalize("NFC", accession), twin_name):
        target = pipeline_env.inbox / name
        target.mkdir()
        for path in source.iterdir():
            (target / path.name).write_bytes(path.read_bytes())
        _write_document(target, document)
    assert len(list(pipeline_env.inbox.iterdir())) == 2

    result = materialise_smear(pipeline_env, dagster_instance, unicodedata.normalize("NFC", accession))

    assert import_metadata(result)["status"] == "quarantined"
    quarantine = _quarantine(pipeline_env)
    assert set(quarantine["reason_code"]) == {"duplicate_folder"}
    assert quarantine["kept_key"].notna().sum() == 2 * 5 or quarantine["content_sha256"].nunique() == 5
    assert len(quarantine) == 2 * 5  # every file of both folders has its row: nothing silently dropped


def test_a_fixed_smear_resolves_its_smear_level_quarantine(pipeline_env, dagster_instance, export):
    folder = export.smears[0].folder
    good = (folder / "smear.json").read_bytes()
    (folder / "smear.json").write_text("{broken")
    materialise_smear(pipeline_env, dagster_instance, folder.name)
    assert len(_rows(pipeline_env, "select * from open_quarantine")) == CELLS + 1
    (folder / "smear.json").write_bytes(good)
    materialise_smear(pipeline_env, dagster_instance, folder.name)
    assert len(_rows(pipeline_env, "select * from open_quarantine")) == 0
    assert len(_rows(pipeline_env, "select * from cells")) == CELLS


def test_thousands_of_missing_images_write_one_warning(pipeline_env, dagster_instance, export):
    folder = export.smears[0].folder
    document = _document(folder)
    template = document["cells"][0]
    document["cells"] += [{**template, "cell_id": 10_000 + index, "image": f"absent_{index}.jpg"} for index in range(2000)]
    _write_document(folder, document)
    result = materialise_smear(pipeline_env, dagster_instance, folder.name)
    assert result.success
    records = dagster_instance.all_logs(result.run_id)
    warning_lines = [record for record in records if record.level >= 30 and "quarantined" in record.user_message]
    assert len(warning_lines) == 1 and "2000 missing_image" in warning_lines[0].user_message
    assert len(warning_lines[0].user_message) < 5000
    assert len(_rows(pipeline_env, "select * from quarantine where reason_code = 'missing_image'")) == 2000


def _long_path_inside(folder: Path) -> None:
    """Nest folders until the path is longer than PATH_MAX, working relative to each new folder."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        for _ in range(24):
            name = "d" * 200
            os.mkdir(name, dir_fd=descriptor)
            child = os.open(name, os.O_RDONLY, dir_fd=descriptor)
            os.close(descriptor)
            descriptor = child
        with open(os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=descriptor), "wb") as handle:
            handle.write(b"x")
    finally:
        os.close(descriptor)


def test_bad_inbox_entries_never_stop_the_sensor_or_the_other_smears(pipeline_env, dagster_instance, export):
    latin1 = os.fsencode(pipeline_env.inbox) + b"/M\xfcller-H26-000999"
    os.mkdir(latin1)
    with open(latin1 + b"/smear.json", "wb") as handle:
        handle.write(b"{}")
    (pipeline_env.inbox / "stray-DOE_JANE.txt").write_text("root file")
    (pipeline_env.inbox / "empty-folder").mkdir()
    _long_path_inside(export.smears[2].folder)

    with dg.build_sensor_context(instance=dagster_instance, resources=sensor_resources(pipeline_env)) as context:
        tick = inbox_sensor(context)
    requested = {request.partition_key for request in tick.run_requests}
    assert {TEST_KEY.smear_id(smear.folder.name) for smear in export.smears} <= requested
    assert len(requested) == 4  # the Latin-1 folder is a smear too: it is imported as a quarantine

    for request in tick.run_requests:
        dagster_instance.add_dynamic_partitions("smears", [request.partition_key])
        result = dg.materialize(
            [imported_smear],
            partition_key=request.partition_key,
            resources=pipeline_env.resources(),
            instance=dagster_instance,
        )
        assert result.success
    statuses = _rows(pipeline_env, "select smear_id, status from import_runs")
    by_smear = dict(zip(statuses.smear_id, statuses.status, strict=True))
    assert by_smear[TEST_KEY.smear_id(export.smears[0].folder.name)] == "imported"
    assert by_smear[TEST_KEY.smear_id(export.smears[2].folder.name)] == "partially_quarantined"
    assert "quarantined" in by_smear.values()
    assert set(_quarantine(pipeline_env)["reason_code"]) >= {"invalid_folder_name", "unreadable_file"}
    _assert_no_phi(pipeline_env, [*export.phi_strings(), "DOE_JANE", "ller-H26-000999"])


def test_sensor_cursor_does_not_skip_a_smear_changed_in_the_cursor_second(pipeline_env, dagster_instance, export):
    with dg.build_sensor_context(instance=dagster_instance, resources=sensor_resources(pipeline_env)) as context:
        first = inbox_sensor(context)
    cursor = json.loads(first.cursor)["newest_change"]
    late = generate_export(pipeline_env.home / "late", SyntheticExportSpec(smears=1, cells_per_smear=3, seed=43))
    moved = late.smears[0].folder.rename(pipeline_env.inbox / late.smears[0].folder.name)
    for path in [moved, *moved.iterdir()]:
        os.utime(path, (cursor, cursor))
    with dg.build_sensor_context(
        instance=dagster_instance, cursor=first.cursor, resources=sensor_resources(pipeline_env)
    ) as context:
        second = inbox_sensor(context)
    assert TEST_KEY.smear_id(moved.name) in {request.partition_key for request in second.run_requests}


def test_a_different_key_is_refused_instead_of_doubling_every_row(pipeline_env, dagster_instance, export, monkeypatch):
    folder = export.smears[0].folder
    materialise_smear(pipeline_env, dagster_instance, folder.name)
    before = len(_rows(pipeline_env, "select * from cells"))
    other_key = "a7" * 32
    monkeypatch.setenv("HEMA_PSEUDONYM_KEY", other_key)
    from hema_pipeline.anonymise.pseudonymise import PseudonymKey

    other = PseudonymKey(bytes.fromhex(other_key))
    dagster_instance.add_dynamic_partitions("smears", [other.smear_id(folder.name)])
    result = dg.materialize(
        [imported_smear],
        partition_key=other.smear_id(folder.name),
        resources=pipeline_env.resources(),
        instance=dagster_instance,
        raise_on_error=False,
    )
    assert not result.success
    [failure] = [event for event in result.all_events if event.event_type_value == "STEP_FAILURE"]
    assert "fingerprint" in failure.event_specific_data.error.message
    assert other_key not in failure.event_specific_data.error.message
    assert len(_rows(pipeline_env, "select * from cells")) == before
    # The sensor refuses up front: no run is requested under the wrong key.
    with dg.build_sensor_context(instance=dagster_instance, resources=sensor_resources(pipeline_env)) as context:
        tick = inbox_sensor(context)
    assert not tick.run_requests and "fingerprint" in tick.skip_reason.skip_message


def test_sensor_without_a_key_requests_nothing_and_says_why(pipeline_env, dagster_instance, export, monkeypatch):
    monkeypatch.delenv("HEMA_PSEUDONYM_KEY")
    with dg.build_sensor_context(instance=dagster_instance, resources=sensor_resources(pipeline_env)) as context:
        tick = inbox_sensor(context)
    assert not tick.run_requests and "HEMA_PSEUDONYM_KEY" in tick.skip_reason.skip_message
    monkeypatch.setenv("HEMA_PSEUDONYM_KEY", "5e" * 31 + "5")  # 63 hex characters: a typo, not a text key
    with dg.build_sensor_context(instance=dagster_instance, resources=sensor_resources(pipeline_env)) as context:
        tick = inbox_sensor(context)
    assert not tick.run_requests and tick.skip_reason is not None


def test_a_failing_inbox_scan_fails_the_tick_without_quoting_the_path(pipeline_env, dagster_instance, export, monkeypatch):
    from hema_pipeline.defs.ingest import InboxScanFailed

    victim = str(export.smears[0].folder / export.smears[0].image_names[sorted(export.smears[0].image_names)[0]])

    def broken(self, prefix=""):
        raise OSError(5, "Input/output error", victim)
        yield  # pragma: no cover - makes this a generator like the real one

    monkeypatch.setattr(LocalObjectStore, "list", broken)
    with dg.build_sensor_context(instance=dagster_instance, resources=sensor_resources(pipeline_env)) as context:
        with pytest.raises(InboxScanFailed) as failed:
            inbox_sensor(context)
    assert "OSError" in str(failed.value)
    assert victim not in str(failed.value) and export.smears[0].accession not in str(failed.value)
    assert failed.value.__cause__ is None and failed.value.__suppress_context__
