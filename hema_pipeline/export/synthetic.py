"""Deterministic synthetic CellaVision-style exports with fake patients (see docs/export-format.md).

The generator exists for two reasons: the pipeline must be testable end to end without real patient data,
and the anonymiser must be tested against an export that leaks identifiers everywhere a real one does. So
every smear carries a fake patient whose name, record number, birth date, accession and a free-text comment
are planted in ``smear.json``, in the image file names, in each JPEG's EXIF block and in a JPEG comment;
``GeneratedExport.phi_strings()`` lists them for the PHI canary.

Cell images are drawn procedurally (``draw_cell``): not photographs, but each class has the features a
haematologist would name (size, nucleus shape, chromatin, cytoplasm colour, granules), with random
rotation, position, stain and focus, so a small CNN has something real to learn and cannot win on a
single pixel.

Everything is a pure function of the spec: the same ``SyntheticExportSpec`` gives byte-identical files.
Independent random streams (identities, smear composition, each cell image) are derived from the seed, so
changing e.g. ``verified_share`` does not redraw the images.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import shutil
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

from hema_pipeline.export.cell_painting import draw_cell
from hema_pipeline.export.format import METADATA_FILE_NAME, CellEntry, Patient, SmearMetadata
from hema_pipeline.taxonomy import (
    BASOPHIL,
    CELL_CLASSES,
    EOSINOPHIL,
    ERYTHROBLAST,
    HYPOGRANULATED_NEUTROPHIL,
    IMMATURE_GRANULOCYTE,
    LYMPHOCYTE,
    MALIGNANT_LYMPHOCYTE,
    MONOCYTE,
    NEUTROPHIL,
    PLATELET,
)

JPEG_QUALITY = 90

# Differential of a healthy adult smear over the eight PBC classes. Erythroblasts, immature granulocytes
# and platelets (the analyser images platelet clumps) are rarer than this in real life; they are kept at a
# few per cent so that a modest export already holds enough of every class to train and test on.
HEALTHY_CLASS_MIX: Mapping[str, float] = {
    NEUTROPHIL: 0.55,
    LYMPHOCYTE: 0.25,
    MONOCYTE: 0.07,
    EOSINOPHIL: 0.04,
    IMMATURE_GRANULOCYTE: 0.03,
    PLATELET: 0.03,
    ERYTHROBLAST: 0.02,
    BASOPHIL: 0.01,
}
# Every class present in a mix gets at least about this share (before rounding to whole cells), so each
# 100-cell smear shows every class and the default 6 x 100 export holds about a dozen of each.
CLASS_FLOOR_SHARE = 0.02
# Dirichlet concentration of the per-smear mix around the base mix: patients differ, but not wildly.
MIX_CONCENTRATION = 300.0
# Share of neutrophils drawn hypogranulated. Healthy smears have a few (staining, ageing in the tube);
# myelodysplasia shows many.
HEALTHY_HYPOGRANULATED_SHARE = (0.0, 0.05)
DYSPLASTIC_HYPOGRANULATED_SHARE = (0.20, 0.50)
# A smear with a lymphoid malignancy: more lymphoid cells, a share of them blasts / atypical.
MALIGNANT_LYMPHOCYTOSIS_FACTOR = (1.4, 2.0)
MALIGNANT_LYMPHOCYTE_SHARE = (0.30, 0.80)

# Confusions an analyser's pre-classification typically makes, most frequent first; a disagreeing
# analyser label is drawn from these with decreasing weight.
ANALYSER_CONFUSIONS: Mapping[str, tuple[str, ...]] = {
    NEUTROPHIL: (HYPOGRANULATED_NEUTROPHIL, IMMATURE_GRANULOCYTE, EOSINOPHIL),
    HYPOGRANULATED_NEUTROPHIL: (NEUTROPHIL, MONOCYTE),
    EOSINOPHIL: (NEUTROPHIL, BASOPHIL),
    BASOPHIL: (EOSINOPHIL, LYMPHOCYTE, IMMATURE_GRANULOCYTE),
    LYMPHOCYTE: (MALIGNANT_LYMPHOCYTE, MONOCYTE, ERYTHROBLAST),
    MALIGNANT_LYMPHOCYTE: (LYMPHOCYTE, MONOCYTE, IMMATURE_GRANULOCYTE),
    MONOCYTE: (LYMPHOCYTE, IMMATURE_GRANULOCYTE, MALIGNANT_LYMPHOCYTE),
    IMMATURE_GRANULOCYTE: (NEUTROPHIL, MONOCYTE, MALIGNANT_LYMPHOCYTE),
    ERYTHROBLAST: (LYMPHOCYTE, PLATELET),
    PLATELET: (ERYTHROBLAST, BASOPHIL),
}
_CONFUSION_WEIGHTS = (0.6, 0.25, 0.15)

# Fake identities. The names are deliberately unusual (no common English word contains one, ignoring
# case), because the PHI canary searches every byte the pipeline writes for each name part and an ordinary
# name such as "Ines" would hit "lines" in a log.
FEMALE_FIRST_NAMES: tuple[str, ...] = (
    "Leocadia",
    "Ottoline",
    "Philippa",
    "Euphemia",
    "Perpetua",
    "Hildegard",
    "Ludovica",
    "Jadwiga",
    "Eulalia",
    "Seraphina",
    "Anastazja",
    "Evangelina",
    "Gwendolyn",
    "Florentyna",
    "Marcellina",
    "Leopoldine",
    "Benedikta",
    "Domenica",
    "Fiorella",
    "Honorine",
    "Isidora",
    "Joaquina",
    "Kunigunde",
    "Melisende",
    "Prudencia",
)
MALE_FIRST_NAMES: tuple[str, ...] = (
    "Wenceslaus",
    "Thaddeus",
    "Ignatius",
    "Radomir",
    "Zbigniew",
    "Bartholomew",
    "Cornelius",
    "Ambrosius",
    "Aurelio",
    "Gaspard",
    "Nepomuk",
    "Quirinus",
    "Sigismund",
    "Tiburcio",
    "Valdemar",
    "Leopold",
    "Evaristo",
    "Hieronymus",
    "Kasimir",
    "Wolfgang",
)
LAST_NAMES: tuple[str, ...] = (
    "Szczepankiewicz",
    "Featherstonhaugh",
    "Quackenbush",
    "Throckmorton",
    "Vanderhoeven",
    "Oyelaran",
    "Wojciechowska",
    "Zeitlinger",
    "Iturbide",
    "Kowalczuk",
    "Lindqvist",
    "Haverkamp",
    "Okonkwo",
    "Bjornstad",
    "Castellanos",
    "Etxeberria",
    "Fitzgibbon",
    "Hrdlicka",
    "Ibarguren",
    "Jankowiak",
    "Kuczynski",
    "Llewellyn",
    "Nieuwenhuis",
    "Ostrowski",
    "Papadimitriou",
    "Quintanilla",
    "Rautenberg",
    "Tzavaras",
    "Urquhart",
    "Valbuena",
    "Wetherspoon",
    "Xirinachs",
    "Yamaguchi",
    "Zurbriggen",
    "Abernethy",
    "Brzezinski",
    "Delacroix",
    "Gallardo",
    "Mbekwemu",
    "Sandoval",
)
COMMENT_TEMPLATES: tuple[str, ...] = (
    "Pt {first} {last} on chemo, please review",
    "Repeat smear for {last}, {first} ({record_number}): check for blasts",
    "{first} {last} post transplant day 30, compare with previous",
    "Query left shift; {last} on G-CSF",
    "Ward 7B: {first} {last}, febrile neutropenia",
    "{last}, {first} DOB {birth_date}: anaemia work-up",
)
# Exports mix a few analysers; the ID survives anonymisation (it is an instrument, not a person).
ANALYSER_IDS: tuple[str, ...] = ("DM96-01", "DM96-02", "DM96-03")
BIRTH_DATE_RANGE = (dt.date(1930, 1, 1), dt.date(2005, 12, 31))
COLLECTION_DATE_RANGE = (dt.date(2026, 1, 2), dt.date(2026, 10, 30))
# One smear in four is a second smear of an earlier patient, so patient-level grouping matters downstream.
REPEAT_SMEAR_EVERY = 4

# Independent random streams, combined with the seed: each concern draws from its own generator.
_STREAM_IDENTITIES = 1
_STREAM_SMEAR_FLAGS = 2
_STREAM_SMEAR_CELLS = 3
_STREAM_CELL_IMAGE = 4


@dataclass(frozen=True)
class SyntheticExportSpec:
    smears: int = 6
    cells_per_smear: int = 100
    seed: int = 0
    dysplastic_smear_share: float = 0.0  # share of smears generated "dysplastic" (many hypogranulated)
    malignant_smear_share: float = 0.0  # share of smears with malignant lymphocytes / blasts
    verified_share: float = 1.0  # share of cells with a technologist-verified class
    analyser_agreement: float = 0.88  # probability the analyser pre-class equals the truth (DM96 ~82-89%)
    # Base ("healthy") proportions over CELL_CLASSES, normalised; dysplastic and malignant smears are
    # derived from it as from the default. None: HEALTHY_CLASS_MIX.
    class_mix: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if self.smears < 1 or self.cells_per_smear < 1:
            raise ValueError("smears and cells_per_smear must be at least 1")
        if self.seed < 0:
            raise ValueError("seed must be a non-negative integer")
        for name in ("dysplastic_smear_share", "malignant_smear_share", "verified_share", "analyser_agreement"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.class_mix is not None:
            _normalised_mix(self.class_mix)

    def base_mix(self) -> dict[str, float]:
        return _normalised_mix(HEALTHY_CLASS_MIX if self.class_mix is None else self.class_mix)


@dataclass(frozen=True)
class GeneratedSmear:
    """What was written for one smear, including the ground truth the export itself does not reveal."""

    folder: Path
    accession: str
    patient: Patient
    comment: str
    true_classes: dict[int, str]  # cell_id -> true class
    dysplastic: bool
    malignant: bool
    image_names: dict[int, str]  # cell_id -> file name in the folder (identifying, like a real export's)


@dataclass(frozen=True)
class GeneratedExport:
    root: Path
    smears: tuple[GeneratedSmear, ...]

    def phi_strings(self) -> list[str]:
        """Every identifier planted in the export, for the PHI canary: patient names (whole, and each
        part of at least 4 characters), record numbers, birth dates (ISO and the EXIF form YYYY:MM:DD),
        accessions, comments and the stems of the original image file names. Each is planted in every smear
        of a synthetic export. Collection times are not listed: the anonymised data keeps the collection
        date by design."""
        found: dict[str, None] = {}
        for smear in self.smears:
            patient = smear.patient
            candidates = [
                patient.name,
                *name_parts(patient.name),
                patient.record_number,
                patient.birth_date.isoformat(),
                patient.birth_date.strftime("%Y:%m:%d"),
                smear.accession,
                smear.comment,
                *(Path(name).stem for name in smear.image_names.values()),
            ]
            found.update((candidate, None) for candidate in candidates if candidate)
        return list(found)


def name_parts(name: str) -> list[str]:
    """The parts of a name long enough to search for without matching ordinary text by chance."""
    return [part for part in re.split(r"[\s,.'-]+", name) if len(part) >= 4]


# ---------------------------------------------------------------------------------------------------
# Fake identities, shared with the PBC adapter


@dataclass(frozen=True)
class FakeSmearIdentity:
    accession: str
    analyser_id: str
    patient: Patient
    collected_at: dt.datetime
    comment: str


def _random_date(rng: np.random.Generator, first: dt.date, last: dt.date) -> dt.date:
    return first + dt.timedelta(days=int(rng.integers(0, (last - first).days + 1)))


def _fake_patients(rng: np.random.Generator, count: int) -> list[tuple[str, str, Patient]]:
    """``count`` patients with distinct record numbers, distinct surnames while the list lasts and distinct
    full names while the lists allow. Returns (first name, last name, patient) for each."""
    surname_order = rng.permutation(len(LAST_NAMES))
    name_pool = (len(FEMALE_FIRST_NAMES) + len(MALE_FIRST_NAMES)) * len(LAST_NAMES)
    used_names: set[tuple[str, str]] = set()
    used_numbers: set[str] = set()
    patients: list[tuple[str, str, Patient]] = []
    while len(patients) < count:
        last = LAST_NAMES[int(surname_order[len(patients) % len(LAST_NAMES)])]
        # A few records have sex "U" (unknown), as LIS exports do; their first name is from either list.
        sex = str(rng.choice(("F", "M", "U"), p=(0.49, 0.49, 0.02)))
        first_names = {"F": FEMALE_FIRST_NAMES, "M": MALE_FIRST_NAMES}.get(sex, FEMALE_FIRST_NAMES + MALE_FIRST_NAMES)
        first = first_names[int(rng.integers(len(first_names)))]
        record_number = f"MRN{int(rng.integers(10_000_000, 100_000_000)):08d}"
        if ((first, last) in used_names and len(used_names) < name_pool) or record_number in used_numbers:
            continue
        used_names.add((first, last))
        used_numbers.add(record_number)
        patient = Patient(
            name=f"{last}, {first}",
            record_number=record_number,
            birth_date=_random_date(rng, *BIRTH_DATE_RANGE),
            sex=sex,
        )
        patients.append((first, last, patient))
    return patients


def fake_smear_identities(seed: int, count: int, accession_prefix: str = "H") -> list[FakeSmearIdentity]:
    """Deterministic fake smears: accession, analyser, patient, collection time and a comment that names
    the patient. Every ``REPEAT_SMEAR_EVERY``-th smear belongs to a patient who already has one.

    Accessions look like ``H26-004817``. Each ``accession_prefix`` draws its identities from its own
    stream, so exports of different sources written with the same seed into one inbox share neither
    accessions nor patients.
    """
    rng = np.random.default_rng([seed, _STREAM_IDENTITIES, zlib.crc32(accession_prefix.encode("utf-8"))])
    repeats = count // REPEAT_SMEAR_EVERY
    patients = _fake_patients(rng, count - repeats)
    owners = list(range(len(patients)))
    owners += sorted(int(index) for index in rng.choice(len(patients), size=repeats, replace=False))
    owners = [owners[int(position)] for position in rng.permutation(count)]
    accession_numbers: set[int] = set()
    identities = []
    for owner in owners:
        first, last, patient = patients[owner]
        collection_day = _random_date(rng, *COLLECTION_DATE_RANGE)
        collected_at = dt.datetime.combine(collection_day, dt.time(7)) + dt.timedelta(seconds=int(rng.integers(0, 11 * 3600)))
        number = int(rng.integers(1, 1_000_000))
        while number in accession_numbers:
            number = int(rng.integers(1, 1_000_000))
        accession_numbers.add(number)
        template = COMMENT_TEMPLATES[int(rng.integers(len(COMMENT_TEMPLATES)))]
        identities.append(
            FakeSmearIdentity(
                accession=f"{accession_prefix}{collected_at:%y}-{number:06d}",
                analyser_id=ANALYSER_IDS[int(rng.integers(len(ANALYSER_IDS)))],
                patient=patient,
                collected_at=collected_at,
                comment=template.format(
                    first=first,
                    last=last,
                    record_number=patient.record_number,
                    birth_date=patient.birth_date.strftime("%d.%m.%Y"),
                ),
            )
        )
    return identities


def cell_image_name(patient: Patient, cell_id: int) -> str:
    """The file name an export gives a cell: identifying, as real exports' are (the importer drops it)."""
    last_name = re.sub(r"[^A-Za-z0-9]", "", patient.name.split(",")[0]).upper() or "UNKNOWN"
    return f"{last_name}_{patient.record_number}_{cell_id:03d}.jpg"


def write_smear_folder(out_dir: Path, metadata: SmearMetadata, files: Mapping[str, bytes | Path]) -> Path:
    """Write one smear folder: ``files`` (name -> bytes, or a source file copied unchanged) and
    ``smear.json``. Returns the folder.

    The folder is built under a hidden name (the inbox ignores folders starting with '.') and renamed into
    place, so an inbox sensor never sees a half-written smear. If the folder already exists (the same smear
    exported again) the files are replaced one by one, ``smear.json`` last; files the new export does not
    name are left alone.
    """
    target = out_dir / metadata.accession
    staging = out_dir / f".{metadata.accession}.partial"
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted run of this function
    staging.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copyfile(content, staging / name)
        else:
            (staging / name).write_bytes(content)
    (staging / METADATA_FILE_NAME).write_bytes(metadata.to_json_bytes())
    if not target.exists():
        staging.rename(target)
        return target
    for name in [*files, METADATA_FILE_NAME]:
        os.replace(staging / name, target / name)
    staging.rmdir()
    return target


# ---------------------------------------------------------------------------------------------------
# Smear composition


def _normalised_mix(mix: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(mix) - set(CELL_CLASSES))
    if unknown:
        raise ValueError(f"class_mix names classes outside the taxonomy: {', '.join(unknown)}")
    if any(not math.isfinite(share) or share < 0 for share in mix.values()):
        raise ValueError("class_mix shares must be finite and non-negative")
    total = sum(mix.values())
    if total <= 0:
        raise ValueError("class_mix must give at least one class a positive share")
    return {label: mix.get(label, 0.0) / total for label in CELL_CLASSES}


def _chosen_indices(rng: np.random.Generator, count: int, share: float) -> set[int]:
    chosen = math.floor(share * count + 0.5)
    return {int(index) for index in rng.permutation(count)[:chosen]}


def _systematic_counts(shares: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Systematic sampling: each class gets its expected count n*p rounded up or down at random (never
    further off), so small classes are neither lost nor inflated the way independent draws would."""
    cumulative = np.cumsum(shares)
    cumulative /= cumulative[-1]
    points = (rng.uniform() + np.arange(total)) / total
    picks = np.minimum(np.searchsorted(cumulative, points, side="right"), len(shares) - 1)
    return np.bincount(picks, minlength=len(shares))


def _move(counts: dict[str, int], source: str, target: str, share: float) -> None:
    moved = math.floor(counts[source] * share + 0.5)
    counts[source] -= moved
    counts[target] += moved


def _smear_classes(spec: SyntheticExportSpec, dysplastic: bool, malignant: bool, rng: np.random.Generator) -> list[str]:
    """The true class of each cell of one smear, in cell order."""
    base = spec.base_mix()
    labels = [label for label in CELL_CLASSES if base[label] > 0]
    shares = np.array([base[label] for label in labels])
    if malignant and LYMPHOCYTE in labels:
        shares[labels.index(LYMPHOCYTE)] *= rng.uniform(*MALIGNANT_LYMPHOCYTOSIS_FACTOR)
    shares = rng.dirichlet(shares / shares.sum() * MIX_CONCENTRATION)
    shares = np.maximum(shares, CLASS_FLOOR_SHARE)
    drawn = _systematic_counts(shares / shares.sum(), spec.cells_per_smear, rng)
    counts = dict.fromkeys(CELL_CLASSES, 0)
    counts.update({label: int(count) for label, count in zip(labels, drawn, strict=True)})
    hypogranulated = DYSPLASTIC_HYPOGRANULATED_SHARE if dysplastic else HEALTHY_HYPOGRANULATED_SHARE
    _move(counts, NEUTROPHIL, HYPOGRANULATED_NEUTROPHIL, rng.uniform(*hypogranulated))
    if malignant:
        _move(counts, LYMPHOCYTE, MALIGNANT_LYMPHOCYTE, rng.uniform(*MALIGNANT_LYMPHOCYTE_SHARE))
    classes = [label for label in CELL_CLASSES for _ in range(counts[label])]
    return [classes[int(index)] for index in rng.permutation(len(classes))]


def _analyser_class(true_class: str, agreement: float, rng: np.random.Generator) -> str:
    if rng.uniform() < agreement:
        return true_class
    confusions = ANALYSER_CONFUSIONS[true_class]
    weights = np.array(_CONFUSION_WEIGHTS[: len(confusions)])
    return confusions[int(rng.choice(len(confusions), p=weights / weights.sum()))]


def _jpeg_with_planted_phi(image: Image.Image, identity: FakeSmearIdentity, cell_id: int) -> bytes:
    """Encode as an analyser export would, leaking what real ones leak: patient details in EXIF and the
    accession in a JPEG comment."""
    patient = identity.patient
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "CellaVision"
    exif[ExifTags.Base.Model] = "DM96"
    exif[ExifTags.Base.ImageDescription] = f"{patient.name} {patient.record_number} DOB {patient.birth_date:%Y:%m:%d}"
    exif[ExifTags.Base.Artist] = patient.name
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = f"{identity.collected_at:%Y:%m:%d %H:%M:%S}"
    buffer = BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY, exif=exif, comment=f"{identity.accession} cell {cell_id:03d}")
    return buffer.getvalue()


def generate_export(out_dir: Path, spec: SyntheticExportSpec) -> GeneratedExport:
    """Write ``spec.smears`` smear folders into ``out_dir`` (created if needed) and return what was
    written, ground truth included."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    identities = fake_smear_identities(spec.seed, spec.smears)
    flags_rng = np.random.default_rng([spec.seed, _STREAM_SMEAR_FLAGS])
    dysplastic_smears = _chosen_indices(flags_rng, spec.smears, spec.dysplastic_smear_share)
    malignant_smears = _chosen_indices(flags_rng, spec.smears, spec.malignant_smear_share)
    smears: list[GeneratedSmear] = []
    for index, identity in enumerate(identities):
        dysplastic, malignant = index in dysplastic_smears, index in malignant_smears
        cells_rng = np.random.default_rng([spec.seed, _STREAM_SMEAR_CELLS, index])
        true_classes = _smear_classes(spec, dysplastic, malignant, cells_rng)
        verified = _chosen_indices(cells_rng, len(true_classes), spec.verified_share)
        entries: list[CellEntry] = []
        files: dict[str, bytes | Path] = {}
        truth: dict[int, str] = {}
        names: dict[int, str] = {}
        for position, true_class in enumerate(true_classes):
            cell_id = position + 1  # the analyser numbers cells from 1
            name = cell_image_name(identity.patient, cell_id)
            image_rng = np.random.default_rng([spec.seed, _STREAM_CELL_IMAGE, index, cell_id])
            files[name] = _jpeg_with_planted_phi(draw_cell(true_class, image_rng), identity, cell_id)
            entries.append(
                CellEntry(
                    cell_id=cell_id,
                    image=name,
                    analyser_class=_analyser_class(true_class, spec.analyser_agreement, cells_rng),
                    verified_class=true_class if position in verified else None,
                )
            )
            truth[cell_id], names[cell_id] = true_class, name
        metadata = SmearMetadata(
            accession=identity.accession,
            analyser_id=identity.analyser_id,
            patient=identity.patient,
            collected_at=identity.collected_at,
            comment=identity.comment,
            cells=tuple(entries),
        )
        folder = write_smear_folder(out_dir, metadata, files)
        smears.append(
            GeneratedSmear(
                folder=folder,
                accession=identity.accession,
                patient=identity.patient,
                comment=identity.comment,
                true_classes=truth,
                dysplastic=dysplastic,
                malignant=malignant,
                image_names=names,
            )
        )
    return GeneratedExport(root=out_dir, smears=tuple(smears))
