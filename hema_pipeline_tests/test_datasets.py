"""Tasks, patient-grouped splits, cross-split near-duplicates and dataset versions, on synthetic cohorts
and images made here."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from hema_pipeline.datasets import near_duplicates
from hema_pipeline.datasets.augmentation import AugmentationConfig
from hema_pipeline.datasets.near_duplicates import (
    PAIR_COLUMNS,
    cached_perceptual_hashes,
    cross_split_near_duplicates_in_manifest,
    find_cross_split_near_duplicates,
    hash_files,
    hash_stored_images,
    perceptual_hash_of_bytes,
)
from hema_pipeline.datasets.splits import SPLIT_NAMES, SplitFractions, split_by_patient
from hema_pipeline.datasets.tasks import (
    MONO_POLY,
    NEUTROPHIL_DYSPLASIA,
    PBC8,
    TASKS,
    Task,
    TaskDataError,
    get_task,
    require_trainable,
    task_coverage,
)
from hema_pipeline.datasets.versioning import (
    DatasetConfig,
    build_dataset,
    dataset_version,
    manifest_key,
    read_manifest,
    read_manifest_parquet,
    write_dataset,
)
from hema_pipeline.storage.object_store import LocalObjectStore
from hema_pipeline.storage.warehouse import Warehouse
from hema_pipeline.taxonomy import CELL_CLASSES

# --- synthetic cohorts -------------------------------------------------------------------------------------

CLASS_WEIGHTS = {  # roughly a differential: many neutrophils and lymphocytes, few basophils
    "neutrophil": 30,
    "hypogranulated_neutrophil": 4,
    "eosinophil": 6,
    "basophil": 2,
    "lymphocyte": 25,
    "malignant_lymphocyte": 4,
    "monocyte": 10,
    "immature_granulocyte": 6,
    "erythroblast": 5,
    "platelet": 8,
}


def cohort(patients: int, seed: int = 0, cells: tuple[int, int] = (20, 120)) -> pd.DataFrame:
    """Cell rows for ``patients`` patients (one smear each), each with its own class mix."""
    rng = np.random.default_rng(seed)
    base = np.array([CLASS_WEIGHTS[name] for name in CELL_CLASSES], dtype=float)
    rows = []
    for patient in range(patients):
        mix = rng.dirichlet(base / base.sum() * 30)
        patient_id = "P" + hashlib.sha256(f"p{seed}-{patient}".encode()).hexdigest()[:20]
        smear_id = "S" + hashlib.sha256(f"s{seed}-{patient}".encode()).hexdigest()[:20]
        for cell in range(int(rng.integers(*cells))):
            label = CELL_CLASSES[int(rng.choice(len(CELL_CLASSES), p=mix))]
            sha = hashlib.sha256(f"{smear_id}:{cell}".encode()).hexdigest()
            rows.append(
                {
                    "cell_uid": f"{smear_id}:{cell}",
                    "smear_id": smear_id,
                    "patient_id": patient_id,
                    "image_sha256": sha,
                    "image_key": f"images/{sha[:2]}/{sha}.jpg",
                    "analyser_class": label,
                    "verified_class": label,
                }
            )
    return pd.DataFrame(rows)


# --- tasks ---------------------------------------------------------------------------------------------------


def test_configured_tasks_map_only_their_classes():
    assert set(TASKS) == {"pbc8", "wbc4", "mono_poly", "lymphocyte_malignancy", "neutrophil_dysplasia"}
    assert PBC8.num_classes == 8
    assert PBC8.task_class_of("hypogranulated_neutrophil") is None
    assert PBC8.task_class_of("malignant_lymphocyte") is None
    assert get_task("wbc4").classes == ("eosinophil", "lymphocyte", "monocyte", "neutrophil")
    assert MONO_POLY.source_labels("mononuclear") == ("lymphocyte", "monocyte")
    assert MONO_POLY.source_labels("polynuclear") == ("neutrophil", "eosinophil", "basophil")
    assert get_task("lymphocyte_malignancy").classes == ("lymphocyte", "malignant_lymphocyte")
    assert NEUTROPHIL_DYSPLASIA.architecture_hint == "compact"
    assert (PBC8.architecture_hint, PBC8.image_size) == ("efficientnet_lite0", 128)  # pretrained, as measured
    assert NEUTROPHIL_DYSPLASIA.image_size == 96
    with pytest.raises(KeyError, match="unknown task"):
        get_task("pbc9")


def test_tasks_learn_from_verified_labels_only():
    cells = pd.DataFrame(
        {
            "cell_uid": ["a", "b", "c", "d", "e"],
            "patient_id": ["p1"] * 5,
            "analyser_class": ["neutrophil", "lymphocyte", "basophil", "neutrophil", "neutrophil"],
            "verified_class": [None, "monocyte", "basophil", "hypogranulated_neutrophil", "neutrophil"],
        }
    )
    selected = MONO_POLY.select_rows(cells)
    assert list(selected["cell_uid"]) == ["b", "c", "e"]  # unverified and unmapped cells are excluded
    assert list(selected["label"]) == ["mononuclear", "polynuclear", "polynuclear"]
    assert list(selected["label_index"]) == [0, 1, 1]
    dysplasia = NEUTROPHIL_DYSPLASIA.select_rows(cells)
    assert list(dysplasia["label"]) == ["hypogranulated_neutrophil", "neutrophil"]


def test_invalid_task_definitions_are_refused():
    with pytest.raises(ValueError, match="not in the taxonomy"):
        Task("t", ("a", "b"), {"blast": "a", "neutrophil": "b"}, "compact", 96, "")
    with pytest.raises(ValueError, match="no import label maps"):
        Task("t", ("a", "b"), {"neutrophil": "a"}, "compact", 96, "")
    with pytest.raises(ValueError, match="does not declare"):
        Task("t", ("a", "b"), {"neutrophil": "a", "monocyte": "b", "basophil": "c"}, "compact", 96, "")
    with pytest.raises(ValueError, match="unknown architecture hint"):
        Task("t", ("a", "b"), {"neutrophil": "a", "monocyte": "b"}, "vgg16", 96, "")
    with pytest.raises(ValueError, match="too small to show a cell"):
        Task("t", ("a", "b"), {"neutrophil": "a", "monocyte": "b"}, "compact", 4, "")


def test_coverage_names_missing_and_scarce_classes():
    cells = cohort(12, seed=3)
    cells = cells[cells["verified_class"] != "platelet"]
    # basophils: keep a handful, all from one patient
    basophils = cells["verified_class"] == "basophil"
    one_patient = cells.loc[basophils, "patient_id"].iloc[0]
    cells = cells[~basophils | (cells["patient_id"] == one_patient)]
    coverage = task_coverage(PBC8, cells, min_cells_per_class=5, min_patients_per_class=2)
    assert coverage.missing_classes == ("platelet",)
    assert coverage.scarce_classes == ("basophil",)
    assert coverage.insufficient_classes == ("basophil", "platelet")
    assert not coverage.is_trainable
    with pytest.raises(TaskDataError, match="platelet") as raised:
        require_trainable(coverage)
    assert raised.value.coverage is coverage
    assert "basophil has" in str(raised.value)

    wbc4 = task_coverage(get_task("wbc4"), cells, min_cells_per_class=5, min_patients_per_class=2)
    assert wbc4.is_trainable and wbc4.insufficient_classes == ()
    require_trainable(wbc4)
    assert sum(wbc4.cell_counts().values()) == cells["verified_class"].isin(get_task("wbc4").classes).sum()


# --- splits --------------------------------------------------------------------------------------------------


def _patients_per_split(rows: pd.DataFrame, assignments: pd.Series) -> pd.Series:
    return rows.assign(split=assignments).groupby("patient_id")["split"].nunique()


def test_split_keeps_patients_whole_and_classes_stratified():
    rows = PBC8.select_rows(cohort(120, seed=1))
    fractions = SplitFractions()
    result = split_by_patient(rows, fractions=fractions, seed=7, class_order=PBC8.classes)
    assert (_patients_per_split(rows, result.assignments) == 1).all()
    assert result.assignments.index.equals(rows.index)
    assert list(result.class_counts.index) == list(SPLIT_NAMES)
    assert list(result.class_counts.columns) == list(PBC8.classes)
    assert int(result.class_counts.to_numpy().sum()) == len(rows)
    assert sum(result.cell_counts().values()) == len(rows)
    assert sum(result.patient_counts.values()) == rows["patient_id"].nunique()
    shares = result.class_shares()
    for split, target in fractions.as_dict().items():
        deviation = (shares.loc[split] - target).abs().max()
        assert deviation < 0.03, f"{split}: a class share is {deviation:.3f} off its target {target}"
    report = result.report()
    assert report["train"]["neutrophil"] == int(result.class_counts.loc["train", "neutrophil"])


def test_split_is_deterministic_by_seed_and_independent_of_row_order():
    rows = PBC8.select_rows(cohort(60, seed=2))
    first = split_by_patient(rows, seed=11)
    again = split_by_patient(rows, seed=11)
    assert first.assignments.equals(again.assignments)
    shuffled = rows.sample(frac=1.0, random_state=5)
    reordered = split_by_patient(shuffled, seed=11)
    assert reordered.assignments.reindex(rows.index).equals(first.assignments)
    other = split_by_patient(rows, seed=12)
    assert not other.assignments.equals(first.assignments)
    assert (_patients_per_split(rows, other.assignments) == 1).all()


def test_small_cohorts_fill_every_split_and_too_small_ones_are_refused():
    rows = PBC8.select_rows(cohort(4, seed=4))
    result = split_by_patient(rows, seed=0)
    assert all(count == 1 for count in result.patient_counts.values())
    with pytest.raises(ValueError, match="3 patients cannot fill 4 splits"):
        split_by_patient(PBC8.select_rows(cohort(3, seed=4)), seed=0)
    no_calibration = SplitFractions(train=0.7, validation=0.15, calibration=0.0, test=0.15)
    three = split_by_patient(PBC8.select_rows(cohort(3, seed=4)), fractions=no_calibration)
    assert three.patient_counts["calibration"] == 0 and three.cell_counts()["calibration"] == 0


def test_split_fractions_are_validated():
    with pytest.raises(ValueError, match="sum to 1"):
        SplitFractions(0.5, 0.2, 0.1, 0.1)
    with pytest.raises(ValueError, match="negative"):
        SplitFractions(0.8, 0.3, -0.1, 0.0)
    with pytest.raises(ValueError, match="missing values"):
        split_by_patient(pd.DataFrame({"label": ["a", None], "patient_id": ["p", "q"]}))


# --- near duplicates -----------------------------------------------------------------------------------------


def cell_image(seed: int, size: tuple[int, int] = (360, 363)) -> Image.Image:
    """A smear-like picture: pink background, pale red cells, one dark nucleus of random shape."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (232, 200, 210))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(8, 16))):
        x, y, r = rng.integers(0, size[0]), rng.integers(0, size[1]), rng.integers(25, 45)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(214, 150, 165), outline=(190, 120, 140), width=4)
    cx, cy = rng.integers(120, 240, size=2)
    for _ in range(int(rng.integers(2, 5))):
        dx, dy, r = rng.integers(-40, 40), rng.integers(-40, 40), rng.integers(20, 50)
        draw.ellipse((cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r), fill=(90, 50, 140))
    return image


def jpeg_bytes(image: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def test_finder_catches_a_reencoded_resized_copy_across_splits_only():
    originals = [cell_image(seed) for seed in range(12)]
    data = [jpeg_bytes(image) for image in originals]
    # cell 3 again, re-exported: 5% smaller and re-encoded at a lower quality
    copy = originals[3].resize((342, 345), Image.Resampling.BILINEAR)
    data.append(jpeg_bytes(copy, quality=70))
    # cell 5 again in its own split: a within-split duplicate is not a leak
    data.append(jpeg_bytes(originals[5], quality=80))
    uids = [f"cell-{index}" for index in range(12)] + ["copy-of-3", "copy-of-5"]
    splits = ["train"] * 6 + ["validation"] * 2 + ["calibration"] * 2 + ["test"] * 2 + ["test", "train"]
    hashes = [perceptual_hash_of_bytes(item) for item in data]

    pairs = find_cross_split_near_duplicates(uids, splits, hashes)
    assert list(pairs.columns) == list(PAIR_COLUMNS)
    assert len(pairs) == 1, pairs
    pair = pairs.iloc[0]
    assert {pair["cell_uid_a"], pair["cell_uid_b"]} == {"cell-3", "copy-of-3"}
    assert {pair["split_a"], pair["split_b"]} == {"train", "test"}
    assert pair["distance"] <= near_duplicates.DEFAULT_MAX_DISTANCE
    # the distinct images are far apart, not just outside the threshold
    distinct = np.array(hashes[:12], dtype=np.uint64)
    distances = near_duplicates.hamming_distances(distinct, distinct)
    assert distances[~np.eye(12, dtype=bool)].min() > 2 * near_duplicates.DEFAULT_MAX_DISTANCE


def test_finder_matches_brute_force_across_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=400, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, size=400, dtype=np.uint64)
    # plant near copies: flip 0-5 random bits of 60 hashes
    for index in range(60):
        copy = int(hashes[index])
        for bit in rng.choice(64, size=int(rng.integers(0, 6)), replace=False):
            copy ^= 1 << int(bit)
        hashes = np.append(hashes, np.uint64(copy))
    uids = [f"c{index:03d}" for index in range(len(hashes))]
    splits = list(rng.choice(SPLIT_NAMES, size=len(hashes)))
    monkeypatch.setattr(near_duplicates, "_BLOCK_ELEMENTS", 1000)  # force many small blocks
    found = find_cross_split_near_duplicates(uids, splits, hashes, max_distance=4)

    expected = set()
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            distance = bin(int(hashes[i]) ^ int(hashes[j])).count("1")
            if splits[i] != splits[j] and distance <= 4:
                expected.add((frozenset((uids[i], uids[j])), distance))
    got = {(frozenset((row.cell_uid_a, row.cell_uid_b)), int(row.distance)) for row in found.itertuples()}
    assert got == expected
    assert len(expected) > 20  # the planted copies that landed in different splits
    assert (found["split_a"] < found["split_b"]).all()
    assert found["distance"].is_monotonic_increasing


def test_finder_scales_to_twenty_thousand_images():
    import time

    rng = np.random.default_rng(1)
    hashes = rng.integers(0, np.iinfo(np.uint64).max, size=20_000, dtype=np.uint64, endpoint=True)
    splits = rng.choice(SPLIT_NAMES, size=len(hashes))
    started = time.perf_counter()
    pairs = find_cross_split_near_duplicates([str(i) for i in range(len(hashes))], splits, hashes)
    assert time.perf_counter() - started < 10.0
    assert pairs.empty and list(pairs.columns) == list(PAIR_COLUMNS)


def test_hashes_from_files_and_stores_agree_and_are_cached_by_content(tmp_path):
    store = LocalObjectStore(tmp_path / "lake")
    rows = []
    for seed in range(5):
        data = jpeg_bytes(cell_image(seed))
        sha = hashlib.sha256(data).hexdigest()
        key = f"images/{sha[:2]}/{sha}.jpg"
        store.put_bytes(key, data)
        rows.append({"image_sha256": sha, "image_key": key})
    images = pd.DataFrame(rows + rows[:1], index=[10, 11, 12, 13, 14, 15])  # one image used twice
    from_files = hash_files([store.local_path(row["image_key"]) for row in rows])
    from_store = hash_stored_images(store, [row["image_key"] for row in rows])
    assert from_files.dtype == np.uint64 and np.array_equal(from_files, from_store)

    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    with warehouse.connect() as connection:
        first = cached_perceptual_hashes(connection, store, images)
    assert list(first.index) == [10, 11, 12, 13, 14, 15]
    assert np.array_equal(first.to_numpy()[:5], from_files) and first.iloc[5] == first.iloc[0]
    for row in rows:  # with the images gone, the hashes can only come from the warehouse
        store.delete(row["image_key"])
    with warehouse.connect() as connection:
        second = cached_perceptual_hashes(connection, store, images)
    assert second.equals(first)
    assert int(warehouse.query("select count(*) as n from image_perceptual_hashes")["n"].iloc[0]) == 5


def test_manifest_check_finds_a_duplicate_planted_across_splits(tmp_path):
    store = LocalObjectStore(tmp_path / "lake")
    rows = []
    images = [jpeg_bytes(cell_image(seed)) for seed in range(6)]
    images.append(jpeg_bytes(cell_image(2).resize((350, 353)), quality=75))  # cell 2 exported again
    for index, data in enumerate(images):
        sha = hashlib.sha256(data).hexdigest()
        key = f"images/{sha[:2]}/{sha}.jpg"
        store.put_bytes(key, data)
        split = "test" if index == 6 else SPLIT_NAMES[index % 3]
        rows.append({"cell_uid": f"S1:{index}", "split": split, "image_sha256": sha, "image_key": key})
    manifest = pd.DataFrame(rows)
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    with warehouse.connect() as connection:
        pairs = cross_split_near_duplicates_in_manifest(connection, store, manifest)
        clean = cross_split_near_duplicates_in_manifest(connection, store, manifest.iloc[:6])
    found = [(row.cell_uid_a, row.split_a, row.cell_uid_b, row.split_b) for row in pairs.itertuples()]
    assert found == [("S1:2", "calibration", "S1:6", "test")]
    assert clean.empty


# --- versions and manifests ----------------------------------------------------------------------------------

CONFIG = DatasetConfig(task="wbc4", seed=3, image_size=64)


def test_dataset_version_is_stable_and_tracks_content_and_config():
    built = build_dataset(cohort(30, seed=5), CONFIG, min_cells_per_class=5)
    rows = built.manifest
    version = dataset_version(rows, CONFIG)
    assert version == built.dataset_version and version.startswith("wbc4-")
    assert build_dataset(cohort(30, seed=5), CONFIG, min_cells_per_class=5).dataset_version == version  # a re-run
    assert dataset_version(rows.sample(frac=1.0, random_state=1), CONFIG) == version  # row order

    relabelled = rows.copy()
    relabelled.loc[0, "label"] = "monocyte" if relabelled.loc[0, "label"] != "monocyte" else "lymphocyte"
    assert dataset_version(relabelled, CONFIG) != version
    rehashed = rows.copy()
    rehashed.loc[0, "image_sha256"] = "0" * 64
    assert dataset_version(rehashed, CONFIG) != version
    moved = rows.copy()
    moved.loc[0, "split"] = "test" if moved.loc[0, "split"] != "test" else "train"
    assert dataset_version(moved, CONFIG) != version
    assert dataset_version(rows.iloc[1:], CONFIG) != version

    for changed in (
        dataclasses.replace(CONFIG, seed=4),
        dataclasses.replace(CONFIG, image_size=96),
        dataclasses.replace(CONFIG, augmentation=AugmentationConfig(hue=0.05)),
        dataclasses.replace(CONFIG, fractions=SplitFractions(0.7, 0.1, 0.1, 0.1)),
        dataclasses.replace(CONFIG, balance_classes=False),
    ):
        assert dataset_version(rows, changed) != version
    with pytest.raises(ValueError, match="more than once"):
        dataset_version(pd.concat([rows, rows.iloc[:1]]), CONFIG)


def test_config_round_trips_through_json():
    config = DatasetConfig(
        task="pbc8", fractions=SplitFractions(0.7, 0.1, 0.05, 0.15), seed=9, augmentation=AugmentationConfig(zoom=0.2)
    )
    assert DatasetConfig.from_json(config.to_json()) == config
    assert config.to_json() == DatasetConfig.from_json(config.to_json()).to_json()
    with pytest.raises(KeyError):
        DatasetConfig(task="nonsense")


def test_build_refuses_a_task_without_data():
    cells = cohort(20, seed=6)
    cells = cells[cells["verified_class"] != "malignant_lymphocyte"]
    with pytest.raises(TaskDataError, match="malignant_lymphocyte"):
        build_dataset(cells, DatasetConfig(task="lymphocyte_malignancy"), min_cells_per_class=5)


def test_manifest_is_written_idempotently_to_the_lake_and_the_warehouse(tmp_path):
    import datetime as dt

    built = build_dataset(cohort(30, seed=8), CONFIG, min_cells_per_class=5)
    store = LocalObjectStore(tmp_path / "lake")
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    first = write_dataset(built, store, warehouse, now=dt.datetime(2026, 1, 1, 12, 0))
    second = write_dataset(built, store, warehouse, now=dt.datetime(2026, 2, 1, 12, 0))
    assert second.created_at == first.created_at == dt.datetime(2026, 1, 1, 12, 0)
    assert first.manifest_key == manifest_key("wbc4", built.dataset_version)

    stored = read_manifest(warehouse, built.dataset_version)
    assert len(stored) == len(built.manifest) == first.cell_count
    pd.testing.assert_frame_equal(stored.astype(str).reset_index(drop=True), built.manifest.astype(str).reset_index(drop=True))
    parquet = read_manifest_parquet(store, "wbc4", built.dataset_version)
    pd.testing.assert_frame_equal(parquet, built.manifest)
    versions = warehouse.query("select * from dataset_versions")
    assert len(versions) == 1 and versions["config_json"].iloc[0] == CONFIG.to_json()
    assert versions["cell_count"].iloc[0] == len(built.manifest)
    assert (built.manifest.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(built.manifest["label"]) == set(get_task("wbc4").classes)
    assert os.path.isfile(store.local_path(first.manifest_key))


@pytest.mark.shared_data
def test_finder_catches_the_duplicate_monocyte_in_the_real_pbc_set():
    """PBC holds one monocyte photographed twice under two names (a few pixels apart, different bytes):
    exactly the leak a byte hash misses. Among its neighbours in the folder it is the only pair found."""
    from hema_pipeline_tests.conftest import require_pbc

    folder = require_pbc() / "monocyte"
    twins = [folder / "MO_231316.jpg", folder / "MO_415531.jpg"]
    if not all(path.is_file() for path in twins):
        pytest.skip(f"the duplicate monocyte pair is not in {folder}")
    others = [path for path in sorted(folder.glob("*.jpg")) if path not in twins][:40]
    paths = [*twins, *others]
    assert hashlib.sha256(twins[0].read_bytes()).digest() != hashlib.sha256(twins[1].read_bytes()).digest()
    hashes = hash_files(paths)
    splits = ["train", "test"] + ["validation" if index % 2 else "test" for index in range(len(others))]
    pairs = find_cross_split_near_duplicates([path.name for path in paths], splits, hashes)
    assert [(row.cell_uid_a, row.cell_uid_b) for row in pairs.itertuples()] in (
        [("MO_231316.jpg", "MO_415531.jpg")],
        [("MO_415531.jpg", "MO_231316.jpg")],
    )
