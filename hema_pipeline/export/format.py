"""The CellaVision-style smear export (see docs/export-format.md).

One folder per smear, named by its accession, holding the cell images (JPEG) and ``smear.json``::

    <accession>/
        smear.json
        <any file name>.jpg ...

This module parses and writes the metadata file. It is strict: anything it cannot read without guessing
raises ``ExportFormatError`` with the reason, and the importer quarantines the smear. Every byte is
treated as hostile: each string field has a length limit and, where it is stored, an allow-listed shape
(docs/export-format.md lists them); integers are range-checked against the columns that hold them; deep
nesting and huge numbers are refused instead of exhausting the parser. Reasons never quote a value.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any

METADATA_FILE_NAME = "smear.json"
FORMAT_VERSION = 1
SEXES = ("F", "M", "U")

# Limits of the fields (characters). Generous for real exports, small enough that no field can carry
# a document: the importer also refuses a metadata file above MAX_METADATA_BYTES before parsing it.
MAX_METADATA_BYTES = 16 * 1024 * 1024
MAX_ACCESSION_CHARS = 64
MAX_RECORD_NUMBER_CHARS = 64
MAX_NAME_CHARS = 512
MAX_COMMENT_CHARS = 65536
MAX_IMAGE_NAME_CHARS = 255
MAX_CLASS_CHARS = 64
MAX_DATE_CHARS = 40
MAX_CELL_ID = 2**31 - 1  # the cells.cell_id column is a 32-bit integer
# analyser_id is stored: an instrument serial such as "DM96-01" or "DM9600-1234", never free text.
ANALYSER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
# json.loads recurses per nesting level; a hostile file nested thousands deep raises RecursionError.
# The format needs three levels; anything deeper than this is refused before parsing.
MAX_JSON_DEPTH = 32


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


def is_clean_text(text: str) -> bool:
    """No control or format characters and no lone surrogates (what a non-UTF-8 file name decodes to)."""
    return all(unicodedata.category(character) not in ("Cc", "Cf", "Cs", "Co", "Cn") for character in text)


def _require(mapping: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in mapping:
        raise ExportFormatError(f"{where}: missing field '{key}'")
    value = mapping[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ExportFormatError(f"{where}: field '{key}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def _require_text(mapping: dict[str, Any], key: str, where: str, max_chars: int) -> str:
    value = _require(mapping, key, str, where)
    if len(value) > max_chars:
        raise ExportFormatError(f"{where}: field '{key}' is longer than {max_chars} characters")
    if not is_clean_text(value):
        raise ExportFormatError(f"{where}: field '{key}' holds control or invalid characters")
    return value


def _nesting_depth_exceeds(text: str, limit: int) -> bool:
    """Whether brackets outside strings nest deeper than ``limit`` (a linear scan, no recursion)."""
    depth = 0
    in_string = False
    escaped = False
    for character in text:
        if in_string:
            if escaped:
                escaped = False
            elif character == "\\":
                escaped = True
            elif character == '"':
                in_string = False
        elif character == '"':
            in_string = True
        elif character in "[{":
            depth += 1
            if depth > limit:
                return True
        elif character in "]}":
            depth -= 1
    return False


def _parse_date(text: str, where: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ExportFormatError(f"{where}: '{where.split('.')[-1]}' is not an ISO date") from None


def _optional_text(mapping: dict[str, Any], key: str, max_chars: int) -> str:
    value = mapping.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ExportFormatError(f"smear: field '{key}' must be a string or null")
    if len(value) > max_chars:
        raise ExportFormatError(f"smear: field '{key}' is longer than {max_chars} characters")
    return value


def parse_smear_metadata(raw: bytes) -> SmearMetadata:
    """Parse ``smear.json``; raise ``ExportFormatError`` naming the first problem found."""
    if len(raw) > MAX_METADATA_BYTES:
        raise ExportFormatError(f"{METADATA_FILE_NAME} is larger than {MAX_METADATA_BYTES} bytes")
    try:
        # utf-8-sig: Windows tools write a byte-order mark; it is not part of the document.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ExportFormatError(f"{METADATA_FILE_NAME} is not valid UTF-8") from None
    if _nesting_depth_exceeds(text, MAX_JSON_DEPTH):
        raise ExportFormatError(f"{METADATA_FILE_NAME} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        # ValueError covers malformed JSON and integers beyond Python's digit limit.
        raise ExportFormatError(f"{METADATA_FILE_NAME} is not valid JSON ({type(error).__name__})") from None
    if not isinstance(document, dict):
        raise ExportFormatError(f"{METADATA_FILE_NAME} must hold a JSON object")
    version = _require(document, "format_version", int, "smear")
    if version != FORMAT_VERSION:
        raise ExportFormatError(f"smear: unsupported format_version {version} (this release reads {FORMAT_VERSION})")
    accession = _require_text(document, "accession", "smear", MAX_ACCESSION_CHARS).strip()
    if not accession:
        raise ExportFormatError("smear: empty accession")
    analyser_id = _require(document, "analyser_id", str, "smear")
    if not ANALYSER_ID_PATTERN.fullmatch(analyser_id):
        raise ExportFormatError("smear: analyser_id must be an instrument serial (letters, digits, '.', '_', '-'; at most 32)")
    patient_doc = _require(document, "patient", dict, "smear")
    birth_date = _parse_date(_require_text(patient_doc, "birth_date", "patient", MAX_DATE_CHARS), "patient.birth_date")
    sex = _require(patient_doc, "sex", str, "patient")
    if sex not in SEXES:
        raise ExportFormatError(f"patient: sex must be one of {', '.join(SEXES)}")
    patient = Patient(
        name=_require_text(patient_doc, "name", "patient", MAX_NAME_CHARS),
        record_number=_require_text(patient_doc, "record_number", "patient", MAX_RECORD_NUMBER_CHARS).strip(),
        birth_date=birth_date,
        sex=sex,
    )
    if not patient.record_number:
        raise ExportFormatError("patient: empty record_number")
    try:
        collected_at = dt.datetime.fromisoformat(_require_text(document, "collected_at", "smear", MAX_DATE_CHARS))
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
        image = _require_text(cell_doc, "image", where, MAX_IMAGE_NAME_CHARS)
        if not 0 <= cell_id <= MAX_CELL_ID:
            raise ExportFormatError(f"{where}: cell_id must be between 0 and {MAX_CELL_ID}")
        if cell_id in seen_ids:
            raise ExportFormatError(f"{where}: duplicate cell_id {cell_id}")
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
        if verified is not None and len(verified) > MAX_CLASS_CHARS:
            raise ExportFormatError(f"{where}: verified_class is longer than {MAX_CLASS_CHARS} characters")
        seen_ids.add(cell_id)
        seen_images.add(image)
        cells.append(
            CellEntry(
                cell_id=cell_id,
                image=image,
                analyser_class=_require_text(cell_doc, "analyser_class", where, MAX_CLASS_CHARS),
                verified_class=verified or None,
            )
        )
    return SmearMetadata(
        accession=accession,
        analyser_id=analyser_id,
        patient=patient,
        collected_at=collected_at,
        comment=_optional_text(document, "comment", MAX_COMMENT_CHARS),
        cells=tuple(cells),
    )
