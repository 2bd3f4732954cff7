"""The PBC adapter: deterministic, class-stratified pseudo-smears whose images are the source bytes.

Most tests run on a small PBC-shaped tree built here, so the grouping logic is checked everywhere; the
``shared_data`` tests run the adapter on the real images where ../shared/data (HEMA_SHARED_DATA) has them.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest

from hema_pipeline.export.cell_painting import draw_cell
from hema_pipeline.export.format import METADATA_FILE_NAME, parse_smear_metadata
from hema_pipeline.export.pbc import PbcExportSpec, default_shared_data_dir, export_pbc_as_smears
from hema_pipeline.export.synthetic import GeneratedExport
from hema_pipeline.taxonomy import PBC_FOLDER_TO_CLASS
from hema_pipeline_tests.conftest import require_pbc

PER_CLASS = 6
PREFIXES = {
    "basophil": "BA",
    "eosinophil": "EO",
    "erythroblast": "ERB",
    "ig": "MY",
    "lymphocyte": "LY",
    "monocyte": "MO",
    "neutrophil": "SNE",
    "platelet": "PLATELET",
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def fake_pbc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PBC-shaped tree: 8 class folders of small JPEGs, plus files the adapter must skip."""
    root = tmp_path_factory.mktemp("pbc")
    for index, (folder, prefix) in enumerate(sorted(PREFIXES.items())):
        (root / folder).mkdir()
        for number in range(PER_CLASS):
            image = draw_cell(PBC_FOLDER_TO_CLASS[folder], np.random.default_rng([index, number]), size=(48, 48))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=80)
            suffix = ".JPG" if number == PER_CLASS - 1 else ".jpg"  # the suffix's case must not matter
            (root / folder / f"{prefix}_{100 + number}{suffix}").write_bytes(buffer.getvalue())
        (root / folder / "Thumbs.db").write_bytes(b"not an image")
        (root / folder / f"._{prefix}_100.jpg").write_bytes(b"macOS resource fork")
    (root / "manifest.csv").write_text("class,filename,sha256\n")
    return root


def _source_classes(root: Path) -> dict[str, str]:
    """sha256 of every source JPEG -> its class."""
    return {
        _sha256(path.read_bytes()): PBC_FOLDER_TO_CLASS[folder]
        for folder in PBC_FOLDER_TO_CLASS
        for path in (root / folder).iterdir()
        if path.suffix.lower() == ".jpg" and not path.name.startswith(".")
    }


def _grouping(export: GeneratedExport) -> list[tuple[str, list[tuple[str, str]]]]:
    """Per smear: its accession and (class, image sha256) per cell in cell order."""
    return [
        (
            smear.accession,
            [
                (smear.true_classes[cell_id], _sha256((smear.folder / name).read_bytes()))
                for cell_id, name in sorted(smear.image_names.items())
            ],
        )
        for smear in export.smears
    ]


def _digests(export: GeneratedExport, label: str) -> set[str]:
    return {digest for _, cells in _grouping(export) for cell_label, digest in cells if cell_label == label}


def test_every_image_is_copied_unchanged_once_with_its_folder_class(fake_pbc, tmp_path):
    export = export_pbc_as_smears(fake_pbc, tmp_path, PbcExportSpec(cells_per_smear=16))
    sources = _source_classes(fake_pbc)
    copied = [(label, digest) for _, cells in _grouping(export) for label, digest in cells]
    assert len(copied) == 8 * PER_CLASS == len(sources)
    assert sorted(digest for _, digest in copied) == sorted(sources)
    assert all(sources[digest] == label for label, digest in copied)
    # Thumbs.db and the resource forks are not part of the export.
    assert not any(path.name.startswith("._") or path.name == "Thumbs.db" for path in tmp_path.rglob("*"))


def test_smears_are_stratified_and_metadata_parses(fake_pbc, tmp_path):
    export = export_pbc_as_smears(fake_pbc, tmp_path, PbcExportSpec(cells_per_smear=16))
    assert len(export.smears) == 3
    for smear in export.smears:
        assert collections.Counter(smear.true_classes.values()) == {label: 2 for label in PBC_FOLDER_TO_CLASS.values()}
        metadata = parse_smear_metadata((smear.folder / METADATA_FILE_NAME).read_bytes())
        assert metadata.accession == smear.folder.name == smear.accession
        assert metadata.accession.startswith("P")
        assert metadata.patient == smear.patient
        assert len(metadata.cells) == 16
        for cell in metadata.cells:
            assert cell.verified_class == cell.analyser_class == smear.true_classes[cell.cell_id]
            assert cell.image == smear.image_names[cell.cell_id]
            last_name = smear.patient.name.split(",")[0].upper()
            assert cell.image == f"{last_name}_{smear.patient.record_number}_{cell.cell_id:03d}.jpg"
        # Cells are not sorted by class within a smear (an analyser meets them in scan order).
        labels = [smear.true_classes[cell_id] for cell_id in sorted(smear.true_classes)]
        assert labels != sorted(labels)
        assert {METADATA_FILE_NAME, *smear.image_names.values()} == {path.name for path in smear.folder.iterdir()}


def test_grouping_is_deterministic_and_depends_on_the_seed(fake_pbc, tmp_path):
    spec = PbcExportSpec(cells_per_smear=10, max_per_class=4, seed=3)
    first = _grouping(export_pbc_as_smears(fake_pbc, tmp_path / "a", spec))
    second = _grouping(export_pbc_as_smears(fake_pbc, tmp_path / "b", spec))
    other = _grouping(export_pbc_as_smears(fake_pbc, tmp_path / "c", PbcExportSpec(cells_per_smear=10, max_per_class=4, seed=4)))
    assert first == second
    assert first != other
    assert [len(cells) for _, cells in first] == [8, 8, 8, 8]  # 32 images dealt evenly, at most 10 each


def test_caps_and_class_selection(fake_pbc, tmp_path):
    capped = export_pbc_as_smears(fake_pbc, tmp_path / "capped", PbcExportSpec(cells_per_smear=100, max_per_class=2))
    assert [collections.Counter(smear.true_classes.values()) for smear in capped.smears] == [
        {label: 2 for label in PBC_FOLDER_TO_CLASS.values()}
    ]

    chosen = export_pbc_as_smears(fake_pbc, tmp_path / "chosen", PbcExportSpec(cells_per_smear=5, classes=("ig", "platelet")))
    labels = collections.Counter(label for smear in chosen.smears for label in smear.true_classes.values())
    assert labels == {"immature_granulocyte": PER_CLASS, "platelet": PER_CLASS}
    assert len(chosen.smears) == 3

    # A class's sample does not depend on which other classes are included.
    alone = export_pbc_as_smears(fake_pbc, tmp_path / "alone", PbcExportSpec(max_per_class=3, classes=("ig",)))
    mixed = export_pbc_as_smears(fake_pbc, tmp_path / "mixed", PbcExportSpec(max_per_class=3, classes=("ig", "monocyte")))
    assert _digests(alone, "immature_granulocyte") == _digests(mixed, "immature_granulocyte")
    assert len(_digests(alone, "immature_granulocyte")) == 3

    limited = export_pbc_as_smears(fake_pbc, tmp_path / "limited", PbcExportSpec(cells_per_smear=8, max_smears=2))
    assert len(limited.smears) == 2
    assert all(
        collections.Counter(smear.true_classes.values()) == {label: 1 for label in PBC_FOLDER_TO_CLASS.values()}
        for smear in limited.smears
    )


def test_phi_is_planted_in_names_and_metadata(fake_pbc, tmp_path):
    export = export_pbc_as_smears(fake_pbc, tmp_path, PbcExportSpec(cells_per_smear=12))
    needles = export.phi_strings()
    for smear in export.smears:
        text = (smear.folder / METADATA_FILE_NAME).read_text()
        for needle in (smear.patient.name, smear.patient.record_number, smear.accession, smear.comment):
            assert needle in needles and needle in text
        assert all(smear.patient.record_number in name for name in smear.image_names.values())


def test_invalid_specs_and_missing_folders_are_reported(fake_pbc, tmp_path):
    with pytest.raises(ValueError, match="unknown PBC class"):
        PbcExportSpec(classes=("neutrophil", "blast"))
    with pytest.raises(ValueError):
        PbcExportSpec(cells_per_smear=0)
    with pytest.raises(ValueError):
        PbcExportSpec(max_per_class=0)
    with pytest.raises(ValueError):
        PbcExportSpec(classes=())
    with pytest.raises(ValueError):
        PbcExportSpec(seed=-1)
    with pytest.raises(FileNotFoundError, match="basophil"):
        export_pbc_as_smears(tmp_path / "nowhere", tmp_path / "out", PbcExportSpec())
    empty = tmp_path / "empty_pbc"
    (empty / "platelet").mkdir(parents=True)
    (empty / "platelet" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="no JPEG"):
        export_pbc_as_smears(empty, tmp_path / "out", PbcExportSpec(classes=("platelet",)))


def test_default_shared_data_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HEMA_SHARED_DATA", str(tmp_path / "elsewhere"))
    assert default_shared_data_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("HEMA_SHARED_DATA")
    monkeypatch.chdir(tmp_path)
    assert default_shared_data_dir() == (tmp_path / ".." / "shared" / "data").resolve()


@pytest.mark.shared_data
def test_real_pbc_images_become_deterministic_stratified_smears(tmp_path):
    pbc_root = require_pbc()
    manifest = {}
    with (pbc_root / "manifest.csv").open(newline="") as stream:
        for row in csv.DictReader(stream):
            manifest[row["sha256"]] = PBC_FOLDER_TO_CLASS[row["class"]]

    spec = PbcExportSpec(cells_per_smear=10, max_per_class=5, seed=1)
    export = export_pbc_as_smears(pbc_root, tmp_path / "a", spec)
    again = export_pbc_as_smears(pbc_root, tmp_path / "b", spec)

    assert _grouping(export) == _grouping(again)
    assert len(export.smears) == 4
    cells = [cell for _, smear_cells in _grouping(export) for cell in smear_cells]
    assert len(cells) == 40 and len({digest for _, digest in cells}) == 40
    # Bytes unchanged: every copy is a file of the manifest, under the class of its folder.
    assert all(manifest[digest] == label for label, digest in cells)
    assert collections.Counter(label for label, _ in cells) == {label: 5 for label in PBC_FOLDER_TO_CLASS.values()}
    for smear in export.smears:
        assert set(smear.true_classes.values()) == set(PBC_FOLDER_TO_CLASS.values())
        metadata = parse_smear_metadata((smear.folder / METADATA_FILE_NAME).read_bytes())
        assert [cell.verified_class for cell in metadata.cells] == [smear.true_classes[cell.cell_id] for cell in metadata.cells]
