"""The synthetic export generator: determinism, format, class mix, planted PHI, learnable images."""

from __future__ import annotations

import collections
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image
from sklearn.neighbors import NearestCentroid

import hema_pipeline
from hema_pipeline.anonymise.images import clean_cell_image
from hema_pipeline.export.cell_painting import CELL_IMAGE_SIZE, draw_cell
from hema_pipeline.export.format import METADATA_FILE_NAME, parse_smear_metadata
from hema_pipeline.export.synthetic import (
    ANALYSER_CONFUSIONS,
    FEMALE_FIRST_NAMES,
    LAST_NAMES,
    MALE_FIRST_NAMES,
    GeneratedExport,
    SyntheticExportSpec,
    generate_export,
    name_parts,
)
from hema_pipeline.taxonomy import (
    CELL_CLASSES,
    HYPOGRANULATED_NEUTROPHIL,
    LYMPHOCYTE,
    MALIGNANT_LYMPHOCYTE,
    NEUTROPHIL,
    PBC_FOLDER_TO_CLASS,
)
from hema_pipeline_tests.phi import byte_hits

PBC_CLASSES = sorted(set(PBC_FOLDER_TO_CLASS.values()))


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def default_export(tmp_path_factory: pytest.TempPathFactory) -> GeneratedExport:
    """The default spec (6 smears x 100 cells), generated once for the tests that only read it."""
    return generate_export(tmp_path_factory.mktemp("default_export"), SyntheticExportSpec())


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path):
    spec = SyntheticExportSpec(smears=3, cells_per_smear=8, seed=7, dysplastic_smear_share=0.3, verified_share=0.5)
    first = generate_export(tmp_path / "a", spec)
    second = generate_export(tmp_path / "b", spec)
    other = generate_export(tmp_path / "c", SyntheticExportSpec(smears=3, cells_per_smear=8, seed=8))

    first_files = _files(first.root)
    assert len(first_files) == 3 * (8 + 1)
    assert first_files == _files(second.root)
    assert first.phi_strings() == second.phi_strings()
    other_files = _files(other.root)
    assert not set(first_files) & set(other_files)
    assert not set(first_files.values()) & set(other_files.values())


def test_regenerating_into_the_same_folder_rewrites_the_same_export(tmp_path):
    spec = SyntheticExportSpec(smears=2, cells_per_smear=4, seed=3)
    generate_export(tmp_path, spec)
    before = _files(tmp_path)
    again = generate_export(tmp_path, spec)
    assert _files(tmp_path) == before
    # Only the smear folders: the hidden staging folders are gone.
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(smear.accession for smear in again.smears)


def test_metadata_round_trips_and_matches_the_files(tmp_path):
    export = generate_export(tmp_path, SyntheticExportSpec(smears=4, cells_per_smear=10, seed=1, verified_share=0.6))
    assert len({smear.accession for smear in export.smears}) == 4
    for smear in export.smears:
        assert smear.folder == tmp_path / smear.accession
        metadata = parse_smear_metadata((smear.folder / METADATA_FILE_NAME).read_bytes())
        assert metadata.accession == smear.accession
        assert metadata.patient == smear.patient
        assert metadata.comment == smear.comment
        assert metadata.analyser_id.startswith("DM96-0")
        assert metadata.collected_at.year == 2026
        assert 1930 <= metadata.patient.birth_date.year <= 2005
        assert metadata.patient.record_number.startswith("MRN") and len(metadata.patient.record_number) == 11
        assert [cell.cell_id for cell in metadata.cells] == sorted(smear.true_classes)
        assert {cell.image for cell in metadata.cells} | {METADATA_FILE_NAME} == {p.name for p in smear.folder.iterdir()}
        for cell in metadata.cells:
            assert cell.image == smear.image_names[cell.cell_id]
            assert cell.analyser_class in CELL_CLASSES
            assert cell.verified_class in (None, smear.true_classes[cell.cell_id])


@pytest.mark.slow  # generates a full default export
def test_default_export_holds_every_pbc_class_and_repeat_patients(default_export):
    counts = collections.Counter(label for smear in default_export.smears for label in smear.true_classes.values())
    assert sum(counts.values()) == 600
    for label in PBC_CLASSES:
        assert counts[label] >= 10, f"{label}: only {counts[label]} cells"
    assert counts[NEUTROPHIL] > counts[LYMPHOCYTE] > counts["monocyte"] > counts["basophil"]
    assert counts[MALIGNANT_LYMPHOCYTE] == 0  # no malignant smears asked for
    patients = collections.Counter(smear.patient.record_number for smear in default_export.smears)
    assert sorted(patients.values()) == [1, 1, 1, 1, 2]


def test_images_are_360x363_rgb_jpegs_the_importer_accepts(default_export):
    smear = default_export.smears[0]
    for name in list(smear.image_names.values())[:25]:
        data = (smear.folder / name).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == CELL_IMAGE_SIZE == (360, 363)
        clean = clean_cell_image(data)
        assert (clean.width, clean.height) == CELL_IMAGE_SIZE
        assert smear.patient.record_number.encode() not in clean.jpeg and smear.accession.encode() not in clean.jpeg


def test_dysplastic_and_malignant_smears_differ_from_healthy_ones(tmp_path):
    spec = SyntheticExportSpec(smears=4, cells_per_smear=50, seed=5, dysplastic_smear_share=0.5, malignant_smear_share=0.25)
    export = generate_export(tmp_path, spec)
    assert sum(smear.dysplastic for smear in export.smears) == 2
    assert sum(smear.malignant for smear in export.smears) == 1

    def hypogranulated_share(smear) -> float:
        labels = list(smear.true_classes.values())
        return labels.count(HYPOGRANULATED_NEUTROPHIL) / (labels.count(HYPOGRANULATED_NEUTROPHIL) + labels.count(NEUTROPHIL))

    dysplastic = [hypogranulated_share(smear) for smear in export.smears if smear.dysplastic]
    healthy = [hypogranulated_share(smear) for smear in export.smears if not smear.dysplastic]
    assert min(dysplastic) > max(healthy)
    assert all(0.15 <= share <= 0.55 for share in dysplastic)
    assert all(share <= 0.08 for share in healthy)  # 0-5 %, give or take the rounding to whole cells
    for smear in export.smears:
        malignant_cells = list(smear.true_classes.values()).count(MALIGNANT_LYMPHOCYTE)
        assert (malignant_cells > 0) == smear.malignant


def test_verified_share_is_respected_and_does_not_change_the_images(tmp_path):
    by_share = {}
    for share in (0.0, 0.25, 1.0):
        export = generate_export(
            tmp_path / str(share), SyntheticExportSpec(smears=2, cells_per_smear=20, seed=9, verified_share=share)
        )
        verified = []
        for smear in export.smears:
            cells = parse_smear_metadata((smear.folder / METADATA_FILE_NAME).read_bytes()).cells
            verified.append(sum(cell.verified_class is not None for cell in cells))
        by_share[share] = (verified, export)
    assert by_share[0.0][0] == [0, 0]
    assert by_share[0.25][0] == [5, 5]
    assert by_share[1.0][0] == [20, 20]
    images = [
        {name: data for name, data in _files(export.root).items() if name.endswith(".jpg")} for _, export in by_share.values()
    ]
    assert images[0] == images[1] == images[2]


def test_analyser_agrees_at_the_asked_rate_and_confuses_plausibly(default_export, tmp_path):
    agree = disagree = 0
    for smear in default_export.smears:
        for cell in parse_smear_metadata((smear.folder / METADATA_FILE_NAME).read_bytes()).cells:
            truth = smear.true_classes[cell.cell_id]
            if cell.analyser_class == truth:
                agree += 1
            else:
                disagree += 1
                assert cell.analyser_class in ANALYSER_CONFUSIONS[truth]
    # 600 cells at p = 0.88: the standard error is 0.013.
    assert 0.82 <= agree / (agree + disagree) <= 0.94

    exact = generate_export(tmp_path, SyntheticExportSpec(smears=1, cells_per_smear=30, seed=2, analyser_agreement=1.0))
    cells = parse_smear_metadata((exact.smears[0].folder / METADATA_FILE_NAME).read_bytes()).cells
    assert all(cell.analyser_class == exact.smears[0].true_classes[cell.cell_id] for cell in cells)


def test_class_mix_override_is_used(tmp_path):
    export = generate_export(
        tmp_path, SyntheticExportSpec(smears=2, cells_per_smear=20, seed=4, class_mix={LYMPHOCYTE: 3.0, "eosinophil": 1.0})
    )
    labels = collections.Counter(label for smear in export.smears for label in smear.true_classes.values())
    assert set(labels) == {LYMPHOCYTE, "eosinophil"}
    assert labels[LYMPHOCYTE] > labels["eosinophil"] > 0


@pytest.mark.parametrize(
    "bad",
    [
        {"smears": 0},
        {"cells_per_smear": 0},
        {"seed": -1},
        {"verified_share": 1.5},
        {"analyser_agreement": -0.1},
        {"class_mix": {"smudge cell": 1.0}},
        {"class_mix": {LYMPHOCYTE: 0.0}},
    ],
)
def test_invalid_spec_is_rejected(bad):
    with pytest.raises(ValueError):
        SyntheticExportSpec(**bad)


def test_phi_is_planted_in_file_names_exif_comments_and_metadata(tmp_path):
    export = generate_export(tmp_path, SyntheticExportSpec(smears=3, cells_per_smear=4, seed=21))
    for smear in export.smears:
        patient = smear.patient
        last_name = patient.name.split(",")[0]
        for cell_id, name in smear.image_names.items():
            assert name == f"{last_name.upper()}_{patient.record_number}_{cell_id:03d}.jpg"
            with Image.open(smear.folder / name) as image:
                exif = image.getexif()
                description = exif[ExifTags.Base.ImageDescription]
                assert patient.name in description and patient.record_number in description
                assert patient.birth_date.strftime("%Y:%m:%d") in description
                assert exif[ExifTags.Base.Artist] == patient.name
                assert exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal].startswith("2026:")
                assert smear.accession.encode() in image.info["comment"]
        assert any(part in smear.comment for part in name_parts(patient.name))

    needles = export.phi_strings()
    # Every listed identifier is really in the export (so the downstream canary searches for something
    # that is there to leak), and each smear contributes its own.
    assert {needle for _, needle in byte_hits([tmp_path], needles)} == set(needles)
    for smear in export.smears:
        assert {smear.patient.name, smear.patient.record_number, smear.accession, smear.comment} <= set(needles)
        assert smear.patient.birth_date.isoformat() in needles
        last_name, first_name = smear.patient.name.split(", ")
        assert {last_name, first_name} <= set(needles)
    # Each image file carries the record number itself (EXIF), not only its name.
    first = export.smears[0]
    for name in first.image_names.values():
        assert byte_hits([first.folder / name], [first.patient.record_number])


def test_fake_names_cannot_match_the_pipelines_own_text():
    """The canary searches Dagster's storage, which holds the pipeline's docstrings and log messages; a
    fake name that occurs in them would be a false alarm."""
    package = Path(hema_pipeline.__file__).parent
    own_text = "\n".join(
        path.read_text(encoding="utf-8").lower()
        for path in sorted(package.rglob("*"))
        if path.suffix in (".py", ".sql") and path.name != "synthetic.py"
    )
    names = [*FEMALE_FIRST_NAMES, *MALE_FIRST_NAMES, *LAST_NAMES]
    assert all(len(name) >= 4 for name in names)
    assert [name for name in names if name.lower() in own_text] == []


def test_draw_cell_is_deterministic_and_rejects_unknown_classes():
    first = draw_cell(NEUTROPHIL, np.random.default_rng(3))
    again = draw_cell(NEUTROPHIL, np.random.default_rng(3))
    other = draw_cell(NEUTROPHIL, np.random.default_rng(4))
    assert first.size == CELL_IMAGE_SIZE and first.mode == "RGB"
    assert first.tobytes() == again.tobytes() != other.tobytes()
    assert draw_cell(LYMPHOCYTE, np.random.default_rng(3), size=(128, 96)).size == (128, 96)
    with pytest.raises(ValueError, match="unknown cell class"):
        draw_cell("smudge cell", np.random.default_rng(0))


def _pixels(cell_class: str, seed: int, count: int) -> list[np.ndarray]:
    images = (draw_cell(cell_class, np.random.default_rng([seed, CELL_CLASSES.index(cell_class), i])) for i in range(count))
    return [np.asarray(image.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32).ravel() / 255 for image in images]


@pytest.mark.slow  # fits a classifier on generated images
def test_classes_are_learnable_from_downsampled_pixels():
    """A nearest-centroid classifier on 32x32 pixels (chance: 1/8) must separate the PBC classes, and
    hypogranulated from normal neutrophils: the images carry class information, not just noise."""
    train_x, train_y, test_x, test_y = [], [], [], []
    for label in PBC_CLASSES:
        train_x += _pixels(label, 1, 20)
        train_y += [label] * 20
        test_x += _pixels(label, 2, 10)
        test_y += [label] * 10
    classifier = NearestCentroid().fit(np.array(train_x), train_y)
    assert classifier.score(np.array(test_x), test_y) >= 0.6

    pair = (NEUTROPHIL, HYPOGRANULATED_NEUTROPHIL)
    pair_x = [x for label in pair for x in _pixels(label, 1, 20)]
    pair_test = [x for label in pair for x in _pixels(label, 2, 10)]
    classifier = NearestCentroid().fit(np.array(pair_x), [label for label in pair for _ in range(20)])
    assert classifier.score(np.array(pair_test), [label for label in pair for _ in range(10)]) >= 0.75
