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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageDraw, ImageFilter

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

# What a CellaVision DM96 saves: 360 x 363 px RGB JPEG (width x height, as PIL reports it).
CELL_IMAGE_SIZE: tuple[int, int] = (360, 363)
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


# ---------------------------------------------------------------------------------------------------
# Cell images
#
# Sizes are in pixels at the scale of PBC's DM96 images: a red cell is ~55 px across, a neutrophil
# ~110-130 px, a small lymphocyte ~80-90 px, a platelet ~15-25 px. Each cell is painted on its own
# transparent patch around the patch centre, then rotated and pasted onto the field with some jitter.

RGB = tuple[int, int, int]
Painter = Callable[[ImageDraw.ImageDraw, np.random.Generator, float], None]

_PATCH_SIZE = 220
_OUTLINE_ANGLES = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
_ANGLE_STEP = 2.0 * np.pi / len(_OUTLINE_ANGLES)

# May-Grünwald-Giemsa colours, before per-cell and per-image variation.
BACKGROUND: RGB = (246, 228, 206)
RED_CELL: RGB = (214, 180, 184)
RED_CELL_PALLOR: RGB = (232, 212, 206)
NUCLEUS: RGB = (88, 40, 118)
NUCLEUS_CLUMP: RGB = (58, 22, 88)
NEUTROPHIL_CYTOPLASM: RGB = (226, 196, 206)
NEUTROPHIL_GRANULE: RGB = (192, 144, 180)
HYPOGRANULAR_CYTOPLASM: RGB = (238, 228, 232)
EOSINOPHIL_CYTOPLASM: RGB = (232, 170, 150)
EOSINOPHIL_GRANULE: RGB = (218, 104, 72)
BASOPHIL_CYTOPLASM: RGB = (196, 166, 206)
BASOPHIL_NUCLEUS: RGB = (112, 62, 142)
BASOPHIL_GRANULE: RGB = (58, 18, 78)
LYMPHOCYTE_CYTOPLASM: RGB = (158, 176, 222)
LYMPHOCYTE_NUCLEUS: RGB = (72, 36, 110)
BLAST_CYTOPLASM: RGB = (72, 98, 180)
BLAST_NUCLEUS: RGB = (132, 92, 172)
BLAST_CHROMATIN: RGB = (108, 70, 150)
NUCLEOLUS: RGB = (172, 164, 216)
MONOCYTE_CYTOPLASM: RGB = (180, 178, 208)
MONOCYTE_NUCLEUS: RGB = (128, 88, 160)
VACUOLE: RGB = (234, 230, 238)
IG_CYTOPLASM: RGB = (168, 152, 208)
IG_NUCLEUS: RGB = (104, 58, 146)
IG_GRANULE: RGB = (178, 100, 162)
ERYTHROBLAST_CYTOPLASM: RGB = (178, 154, 198)
ERYTHROBLAST_NUCLEUS: RGB = (46, 18, 64)
ERYTHROBLAST_CHROMATIN: RGB = (28, 8, 40)
PLATELET_BODY: RGB = (176, 136, 200)
PLATELET_GRANULE: RGB = (104, 52, 132)


def _tint(colour: RGB, rng: np.random.Generator, spread: float = 8.0) -> RGB:
    """A colour near ``colour``: no two cells take up the stain identically."""
    red, green, blue = (int(np.clip(channel + rng.normal(0.0, spread), 0, 255)) for channel in colour)
    return red, green, blue


def _polar(x: float, y: float, distance: float, direction: float) -> tuple[float, float]:
    return x + distance * np.cos(direction), y + distance * np.sin(direction)


@dataclass(frozen=True, eq=False)
class _Outline:
    """A star-shaped closed outline: its radius at each of ``_OUTLINE_ANGLES`` around a centre."""

    x: float
    y: float
    radii: np.ndarray

    def points(self) -> list[tuple[float, float]]:
        xs = self.x + self.radii * np.cos(_OUTLINE_ANGLES)
        ys = self.y + self.radii * np.sin(_OUTLINE_ANGLES)
        return list(zip(xs.tolist(), ys.tolist(), strict=True))

    def sample(self, rng: np.random.Generator, count: int, depth: float = 0.9) -> np.ndarray:
        """``count`` points spread uniformly over the area within ``depth`` of the outline, as (n, 2)."""
        index = rng.integers(0, len(_OUTLINE_ANGLES), count)
        theta = _OUTLINE_ANGLES[index] + rng.uniform(-_ANGLE_STEP / 2, _ANGLE_STEP / 2, count)
        rho = np.sqrt(rng.uniform(0.0, 1.0, count)) * self.radii[index] * depth
        return np.column_stack([self.x + rho * np.cos(theta), self.y + rho * np.sin(theta)])


def _outline(
    x: float,
    y: float,
    radius: float,
    rng: np.random.Generator,
    *,
    elongation: float = 0.0,
    axis: float = 0.0,
    wobble: float = 0.03,
    indent: float = 0.0,
    indent_at: float = 0.0,
    indent_width: float = 0.5,
) -> _Outline:
    """A round outline made oval by ``elongation`` along ``axis``, irregular by ``wobble`` (smooth low
    harmonics, like a real membrane) and kidney-shaped by an ``indent`` of that depth at ``indent_at``."""
    theta = _OUTLINE_ANGLES
    radii = radius * (1.0 + elongation * np.cos(2.0 * (theta - axis)))
    for harmonic in (3, 4, 5):
        amplitude = rng.normal(0.0, wobble * 3.0 / harmonic)  # higher harmonics weaker: no polygonal look
        radii = radii * (1.0 + amplitude * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi)))
    if indent:
        distance = np.angle(np.exp(1j * (theta - indent_at)))
        radii = radii * (1.0 - indent * np.exp(-((distance / indent_width) ** 2)))
    return _Outline(x, y, radii)


def _fill(draw: ImageDraw.ImageDraw, outline: _Outline, colour: RGB) -> None:
    draw.polygon(outline.points(), fill=colour)


def _speckle(
    draw: ImageDraw.ImageDraw,
    points: np.ndarray,
    radius: tuple[float, float],
    colour: RGB,
    rng: np.random.Generator,
    spread: float = 10.0,
) -> None:
    """Granules or chromatin clumps: small discs of random size and shade at ``points``."""
    sizes = rng.uniform(*radius, len(points))
    shades = np.clip(np.asarray(colour) + rng.normal(0.0, spread, (len(points), 1)), 0, 255).astype(int)
    for (x, y), size, shade in zip(points.tolist(), sizes.tolist(), shades.tolist(), strict=True):
        draw.ellipse((x - size, y - size, x + size, y + size), fill=tuple(shade))


def _chromatin(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    parts: Sequence[_Outline],
    per_part: int,
    radius: tuple[float, float],
    colour: RGB,
) -> None:
    for part in parts:
        _speckle(draw, part.sample(rng, per_part, depth=0.8), radius, colour, rng, spread=8.0)


def _cell_body(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float, radius: float, colour: RGB, wobble: float = 0.03
) -> _Outline:
    elongation, axis = rng.uniform(0.0, 0.06), rng.uniform(0, np.pi)
    body = _outline(centre, centre, radius, rng, elongation=elongation, axis=axis, wobble=wobble)
    _fill(draw, body, _tint(colour, rng))
    return body


def _nucleus_room(body: _Outline) -> float:
    """How far from the centre a lobed nucleus may reach and still leave a rim of cytoplasm."""
    return 0.85 * float(body.radii.min())


def _segmented_nucleus(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    centre: float,
    lobes: int,
    lobe_radius: float,
    room: float,
    colour: RGB,
) -> list[_Outline]:
    """``lobes`` lobes joined by thin chromatin strands, laid out as a chain that turns irregularly (C, S
    and clustered shapes all occur) and is kept within ``room`` of the cell centre."""
    heading = rng.uniform(0, 2 * np.pi)
    turn = rng.choice((-1.0, 1.0))
    centres = [np.zeros(2)]
    for _ in range(lobes - 1):
        if rng.uniform() < 0.25:
            turn = -turn
        heading += turn * rng.uniform(0.4, 1.1)
        step = lobe_radius * rng.uniform(2.0, 2.5)
        centres.append(centres[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
    chain = np.array(centres) - np.mean(centres, axis=0)
    reach = float(np.max(np.hypot(chain[:, 0], chain[:, 1])))
    if reach + lobe_radius > room:
        chain *= max(room - lobe_radius, 0.0) / reach
    chain += centre
    strand_width = max(3, round(lobe_radius * 0.3))
    for (x0, y0), (x1, y1) in zip(chain[:-1].tolist(), chain[1:].tolist(), strict=True):
        draw.line((x0, y0, x1, y1), fill=colour, width=strand_width)
    outlines = [
        _outline(x, y, lobe_radius * rng.uniform(0.85, 1.1), rng, elongation=0.15, axis=rng.uniform(0, np.pi), wobble=0.05)
        for x, y in chain.tolist()
    ]
    for lobe in outlines:
        _fill(draw, lobe, colour)
    return outlines


def _band_nucleus(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float, colour: RGB) -> list[_Outline]:
    """A band (stab) neutrophil: one thick, evenly wide C- or U-shaped nucleus."""
    arc_radius = rng.uniform(26, 34)
    sweep = rng.uniform(0.9, 1.4) * np.pi
    direction = rng.uniform(0, 2 * np.pi)
    thickness = rng.uniform(8.5, 11.0)
    angles = direction + np.linspace(-sweep / 2, sweep / 2, 14)
    outlines = [_outline(*_polar(centre, centre, arc_radius, a), thickness, rng, wobble=0.02) for a in angles]
    for part in outlines:
        _fill(draw, part, colour)
    return outlines


def _paint_neutrophil(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    body = _cell_body(draw, rng, centre, rng.uniform(54, 64), NEUTROPHIL_CYTOPLASM)
    _speckle(draw, body.sample(rng, 260), (0.8, 1.5), NEUTROPHIL_GRANULE, rng)
    nucleus_colour = _tint(NUCLEUS, rng)
    if rng.uniform() < 0.2:
        lobes = _band_nucleus(draw, rng, centre, nucleus_colour)
    else:
        lobe_count, lobe_radius = int(rng.integers(3, 6)), rng.uniform(12, 15)
        lobes = _segmented_nucleus(draw, rng, centre, lobe_count, lobe_radius, _nucleus_room(body), nucleus_colour)
    _chromatin(draw, rng, lobes, 6, (1.5, 3.0), NUCLEUS_CLUMP)


def _paint_hypogranulated_neutrophil(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    body = _cell_body(draw, rng, centre, rng.uniform(52, 62), HYPOGRANULAR_CYTOPLASM)
    _speckle(draw, body.sample(rng, int(rng.integers(0, 25))), (0.8, 1.4), NEUTROPHIL_GRANULE, rng)
    nucleus_colour = _tint(NUCLEUS, rng)
    if rng.uniform() < 0.4:
        # Pseudo-Pelger: two lobes ("spectacles") or one round-to-peanut nucleus, coarsely clumped.
        lobe_count = int(rng.integers(1, 3))
        lobe_radius = rng.uniform(16, 20) if lobe_count == 2 else rng.uniform(21, 26)
    else:
        lobe_count, lobe_radius = int(rng.integers(2, 5)), rng.uniform(12, 15)
    lobes = _segmented_nucleus(draw, rng, centre, lobe_count, lobe_radius, _nucleus_room(body), nucleus_colour)
    _chromatin(draw, rng, lobes, 9, (2.0, 3.5), NUCLEUS_CLUMP)


def _paint_eosinophil(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    body = _cell_body(draw, rng, centre, rng.uniform(56, 66), EOSINOPHIL_CYTOPLASM)
    # Coarse, refractile granules pack the cytoplasm; the bilobed nucleus stays visible on top.
    granules = body.sample(rng, int(rng.integers(240, 320)), depth=0.95)
    _speckle(draw, granules, (2.0, 3.2), _tint(EOSINOPHIL_GRANULE, rng), rng, spread=14.0)
    lobe_radius = rng.uniform(16, 20)
    lobes = _segmented_nucleus(draw, rng, centre, 2, lobe_radius, _nucleus_room(body), _tint(NUCLEUS, rng))
    _chromatin(draw, rng, lobes, 6, (1.5, 3.0), NUCLEUS_CLUMP)


def _paint_basophil(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    body = _cell_body(draw, rng, centre, rng.uniform(48, 58), BASOPHIL_CYTOPLASM)
    lobe_count, lobe_radius = int(rng.integers(2, 4)), rng.uniform(14, 18)
    nucleus_colour = _tint(BASOPHIL_NUCLEUS, rng)
    lobes = _segmented_nucleus(draw, rng, centre, lobe_count, lobe_radius, _nucleus_room(body), nucleus_colour)
    # Large dark granules lie over the nucleus as well as the cytoplasm and largely hide its shape.
    granules = body.sample(rng, int(rng.integers(110, 190)), depth=0.95)
    _speckle(draw, granules, (2.2, 4.2), BASOPHIL_GRANULE, rng, spread=14.0)
    _chromatin(draw, rng, lobes, 10, (2.5, 4.0), BASOPHIL_GRANULE)


def _paint_lymphocyte(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    large = rng.uniform() < 0.2
    radius = rng.uniform(48, 56) if large else rng.uniform(38, 46)
    body = _cell_body(draw, rng, centre, radius, LYMPHOCYTE_CYTOPLASM, wobble=0.025)
    # Small lymphocytes are nearly all nucleus; the thin blue rim is often eccentric.
    nucleus_radius = radius * (rng.uniform(0.7, 0.8) if large else rng.uniform(0.82, 0.9))
    offset = (radius - nucleus_radius) * rng.uniform(0.2, 0.8)
    nucleus = _outline(
        *_polar(body.x, body.y, offset, rng.uniform(0, 2 * np.pi)),
        nucleus_radius,
        rng,
        elongation=rng.uniform(0.0, 0.06),
        axis=rng.uniform(0, np.pi),
        indent=rng.uniform(0.0, 0.08),
        indent_at=rng.uniform(0, 2 * np.pi),
    )
    _fill(draw, nucleus, _tint(LYMPHOCYTE_NUCLEUS, rng))
    _chromatin(draw, rng, [nucleus], 40, (2.0, 4.0), NUCLEUS_CLUMP)


def _paint_malignant_lymphocyte(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    radius = rng.uniform(56, 70)
    body = _cell_body(draw, rng, centre, radius, BLAST_CYTOPLASM, wobble=0.04)
    # A high nucleus/cytoplasm ratio, sometimes a cleft; the cytoplasm a deep blue rim.
    nucleus = _outline(
        body.x,
        body.y,
        radius * rng.uniform(0.8, 0.88),
        rng,
        elongation=rng.uniform(0.0, 0.1),
        axis=rng.uniform(0, np.pi),
        wobble=0.05,
        indent=rng.uniform(0.0, 0.2),
        indent_at=rng.uniform(0, 2 * np.pi),
        indent_width=0.3,
    )
    _fill(draw, nucleus, _tint(BLAST_NUCLEUS, rng))
    # Fine, open ("sieve-like") chromatin: many tiny specks rather than a few clumps; pale nucleoli.
    _speckle(draw, nucleus.sample(rng, 220, depth=0.92), (0.8, 1.6), BLAST_CHROMATIN, rng, spread=6.0)
    nucleoli = nucleus.sample(rng, int(rng.integers(1, 4)), depth=0.55)
    _speckle(draw, nucleoli, (5.0, 8.0), _tint(NUCLEOLUS, rng), rng, spread=4.0)


def _paint_monocyte(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    radius = rng.uniform(62, 78)
    body = _cell_body(draw, rng, centre, radius, MONOCYTE_CYTOPLASM, wobble=0.06)
    _speckle(draw, body.sample(rng, 60), (0.6, 1.1), NEUTROPHIL_GRANULE, rng)
    _speckle(draw, body.sample(rng, int(rng.integers(3, 11)), depth=0.85), (2.5, 6.5), VACUOLE, rng, spread=4.0)
    # Kidney- or horseshoe-shaped, folded nucleus with lacy chromatin.
    nucleus = _outline(
        body.x,
        body.y,
        radius * rng.uniform(0.58, 0.68),
        rng,
        elongation=rng.uniform(0.08, 0.2),
        axis=rng.uniform(0, np.pi),
        wobble=0.06,
        indent=rng.uniform(0.3, 0.55),
        indent_at=rng.uniform(0, 2 * np.pi),
        indent_width=rng.uniform(0.4, 0.7),
    )
    _fill(draw, nucleus, _tint(MONOCYTE_NUCLEUS, rng))
    _speckle(draw, nucleus.sample(rng, 70, depth=0.85), (1.2, 2.5), NUCLEUS, rng, spread=8.0)


def _paint_immature_granulocyte(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    radius = rng.uniform(58, 72)
    body = _cell_body(draw, rng, centre, radius, IG_CYTOPLASM, wobble=0.03)
    _speckle(draw, body.sample(rng, 150), (0.8, 1.5), IG_GRANULE, rng)
    # Myelocytes have a round-to-oval eccentric nucleus; metamyelocytes an indented, bean-shaped one.
    direction = rng.uniform(0, 2 * np.pi)
    nucleus_radius = radius * rng.uniform(0.5, 0.62)
    offset = (radius - nucleus_radius) * rng.uniform(0.45, 0.8)
    nucleus = _outline(
        *_polar(body.x, body.y, offset, direction),
        nucleus_radius,
        rng,
        elongation=rng.uniform(0.05, 0.18),
        axis=direction + np.pi / 2,
        wobble=0.03,
        indent=rng.uniform(0.2, 0.35) if rng.uniform() < 0.35 else 0.0,
        indent_at=direction + np.pi,
        indent_width=0.45,
    )
    _fill(draw, nucleus, _tint(IG_NUCLEUS, rng))
    _speckle(draw, nucleus.sample(rng, 60, depth=0.85), (1.0, 2.2), NUCLEUS, rng, spread=8.0)


def _paint_erythroblast(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    radius = rng.uniform(34, 44)
    body = _cell_body(draw, rng, centre, radius, ERYTHROBLAST_CYTOPLASM, wobble=0.02)
    nucleus_radius = radius * rng.uniform(0.5, 0.64)
    offset = (radius - nucleus_radius) * rng.uniform(0.0, 0.6)
    nucleus = _outline(*_polar(body.x, body.y, offset, rng.uniform(0, 2 * np.pi)), nucleus_radius, rng, wobble=0.015)
    # Pyknotic: very dense, nearly black, with hardly any visible structure.
    _fill(draw, nucleus, _tint(ERYTHROBLAST_NUCLEUS, rng, spread=5.0))
    _chromatin(draw, rng, [nucleus], 12, (1.5, 3.0), ERYTHROBLAST_CHROMATIN)


def _paint_platelets(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: float) -> None:
    # No large cell: one to four small purple fragments (a platelet or a small clump) near the centre.
    for _ in range(int(rng.integers(1, 5))):
        fragment = _outline(
            *_polar(centre, centre, rng.uniform(0, 26), rng.uniform(0, 2 * np.pi)),
            rng.uniform(7, 13),
            rng,
            elongation=rng.uniform(0.0, 0.25),
            axis=rng.uniform(0, np.pi),
            wobble=0.1,
        )
        _fill(draw, fragment, _tint(PLATELET_BODY, rng))
        _speckle(draw, fragment.sample(rng, int(rng.integers(6, 14)), depth=0.7), (1.0, 2.0), PLATELET_GRANULE, rng)


_CELL_PAINTERS: Mapping[str, Painter] = {
    NEUTROPHIL: _paint_neutrophil,
    HYPOGRANULATED_NEUTROPHIL: _paint_hypogranulated_neutrophil,
    EOSINOPHIL: _paint_eosinophil,
    BASOPHIL: _paint_basophil,
    LYMPHOCYTE: _paint_lymphocyte,
    MALIGNANT_LYMPHOCYTE: _paint_malignant_lymphocyte,
    MONOCYTE: _paint_monocyte,
    IMMATURE_GRANULOCYTE: _paint_immature_granulocyte,
    ERYTHROBLAST: _paint_erythroblast,
    PLATELET: _paint_platelets,
}


def _paint_field(image: Image.Image, rng: np.random.Generator) -> None:
    """Red cells (pale discs with central pallor) and the odd stray platelet, as around any imaged cell."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    red_cell = _tint(RED_CELL, rng, spread=6.0)
    pallor = _tint(RED_CELL_PALLOR, rng, spread=4.0)
    rim = tuple(max(0, channel - 14) for channel in red_cell)
    for _ in range(int(rng.integers(12, 26))):
        x, y = rng.uniform(-20, width + 20), rng.uniform(-20, height + 20)
        rx = rng.uniform(24, 31)
        ry = rx * rng.uniform(0.85, 1.0)
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=red_cell, outline=rim, width=2)
        inner = rng.uniform(0.35, 0.55)
        draw.ellipse((x - rx * inner, y - ry * inner, x + rx * inner, y + ry * inner), fill=pallor)
    for _ in range(int(rng.poisson(0.6))):
        x, y, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(3, 6)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=_tint(PLATELET_BODY, rng))


def draw_cell(cell_class: str, rng: np.random.Generator, size: tuple[int, int] = CELL_IMAGE_SIZE) -> Image.Image:
    """A procedurally drawn RGB image of one ``cell_class`` cell (one of ``CELL_CLASSES``) at DM96 scale;
    ``size`` = (width, height) of the field around it (a smaller size crops). All randomness comes from
    ``rng``, so the same generator state gives the same image."""
    painter = _CELL_PAINTERS.get(cell_class)
    if painter is None:
        raise ValueError(f"unknown cell class {cell_class!r}; expected one of {', '.join(CELL_CLASSES)}")
    width, height = size
    field = Image.new("RGB", size, _tint(BACKGROUND, rng, spread=3.0))
    _paint_field(field, rng)

    patch = Image.new("RGBA", (_PATCH_SIZE, _PATCH_SIZE), (0, 0, 0, 0))
    painter(ImageDraw.Draw(patch), rng, _PATCH_SIZE / 2)
    patch = patch.rotate(float(rng.uniform(0, 360)), resample=Image.Resampling.BILINEAR)
    # Cells of one class differ in size and roundness; without this, two small round cells drawn on
    # similar fields come out closer than real distinct cells ever are (by perceptual hash).
    stretched = (round(_PATCH_SIZE * rng.uniform(0.88, 1.12)), round(_PATCH_SIZE * rng.uniform(0.88, 1.12)))
    patch = patch.resize(stretched, Image.Resampling.BILINEAR)
    # The analyser centres the cell it found, imperfectly.
    jitter_x, jitter_y = rng.normal(0.0, 8.0, 2).clip(-22, 22)
    corner = (round((width - patch.width) / 2 + jitter_x), round((height - patch.height) / 2 + jitter_y))
    field.paste(patch, corner, patch)

    # Focus differs from cell to cell. (A single box pass: a third of the cost of GaussianBlur, and the
    # kernel shape does not matter at this radius.)
    field = field.filter(ImageFilter.BoxBlur(float(rng.uniform(0.5, 1.6))))
    # Stain and illumination differ between smears and staining runs: a gain and offset per channel,
    # applied as a lookup table (much cheaper than float arithmetic on every pixel).
    gains = rng.normal(1.0, 0.015, 3)
    offsets = rng.normal(0.0, 2.5, 3)
    ramp = np.arange(256)
    lookup = np.concatenate([np.clip(ramp * gain + offset, 0, 255) for gain, offset in zip(gains, offsets, strict=True)])
    field = field.point(lookup.round().astype(int).tolist())
    # Camera noise, mostly in luminance.
    sigma = np.float32(rng.uniform(1.5, 4.0))
    pixels = np.asarray(field, dtype=np.int16)
    pixels += (rng.standard_normal((height, width, 1), dtype=np.float32) * sigma).astype(np.int16)
    np.clip(pixels, 0, 255, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


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
