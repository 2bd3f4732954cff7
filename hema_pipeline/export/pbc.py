"""Adapter: the PBC class-folder image set -> the CellaVision-style export format (docs/export-format.md).

PBC (Acevedo et al. 2020, CC BY 4.0) holds expert-labelled DM96 cell images of healthy donors in one
folder per class, with no patient or smear identifiers. To run the pipeline on real images the adapter
groups them into pseudo-smears of fake patients, planted the way the synthetic generator plants them
(``smear.json`` and identifying file names), so the importer and its anonymiser are exercised as on a real
export. The grouping is invented: it says nothing about which donor a cell came from, so a patient-level
split of these smears cannot guard against donor leakage (the release does not hold that information).

Image bytes are copied unchanged: the importer strips metadata losslessly, and re-encoding here would
change the pixels a model sees. The source tree is only read.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hema_pipeline import settings
from hema_pipeline.export.format import CellEntry, SmearMetadata
from hema_pipeline.export.synthetic import (
    GeneratedExport,
    GeneratedSmear,
    cell_image_name,
    fake_smear_identities,
    write_smear_folder,
)
from hema_pipeline.taxonomy import PBC_FOLDER_TO_CLASS

JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})
# Accessions of PBC pseudo-smears start with "P" (synthetic ones with "H"), so the two never collide.
ACCESSION_PREFIX = "P"

_STREAM_CLASS_SAMPLE = 11
_STREAM_CELL_ORDER = 12


@dataclass(frozen=True)
class PbcExportSpec:
    cells_per_smear: int = 100
    max_per_class: int | None = None  # cap per class (fast tests, demos), chosen deterministically
    classes: tuple[str, ...] | None = None  # PBC folder names to include; None: all eight
    seed: int = 0
    max_smears: int | None = None  # stop after this many smears (a class-balanced subset of the images)

    def __post_init__(self) -> None:
        if self.cells_per_smear < 1:
            raise ValueError("cells_per_smear must be at least 1")
        if self.seed < 0:
            raise ValueError("seed must be a non-negative integer")
        if self.max_per_class is not None and self.max_per_class < 1:
            raise ValueError("max_per_class must be at least 1 (or None for no cap)")
        if self.max_smears is not None and self.max_smears < 1:
            raise ValueError("max_smears must be at least 1 (or None for no cap)")
        if self.classes is not None:
            unknown = sorted(set(self.classes) - set(PBC_FOLDER_TO_CLASS))
            if unknown:
                expected = ", ".join(sorted(PBC_FOLDER_TO_CLASS))
                raise ValueError(f"unknown PBC class folder(s) {', '.join(unknown)}; expected some of {expected}")
            if not self.classes or len(set(self.classes)) != len(self.classes):
                raise ValueError("classes must name at least one PBC folder, each once")

    def folders(self) -> tuple[str, ...]:
        return tuple(sorted(PBC_FOLDER_TO_CLASS if self.classes is None else self.classes))


def default_shared_data_dir() -> Path:
    """HEMA_SHARED_DATA if set, else ``../shared/data`` relative to the working directory (resolved)."""
    return settings.shared_data_dir()


def list_class_images(pbc_root: Path, folder: str) -> list[Path]:
    """The JPEG files of one class folder, sorted by name. Other files, and hidden ones such as macOS's
    ``._NAME.jpg`` resource forks, are skipped."""
    directory = pbc_root / folder
    if not directory.is_dir():
        raise FileNotFoundError(f"PBC class folder {directory} does not exist")
    images = sorted(
        (
            path
            for path in directory.iterdir()
            if path.suffix.lower() in JPEG_SUFFIXES and not path.name.startswith(".") and path.is_file()
        ),
        key=lambda path: path.name,
    )
    if not images:
        raise FileNotFoundError(f"PBC class folder {directory} holds no JPEG images")
    return images


def _sampled(images: list[Path], folder: str, spec: PbcExportSpec) -> list[Path]:
    """A seeded shuffle of one class, cut to ``max_per_class``. Each class has its own random stream, so
    the images chosen for one class do not depend on which other classes are included."""
    rng = np.random.default_rng([spec.seed, _STREAM_CLASS_SAMPLE, zlib.crc32(folder.encode("utf-8"))])
    order = rng.permutation(len(images))
    keep = len(images) if spec.max_per_class is None else min(spec.max_per_class, len(images))
    return [images[int(index)] for index in order[:keep]]


def _proportional_quotas(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over the classes in proportion to their sizes (largest remainder, ties by name)."""
    available = sum(sizes.values())
    exact = {folder: size * total / available for folder, size in sizes.items()}
    quotas = {folder: math.floor(share) for folder, share in exact.items()}
    by_remainder = sorted(exact, key=lambda folder: (-(exact[folder] - quotas[folder]), folder))
    for folder in by_remainder[: total - sum(quotas.values())]:
        quotas[folder] += 1
    return quotas


def _dealt_smears(per_class: dict[str, list[Path]], spec: PbcExportSpec) -> list[list[tuple[str, Path]]]:
    """The images of each smear as (class folder, path). All images, class after class, are dealt to the
    smears like cards, so every smear gets its fair share of every class (rounded up or down) and smear
    sizes differ by at most one; each smear's cells are then put in a seeded random order, as an analyser
    meets cells in scan order, not sorted by class."""
    available = sum(len(images) for images in per_class.values())
    total = available if spec.max_smears is None else min(available, spec.max_smears * spec.cells_per_smear)
    if total < available:
        quotas = _proportional_quotas({folder: len(images) for folder, images in per_class.items()}, total)
        per_class = {folder: images[: quotas[folder]] for folder, images in per_class.items()}
    smear_count = math.ceil(total / spec.cells_per_smear)
    smears: list[list[tuple[str, Path]]] = [[] for _ in range(smear_count)]
    deck = [(folder, path) for folder in sorted(per_class) for path in per_class[folder]]
    for position, card in enumerate(deck):
        smears[position % smear_count].append(card)
    rng = np.random.default_rng([spec.seed, _STREAM_CELL_ORDER])
    return [[cells[int(index)] for index in rng.permutation(len(cells))] for cells in smears]


def export_pbc_as_smears(pbc_root: Path, out_dir: Path, spec: PbcExportSpec) -> GeneratedExport:
    """Group the PBC images under ``pbc_root`` into pseudo-smears of fake patients and write them to
    ``out_dir`` as an export. The same tree and spec always give the same grouping and files.

    Each smear holds at most ``cells_per_smear`` cells and every class in proportion (see
    ``_dealt_smears``); ``max_smears`` keeps a class-proportional subset. Labels: PBC's classes were
    assigned by experts, so both ``verified_class`` and ``analyser_class`` are the folder's class.
    """
    pbc_root, out_dir = Path(pbc_root), Path(out_dir)
    per_class = {folder: _sampled(list_class_images(pbc_root, folder), folder, spec) for folder in spec.folders()}
    dealt = _dealt_smears(per_class, spec)
    identities = fake_smear_identities(spec.seed, len(dealt), accession_prefix=ACCESSION_PREFIX)
    out_dir.mkdir(parents=True, exist_ok=True)
    smears: list[GeneratedSmear] = []
    for identity, cells in zip(identities, dealt, strict=True):
        entries: list[CellEntry] = []
        sources: dict[str, Path] = {}
        truth: dict[int, str] = {}
        names: dict[int, str] = {}
        for position, (folder, source) in enumerate(cells):
            cell_id = position + 1
            name = cell_image_name(identity.patient, cell_id)
            cell_class = PBC_FOLDER_TO_CLASS[folder]
            entries.append(CellEntry(cell_id=cell_id, image=name, analyser_class=cell_class, verified_class=cell_class))
            sources[name] = source
            truth[cell_id], names[cell_id] = cell_class, name
        metadata = SmearMetadata(
            accession=identity.accession,
            analyser_id=identity.analyser_id,
            patient=identity.patient,
            collected_at=identity.collected_at,
            comment=identity.comment,
            cells=tuple(entries),
        )
        smears.append(
            GeneratedSmear(
                folder=write_smear_folder(out_dir, metadata, sources),
                accession=identity.accession,
                patient=identity.patient,
                comment=identity.comment,
                true_classes=truth,
                dysplastic=False,
                malignant=False,
                image_names=names,
            )
        )
    return GeneratedExport(root=out_dir, smears=tuple(smears))
