"""The object-store contract, run against a local folder and against a real S3 server on 127.0.0.1."""

from __future__ import annotations

import uuid

import boto3
import duckdb
import pytest

from hema_pipeline.storage.object_store import LocalObjectStore, ObjectNotFound, S3ObjectStore, open_object_store, put_if_absent


def _new_bucket(endpoint: str) -> str:
    name = f"hema-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalObjectStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    return open_object_store(f"s3://{_new_bucket(endpoint)}/lab/a", endpoint_url=endpoint)


def test_object_store_contract(store):
    assert not store.exists("images/ab/x.jpg")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("images/ab/x.jpg")
    store.put_bytes("images/ab/x.jpg", b"one")
    store.put_bytes("images/ab/x.jpg", b"two")  # overwrite is atomic and wins
    store.put_bytes("images/cd/y.jpg", b"three")
    store.put_bytes("tables/t.parquet", b"four")
    assert store.get_bytes("images/ab/x.jpg") == b"two"
    assert store.exists("images/cd/y.jpg")
    listed = list(store.list("images"))
    assert [info.key for info in listed] == ["images/ab/x.jpg", "images/cd/y.jpg"]
    assert [info.size for info in listed] == [3, 5]
    assert all(info.modified > 0 for info in listed)
    assert sorted(info.key for info in store.list()) == ["images/ab/x.jpg", "images/cd/y.jpg", "tables/t.parquet"]
    store.delete("images/ab/x.jpg")
    assert not store.exists("images/ab/x.jpg")
    with pytest.raises(ValueError):
        store.put_bytes("../escape", b"x")


def test_put_if_absent_writes_a_content_addressed_key_once(store):
    written: list[str] = []
    original = store.put_bytes

    def counting_put(key: str, data: bytes) -> None:
        written.append(key)
        original(key, data)

    store.put_bytes = counting_put
    put_if_absent(store, "images/ab/abc.jpg", b"cell")
    put_if_absent(store, "images/ab/abc.jpg", b"cell")
    put_if_absent(store, "images/cd/cde.jpg", b"other")
    assert written == ["images/ab/abc.jpg", "images/cd/cde.jpg"]
    assert store.get_bytes("images/ab/abc.jpg") == b"cell"


def test_s3_store_keeps_keys_under_its_prefix(s3_endpoint):
    bucket = _new_bucket(s3_endpoint)
    store = S3ObjectStore(bucket, "lab/a", endpoint_url=s3_endpoint)
    store.put_bytes("k/v.bin", b"1")
    keys = [item["Key"] for item in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["lab/a/k/v.bin"]
    assert store.uri("k/v.bin") == f"s3://{bucket}/lab/a/k/v.bin"


def test_import_from_an_s3_inbox_into_an_s3_lake(pipeline_env, dagster_instance, s3_endpoint):
    """The whole import with inbox, lake and quarantine on S3 (the warehouse stays a local DuckDB file)."""
    import dagster as dg

    from hema_pipeline.defs.ingest import imported_smear, smear_partitions
    from hema_pipeline.defs.resources import InboxResource, StorageResource
    from hema_pipeline.export.synthetic import SyntheticExportSpec, generate_export
    from hema_pipeline_tests.support import TEST_KEY

    export = generate_export(pipeline_env.home / "export", SyntheticExportSpec(smears=1, cells_per_smear=10, seed=41))
    smear = export.smears[0]
    bucket = _new_bucket(s3_endpoint)
    inbox_store = open_object_store(f"s3://{bucket}/inbox", endpoint_url=s3_endpoint)
    for path in smear.folder.iterdir():
        inbox_store.put_bytes(f"{smear.folder.name}/{path.name}", path.read_bytes())
    # One corrupt image, to see the quarantine land on S3 too.
    victim = sorted(path.name for path in smear.folder.glob("*.jpg"))[0]
    inbox_store.put_bytes(f"{smear.folder.name}/{victim}", b"\xff\xd8 broken")

    resources = pipeline_env.resources()
    resources["inbox"] = InboxResource(url=f"s3://{bucket}/inbox", s3_endpoint_url=s3_endpoint, settle_seconds=0)
    resources["storage"] = StorageResource(
        lake_url=f"s3://{bucket}/lake", quarantine_url=f"s3://{bucket}/quarantine", s3_endpoint_url=s3_endpoint
    )
    smear_id = TEST_KEY.smear_id(smear.accession)
    dagster_instance.add_dynamic_partitions(smear_partitions.name, [smear_id])
    result = dg.materialize([imported_smear], partition_key=smear_id, resources=resources, instance=dagster_instance)

    assert result.success
    with duckdb.connect(str(pipeline_env.warehouse), read_only=True) as connection:
        image_keys = [row[0] for row in connection.execute("select image_key from cells").fetchall()]
        kept = connection.execute("select kept_key from quarantine").fetchall()
    assert len(image_keys) == 9
    lake = open_object_store(f"s3://{bucket}/lake", endpoint_url=s3_endpoint)
    assert all(lake.exists(key) for key in image_keys)
    assert any(info.key.endswith("cells.parquet") for info in lake.list("tables"))
    quarantine = open_object_store(f"s3://{bucket}/quarantine", endpoint_url=s3_endpoint)
    assert quarantine.get_bytes(kept[0][0]) == b"\xff\xd8 broken"


def test_a_folder_that_cannot_be_reached_is_an_error_not_an_empty_listing(tmp_path, monkeypatch):
    """An inbox whose parent lacks search permission (a container's user, a mount's mode) must not look
    empty: the sensor would import nothing and say nothing. A missing prefix is simply empty."""
    import hema_pipeline.storage.object_store as object_store

    store = LocalObjectStore(tmp_path / "inbox")
    (tmp_path / "inbox" / "H26-000001").mkdir(parents=True)
    (tmp_path / "inbox" / "H26-000001" / "smear.json").write_text("{}")
    assert [info.key for info in store.list()] == ["H26-000001/smear.json"]
    assert list(store.list("H26-999999")) == []

    real_lstat = object_store.os.lstat

    def failing_with(error_number: int, message: str):
        def failing(path, *args, **kwargs):
            if str(path) == str(tmp_path / "inbox"):
                raise OSError(error_number, message, str(path))
            return real_lstat(path, *args, **kwargs)

        return failing

    monkeypatch.setattr(object_store.os, "lstat", failing_with(13, "Permission denied"))
    with pytest.raises(PermissionError) as raised:
        list(store.list())
    assert str(tmp_path) not in str(raised.value) and raised.value.__cause__ is None

    monkeypatch.setattr(object_store.os, "lstat", failing_with(5, "Input/output error"))
    with pytest.raises(OSError) as raised:
        list(store.list())
    assert not isinstance(raised.value, PermissionError) and raised.value.errno == 5
    assert str(tmp_path) not in str(raised.value) and raised.value.__cause__ is None
