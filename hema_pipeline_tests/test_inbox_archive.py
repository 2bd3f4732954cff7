"""The inbox archive (issue 17, bounded growth): an imported export leaves the inbox, so that a sensor tick
and an import cost what is waiting, not the lab's history; nothing is lost and re-runs still work."""

from __future__ import annotations

import json
import shutil
import uuid

import boto3
import dagster as dg
import pandas as pd
import pytest

from hema_pipeline.defs.ingest import imported_smear, inbox_sensor, smear_partitions
from hema_pipeline.defs.resources import InboxResource
from hema_pipeline.export.format import METADATA_FILE_NAME
from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
from hema_pipeline.ingest.inbox import ARCHIVED, CHANGED_SINCE_IMPORT, Inbox
from hema_pipeline.storage.object_store import LocalObjectStore, move_folder, open_object_store
from hema_pipeline.storage.warehouse import Warehouse
from hema_pipeline_tests.support import TEST_KEY, import_metadata


def _archiving_resources(env, archive_url: str, inbox_url: str | None = None, endpoint: str = "") -> dict[str, object]:
    resources = env.resources()
    resources["inbox"] = InboxResource(
        url=inbox_url or str(env.inbox), archive_url=archive_url, s3_endpoint_url=endpoint, settle_seconds=0
    )
    return resources


def _materialise(resources, instance, smear_id: str) -> dg.ExecuteInProcessResult:
    if not instance.has_dynamic_partition(smear_partitions.name, smear_id):
        instance.add_dynamic_partitions(smear_partitions.name, [smear_id])
    return dg.materialize([imported_smear], partition_key=smear_id, resources=resources, instance=instance)


def _cells(env) -> pd.DataFrame:
    return Warehouse(env.warehouse).query("select smear_id, cell_id, image_sha256 from cells order by all")


def test_imported_exports_move_to_the_archive_and_reruns_read_them_there(pipeline_env, dagster_instance):
    export = generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=3, cells_per_smear=6, seed=71))
    archive_root = pipeline_env.home / "inbox_archive"
    resources = _archiving_resources(pipeline_env, str(archive_root))
    originals = {smear.folder.name: {path.name: path.read_bytes() for path in smear.folder.iterdir()} for smear in export.smears}

    for smear in export.smears:
        smear_id = TEST_KEY.smear_id(smear.accession)
        metadata = import_metadata(_materialise(resources, dagster_instance, smear_id))
        assert (metadata["status"], metadata["export"]) == ("imported", ARCHIVED)
        [version] = [path.name for path in (archive_root / smear_id).iterdir()]
        assert metadata["archive_version"] == version
        # The original export, byte for byte, under the pseudonym.
        archived = archive_root / smear_id / version / smear.folder.name
        assert {path.name: path.read_bytes() for path in archived.iterdir()} == originals[smear.folder.name]
    assert list(pipeline_env.inbox.iterdir()) == []  # the inbox holds only what is waiting
    imported = _cells(pipeline_env)
    assert len(imported) == 18

    # An emptied inbox costs the sensor nothing and requests nothing.
    with dg.build_sensor_context(
        instance=dagster_instance, resources={k: resources[k] for k in ("inbox", "pseudonyms", "warehouse")}
    ) as context:
        assert inbox_sensor(context).run_requests == []

    # A re-run of one partition imports the archived export: same rows, nothing duplicated.
    smear_id = TEST_KEY.smear_id(export.smears[0].accession)
    rerun = import_metadata(_materialise(resources, dagster_instance, smear_id))
    assert (rerun["status"], rerun["export"]) == ("already_present", "already_archived")
    pd.testing.assert_frame_equal(_cells(pipeline_env), imported)


def test_a_new_version_of_an_archived_export_is_imported_and_archived_beside_the_first(pipeline_env, dagster_instance):
    spec = SyntheticExportSpec(smears=1, cells_per_smear=6, seed=72)
    export = generate_export(pipeline_env.home / "analyser", spec)
    smear = export.smears[0]
    smear_id = TEST_KEY.smear_id(smear.accession)
    archive_root = pipeline_env.home / "inbox_archive"
    resources = _archiving_resources(pipeline_env, str(archive_root))
    shutil.copytree(smear.folder, pipeline_env.inbox / smear.folder.name)
    assert import_metadata(_materialise(resources, dagster_instance, smear_id))["export"] == ARCHIVED

    # The analyser sends the smear again, one cell fewer: the new version is imported (the cell withdrawn).
    resent = shutil.copytree(smear.folder, pipeline_env.inbox / smear.folder.name)
    document = json.loads((resent / METADATA_FILE_NAME).read_text())
    dropped = document["cells"].pop()
    (resent / dropped["image"]).unlink()
    (resent / METADATA_FILE_NAME).write_text(json.dumps(document))
    second = import_metadata(_materialise(resources, dagster_instance, smear_id))
    assert (second["status"], second["cells_withdrawn"], second["export"]) == ("imported", 1, ARCHIVED)
    versions = sorted(path.name for path in (archive_root / smear_id).iterdir())
    assert len(versions) == 2 and versions[-1] == second["archive_version"]

    # A re-run reads the newest version: nothing changes.
    rerun = import_metadata(_materialise(resources, dagster_instance, smear_id))
    assert (rerun["status"], rerun["cells_withdrawn"]) == ("already_present", 0)


def test_an_export_that_changed_during_its_import_stays_in_the_inbox(pipeline_env):
    export = generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=1, cells_per_smear=4, seed=73))
    smear = export.smears[0]
    inbox = Inbox(LocalObjectStore(pipeline_env.inbox), 0, LocalObjectStore(pipeline_env.home / "archive", private=True))
    smear_id = TEST_KEY.smear_id(smear.accession)
    located = inbox.locate(smear_id, TEST_KEY)
    assert located is not None and not located.archived
    (smear.folder / "late_arrival.jpg").write_bytes(b"written after the import listed the folder")

    outcome = inbox.archive_imported(located, smear_id)
    assert outcome.status == CHANGED_SINCE_IMPORT
    assert (smear.folder / METADATA_FILE_NAME).is_file() and not (pipeline_env.home / "archive").exists()


def test_a_move_cut_short_never_withdraws_stored_cells(pipeline_env, dagster_instance):
    """A copy-then-delete move (S3, two filesystems) deletes the metadata file first: if it stops half way,
    what is left in the inbox is imported as a smear without metadata, quarantined, and the cells already
    stored stay."""
    export = generate_export(pipeline_env.inbox, SyntheticExportSpec(smears=1, cells_per_smear=6, seed=74))
    smear = export.smears[0]
    smear_id = TEST_KEY.smear_id(smear.accession)
    resources = pipeline_env.resources()  # no archive: the folder stays for the simulated cut-short move
    assert import_metadata(_materialise(resources, dagster_instance, smear_id))["status"] == "imported"
    before = _cells(pipeline_env)

    class StopsAfterTwoDeletes(LocalObjectStore):
        deletes = 0

        def delete(self, key: str) -> None:
            if self.deletes == 2:
                raise OSError("the move was killed")
            type(self).deletes += 1
            super().delete(key)

    source = StopsAfterTwoDeletes(pipeline_env.inbox)
    target = open_object_store(str(pipeline_env.home / "other_filesystem"), private=True)
    # Force the copy path (a different store type on each side, as with S3).
    with pytest.raises(OSError, match="killed"):
        move_folder(
            source,
            smear.folder.name,
            _NotLocal(target),
            f"{smear_id}/v1/{smear.folder.name}",
            delete_first=f"{smear.folder.name}/{METADATA_FILE_NAME}",
        )
    assert not (smear.folder / METADATA_FILE_NAME).exists()
    assert len(list(smear.folder.iterdir())) == 6 - 1  # the metadata and one image gone, five images left

    partial = import_metadata(_materialise(resources, dagster_instance, smear_id))
    assert partial["status"] == "quarantined" and partial["cells_withdrawn"] == 0
    pd.testing.assert_frame_equal(_cells(pipeline_env), before)


class _NotLocal:
    """A local store seen through the generic interface only (as an S3 store would be)."""

    def __init__(self, store):
        self._store = store

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_archive_on_s3_moves_every_object_and_reruns_read_it_back(pipeline_env, dagster_instance, s3_endpoint):
    bucket = f"archive-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    export = generate_export(pipeline_env.home / "export", SyntheticExportSpec(smears=1, cells_per_smear=5, seed=75))
    smear = export.smears[0]
    inbox_store = open_object_store(f"s3://{bucket}/inbox", endpoint_url=s3_endpoint)
    for path in smear.folder.iterdir():
        inbox_store.put_bytes(f"{smear.folder.name}/{path.name}", path.read_bytes())
    resources = _archiving_resources(
        pipeline_env, f"s3://{bucket}/archive", inbox_url=f"s3://{bucket}/inbox", endpoint=s3_endpoint
    )
    smear_id = TEST_KEY.smear_id(smear.accession)

    first = import_metadata(_materialise(resources, dagster_instance, smear_id))
    assert (first["status"], first["export"]) == ("imported", ARCHIVED)
    assert list(inbox_store.list()) == []
    archive = open_object_store(f"s3://{bucket}/archive", endpoint_url=s3_endpoint)
    archived = sorted(info.key for info in archive.list(smear_id))
    assert len(archived) == 6 and all(
        key.startswith(f"{smear_id}/{first['archive_version']}/{smear.folder.name}/") for key in archived
    )
    assert (
        archive.get_bytes(f"{smear_id}/{first['archive_version']}/{smear.folder.name}/{METADATA_FILE_NAME}")
        == (smear.folder / METADATA_FILE_NAME).read_bytes()
    )

    rerun = import_metadata(_materialise(resources, dagster_instance, smear_id))
    assert (rerun["status"], rerun["export"]) == ("already_present", "already_archived")
    assert len(_cells(pipeline_env)) == 5
