"""Import one smear: check every file, anonymise, store clean images, write rows, quarantine the rest.

Guarantees (docs/import.md says what they cover and what they do not):
- every byte is hostile: a file that cannot be read, is not a regular file, is too large, is not a
  complete JPEG or has unexpected dimensions is quarantined with a reason code; one bad cell never stops
  the others, and a bad smear is quarantined whole, with every readable file kept;
- nothing identifying leaves the inbox: rows carry pseudonyms, images are rebuilt from their parsed
  JPEG structure and stored under their content hash, and reasons name cells by number, never by file
  name or field value;
- the latest readable export of a smear is authoritative for its cells: a re-export moves every cell to
  the smear's current patient pseudonym, rewrites changed labels and withdraws cells it no longer lists;
- re-running is safe: images are content-addressed, rows are upserted by key in one transaction, and a
  crash before the commit leaves the warehouse as it was, so the next run simply redoes the smear.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import struct
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import duckdb
import pandas as pd
import pyarrow.parquet
from PIL import Image

from hema_pipeline import settings
from hema_pipeline.anonymise.images import ImageRejected, clean_cell_image
from hema_pipeline.anonymise.pseudonymise import AnonymousSmear, PseudonymKey, anonymise_smear, ensure_pseudonym_scheme
from hema_pipeline.export.format import (
    MAX_METADATA_BYTES,
    CellEntry,
    ExportFormatError,
    SmearMetadata,
    is_clean_text,
    parse_smear_metadata,
)
from hema_pipeline.ingest.inbox import InboxSmear
from hema_pipeline.storage.object_store import (
    SPECIAL_FILE,
    SYMLINK,
    UNREADABLE_FOLDER,
    NotARegularObject,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    put_if_absent,
)
from hema_pipeline.storage.warehouse import Warehouse, replace_rows
from hema_pipeline.taxonomy import is_known_class

CELL_COLUMNS = (
    "cell_uid",
    "smear_id",
    "patient_id",
    "cell_id",
    "image_sha256",
    "image_key",
    "width",
    "height",
    "analyser_class",
    "verified_class",
    "import_run_id",
    "imported_at",
)
# Columns that decide whether a re-imported cell is the same row as the one already stored.
QUARANTINE_COLUMNS = (
    "quarantine_id",
    "smear_id",
    "cell_id",
    "reason_code",
    "reason",
    "kept_key",
    "content_sha256",
    "import_run_id",
    "quarantined_at",
    "resolved_by_import_run_id",
)
CELL_IDENTITY = ("cell_id", "patient_id", "image_sha256", "analyser_class", "verified_class")

# Quarantine reason codes (sql/schema.sql documents them; docs/import.md says what each means).
MISSING_IMAGE = "missing_image"
UNKNOWN_CLASS = "unknown_class"
UNREADABLE_FILE = "unreadable_file"
NOT_A_REGULAR_FILE = "not_a_regular_file"
SYMLINK_NOT_FOLLOWED = "symlink_not_followed"
FILE_TOO_LARGE = "file_too_large"
UNEXPECTED_DIMENSIONS = "unexpected_dimensions"
UNLISTED_FILE = "unlisted_file"
EMPTY_SMEAR = "empty_smear"
MISSING_METADATA = "missing_metadata"
MALFORMED_METADATA = "malformed_metadata"
UNREADABLE_METADATA = "unreadable_metadata"
ACCESSION_MISMATCH = "accession_mismatch"
INVALID_FOLDER_NAME = "invalid_folder_name"
UNREADABLE_FOLDER_CODE = "unreadable_folder"
DUPLICATE_FOLDER = "duplicate_folder"


@dataclass(frozen=True)
class ImportLimits:
    """What a cell file may be; ``from_settings`` gives the configured values (docs/settings.md), which
    are the only defaults."""

    max_file_bytes: int
    max_pixels: int
    width_range: tuple[int, int]
    height_range: tuple[int, int]

    @classmethod
    def from_settings(cls) -> ImportLimits:
        side = settings.cell_side_range()
        return cls(
            max_file_bytes=settings.max_cell_file_bytes(),
            max_pixels=settings.max_image_pixels(),
            width_range=side,
            height_range=side,
        )


@dataclass(frozen=True)
class QuarantinedItem:
    cell_id: int | None
    reason_code: str
    reason: str
    kept_key: str | None
    content_sha256: str | None
    # A keyed hash of the inbox entry (never its name): tells two contentless rows of one smear apart.
    entry_ref: str | None = None


@dataclass(frozen=True)
class ImportReport:
    import_run_id: str
    smear_id: str
    status: str
    files_seen: int
    cells_imported: int
    cells_quarantined: int
    cells_skipped_existing: int
    quarantined: tuple[QuarantinedItem, ...] = field(default_factory=tuple)
    class_counts: dict[str, int] = field(default_factory=dict)
    cells_updated: int = 0
    cells_withdrawn: int = 0

    @property
    def quarantine_reasons(self) -> list[str]:
        return [
            f"{'smear' if item.cell_id is None else f'cell {item.cell_id}'}: {item.reason_code}: {item.reason}"
            for item in self.quarantined
        ]

    @property
    def quarantine_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(item.reason_code for item in self.quarantined).items()))


@dataclass(frozen=True)
class ImportTargets:
    """Where an import writes: the anonymised lake (images, Parquet), the identifiable quarantine store,
    and the DuckDB warehouse."""

    lake: ObjectStore
    quarantine: ObjectStore
    warehouse: Warehouse


def image_key(sha256: str) -> str:
    return f"images/{sha256[:2]}/{sha256}.jpg"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class _CellOutcome:
    entry: CellEntry
    row: dict[str, object] | None
    quarantined: QuarantinedItem | None


class _Unreadable(Exception):
    """An inbox entry whose bytes cannot be had; ``code`` and ``reason`` say why, without its name."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


_DECODER_FAILURES = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    MemoryError,
    struct.error,
    Image.DecompressionBombError,
)

_PROBLEM_REASONS: dict[str, tuple[str, str]] = {
    SYMLINK: (SYMLINK_NOT_FOLLOWED, "a symbolic link: never followed, so its target is neither read nor kept"),
    SPECIAL_FILE: (NOT_A_REGULAR_FILE, "not a regular file (a FIFO, socket or device): not read"),
    UNREADABLE_FOLDER: (UNREADABLE_FILE, "a folder inside the smear folder that cannot be listed"),
}


class _SmearImport:
    def __init__(
        self,
        inbox: ObjectStore,
        smear: InboxSmear,
        key: PseudonymKey,
        targets: ImportTargets,
        dagster_run_id: str | None,
        limits: ImportLimits,
    ) -> None:
        self.inbox = inbox
        self.smear = smear
        self.key = key
        self.targets = targets
        self.dagster_run_id = dagster_run_id
        self.limits = limits
        self.import_run_id = uuid.uuid4().hex
        self.started_at = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        self.smear_id = key.smear_id(smear.folder)

    # -- reading the inbox: every failure becomes a reason, never an exception ----------------------

    def entry_ref(self, info: ObjectInfo) -> str:
        return self.key.pseudonym("inbox-entry", info.key)

    def read(self, info: ObjectInfo, max_bytes: int) -> bytes:
        if info.problem is not None:
            code, reason = _PROBLEM_REASONS.get(info.problem, (UNREADABLE_FILE, "the file cannot be read"))
            raise _Unreadable(code, reason)
        if info.size > max_bytes:
            raise _Unreadable(FILE_TOO_LARGE, f"larger than {max_bytes} bytes: left in the inbox, not copied")
        try:
            data = self.inbox.get_bytes(info.key)
        except NotARegularObject:
            raise _Unreadable(NOT_A_REGULAR_FILE, "not a regular file (or replaced by a link): not read") from None
        except ObjectNotFound:
            raise _Unreadable(UNREADABLE_FILE, "the file vanished while the smear was read") from None
        except (OSError, ValueError, UnicodeError) as error:
            # The OS message can quote the path: only the error's kind is kept.
            raise _Unreadable(UNREADABLE_FILE, f"the file cannot be read ({type(error).__name__})") from None
        if len(data) > max_bytes:
            raise _Unreadable(FILE_TOO_LARGE, f"larger than {max_bytes} bytes: left in the inbox, not copied")
        return data

    def keep_in_quarantine(self, data: bytes) -> tuple[str, str]:
        digest = _sha256(data)
        kept_key = f"{self.smear_id}/{digest}.bin"
        put_if_absent(self.targets.quarantine, kept_key, data)
        return kept_key, digest

    def quarantine_file(self, info: ObjectInfo, cell_id: int | None, code: str, reason: str) -> QuarantinedItem:
        """Keep the file's bytes in the quarantine store when they can be read; when they cannot, the
        row says why and the file stays in the inbox (which the pipeline never deletes from)."""
        try:
            data = self.read(info, self.limits.max_file_bytes)
        except _Unreadable as unreadable:
            # An unlisted entry is best described by what it is (a link, a FIFO); elsewhere the reason the
            # file was being quarantined stays the code, and why it could not be kept is added.
            if code == UNLISTED_FILE:
                code, detail = unreadable.code, f"{unreadable.reason} (not listed in the metadata)"
            else:
                detail = unreadable.reason if unreadable.code == code else f"{reason}; {unreadable.reason}"
            return QuarantinedItem(cell_id, code, detail, None, None, self.entry_ref(info))
        kept_key, digest = self.keep_in_quarantine(data)
        return QuarantinedItem(cell_id, code, reason, kept_key, digest, self.entry_ref(info))

    def quarantine_whole_smear(self, code: str, reason: str) -> ImportReport:
        items = [
            self.quarantine_file(info, None, code, reason) for info in self.smear.files if info.key not in self.smear.all_folders
        ]
        if not items:
            items.append(QuarantinedItem(None, code, reason, None, None))
        return self.finish(metadata=None, anonymous=None, rows=[], quarantined=items, status="quarantined", cells_quarantined=0)

    # -- the import --------------------------------------------------------------------------------

    def run(self) -> ImportReport:
        if len(self.smear.all_folders) > 1:
            return self.quarantine_whole_smear(
                DUPLICATE_FOLDER,
                f"{len(self.smear.all_folders)} inbox folders name this accession (their names differ only by "
                "Unicode normalisation or spaces); remove all but one",
            )
        if not is_clean_text(self.smear.folder):
            return self.quarantine_whole_smear(
                INVALID_FOLDER_NAME, "the folder name is not valid UTF-8 or holds control characters"
            )
        if self.smear.unreadable:
            return self.quarantine_whole_smear(UNREADABLE_FOLDER_CODE, "the smear folder cannot be listed")
        files = [info for info in self.smear.files if info.key != self.smear.folder]
        if not files:
            return self.quarantine_whole_smear(EMPTY_SMEAR, "the smear folder holds no files")
        metadata_info = next((info for info in files if info.key == self.smear.metadata_key), None)
        if metadata_info is None:
            return self.quarantine_whole_smear(MISSING_METADATA, "no smear.json in the smear folder")
        try:
            raw = self.read(metadata_info, MAX_METADATA_BYTES)
        except _Unreadable as unreadable:
            return self.quarantine_whole_smear(UNREADABLE_METADATA, f"smear.json: {unreadable.reason}")
        try:
            metadata = parse_smear_metadata(raw)
        except ExportFormatError as error:
            return self.quarantine_whole_smear(MALFORMED_METADATA, f"smear.json: {error}")
        if self.key.smear_id(metadata.accession) != self.smear_id:
            return self.quarantine_whole_smear(
                ACCESSION_MISMATCH, "the accession in the metadata differs from the smear folder's name"
            )
        if not metadata.cells:
            return self.quarantine_whole_smear(EMPTY_SMEAR, "the metadata lists no cells")
        try:
            anonymous = anonymise_smear(metadata, self.key)
        except ValueError as error:
            return self.quarantine_whole_smear(MALFORMED_METADATA, f"smear.json: {error}")
        outcomes = self.import_cells(metadata, anonymous, files)
        rows = [outcome.row for outcome in outcomes if outcome.row is not None]
        quarantined = [outcome.quarantined for outcome in outcomes if outcome.quarantined is not None]
        quarantined += self.quarantine_unlisted_files(metadata, files)
        cells_quarantined = sum(1 for outcome in outcomes if outcome.quarantined is not None)
        if not rows:
            status = "quarantined"
        elif quarantined:
            status = "partially_quarantined"
        else:
            status = "imported"
        return self.finish(metadata, anonymous, rows, quarantined, status, cells_quarantined)

    def import_cells(self, metadata: SmearMetadata, anonymous: AnonymousSmear, files: list[ObjectInfo]) -> list[_CellOutcome]:
        present = {info.key: info for info in files}
        # Decoding dominates and Pillow releases the GIL while decoding, so threads scale on cores.
        workers = max(2, min(8, (os.cpu_count() or 2) * 2))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda entry: self.import_cell(entry, anonymous, present), metadata.cells))

    def import_cell(self, entry: CellEntry, anonymous: AnonymousSmear, present: dict[str, ObjectInfo]) -> _CellOutcome:
        info = present.get(f"{self.smear.folder}/{entry.image}")
        if info is None:
            reason = QuarantinedItem(entry.cell_id, MISSING_IMAGE, "the image listed for this cell is absent", None, None)
            return _CellOutcome(entry, None, reason)

        def quarantined(code: str, reason: str) -> _CellOutcome:
            return _CellOutcome(entry, None, self.quarantine_file(info, entry.cell_id, code, reason))

        # The offending label is not echoed: a free-text field is no place to trust with what reaches logs.
        unknown = [
            field_name
            for field_name, label in (("analyser_class", entry.analyser_class), ("verified_class", entry.verified_class))
            if (label is not None or field_name == "analyser_class") and not is_known_class(label or "")
        ]
        if unknown:
            return quarantined(UNKNOWN_CLASS, f"{' and '.join(unknown)} not in the taxonomy (see hema_pipeline.taxonomy)")
        try:
            data = self.read(info, self.limits.max_file_bytes)
        except _Unreadable as unreadable:
            item = QuarantinedItem(entry.cell_id, unreadable.code, unreadable.reason, None, None, self.entry_ref(info))
            return _CellOutcome(entry, None, item)
        try:
            clean = clean_cell_image(data, max_pixels=self.limits.max_pixels)
        except ImageRejected as rejected:
            return quarantined(rejected.code, rejected.reason)
        except _DECODER_FAILURES as error:
            # A decoder failure on hostile bytes is that file's problem only; a bug of ours (TypeError,
            # AttributeError) is not caught here, so it fails the run instead of hiding as bad data.
            return quarantined("corrupt_image", f"the image does not decode ({type(error).__name__})")
        (low_w, high_w), (low_h, high_h) = self.limits.width_range, self.limits.height_range
        if not (low_w <= clean.width <= high_w and low_h <= clean.height <= high_h):
            return quarantined(
                UNEXPECTED_DIMENSIONS,
                f"{clean.width}x{clean.height} px is outside the accepted cell size ({low_w}-{high_w} x {low_h}-{high_h} px)",
            )
        digest = _sha256(clean.jpeg)
        key = image_key(digest)
        put_if_absent(self.targets.lake, key, clean.jpeg)
        row = {
            "cell_uid": f"{anonymous.smear_id}:{entry.cell_id}",
            "smear_id": anonymous.smear_id,
            "patient_id": anonymous.patient_id,
            "cell_id": entry.cell_id,
            "image_sha256": digest,
            "image_key": key,
            "width": clean.width,
            "height": clean.height,
            "analyser_class": entry.analyser_class,
            "verified_class": entry.verified_class,
            "import_run_id": self.import_run_id,
            "imported_at": self.started_at,
        }
        return _CellOutcome(entry, row, None)

    def quarantine_unlisted_files(self, metadata: SmearMetadata, files: list[ObjectInfo]) -> list[QuarantinedItem]:
        listed = {f"{self.smear.folder}/{cell.image}" for cell in metadata.cells}
        listed.add(self.smear.metadata_key)
        return [
            self.quarantine_file(info, None, UNLISTED_FILE, "a file in the smear folder is not listed in the metadata")
            for info in files
            if info.key not in listed
        ]

    # -- writing: one transaction ------------------------------------------------------------------

    def finish(
        self,
        metadata: SmearMetadata | None,
        anonymous: AnonymousSmear | None,
        rows: list[dict[str, object]],
        quarantined: list[QuarantinedItem],
        status: str,
        cells_quarantined: int,
    ) -> ImportReport:
        finished_at = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        incoming = pd.DataFrame(rows, columns=list(CELL_COLUMNS))
        listed_ids = [cell.cell_id for cell in metadata.cells] if metadata is not None else []
        # One transaction, serialised per smear: two imports of the same smear (a re-run beside a
        # retry, on a multi-writer warehouse) see each other's rows instead of interleaving.
        with self.targets.warehouse.transaction(serialise_on=f"smear:{self.smear_id}") as connection:
            # Before anything is written: rows pseudonymised under another key or normalisation would
            # silently double every smear, cell and patient.
            ensure_pseudonym_scheme(connection, self.key)
            existing = connection.execute(
                f"select {', '.join(CELL_IDENTITY)} from cells where smear_id = ?", [self.smear_id]
            ).df()
            unchanged = _unchanged_cells(incoming, existing)
            changed = incoming[~incoming["cell_id"].isin(unchanged)]
            existing_ids = {int(value) for value in existing["cell_id"]}
            updated = {int(value) for value in changed["cell_id"]} & existing_ids
            replace_rows(connection, "cells", changed, ["cell_uid"])
            withdrawn = reassigned = 0
            if anonymous is not None:
                withdrawn, reassigned = self.apply_export_to_stored_cells(connection, anonymous, listed_ids)
                self.write_smear_row(connection, anonymous, finished_at)
            self.write_quarantine_rows(connection, quarantined, finished_at, full_evaluation=metadata is not None)
            if status == "imported" and changed.empty and not withdrawn and not reassigned:
                status = "already_present"
            connection.execute(
                "insert into import_runs (import_run_id, smear_id, dagster_run_id, started_at, finished_at, "
                "status, files_seen, cells_imported, cells_quarantined, cells_skipped_existing, cells_updated, "
                "cells_withdrawn) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    self.import_run_id,
                    self.smear_id,
                    self.dagster_run_id,
                    self.started_at,
                    finished_at,
                    status,
                    len(self.smear.files),
                    len(changed),
                    cells_quarantined,
                    len(unchanged),
                    len(updated) + reassigned,
                    withdrawn,
                ],
            )
            # Inside the transaction (and its per-smear lock): two imports of one smear cannot leave the
            # older one's rows as the mirror.
            self.write_parquet(connection)
        class_counts = (
            incoming["verified_class"].fillna(incoming["analyser_class"]).value_counts().sort_index().to_dict()
            if not incoming.empty
            else {}
        )
        return ImportReport(
            import_run_id=self.import_run_id,
            smear_id=self.smear_id,
            status=status,
            files_seen=len(self.smear.files),
            cells_imported=len(changed),
            cells_quarantined=cells_quarantined,
            cells_skipped_existing=len(unchanged),
            quarantined=tuple(quarantined),
            class_counts={str(label): int(count) for label, count in class_counts.items()},
            cells_updated=len(updated) + reassigned,
            cells_withdrawn=withdrawn,
        )

    def apply_export_to_stored_cells(
        self, connection: duckdb.DuckDBPyConnection, anonymous: AnonymousSmear, listed_ids: list[int]
    ) -> tuple[int, int]:
        """The export is authoritative for the smear's cells already stored: cells it no longer lists are
        withdrawn, and cells it lists but could not import this time (their file is now unreadable, say)
        keep their row but move to the smear's current patient. Returns (withdrawn, reassigned)."""
        [(withdrawn,)] = connection.execute(
            "select count(*) from cells where smear_id = ? and cell_id not in (select unnest(?::integer[]))",
            [self.smear_id, listed_ids],
        ).fetchall()
        if withdrawn:
            connection.execute(
                "delete from cells where smear_id = ? and cell_id not in (select unnest(?::integer[]))",
                [self.smear_id, listed_ids],
            )
        [(reassigned,)] = connection.execute(
            "select count(*) from cells where smear_id = ? and patient_id <> ?", [self.smear_id, anonymous.patient_id]
        ).fetchall()
        if reassigned:
            connection.execute(
                "update cells set patient_id = ? where smear_id = ? and patient_id <> ?",
                [anonymous.patient_id, self.smear_id, anonymous.patient_id],
            )
        return int(withdrawn), int(reassigned)

    def write_smear_row(self, connection: duckdb.DuckDBPyConnection, anonymous: AnonymousSmear, now: dt.datetime) -> None:
        [(cells,)] = connection.execute("select count(*) from cells where smear_id = ?", [anonymous.smear_id]).fetchall()
        [(rows,)] = connection.execute("select count(*) from smears where smear_id = ?", [anonymous.smear_id]).fetchall()
        if not cells and not rows:
            return
        connection.execute("delete from smears where smear_id = ?", [anonymous.smear_id])
        connection.execute(
            "insert into smears select ?, ?, ?, ?, ?, ?, ?, ?, ?",
            [
                anonymous.smear_id,
                anonymous.patient_id,
                anonymous.age_band,
                anonymous.sex,
                anonymous.collection_date,
                anonymous.analyser_id,
                int(cells),
                self.import_run_id,
                now,
            ],
        )

    def write_quarantine_rows(
        self,
        connection: duckdb.DuckDBPyConnection,
        items: list[QuarantinedItem],
        now: dt.datetime,
        full_evaluation: bool,
    ) -> None:
        """A quarantine row is open while the latest import still finds its problem: rows found again
        are reopened if they had been resolved; after an import that read the whole smear (its metadata
        parsed), every open row of the smear it did not find again is resolved by this import."""
        frame = pd.DataFrame(
            [
                {
                    "quarantine_id": _sha256(
                        f"{self.smear_id}|{item.cell_id}|{item.content_sha256}|{item.reason_code}|{item.entry_ref}".encode()
                    )[:32],
                    "smear_id": self.smear_id,
                    "cell_id": item.cell_id,
                    "reason_code": item.reason_code,
                    "reason": item.reason,
                    "kept_key": item.kept_key,
                    "content_sha256": item.content_sha256,
                    "import_run_id": self.import_run_id,
                    "quarantined_at": now,
                    "resolved_by_import_run_id": None,
                }
                for item in items
            ],
            columns=list(QUARANTINE_COLUMNS),
        ).astype({"cell_id": "Int64", "quarantined_at": "datetime64[us]", "resolved_by_import_run_id": "object"})
        # A file quarantined again for the same reason keeps its first row: re-runs add nothing.
        frame = frame.drop_duplicates("quarantine_id")
        connection.register("incoming_quarantine", frame)
        try:
            connection.execute(
                "update quarantine set resolved_by_import_run_id = null where quarantine_id in "
                "(select quarantine_id from incoming_quarantine)"
            )
            columns = ", ".join(QUARANTINE_COLUMNS)
            connection.execute(
                f"insert into quarantine ({columns}) select {columns} from incoming_quarantine "
                "where quarantine_id not in (select quarantine_id from quarantine)"
            )
            if full_evaluation:
                connection.execute(
                    "update quarantine set resolved_by_import_run_id = ? where smear_id = ? and "
                    "resolved_by_import_run_id is null and quarantine_id not in "
                    "(select quarantine_id from incoming_quarantine)",
                    [self.import_run_id, self.smear_id],
                )
        finally:
            connection.unregister("incoming_quarantine")

    def write_parquet(self, connection: duckdb.DuckDBPyConnection) -> None:
        """Mirror the smear's rows, as this import commits them, to Parquet: the files a data lake or a rebuild reads."""
        for table, order in (("cells", "cell_uid"), ("smears", "smear_id"), ("quarantine", "quarantine_id")):
            rows = connection.sql(
                f"select * from {table} where smear_id = ? order by {order}", params=[self.smear_id]
            ).to_arrow_table()
            key = f"tables/{table}/smear_id={self.smear_id}/{table}.parquet"
            if rows.num_rows == 0 and not self.targets.lake.exists(key):
                continue
            buffer = io.BytesIO()
            pyarrow.parquet.write_table(rows, buffer)
            self.targets.lake.put_bytes(key, buffer.getvalue())


def _unchanged_cells(incoming: pd.DataFrame, existing: pd.DataFrame) -> set[int]:
    if incoming.empty or existing.empty:
        return set()
    merged = incoming[list(CELL_IDENTITY)].merge(existing, on=list(CELL_IDENTITY), how="inner")
    return {int(value) for value in merged["cell_id"]}


def import_smear(
    inbox: ObjectStore,
    smear: InboxSmear,
    key: PseudonymKey,
    targets: ImportTargets,
    dagster_run_id: str | None = None,
    limits: ImportLimits | None = None,
) -> ImportReport:
    return _SmearImport(inbox, smear, key, targets, dagster_run_id, limits or ImportLimits.from_settings()).run()
