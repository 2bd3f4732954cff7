"""The CellaVision-style smear export (see docs/export-format.md).

One folder per smear, named by its accession, holding the cell images (JPEG) and ``smear.json``::

    <accession>/
        smear.json
        <any file name>.jpg ...

This module parses and writes the metadata file. It is strict: anything it cannot read without guessing
raises ``ExportFormatError`` with the reason, and the importer quarantines the smear.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from typing import Any

METADATA_FILE_NAME = "smear.json"
FORMAT_VERSION = 1
SEXES = ("F", "M", "U")


class ExportFormatError(ValueError):
    """The metadata file of a smear cannot be read; the message says why."""


@dataclass(frozen=True)
class Patient:
    name: str
    record_number: str
    birth_date: dt.date
    sex: str


@dataclass(frozen=True)
class CellEntry:
    cell_id: int
    image: str
    analyser_class: str
    verified_class: str | None = None


@dataclass(frozen=True)
class SmearMetadata:
    accession: str
    analyser_id: str
    patient: Patient
    collected_at: dt.datetime
    comment: str
    cells: tuple[CellEntry, ...] = field(default_factory=tuple)

    def to_json_bytes(self) -> bytes:
        document: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "accession": self.accession,
            "analyser_id": self.analyser_id,
            "patient": {
                **asdict(self.patient),
                "birth_date": self.patient.birth_date.isoformat(),
            },
            "collected_at": self.collected_at.isoformat(timespec="seconds"),
            "comment": self.comment,
            "cells": [asdict(cell) for cell in self.cells],
        }
        return json.dumps(document, indent=1, ensure_ascii=False).encode("utf-8")


def _require(mapping: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in mapping:
        raise ExportFormatError(f"{where}: missing field '{key}'")
    value = mapping[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ExportFormatError(f"{where}: field '{key}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def _parse_date(text: str, where: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ExportFormatError(f"{where}: '{where.split('.')[-1]}' is not an ISO date") from None


def _optional_text(mapping: dict[str, Any], key: str) -> str:
    value = mapping.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ExportFormatError(f"smear: field '{key}' must be a string or null")
    return value


def parse_smear_metadata(raw: bytes) -> SmearMetadata:
    """Parse ``smear.json``; raise ``ExportFormatError`` naming the first problem found."""
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportFormatError(f"{METADATA_FILE_NAME} is not valid UTF-8 JSON ({type(error).__name__})") from None
    if not isinstance(document, dict):
        raise ExportFormatError(f"{METADATA_FILE_NAME} must hold a JSON object")
    version = _require(document, "format_version", int, "smear")
    if version != FORMAT_VERSION:
        raise ExportFormatError(f"smear: unsupported format_version {version} (this release reads {FORMAT_VERSION})")
    accession = _require(document, "accession", str, "smear").strip()
    if not accession:
        raise ExportFormatError("smear: empty accession")
    patient_doc = _require(document, "patient", dict, "smear")
    birth_date = _parse_date(_require(patient_doc, "birth_date", str, "patient"), "patient.birth_date")
    sex = _require(patient_doc, "sex", str, "patient")
    if sex not in SEXES:
        raise ExportFormatError(f"patient: sex must be one of {', '.join(SEXES)}")
    patient = Patient(
        name=_require(patient_doc, "name", str, "patient"),
        record_number=_require(patient_doc, "record_number", str, "patient").strip(),
        birth_date=birth_date,
        sex=sex,
    )
    if not patient.record_number:
        raise ExportFormatError("patient: empty record_number")
    try:
        collected_at = dt.datetime.fromisoformat(_require(document, "collected_at", str, "smear"))
    except ValueError:
        raise ExportFormatError("smear: 'collected_at' is not an ISO date-time") from None
    if birth_date > collected_at.date():
        raise ExportFormatError("patient: birth_date is after collected_at")
    cells_doc = _require(document, "cells", list, "smear")
    cells: list[CellEntry] = []
    seen_ids: set[int] = set()
    seen_images: set[str] = set()
    for index, cell_doc in enumerate(cells_doc):
        where = f"cells[{index}]"
        if not isinstance(cell_doc, dict):
            raise ExportFormatError(f"{where}: must be an object")
        cell_id = _require(cell_doc, "cell_id", int, where)
        image = _require(cell_doc, "image", str, where)
        if cell_id in seen_ids:
            raise ExportFormatError(f"{where}: duplicate cell_id {cell_id}")
        if cell_id < 0:
            raise ExportFormatError(f"{where}: cell_id must not be negative")
        if (
            image in seen_images
            or not image
            or image == METADATA_FILE_NAME
            or "/" in image
            or "\\" in image
            or image.startswith(".")
        ):
            raise ExportFormatError(f"{where}: image must be a unique plain file name in the smear folder")
        verified = cell_doc.get("verified_class")
        if verified is not None and not isinstance(verified, str):
            raise ExportFormatError(f"{where}: verified_class must be a string or null")
        seen_ids.add(cell_id)
        seen_images.add(image)
        cells.append(
            CellEntry(
                cell_id=cell_id,
                image=image,
                analyser_class=_require(cell_doc, "analyser_class", str, where),
                verified_class=verified or None,
            )
        )
    return SmearMetadata(
        accession=accession,
        analyser_id=_require(document, "analyser_id", str, "smear"),
        patient=patient,
        collected_at=collected_at,
        comment=_optional_text(document, "comment"),
        cells=tuple(cells),
    )
