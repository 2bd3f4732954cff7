"""Handles between assets are JSON under stable names (issue 16 item 5, issue 17 item 2): every handle type
round-trips, a handle stored before a refactor still loads, and an unregistered type is refused."""

from __future__ import annotations

import dataclasses
import json
import math

import dagster as dg
import pytest

from hema_pipeline.datasets.versioning import DatasetHandle
from hema_pipeline.defs.handles import HANDLE_TYPES, HandleIOManager, UnknownHandle, decode_handle, encode_handle, handle_class
from hema_pipeline.defs.quality import CellSnapshot
from hema_pipeline.modeling.registry import ModelCard
from hema_pipeline.modeling.stage import CalibrationHandle, TrainedModelHandle
from hema_pipeline.storage.object_store import LocalObjectStore

CARD = ModelCard(
    task="pbc8",
    dataset_version="d1",
    code_version="c1",
    architecture={"name": "compact", "widths": [32, 64]},
    training={"epochs": 3},
    class_names=["neutrophil", "lymphocyte"],
    input_size=64,
    pixel_range=255.0,
    metrics={"accuracy": 0.9, "ece": None},
    per_class_metrics=[{"class": "neutrophil", "recall": 1.0}],
    temperature=1.3,
    referral={"threshold": 0.8},
    ood={"method": "energy", "threshold": math.inf},
    training_seconds=12.5,
    training_device="CPU",
    created_at="2026-12-07T00:00:00Z",
    crop_fraction=0.75,
    test_time_views=8,
    model_version="m1",
)

HANDLES = [
    CellSnapshot(version="v1", parquet_key="tables/cell_snapshots/v1.parquet", rows=12),
    DatasetHandle("d1", "pbc8", ("neutrophil", "lymphocyte"), "datasets/pbc8/d1/manifest.parquet", '{"seed": 0}'),
    TrainedModelHandle("pbc8", "d1", "models/ab.keras", {"name": "compact"}, {"epochs": 3}, 12.5, "CPU", 3, 0.9),
    CalibrationHandle("pbc8", "d1", "models/ab.keras", 1.3, {"threshold": 0.8}, {"threshold": math.inf}, 8),
    CARD,
    "m1",
    {"dysplasia_share_threshold": 0.123, "min_counted_leukocytes": 100},
]


@pytest.mark.parametrize("handle", HANDLES, ids=lambda handle: type(handle).__name__)
def test_every_handle_type_round_trips_exactly(handle):
    restored = decode_handle(encode_handle(handle))
    assert restored == handle and type(restored) is type(handle)


def test_every_registered_name_resolves_to_a_dataclass_and_every_stored_type_is_registered():
    for name in HANDLE_TYPES:
        assert dataclasses.is_dataclass(handle_class(name))
    stored = {json.loads(encode_handle(handle))["handle"] for handle in HANDLES}
    assert stored == {*HANDLE_TYPES, "json"}


def test_a_handle_stored_by_an_earlier_version_still_loads():
    """What a DatasetHandle materialisation left in the lake (the file's bytes, as written before the class
    moved from ``defs.datasets`` to ``datasets.versioning``): no class path in it, so the move broke nothing."""
    stored = (
        '{"handle": "DatasetHandle", "value": {"classes": ["eosinophil", "neutrophil"], "config_json": "{}", '
        '"dataset_version": "abc123", "manifest_key": "datasets/wbc4/abc123/manifest.parquet", "task": "wbc4"}}'
    )
    assert decode_handle(stored) == DatasetHandle(
        "abc123", "wbc4", ("eosinophil", "neutrophil"), "datasets/wbc4/abc123/manifest.parquet", "{}"
    )


def test_unknown_types_and_fields_are_refused_with_a_reason():
    @dataclasses.dataclass
    class Unregistered:
        value: int

    with pytest.raises(UnknownHandle, match="no stable name"):
        encode_handle(Unregistered(1))
    with pytest.raises(UnknownHandle, match="cannot be stored"):
        encode_handle(object())
    with pytest.raises(UnknownHandle, match="newer version"):
        decode_handle('{"handle": "FutureHandle", "value": {}}')
    with pytest.raises(UnknownHandle, match=r"\['surprise'\]"):
        decode_handle('{"handle": "CellSnapshot", "value": {"version": "v", "parquet_key": "k", "rows": 1, "surprise": 2}}')


def test_the_io_manager_stores_handles_in_the_lake_per_asset_and_partition(tmp_path):
    @dg.asset
    def snapshot() -> CellSnapshot:
        return HANDLES[0]

    @dg.asset
    def reader(snapshot: CellSnapshot) -> int:
        assert snapshot == HANDLES[0]
        return snapshot.rows

    manager = HandleIOManager(lake_url=str(tmp_path / "lake"))
    assert dg.materialize([snapshot, reader], resources={"io_manager": manager}).success
    lake = LocalObjectStore(tmp_path / "lake")
    assert json.loads(lake.get_bytes("dagster/handles/snapshot.json"))["handle"] == "CellSnapshot"
    assert decode_handle(lake.get_bytes("dagster/handles/reader.json").decode()) == 12


def test_trained_networks_are_stored_under_the_hash_of_their_bytes_and_written_once(tmp_path, monkeypatch):
    """The key is the SHA-256 of the stored bytes; bytes already in the lake are not written again; other
    weights get another key; the key loads back the network it names (the handle carries only the key)."""
    import numpy as np

    from hema_pipeline.modeling import stage
    from hema_pipeline.modeling.networks import build_model, compact
    from hema_pipeline.modeling.registry import model_to_bytes, sha256_hex

    lake = LocalObjectStore(tmp_path / "lake")
    network = build_model(compact(32), 3)
    key = stage.store_trained(lake, "pbc8", network)
    assert key == f"models/pbc8/trained/{sha256_hex(lake.get_bytes(key))}.keras"

    # Keras stamps the save time into the file: pin one save's bytes so a second store sees the same bytes.
    saved = model_to_bytes(network)
    monkeypatch.setattr(stage, "model_to_bytes", lambda model: saved)
    pinned_key = stage.store_trained(lake, "pbc8", network)
    written = {info.key: info.modified for info in lake.list("models/")}
    assert stage.store_trained(lake, "pbc8", network) == pinned_key
    assert {info.key: info.modified for info in lake.list("models/")} == written
    monkeypatch.undo()

    other = build_model(compact(32), 3)
    other.set_weights([weights + 1.0 for weights in network.get_weights()])
    other_key = stage.store_trained(lake, "pbc8", other)
    assert other_key not in written and len(list(lake.list("models/pbc8/trained/"))) == len(written) + 1

    handle = TrainedModelHandle(
        task="pbc8",
        dataset_version="d1",
        model_key=key,
        architecture={},
        training_config={},
        training_seconds=1.0,
        device="CPU",
        epochs_run=1,
        best_val_accuracy=0.5,
    )
    image = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(stage.load_trained(lake, handle)(image, training=False), network(image, training=False), rtol=1e-6)
